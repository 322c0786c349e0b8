"""``ctscreen bench`` (also ``python -m benchmarks``): every benchmark behind one command.

::

    ctscreen bench perf     [--triton-url H:P] ...   perf_analyzer sweeps: valid_area, lesion, postprocess, ct_screen
    ctscreen bench load     [--url GATEWAY] ...      whole studies against the gateway (Poisson/bursty/closed)
    ctscreen bench ratios   [--triton-url H:P] ...   ORT sweep vs ensemble vs gateway vs MONAI Deploy SDK, 300 slices
    ctscreen bench all      ...                      perf + load + ratios on one embedded stack, then report
    ctscreen bench report                            JSON + Markdown + plots from the latest results
    ctscreen bench gpu      ...                      the paper profile on a GPU (UNet++ ResNet-50, TensorRT)
    ctscreen bench figures  [--only|--skip S]       every published figure, stamped (``make bench``)
    ctscreen bench sweep    ...                      the in-process ONNX Runtime sweep alone
    ctscreen bench split    ...                      gateway ratio, Triton and gateway on a core each (not the goal)
    ctscreen bench fov                               the models across fields of view (real slices, 250-500 mm)
    ctscreen bench noise                             the models under added noise (real slices, low-dose CT)
    ctscreen bench scaling|phantom|models|decode|admission ... the other engineers' benchmarks

Without ``--url``/``--triton-url`` a benchmark starts the embedded Triton (cpu profile) and a gateway on
loopback ports and stops them at the end. Load goes only to loopback unless ``--allow-remote`` is given
with an explicit URL. Results land in ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from benchmarks.common import (
    TMP_DIR,
    BenchError,
    UnsafeTarget,
    machine_info,
    results_dir,
    set_results_dir,
    stamp,
    write_json,
)
from ctscreen.cliargs import positive, positive_list

logger = logging.getLogger("benchmarks")

DELEGATES = {
    "scaling": ("benchmarks.scaling_sim", "cluster scaling simulation (helm engineer)"),
    "phantom": ("benchmarks.bench_phantom", "phantom generation speed (phantom engineer)"),
    "models": ("benchmarks.bench_models", "model accuracy/speed (training engineer)"),
    "decode": ("benchmarks.bench_decode", "DICOM decoding speed (gateway-dicom engineer)"),
    "gpu": ("benchmarks.gpu_paper_profile", "the paper profile on a GPU with TensorRT"),
    "admission": ("benchmarks.bench_admission", "concurrent large uploads against the in-flight budget, RSS"),
    "figures": ("benchmarks.figures", "every published figure, stamped (make bench)"),
    "sweep": ("benchmarks.sweep_inprocess", "in-process ONNX Runtime over batch, threads and scheduling"),
    "split": ("benchmarks.split_cores", "the gateway ratio with Triton on one core and the gateway on another "
              "(deployment shape; not the goal)"),
    "fov": ("benchmarks.fov", "the models across fields of view (real slices re-imaged 250-500 mm)"),
    "noise": ("benchmarks.noise", "the models under added noise (real slices; low-dose CT)"),
}


# the delegated commands that write under results_dir(), so the global --results reaches them; the others
# write where their own options say (scaling: --out; figures: benchmarks/results, stamped) or write nothing
RESULTS_DIR_DELEGATES = frozenset({"phantom", "models", "gpu", "admission", "sweep", "split", "fov", "noise"})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, never a traceback
        self.exit(2, f"ctscreen bench: error: {message}\n")


def _range(text: str) -> tuple[int, int, int]:
    parts = text.split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected start:end[:step], got {text!r}") from None
    if len(nums) == 1:
        nums = [nums[0], nums[0], 1]
    elif len(nums) == 2:
        nums.append(1)
    if len(nums) != 3 or nums[0] < 1 or nums[1] < nums[0] or nums[2] < 1:
        raise argparse.ArgumentTypeError(f"expected start:end[:step] with 1 <= start <= end, got {text!r}")
    return nums[0], nums[1], nums[2]


def _add_target(p: argparse.ArgumentParser, gateway: bool) -> None:
    g = p.add_argument_group("targets (default: start the embedded stack on loopback)")
    g.add_argument("--triton-url", help="gRPC host:port of a running Triton (starts none)")
    g.add_argument("--triton-http-url", help="its HTTP URL (default: same host, port 8000)")
    g.add_argument("--triton-metrics-url", help="its metrics URL (default: same host, port 8002)")
    if gateway:
        g.add_argument("--url", help="base URL of a running gateway (starts none)")
    g.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback URL given explicitly (a cluster you own)")
    g.add_argument("--repo", type=Path, help="model repository for the embedded Triton (default: cpu profile)")
    if gateway:
        g.add_argument("--gateway-env", action="append", default=[], metavar="CTSCREEN_X=V",
                       help="setting of the gateway started here (repeatable), e.g. CTSCREEN_TRITON_BATCH_SIZE=8")


def _add_load(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("case-level load")
    g.add_argument("--mode", choices=("poisson", "bursty", "closed"), default="closed")
    g.add_argument("--rates", type=positive_list(float), default=[0.02], help="studies/s for poisson/bursty, comma list = sweep")
    g.add_argument("--concurrency", type=positive_list(int), default=[1, 2], help="closed loop: studies in flight, list = sweep")
    g.add_argument("--burst", type=int, default=3, help="bursty: studies per burst")
    g.add_argument("--duration", type=float, default=120.0, help="arrival window per run, seconds")
    g.add_argument("--max-studies", type=int, default=6, help="studies per run at most")
    g.add_argument("--study-timeout", type=float, default=600.0, help="a study unfinished after this is an error")
    g.add_argument("--sizes", default="choice:40,80", help="slices per study: fixed:N, choice:A,B, uniform:LO,HI, "
                   "lognormal:MEDIAN,SIGMA,LO,HI")
    g.add_argument("--kinds", default="covid,normal", help="phantom kinds, alternating")
    g.add_argument("--upload", choices=("files", "zip"), default="files")
    g.add_argument("--follow", choices=("events", "poll"), default="events",
                   help="learn that a job finished from its server-sent events or by polling it")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--append", action="store_true", help="add these runs to the latest load results")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctscreen bench", description=__doc__.split("::")[0].strip().replace("``", ""), allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = _Parser(add_help=False)
    shared.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress")
    shared.add_argument("--results", type=Path, default=argparse.SUPPRESS,
                        help="results folder (default benchmarks/results)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.add_argument("--results", type=Path, help="results folder (default benchmarks/results)")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)  # argparse lists them all

    p = sub.add_parser("perf", parents=[shared], help="perf_analyzer sweeps over each model and the ensemble")
    _add_target(p, gateway=False)
    _add_perf(p)

    p = sub.add_parser("load", parents=[shared], help="case-level load against the gateway")
    _add_target(p, gateway=True)
    _add_load(p)

    p = sub.add_parser("ratios", parents=[shared], help="overhead ratios against the in-process ORT sweep and the MONAI Deploy SDK client")
    _add_target(p, gateway=True)
    _add_ratios(p)

    p = sub.add_parser("all", parents=[shared], help="perf + load + ratios on one stack, then the report")
    _add_target(p, gateway=True)
    _add_perf(p)
    _add_load(p)
    _add_ratios(p)

    sub.add_parser("report", parents=[shared], help="JSON + Markdown + plots from the latest results")
    for name, (_, text) in DELEGATES.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _add_perf(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perf_analyzer")
    g.add_argument("--models", default="valid_area,lesion,postprocess,ct_screen")
    g.add_argument("--batches", type=positive_list(int), default=[1, 4], help="batch sizes per request")
    g.add_argument("--pa-concurrency", type=_range, default=(1, 4, 1), help="start:end:step")
    g.add_argument("--request-count", type=int, default=16, help="requests per measurement window")
    g.add_argument("--stability", type=int, default=50,
                   help="perf_analyzer --stability-percentage (a shared 2-core machine is noisy)")
    g.add_argument("--pa-timeout", type=float, default=600.0, help="seconds per scenario at most")


def _add_ratios(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ratios")
    g.add_argument("--study-slices", type=int, default=60, help="slices per study for the gateway and peer-client runs")
    g.add_argument("--studies", type=int, default=4, help="studies per gateway / peer-client run")
    g.add_argument("--big-study", type=int, default=300, help="slices of the single large study (0: skip)")
    g.add_argument("--gateway-concurrency", type=int, default=2, help="studies in flight on the gateway")
    g.add_argument("--ort-min-slices", type=int, default=64, help="slices per ORT/ensemble measurement")
    g.add_argument("--rounds", type=positive(int), default=2, help="alternating ORT/ensemble rounds (best of each kept)")
    g.add_argument("--gateway-rounds", type=positive(int), default=4,
                   help="gateway loads, each followed by a run of ORT's best setting (the best of each side compared)")
    g.add_argument("--ort-batches", type=positive_list(int), default=[1, 2, 4, 8, 16],
                   help="batch sizes of the in-process ORT sweep")
    g.add_argument("--ort-threads", type=positive_list(int), default=[1, 2],
                   help="intra-op threads per session of the in-process ORT sweep")
    g.add_argument("--skip", default="", help="comma list of: gateway, monai (plain HTTP-JSON client), "
                   "monai-sdk (MONAI Deploy App SDK client), big")


# --- stack -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stack(args: argparse.Namespace, need_gateway: bool) -> Iterator[tuple[Any, str | None]]:
    from benchmarks import stack
    from benchmarks.common import check_target

    env = {}
    for item in getattr(args, "gateway_env", []):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("CTSCREEN_"):
            raise ValueError(f"--gateway-env wants CTSCREEN_NAME=VALUE, got {item!r}")
        env[key] = value
    with contextlib.ExitStack() as es:
        for u in (args.triton_url, args.triton_http_url, args.triton_metrics_url):
            if u:
                check_target(u, allow_remote=args.allow_remote)
        if args.triton_url:
            triton = stack.triton_from_urls(args.triton_url, args.triton_http_url, args.triton_metrics_url)
        elif args.cmd == "load" and args.url:
            # a gateway somebody else runs: its Triton is read only if its metrics URL is given
            triton = stack.TritonTarget("", "", args.triton_metrics_url)
        else:
            print("starting the embedded Triton (cpu profile) ...", file=sys.stderr)
            triton = es.enter_context(stack.embedded_triton(args.repo))
        gw = getattr(args, "url", None)
        if gw:
            check_target(gw, allow_remote=args.allow_remote)
        elif need_gateway:
            print("starting the gateway ...", file=sys.stderr)
            gw = es.enter_context(stack.gateway(triton, env=env))
        yield triton, gw


def _save(name: str, doc: dict[str, Any]) -> Path:
    write_json(TMP_DIR / "history" / f"{name}-{stamp()}.json", doc)
    return write_json(results_dir() / f"{name}-latest.json", doc)


def cmd_perf(args: argparse.Namespace, triton: Any) -> dict[str, Any]:
    from benchmarks import perf

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in perf.MODELS]
    if bad:
        raise ValueError(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(perf.MODELS)}")
    doc = perf.sweep(triton.grpc_url, triton.http_url, models=models, batches=args.batches,
                     concurrency=args.pa_concurrency, request_count=args.request_count, stability=args.stability,
                     timeout=args.pa_timeout,
                     allow_remote=args.allow_remote)
    doc["machine"] = machine_info()
    path = _save("perf", doc)
    for s in doc["scenarios"]:
        if "error" in s:
            print(f"  {s['model']:<12} b{s.get('batch', '?')}: FAILED {s['error']}")
            continue
        for r in s["rows"]:
            print(f"  {s['model']:<12} b{s['batch']} c{int(r['Concurrency'])}: {r['Inferences/Second']:.2f} infer/s, "
                  f"p99 {r['p99 latency'] / 1000:.1f} ms")
    print(f"perf: {path}")
    return doc


def cmd_load(args: argparse.Namespace, triton: Any, gateway_url: str) -> dict[str, Any]:
    import numpy as np

    from benchmarks.load import LoadConfig, run_load
    from benchmarks.studies import SizeDist, build_pool

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    runs_cfg = []
    sweep = args.concurrency if args.mode == "closed" else args.rates
    for v in sweep:
        runs_cfg.append(LoadConfig(
            url=gateway_url, mode=args.mode, rate=v if args.mode != "closed" else 0.05,
            concurrency=v if args.mode == "closed" else 1, burst=args.burst, duration=args.duration,
            max_studies=args.max_studies, study_timeout=args.study_timeout, sizes=args.sizes, kinds=kinds,
            upload=args.upload, follow=args.follow, seed=args.seed, allow_remote=args.allow_remote,
            triton_metrics_url=triton.metrics_url if triton else None,
        ))
    for c in runs_cfg:
        c.validate()
    sizes = SizeDist.parse(args.sizes).draw(np.random.default_rng(args.seed), args.max_studies)
    print(f"preparing phantom studies ({sorted(set(sizes))} slices) ...", file=sys.stderr)
    pool = build_pool(sizes, kinds)
    runs = []
    for c in runs_cfg:
        r = run_load(c, pool)
        runs.append(r)
        arr = f"c={c.concurrency}" if c.mode == "closed" else f"{c.mode} {c.rate}/s"
        lat = r["latency_s"]
        print(f"  {arr}: {r['completed']}/{r['sent']} done, {r['studies_per_hour']} studies/h, "
              f"{r['slices_per_s']} slices/s, p50 {lat['p50']} s, p95 {lat['p95']} s, p99 {lat['p99']} s, "
              f"errors {r['errors'] or 0}")
    doc = {"machine": machine_info(), "runs": runs}
    if args.append:
        from benchmarks.report import latest

        doc["runs"] = ((latest("load") or {}).get("runs") or []) + runs
    print(f"load: {_save('load', doc)}")
    return doc


def cmd_ratios(args: argparse.Namespace, triton: Any, gateway_url: str | None) -> dict[str, Any]:
    from benchmarks.ratios import run_ratios

    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    doc = run_ratios(triton, gateway_url, study_slices=args.study_slices, studies=args.studies,
                     big_study=args.big_study, gateway_concurrency=args.gateway_concurrency,
                     ort_min_slices=args.ort_min_slices, rounds=args.rounds,
                     gateway_rounds=args.gateway_rounds, allow_remote=args.allow_remote, skip=skip,
                     ort_batches=args.ort_batches, ort_threads=args.ort_threads)
    path = _save("ratios", doc)
    print("goal against measured:")
    for g in doc["goals"]:
        met = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        note = f" {g['note']}" if g.get("note") else ""
        print(f"  {g['name']:<52} goal {g['goal']:<8} measured {g['measured']} {g['unit']}  [{met}]{note}")
    for line in doc["where_the_time_goes"]:
        print(f"  - {line}")
    print(f"ratios: {path}")
    return doc


def _delegate(name: str, argv: list[str]) -> int:
    module_name, _ = DELEGATES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"ctscreen bench {name}: {module_name.replace('.', '/')}.py is not there yet", file=sys.stderr)
            return 2
        raise
    func = getattr(module, "main", None)
    if func is None:
        print(f"ctscreen bench {name}: {module_name} has no main(argv)", file=sys.stderr)
        return 2
    return int(func(argv) or 0)


def _on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # SIGTERM (and SIGINT, even when a background shell ignored it) unwinds the stack, so that the
    # embedded Triton and the gateway started here are always stopped
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _delegated(argv: list[str]) -> int | None:
    """Where a delegated command's name stands in ``argv`` once the global options before it are passed
    (``-v``, ``--results DIR``); None when the command is not delegated. What follows the name is the
    delegate's own to parse."""
    i = 0
    while i < len(argv):
        if argv[i] in DELEGATES:
            return i
        if argv[i] in ("-v", "--verbose") or argv[i].startswith("--results="):
            i += 1
        elif argv[i] == "--results":
            i += 2
        else:
            return None
    return None


def _main(argv: list[str]) -> int:
    parser = build_parser()
    at = _delegated(argv)
    args = parser.parse_args(argv if at is None else argv[:at])
    if at is not None:
        args.cmd = argv[at]
        if args.results and args.cmd not in RESULTS_DIR_DELEGATES:
            parser.error(f"--results does not reach '{args.cmd}', which writes where its own options say "
                         f"(ctscreen bench {args.cmd} --help)")
    if at is None or args.verbose:  # a delegate configures its own logging (its -v, its progress at INFO)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.results:
        try:  # one line now rather than a traceback when the first figure is written
            args.results.mkdir(parents=True, exist_ok=True)
            if not os.access(args.results, os.W_OK):
                raise PermissionError(f"{args.results} is not writable")
        except OSError as exc:
            parser.error(f"--results {args.results}: {exc.strerror or exc}")
        set_results_dir(args.results)
    if at is not None:
        return _delegate(args.cmd, argv[at + 1:])
    url = getattr(args, "url", None)
    if url and not url.lower().startswith(("http://", "https://")):
        parser.error(f"--url must start with http:// or https://, got {url!r}")
    if not args.cmd:
        parser.print_help()
        return 0
    try:
        if args.cmd == "report":
            from benchmarks.report import build

            rep = build()
            print(json.dumps(rep["goals"], indent=1) if rep["goals"] else "no ratios yet")
            print(f"report: {results_dir() / 'report.md'}")
            return 0
        need_gw = args.cmd in ("load", "ratios", "all") and "gateway" not in getattr(args, "skip", "")
        with _stack(args, need_gateway=need_gw) as (triton, gw):
            if args.cmd in ("perf", "all"):
                cmd_perf(args, triton)
            if args.cmd in ("load", "all") and gw is not None:  # all --skip gateway: no load run
                cmd_load(args, triton, gw)
            if args.cmd in ("ratios", "all"):
                cmd_ratios(args, triton, gw)
        if args.cmd == "all":
            from benchmarks.report import build

            build()
            print(f"report: {results_dir() / 'report.md'}")
        return 0
    except (BenchError, UnsafeTarget, ValueError) as exc:
        print(f"ctscreen bench {args.cmd}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ctscreen bench {args.cmd}: interrupted; servers stopped", file=sys.stderr)
        return 130
