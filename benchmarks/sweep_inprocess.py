"""The strongest in-process baseline: ONNX Runtime swept over batch, threads and scheduling.

The denominator of "gateway / in-process" must be the best that the same two ONNX files, the same
post-processing (``ctscreen.postprocess.postprocess_batch``) and the same case rule
(``aggregator.case.decide``) reach in one process on this machine, not one setting of our choosing.
This sweep is built on :class:`benchmarks.inprocess.OrtPipeline` and measures every combination of

* **batch**: 1, 2, 4, 8, 16 slices per ORT run;
* **intra-op threads** per session: 1, 2;
* **schedule**, how the valid-area and lesion sessions share the cores:

  - ``sequential``: one pipeline, valid-area then lesion then post-processing, batch after batch;
  - ``workers``: ``cores / threads`` pipelines (each its own sessions) taking batches from one queue
    (only where that is more than one pipeline);
  - ``concurrent``: the valid-area and lesion sessions run at once on batch ``i`` while batch ``i - 1`` is
    post-processed (how Triton's ensemble overlaps its steps);
  - ``parallel-graph``: one pipeline whose sessions use ORT's parallel execution mode (``ORT_PARALLEL``,
    inter-op threads = intra-op threads), independent branches of a graph at once.

Each setting screens the same slices once (a warm-up batch first, as Triton's ``model_warmup``) and the
best slices/s wins; :func:`study_in_process` then screens a whole study (all of its slices, then the case
rule) with the winner: the in-process time a gateway study is compared with.

    python -m benchmarks.sweep_inprocess [--slices 64] [--batches 1,2,4,8,16] [--threads 1,2] [--study 300]
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks.common import BenchError, machine_info, results_dir, write_json
from benchmarks.inprocess import OrtPipeline, cores
from ctscreen.contracts import HU_SLICES, LESION_MODEL, PROB, VALID_AREA_MODEL
from ctscreen.postprocess import postprocess_batch, unpack_outputs

logger = logging.getLogger(__name__)

BATCHES = (1, 2, 4, 8, 16)
THREADS = (1, 2)
SCHEDULES = ("sequential", "workers", "concurrent", "parallel-graph")

Outputs = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes, counts, valid-area boxes (the ensemble's outputs)


@dataclass(frozen=True)
class Setting:
    """One point of the sweep."""

    batch: int
    threads: int
    schedule: str

    def __post_init__(self) -> None:
        if self.batch < 1 or self.threads < 1:
            raise ValueError(f'Arguments "batch" and "threads" must be >= 1, got {self.batch}, {self.threads}.')
        if self.schedule not in SCHEDULES:
            raise ValueError(f'Argument "schedule" must be one of {", ".join(SCHEDULES)}, got {self.schedule!r}.')

    @property
    def label(self) -> str:
        return f"batch {self.batch}, {self.threads} thread(s) per session, {self.schedule}"


def settings(batches: Sequence[int] = BATCHES, threads: Sequence[int] = THREADS,
             schedules: Sequence[str] = SCHEDULES, n_cores: int | None = None) -> list[Setting]:
    """The grid, less what would only repeat another point (``workers`` with one pipeline)."""
    n_cores = n_cores or cores()
    return [Setting(b, t, s) for b in batches for t in threads for s in schedules
            if not (s == "workers" and n_cores // t < 2)]


def _parallel_graph_pipeline(threads: int) -> OrtPipeline:
    """An :class:`OrtPipeline` whose sessions run in ORT's parallel execution mode."""
    import onnxruntime as ort

    from benchmarks.inprocess import onnx_path

    pipe = OrtPipeline(threads=threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = threads
    opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        opts.add_session_config_entry(key, "0")  # off, as in the cpu profile's Triton models
    pipe.sessions = {m: ort.InferenceSession(str(onnx_path(m)), opts, providers=["CPUExecutionProvider"])
                     for m in (VALID_AREA_MODEL, LESION_MODEL)}
    return pipe


class Runner:
    """Screens slices in process with one :class:`Setting`; ``runner(hu)`` returns the ensemble's outputs
    for ``hu`` ``[N, 1, 512, 512]`` INT16 (``N`` need not be a multiple of the batch)."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        s = setting
        if s.schedule == "parallel-graph":
            self.pipes = [_parallel_graph_pipeline(s.threads)]
        else:
            n = max(1, cores() // s.threads) if s.schedule == "workers" else 1
            self.pipes = [OrtPipeline(threads=s.threads) for _ in range(n)]

    def __call__(self, hu: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per slice of ``hu``: its lesion boxes ``[count, 5]`` and its valid-area box ``[4]``."""
        b = self.setting.batch
        out = []
        # no bound method is kept on self: a runner in a reference cycle would hold its ORT sessions (and
        # their arenas, 0.3-1.5 GB each) until a full garbage collection, and the sweep builds 35 of them
        run = self._concurrent if self.setting.schedule == "concurrent" else self._queue
        for outputs in run([hu[i : i + b] for i in range(0, len(hu), b)]):
            out += [(s.boxes, s.valid_area) for s in unpack_outputs(*outputs)]
        return out

    def warm_up(self, hu: np.ndarray) -> None:
        for pipe in self.pipes:
            pipe(hu[: self.setting.batch])

    def _queue(self, batches: list[np.ndarray]) -> list[Outputs]:
        results: list[Any] = [None] * len(batches)
        order = iter(range(len(batches)))
        lock = threading.Lock()

        def loop(pipe: OrtPipeline) -> None:
            while True:
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                results[i] = pipe(batches[i])

        if len(self.pipes) == 1:
            loop(self.pipes[0])
        else:
            with ThreadPoolExecutor(len(self.pipes)) as ex:
                list(ex.map(loop, self.pipes))
        return results

    def _concurrent(self, batches: list[np.ndarray]) -> list[Outputs]:
        sess = self.pipes[0].sessions
        out: list[Any] = []
        with ThreadPoolExecutor(3) as ex:
            pending = None
            for b in batches:
                maps = [ex.submit(sess[m].run, [PROB], {HU_SLICES: b}) for m in (VALID_AREA_MODEL, LESION_MODEL)]
                if pending is not None:
                    out.append(pending.result())
                pending = ex.submit(postprocess_batch, maps[0].result()[0], maps[1].result()[0], b)
            if pending is not None:
                out.append(pending.result())
        return out


def tile(slices: np.ndarray, n: int) -> np.ndarray:
    """``n`` slices cycled from ``slices``."""
    return slices[np.arange(n) % len(slices)]


def measure(setting: Setting, hu: np.ndarray) -> dict[str, Any]:
    """Slices/s of one setting over ``hu`` (screened once, after one warm-up batch)."""
    runner = Runner(setting)
    try:
        runner.warm_up(hu)
        t0 = time.perf_counter()
        runner(hu)
        wall = time.perf_counter() - t0
    finally:
        runner.pipes.clear()  # the sessions go now, not at the next full collection
        gc.collect()
    return {**asdict(setting), "slices": len(hu), "wall_s": round(wall, 3), "slices_per_s": round(len(hu) / wall, 3)}


def sweep(hu: np.ndarray, grid: Sequence[Setting], *, max_seconds: float = 900.0) -> dict[str, Any]:
    """Every setting of ``grid`` over ``hu``; the best by slices/s. Stops (and says so) after ``max_seconds``."""
    runs: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for s in grid:
        if time.monotonic() - t0 > max_seconds:
            runs.append({**asdict(s), "error": f"not run: the sweep's {max_seconds:.0f} s were spent"})
            continue
        try:
            runs.append(measure(s, hu))
        except Exception as exc:  # one setting ORT refuses must not lose the others
            logger.warning("%s failed: %s", s.label, exc)
            runs.append({**asdict(s), "error": f"{type(exc).__name__}: {exc}"})
            continue
        logger.info("%s: %.2f slices/s", s.label, runs[-1]["slices_per_s"])
    done = [r for r in runs if "slices_per_s" in r]
    if not done:
        raise BenchError("no in-process setting ran: " + "; ".join(r["error"] for r in runs[:3]))
    return {"best": max(done, key=lambda r: r["slices_per_s"]), "runs": runs, "cores": cores()}


def best_settings(result: dict[str, Any], n: int = 3) -> list[Setting]:
    """The ``n`` fastest settings of a :func:`sweep` result, fastest first."""
    done = sorted((r for r in result["runs"] if "slices_per_s" in r), key=lambda r: -r["slices_per_s"])
    return [Setting(r["batch"], r["threads"], r["schedule"]) for r in done[:n]]


def study_in_process(setting: Setting, hu: np.ndarray, meta: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """One whole study in process: every slice through the models and post-processing, then the case rule.

    ``hu``: the decoded study ``[Z, 512, 512]`` INT16; ``meta``: (SOP Instance UID, position) per slice
    (as :func:`benchmarks.ratios.decode_series` returns them). Decoding is not timed: the gateway's
    decoding is part of what serving adds."""
    from aggregator.case import CaseRule, SliceInput, decide

    runner = Runner(setting)
    x = np.ascontiguousarray(hu[:, None])
    runner.warm_up(x)
    t0 = time.perf_counter()
    per_slice = runner(x)
    t_models = time.perf_counter() - t0
    inputs = [SliceInput(uid, pos, boxes, valid) for (uid, pos), (boxes, valid) in zip(meta, per_slice, strict=True)]
    verdict = decide(inputs, CaseRule()).verdict
    wall = time.perf_counter() - t0
    return {**asdict(setting), "slices": len(hu), "wall_s": round(wall, 3), "models_and_postprocess_s": round(t_models, 3),
            "case_rule_s": round(wall - t_models, 3), "slices_per_s": round(len(hu) / wall, 3), "verdict": verdict}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctscreen bench sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=64, help="slices per setting (default 64)")
    p.add_argument("--batches", type=_ints, default=list(BATCHES))
    p.add_argument("--threads", type=_ints, default=list(THREADS))
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--study", type=int, default=300, help="slices of the whole study screened with the best (0: none)")
    p.add_argument("--max-seconds", type=float, default=900.0, help="time budget of the sweep")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    if args.slices < 1 or any(s not in SCHEDULES for s in schedules):
        p.error(f"--slices must be >= 1 and --schedules a comma list of {', '.join(SCHEDULES)}")
    from benchmarks.perf import sample_slices

    try:
        res = sweep(tile(sample_slices(16), args.slices), settings(args.batches, args.threads, schedules),
                    max_seconds=args.max_seconds)
    except BenchError as exc:
        print(f"sweep_inprocess: {exc}", file=sys.stderr)
        return 1
    for r in res["runs"]:
        print(f"  batch {r['batch']:>2} threads {r['threads']} {r['schedule']:<15} "
              + (f"{r['slices_per_s']:7.2f} slices/s" if "slices_per_s" in r else r["error"]))
    best = res["best"]
    print(f"best: {best['slices_per_s']} slices/s (batch {best['batch']}, {best['threads']} thread(s), {best['schedule']})")
    doc = {"machine": machine_info(), "sweep": res}
    if args.study:
        from benchmarks.ratios import decode_series
        from benchmarks.studies import build_pool

        study = next(iter(build_pool([args.study], ("covid",)).values()))
        hu, meta = decode_series(study.files)
        doc["study"] = study_in_process(best_settings(res, 1)[0], hu, meta)
        print(f"one {args.study}-slice study in process: {doc['study']['wall_s']} s ({doc['study']['verdict']})")
    print(f"written: {write_json(results_dir() / 'inprocess-latest.json', doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
