"""The labelled set of ``ctscreen eval``: studies on disk with their truth.

A set is a folder of phantom studies as ``ctscreen phantom`` writes them (one folder per study with its
DICOM files and ``manifest.json``, format ``ctscreen-phantom/1``); :func:`make_phantom_set` writes the
held-out phantom set, and :func:`write_nifti_set` writes a NIfTI set (the training layout) as such
studies. :func:`discover` reads the set back as :class:`LabelledCase` records.

Per-image truth: a slice is positive when its lesion mask covers more than ``min_px`` pixels (default
25, the paper's box size), negative when it covers none; slices in between (a lesion's tip) are left
out of the per-image metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.schema import CaseResult
from ctscreen.contracts import MIN_BOX_AREA
from evaluation import EvalError

logger = logging.getLogger(__name__)


@dataclass
class LabelledCase:
    """One study of the set on disk, with its truth."""

    case_id: str
    kind: str
    label: bool
    path: Path
    slice_truth: Callable[[CaseResult], dict[str, bool]]
    """Truth per image for the slices of a result (by SOP Instance UID)."""


def slice_truth_from_manifest(manifest: dict[str, Any], min_px: int = MIN_BOX_AREA) -> Callable[[CaseResult], dict[str, bool]]:
    """Per-image truth of a phantom study (``ctscreen-phantom/1`` manifest).

    The manifest gives the lesion area of each lesion slice by slice index, and for each index its
    SOP Instance UID (``files``) and z position (``z_positions``; the slices are axial, so z is the
    position along the normal). A result slice is matched by SOP Instance UID, or else to the slice
    nearest its ``position_mm`` within half the slice spacing. It is positive above ``min_px`` lesion
    pixels, negative at 0, and left out in between or when it matches no slice.
    """
    zs = np.asarray(manifest.get("z_positions") or [], dtype=float)
    if zs.size == 0:
        return lambda result: {}
    area = np.zeros(len(zs), dtype=int)
    lesion_slices = manifest.get("lesion_slices") or []
    area[np.asarray(lesion_slices, dtype=int)] = np.asarray(manifest.get("lesion_area_px") or [], dtype=int)
    by_uid = {f["sop_instance_uid"]: int(f["index"]) for f in manifest.get("files") or []
              if isinstance(f, dict) and "sop_instance_uid" in f and "index" in f}
    spacing = float(manifest.get("slice_spacing") or (np.median(np.diff(np.sort(zs))) if zs.size > 1 else 1.0))

    def index_of(uid: str, position_mm: float) -> int | None:
        if uid in by_uid:
            return by_uid[uid]
        k = int(np.argmin(np.abs(zs - position_mm)))
        return k if abs(zs[k] - position_mm) <= spacing / 2 else None

    def truth(result: CaseResult) -> dict[str, bool]:
        out = {}
        for f in result.slices:
            k = index_of(f.sop_instance_uid, f.position_mm)
            if k is None or not 0 <= k < len(area):
                continue
            px = int(area[k])
            if px == 0 or px > min_px:
                out[f.sop_instance_uid] = px > min_px
        return out

    return truth


def discover(data: Path, min_px: int = MIN_BOX_AREA) -> list[LabelledCase]:
    """Every labelled study under ``data`` (folders holding a ``manifest.json``), sorted by name."""
    if not data.is_dir():
        raise EvalError(f"--data {data}: not a directory")
    cases = []
    for manifest_path in sorted(data.rglob("manifest.json")):
        folder = manifest_path.parent
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise EvalError(f"{manifest_path}: unreadable manifest ({exc})") from exc
        kind = str(manifest.get("kind", "unknown"))
        label = manifest.get("label")
        if label is None:
            label = kind == "covid"
        cases.append(LabelledCase(
            case_id=str(folder.relative_to(data)) if folder != data else folder.name,
            kind=kind, label=bool(int(label)), path=folder,
            slice_truth=slice_truth_from_manifest(manifest, min_px),
        ))
    if not cases:
        raise EvalError(f"--data {data}: no study with a manifest.json (write one with --make-phantom N)")
    return cases


def make_phantom_set(data: Path, n: int, *, n_slices: int | None = None, encoding: str = "explicit",
                     montage: bool = True) -> None:
    """Write the held-out phantom set: ``n`` studies, seeds from ``PHANTOM_EVAL_SEED0``."""
    import phantom
    from training.datasets import PHANTOM_EVAL_SEED0, phantom_kind

    data.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        kind = phantom_kind(i)
        seed = PHANTOM_EVAL_SEED0 + i
        out = data / f"{i:03d}-{kind}-{seed}"
        if (out / "manifest.json").is_file():
            continue
        study = phantom.make_study(seed, kind=kind, n_slices=n_slices)
        phantom.write_study(study, out, encoding=encoding, montage=montage)
        logger.info("wrote %s", out)


def write_nifti_set(root: Path, out: Path) -> int:
    """Write a NIfTI set (the training layout: volumes plus lesion masks) as DICOM studies under ``out``.

    Each case becomes a folder in the phantom layout (``dicom/``, ``manifest.json``, ``masks/``) written
    by :func:`phantom.write_study`, so that it can travel the serving path like any study: axial slices
    on the 512 grid, positions along +z by the volume's slice spacing, label 1 when the lesion mask is
    not empty. Folders already written are kept. Returns the number of cases.
    """
    import nibabel as nib

    import phantom
    from training.datasets import DataError, load_nifti_case, nifti_cases

    try:
        cases = nifti_cases(root)
    except DataError as exc:
        raise EvalError(str(exc)) from exc
    for case_id, volume, lesion, lung in cases:
        folder = out / case_id
        if (folder / "manifest.json").is_file():
            continue
        try:
            v = load_nifti_case(case_id, volume, lesion, lung)
        except DataError as exc:
            raise EvalError(str(exc)) from exc
        img = nib.as_closest_canonical(nib.load(str(volume)))
        sx, sy, sz = (float(z) for z in img.header.get_zooms()[:3])
        label = int(v.lesion.any())
        study = phantom.Study(
            hu=v.hu, lung_mask=np.zeros(v.hu.shape, bool), lesion_mask=v.lesion,
            finding_mask=np.zeros(v.hu.shape, np.uint8), valid_boxes=np.where(v.valid_boxes < 0, -1, v.valid_boxes),
            kind="covid" if label else "normal", label=label,
            pixel_spacing=(sy * img.shape[1] / v.hu.shape[1], sx * img.shape[0] / v.hu.shape[2]),
            slice_thickness=sz, slice_spacing=sz,
            positions=np.array([[0.0, 0.0, k * sz] for k in range(len(v.hu))]),
            seed=0, rescale_intercept=-1024, pixel_representation=1,
        )
        phantom.write_study(study, folder, salt=case_id, montage=False)
        logger.info("wrote %s", folder)
    return len(cases)


def looks_like_nifti_set(data: Path) -> bool:
    """True when ``data`` holds NIfTI files and no study with a ``manifest.json``."""
    return data.is_dir() and not any(data.rglob("manifest.json")) and any(data.rglob("*.nii*"))
