"""Choose the lesion net's operating point on the validation split only, as a logit offset.

The case rule keeps the paper's numbers (a region counts at mean probability >= 0.50 and a box of
> 25 px). What a freshly trained net's 0.50 means, though, depends on its training; this command
runs a lesion checkpoint (exported to ONNX) with the valid-area model over the **validation** data
(MedSeg train/ every fifth image, the two validation pseudo-labelled volumes, held-out phantom
validation studies with every hard-negative class; never a test or evaluation set), tries cut-offs,
and writes the chosen one as ``logit_offset = logit(t)`` so that the exported graph's sigmoid puts
exactly that operating point at 0.50::

    python -m training.calibrate --lesion /tmp/lesion.onnx --out runs/lesion-real/calibration.json
    ctscreen export lesion --checkpoint runs/lesion-real/best.ckpt --calibration runs/lesion-real/calibration.json

Choice: the lowest cut-off whose validation figures meet every goal (per-image sensitivity on the
radiologist slices >= 0.90, false boxes per real slice <= 0.3, no phantom hard-negative class above
2 % false-positive slices); when none meets them all, the one with the best
``sensitivity - false boxes per slice - 5 x worst hard-negative rate``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ctscreen.contracts import LESION_MODEL, VALID_AREA_MODEL
from ctscreen.postprocess import lesion_boxes
from ctscreen.reference import ReferencePipeline
from training import realct
from training.datasets import PHANTOM_VAL_SEED0, phantom_volumes
from training.evaluate import lesion_truth, overlaps

REPO_ROOT = Path(__file__).resolve().parents[1]
CUTOFFS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
HARD = ("bacterial", "bowel_gas", "bronchiectasis", "emphysema", "nodule", "stomach_bubble", "tb")


def scores(run: ReferencePipeline, volumes, cutoffs) -> dict:
    """Per cut-off: truth-positive slices hit, false boxes, boxes, and hard-negative slices boxed."""
    acc: dict[float, dict[str, Any]] = {
        t: {"pos": 0, "hit": 0, "boxes": 0, "false": 0, "slices": 0, "fp": {}} for t in cutoffs}
    for vol in volumes:
        _, valid, prob = run.run(vol.hu, maps=True)
        real = vol.meta.get("source") == "real-ct"
        radiologist = real and vol.meta.get("label_weight", 1.0) == 1.0
        for i, va in enumerate(valid):
            p = prob[i].astype(np.float32)
            truth = vol.lesion[i]
            for t in cutoffs:
                a = acc[t]
                b = lesion_boxes(p, va, cutoff=t)
                if real:
                    a["slices"] += 1
                    a["boxes"] += len(b)
                    a["false"] += sum(not overlaps(x, truth) for x in b)
                    if radiologist and lesion_truth(truth) == "positive":
                        a["pos"] += 1
                        a["hit"] += int(any(overlaps(x, truth) for x in b))
                elif not truth.any():
                    for c in {f for f in vol.finding[i].split("+") if f in HARD}:
                        n, k = a["fp"].get(c, (0, 0))
                        a["fp"][c] = (n + int(len(b) > 0), k + 1)
    return acc


def choose(acc: dict) -> tuple[float, list[dict]]:
    """The cut-off (see the module doc) and the table behind it."""
    table = []
    for t, a in sorted(acc.items()):
        sens = a["hit"] / max(1, a["pos"])
        fbps = a["false"] / max(1, a["slices"])
        worst = max((n / k for n, k in a["fp"].values() if k), default=0.0)
        table.append({"cutoff": t, "sensitivity": sens, "false_boxes_per_slice": fbps,
                      "box_precision": 1 - a["false"] / max(1, a["boxes"]), "worst_hard_negative": worst,
                      "meets": sens >= 0.90 and fbps <= 0.3 and worst <= 0.02})
    ok = [r for r in table if r["meets"]]
    pick = ok[0] if ok else max(
        table, key=lambda r: r["sensitivity"] - r["false_boxes_per_slice"] - 5 * r["worst_hard_negative"])
    return pick["cutoff"], table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__.splitlines()[0])
    model_dir = REPO_ROOT / "model_repository"
    p.add_argument("--lesion", type=Path, required=True, help="the lesion checkpoint exported to ONNX")
    p.add_argument("--valid-area", type=Path, default=model_dir / VALID_AREA_MODEL / "1" / "model.onnx")
    p.add_argument("--phantom-studies", type=int, default=12, help="phantom validation studies")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for f in (args.lesion, args.valid_area):
        if not f.is_file():
            p.error(f"no such model file: {f}")
    try:
        real = list(realct.real_volumes("val"))
    except realct.DataError as exc:
        p.error(str(exc))
    vols = real + list(phantom_volumes(args.phantom_studies, PHANTOM_VAL_SEED0, n_slices=48))
    run = ReferencePipeline(args.valid_area, args.lesion, threads=args.threads)
    cutoff, table = choose(scores(run, vols, CUTOFFS))
    doc = {
        "cutoff": cutoff,
        "logit_offset": math.log(cutoff / (1 - cutoff)),
        "model": LESION_MODEL,
        "validation": {"real": [v.case_id for v in real], "phantom_seeds": [
            PHANTOM_VAL_SEED0, PHANTOM_VAL_SEED0 + args.phantom_studies - 1]},
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for r in table:
        print(f"{r['cutoff']:.2f}  sens {r['sensitivity']:.3f}  false/slice {r['false_boxes_per_slice']:.3f}  "  # noqa: T201
              f"precision {r['box_precision']:.3f}  worst hard-neg {r['worst_hard_negative']:.3f}"
              f"{'  meets' if r['meets'] else ''}")
    print(f"chosen cut-off {cutoff} -> logit_offset {doc['logit_offset']:.4f} ({args.out})")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
