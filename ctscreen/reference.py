"""The in-process reference: the ``ct_screen`` ensemble without a server.

ONNX Runtime on the two shipped graphs (``valid_area``, ``lesion``) and
:func:`ctscreen.postprocess.postprocess_batch` (0.50 cut-off, > 25-pixel boxes, valid-area filter),
the very function the ``postprocess`` model runs: the same models and the same post-processing as
Triton, with no network and no serialisation. One implementation for every caller:

* the model-quality reports of :mod:`training` (``training.evaluate``, ``evaluate_real``, ``calibrate``);
* ``ctscreen eval --in-process`` (:mod:`evaluation.runners`);
* the denominator of the benchmarks' overhead ratios (:mod:`benchmarks.inprocess`);
* the tests.

It lives in :mod:`ctscreen`, the bottom layer, because it needs only numpy, onnxruntime and its own
package (contracts, post-processing, the core count, where ``model_repository/`` is): all of them can
import it, and none has to import another to get it.

Usage::

    pipe = ReferencePipeline.from_repo(threads=1)
    boxes, counts, valid = pipe(hu)              # one batch INT16 [B, 1, 512, 512]: the ensemble's outputs
    boxes, valid, maps = pipe.run(volume, maps=True)  # a volume INT16 [Z, 512, 512], batch by batch
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from ctscreen.contracts import HU_SLICES, LESION_MODEL, PROB, VALID_AREA_MODEL
from ctscreen.machine import cores
from ctscreen.postprocess import postprocess_batch, unpack_outputs

DEFAULT_BATCH = 8
"""Slices per ORT call in :meth:`ReferencePipeline.run`."""


def onnx_path(model: str, repo: Path | None = None) -> Path:
    """``<repo>/<model>/1/model.onnx`` (default ``repo``: ``model_repository/`` of this checkout).

    Raises
    ------
    FileNotFoundError
        When the file is not there.
    """
    if repo is None:
        from ctscreen.repo import SOURCE_DIR  # here, not at the top: the served cpu model vendors this module

        repo = SOURCE_DIR
    path = repo / model / "1" / "model.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    return path


class ReferencePipeline:
    """ORT(valid_area) + ORT(lesion) + ``postprocess_batch`` in this process.

    Parameters
    ----------
    valid_area, lesion : Path
        The two ONNX files (see :meth:`from_repo` for a repository folder).
    threads : int | None
        ORT intra-op threads per session (default: every core this process may use).
    batch : int
        Slices per ORT call in :meth:`run` (default 8).
    spinning : bool
        ORT thread-pool spinning; off by default, as in the cpu profile's Triton models (shared CPUs).
    """

    def __init__(
        self,
        valid_area: Path,
        lesion: Path,
        *,
        threads: int | None = None,
        batch: int = DEFAULT_BATCH,
        spinning: bool = False,
    ) -> None:
        import onnxruntime as ort

        threads = cores() if threads is None else threads
        if threads < 1:
            raise ValueError(f'Argument "threads" must be >= 1, got {threads}.')
        if batch < 1:
            raise ValueError(f'Argument "batch" must be >= 1, got {batch}.')
        self.threads = threads
        self.batch = batch
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
            opts.add_session_config_entry(key, "1" if spinning else "0")
        self.paths = {VALID_AREA_MODEL: Path(valid_area), LESION_MODEL: Path(lesion)}
        self.sessions: dict[str, Any] = {
            m: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for m, path in self.paths.items()
        }

    @classmethod
    def from_repo(cls, repo: Path | None = None, **kwargs: Any) -> ReferencePipeline:
        """The pipeline on ``<repo>/{valid_area,lesion}/1/model.onnx`` (default: ``model_repository/``)."""
        return cls(onnx_path(VALID_AREA_MODEL, repo), onnx_path(LESION_MODEL, repo), **kwargs)

    def maps(self, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Valid-area and lesion probability maps ``[B, 1, 512, 512]`` of INT16 slices ``[B, 1, 512, 512]``."""
        if hu.dtype != np.int16 or hu.ndim != 4:
            raise ValueError(f'Argument "hu" must be INT16 [B, 1, H, W], got {hu.dtype} {hu.shape}.')
        valid = self.sessions[VALID_AREA_MODEL].run([PROB], {HU_SLICES: hu})[0]
        lesion = self.sessions[LESION_MODEL].run([PROB], {HU_SLICES: hu})[0]
        return valid, lesion

    def __call__(self, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ensemble's outputs (boxes ``[B, K, 5]``, counts ``[B, 1]``, valid-area boxes ``[B, 4]``) for
        one batch ``hu`` INT16 ``[B, 1, 512, 512]``."""
        return postprocess_batch(*self.maps(hu), hu)

    @overload
    def run(self, hu: np.ndarray, batch: int | None = None, *,
            maps: Literal[True]) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]: ...

    @overload
    def run(self, hu: np.ndarray, batch: int | None = None, *,
            maps: Literal[False] = False) -> tuple[list[np.ndarray], list[np.ndarray], None]: ...

    def run(
        self, hu: np.ndarray, batch: int | None = None, *, maps: bool = False
    ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray | None]:
        """Every slice of a volume ``hu`` INT16 ``[Z, 512, 512]``, ``batch`` slices (default
        ``self.batch``) per call.

        Returns
        -------
        boxes : list of float32 [n_i, 5]
            The lesion boxes of each slice (padding removed).
        valid : list of float32 [4]
            The valid-area box of each slice.
        lesion_maps : float16 [Z, 512, 512] | None
            With ``maps``: the lesion probability maps (for Dice); else None.
        """
        step = batch or self.batch
        boxes_out: list[np.ndarray] = []
        valid_out: list[np.ndarray] = []
        probs = []
        for i in range(0, len(hu), step):
            x = np.ascontiguousarray(hu[i : i + step, None])
            v, les = self.maps(x)
            for out in unpack_outputs(*postprocess_batch(v, les, x)):
                boxes_out.append(out.boxes)
                valid_out.append(out.valid_area)
            if maps:
                probs.append(les[:, 0].astype(np.float16))
        return boxes_out, valid_out, np.concatenate(probs) if maps else None

    def per_slice(self, hu: np.ndarray, batch: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(boxes, valid-area box)`` of each slice of a volume ``hu`` INT16 ``[Z, 512, 512]``."""
        boxes, valid, _ = self.run(hu, batch)
        return list(zip(boxes, valid, strict=True))
