"""Where the CPU of one study goes: process CPU seconds per slice, by process, served against in process.

The ratio goals of issue #17 are wall-clock ratios on one 2-core machine where the client, the gateway,
Triton's core and its python-backend stubs share the cores that the in-process pipeline has to itself.
On a CPU-bound machine a study cannot be served faster than its total CPU allows, so this splits one
study's CPU by process (read from ``/proc``: user + system time of each process and of its reaped
children) and compares the total with the CPU the same study costs in process:

* ``client``       this process while it uploads the study and polls the job (``benchmarks.load``);
* ``gateway``      the uvicorn process (HTTP, multipart, spool, DICOM parse and decode, gRPC, store);
* ``triton core``  ``tritonserver`` (gRPC, the ensemble scheduler, copies to and from the stubs);
* ``stub <model>`` each python-backend stub (ONNX Runtime and the post-processing, plus its IPC).

::

    python -m benchmarks.cpu_split --slices 300        # -> results/cpu-latest.json (+ a table)

The study is served and then screened in process ``--rounds`` times (3) in turn; the round of the median
CPU ratio is the result and every round's ratios are listed.

The in-process side is the best setting of the last ratios run (``results/ratios-latest.json``) unless
``--batch/--threads/--schedule`` name one. ``--request-batch N`` serves with N slices a request (the
gateway's ``CTSCREEN_TRITON_BATCH_SIZE`` and the models' preferred batch; default the shipped cpu
profile's) to compare batch sizes, and ``--run-batch N`` runs N slices per ONNX Runtime call inside
the models (0: the whole dynamic batch)::

    python -m benchmarks.cpu_split --request-batch 4 --out /tmp/cpu-b4.json
    python -m benchmarks.cpu_split --run-batch 0 --out /tmp/cpu-whole.json

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks import sweep_inprocess
from benchmarks.common import RESULTS_DIR, BenchError, publish_run
from benchmarks.load import LoadConfig, run_load
from benchmarks.ratios import decode_series, median_run
from benchmarks.stack import embedded_triton, gateway
from benchmarks.studies import build_pool
from ctscreen.cliargs import positive

logger = logging.getLogger(__name__)
CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after ``pid (comm)`` (a command name may hold spaces and parentheses):
    ``[0]`` the state, ``[1]`` the parent, ``[7]`` minor page faults, ``[11]``-``[14]`` CPU ticks (proc(5) fields 3 on).
    OSError when the process is gone."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def _proc(pid: int) -> tuple[int, float, str] | None:
    """``(ppid, cpu seconds incl. reaped children, cmdline)`` of ``pid``, None when it is gone."""
    try:
        fields = stat_fields(pid)
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return ppid, (utime + stime + cutime + cstime) / CLK, cmd


def label(cmd: str) -> str:
    """What a process is, from its command line.

    >>> label("/x/triton_python_backend_stub /repo/lesion/1/model.py triton_python_backend_shm 1 2")
    'stub lesion'
    >>> label("/x/tritonserver --model-repository /r"), label("python -m uvicorn gateway.main:app")
    ('triton core', 'gateway')
    """
    if "triton_python_backend_stub" in cmd:
        model_py = next((w for w in cmd.split() if w.endswith("model.py")), "")
        parts = Path(model_py).parts
        return f"stub {parts[-3]}" if len(parts) >= 3 else "stub ?"
    if "tritonserver" in cmd:
        return "triton core"
    if "uvicorn" in cmd or "gateway" in cmd:
        return "gateway"
    return "other"


def processes() -> dict[int, tuple[int, float, str]]:
    """``{pid: (ppid, cpu seconds incl. reaped children, cmdline)}`` of every process in ``/proc``."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _proc(int(entry))) is not None:
            procs[int(entry)] = info
    return procs


def labelled_tree(procs: dict[int, tuple[int, float, str]], root: int | None = None) -> dict[int, str]:
    """``{pid: label}`` of ``root`` (default this process, labelled ``client``) and every descendant in
    ``procs`` (:func:`processes`), by :func:`label`; a descendant is labelled by its nearest labelled
    ancestor (the gateway's decode workers count as the gateway)."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _, _) in procs.items():
        children[ppid].append(pid)
    out: dict[int, str] = {}
    todo = [(root, "client")] if root in procs else []
    while todo:
        pid, name = todo.pop()
        out[pid] = name
        for child in children[pid]:
            own = label(procs[child][2])
            todo.append((child, name if own == "other" else own))
    return out


def snapshot(root: int | None = None) -> dict[str, float]:
    """CPU seconds so far of ``root`` (default this process) and every descendant, by
    :func:`labelled_tree`'s labels."""
    procs = processes()
    out: dict[str, float] = defaultdict(float)
    for pid, name in labelled_tree(procs, root).items():
        out[name] += procs[pid][1]
    return dict(out)


def split(before: dict[str, float], after: dict[str, float], slices: int) -> dict[str, float]:
    """CPU milliseconds per slice by process between two snapshots (and ``total``).

    >>> split({"client": 1.0}, {"client": 1.3, "gateway": 0.6}, 300)
    {'client': 1.0, 'gateway': 2.0, 'total': 3.0}
    """
    keys = sorted(set(before) | set(after))
    out = {k: round(1000 * (after.get(k, 0.0) - before.get(k, 0.0)) / slices, 2) for k in keys}
    out["total"] = round(sum(out.values()), 2)
    return out


def _best_setting(args: argparse.Namespace) -> sweep_inprocess.Setting:
    if args.batch and args.threads and args.schedule:
        return sweep_inprocess.Setting(args.batch, args.threads, args.schedule)
    path = RESULTS_DIR / "ratios-latest.json"
    try:
        best = json.loads(path.read_text())["ort"]["best"]
        return sweep_inprocess.Setting(best["batch"], best["threads"], best["schedule"])
    except (OSError, KeyError, ValueError) as exc:
        raise BenchError(f"no in-process setting: pass --batch, --threads and --schedule ({path}: {exc})") from exc


def _served_with(request_batch: int | None, run_batch: int | None, folder: Path) -> tuple[Path | None, dict[str, str]]:
    """The cpu repository (built in ``folder``) and gateway environment serving ``request_batch`` slices a
    request and ``run_batch`` slices per ONNX Runtime call (None: the shipped defaults)."""
    if request_batch is None and run_batch is None:
        return None, {}
    import dataclasses

    from ctscreen.repo import build_repository, default_settings

    s = default_settings("cpu")
    env = {}
    if request_batch is not None:
        s = dataclasses.replace(s, preferred_batch_sizes=(request_batch,), warmup_batch=request_batch)
        env["CTSCREEN_TRITON_BATCH_SIZE"] = str(request_batch)
    if run_batch is not None:
        s = dataclasses.replace(s, run_batch=run_batch)
    repo = build_repository("cpu", folder / "repo", settings=s)
    return repo, env


def run(slices: int, setting: sweep_inprocess.Setting, request_batch: int | None = None,
        run_batch: int | None = None, rounds: int = 3) -> dict[str, Any]:
    """``rounds`` alternating pairs (the study served, then in process); the round of the median CPU ratio
    is the result, every round's ratios are listed (one pair moved the CPU ratio by 0.07 between runs)."""
    pool = build_pool([slices], ("covid",))
    warm = build_pool([24], ("covid",))
    vol, meta = decode_series(next(iter(pool.values())).files)
    pairs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cpu-split-")))
        repo, env = _served_with(request_batch, run_batch, folder)
        triton = stack.enter_context(embedded_triton(repo))
        url = stack.enter_context(gateway(triton, env=env))

        def one(p: dict, n: int) -> dict[str, Any]:
            cfg = LoadConfig(url=url, mode="closed", concurrency=1, duration=600, max_studies=1,
                             sizes=f"fixed:{n}", kinds=("covid",), study_timeout=600)
            return run_load(cfg, p)

        one(warm, 24)
        for r in range(rounds):
            logger.info("round %d: the study served, then in process ...", r + 1)
            before, t0 = snapshot(), time.perf_counter()
            served = one(pool, slices)
            after, wall = snapshot(), time.perf_counter() - t0
            if not served.get("completed"):
                raise BenchError(f"the {slices}-slice study did not complete through the gateway: {served.get('errors')}")
            c0 = time.process_time()  # the served side's processes are idle meanwhile
            local = sweep_inprocess.study_in_process(setting, vol, meta)
            local_cpu = 1000 * (time.process_time() - c0) / slices  # warm-up included: an upper bound
            served_split = split(before, after, slices)
            pairs.append({
                "served": {"latency_s": served["latency_s"]["max"], "wall_s": round(wall, 3),
                           "cpu_ms_per_slice": served_split},
                "in_process": {**local, "cpu_ms_per_slice": round(local_cpu, 2)},
                "cpu_ratio": round(served_split["total"] / local_cpu, 3),
                "wall_ratio": round(served["latency_s"]["max"] / local["wall_s"], 3),
            })
    from ctscreen.repo import default_settings
    from gateway.settings import Settings

    median = median_run(pairs, lambda p: p["cpu_ratio"])
    return {
        "slices": slices,
        # what was served (the shipped defaults when not given: the gateway's slices a request, which the
        # models' batcher prefers, and the cpu profile's slices per ONNX Runtime call), so a result says what ran
        "request_batch": request_batch if request_batch is not None else Settings.model_fields["triton_batch_size"].default,
        "run_batch": run_batch if run_batch is not None else default_settings("cpu").run_batch,
        **median,
        "rounds": [{"cpu_ratio": p["cpu_ratio"], "wall_ratio": p["wall_ratio"],
                    "served_cpu_ms_per_slice": p["served"]["cpu_ms_per_slice"]["total"],
                    "in_process_cpu_ms_per_slice": p["in_process"]["cpu_ms_per_slice"]} for p in pairs],
    }


def measured_at(m: dict[str, Any]) -> str:
    """`` Measured <date>, commit <c>, load <l>.`` from a result's machine stamp ('' without one).

    >>> measured_at({"time_utc": "2026-12-03T21:02:48Z", "commit": "bddadc8", "loadavg_1m": 1.405})
    ' Measured 2026-12-03T21:02:48Z, commit `bddadc8`, 1-min load average 1.41 at the start.'
    """
    if not m.get("commit"):
        return ""
    load = f", 1-min load average {m['loadavg_1m']:.2f} at the start" if m.get("loadavg_1m") is not None else ""
    dirty = " (uncommitted changes)" if m.get("dirty") else ""
    return f" Measured {m.get('time_utc', '?')}, commit `{m['commit']}`{dirty}{load}."


def markdown(doc: dict[str, Any]) -> str:
    s, local = doc["served"], doc["in_process"]
    rounds = doc.get("rounds") or []
    which = (f"the round of the median CPU ratio of {len(rounds)} alternating rounds (CPU ratios "
             f"{', '.join(str(r['cpu_ratio']) for r in rounds)}; wall ratios "
             f"{', '.join(str(r['wall_ratio']) for r in rounds)})" if len(rounds) > 1 else "one round")
    lines = [f"One {doc['slices']}-slice study, {which}: {s['latency_s']:.1f} s through the gateway, "
             f"{local['wall_s']:.1f} s in process (wall ratio {doc['wall_ratio']}); CPU "
             f"{s['cpu_ms_per_slice']['total']:.1f} ms per slice served against {local['cpu_ms_per_slice']:.1f} in "
             f"process (CPU ratio {doc['cpu_ratio']}).{measured_at(doc.get('machine') or {})}", "",
             "| process | CPU ms per slice |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in s["cpu_ms_per_slice"].items() if k != "total"]
    lines += [f"| **total served** | {s['cpu_ms_per_slice']['total']:.1f} |",
              f"| in process ({local['batch']} / {local['threads']} / {local['schedule']}) | {local['cpu_ms_per_slice']:.1f} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_split", description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--schedule", choices=sweep_inprocess.SCHEDULES, default=None)
    p.add_argument("--request-batch", type=int, default=None,
                   help="slices per request to Triton (default: the shipped cpu profile's)")
    p.add_argument("--run-batch", type=int, default=None,
                   help="slices per ONNX Runtime call inside the models, 0: the whole batch (default: the shipped cpu profile's)")
    p.add_argument("--rounds", type=positive(int), default=3,
                   help="alternating pairs (served, in process); the median CPU ratio's round is the result")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "cpu-latest.json")
    args = p.parse_args(argv)
    if args.slices < 8:
        p.error(f"--slices must be at least 8, got {args.slices}")
    if args.request_batch is not None and not 1 <= args.request_batch <= 8:
        p.error(f"--request-batch must be in [1, 8] (the cpu profile's max_batch_size), got {args.request_batch}")
    if args.run_batch is not None and args.run_batch < 0:
        p.error(f"--run-batch must be >= 0, got {args.run_batch}")
    if not Path("/proc/self/stat").exists():
        p.error("needs Linux /proc")
    return publish_run(p.prog, argv, lambda: run(args.slices, _best_setting(args), args.request_batch, args.run_batch,
                                                 args.rounds), markdown, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
