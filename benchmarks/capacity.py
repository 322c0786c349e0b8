"""Capacity of the lite lesion net: accuracy against milliseconds per slice (issue #11, item 4).

Each candidate is a folder holding an exported, calibrated ``model.onnx`` and its ``model_card.json``
(``ctscreen train lesion --arch ...``, ``python -m training.calibrate``, ``ctscreen export lesion
--calibration ...``; the shipped model is ``model_repository/lesion/1``). For each one this command
writes one row of ``docs/models/capacity.md`` (+ JSON):

* **speed**: ONNX Runtime, 2 threads, no spinning (as the Triton cpu profile runs it), batch 1 and 4;
* **validation** (what a choice between candidates may use): the exported graph (its calibration
  folded in) at the fixed 0.50, scored as ``training.calibrate`` scores, on the validation split only;
* **held out** (reported, never used to choose): the sections of ``python -m training.evaluate_real``
  run on it with the shipped valid-area model.

::

    python -m benchmarks.capacity --candidate shipped=model_repository/lesion/1 \\
        --candidate d5=runs/lesion-d5/export --out docs/models/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_models import time_onnx
from ctscreen.contracts import LESION_MODEL, PROB_CUTOFF, VALID_AREA_MODEL
from ctscreen.machine import shipped_models
from ctscreen.reference import ReferencePipeline
from training import calibrate, evaluate_real, realct
from training.datasets import PHANTOM_VAL_SEED0, phantom_volumes

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
LESION_BUDGET_MS = 60.0
"""Issue #11's budget for the lite lesion net (ONNX Runtime, 2 threads, per slice)."""


def _candidate(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"a candidate is NAME=FOLDER, got {text!r}")
    return name, Path(folder)


def calibrated_cutoff(card: dict) -> float | None:
    """The operating point ``training.calibrate`` chose for this export (folded into its graph)."""
    cal = card.get("training", {}).get("calibration") or {}
    return cal.get("cutoff")


def validation_row(run: ReferencePipeline, volumes: list) -> dict[str, Any]:
    """The validation figures of the exported graph at the fixed 0.50 (its calibration included),
    measured now with ``training.calibrate``'s scoring on the validation split only."""
    _, table = calibrate.choose(calibrate.scores(run, volumes, (PROB_CUTOFF,)))
    (row,) = table
    return {k: row[k] for k in ("sensitivity", "false_boxes_per_slice", "box_precision", "worst_hard_negative",
                                "meets")}


def held_out_row(report: dict) -> dict[str, Any]:
    """The few held-out figures the capacity table shows (the rest stays in the JSON)."""
    m, ph = report.get("medseg", {}), report.get("phantom", {})
    row: dict[str, Any] = {}
    if m:
        row.update(
            {
                "medseg_sensitivity": m["per_image_sensitivity"]["value"],
                "medseg_box_precision": m["box_precision"]["value"],
                "medseg_false_boxes_per_slice": m["false_boxes_per_slice"],
                "medseg_lesion_recall": m["lesion_recall"]["value"],
                "medseg_dice": m["dice"],
            }
        )
    if report.get("pseudo"):
        row["pseudo_positive"] = sum(v["verdict"] == "positive" for v in report["pseudo"].values())
        row["pseudo_volumes"] = len(report["pseudo"])
    if report.get("dicom"):
        row["real_dicom_boxes"] = {r["file"]: r["boxes"] for r in report["dicom"]["slices"]}
    if ph:
        met = ph["per_patient"]["metrics"]
        row["phantom_patient_sensitivity"] = met["sensitivity"]["value"]
        row["phantom_patient_specificity"] = met["specificity"]["value"]
        row["phantom_worst_hard_negative"] = evaluate_real.worst_hard_negative(ph)
    row["goals_met"] = sum(report["goals"].values())
    row["goals"] = len(report["goals"])
    return row


def speed_of(onnx: Path, reps: int) -> dict[str, float]:
    """Median ms per slice at batch 1 and 4 (ONNX Runtime, 2 threads, no spinning)."""
    return {f"batch{b}": time_onnx(onnx, threads=2, batch=b, reps=reps)["ms_per_slice_median"] for b in (1, 4)}


def retime(out: Path, speeds: dict[str, dict[str, float]], argv: list[str] | None) -> int:
    """Put ``speeds`` into ``out/capacity.json`` (rows by name), stamped as a timing of its own."""
    path = out / "capacity.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"python -m benchmarks.capacity: error: --speed-only needs {path} ({exc})", file=sys.stderr)  # noqa: T201
        return 2
    missing = sorted(set(speeds) - {c["name"] for c in doc["candidates"]})
    if missing:
        print(f"python -m benchmarks.capacity: error: not in {path}: {missing}", file=sys.stderr)  # noqa: T201
        return 2
    for c in doc["candidates"]:
        if c["name"] in speeds:
            c["speed"] = speeds[c["name"]]
    doc["speed_stamp"] = evaluate_real.run_stamp("benchmarks.capacity", argv, time.perf_counter())
    return write(out, doc)


def write(out: Path, doc: dict) -> int:
    """``out/capacity.json`` and ``out/capacity.md`` (printed too)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "capacity.md").write_text(markdown(doc))
    print(markdown(doc))  # noqa: T201
    return 0


def _fmt(v: Any, pct: bool = False, nd: int = 2) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f} %" if pct else f"{v:.{nd}f}"


def markdown(doc: dict) -> str:
    lines = [
        "# Capacity of the lite lesion net: accuracy against ms per slice",
        "",
        f"Command: `{doc['command']}`  ",
        f"Commit `{doc['commit']}`; {doc['host']}; load average {doc['load']}; {doc['created']}; "
        f"{doc['seconds']} s. Valid-area model: `{doc['valid_area_sha256'][:16]}…` (shipped).",
        "",
        "Every candidate was trained with the same recipe, data and seed (docs/models/real-ct.md) and "
        "calibrated on the validation split. **Choose only on the speed and validation columns**; the "
        "held-out columns (medseg-100/test, the held-out pseudo-labelled volumes, the real HU slices, "
        "the phantom evaluation seeds) are reported so that the choice can be checked, never to make it. "
        f"Budget: lesion <= {LESION_BUDGET_MS:.0f} ms per slice (ONNX Runtime, 2 threads).",
        *([f"Speed columns timed again on their own: `{doc['speed_stamp']['command']}`, load average "
           f"{doc['speed_stamp']['load']}, {doc['speed_stamp']['created']}."] if doc.get("speed_stamp") else []),
        "",
        "| candidate | architecture | MB | ms/slice b1 / b4 | calibrated cut-off | val sens | val false/slice | val precision "
        "| val worst hard-neg | test sens | test precision | test false/slice | lesion recall | Dice "
        "| pseudo volumes + | boxes on real non-COVID HU slices | phantom sens / spec | phantom worst hard-neg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in doc["candidates"]:
        v, h, s = c["validation"], c["held_out"], c["speed"]
        boxes = h.get("real_dicom_boxes", {})
        lines.append(
            f"| {c['name']}{' **shipped**' if c['shipped'] else ''} | {c['architecture']} | {c['size_mb']:.1f} "
            f"| {s['batch1']:.1f} / {s['batch4']:.1f} | {_fmt(c['calibrated_cutoff'])} "
            f"| {_fmt(v.get('sensitivity'), True)} "
            f"| {_fmt(v.get('false_boxes_per_slice'))} | {_fmt(v.get('box_precision'), True)} "
            f"| {_fmt(v.get('worst_hard_negative'), True)} | {_fmt(h.get('medseg_sensitivity'), True)} "
            f"| {_fmt(h.get('medseg_box_precision'), True)} | {_fmt(h.get('medseg_false_boxes_per_slice'))} "
            f"| {_fmt(h.get('medseg_lesion_recall'), True)} | {_fmt(h.get('medseg_dice'), nd=3)} "
            f"| {h.get('pseudo_positive', '-')}/{h.get('pseudo_volumes', '-')} | {sum(boxes.values()) if boxes else '-'} "
            f"| {_fmt(h.get('phantom_patient_sensitivity'), True)} / {_fmt(h.get('phantom_patient_specificity'), True)} "
            f"| {_fmt(h.get('phantom_worst_hard_negative'), True)} |"
        )
    lines += ["", "Per-file boxes on the real HU slices and every held-out figure: `capacity.json`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__.splitlines()[0])
    p.add_argument(
        "--candidate",
        type=_candidate,
        action="append",
        required=True,
        help="NAME=FOLDER with model.onnx and model_card.json (repeat)",
    )
    p.add_argument(
        "--valid-area",
        type=Path,
        default=REPO_ROOT / "model_repository" / VALID_AREA_MODEL / "1" / "model.onnx",
    )
    p.add_argument("--sections", default="medseg,pseudo,dicom,phantom")
    p.add_argument("--val-phantom-studies", type=int, default=12, help="phantom validation studies")
    p.add_argument("--reps", type=int, default=10, help="timed runs per batch size")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "models")
    p.add_argument("--speed-only", action="store_true",
                   help="time the candidates again (a quiet machine) and update OUT/capacity.json's speed columns")
    args = p.parse_args(argv)
    for name, folder in args.candidate:
        for f in ("model.onnx", "model_card.json"):
            if not (folder / f).is_file():
                p.error(f"candidate {name}: no {f} in {folder}")
    if not args.valid_area.is_file():
        p.error(f"no such model file: {args.valid_area}")
    try:
        root = realct.real_ct_root(None)
    except realct.DataError as exc:
        p.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from training.card import sha256_of

    # every candidate is timed first, one after the other, before anything else loads the machine
    speeds = {name: speed_of(folder / "model.onnx", args.reps) for name, folder in args.candidate}
    if args.speed_only:
        return retime(args.out, speeds, argv)

    shipped = shipped_models().get(LESION_MODEL, {}).get("sha256")
    sections = set(args.sections.split(","))
    t0 = time.perf_counter()
    val_volumes = list(realct.real_volumes("val")) + list(
        phantom_volumes(args.val_phantom_studies, PHANTOM_VAL_SEED0, n_slices=48))
    rows = []
    for name, folder in args.candidate:
        onnx = folder / "model.onnx"
        card = json.loads((folder / "model_card.json").read_text())
        arch = card.get("architecture", {})
        speed = speeds[name]
        run = ReferencePipeline(args.valid_area, onnx, threads=2)
        report = evaluate_real.sections_report(run, sections, root)
        sha = sha256_of(onnx)
        rows.append(
            {
                "name": name,
                "folder": str(folder),
                "sha256": sha,
                "shipped": sha == shipped,
                "version": card.get("version"),
                "architecture": "{} d{} ({}) @{}".format(
                    arch.get("encoder"),
                    arch.get("encoder_depth"),
                    ",".join(str(w) for w in arch.get("decoder_channels", [])),
                    arch.get("input_size"),
                ),
                "size_mb": onnx.stat().st_size / 1e6,
                "speed": speed,
                "calibrated_cutoff": calibrated_cutoff(card),
                "validation": validation_row(run, val_volumes),
                "held_out": held_out_row(report),
                "report": report,
            }
        )
        logger.info("%s: %s", name, rows[-1]["held_out"])
    doc = {
        **evaluate_real.run_stamp("benchmarks.capacity", argv, t0),
        "valid_area_sha256": sha256_of(args.valid_area),
        "budget_ms": LESION_BUDGET_MS,
        "candidates": rows,
    }
    return write(args.out, doc)

if __name__ == "__main__":
    raise SystemExit(main())
