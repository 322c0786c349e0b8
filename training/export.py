"""ONNX export of :class:`training.nets.HUSegmenter` with the wire contract, plus the model card.

The graph's input is ``HU_SLICES`` INT16 ``[B, 1, 512, 512]`` (dynamic ``B``) and its output ``PROB``
FP32 ``[B, 1, 512, 512]`` (see :mod:`ctscreen.contracts`); opset :data:`OPSET`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import torch

from ctscreen.contracts import HU_SLICES, PROB, SLICE_SIZE
from training.card import card_metrics, write_model_card

logger = logging.getLogger(__name__)

OPSET = 17


def export_onnx(model: torch.nn.Module, out: Path, *, opset: int = OPSET) -> Path:
    """Write ``model`` (HU in, probability out) as a single-file ONNX graph at ``out``.

    Parameters
    ----------
    model : torch.nn.Module
        Takes ``[B, 1, 512, 512]`` HU, returns ``[B, 1, 512, 512]`` probabilities.
    out : Path
        Destination ``.onnx`` file (parent folders are created).
    opset : int
        ONNX opset, 17 or later.
    """
    if opset < 17:
        raise ValueError(f'Argument "opset" must be 17 or later, got {opset}.')
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    dummy = torch.zeros((1, 1, SLICE_SIZE, SLICE_SIZE), dtype=torch.int16)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (dummy,),
            str(out),
            input_names=[HU_SLICES],
            output_names=[PROB],
            dynamic_axes={HU_SLICES: {0: "batch"}, PROB: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx

    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    proto.producer_name = "ctscreen.training"
    onnx.save(proto, str(out))
    logger.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out


def ort_session(path: Path, threads: int = 2):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def parity(model: torch.nn.Module, onnx_path: Path, hu: np.ndarray) -> float:
    """Largest absolute difference between torch and ORT outputs on ``hu`` int16 ``[B, 1, 512, 512]``."""
    if hu.dtype != np.int16 or hu.ndim != 4:
        raise ValueError(f'Argument "hu" must be int16 [B, 1, H, W], got {hu.dtype} {hu.shape}.')
    with torch.no_grad():
        ref = model.eval().cpu()(torch.from_numpy(hu)).numpy()
    got = ort_session(onnx_path).run([PROB], {HU_SLICES: hu})[0]
    return float(np.max(np.abs(ref - got)))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by :mod:`training.train` (on the CPU)."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ImportError) as exc:
        raise ValueError(f"{path} is not a ctscreen checkpoint ({type(exc).__name__}).") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a ctscreen checkpoint (it holds a {type(ckpt).__name__}).")
    for key in ("task", "profile", "spec", "model"):
        if key not in ckpt:
            raise ValueError(f"{path} is not a ctscreen checkpoint (no {key!r}).")
    return ckpt


def export_checkpoint(
    *,
    task: str,
    checkpoint: Path | None,
    profile: str = "lite",
    out: Path,
    version: str | None = None,
    metrics: dict | None = None,
    opset: int = OPSET,
    check_parity: bool = True,
    calibration: dict | None = None,
) -> dict:
    """Export a checkpoint (or, with ``checkpoint=None``, untrained weights) with its model card.

    ``calibration`` (written by ``training.calibrate``) puts its ``logit_offset`` into the graph and
    itself into the card.

    Returns a summary dict: path, sha256, size, parity (max |torch - ORT|).
    """
    from training.card import make_card
    from training.nets import HUSegmenter, NetSpec, spec_for

    if checkpoint is None:
        spec = spec_for(task, profile)
        model = HUSegmenter(spec)
        torch.manual_seed(0)
        ckpt: dict = {"training": {}, "step": 0}
        trained = False
        version = version or "0.0.0-untrained"
    else:
        ckpt = load_checkpoint(checkpoint)
        if ckpt["task"] != task:
            raise ValueError(f"checkpoint {checkpoint} is a {ckpt['task']!r} model, not {task!r}.")
        profile = ckpt["profile"]
        spec = NetSpec.from_dict(ckpt["spec"])
        if calibration is not None:
            spec = dataclasses.replace(spec, logit_offset=float(calibration["logit_offset"]))
        model = HUSegmenter(spec)
        model.load_state_dict(ckpt["model"])
        trained = True
        version = version or ckpt.get("version") or f"1.0.0+step{ckpt.get('step', 0)}"
    model.eval()
    export_onnx(model, out, opset=opset)
    diff = None
    if check_parity:
        rng = np.random.default_rng(0)
        hu = rng.integers(-1100, 500, size=(2, 1, SLICE_SIZE, SLICE_SIZE)).astype(np.int16)
        diff = parity(model, out, hu)
        if diff > 1e-3:
            raise ValueError(f"ORT output differs from torch by {diff:.2e} (> 1e-3).")
    training = dict(ckpt.get("training") or {})
    training.setdefault("steps", ckpt.get("step", 0))
    if ckpt.get("metrics"):
        training["validation_at_checkpoint"] = ckpt["metrics"]
    if ckpt.get("config"):
        training["config"] = ckpt["config"]
    if calibration is not None:
        training["calibration"] = calibration
    card = make_card(
        task=task,
        profile=profile,
        spec=spec.to_dict(),
        version=version,
        trained=trained,
        opset=opset,
        training=training,
        metrics=card_metrics(task, metrics) if metrics is not None else ckpt.get("metrics"),
    )
    card["export_parity_max_abs_diff"] = diff
    jpath, _ = write_model_card(out, card)
    info = json.loads(jpath.read_text())
    return {"onnx": str(out), "sha256": info["sha256"], "size_bytes": info["size_bytes"], "parity": diff}
