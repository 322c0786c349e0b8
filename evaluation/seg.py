"""Per-image truth from a DICOM Segmentation (SEG) of a study: the lesion pixels of each slice it references.

A centre's lesion annotations are often DICOM SEG objects (3D Slicer with dcmqi, OHIF, MONAI Label, highdicom
write them), stored beside the images in the PACS. ``ctscreen eval --labels`` takes one as a DICOM study's
``mask``: :func:`read_seg` reads it with highdicom, and :func:`slice_truth_from_seg` gives the per-image truth
of a screened study's slices from it, as :func:`evaluation.dataset.slice_truth_from_manifest` does for a phantom.

Which segments are lesions: every segment whose Segmented Property Category is not an anatomical structure
(SNOMED CT 123037004, or the retired 91723000). A SEG of the lungs and their lesions counts the lesions only; a
SEG of anatomy alone is refused. A fractional SEG counts a pixel above one half.

Slices are matched by SOP Instance UID through the SEG's references to its source images: a referenced slice
without a frame holds no lesion (highdicom, and most tools, leave empty frames out). A slice the SEG does not
reference is left out of the per-image metrics, as is a slice whose lesion area lies between 0 and the
threshold (a lesion's tip). Areas are counted in the image's own pixels, as a phantom's manifest counts them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aggregator.schema import CaseResult
from ctscreen.contracts import MIN_BOX_AREA
from evaluation import EvalError

logger = logging.getLogger(__name__)

__all__ = ["SEGMENTATION_STORAGE", "SegTruth", "is_seg", "read_seg", "slice_truth_from_seg"]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
"""Segmentation Storage's SOP Class UID."""
ANATOMY = {("SCT", "123037004"), ("SRT", "T-D000A"), ("SCT", "91723000")}
"""Segmented Property Category codes of anatomy (Anatomical Structure; its SRT and retired SCT codes): not lesions."""


@dataclass(frozen=True)
class SegTruth:
    """The lesion pixels of each source image a SEG references (0 for one without a frame)."""

    pixels: dict[str, int]
    """Lesion area in the image's pixels, by the source image's SOP Instance UID."""
    segments: list[str] = field(default_factory=list)
    """The labels of the segments counted as lesions."""
    study_instance_uid: str = ""


def is_seg(path: Path) -> bool:
    """Whether ``path`` is a DICOM file of a Segmentation (its header alone is read)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - not DICOM, truncated, unreadable: not a SEG
        return False
    return str(getattr(ds, "SOPClassUID", "")) == SEGMENTATION_STORAGE


def read_seg(path: Path, name: str = "") -> SegTruth:
    """The per-slice lesion areas of the DICOM SEG at ``path`` (``name``: how messages call it).

    Raises
    ------
    EvalError
        Not a DICOM Segmentation, no segment other than anatomy, or no reference to the images it segments.
    """
    import highdicom as hd

    name = name or str(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - highdicom and pydicom refuse a bad file with anything
        raise EvalError(f"mask {name!r} cannot be read as a DICOM Segmentation ({type(exc).__name__}: {exc})") from None
    lesions, labels = [], []
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        category = description.segmented_property_category
        if (category.scheme_designator, category.value) not in ANATOMY:
            lesions.append(number)
            labels.append(str(description.segment_label))
    if not lesions:
        raise EvalError(f"mask {name!r} segments anatomy only (every segment's category is Anatomical Structure): "
                        "no lesion to count")
    sources = [str(sop) for _, _, sop in seg.get_source_image_uids()]
    if not sources:
        raise EvalError(f"mask {name!r} references no source image: its slices cannot be matched to the study's")
    try:
        masks = seg.get_pixels_by_source_instance(sources, segment_numbers=lesions, assert_missing_frames_are_empty=True)
    except Exception as exc:  # noqa: BLE001 - e.g. frames that reference no source image, or several
        raise EvalError(f"mask {name!r}: its frames cannot be matched to the images they segment "
                        f"({type(exc).__name__}: {exc})") from None
    lesion = (masks > 0.5).any(axis=-1) if masks.ndim == 4 else masks > 0.5  # fractional: above one half
    pixels = {sop: int(np.count_nonzero(m)) for sop, m in zip(sources, lesion, strict=True)}
    return SegTruth(pixels, labels, str(getattr(seg, "StudyInstanceUID", "")))


def slice_truth_from_seg(truth: SegTruth, min_px: int = MIN_BOX_AREA, name: str = ""
                         ) -> Callable[[CaseResult], dict[str, bool]]:
    """Per-image truth of a result's slices from a SEG: positive above ``min_px`` lesion pixels,
    negative at 0, left out in between or where the SEG does not reference the slice. A result none of whose
    slices the SEG references (a SEG of another series) is said in the log and counts per patient only."""

    def slice_truth(result: CaseResult) -> dict[str, bool]:
        out = {}
        for f in result.slices:
            px = truth.pixels.get(f.sop_instance_uid)
            if px is not None and (px == 0 or px > min_px):
                out[f.sop_instance_uid] = px > min_px
        if result.slices and not any(f.sop_instance_uid in truth.pixels for f in result.slices):
            logger.warning("mask %s references none of the %d screened slices (a segmentation of another series?): "
                           "this study counts per patient only", name or "(SEG)", len(result.slices))
        return out

    return slice_truth
