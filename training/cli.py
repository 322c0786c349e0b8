"""``ctscreen train`` and ``ctscreen export``.

Examples
--------
Train the lite lesion model on phantom studies generated on the fly, then ship it::

    ctscreen train lesion --profile lite --data phantom --studies 48 --steps 3000 --out runs/lesion
    ctscreen export lesion --checkpoint runs/lesion/best.ckpt

Retrain on a NIfTI set (COVID-19-CT-Seg / MosMedData layout, see :mod:`training.datasets`)::

    ctscreen train lesion --profile paper --data nifti:/data/covid19-ct-seg --out runs/lesion-paper
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ctscreen.cliargs import positive
from ctscreen.contracts import LESION_MODEL, VALID_AREA_MODEL

TASK_ALIASES = {"valid-area": VALID_AREA_MODEL, "valid_area": VALID_AREA_MODEL, "lesion": LESION_MODEL}
REPO_ROOT = Path(__file__).resolve().parents[1]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits with status 2."""

    def error(self, message: str):  # noqa: D401
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _task(value: str) -> str:
    if value not in TASK_ALIASES:
        raise argparse.ArgumentTypeError(f"task must be valid-area or lesion, got {value!r}")
    return TASK_ALIASES[value]


def _torch_or_exit(prog: str) -> None:
    try:
        import segmentation_models_pytorch  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"{prog}: error: needs the train extra (pip install '.[train]'): {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def train_main(argv: list[str]) -> int:
    """``ctscreen train valid-area|lesion``: train one network; see ``--help``."""
    p = _Parser(prog="ctscreen train", description="Train the valid-area or lesion UNet++.")
    p.add_argument("task", type=_task, help="valid-area or lesion")
    p.add_argument("--profile", choices=("lite", "paper"), default="lite")
    p.add_argument(
        "--data",
        default="phantom",
        help="'phantom' (studies generated on the fly), 'phantom:DIR' (study folders written by "
        "`ctscreen phantom`), 'nifti:DIR' (volumes + lesion masks [+ lung masks]), 'real[:DIR]' (the "
        "real-CT JPEG collection, default ../shared/data/real-ct) or several joined by '+', e.g. "
        "real+phantom; default phantom",
    )
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<task>-<profile>)")
    p.add_argument("--studies", type=positive(int), default=48, help="phantom studies to train on")
    p.add_argument("--slices", type=positive(int), default=64, help="slices per phantom study")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, sampling and phantom studies")
    p.add_argument("--steps", type=positive(int), default=2000, help="optimiser steps in all")
    p.add_argument("--batch", type=positive(int), default=8)
    p.add_argument("--lr", type=positive(float), default=2e-3)
    p.add_argument(
        "--crop",
        type=positive(int),
        default=None,
        help="train on windows of this size at the net's input resolution (e.g. 128 for the lite "
        "lesion net at 256): ~4x cheaper per step; default whole slices",
    )
    p.add_argument(
        "--hard-negatives",
        type=float,
        default=0.0,
        help="weight of the hardest 1%% of background pixels (online hard-negative mining; e.g. 1.0)",
    )
    p.add_argument(
        "--no-jpeg",
        action="store_true",
        help="no JPEG round trip in the augmentation (version 2.0.0 was trained before it existed)",
    )
    p.add_argument(
        "--noise-hu",
        type=float,
        default=25.0,
        help="the strongest Gaussian noise of the augmentation, in HU (default 25, as version 2.0.0)",
    )
    p.add_argument(
        "--textured-noise",
        action="store_true",
        help="correlate half of the slices' augmentation noise over about a pixel (low-dose CT texture)",
    )
    p.add_argument(
        "--max-slices",
        type=positive(int),
        default=None,
        help="at most this many slices per training volume (evenly spaced)",
    )
    p.add_argument(
        "--arch",
        default=None,
        help="another network than the profile's, ENCODER:DEPTH:W1,W2,...[@SIZE] "
        "(e.g. mobilenet_v2:5:64,48,32,16,8): capacity candidates",
    )
    p.add_argument("--val-every", type=positive(int), default=250, help="steps between validations")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    _torch_or_exit(p.prog)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    import torch

    from training import datasets
    from training.nets import parse_arch
    from training.train import TrainConfig, train

    if args.device is not None:  # before any data is read: a bad device is one line, not a traceback
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            p.error(f"--device {args.device!r}: {exc}")
        if device.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA device is available here")

    try:
        source = datasets.parse_source(args.data)
        spec = parse_arch(args.arch, args.task, args.profile) if args.arch else None
    except ValueError as exc:
        p.error(str(exc))
    out = args.out or REPO_ROOT / "runs" / f"{args.task}-{args.profile}"
    if args.resume and not (out / "last.ckpt").is_file():
        p.error(f"--resume: no checkpoint at {out / 'last.ckpt'}")
    cfg = TrainConfig(
        task=args.task,
        profile=args.profile,
        source=source,
        out=out,
        studies=args.studies,
        slices=args.slices,
        seed=args.seed,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        crop=args.crop,
        hard_negatives=args.hard_negatives,
        jpeg=not args.no_jpeg,
        noise_hu=args.noise_hu,
        textured_noise=args.textured_noise,
        max_slices_per_volume=args.max_slices,
        val_every=args.val_every,
        resume=args.resume,
        device=args.device,
        threads=args.threads,
        progress=not args.quiet,
        spec=spec,
    )
    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def export_main(argv: list[str]) -> int:
    """``ctscreen export``: checkpoint -> ONNX + model card; see ``--help``."""
    p = _Parser(prog="ctscreen export", description="Export a checkpoint to ONNX with its model card.")
    p.add_argument("task", type=_task, help="valid-area or lesion")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a .ckpt written by `ctscreen train`")
    src.add_argument("--untrained", action="store_true", help="export fresh random weights")
    src.add_argument(
        "--card-only",
        action="store_true",
        help="only put --metrics into the card beside --out (the ONNX file is left as it is)",
    )
    p.add_argument("--profile", choices=("lite", "paper"), default="lite", help="with --untrained")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="ONNX path (default model_repository/<task>/1/model.onnx; the card goes beside it)",
    )
    p.add_argument("--version", default=None, help="model card version (default from the checkpoint)")
    p.add_argument("--metrics", type=Path, default=None, help="JSON of metrics to put into the card")
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="JSON written by `python -m training.calibrate` (its logit_offset goes into the graph)",
    )
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-parity", action="store_true", help="skip the torch vs ORT check")
    args = p.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        p.error(f"--checkpoint: no such file: {args.checkpoint}")
    if args.metrics is not None and not args.metrics.is_file():
        p.error(f"--metrics: no such file: {args.metrics}")
    calibration = None
    if args.calibration is not None:
        try:
            calibration = json.loads(args.calibration.read_text())
            float(calibration["logit_offset"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            p.error(f"--calibration {args.calibration}: not a calibration file ({exc})")
    if args.opset < 17:
        p.error(f"--opset must be 17 or later, got {args.opset}")
    out = args.out or REPO_ROOT / "model_repository" / args.task / "1" / "model.onnx"
    if args.card_only:
        from training.card import card_metrics, update_card_metrics

        if args.metrics is None:
            p.error("--card-only needs --metrics")
        try:
            jpath, _ = update_card_metrics(out, card_metrics(args.task, json.loads(args.metrics.read_text())))
        except (FileNotFoundError, ValueError) as exc:
            print(f"{p.prog}: error: {exc}", file=sys.stderr)
            return 2
        print(f"updated {jpath}")
        return 0
    try:  # before the slow torch import: an --out that cannot be written fails at once, in one line
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(f"{out.parent} is not writable")
        metrics = json.loads(args.metrics.read_text()) if args.metrics else None
    except OSError as exc:
        p.error(f"--out {out}: {exc.strerror or exc}")
    except ValueError as exc:
        p.error(f"--metrics {args.metrics}: not JSON ({exc})")
    _torch_or_exit(p.prog)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    from training.export import export_checkpoint

    try:
        info = export_checkpoint(
            task=args.task,
            checkpoint=args.checkpoint,
            profile=args.profile,
            out=out,
            version=args.version,
            metrics=metrics,
            opset=args.opset,
            check_parity=not args.no_parity,
            calibration=calibration,
        )
    except (ValueError, KeyError, OSError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0
