"""Paired A/B of two environments of the Triton server: the ensemble's and the fused model's slices/s and CPU.

Each round starts the embedded Triton once with A's environment and once with B's, in alternating order
(A B, B A, ...), so that drift in the machine's load hits both alike, and drives each model the way the
gateway does (2 slices a request, 4 requests in flight) after a warm-up. It records slices/s and the CPU of
every process per slice (``/proc``, as :mod:`benchmarks.cpu_split`: this client, Triton's core, each stub).

A side's settings are ``NAME=value`` on top of the server's own environment (``ctscreen.embedded.MALLOC_ENV``
among it); ``NAME=`` (empty) removes NAME. Without ``--a``/``--b``, A is glibc's malloc defaults (every name of
``MALLOC_ENV`` and ``GLIBC_TUNABLES`` removed) and B the shipped server::

    python -m benchmarks.ab_triton                                        # -> results/ab-triton-latest.json
    python -m benchmarks.ab_triton --a MALLOC_TRIM_THRESHOLD_=33554432 --b --rounds 3 --out /tmp/x.json

``--a-repo``/``--b-repo`` serve a side from a model repository of its own (``ctscreen repo build --profile cpu
--out DIR``, then edited: a config setting to compare) instead of the cpu profile's cached one::

    ctscreen repo build --profile cpu --out /tmp/a && cp -r /tmp/a /tmp/b
    sed -i 's/max_queue_delay_microseconds: 0 }/max_queue_delay_microseconds: 0 priority_levels: 2 default_priority_level: 2 }/' \
        /tmp/b/ct_screen_fused/config.pbtxt
    python -m benchmarks.ab_triton --a --a-repo /tmp/a --b-repo /tmp/b --models ct_screen_fused --rounds 4

Linux only (``/proc``). Prints a table: each model's best and median slices/s and median CPU a slice by
process, A against B.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path
from typing import Any

from tritonclient.utils import InferenceServerException

from benchmarks.common import BenchError, publish_run, results_dir
from benchmarks.cpu_split import snapshot, split
from benchmarks.perf import sample_slices
from benchmarks.ratios import ensemble_throughput
from benchmarks.stack import embedded_triton
from ctscreen.contracts import ENSEMBLE_MODEL, FUSED_MODEL
from ctscreen.embedded import MALLOC_ENV

logger = logging.getLogger(__name__)

CALL = (2, 4)
"""(slices a request, requests in flight): the gateway's shape on the cpu profile."""


def side_env(pairs: list[str] | None) -> dict[str, str | None]:
    """A side's environment from ``NAME=value`` pairs (``NAME=``: removed); None: glibc's malloc defaults.

    >>> side_env(["MALLOC_TOP_PAD_=0", "MALLOC_ARENA_MAX="])
    {'MALLOC_TOP_PAD_': '0', 'MALLOC_ARENA_MAX': None}
    >>> sorted(side_env(None)) == sorted([*MALLOC_ENV, "GLIBC_TUNABLES"])
    True
    """
    if pairs is None:  # GLIBC_TUNABLES too: this shell's malloc policy would reach the server otherwise
        return dict.fromkeys([*MALLOC_ENV, "GLIBC_TUNABLES"])
    out: dict[str, str | None] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not name.replace("_", "").isalnum() or not name[0].isalpha():
            raise argparse.ArgumentTypeError(f"expected NAME=value or NAME= (to remove NAME), got {pair!r}")
        out[name] = value or None
    return out


def _throughput(grpc_url: str, model: str, slices: Any, min_slices: int) -> dict[str, Any]:
    try:
        return ensemble_throughput(grpc_url, slices, batch=CALL[0], concurrency=CALL[1], min_slices=min_slices,
                                   model=model)
    except InferenceServerException as exc:
        raise BenchError(f"{model}: {exc}") from None


def _measure(grpc_url: str, model: str, slices: Any, min_slices: int) -> dict[str, Any]:
    """Slices/s and CPU a slice by process (the CPU includes the run's one connection warm-up request of
    2 slices, the same on both sides: +1 % at 256 slices)."""
    before = snapshot()
    run = _throughput(grpc_url, model, slices, min_slices)
    return {"slices_per_s": run["slices_per_s"], "slices": run["slices"],
            "cpu_ms_per_slice": split(before, snapshot(), run["slices"])}


def run(env_a: dict[str, str | None], env_b: dict[str, str | None], rounds: int, min_slices: int,
        models: tuple[str, ...], repo_a: Path | None = None, repo_b: Path | None = None) -> dict[str, Any]:
    slices = sample_slices(16)
    sides: dict[str, dict[str, list[dict[str, Any]]]] = {s: {m: [] for m in models} for s in ("A", "B")}
    envs = {"A": env_a, "B": env_b}
    repos = {"A": repo_a, "B": repo_b}
    for r in range(rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            with embedded_triton(repos[name], env=envs[name]) as triton:
                for model in models:  # warm-up: every instance has run requests of this shape
                    _throughput(triton.grpc_url, model, slices, 64)
                for model in models:
                    res = _measure(triton.grpc_url, model, slices, min_slices)
                    logger.info("round %d %s %s: %.2f slices/s, CPU %.1f ms a slice", r + 1, name, model,
                                res["slices_per_s"], res["cpu_ms_per_slice"]["total"])
                    sides[name][model].append(res)
    return {"rounds": rounds, "call": {"batch": CALL[0], "concurrency": CALL[1]}, "min_slices": min_slices,
            "env_a": env_a, "env_b": env_b, "repo_a": str(repo_a) if repo_a else None,
            "repo_b": str(repo_b) if repo_b else None, "runs": sides, "summary": summary(sides)}


def summary(sides: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per side and model: best and median slices/s, median CPU ms a slice by process.

    >>> run = {"slices_per_s": 30.0, "cpu_ms_per_slice": {"triton core": 1.0, "total": 50.0}}
    >>> summary({"A": {"m": [run, {**run, "slices_per_s": 32.0}]}})["A"]["m"]["slices_per_s_best"]
    32.0
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for side, models in sides.items():
        for model, runs in models.items():
            keys = sorted({k for r in runs for k in r["cpu_ms_per_slice"]})
            out.setdefault(side, {})[model] = {
                "slices_per_s_best": max(r["slices_per_s"] for r in runs),
                "slices_per_s_median": round(statistics.median(r["slices_per_s"] for r in runs), 3),
                "cpu_ms_per_slice_median": {
                    k: round(statistics.median(r["cpu_ms_per_slice"].get(k, 0.0) for r in runs), 2) for k in keys},
            }
    return out


def markdown(doc: dict[str, Any]) -> str:
    def env(e: dict[str, str | None]) -> str:
        return ", ".join(f"{k}={'(glibc default)' if v is None else v}" for k, v in e.items()) or "the shipped server"

    lines = [f"Paired A/B of the Triton server's environment, {doc['rounds']} rounds, {doc['call']['batch']} slices a "
             f"request, {doc['call']['concurrency']} in flight.", "",
             f"- A: {env(doc['env_a'])}" + (f", models of {doc['repo_a']}" if doc.get("repo_a") else ""),
             f"- B: {env(doc['env_b'])}" + (f", models of {doc['repo_b']}" if doc.get("repo_b") else ""), "",
             "| model | slices/s A best (median) | B best (median) | CPU ms a slice, median: process A / B |",
             "|---|---|---|---|"]
    for model, a in doc["summary"]["A"].items():
        b = doc["summary"]["B"][model]
        ca, cb = a["cpu_ms_per_slice_median"], b["cpu_ms_per_slice_median"]
        cpu = "; ".join(f"{k} {ca.get(k, 0.0):.2f} / {cb.get(k, 0.0):.2f}" for k in sorted(set(ca) | set(cb))
                        if max(ca.get(k, 0.0), cb.get(k, 0.0)) >= 0.05)
        lines.append(f"| {model} | {a['slices_per_s_best']:.2f} ({a['slices_per_s_median']:.2f}) | "
                     f"{b['slices_per_s_best']:.2f} ({b['slices_per_s_median']:.2f}) | {cpu} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab_triton", description=__doc__.splitlines()[0])
    p.add_argument("--a", nargs="*", default=None,
                   help="NAME=value (NAME=: removed) on top of server A's environment; default: glibc's malloc "
                        "defaults (every MALLOC_ENV name and GLIBC_TUNABLES removed)")
    p.add_argument("--b", nargs="*", default=[], help="the same for server B; default: the shipped server")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--slices", type=int, default=256, help="slices a measured run (at least)")
    p.add_argument("--models", nargs="+", default=[ENSEMBLE_MODEL, FUSED_MODEL], choices=[ENSEMBLE_MODEL, FUSED_MODEL])
    p.add_argument("--a-repo", type=Path, default=None, help="serve A from this model repository (default: the "
                   "cpu profile's cached one)")
    p.add_argument("--b-repo", type=Path, default=None, help="the same for B")
    p.add_argument("--out", type=Path, default=None, help="default results/ab-triton-latest.json")
    args = p.parse_args(argv)
    for flag, repo in (("--a-repo", args.a_repo), ("--b-repo", args.b_repo)):
        if repo is not None and not (repo / FUSED_MODEL / "config.pbtxt").is_file():
            p.error(f"{flag} {repo}: no rendered cpu model repository there (ctscreen repo build --profile cpu --out DIR)")
    try:
        env_a, env_b = side_env(args.a), side_env(args.b)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if args.rounds < 1 or args.slices < 16:
        p.error("--rounds must be at least 1 and --slices at least 16")
    if not Path("/proc/self/stat").exists():
        p.error("needs Linux /proc")
    models = tuple(dict.fromkeys(args.models))
    return publish_run(p.prog, argv, lambda: run(env_a, env_b, args.rounds, args.slices, models, args.a_repo,
                                                 args.b_repo), markdown,
                       args.out or results_dir() / "ab-triton-latest.json")


if __name__ == "__main__":
    raise SystemExit(main())
