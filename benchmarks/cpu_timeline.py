"""Where the cores go over time during the gateway ratio's load, and what a study costs the gateway beyond its slices.

The gateway ratio of issue #17 (``benchmarks ratios``: studies of 60 slices, 4 a load, 2 in flight, against
the best in-process setting) reads at its goal's edge. Two measures say why, on one embedded Triton and one
gateway:

* **timeline**: every process's CPU (:func:`benchmarks.cpu_split.snapshot`: the client, the gateway, Triton's
  core, the python-backend stubs) sampled every ``--step`` seconds during one such load, in cores busy. Cores
  left idle would be a gap in the pipeline (a wait the served path adds); all of them busy means only the
  served path's CPU can move the ratio. The samples also show when the gateway takes the cores (uploads
  arrive two at a time: each pair is received, parsed and decoded together);
* **per study and per slice**: the gateway's CPU for studies of two sizes (``--fit-slices``, 8 and 60), one at a
  time, rounds alternating, fitted as ``a x slices + b`` a study: ``b`` is what a study costs the gateway
  whatever its size (its HTTP request, job state, storage, its noise and lung-field measures, its events).

::

    python -m benchmarks.cpu_timeline         # -> results/timeline-latest.json (+ a summary)

Linux only (``/proc``). The sampler runs in the client's process: its cost counts as the client's.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError, publish_run, results_dir
from benchmarks.cpu_split import snapshot
from benchmarks.inprocess import cores
from benchmarks.load import LoadConfig, run_load
from benchmarks.stack import embedded_triton, gateway
from benchmarks.studies import build_pool
from ctscreen.cliargs import positive, positive_list

BUSY = 0.9
"""A sample whose processes kept at least this share of the cores busy counts as "cores all busy"."""


def cores_busy(samples: list[tuple[float, dict[str, float]]]) -> list[dict[str, float]]:
    """Cores busy in each interval between ``(monotonic s, snapshot)`` samples, by process group (``stubs``
    sums the python-backend stubs), with the interval's end as ``t_s`` from the first sample.

    >>> cores_busy([(0.0, {"gateway": 1.0, "stub a": 2.0}), (0.5, {"gateway": 1.25, "stub a": 2.4, "stub b": 0.1})])
    [{'t_s': 0.5, 'client': 0.0, 'gateway': 0.5, 'triton core': 0.0, 'stubs': 1.0, 'total': 1.5}]
    """
    def grouped(snap: dict[str, float]) -> dict[str, float]:
        out = {k: snap.get(k, 0.0) for k in ("client", "gateway", "triton core")}
        out["stubs"] = sum(v for k, v in snap.items() if k.startswith("stub"))
        return out

    rows = []
    for (t0, a), (t1, b) in zip(samples, samples[1:], strict=False):
        ga, gb = grouped(a), grouped(b)
        row = {"t_s": round(t1 - samples[0][0], 2)}
        row.update({k: round((gb[k] - ga[k]) / (t1 - t0), 2) for k in ga})
        row["total"] = round(sum(gb[k] - ga[k] for k in ga) / (t1 - t0), 2)
        rows.append(row)
    return rows


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """``(a, b)`` of the least-squares line ``cpu = a x slices + b`` through ``(slices, cpu)`` points.

    >>> fit([(8, 0.146), (60, 0.38), (8, 0.146), (60, 0.38)])
    (0.0045, 0.11)
    """
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(set(xs)) < 2:
        raise ValueError('Argument "points" needs two study sizes.')
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    a = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return round(a, 6), round(my - a * mx, 4)


def _load(url: str, pool: dict, slices: int, studies: int, concurrency: int) -> dict[str, Any]:
    cfg = LoadConfig(url=url, mode="closed", concurrency=concurrency, duration=600, max_studies=studies,
                     sizes=f"fixed:{slices}", study_timeout=600)
    run = run_load(cfg, pool)
    if run.get("completed") != studies:
        raise BenchError(f"{studies - (run.get('completed') or 0)} of {studies} studies did not complete: "
                         f"{run.get('errors')}")
    return run


def measure(slices: int, studies: int, concurrency: int, step: float, fit_slices: tuple[int, int],
            fit_studies: int, rounds: int) -> dict[str, Any]:
    pool = build_pool([slices] * studies)
    fit_pools = {n: build_pool([n] * fit_studies) for n in fit_slices}  # covid and normal studies, alternating
    with embedded_triton(None) as triton, gateway(triton) as url:
        _load(url, pool, slices, studies, concurrency)  # warm: sessions, caches, the first study's imports
        samples: list[tuple[float, dict[str, float]]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic(), snapshot()))
                stop.wait(step)

        sampler = threading.Thread(target=sample, name="cpu-timeline", daemon=True)
        sampler.start()
        try:
            run = _load(url, pool, slices, studies, concurrency)
        finally:
            stop.set()
            sampler.join()
        samples.append((time.monotonic(), snapshot()))
        points: list[tuple[int, float]] = []
        for r in range(rounds):
            for n in fit_slices if r % 2 == 0 else fit_slices[::-1]:
                before = snapshot().get("gateway", 0.0)
                # one load of fit_studies studies, one at a time (a study's own cost, not two studies' contention;
                # the load's own /metrics scrapes and connection are shared by its studies)
                _load(url, fit_pools[n], n, fit_studies, 1)
                points.append((n, (snapshot().get("gateway", 0.0) - before) / fit_studies))
    rows = cores_busy(samples)
    a, b = fit(points)
    n_cores = cores()
    busy = [r for r in rows if r["total"] >= BUSY * n_cores]
    return {
        "load": {"study_slices": slices, "studies": studies, "concurrency": concurrency, "step_s": step,
                 "wall_s": run.get("wall_s"), "slices_per_s": run.get("slices_per_s"), "cores": n_cores,
                 "share_of_samples_cores_all_busy": round(len(busy) / max(1, len(rows)), 3),
                 "mean_cores_busy": {k: round(statistics.fmean(r[k] for r in rows), 2)
                                     for k in ("client", "gateway", "triton core", "stubs", "total")} if rows else {},
                 "timeline": rows},
        "gateway_cpu": {"fit_slices": list(fit_slices), "studies_a_point": fit_studies, "rounds": rounds,
                        "points": [{"slices": n, "cpu_s_a_study": round(c, 4)} for n, c in points],
                        "ms_a_slice": round(1000 * a, 2), "ms_a_study": round(1000 * b, 1),
                        f"ms_a_slice_in_{slices}_slice_studies": round(1000 * a + 1000 * b / slices, 2)},
    }


def summary(doc: dict[str, Any]) -> str:
    """The load's cores busy and the gateway's fitted CPU, in two sentences (what the report shows)."""
    load, g = doc["load"], doc["gateway_cpu"]
    mean = load["mean_cores_busy"]
    per = g[f"ms_a_slice_in_{load['study_slices']}_slice_studies"]
    return (f"One load of {load['studies']} studies of {load['study_slices']} slices, {load['concurrency']} in "
            f"flight: {load['slices_per_s']} slices/s over {load['wall_s']} s; cores busy on average: "
            + ", ".join(f"{k} {v}" for k, v in mean.items())
            + f" of {load['cores']}; {100 * load['share_of_samples_cores_all_busy']:.0f} % of the "
            f"{load['step_s']} s samples had at least {BUSY:.0%} of the cores busy. The gateway's CPU, fitted over "
            f"studies of {' and '.join(map(str, g['fit_slices']))} slices ({g['studies_a_point']} studies a point, "
            f"{g['rounds']} rounds): {g['ms_a_slice']} ms a slice + {g['ms_a_study']} ms a study, so {per} ms a "
            f"slice in studies of {load['study_slices']}.")


def markdown(doc: dict[str, Any]) -> str:
    """:func:`summary` and the timeline as a table."""
    lines = [summary(doc), "", "| t s | gateway | stubs | triton core | client | total |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['t_s']} | {r['gateway']} | {r['stubs']} | {r['triton core']} | {r['client']} | {r['total']} |"
              for r in doc["load"]["timeline"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_timeline", description=__doc__.splitlines()[0])
    p.add_argument("--study-slices", type=positive(int), default=60)
    p.add_argument("--studies", type=positive(int), default=4)
    p.add_argument("--concurrency", type=positive(int), default=2)
    p.add_argument("--step", type=positive(float), default=0.1, help="seconds between CPU samples")
    p.add_argument("--fit-slices", type=positive_list(int, "study sizes"), default=[8, 60],
                   help="two study sizes for the per-study / per-slice fit")
    p.add_argument("--fit-studies", type=positive(int), default=8, help="studies of each size a point")
    p.add_argument("--rounds", type=positive(int), default=3, help="alternating rounds of the two sizes")
    p.add_argument("--out", type=Path, default=None, help="default results/timeline-latest.json")
    args = p.parse_args(argv)
    sizes = args.fit_slices
    if len(sizes) != 2 or sizes[0] == sizes[1]:
        p.error(f"--fit-slices must be two different sizes, as 8,60; got {','.join(map(str, sizes))}")
    if not Path("/proc/self/stat").exists():
        p.error("needs Linux /proc")
    return publish_run(p.prog, argv, lambda: measure(args.study_slices, args.studies, args.concurrency, args.step,
                                                     (sizes[0], sizes[1]), args.fit_studies, args.rounds),
                       markdown, args.out or results_dir() / "timeline-latest.json")


if __name__ == "__main__":
    raise SystemExit(main())
