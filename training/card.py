"""Model-card content: what every shipped ONNX file says about itself (JSON and Markdown)."""

from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path

from ctscreen.contracts import HU_SLICES, PROB, SLICE_SIZE

INTENDED_USE = {
    "valid_area": (
        "Finds the valid area of an axial chest-CT slice: the rectangle holding the lung fields. "
        "Lesion boxes whose centre lies outside it are dropped (Chen et al., Sci Rep 2020, 10:19196). "
        "Target during training: the filled bounding rectangle of the lung mask on each slice."
    ),
    "lesion": (
        "Segments suspicious COVID-19 pneumonia lesions (ground-glass opacity, consolidation) on "
        "axial chest-CT slices; non-COVID findings (nodules, TB, bronchiectasis, bacterial pneumonia, "
        "emphysema, stomach bubble) are negatives. Screening aid only, not a diagnosis."
    ),
}

LIMITATIONS = (
    "Trained on synthetic phantom studies only (the `phantom` package): the figures in the metrics "
    "section are phantom figures and say nothing about real scans. Retrain on labelled real data "
    "(`ctscreen train ... --data nifti:DIR`) and re-evaluate before any clinical use."
)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def io_spec() -> tuple[list[dict], list[dict]]:
    """Input and output tensor descriptions (names from :mod:`ctscreen.contracts`)."""
    shape = ["B", 1, SLICE_SIZE, SLICE_SIZE]
    inputs = [
        {"name": HU_SLICES, "dtype": "INT16", "shape": shape, "meaning": "raw Hounsfield units"}
    ]
    outputs = [{"name": PROB, "dtype": "FP32", "shape": shape, "meaning": "probability (sigmoid)"}]
    return inputs, outputs


def make_card(
    *,
    task: str,
    profile: str,
    spec: dict,
    version: str,
    trained: bool,
    opset: int,
    training: dict | None = None,
    metrics: dict | None = None,
) -> dict:
    """Model card dict (sha256/size are added by :func:`training.export.write_model_card`)."""
    inputs, outputs = io_spec()
    return {
        "name": task,
        "version": version,
        "profile": profile,
        "trained": trained,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "format": f"onnx (opset {opset})",
        "architecture": {
            **spec,
            "graph": "int16 HU -> clip to window -> scale [0,1] -> avg-pool to input_size -> "
            "UNet++ -> bilinear upsample to 512 -> sigmoid",
        },
        "inputs": inputs,
        "outputs": outputs,
        "intended_use": INTENDED_USE[task],
        "training": training or {},
        "metrics": metrics or {},
        "limitations": LIMITATIONS,
    }
