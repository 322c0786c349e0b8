"""The in-process reference: ONNX Runtime on the shipped ONNX files plus ``postprocess_batch``.

This is the denominator of the overhead ratios: the same models and the same post-processing as the
``ct_screen`` ensemble, with no server, no network and no serialisation, under the same thread budget
(``threads`` ORT intra-op threads in total, by default every core this process may use).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, BenchError
from ctscreen.contracts import HU_SLICES, LESION_MODEL, PROB, VALID_AREA_MODEL
from ctscreen.postprocess import postprocess_batch

logger = logging.getLogger(__name__)


def onnx_path(model: str, repo: Path | None = None) -> Path:
    """``model_repository/<model>/1/model.onnx``; :class:`BenchError` when it is not there."""
    path = (repo or ROOT / "model_repository") / model / "1" / "model.onnx"
    if not path.is_file():
        raise BenchError(f"ONNX model not found: {path}")
    return path


def cores() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class OrtPipeline:
    """ORT(valid_area) + ORT(lesion) + ``postprocess_batch`` in this process.

    Parameters
    ----------
    threads : int | None
        ORT intra-op threads per session (default: every usable core).
    repo : Path | None
        Folder holding ``<model>/1/model.onnx`` (default: the repository's ``model_repository``).
    spinning : bool
        ORT thread-pool spinning; off by default, as in the cpu profile's Triton models.
    """

    def __init__(self, threads: int | None = None, repo: Path | None = None, spinning: bool = False) -> None:
        import onnxruntime as ort

        threads = cores() if threads is None else threads
        if threads < 1:
            raise ValueError(f'Argument "threads" must be >= 1, got {threads}.')
        self.threads = threads
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
            opts.add_session_config_entry(key, "1" if spinning else "0")
        self.sessions = {
            m: ort.InferenceSession(str(onnx_path(m, repo)), opts, providers=["CPUExecutionProvider"])
            for m in (VALID_AREA_MODEL, LESION_MODEL)
        }

    def maps(self, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Valid-area and lesion probability maps ``[B, 1, 512, 512]`` of INT16 slices ``[B, 1, 512, 512]``."""
        if hu.dtype != np.int16 or hu.ndim != 4:
            raise ValueError(f'Argument "hu" must be INT16 [B, 1, H, W], got {hu.dtype} {hu.shape}.')
        valid = self.sessions[VALID_AREA_MODEL].run([PROB], {HU_SLICES: hu})[0]
        lesion = self.sessions[LESION_MODEL].run([PROB], {HU_SLICES: hu})[0]
        return valid, lesion

    def __call__(self, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ensemble's outputs (boxes, counts, valid-area boxes) for ``hu``."""
        return postprocess_batch(*self.maps(hu))


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
            pending = ex.submit(postprocess_batch, v, les)
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
