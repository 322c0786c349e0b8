"""Model-card content: what every shipped ONNX file says about itself (JSON and Markdown)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
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
LIMITATIONS_REAL = (
    "Not a medical device; research use only. Trained on real chest CT of COVID-19 patients "
    "(98 MedSeg slices with radiologist masks, of which the 48 of medseg-100/test were never trained "
    "on, and 16 COVID-19-CT-Seg volumes with model-made pseudo-labels, weighted below the radiologist "
    "masks, 2 volumes for validation and 4 held out) plus synthetic phantom studies for the hard "
    "negatives. MedSeg names no patients and is split by file, so neighbouring slices of one patient lie "
    "on both sides of the split (docs/models/real.md measures it): its held-out figures are optimistic. "
    "All real figures rest on 48 slices and 4 volumes, every one of them with COVID-19; lesion-level "
    "recall there is about 40 % (most affected slices are found, not every lesion); goals not met are "
    "listed under metrics.goals. The real images "
    "are 8-bit lung-window JPEG exports whose HU, orientation and scale were recovered by estimate "
    "(training/realct.py), not original DICOM. The images' licence is not stated by their source "
    "(MedSeg / medicalsegmentation.com and the COVID-19-CT-Seg collection, via the Inf-Net repository): "
    "treat these weights as research-only until it is settled. No lesion-free real patient was "
    "available for training: specificity on real non-COVID patients rests on lesion-free regions of "
    "COVID-19 slices and on the phantom's hard negatives, and must be measured on local data before use. "
    "Known failure modes and gaps: (1) low-dose noise: false boxes grow from about 60 HU of added noise "
    "(0.21 a MedSeg slice without, 0.75 at 90 HU white, 1.33 textured; about one box a normal slice at 90 HU "
    "textured), so a normal low-dose study may come out positive; the gateway warns above 38 HU of measured "
    "noise (README noise row, docs/models/real-ct.md). (2) Thick slices: untested on real slices over 5 mm; "
    "the gateway refuses series over 10 mm. (3) Field of view: false boxes depend on the scale of the lungs "
    "on the 512 grid (0.96 a MedSeg slice at a 250 mm field filling the grid, 0.23 once placed at "
    "0.62-0.85 mm a pixel); the gateway places each slice in that band (docs/ingest.md). (4) The Toshiba "
    "lower-chest slice, one of the five real normal chest slices tested (4 patients), gets a false lesion box. (5) Untested on "
    "contrast-enhanced COVID-19 scans (of the real normal slices, NEMA CT1 and Toshiba are contrast-enhanced, "
    "two come from cardiac CT angiography studies), on paediatric and on non-axial scans. (6) The hard-negative classes "
    "(TB, bronchiectasis, bacterial pneumonia, nodules, emphysema, stomach bubble, bowel gas) are tested on "
    "the synthetic phantom only."
)


def limitations_for(training: dict | None) -> str:
    """The limitations text for a model trained on ``training`` (its data manifest)."""
    return LIMITATIONS_REAL if training and "real_ct" in training else LIMITATIONS


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
        "limitations": limitations_for(training),
    }


def write_model_card(onnx_path: Path, card: dict) -> tuple[Path, Path]:
    """Write ``model_card.json`` and ``model_card.md`` beside ``onnx_path``; sha256 filled in here."""
    onnx_path = Path(onnx_path)
    card = dict(card)
    card["file"] = onnx_path.name
    card["sha256"] = sha256_of(onnx_path)
    card["size_bytes"] = onnx_path.stat().st_size
    jpath = onnx_path.parent / "model_card.json"
    jpath.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    mpath = onnx_path.parent / "model_card.md"
    mpath.write_text(_card_markdown(card))
    return jpath, mpath


def _card_markdown(card: dict) -> str:
    lines = [f"# Model card: {card.get('name')} (version {card.get('version')})", ""]
    lines += [
        f"- **File**: `{card['file']}` ({card['size_bytes'] / 1e6:.2f} MB)",
        f"- **sha256**: `{card['sha256']}`",
        f"- **Profile**: `{card.get('profile')}`",
        f"- **Trained**: {card.get('trained', False)}",
        f"- **Created**: {card.get('created')}",
        "",
        "## Intended use",
        "",
        "**Not a medical device**: research use only.",
        "",
        card.get("intended_use", ""),
        "",
        "## Architecture",
        "",
        "```json",
        json.dumps(card.get("architecture", {}), indent=2),
        "```",
        "",
        "## Input / output",
        "",
        "| tensor | dtype | shape | meaning |",
        "|---|---|---|---|",
    ]
    for t in card.get("inputs", []) + card.get("outputs", []):
        lines.append(f"| `{t['name']}` | {t['dtype']} | {t['shape']} | {t.get('meaning', '')} |")
    lines += ["", "## Training data", "", "```json", json.dumps(card.get("training", {}), indent=2), "```"]
    lines += ["", "## Metrics", ""]
    metrics = card.get("metrics") or {}
    if not metrics:
        lines.append("None recorded (untrained export).")
    else:
        lines += ["```json", json.dumps(metrics, indent=2), "```"]
    lines += ["", "## Limitations", "", card.get("limitations", ""), ""]
    return "\n".join(lines)


def card_metrics(task: str, report: dict) -> dict:
    """The part of a quality report (``training.evaluate``) that concerns ``task``.

    Any other dict is taken as is.
    """
    if "medseg" in report and "goals" in report:  # training.evaluate_real
        keep = {k: report.get(k) for k in ("command", "commit", "created", "goals")}
        ph = report.get("phantom") or {}
        if task == "valid_area":
            return {**keep, "phantom_valid_area_iou_median": ph.get("valid_area_iou_median"),
                    "real_dicom_valid_area": [
                        {k: r[k] for k in ("file", "group", "valid_area_share")}
                        for r in (report.get("dicom") or {}).get("slices", [])]}
        m = report["medseg"]
        return {
            **keep,
            "medseg_test": {k: m[k] for k in ("per_image_sensitivity", "lesion_recall", "box_precision",
                                             "false_boxes_per_slice", "false_boxes_per_slice_ci", "dice")
                            if k in m},
            "held_out_real_volumes": {c: v["verdict"] for c, v in (report.get("pseudo") or {}).items()},
            "real_dicom_boxes": {r["file"]: r["boxes"] for r in (report.get("dicom") or {}).get("slices", [])},
            "phantom_per_patient": ph.get("per_patient", {}).get("metrics"),
            "phantom_false_positive_rate_by_class": ph.get("false_positive_rate_by_class"),
            "note": "measured with the valid_area model of the same release; see docs/models/real.md",
        }
    if "valid_area" not in report or "lesion_per_slice" not in report:
        return report
    common = {k: report.get(k) for k in ("command", "n_studies", "seeds", "kinds", "slices", "created")}
    if task == "valid_area":
        return {**common, "valid_area": report["valid_area"]}
    return {
        **common,
        "lesion_per_slice": report["lesion_per_slice"],
        "false_positive_rate_by_class": report["false_positive_rate_by_class"],
        "note": "measured with the valid_area model of the same release (valid-area filter)",
    }


def update_card_metrics(onnx_path: Path, metrics: dict) -> tuple[Path, Path]:
    """Replace the metrics of the card beside ``onnx_path``, its intended use by the current text for its
    task and its limitations by the current text for its training data (what is known of the models grows
    with the reports): the card's words come from this module. The file itself is not touched."""
    jpath = Path(onnx_path).parent / "model_card.json"
    if not jpath.is_file():
        raise FileNotFoundError(f"no model card at {jpath}")
    card = json.loads(jpath.read_text())
    card["metrics"] = metrics
    if card.get("name") in INTENDED_USE:
        card["intended_use"] = INTENDED_USE[card["name"]]
    card["limitations"] = limitations_for(card.get("training"))
    return write_model_card(Path(onnx_path), card)
