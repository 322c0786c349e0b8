"""The gateway ratio in the deployment's shape: Triton on one core, the gateway and its client on the other.

**Not the goal.** Issue #17's goal is the shared-core ratio of ``benchmarks.ratios`` (``ctscreen bench
ratios``): the gateway end to end over the best in-process ONNX Runtime setting, everything on the same
2 cores, where the gateway's own CPU (upload, DICOM decoding, the case rule) and the load client's take
cores that inference needs. That figure stays the goal and stays reported as met or missed.

In a deployment (the Helm chart) gateway pods run on CPU nodes and Triton on its own nodes: the gateway
never takes inference's CPU. This measures that shape on one machine with two cores of its affinity:

* Triton (``tritonserver`` and its python-backend stubs) pinned to the first, which also renders the
  cpu profile's repository for one core (``ctscreen.repo.default_settings`` reads the affinity);
* the gateway (its process, hence its decode workers: one, for one core) and the load client pinned to
  the second;
* the denominator: in-process ONNX Runtime pinned to the first core alone, the best of a small sweep
  that makes sense on one core (batches 1, 2, 4; one intra-op thread; ``sequential`` and ``concurrent``).

The ratio is measured as ``benchmarks.ratios`` measures the gateway's (:func:`benchmarks.ratios.gateway_ratio`):
gateway loads (4 studies of 60 slices, 2 in flight) alternate with runs of the best in-process setting,
and the best of each side's completed rounds are compared (:func:`benchmarks.ratios.best_over_best`).

::

    python -m benchmarks.split_cores            # = ctscreen bench split; -> results/split-latest.json

Pinning is Linux's CPU affinity (:func:`pinned`): every thread of this process is pinned while a server is
started (a child inherits the affinity of the thread that forked it, a thread that of the thread that
created it), while the load runs and while ONNX Runtime runs in process. The run then reads
``Cpus_allowed_list`` of every thread of tritonserver, of each stub and of the gateway from ``/proc`` and
refuses to publish when one is not where it belongs; the result records what it read.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import sweep_inprocess
from benchmarks.common import BenchError, publish_run, results_dir
from benchmarks.cpu_split import labelled_tree, measured_at, processes
from benchmarks.inprocess import cores
from benchmarks.ratios import gateway_load, gateway_ratio
from ctscreen.cliargs import positive, positive_list

logger = logging.getLogger(__name__)

NAME = "gateway end to end on its own core / in-process ORT on Triton's one core (deployment shape; not the goal)"
BATCHES = (1, 2, 4)
SCHEDULES = ("sequential", "concurrent")
"""The in-process settings on one core: one intra-op thread (a second would only share the core), no
``workers`` (one pipeline a core), no ``parallel-graph`` (one inter-op thread runs the graph in turn)."""


# --- affinity -------------------------------------------------------------------------------------


def parse_cpus(text: str) -> set[int]:
    """The CPUs of a ``Cpus_allowed_list`` (``/proc/<pid>/status``).

    >>> sorted(parse_cpus("0-2,5")), parse_cpus("1")
    ([0, 1, 2, 5], {1})
    """
    cpus: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def cpu_list(cpus: Collection[int]) -> str:
    """CPUs written as ``/proc`` writes a ``Cpus_allowed_list``.

    >>> cpu_list({0}), cpu_list({0, 1}), cpu_list({5, 0, 1, 2, 7, 8})
    ('0', '0-1', '0-2,5,7-8')
    """
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in runs)


def thread_cpus(pid: int | None = None) -> dict[int, set[int]]:
    """``{thread id: CPUs it may run on}`` of every thread of ``pid`` (default this process), read from
    ``/proc/<pid>/task/<tid>/status``; a thread that ended meanwhile is left out."""
    pid = os.getpid() if pid is None else pid
    out = {}
    for tid in _tasks(pid):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        line = next((x for x in status.splitlines() if x.startswith("Cpus_allowed_list:")), None)
        if line is not None:
            out[tid] = parse_cpus(line.split(":", 1)[1])
    return out


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


@contextlib.contextmanager
def pinned(cpus: Collection[int]) -> Iterator[set[int]]:
    """Every thread of this process on ``cpus`` while inside, and what each had before again on exit.

    ``os.sched_setaffinity(0, ...)`` pins the calling thread only; a thread or child process started
    inside inherits the pinning of the thread that started it, so servers started and threads created
    inside run on ``cpus`` (the children keep it after exit). On exit each thread gets back its own CPUs;
    a thread created inside gets those the calling thread had. ``OSError`` (EINVAL) for CPUs outside
    this process's cpuset, with every thread restored.
    """
    want = set(cpus)
    own = os.sched_getaffinity(0)
    before: dict[int, set[int]] = {}
    try:
        # again until no thread is new: one not yet pinned may start another meanwhile
        while new := [t for t in _tasks(os.getpid()) if t not in before]:
            for tid in new:
                with contextlib.suppress(ProcessLookupError):
                    before[tid] = os.sched_getaffinity(tid)
                    os.sched_setaffinity(tid, want)
        yield want
    finally:
        for tid in _tasks(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, before.get(tid, own))


def placement(tree: dict[int, str]) -> dict[str, list[str]]:
    """``{label: the distinct CPU sets of its threads}`` of the processes of ``tree`` (``{pid: label}``, as
    :func:`benchmarks.cpu_split.labelled_tree` labels them: ``triton core``, ``stub <model>``, ``gateway``).

    A CPU set reads as in ``/proc`` (``0``, ``0-1``); a label whose threads all share one set has one entry."""
    found: dict[str, set[str]] = {}
    for pid, name in tree.items():
        found.setdefault(name, set()).update(cpu_list(c) for c in thread_cpus(pid).values())
    return {name: sorted(sets) for name, sets in sorted(found.items())}


@contextlib.contextmanager
def watching(every: float = 0.25) -> Iterator[set[str]]:
    """The CPU sets (:func:`cpu_list`) of this process's threads, read every ``every`` s while inside and
    once more at the end: a thread that set its own affinity (a library's thread pool) shows here."""
    seen: set[str] = set()
    stop = threading.Event()

    def look() -> None:
        while True:
            seen.update(cpu_list(c) for c in thread_cpus().values())
            if stop.wait(every):
                return

    watcher = threading.Thread(target=look, name="split-cores-watch", daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        stop.set()
        watcher.join()
        seen.update(cpu_list(c) for c in thread_cpus().values())


def misplaced(seen: dict[str, list[str]], client: Collection[str], local: Collection[str], triton_cpu: int,
              gateway_cpu: int) -> list[str]:
    """What is not where it belongs ([] when all is well): in ``seen`` (a :func:`placement`) Triton's core and
    stubs on ``triton_cpu`` and the gateway on ``gateway_cpu``, each of the three seen; this process's threads
    (:func:`watching`) on ``gateway_cpu`` during the loads (``client``), on ``triton_cpu`` in process (``local``).

    >>> misplaced({"triton core": ["0"], "stub ct_screen_fused": ["0"], "gateway": ["1"]}, {"1"}, {"0"}, 0, 1)
    []
    >>> misplaced({"triton core": ["0", "0-1"], "gateway": ["1"]}, {"1"}, {"0-1"}, 0, 1)
    ['triton core: threads on 0, 0-1, not 0 alone', 'no python-backend stub seen', 'in process: threads on 0-1, not 0 alone']
    """
    want = {name: str(triton_cpu if name == "triton core" or name.startswith("stub") else gateway_cpu)
            for name in seen if name in ("triton core", "gateway") or name.startswith("stub")}
    out = [f"{name}: threads on {', '.join(seen[name])}, not {cpu} alone" for name, cpu in want.items()
           if seen[name] != [cpu]]
    out += [f"no {what} seen" for what, ok in (("tritonserver", "triton core" in seen), ("gateway", "gateway" in seen),
                                              ("python-backend stub", any(n.startswith("stub") for n in seen)))
            if not ok]
    out += [f"{what}: threads on {', '.join(sorted(cpus)) or 'none seen'}, not {cpu} alone"
            for what, cpus, cpu in (("client", client, gateway_cpu), ("in process", local, triton_cpu))
            if set(cpus) != {str(cpu)}]
    return out


# --- the run --------------------------------------------------------------------------------------


def two_cpus() -> tuple[int, int]:
    """Triton's CPU and the gateway's: the first two of this thread's affinity; BenchError with fewer."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise BenchError(f"split cores needs two CPUs in this process's affinity (one for Triton, one for the "
                         f"gateway and the client); it may use {len(cpus)} ({cpu_list(set(cpus))})")
    return cpus[0], cpus[1]


def run(*, study_slices: int = 60, studies: int = 4, concurrency: int = 2, rounds: int = 4, ort_min_slices: int = 64,
        ort_batches: Sequence[int] = BATCHES, ort_schedules: Sequence[str] = SCHEDULES) -> dict[str, Any]:
    """Start Triton on the first CPU and the gateway on the second, sweep in process on the first, then
    alternate ``rounds`` gateway loads with in-process runs of the sweep's best (:func:`benchmarks.ratios.gateway_ratio`)."""
    from benchmarks.load import run_load
    from benchmarks.perf import sample_slices
    from benchmarks.stack import embedded_triton, gateway
    from benchmarks.studies import build_pool
    from ctscreen.repo import default_settings

    triton_cpu, gateway_cpu = two_cpus()
    hu = sweep_inprocess.tile(sample_slices(16), ort_min_slices)
    pool = build_pool([study_slices] * studies)
    grid = sweep_inprocess.settings(ort_batches, (1,), ort_schedules, n_cores=1)
    client: set[str] = set()
    local: set[str] = set()
    with contextlib.ExitStack() as stack:
        with pinned({triton_cpu}):
            logger.info("starting the embedded Triton on CPU %d ...", triton_cpu)
            triton = stack.enter_context(embedded_triton(None))
            served = dataclasses.asdict(default_settings("cpu"))  # what the repository was rendered with, here
        with pinned({gateway_cpu}):
            logger.info("starting the gateway on CPU %d ...", gateway_cpu)
            url = stack.enter_context(gateway(triton))
            gateway_cores = cores()
        with pinned({triton_cpu}):
            logger.info("in-process ORT sweep on CPU %d ...", triton_cpu)
            swept = sweep_inprocess.sweep(hu, grid)
        best = sweep_inprocess.best_settings(swept, 1)[0]
        cfg = gateway_load(url, triton, study_slices=study_slices, studies=studies, concurrency=concurrency)

        def load() -> dict[str, Any]:
            with pinned({gateway_cpu}), watching() as threads:
                done = run_load(cfg, pool)
            client.update(threads)
            return done

        def in_process() -> dict[str, Any]:
            with pinned({triton_cpu}), watching() as threads:
                done = sweep_inprocess.measure(best, hu)
            local.update(threads)
            return done

        measured = gateway_ratio(load, in_process, rounds)
        below = labelled_tree(processes())  # the servers this run started
        below.pop(os.getpid(), None)
        seen = placement(below)
    wrong = misplaced(seen, client, local, triton_cpu, gateway_cpu)
    if wrong:
        raise BenchError("the pinning did not hold, nothing published: " + "; ".join(wrong))
    return {
        "what": NAME,
        "not_the_goal": "issue #17's goal is the shared-core gateway ratio (results/ratios-latest.json)",
        "cpus": {"triton": triton_cpu, "gateway_and_client": gateway_cpu, "in_process": triton_cpu},
        # CPU sets of every thread read back from /proc: the servers' after the rounds, this process's
        # during each load (the client) and each in-process run
        "pinning": {"processes": seen, "client": sorted(client), "in_process": sorted(local)},
        "served_with": {"triton_repository": served, "gateway_cores": gateway_cores},
        "load": {"study_slices": study_slices, "studies": studies, "concurrency": concurrency, "rounds": rounds},
        "ort": {"best": swept["best"], "sweep": swept["runs"], "cores": swept["cores"]},
        **measured.section,
        "figures": {"split_over_in_process": measured.ratio, "gateway_slices_per_s": measured.gateway_slices_per_s,
                    "in_process_slices_per_s": measured.in_process_slices_per_s, "in_process_setting": best.label},
    }


# --- what it says ---------------------------------------------------------------------------------


def summary(doc: dict[str, Any]) -> str:
    """The figure in words: what ran where, both sides, the ratio, the pinning read back, the stamp."""
    cpus, fig, load = doc["cpus"], doc["figures"], doc["load"]
    rounds = doc.get("gateway_rounds") or []
    done = sum(1 for r in rounds if r["completed"] == r["sent"])
    ratio = fig["split_over_in_process"]
    pins = "; ".join(f"{name} on {', '.join(sets)}" for name, sets in doc["pinning"]["processes"].items())
    return (f"Deployment shape, not the goal: Triton and its stubs on CPU {cpus['triton']}, the gateway and the load "
            f"client on CPU {cpus['gateway_and_client']}, in process on CPU {cpus['in_process']} alone. Gateway end "
            f"to end {fig['gateway_slices_per_s']} slices/s (best of {done} completed of {len(rounds)} loads of "
            f"{load['studies']} studies of {load['study_slices']} slices, {load['concurrency']} in flight) over in "
            f"process {fig['in_process_slices_per_s']} slices/s ({fig['in_process_setting']}, best of a one-core "
            f"sweep, then of its runs alternating with the loads): "
            + (f"**{ratio:.3f}**" if ratio is not None else "not measured (no load completed)")
            + f". Pinning read back from /proc: {pins}; client on {', '.join(doc['pinning']['client'])}."
            + measured_at(doc.get("machine") or {}))


def report_lines(doc: dict[str, Any]) -> list[str]:
    """The report's row (beside the goals table, not in it) and :func:`summary`."""
    ratio = doc["figures"]["split_over_in_process"]
    return ["| beside the goals, not a goal | target | measured | |", "|---|---|---|---|",
            f"| {doc.get('what') or NAME} | none (the goal is the shared-core row above) | "
            f"{'n/a' if ratio is None else f'{ratio:.3f}'} | `python -m benchmarks.split_cores` |", "", summary(doc)]


def markdown(doc: dict[str, Any]) -> str:
    lines = [*report_lines(doc), "", "| round | gateway slices/s | studies done | in process slices/s |",
             "|---|---|---|---|"]
    lines += [f"| {i} | {r['slices_per_s']} | {r['completed']}/{r['sent']} | {r['in_process_slices_per_s']} |"
              for i, r in enumerate(doc.get("gateway_rounds") or [], 1)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctscreen bench split", description=__doc__.splitlines()[0])
    p.add_argument("--study-slices", type=positive(int), default=60, help="slices per study of the gateway's load")
    p.add_argument("--studies", type=positive(int), default=4, help="studies per gateway load")
    p.add_argument("--concurrency", type=positive(int), default=2, help="studies in flight on the gateway")
    p.add_argument("--rounds", type=positive(int), default=4,
                   help="gateway loads, each followed by a run of the best in-process setting")
    p.add_argument("--ort-min-slices", type=positive(int), default=64, help="slices per in-process run")
    p.add_argument("--ort-batches", type=positive_list(int), default=list(BATCHES),
                   help="batch sizes of the one-core in-process sweep")
    p.add_argument("--ort-schedules", default=",".join(SCHEDULES),
                   help=f"schedules of the one-core sweep, of {', '.join(sweep_inprocess.SCHEDULES)}")
    p.add_argument("--out", type=Path, default=None, help="default results/split-latest.json")
    args = p.parse_args(argv)
    schedules = [s.strip() for s in args.ort_schedules.split(",") if s.strip()]
    if not schedules or any(s not in sweep_inprocess.SCHEDULES for s in schedules):
        p.error(f"--ort-schedules must be a comma list of {', '.join(sweep_inprocess.SCHEDULES)}, got {args.ort_schedules!r}")
    if not Path("/proc/self/task").is_dir() or not hasattr(os, "sched_setaffinity"):
        p.error("needs Linux (/proc and CPU affinity)")
    return publish_run(p.prog, argv, lambda: run(
        study_slices=args.study_slices, studies=args.studies, concurrency=args.concurrency, rounds=args.rounds,
        ort_min_slices=args.ort_min_slices, ort_batches=args.ort_batches, ort_schedules=schedules),
        markdown, args.out or results_dir() / "split-latest.json")


if __name__ == "__main__":
    raise SystemExit(main())
