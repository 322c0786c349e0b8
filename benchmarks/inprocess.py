"""The in-process reference under the benchmarks' thread budget: the denominator of the overhead ratios.

The pipeline is :class:`ctscreen.reference.ReferencePipeline` (ONNX Runtime on the shipped ONNX files
plus ``postprocess_batch``: the same models and the same post-processing as the ``ct_screen``
ensemble, with no server, no network and no serialisation); here it runs under the same thread budget
as Triton (``threads`` ORT intra-op threads in total, by default every core this process may use).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchError
from ctscreen.contracts import HU_SLICES, LESION_MODEL, PROB, VALID_AREA_MODEL
from ctscreen.machine import cores
from ctscreen.postprocess import postprocess_batch
from ctscreen.reference import DEFAULT_BATCH, ReferencePipeline, onnx_path

logger = logging.getLogger(__name__)


class OrtPipeline(ReferencePipeline):
    """:class:`~ctscreen.reference.ReferencePipeline` configured for a benchmark.

    Parameters
    ----------
    threads : int | None
        ORT intra-op threads per session (default: every usable core).
    repo : Path | None
        Folder holding ``<model>/1/model.onnx`` (default: the repository's ``model_repository``);
        :class:`~benchmarks.common.BenchError` when a file is missing.
    spinning : bool
        ORT thread-pool spinning; off by default, as in the cpu profile's Triton models.
    batch : int
        Slices per ORT call of :meth:`~ctscreen.reference.ReferencePipeline.run` (default 8).
    """

    def __init__(self, threads: int | None = None, repo: Path | None = None, spinning: bool = False,
                 batch: int = DEFAULT_BATCH) -> None:
        try:
            paths = onnx_path(VALID_AREA_MODEL, repo), onnx_path(LESION_MODEL, repo)
        except FileNotFoundError as exc:
            raise BenchError(str(exc)) from None
        super().__init__(*paths, threads=threads, batch=batch, spinning=spinning)


def ort_throughput(
    slices: np.ndarray,
    *,
    batch: int = 4,
    workers: int = 1,
    threads_total: int | None = None,
    min_slices: int = 64,
    max_seconds: float = 60.0,
) -> dict[str, Any]:
    """Slices/s of the in-process pipeline: ``workers`` pipelines sharing ``threads_total`` threads.

    Runs until ``min_slices`` slices are done (at least one batch per worker) or ``max_seconds`` passed.
    """
    total = threads_total or cores()
    per = max(1, total // workers)
    pipes = [OrtPipeline(threads=per) for _ in range(workers)]
    batches = [slices[i : i + batch] for i in range(0, len(slices), batch)]
    batches = [b for b in batches if len(b) == batch] or [slices[:batch]]
    pipes[0](batches[0])  # warm-up, as Triton's model_warmup does
    done = 0
    deadline = time.monotonic() + max_seconds

    def loop(k: int) -> int:
        n, j = 0, k
        while True:
            b = batches[j % len(batches)]
            pipes[k](b)
            n += len(b)
            j += 1
            if done + n * workers >= min_slices or time.monotonic() > deadline:
                return n

    t0 = time.monotonic()
    if workers == 1:
        done = loop(0)
    else:
        with ThreadPoolExecutor(workers) as ex:
            done = sum(ex.map(loop, range(workers)))
    wall = time.monotonic() - t0
    return {
        "batch": batch,
        "workers": workers,
        "threads_per_worker": per,
        "slices": done,
        "wall_s": round(wall, 3),
        "slices_per_s": round(done / wall, 3),
    }


def ort_pipelined(
    slices: np.ndarray, *, batch: int = 4, min_slices: int = 64, max_seconds: float = 60.0
) -> dict[str, Any]:
    """Slices/s with the three steps overlapped, as Triton's ensemble schedules them: the valid-area and
    lesion sessions (one thread each) run at once on batch ``i`` while batch ``i - 1`` is post-processed."""
    pipe = OrtPipeline(threads=1)
    batches = [slices[i : i + batch] for i in range(0, len(slices) - batch + 1, batch)] or [slices[:batch]]
    pipe(batches[0])
    sess = pipe.sessions
    with ThreadPoolExecutor(3) as ex:
        t0 = time.monotonic()
        done, j, pending = 0, 0, None
        while done < min_slices and time.monotonic() - t0 < max_seconds:
            b = batches[j % len(batches)]
            fv = ex.submit(sess[VALID_AREA_MODEL].run, [PROB], {HU_SLICES: b})
            fl = ex.submit(sess[LESION_MODEL].run, [PROB], {HU_SLICES: b})
            if pending is not None:
                pending.result()
            v, les = fv.result()[0], fl.result()[0]
            pending = ex.submit(postprocess_batch, v, les, b)
            done += len(b)
            j += 1
        if pending is not None:
            pending.result()
        wall = time.monotonic() - t0
    return {"batch": batch, "workers": "pipelined", "threads_per_worker": 1, "slices": done,
            "wall_s": round(wall, 3), "slices_per_s": round(done / wall, 3)}


def best_ort(slices: np.ndarray, configs: Sequence[tuple[int, int]] = ((4, 1), (4, 2)), **kw: Any) -> dict[str, Any]:
    """The fastest of several (batch, workers) configurations and the pipelined one: the strictest denominator."""
    runs = [ort_throughput(slices, batch=b, workers=w, **kw) for b, w in configs]
    runs.append(ort_pipelined(slices, batch=configs[0][0], min_slices=kw.get("min_slices", 64),
                              max_seconds=kw.get("max_seconds", 60.0)))
    best = max(runs, key=lambda r: r["slices_per_s"])
    return {"best": best, "runs": runs}
