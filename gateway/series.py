"""Choose the series to screen and put its slices in anatomical order.

Selection (:func:`select_series`): every frame is first checked on its own against
:class:`SeriesRules` (:func:`frame_exclusion` gives the reason a frame is left out: ``not_axial``,
``not_original``, ``localizer``, ``thickness``, ``no_geometry``); frames are grouped by Series
Instance UID; within a series, frames whose orientation differs from the series' own are left
out (``orientation_mismatch``); the series with the most distinct slice positions wins (ties: the
thinner slices, then the lower Series Number, then the UID, so the choice is deterministic).

Ordering (:func:`sort_slices`): the slice normal is ``n = row_cosines x col_cosines`` from Image
Orientation (Patient); each slice's position is ``ImagePositionPatient . n`` (mm). Slices are
sorted by that position, ascending (for a standard axial series, feet to head); Instance Number
and file order are ignored. Slices at the same position (within :attr:`SeriesRules.duplicate_tol_mm`)
are duplicates: one is kept (the lowest ``(instance number, SOP UID, frame)``) and the others are
reported. Gaps (a step much larger than the spacing) are not looked for here: the aggregator decides
them, once, under the job's case rule (:func:`aggregator.case.decide`, ``CaseRule.gap_tolerance``).
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from gateway.dicom import CT_SOP_CLASSES, FrameHeader

logger = logging.getLogger(__name__)

__all__ = [
    "SeriesRules",
    "SeriesSelection",
    "SortedSeries",
    "frame_exclusion",
    "lung_rank",
    "lung_reconstruction",
    "select_series",
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


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal ``row_cosines x col_cosines`` of Image Orientation (Patient).

    Raises
    ------
    ValueError
        The orientation does not have 6 values or its two directions are (nearly) parallel.
    """
    if len(orientation) != 6:
        raise ValueError(f'Argument "orientation" must have 6 values, got {len(orientation)}.')
    # plain floats: np.cross costs ~35 us on 3-vectors, and every frame of an upload asks (twice)
    r0, r1, r2, c0, c1, c2 = (float(v) for v in orientation)
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
_LUNG_KERNEL = re.compile(r"^Bl\d\d")  # Siemens' lung family (Bl57, Bl64): "l" for lung
_SOFT_KERNEL = re.compile(r"^(B[rv]\d\d|B[1-4]\d|I[1-4]\d|STANDARD|SOFT|FC[01]\d)", re.IGNORECASE)
"""Soft-tissue kernels by name: Siemens B10-B49, Br/Bv families and their iterative I10-I49; GE STANDARD and SOFT;
Canon FC01-FC19."""


def lung_rank(h: FrameHeader) -> int:
    """How surely a frame's series is a lung reconstruction, by its own account: 2 when its Convolution Kernel says
    so (GE's ``LUNG``, a kernel naming the lung or HRCT, Siemens' lung family ``Bl57``, ``Bl64``); 1 when only its
    Series Description does (``Lung 1.0``, ``HRCT``) and its kernel is no known soft-tissue one (``Br40``,
    ``B30f``, ``STANDARD``, ``FC13``: a kernel outranks a protocol's name, such as LungCARE's soft series); else
    0. Sharp kernels named by number only (B70f, FC86, YC) are not guessed, and a pulmonary angiogram (CTPA) is
    no lung reconstruction by its name.

    >>> from dataclasses import replace
    >>> h = FrameHeader("f", None, "1.2", "", "1", "2", 3, "Thorax 1.0 B30f", "CT", (), None, None, 1.0, None, None,
    ...                 512, 512, 1.0, -1024.0, "")
    >>> lung_rank(h), lung_rank(replace(h, series_description="Lung 1.0")), lung_rank(replace(h, convolution_kernel="LUNG"))
    (0, 1, 2)
    >>> lung_rank(replace(h, series_description="LungCARE 1.0 Br40", convolution_kernel="Br40"))
    0
    """
    kernel = h.convolution_kernel
    if _LUNG_WORDS.search(kernel) or _LUNG_KERNEL.match(kernel):
        return 2
    if _LUNG_WORDS.search(h.series_description) and not _SOFT_KERNEL.match(kernel):
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


def select_series(frames: Sequence[FrameHeader], rules: SeriesRules | None = None) -> SeriesSelection | None:
    """Pick the series to screen; ``None`` when no frame passes the rules.

    The series with the most distinct positions wins; ties go to thinner slices, then to the surer lung
    reconstruction (:func:`lung_rank`: the paper's HRCT is a thin lung reconstruction; a study reconstructed
    twice at the same positions, a lung and a soft-tissue kernel, is screened on the lung one), then to the
    lower series number, then the UID.

    Parameters
    ----------
    frames : Sequence[FrameHeader]
        Every frame of every readable CT object in the upload.
    rules : SeriesRules | None
        Defaults to :class:`SeriesRules()`.
    """
    rules = rules or SeriesRules()
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

    def score(item: tuple[str, list[FrameHeader]]) -> tuple[float, ...]:
        uid, group = item
        distinct = _distinct_positions(group, rules)
        thick = float(np.median([h.slice_thickness for h in group if h.slice_thickness] or [math.inf]))
        number = group[0].series_number if group[0].series_number is not None else 1 << 30
        return (-distinct, thick, -lung_rank(group[0]), number)

    ranked = sorted(usable.items(), key=lambda it: (score(it), it[0]))
    winner_uid, winner = ranked[0]
    others = {uid: len(g) for uid, g in ranked[1:]}
    if others:
        logger.info("series %s chosen (%d frames) over %s", winner_uid, len(winner), others)
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
