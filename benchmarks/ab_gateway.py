"""Paired A/B of two gateway configurations on one Triton: the same study through each, alternating.

Two gateways run side by side on one embedded Triton, A with ``--a`` and B with ``--b`` environment
settings (``CTSCREEN_*=value``); each round screens the same study once through each, in alternating
order (A B, B A, ...), so that drift in the machine's load hits both alike. For each study it records
the latency (first byte of the upload to the client learning the verdict), the CPU of every process
(``/proc``, as :mod:`benchmarks.cpu_split`) and the **idle gap**: latency minus the CPU bound (total
CPU seconds over the cores), the time the cores were not all busy with this study::

    python -m benchmarks.ab_gateway --a CTSCREEN_SCREEN_AHEAD=false        # -> results/ab-latest.json

``--a-tree``/``--b-tree`` run a side's gateway from another checkout, so two commits compare the same way
(uvicorn's own options go as ``UVICORN_*=value``, glibc's malloc tunables as ``MALLOC_*=value``)::

    git worktree add /tmp/base HEAD~1
    python -m benchmarks.ab_gateway --a-tree /tmp/base                      # A: HEAD~1, B: this tree

Linux only (``/proc``). Prints a table and the median of each side and of the paired differences.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError, publish_run, results_dir
from benchmarks.cpu_split import snapshot, split
from benchmarks.inprocess import cores
from benchmarks.load import LoadConfig, run_load
from benchmarks.stack import GATEWAY_PIDS, check_tree, embedded_triton, gateway
from benchmarks.studies import build_pool

logger = logging.getLogger(__name__)


def _env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith(("CTSCREEN_", "UVICORN_", "MALLOC_")):
            raise argparse.ArgumentTypeError(f"expected CTSCREEN_NAME=value, UVICORN_NAME=value or MALLOC_NAME=value, got {pair!r}")
        out[name] = value
    return out


def _own_cpu_s(url: str) -> float:
    """CPU seconds so far of the gateway at ``url`` and its children (the other side's gateway, idle meanwhile,
    counts as "gateway" in :func:`~benchmarks.cpu_split.snapshot` too)."""
    return sum(snapshot(GATEWAY_PIDS[url]).values())


def _study(url: str, pool: dict, slices: int) -> dict[str, Any]:
    cfg = LoadConfig(url=url, mode="closed", concurrency=1, duration=600, max_studies=1,
                     sizes=f"fixed:{slices}", kinds=("covid",), study_timeout=600)
    before, own = snapshot(), _own_cpu_s(url)
    run = run_load(cfg, pool)
    own = (_own_cpu_s(url) - own) * 1000 / slices
    cpu = split(before, snapshot(), slices)
    idle_other = cpu.get("gateway", 0.0) - own  # the other gateway's polls: no part of this study
    cpu = {**cpu, "gateway": round(own, 2), "total": round(cpu["total"] - idle_other, 2)}
    if not run.get("completed"):
        raise BenchError(f"a {slices}-slice study did not complete: {run.get('errors')}")
    latency = run["latency_s"]["max"]
    bound = cpu["total"] * slices / 1000 / cores()
    return {"latency_s": latency, "cpu_ms_per_slice": cpu, "cpu_bound_s": round(bound, 3),
            "idle_gap_s": round(latency - bound, 3), "verdict": run["studies"][0].get("verdict")}


def run(slices: int, rounds: int, env_a: dict[str, str], env_b: dict[str, str],
        tree_a: Path | None = None, tree_b: Path | None = None) -> dict[str, Any]:
    pool, warm = build_pool([slices], ("covid",)), build_pool([24], ("covid",))
    sides: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    with embedded_triton(None) as triton, gateway(triton, env=env_a, tree=tree_a) as url_a, \
            gateway(triton, env=env_b, tree=tree_b) as url_b:
        urls = {"A": url_a, "B": url_b}
        for name in urls:
            _study(urls[name], warm, 24)
        for r in range(rounds):
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                res = _study(urls[name], pool, slices)
                logger.info("round %d %s: %.2f s (idle gap %.2f s)", r + 1, name, res["latency_s"], res["idle_gap_s"])
                sides[name].append(res)

    def med(name: str, key: str) -> float:
        return round(statistics.median(s[key] for s in sides[name]), 3)

    diffs = [a["latency_s"] - b["latency_s"] for a, b in zip(sides["A"], sides["B"], strict=True)]
    return {"slices": slices, "rounds": rounds, "env_a": env_a, "env_b": env_b,
            "tree_a": str(tree_a) if tree_a else None, "tree_b": str(tree_b) if tree_b else None, "runs": sides,
            "median": {name: {"latency_s": med(name, "latency_s"), "idle_gap_s": med(name, "idle_gap_s"),
                              "cpu_bound_s": med(name, "cpu_bound_s")} for name in sides},
            "median_a_minus_b_s": round(statistics.median(diffs), 3)}


def markdown(doc: dict[str, Any]) -> str:
    def side(name: str) -> str:
        tree = doc.get(f"tree_{name}")
        return f"{doc[f'env_{name}'] or 'defaults'}" + (f" (code of {tree})" if tree else "")

    lines = [f"Paired A/B, {doc['slices']}-slice study, {doc['rounds']} rounds. A: {side('a')}; B: {side('b')}.", "",
             "| round | A latency s (idle gap) | B latency s (idle gap) | gateway CPU ms a slice, A / B |",
             "|---|---|---|---|"]

    def gw(run: dict[str, Any]) -> float:
        return float(run.get("cpu_ms_per_slice", {}).get("gateway", float("nan")))

    for i, (a, b) in enumerate(zip(doc["runs"]["A"], doc["runs"]["B"], strict=True)):
        lines.append(f"| {i + 1} | {a['latency_s']:.2f} ({a['idle_gap_s']:.2f}) | {b['latency_s']:.2f} "
                     f"({b['idle_gap_s']:.2f}) | {gw(a):.2f} / {gw(b):.2f} |")
    m = doc["median"]
    cpu = {name: statistics.median(gw(r) for r in doc["runs"][name]) for name in ("A", "B")}
    lines.append(f"| median | {m['A']['latency_s']:.2f} ({m['A']['idle_gap_s']:.2f}) | "
                 f"{m['B']['latency_s']:.2f} ({m['B']['idle_gap_s']:.2f}) | {cpu['A']:.2f} / {cpu['B']:.2f} |")
    lines.append(f"\nMedian of the paired differences (A - B): {doc['median_a_minus_b_s']:+.2f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab_gateway", description=__doc__.splitlines()[0])
    p.add_argument("--a", nargs="*", default=[], type=str,
                   help="CTSCREEN_NAME=value settings of gateway A (or UVICORN_NAME=value: uvicorn's own options)")
    p.add_argument("--b", nargs="*", default=[], type=str, help="the same for gateway B")
    p.add_argument("--a-tree", type=Path, default=None,
                   help="run gateway A from this checkout (e.g. `git worktree add /tmp/base HEAD~1`)")
    p.add_argument("--b-tree", type=Path, default=None, help="the same for gateway B")
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="default results/ab-latest.json")
    args = p.parse_args(argv)
    try:
        env_a, env_b = _env(args.a), _env(args.b)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if args.slices < 8 or args.rounds < 1:
        p.error("--slices must be at least 8 and --rounds at least 1")
    for flag, tree in (("--a-tree", args.a_tree), ("--b-tree", args.b_tree)):
        try:
            if tree is not None:
                check_tree(tree)
        except BenchError as exc:
            p.error(f"{flag} {exc}")
    if not Path("/proc/self/stat").exists():
        p.error("needs Linux /proc")
    return publish_run(p.prog, argv, lambda: run(args.slices, args.rounds, env_a, env_b, args.a_tree, args.b_tree),
                       markdown, args.out or results_dir() / "ab-latest.json")


if __name__ == "__main__":
    raise SystemExit(main())
