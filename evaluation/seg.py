"""Per-image truth from a DICOM Segmentation (SEG) of a study: the lesion pixels of each slice it references.

A centre's lesion annotations are often DICOM SEG objects (3D Slicer with dcmqi, OHIF, MONAI Label, highdicom
write them), stored beside the images in the PACS. ``ctscreen eval --labels`` takes one as a DICOM study's
``mask``: :func:`read_seg` reads it with highdicom (a binary, fractional or label-map SEG), and
:func:`slice_truth_from_seg` gives the per-image truth of a screened study's slices from it, as
:func:`evaluation.dataset.slice_truth_from_manifest` does for a phantom.

Which segments are lesions (:func:`lesion_segments`): those named by ``--lesion-segments`` (segment labels or
property types, any case) when it is given; else every segment that is not anatomy: neither its Segmented
Property Category (Anatomical Structure, SNOMED CT 123037004 or the retired 91723000) nor its Segmented
Property Type (the lungs, their lobes, the airways, the body, the heart: :data:`ORGAN_TYPES`) says so. Tools
file segments differently (a converter may put the lungs under "Tissue"; MONAI Label's writer puts every
segment, lesions included, under Anatomical Structure), so the report names the segments it counted, and a
SEG whose every segment is anatomy is refused with their labels, to be named with ``--lesion-segments``.

Slices are matched by SOP Instance UID through the SEG's references to its source images: a referenced slice
without a frame holds no lesion (highdicom, and most tools, leave empty frames out). A slice the SEG does not
reference is left out of the per-image metrics, as is a slice whose lesion area lies between 0 and the
threshold (a lesion's tip). Areas are counted in the image's own pixels, as a phantom's manifest counts them.
A fractional SEG counts a pixel above one half.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.schema import CaseResult
from ctscreen.contracts import MIN_BOX_AREA
from evaluation import EvalError

logger = logging.getLogger(__name__)

__all__ = ["ORGAN_TYPES", "SEG_SOP_CLASSES", "SegTruth", "is_seg", "lesion_segments", "read_seg",
           "slice_truth_from_seg"]

SEG_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
                   "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage"}
ANATOMY = {("SCT", "123037004"), ("SRT", "T-D000A"), ("SCT", "91723000")}
"""Segmented Property Category codes of anatomy (Anatomical Structure; its SRT and retired SCT codes)."""
ORGAN_TYPES = {
    "39607008": "lung", "181216001": "entire lung", "3341006": "right lung", "44029006": "left lung",
    "45653009": "upper lobe of lung", "90572001": "lower lobe of lung", "42400003": "upper lobe of right lung",
    "72481006": "middle lobe of right lung", "266005": "lower lobe of right lung", "44714003": "upper lobe of left lung",
    "41224006": "lower lobe of left lung", "3120008": "pleura", "44788007": "right pleura", "53727004": "left pleura",
    "44567001": "trachea", "955009": "bronchus", "89187006": "airway", "80891009": "heart", "76752008": "breast",
    "51185008": "thorax", "43799004": "thoracic cavity", "38266002": "entire body", "123037004": "body structure",
}
"""SNOMED CT Segmented Property Types of anatomy in a chest CT's SEG: never counted as lesions by default."""
_BATCH = 16
"""Source images whose frames are decoded at once (a 600-slice SEG of four segments is not held whole)."""


@dataclass(frozen=True)
class SegTruth:
    """The lesion pixels of each source image a SEG references (0 for one without a frame)."""

    pixels: dict[str, int]
    """Lesion area in the image's pixels, by the source image's SOP Instance UID."""
    segments: list[str] = field(default_factory=list)
    """The labels of the segments counted as lesions."""
    study_instance_uid: str = ""


def is_seg(path: Path) -> bool:
    """Whether ``path`` is a DICOM file of a Segmentation (binary, fractional or label map; its header alone is read)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - not DICOM, truncated, unreadable: not a SEG
        return False
    return str(getattr(ds, "SOPClassUID", "")) in SEG_SOP_CLASSES


def _words(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def lesion_segments(described: Sequence[tuple[int, str, tuple[str, str], tuple[str, str, str]]],
                    named: Sequence[str] = ()) -> list[int]:
    """The numbers of the lesion segments among ``(number, label, (category scheme, code), (type scheme, code,
    meaning))``: those whose label or type meaning is one of ``named`` (any case, ``_`` and ``-`` as spaces) when
    given, else those that are not anatomy by category or type (the module docstring).

    >>> lungs = (1, "lungs", ("SCT", "85756007"), ("SCT", "39607008", "Lung"))  # lungs filed under Tissue
    >>> ggo = (2, "GGO", ("SCT", "49755003"), ("SCT", "52988006", "Lesion"))
    >>> all_anatomy = (3, "infection", ("SCT", "123037004"), ("SCT", "52988006", "Lesion"))  # MONAI Label's way
    >>> lesion_segments([lungs, ggo, all_anatomy]), lesion_segments([lungs, all_anatomy], ["Infection"])
    ([2], [3])
    """
    if named:
        wanted = {_words(n) for n in named}
        return [n for n, label, _, kind in described if _words(label) in wanted or _words(kind[2]) in wanted]
    return [n for n, _, category, kind in described
            if category not in ANATOMY and not (kind[0] == "SCT" and kind[1] in ORGAN_TYPES)]


@contextlib.contextmanager
def _highdicom_quiet() -> Iterator[None]:
    """highdicom's own warnings (one per frame of a SEG it cannot place) held back: the caller says what is wrong
    in one line."""
    quiet = [logging.getLogger(name) for name in ("highdicom", "pydicom")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)


def _expected_bytes(ds: Any) -> int | None:
    """What a native (uncompressed) SEG's Pixel Data must hold, in bytes; None when compressed."""
    if getattr(ds, "file_meta", None) is None or ds.file_meta.get("TransferSyntaxUID", "") not in (
            "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        return None
    bits = (int(getattr(ds, "NumberOfFrames", 1) or 1) * int(ds.Rows) * int(ds.Columns)
            * int(getattr(ds, "BitsAllocated", 1) or 1))
    return (bits + 7) // 8


def read_seg(path: Path, name: str = "", named: Sequence[str] = ()) -> SegTruth:
    """The per-slice lesion areas of the DICOM SEG at ``path`` (``name``: how messages call it; ``named``: the
    lesion segments' labels or types, ``--lesion-segments``).

    Raises
    ------
    EvalError
        Not a DICOM Segmentation, cut short, no lesion segment, or no reference to the images it segments.
    """
    import highdicom as hd

    name = name or str(path)
    with _highdicom_quiet():
        try:
            seg = hd.seg.segread(path)
        except Exception as exc:  # noqa: BLE001 - highdicom and pydicom refuse a bad file with anything
            raise EvalError(f"mask {name!r} cannot be read as a DICOM Segmentation ({type(exc).__name__}: {exc})"
                            ) from None
        expected = _expected_bytes(seg)
        held = len(seg.get("PixelData", b"") or b"")
        if expected is not None and held < expected:
            raise EvalError(f"mask {name!r} is cut short: its pixel data holds {held} of the {expected} bytes its "
                            "frames need (copy it again)")
        described = []
        for number in seg.segment_numbers:
            d = seg.get_segment_description(number)
            category, kind = d.segmented_property_category, d.segmented_property_type
            described.append((number, str(d.segment_label), (category.scheme_designator, category.value),
                              (kind.scheme_designator, kind.value, kind.meaning)))
        lesions = lesion_segments(described, named)
        labels = [label for n, label, _, _ in described if n in lesions]
        if not lesions:
            held_labels = ", ".join(repr(label) for _, label, _, _ in described) or "none"
            if named:
                raise EvalError(f"mask {name!r} has no segment named {', '.join(map(repr, named))} (its segments: "
                                f"{held_labels})")
            raise EvalError(f"mask {name!r} segments anatomy only (its segments: {held_labels}); if some are the "
                            "lesions, name them with --lesion-segments")
        if "ReferencedSeriesSequence" not in seg:
            raise EvalError(f"mask {name!r} has no Referenced Series Sequence: the images it segments are not named, "
                            "so its slices cannot be matched to the study's")
        sources = [str(sop) for _, _, sop in seg.get_source_image_uids()]
        if not sources:
            raise EvalError(f"mask {name!r} references no source image: its slices cannot be matched to the study's")
        pixels: dict[str, int] = {}
        try:
            for at in range(0, len(sources), _BATCH):  # a batch of source images at a time: bounded memory
                batch = sources[at : at + _BATCH]
                masks = seg.get_pixels_by_source_instance(batch, segment_numbers=lesions,
                                                          assert_missing_frames_are_empty=True)
                lesion = (masks > 0.5).any(axis=-1) if masks.ndim == 4 else masks > 0.5  # fractional: above one half
                pixels.update((sop, int(np.count_nonzero(m))) for sop, m in zip(batch, lesion, strict=True))
        except Exception as exc:  # noqa: BLE001 - e.g. frames that reference no source image, or several
            raise EvalError(f"mask {name!r}: its frames cannot be matched to the images they segment "
                            f"({type(exc).__name__}: {exc})") from None
    return SegTruth(pixels, labels, str(getattr(seg, "StudyInstanceUID", "")))


def slice_truth_from_seg(truth: SegTruth, min_px: int = MIN_BOX_AREA, name: str = ""
                         ) -> Callable[[CaseResult | None], dict[str, bool]]:
    """Per-image truth of a result's slices from a SEG: positive above ``min_px`` lesion pixels, negative at 0,
    left out in between or where the SEG does not reference the slice. A result none of whose slices the SEG
    references (a SEG of another series) is said in the log (``name``: the study and its line) and counts per
    patient only. Given None (the study failed), the truth of every slice the SEG references."""

    def slice_truth(result: CaseResult | None) -> dict[str, bool]:
        uids = list(truth.pixels) if result is None else [f.sop_instance_uid for f in result.slices]
        out = {}
        for uid in uids:
            px = truth.pixels.get(uid)
            if px is not None and (px == 0 or px > min_px):
                out[uid] = px > min_px
        if result is not None and result.slices and not any(f.sop_instance_uid in truth.pixels for f in result.slices):
            logger.warning("%s: the mask references none of the %d screened slices (a segmentation of another series "
                           "than the one screened?): this study counts per patient only", name or "(SEG)",
                           len(result.slices))
        return out

    return slice_truth
