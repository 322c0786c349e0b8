"""Quality of the shipped models on held-out phantom studies, through the serving path's own code.

Runs the in-process reference pipeline (ONNX Runtime on the two ONNX files, then
:func:`ctscreen.postprocess.postprocess_batch`: 0.50 cut-off, > 25-pixel boxes, valid-area filter)
over phantom studies whose seeds no training run uses, and writes ``quality.json`` and ``quality.md``.

Usage::

    python -m training.evaluate --studies 42 --seed 900000 --slices 64 --out docs/models/

Definitions (per image = per slice)
-----------------------------------
* **Valid-area IoU**: IoU of the predicted valid-area box with the true lung-field box
  (``Study.valid_boxes``), over slices that show lung; an empty prediction scores 0.
* **Lesion-positive slice**: the COVID lesion mask has an 8-connected region whose box covers
  > 25 pixels (the same rule as the detector's). Slices whose lesion mask only has smaller specks are
  *indeterminate* and left out of sensitivity and specificity (their count is reported).
* **Lesion-negative slice**: the lesion mask is empty.
* **Detected**: the pipeline returns at least one lesion box for the slice.
* **False-positive rate per hard-negative class**: among lesion-negative slices that show a finding of
  that class (``Study.finding_mask``), the share with a lesion box; ``plain`` are lesion-negative lung
  slices without any finding, ``no_lung`` slices without lung.

No torch is needed: this is the serving path (ORT + the shared post-processing).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

from aggregator.metrics import Confusion, Estimate
from ctscreen.contracts import LESION_MODEL, MIN_BOX_AREA, PROB_CUTOFF, VALID_AREA_MODEL
from ctscreen.machine import machine_info
from ctscreen.postprocess import regions
from ctscreen.reference import ReferencePipeline
from training.datasets import PHANTOM_EVAL_SEED0, Volume

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_stamp(prog: str, argv: list[str] | None, t0: float) -> dict:
    """Command, commit, load, host, machine, date and seconds of a report written by ``prog``."""
    st = machine_info()
    return {
        "command": f"python -m {prog} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": st.get("commit") or "unknown",
        "load": round(st.get("loadavg_1m", 0.0), 2),
        "host": f"{platform.platform()}, {st.get('cpu', '')}, {st.get('cores', '')} cores",
        "machine": st,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def phantom_version() -> str:
    """The commit that last changed the ``phantom`` package (it has no version number of its own), with
    ``+dirty`` when its files differ from that commit; ``unknown`` outside a git checkout."""
    import subprocess

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False)

    try:
        last = git("log", "-1", "--format=%h", "--", "phantom")
        changed = git("status", "--porcelain", "--", "phantom")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = last.stdout.strip()
    if last.returncode != 0 or not commit:
        return "unknown"
    return commit + ("+dirty" if changed.stdout.strip() else "")


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two inclusive pixel boxes (x0, y0, x1, y1); 0 when either is empty (negative)."""
    if np.any(a < 0) or np.any(b < 0):
        return 0.0
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return float(inter / (area(a) + area(b) - inter))


def lesion_truth(mask: np.ndarray) -> str:
    """``positive``, ``negative`` or ``indeterminate`` for one slice's lesion mask (see module doc)."""
    if not mask.any():
        return "negative"
    boxes, _ = regions(mask.astype(np.float32), PROB_CUTOFF, MIN_BOX_AREA)
    return "positive" if len(boxes) else "indeterminate"


def overlaps(box: np.ndarray, mask: np.ndarray) -> bool:
    """True when the inclusive pixel box ``(x0, y0, x1, y1, ...)`` holds a pixel of ``mask``."""
    x0, y0, x1, y1 = (int(v) for v in box[:4])
    return bool(mask[y0 : y1 + 1, x0 : x1 + 1].any())


def evaluate_volumes(pipe: ReferencePipeline, volumes, batch: int = 8, *, on_volume=None) -> dict:
    """Run the pipeline over volumes and gather the per-slice figures (see module doc).

    ``on_volume(volume, outputs)``, when given, sees each volume with its per-slice ``(boxes, valid)``
    (for per-patient figures without running the models twice).
    """
    ious: list[float] = []
    no_lung_fp = no_lung_n = 0
    truth_all: list[bool] = []
    pred_all: list[bool] = []
    indeterminate = 0
    per_finding: dict[str, list[int]] = {}
    per_kind: dict[str, dict] = {}
    box_hits = box_total = 0
    studies = []
    n_slices = 0
    t0 = time.perf_counter()
    for vol in volumes:
        res = pipe.per_slice(vol.hu, batch)
        if on_volume is not None:
            on_volume(vol, res)
        n_slices += len(res)
        k = per_kind.setdefault(vol.kind, {"studies": 0, "truth": [], "pred": []})
        k["studies"] += 1
        s_tp = s_fp = 0
        for i, (boxes, valid) in enumerate(res):
            true_box = vol.valid_boxes[i]
            if true_box[0] >= 0:
                ious.append(box_iou(valid, true_box.astype(np.float32)))
            else:
                no_lung_n += 1
                no_lung_fp += int(valid[0] >= 0)
            state = lesion_truth(vol.lesion[i])
            detected = len(boxes) > 0
            for b in boxes:
                box_total += 1
                box_hits += int(overlaps(b, vol.lesion[i]))
            if state == "indeterminate":
                indeterminate += 1
                continue
            truth_all.append(state == "positive")
            pred_all.append(detected)
            k["truth"].append(state == "positive")
            k["pred"].append(detected)
            s_tp += int(detected and state == "positive")
            s_fp += int(detected and state == "negative")
            if state == "negative":
                if vol.finding[i]:
                    cls = vol.finding[i].split("+")
                elif true_box[0] < 0:
                    cls = ["no_lung"]
                else:
                    cls = ["plain"]
                for c in cls:
                    per_finding.setdefault(c, [0, 0])
                    per_finding[c][0] += int(detected)
                    per_finding[c][1] += 1
        studies.append({"case": vol.case_id, "kind": vol.kind, "slices": len(res),
                        "tp_slices": s_tp, "fp_slices": s_fp})
    seconds = time.perf_counter() - t0
    conf = Confusion.from_labels(truth_all, pred_all)
    iou = np.asarray(ious)
    return {
        "valid_area": {
            "slices_with_lung": int(len(iou)),
            "iou_median": float(np.median(iou)) if len(iou) else None,
            "iou_mean": float(iou.mean()) if len(iou) else None,
            "iou_p10": float(np.percentile(iou, 10)) if len(iou) else None,
            "share_iou_ge_0.90": float((iou >= 0.9).mean()) if len(iou) else None,
            "no_lung_slices": no_lung_n,
            "no_lung_slices_with_a_box": no_lung_fp,
        },
        "lesion_per_slice": {
            "confusion": {"tp": conf.tp, "fp": conf.fp, "tn": conf.tn, "fn": conf.fn},
            "sensitivity": conf.sensitivity().as_dict(),
            "specificity": conf.specificity().as_dict(),
            "ppv": conf.ppv().as_dict(),
            "indeterminate_slices_excluded": indeterminate,
            "boxes_touching_a_true_lesion": Estimate.of(box_hits, box_total).as_dict(),
        },
        "false_positive_rate_by_class": {
            c: Estimate.of(fp, n).as_dict() for c, (fp, n) in sorted(per_finding.items())
        },
        "per_kind": {
            kind: {
                "studies": d["studies"],
                **{
                    name: est.as_dict()
                    for name, est in Confusion.from_labels(d["truth"], d["pred"]).metrics().items()
                    if name in ("sensitivity", "specificity")
                },
            }
            for kind, d in sorted(per_kind.items())
        },
        "studies": studies,
        "slices": n_slices,
        "seconds": round(seconds, 1),
    }


def _fmt(e: dict) -> str:
    if e.get("value") is None:
        return "n/a"
    return f"{100 * e['value']:.2f} % ({e['successes']}/{e['total']}; 95 % CI {100 * e['low']:.1f}-{100 * e['high']:.1f})"


def markdown(report: dict) -> str:
    """The Markdown rendering of a quality report."""
    va, les = report["valid_area"], report["lesion_per_slice"]
    targets = report["targets"]
    ok = report["meets_targets"]
    lines = [
        "# Model quality on held-out phantom studies",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit `{report.get('commit', 'unknown')}`; phantom `{report.get('phantom_version', 'unknown')}`; "
        f"{report.get('host', '')}; load average {report.get('load', 'n/a')}; {report.get('seconds', 'n/a')} s.  ",
        f"Models: valid_area sha256 `{report['models']['valid_area']['sha256'][:16]}…`, "
        f"lesion sha256 `{report['models']['lesion']['sha256'][:16]}…`  ",
        f"Studies: {report['n_studies']} (seeds {report['seeds'][0]}..{report['seeds'][1]}, kinds "
        f"{', '.join(report['kinds'])}), {report['slices']} slices; generated {report['created']}.",
        "",
        "Pipeline: ONNX Runtime (valid_area, lesion) + `ctscreen.postprocess.postprocess_batch` (cut-off "
        f"{PROB_CUTOFF}, boxes > {MIN_BOX_AREA} px, valid-area filter): the code Triton runs.",
        "",
        "Per-slice sensitivity here: the share of lesion-positive slices (a lesion with a box over "
        f"{MIN_BOX_AREA} px) given at least one lesion box anywhere on the slice (the box need not touch the "
        "lesion; the share of boxes that do is below).",
        "",
        "## Targets",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
        f"| valid-area box IoU, median | {va['iou_median']:.3f} | >= {targets['valid_iou_median']} "
        f"| {'yes' if ok['valid_iou_median'] else 'NO'} |",
        f"| lesion per-slice sensitivity | {_fmt(les['sensitivity'])} | >= {targets['sensitivity']} "
        f"| {'yes' if ok['sensitivity'] else 'NO'} |",
        f"| lesion per-slice specificity | {_fmt(les['specificity'])} | >= {targets['specificity']} "
        f"| {'yes' if ok['specificity'] else 'NO'} |",
        "",
        "## Valid area",
        "",
        f"IoU over {va['slices_with_lung']} slices with lung: median {va['iou_median']:.3f}, mean "
        f"{va['iou_mean']:.3f}, 10th percentile {va['iou_p10']:.3f}; {100 * va['share_iou_ge_0.90']:.1f} % "
        f"of slices >= 0.90. Slices without lung given a box: {va['no_lung_slices_with_a_box']} of "
        f"{va['no_lung_slices']}.",
        "",
        "## Lesion, per slice",
        "",
        f"Confusion: {les['confusion']}; PPV {_fmt(les['ppv'])}; {les['indeterminate_slices_excluded']} "
        "indeterminate slices (lesion specks of <= 25 px only) left out; predicted boxes touching a true "
        f"lesion: {_fmt(les['boxes_touching_a_true_lesion'])}.",
        "",
        "## False-positive rate per hard-negative class (lesion-negative slices)",
        "",
        "| class | FP rate |",
        "|---|---|",
    ]
    lines += [f"| {c} | {_fmt(e)} |" for c, e in report["false_positive_rate_by_class"].items()]
    lines += ["", "## Per study kind", "", "| kind | studies | sensitivity | specificity |", "|---|---|---|---|"]
    for kind, d in report["per_kind"].items():
        lines.append(f"| {kind} | {d['studies']} | {_fmt(d['sensitivity'])} | {_fmt(d['specificity'])} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=42, help="held-out phantom studies (kinds cycle)")
    p.add_argument("--seed", type=int, default=PHANTOM_EVAL_SEED0, help="first seed")
    p.add_argument("--slices", type=int, default=64, help="slices per study")
    p.add_argument("--valid-area", type=Path, default=REPO_ROOT / "model_repository" / VALID_AREA_MODEL / "1" / "model.onnx")
    p.add_argument("--lesion", type=Path, default=REPO_ROOT / "model_repository" / LESION_MODEL / "1" / "model.onnx")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "models")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.studies < 1 or args.slices < 1:
        p.error("--studies and --slices must be positive")
    for f in (args.valid_area, args.lesion):
        if not f.is_file():
            p.error(f"no such model file: {f}")
    if args.seed < PHANTOM_EVAL_SEED0:
        logger.warning("seed %d is below %d: it may overlap training seeds", args.seed, PHANTOM_EVAL_SEED0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import phantom
    from training.card import sha256_of
    from training.datasets import volume_from_study

    kinds = tuple(phantom.KINDS)

    def volumes():
        for i in range(args.studies):
            study = phantom.make_study(seed=args.seed + i, kind=kinds[i % len(kinds)], n_slices=args.slices)
            vol: Volume = volume_from_study(study)
            logger.info("study %d/%d %s", i + 1, args.studies, vol.case_id)
            yield vol

    t0 = time.perf_counter()
    pipe = ReferencePipeline(args.valid_area, args.lesion, threads=args.threads)
    report = evaluate_volumes(pipe, volumes())
    targets = {"valid_iou_median": 0.90, "sensitivity": 0.90, "specificity": 0.98}
    les = report["lesion_per_slice"]
    report["meets_targets"] = {
        "valid_iou_median": (report["valid_area"]["iou_median"] or 0) >= targets["valid_iou_median"],
        "sensitivity": (les["sensitivity"]["value"] or 0) >= targets["sensitivity"],
        "specificity": (les["specificity"]["value"] or 0) >= targets["specificity"],
    }
    report["targets"] = targets
    report.update(
        {
            **run_stamp("training.evaluate", argv, t0),
            "n_studies": args.studies,
            "seeds": [args.seed, args.seed + args.studies - 1],
            "kinds": list(kinds),
            "phantom_version": phantom_version(),
            "models": {
                name: {"path": str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path),
                       "sha256": sha256_of(path)}
                for name, path in (("valid_area", args.valid_area), ("lesion", args.lesion))
            },
        }
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "quality.md").write_text(markdown(report))
    print(markdown(report))  # noqa: T201
    return 0 if all(report["meets_targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
