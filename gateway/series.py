"""Choose the series to screen and put its slices in anatomical order.

Selection (:func:`select_series`): every frame is first checked on its own against
:class:`SeriesRules` (:func:`frame_exclusion` gives the reason a frame is left out: ``not_axial``,
``not_original``, ``localizer``, ``thickness``, ``no_geometry``); frames are grouped by Series
Instance UID; within a series, frames whose orientation differs from the series' own are left
out (``orientation_mismatch``); then the chest over any other body part, by the series' own name (Series
Description, Body Part Examined), its positions against a series so named, or its protocol (:func:`region`,
:class:`SeriesLabels`); among chest series, a lung reconstruction that covers the chest (:func:`kernel_class`,
:func:`lung_rank`); then the most distinct slice positions, thinner slices, the lower Series Number, the UID (so
the choice is deterministic). With no body part named anywhere, the most positions win, as they always did.

Ordering (:func:`sort_slices`): the slice normal is ``n = row_cosines x col_cosines`` from Image
Orientation (Patient), turned toward the head (its z component made non-negative); each slice's position
is ``ImagePositionPatient . n`` (mm): an axial slice's patient z, the table position a PACS shows, for a
feet-first or a prone series as for a head-first supine one (the normal of a feet-first series points to
the feet, and its positions read -z: the page and the message gave 93.8 mm for the slice a PACS showed at
-93.75). Slices are sorted by that position, ascending (feet to head); Instance Number
and file order are ignored. Slices at the same position (within :attr:`SeriesRules.duplicate_tol_mm`)
are duplicates: one is kept (the lowest ``(instance number, SOP UID, frame)``) and the others are
reported. Gaps (a step much larger than the spacing) are not looked for here: the aggregator decides
them, once, under the job's case rule (:func:`aggregator.case.decide`, ``CaseRule.gap_tolerance``).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from pydicom.dataset import Dataset

from gateway.dicom import CT_SOP_CLASSES, FrameHeader, joined_text

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_POSITION_MM",
    "Region",
    "SeriesLabels",
    "SeriesRules",
    "SeriesSelection",
    "SortedSeries",
    "frame_exclusion",
    "kernel_class",
    "lung_rank",
    "lung_reconstruction",
    "region",
    "select_series",
    "series_labels",
    "slice_normal",
    "sort_slices",
]


@dataclass(frozen=True)
class SeriesRules:
    """Which frames may be screened; every rule can be switched off.

    Attributes
    ----------
    modalities : frozenset[str]
        Accepted (0008,0060) Modality values.
    require_axial : bool
        Keep only slices whose normal is within ``axial_tolerance_deg`` of the patient's
        head-feet axis.
    axial_tolerance_deg : float
        Largest tilt accepted (gantry tilt is usually < 30 degrees).
    require_original_primary : bool
        Image Type must start with ``ORIGINAL\\PRIMARY`` (reformats and screenshots are left out).
    exclude_localizer : bool
        Leave out frames whose Image Type holds ``LOCALIZER`` (scouts, topograms).
    min_slice_thickness_mm, max_slice_thickness_mm : float | None
        Accepted Slice Thickness range; ``None`` disables a bound. Frames without thickness pass.
    duplicate_tol_mm : float
        Two slices closer than this along the normal are at the same position.
    min_matrix : int
        Smallest Rows and Columns of a slice to screen (a smaller frame is an icon, not a CT slice).
    """

    modalities: frozenset[str] = frozenset({"CT"})
    require_axial: bool = True
    axial_tolerance_deg: float = 30.0
    require_original_primary: bool = True
    exclude_localizer: bool = True
    min_slice_thickness_mm: float | None = 0.0
    max_slice_thickness_mm: float | None = 10.0
    duplicate_tol_mm: float = 0.01
    min_matrix: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.axial_tolerance_deg <= 90:
            raise ValueError(
                f'Argument "axial_tolerance_deg" must be in [0, 90], got {self.axial_tolerance_deg}.'
            )
        lo, hi = self.min_slice_thickness_mm, self.max_slice_thickness_mm
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(
                f'Argument "min_slice_thickness_mm" ({lo}) must not exceed "max_slice_thickness_mm" ({hi}).'
            )
        if self.duplicate_tol_mm < 0:
            raise ValueError(f'Argument "duplicate_tol_mm" must be >= 0, got {self.duplicate_tol_mm}.')


@dataclass
class SortedSeries:
    """Slices in anatomical order with what was found on the way."""

    slices: list[FrameHeader]
    positions_mm: np.ndarray
    """float64 [Z], ascending, along :attr:`normal`."""
    normal: tuple[float, float, float]
    spacing_mm: float | None
    """Median step between kept slices (``None`` with fewer than 2 slices)."""
    duplicates: list[FrameHeader] = field(default_factory=list)


@dataclass
class SeriesSelection:
    """The chosen series and everything left out, with reasons."""

    series_instance_uid: str
    chosen: list[FrameHeader]
    excluded: list[tuple[FrameHeader, str, str]]
    """``(frame, reason, message)`` for frames of any series that broke a rule."""
    other_series: dict[str, int]
    """Series Instance UID -> number of usable frames, for series that lost."""
    derived: tuple[str, ...] | None = None
    """The Image Type screened when no ORIGINAL\\PRIMARY frame was usable and a plain derived axial stack
    was taken instead (:func:`select_series`); ``None`` otherwise."""


MAX_POSITION_MM = 1e5
"""Image Position (Patient) farther than this (100 m) from the origin in any axis is no scanner's: the frame has
no usable geometry (values near the float maximum overflowed the position arithmetic into a 503)."""


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal ``row_cosines x col_cosines`` of Image Orientation (Patient).

    >>> slice_normal((1, 0, 0, 0, 1, 0)).tolist()
    [0.0, 0.0, 1.0]
    >>> slice_normal((1e308, 0, 0, 0, 1e308, 0))
    Traceback (most recent call last):
    ValueError: Image Orientation (Patient) holds no direction cosines: its row and column directions are 1e+308 and 1e+308 long, not 1.

    Raises
    ------
    ValueError
        The orientation does not have 6 values, a direction is not a unit vector (its length off 1 by more
        than a half), or its two directions are (nearly) parallel.
    """
    if len(orientation) != 6:
        raise ValueError(f'Argument "orientation" must have 6 values, got {len(orientation)}.')
    # plain floats: np.cross costs ~35 us on 3-vectors, and every frame of an upload asks (twice)
    r0, r1, r2, c0, c1, c2 = (float(v) for v in orientation)
    row_len, col_len = math.hypot(r0, r1, r2), math.hypot(c0, c1, c2)
    if not (0.5 < row_len < 1.5 and 0.5 < col_len < 1.5):
        raise ValueError(f"Image Orientation (Patient) holds no direction cosines: its row and column directions "
                         f"are {row_len:.3g} and {col_len:.3g} long, not 1.")
    n = (r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0)
    norm = math.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2])
    if norm < 1e-3:
        raise ValueError('Argument "orientation" has parallel row and column directions.')
    return np.array(n, dtype=np.float64) / norm


def frame_exclusion(h: FrameHeader, rules: SeriesRules) -> tuple[str, str] | None:
    """Return ``(reason, message)`` when a frame breaks a rule on its own, else ``None``."""
    if h.modality not in rules.modalities:
        return "not_ct", f"Modality {h.modality!r} not in {sorted(rules.modalities)}."
    if rules.exclude_localizer and "LOCALIZER" in h.image_type:
        return "localizer", "Localizer (scout) image."
    if rules.require_original_primary and tuple(h.image_type[:2]) != ("ORIGINAL", "PRIMARY"):
        shown = "\\".join(h.image_type) or "absent"
        return "not_original", f"Image Type {shown} is not ORIGINAL\\PRIMARY."
    if h.orientation is None or h.position is None:
        return "no_geometry", "Image Orientation/Position (Patient) missing: slices cannot be ordered."
    if any(abs(v) > MAX_POSITION_MM for v in h.position):
        return "no_geometry", f"Image Position (Patient) lies over {MAX_POSITION_MM:g} mm from the origin: no scanner's."
    try:
        n = slice_normal(h.orientation)
    except ValueError as exc:
        return "no_geometry", str(exc)
    if rules.require_axial:
        tilt = math.degrees(math.acos(min(1.0, abs(float(n[2])))))
        if tilt > rules.axial_tolerance_deg:
            return "not_axial", f"Slice normal is {tilt:.0f} degrees from the head-feet axis (not axial)."
    t = h.slice_thickness
    if t is not None:
        lo, hi = rules.min_slice_thickness_mm, rules.max_slice_thickness_mm
        if (lo is not None and t < lo) or (hi is not None and t > hi):
            return "thickness", f"Slice Thickness {t:g} mm outside [{lo}, {hi}] mm."
    if min(h.rows, h.cols) < rules.min_matrix:
        return "too_small", (f"{h.rows}x{h.cols} pixels is too small for a CT slice "
                             f"(at least {rules.min_matrix}x{rules.min_matrix}).")
    return None


_PROCESSED = ("MPR", "MIP", "MINIP", "MNIP", "REFORMAT", "PROJECTION", "VOLUME", "3D", "CURVED", "CPR", "VRT",
              "SSD", "PERFUSION", "SUBTRACT", "MAP", "LOCALIZER", "SECONDARY CAPTURE")


def _plain_axial_stack(h: FrameHeader) -> bool:
    """Whether a frame that is not ORIGINAL\\PRIMARY may still be a plain axial reconstruction: a CT image
    class, and an Image Type that is absent or says AXIAL and names no reformat, projection or map."""
    if h.sop_class_uid not in CT_SOP_CLASSES:
        return False
    if not h.image_type:
        return True
    values = [v.strip().upper() for v in h.image_type]
    return len(values) >= 3 and values[2] == "AXIAL" and not any(m in v for v in values for m in _PROCESSED)


ORIENTATION_TOLERANCE_DEG = 1.0
"""Frames of one series whose row and column directions agree within this share its main orientation."""


def _main_orientation(group: Sequence[FrameHeader]) -> np.ndarray:
    """Whether each frame lies within :data:`ORIENTATION_TOLERANCE_DEG` of the orientation most frames share.

    By angle, not by rounded cosines: rounding split a series whose cosines straddled a rounding step
    (0.00499 and 0.00501) into two orientations, and dropped half its slices."""
    cosines = np.array([h.orientation for h in group], dtype=np.float64).reshape(len(group), 2, 3)
    cosines /= np.maximum(np.linalg.norm(cosines, axis=2, keepdims=True), 1e-12)
    limit = math.cos(math.radians(ORIENTATION_TOLERANCE_DEG))
    _, first = np.unique(np.round(cosines.reshape(len(group), 6), 3), axis=0, return_index=True)
    best: np.ndarray | None = None
    for i in first[:64]:  # one candidate per distinct orientation (a series has one, or a few)
        near = np.all(np.einsum("nij,ij->ni", cosines, cosines[i]) >= limit, axis=1)
        if best is None or near.sum() > best.sum():
            best = near
    assert best is not None
    return best


_LUNG_WORDS = re.compile(r"lung|hrct", re.IGNORECASE)

SHARP, SOFT = "sharp", "soft"
"""The two classes of :func:`kernel_class`: a sharp (high spatial frequency) kernel, the lung and bone kernels
HRCT is reconstructed with, and a soft-tissue (smooth or standard) kernel."""

_SIEMENS_KERNEL = re.compile(r"(?P<family>B[rlvfs]?|H[rcf]?|[IJDU]|Qr?)(?P<number>\d\d)[a-z]{0,2}", re.IGNORECASE)
"""Siemens: a family (B body, Br/Bv/Bf/Bs ADMIRE body, Bl lung, H/Hr head, I/J SAFIRE, Q quantitative, U ultra-high
resolution), a two-digit sharpness and optional letters (B70f, Br64d, I30f, Bl57)."""
_CANON_KERNEL = re.compile(r"F(?P<family>[CL])(?P<number>\d\d)", re.IGNORECASE)
"""Canon/Toshiba: FC01-FC18 soft body, FC50-FC89 lung and high resolution; FL01-FL99 lung."""
_PHILIPS_KERNELS = {"A": SOFT, "B": SOFT, "C": SOFT, "CB": SOFT, "UA": SOFT, "UB": SOFT, "UC": SOFT,
                    "D": SHARP, "E": SHARP, "L": SHARP, "YA": SHARP, "YB": SHARP, "YC": SHARP, "YD": SHARP, "YE": SHARP}
"""Philips names a kernel by letters only, matched as the whole value: A, B, C (smooth to standard body), CB
(cardiac), UA-UC (brain); D, E (sharp, bone), L and YA-YE (lung)."""
_SHARP_WORDS = re.compile(r"(?<![A-Z])(LUNG|HRCT|BONE|EDGE|SHARP|ULTRA)", re.IGNORECASE)
"""GE (LUNG, BONE, BONEPLUS, EDGE, ULTRA, their HD variants), Canon AiCE (Lung, Body Sharp), United Imaging (B_SHARP_C)."""
_SOFT_WORDS = re.compile(r"(?<![A-Z])(STANDARD|STND|STD|SOFT|SMOOTH|DETAIL|BODY)", re.IGNORECASE)
"""GE (STANDARD, SOFT, DETAIL), Canon AiCE (Body), United Imaging (B_SOFT_B); checked after the sharp words."""
SHARP_FROM, SOFT_UP_TO = 50, 40
"""A numbered kernel (Siemens, Canon FC) is sharp from 50 (Siemens' lung family Bl56-Bl64 among them) and soft up to
40; between them (B45f, B46f: medium) it is neither."""
CANON_SOFT_UP_TO = 18
"""Canon's soft body kernels are FC01-FC18; FC19-FC49 (head, bone) are not guessed."""


def _numbered_kernel(value: str) -> str | None:
    """The class of a Siemens or Canon kernel code (the whole ``value``); ``None`` when it is neither or medium."""
    m = _SIEMENS_KERNEL.fullmatch(value)
    if m is not None:
        number = int(m["number"])
    else:
        m = _CANON_KERNEL.fullmatch(value)
        if m is None:
            return None
        number = int(m["number"])
        if m["family"].upper() == "L":
            return SHARP
        if CANON_SOFT_UP_TO < number < SHARP_FROM or number > 89:
            return None  # FC19-FC49: head and bone kernels, not guessed
    if number >= SHARP_FROM:
        return SHARP
    return SOFT if number <= SOFT_UP_TO else None


def kernel_class(kernel: str) -> str | None:
    r"""Whether a Convolution Kernel (0018,1210; several values joined by a backslash, as
    :attr:`FrameHeader.convolution_kernel`) is :data:`SHARP` or :data:`SOFT`; ``None`` when no value says.

    The first value that says decides (Siemens adds its ADMIRE strength, Canon its AIDR level, as further values).

    >>> [kernel_class(k) for k in ("B70f", "Br64\\3", "I70f", "Bl57", "FC86", "YA", "BONEPLUS", "HD LUNG")]
    ['sharp', 'sharp', 'sharp', 'sharp', 'sharp', 'sharp', 'sharp', 'sharp']
    >>> [kernel_class(k) for k in ("B30f", "Br40\\3", "I30f", "Bv40", "FC13\\AIDR 3D", "B", "STANDARD", "")]
    ['soft', 'soft', 'soft', 'soft', 'soft', 'soft', 'soft', None]
    >>> kernel_class("B46f"), kernel_class("CHEST"), kernel_class("T20f")
    (None, None, None)
    """
    for raw in kernel.split("\\"):
        value = raw.strip()
        found = _numbered_kernel(value) or _PHILIPS_KERNELS.get(value.upper())
        if found is None and _SHARP_WORDS.search(value):
            found = SHARP
        if found is None and _SOFT_WORDS.search(value):
            found = SOFT
        if found is not None:
            return found
    return None


def _kernel_of(h: FrameHeader) -> str | None:
    """The class of a frame's kernel: its Convolution Kernel's, else a Siemens or Canon kernel code its Series
    Description names (``Thorax 1.0 I70f``; letters and words in a description are no kernel)."""
    return kernel_class(h.convolution_kernel) or next(
        (c for word in re.split(r"[\s_,;()/]+", h.series_description) if (c := _numbered_kernel(word))), None)


def lung_rank(h: FrameHeader) -> int:
    """How surely a frame's series is a lung reconstruction, by its own account: 2 when its kernel is sharp
    (:func:`kernel_class`: a lung or bone kernel, ``Br64``, ``I70f``, ``LUNG``, ``YA``, ``FC86``; from its Convolution
    Kernel, else a kernel code in its Series Description); 1 when only its Series Description names the lung or
    HRCT (``Lung 1.0``) and its kernel is not soft (``Br40``, ``B30f``, ``STANDARD``, ``FC13``: a kernel outranks
    a protocol's name, such as LungCARE's soft series); else 0. A pulmonary angiogram (CTPA) is no lung
    reconstruction by its name.

    >>> from dataclasses import replace
    >>> h = FrameHeader("f", None, "1.2", "", "1", "2", 3, "Thorax 1.0 B30f", "CT", (), None, None, 1.0, None, None,
    ...                 512, 512, 1.0, -1024.0, "")
    >>> lung_rank(h), lung_rank(replace(h, series_description="Lung 1.0")), lung_rank(replace(h, convolution_kernel="LUNG"))
    (0, 1, 2)
    >>> lung_rank(replace(h, series_description="LungCARE 1.0 Br40", convolution_kernel="Br40"))
    0
    >>> lung_rank(replace(h, series_description="Thorax 1.0 I70f")), lung_rank(replace(h, convolution_kernel="Br64\\\\3"))
    (2, 2)
    """
    kernel = _kernel_of(h)
    if kernel == SHARP:
        return 2
    if _LUNG_WORDS.search(h.series_description) and kernel != SOFT:
        return 1
    return 0


def lung_reconstruction(h: FrameHeader) -> bool:
    """Whether a frame's series calls itself a lung reconstruction (:func:`lung_rank` above 0).

    >>> from dataclasses import replace
    >>> h = FrameHeader("f", None, "1.2", "", "1", "2", 3, "Pulmonary angio 1.0", "CT", (), None, None, 1.0, None,
    ...                 None, 512, 512, 1.0, -1024.0, "", convolution_kernel="Br36")
    >>> lung_reconstruction(h), lung_reconstruction(replace(h, convolution_kernel="Bl64"))
    (False, True)
    """
    return lung_rank(h) > 0


# --------------------------------------------------------------------------------------------
# body part
# --------------------------------------------------------------------------------------------
_CHEST_WORDS = re.compile(r"chest|thora|(?<![a-z])thx|lung|pulmo|poumon|t[oó]ra[xc]|brust|mediastin|hrct|ctpa",
                          re.IGNORECASE)
"""The chest in English, German, French, Italian, Spanish and Portuguese: chest, thorax (thorakal, thoracic), thx,
lung (Lunge, LungCARE), pulmonary (pulmón), poumon, tórax, torace, Brust, mediastinum, HRCT, CTPA."""
_ABDOMEN_WORDS = re.compile(r"abdom|(?<![a-z])abd|bauch|addom|pelv|becken|bassin|bacino|"
                            r"liver|leber|kidney|niere|renal|(?<![a-z])uro|colon|pancrea", re.IGNORECASE)
_HEAD_WORDS = re.compile(r"head|kopf|sch[aä]e?del|brain|hirn|cran|cereb|neck|hals|sinus|orbit|(?<![a-z])t[eê]te",
                         re.IGNORECASE)
_LIMB_WORDS = re.compile(r"spine|wirbel|rachis|extremit|knee|knie|genou|(?<![a-z])hip|h[uü]fte|shoulder|schulter|"
                         r"ankle|wrist|(?<![a-z])hand|(?<![a-z])foot|(?<![a-z])fu(ss|ß)", re.IGNORECASE)


@dataclass(frozen=True)
class Region:
    """What a header text names: the chest, the abdomen or pelvis, the head or neck, another part (:func:`region`)."""

    chest: bool = False
    abdomen: bool = False
    head: bool = False
    other: bool = False

    @property
    def named(self) -> bool:
        """Whether the text names any body part."""
        return self.chest or self.abdomen or self.head or self.other


def region(text: str) -> Region:
    """The body parts a header text (Series Description, Body Part Examined, Protocol Name...) names.

    >>> region("Chest/Abdomen/Pelvis 5.0").chest, region("ABDOMENPELVIS").chest, region("Lunge 1.0 Bl57").chest
    (True, False, True)
    >>> region("Thorax-Abdomen").abdomen, region("Becken 3.0").abdomen, region("Kopf nativ").head, region("5.0 B31f").named
    (True, True, True, False)
    """
    return Region(bool(_CHEST_WORDS.search(text)), bool(_ABDOMEN_WORDS.search(text)), bool(_HEAD_WORDS.search(text)),
                  bool(_LIMB_WORDS.search(text)))


@dataclass(frozen=True)
class SeriesLabels:
    """What a series' data set says beyond its frames' :class:`~gateway.dicom.FrameHeader`: the texts that name the
    body part imaged, and the frame of reference its positions are in (:func:`series_labels`)."""

    body_part_examined: str = ""
    """Body Part Examined (0018,0015), and the code meaning of an Anatomic Region Sequence (0008,2218), top level
    or in an enhanced CT's Frame Anatomy functional group."""
    protocol_name: str = ""
    """Protocol Name (0018,1030)."""
    study_description: str = ""
    """Study Description (0008,1030): the same for every series of a study, so it never tells them apart."""
    frame_of_reference_uid: str = ""
    """Frame of Reference UID (0020,0052): positions of two series compare only within one frame of reference."""


def _header_text(ds: Dataset, keyword: str) -> str:
    try:
        return joined_text(ds.get(keyword))
    except Exception:  # noqa: BLE001 - malformed values surface lazily in pydicom
        return ""


def _anatomy(ds: Dataset) -> str:
    """The code meanings of an Anatomic Region Sequence, top level or in the shared Frame Anatomy group."""
    items: list[Dataset] = []
    try:
        items += list(ds.get("AnatomicRegionSequence") or [])
        for shared in ds.get("SharedFunctionalGroupsSequence") or []:
            for anatomy in shared.get("FrameAnatomySequence") or []:
                items += list(anatomy.get("AnatomicRegionSequence") or [])
    except Exception:  # noqa: BLE001 - malformed values surface lazily in pydicom
        return ""
    return " ".join(_header_text(item, "CodeMeaning") for item in items)


def series_labels(ds: Dataset) -> SeriesLabels:
    """Read a series' :class:`SeriesLabels` from one of its data sets (header only; a malformed value reads empty)."""
    return SeriesLabels(
        body_part_examined=" ".join(t for t in (_header_text(ds, "BodyPartExamined"), _anatomy(ds)) if t),
        protocol_name=_header_text(ds, "ProtocolName"),
        study_description=_header_text(ds, "StudyDescription"),
        frame_of_reference_uid=_header_text(ds, "FrameOfReferenceUID"),
    )


CHEST, CHEST_APEX, CHEST_PROTOCOL, UNNAMED, NOT_CHEST = 4, 3, 2, 1, 0
"""Body tiers of a series (:func:`select_series`), best first: the chest by its own name (Series Description, else
Body Part Examined) or by lying in or around a series so named; the top series of a chest-abdomen protocol; the chest
by its protocol (Protocol Name, else Study Description) only; nothing said; another body part."""
_TIER_NAMES = {CHEST: "chest", CHEST_APEX: "top of a chest-abdomen protocol", CHEST_PROTOCOL: "chest protocol",
               UNNAMED: "body part unnamed", NOT_CHEST: "not the chest"}
OVERLAP_FRACTION = 0.5
"""An unnamed series lying over at least this fraction of a chest series' z-range or of its own (one mostly within
the other) images the chest; lying this much within an abdomen, head or limb series, it images that part."""
APEX_TOLERANCE_MM = 30.0
"""Under a chest-abdomen protocol, the series whose top lies within this of the highest top images the chest (the
chest is the upper part of the range; an abdomen-pelvis series starts at the diaphragm, 15 cm or more below the apex)."""
COVER_FRACTION = 0.75
"""A lung reconstruction wins over a soft one only when its z extent is at least this fraction of the longest series
of its body tier (leaving out series also named for the abdomen): it covers the chest, not a part of it (an
expiration scan's few slices, a targeted reconstruction)."""


@dataclass
class _Candidate:
    """One usable series and what :func:`select_series` ranks it by."""

    uid: str
    group: list[FrameHeader]
    distinct: int
    own: Region
    """What the series says of itself: its Series Description, else its Body Part Examined."""
    protocol: Region
    """What its protocol says: its Protocol Name, else the Study Description."""
    frame_of_reference: str
    body: int = UNNAMED
    covers: bool = False

    @functools.cached_property
    def z(self) -> tuple[float, float]:
        """Lowest and highest patient z (mm; the head is +z whatever the patient position)."""
        zs = [h.position[2] for h in self.group]  # type: ignore[index]
        return min(zs), max(zs)

    @property
    def extent(self) -> float:
        return self.z[1] - self.z[0]

    @property
    def combined(self) -> bool:
        """Named for the abdomen (or pelvis) besides the chest: its extent is no chest's."""
        return self.own.abdomen if self.own.named else self.protocol.abdomen

    def overlap(self, other: _Candidate) -> float:
        """Length (mm) the two z-ranges share; 0 across frames of reference, whose positions do not compare."""
        if self.frame_of_reference != other.frame_of_reference:
            return 0.0
        return max(0.0, min(self.z[1], other.z[1]) - max(self.z[0], other.z[0]))


def _body_tiers(candidates: Sequence[_Candidate]) -> None:
    """Set each candidate's :attr:`_Candidate.body` (:data:`CHEST` ... :data:`NOT_CHEST`).

    Evidence, surest first: the series' own name; its positions against a series so named (an unnamed series lying
    mostly within a chest series, or holding most of one, images the chest; mostly within an abdomen series, the
    abdomen); its protocol. Positions compare only within one frame of reference, and only series long enough to
    screen (:data:`MIN_SCREENABLE_POSITIONS`) are compared with."""
    ranged = [c for c in candidates if c.distinct >= MIN_SCREENABLE_POSITIONS and c.extent > 0]
    chests = [c for c in ranged if c.own.chest and not c.own.abdomen]  # a chest-abdomen series' range is no chest's
    others = [c for c in ranged if c.own.named and not c.own.chest]
    for c in candidates:
        if c.own.named:
            c.body = CHEST if c.own.chest else NOT_CHEST
        elif c.extent > 0 and any(c.overlap(o) >= OVERLAP_FRACTION * min(c.extent, o.extent) for o in chests):
            c.body = CHEST
        elif c.extent > 0 and any(c.overlap(o) >= OVERLAP_FRACTION * c.extent for o in others):
            c.body = NOT_CHEST
        elif c.protocol.named:
            c.body = CHEST_PROTOCOL if c.protocol.chest else NOT_CHEST
    # a chest-abdomen protocol (not one reaching the neck) scans the chest first from the top: its top series
    tops: dict[str, float] = {}
    upper = [c for c in ranged if c.body == CHEST_PROTOCOL and c.protocol.abdomen and not c.protocol.head]
    for c in upper:
        tops[c.frame_of_reference] = max(tops.get(c.frame_of_reference, -math.inf), c.z[1])
    for c in upper:
        if c.z[1] >= tops[c.frame_of_reference] - APEX_TOLERANCE_MM:
            c.body = CHEST_APEX


def _coverage(candidates: Sequence[_Candidate]) -> None:
    """Set :attr:`_Candidate.covers` within each body tier (:data:`COVER_FRACTION` of its longest series)."""
    for tier in {c.body for c in candidates}:
        members = [c for c in candidates if c.body == tier and c.distinct >= MIN_SCREENABLE_POSITIONS]
        reference = max((c.extent for c in members if not c.combined), default=0.0) or max(
            (c.extent for c in members), default=0.0)
        for c in members:
            c.covers = c.extent >= COVER_FRACTION * reference


def select_series(frames: Sequence[FrameHeader], rules: SeriesRules | None = None,
                  labels: Mapping[str, SeriesLabels] | None = None) -> SeriesSelection | None:
    """Pick the series to screen; ``None`` when no frame passes the rules.

    Ranking, each step deciding only when the ones before tie (header only: nothing is decoded):

    1. a series of :data:`MIN_SCREENABLE_POSITIONS` or more positions (the case rule's run; fewer is a bolus
       tracker's or a scout's);
    2. the chest over anything else, whatever the number of positions (body tiers, :data:`CHEST` ... :data:`NOT_CHEST`,
       :func:`_body_tiers`): the models learnt from chest CT, and a study that also holds an abdomen-pelvis series
       (a chest-abdomen-pelvis protocol) screened on that longer series shows the lungs' bases at most. A series
       named for both (``Chest/Abdomen/Pelvis``) is a chest series. Nothing named anywhere: every series ties here;
    3. among chest series, a lung reconstruction (:func:`lung_rank`: a sharp kernel, else a name saying lung) that
       covers the chest (:data:`COVER_FRACTION`) over a soft one, even with fewer positions or thicker slices: the
       paper screened HRCT, a thin lung-kernel reconstruction, and a soft kernel smooths the ground glass and the
       fine margins it was shown;
    4. the most distinct positions (the most of the chest, at the finest spacing), then thinner slices, then the surer
       lung reconstruction (in a tier that is not the chest, where step 3 does not apply), then the lower series
       number, then the UID (deterministic).

    A study with no body part named and no lung reconstruction is screened on the series with the most positions,
    as before.

    Parameters
    ----------
    frames : Sequence[FrameHeader]
        Every frame of every readable CT object in the upload.
    rules : SeriesRules | None
        Defaults to :class:`SeriesRules()`.
    labels : Mapping[str, SeriesLabels] | None
        Per Series Instance UID, what its data sets say of the body part and frame of reference
        (:func:`series_labels`); a series without is judged on its Series Description alone.
    """
    rules = rules or SeriesRules()
    labels = labels or {}
    excluded: list[tuple[FrameHeader, str, str]] = []
    by_series: dict[str, list[FrameHeader]] = defaultdict(list)
    for h in frames:
        why = frame_exclusion(h, rules)
        if why is not None:
            excluded.append((h, *why))
        else:
            by_series[h.series_instance_uid].append(h)
    derived_uids: set[str] = set()
    most = max((_distinct_positions(g, rules) for g in by_series.values()), default=0)
    if most < MIN_SCREENABLE_POSITIONS and rules.require_original_primary:
        # no ORIGINAL\PRIMARY series that can be screened (none, or only a bolus tracker's or a scout's few
        # positions): a plain axial CT stack labelled DERIVED (a lossy conversion, a PACS export) or with its
        # Image Type stripped (an anonymiser) is screened, with a warning; reformats, projections, maps and
        # secondary captures stay out
        relaxed = replace(rules, require_original_primary=False)
        still_out: list[tuple[FrameHeader, str, str]] = []
        for h, reason, message in excluded:
            if reason == "not_original" and _plain_axial_stack(h) and frame_exclusion(h, relaxed) is None:
                by_series[h.series_instance_uid].append(h)
                derived_uids.add(h.series_instance_uid)
            else:
                still_out.append((h, reason, message))
        excluded = still_out
    if not by_series:
        return None

    usable: dict[str, list[FrameHeader]] = {}
    for uid, group in by_series.items():
        main = _main_orientation(group)
        kept = []
        for h, in_main in zip(group, main, strict=True):
            if in_main:
                kept.append(h)
            else:
                excluded.append(
                    (h, "orientation_mismatch", "Orientation differs from the rest of its series.")
                )
        usable[uid] = kept

    candidates = []
    for uid, group in usable.items():
        named = labels.get(uid, SeriesLabels())
        own = region(group[0].series_description)
        protocol = region(named.protocol_name)
        candidates.append(_Candidate(
            uid, group, _distinct_positions(group, rules),
            own if own.named else region(named.body_part_examined),
            protocol if protocol.named else region(named.study_description),
            named.frame_of_reference_uid,
        ))
    _body_tiers(candidates)
    _coverage(candidates)

    def score(c: _Candidate) -> tuple[float | str, ...]:
        thick = float(np.median([h.slice_thickness for h in c.group if h.slice_thickness] or [math.inf]))
        number = c.group[0].series_number if c.group[0].series_number is not None else 1 << 30
        lung = lung_rank(c.group[0])
        chest_lung = lung if c.body >= CHEST_PROTOCOL and c.covers else 0
        return (c.distinct < MIN_SCREENABLE_POSITIONS, -c.body, -chest_lung, -c.distinct, thick, -lung, number, c.uid)

    ranked = sorted(candidates, key=score)
    best = ranked[0]
    winner_uid, winner = best.uid, best.group
    others = {c.uid: len(c.group) for c in ranked[1:]}
    if others:
        logger.info("series %s chosen (%d frames; %s, lung rank %d) over %s", winner_uid, len(winner),
                    _TIER_NAMES[best.body], lung_rank(winner[0]), others)
    return SeriesSelection(
        series_instance_uid=winner_uid, chosen=winner, excluded=excluded, other_series=others,
        derived=winner[0].image_type if winner_uid in derived_uids else None,
    )


MIN_SCREENABLE_POSITIONS = 3
"""Fewest distinct positions a series must have to be screened before a derived axial stack: the case
rule's run of three consecutive slices. Fewer is a bolus tracker's or a scout's series, not a chest."""


def _distinct_positions(group: Sequence[FrameHeader], rules: SeriesRules) -> int:
    """Distinct slice positions of a series' frames (along the first frame's normal, to the duplicate
    tolerance)."""
    n = slice_normal(group[0].orientation)  # type: ignore[arg-type]
    return len({round(float(np.dot(n, h.position)) / max(rules.duplicate_tol_mm, 1e-6))  # type: ignore[arg-type]
                for h in group})


def sort_slices(frames: Sequence[FrameHeader], rules: SeriesRules | None = None) -> SortedSeries:
    """Sort one series' frames along the slice normal, removing duplicates.

    Parameters
    ----------
    frames : Sequence[FrameHeader]
        Frames of one series, all with orientation and position (as :func:`select_series` keeps).
    rules : SeriesRules | None
        Supplies ``duplicate_tol_mm``.

    Raises
    ------
    ValueError
        ``frames`` is empty or a frame lacks geometry.
    """
    rules = rules or SeriesRules()
    if not frames:
        raise ValueError('Argument "frames" must not be empty.')
    if any(h.orientation is None or h.position is None for h in frames):
        raise ValueError('Argument "frames" must all have orientation and position.')
    normal = slice_normal(frames[0].orientation)  # type: ignore[arg-type]
    if normal[2] < 0:  # toward the head: a position is the slice's patient z, what a PACS shows as its location
        normal = -normal
    pos = np.array([float(np.dot(normal, h.position)) for h in frames])  # type: ignore[arg-type]
    tie = [
        (
            h.instance_number if h.instance_number is not None else 1 << 30,
            h.sop_instance_uid,
            h.frame_index or 0,
        )
        for h in frames
    ]
    order = sorted(range(len(frames)), key=lambda i: (pos[i], tie[i]))

    kept: list[int] = []
    duplicates: list[FrameHeader] = []
    for i in order:
        if kept and abs(pos[i] - pos[kept[-1]]) <= rules.duplicate_tol_mm:
            # same position: keep the lowest tie key (instance number, uid, frame)
            if tie[i] < tie[kept[-1]]:
                duplicates.append(frames[kept[-1]])
                kept[-1] = i
            else:
                duplicates.append(frames[i])
            continue
        kept.append(i)

    positions = pos[kept]
    steps = np.diff(positions)
    spacing = float(np.median(steps)) if steps.size else None
    return SortedSeries(
        slices=[frames[i] for i in kept],
        positions_mm=positions,
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        spacing_mm=spacing,
        duplicates=duplicates,
    )
