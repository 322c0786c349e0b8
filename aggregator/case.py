"""The case rule: from per-slice boxes to a verdict on the series, with its evidence.

The paper (Chen et al., Sci Rep 2020) says only: boxes with confidence >= 0.50 covering > 25 pixels,
boxes outside the valid area dropped, and a case is positive when three consecutive slices have
lesions in the same quadrant. Everything it leaves open is decided here, configurable through
:class:`CaseRule`, recorded in every result and argued in ``docs/case-rule.md``.

Decisions (defaults first)
--------------------------
1. **Filters** (idempotent with Triton's post-processing, using :mod:`ctscreen.postprocess`): a box
   counts when its score is ``>= cutoff``, it covers ``> min_area`` pixels, and its centre lies inside
   the slice's valid-area box. A slice whose valid area is empty has no findings at all, whatever
   ``drop_outside_valid`` says: no lung field, no lung lesion.
2. **Quadrant split** ``quadrant_split="valid_area"``: each slice is split at the centre of its own
   valid-area box, because the patient is rarely centred in the field of view (a slice whose valid area
   holds one lung only, at the series' median centre on that axis: :data:`NARROW_VALID_AREA`); ``"image"``
   splits at the image centre (pixel 255.5 on the 512 grid).
3. **Spanning boxes** ``spanning="every"``: a box counts in every quadrant it covers, so a lesion that
   drifts across the split line from one slice to the next keeps its run, and the verdict is
   monotone (a bigger box never removes a quadrant). ``"centre"`` counts a box only in the quadrant
   holding its centre. A pixel or centre exactly on a split line belongs to both sides, which keeps
   the rule symmetric under mirroring.
4. **Order**: slices are ordered by their position along the slice normal (``position_mm``), never
   by file order or InstanceNumber. Two slices at the same position, or two with the same SOP
   Instance UID, are an error of the caller (ingest removes duplicates).
5. **Gaps**: the nominal spacing is the ``spacing_mm`` given to :func:`decide` or else the median
   distance between neighbours. Neighbours further apart than ``gap_tolerance`` x the nominal spacing
   (default 1.5: one missing slice is a gap) break a run. A run that would qualify if the gaps were
   ignored makes the case ``indeterminate`` (``run_broken_by_gap``), never negative.
6. **Run length**: ``run_slices`` consecutive slices (paper: 3); optionally also ``run_mm``, the slab
   the run must cover, measured as last minus first position plus the nominal spacing (so three 5 mm
   slices cover 15 mm). Both must hold when both are given; set ``run_slices=1`` to rule in mm only.
7. **Never silently negative**: a series with no lung field on any slice (``no_valid_area``), or with
   no gap-free stretch long enough to hold a run (``too_few_slices``), is ``indeterminate``.
8. **A chest at all** ``min_lung_field_cm2=50, min_body_cm2=300``: a series whose widest classical lung
   field and widest body section (measured by ingest on the HU, :func:`ctscreen.lungs.section_areas_cm2`)
   are both smaller than a chest's is ``indeterminate`` (``not_chest``) whatever its boxes: the sinuses of
   a head CT are air inside the body too, and the models, which learnt only chests, box them. Both must
   fail: lungs filled by disease hold little air, but a diseased adult chest is still a chest's size.

Gaps and the run length are decided here only, under the job's rule: ingest orders the slices but
looks for neither. Each gap is one :class:`~aggregator.schema.Gap` and one warning in the result, and a
series shorter than ``run_slices`` gets one warning.

:func:`case_result` is the one way from a prepared series and the ensemble's per-slice outputs to a
:class:`~aggregator.schema.CaseResult`; the gateway's worker and the in-process evaluation both call it.

The verdict is positive when any run qualifies (and the series is a chest); the evidence is the longest run found (qualifying
first, then most slices, widest extent, lowest position, quadrant order), reported even when the
case is negative so that a reader sees how close it came.

>>> import numpy as np
>>> va = np.array([100, 100, 400, 400], np.float32)
>>> lesion = np.array([[150, 150, 170, 170, 0.9]], np.float32)
>>> s = [SliceInput(f"1.2.{i}", 5.0 * i, lesion if i in (2, 3, 4) else np.zeros((0, 5)), va)
...      for i in range(8)]
>>> d = decide(s)
>>> d.verdict, d.reason, d.evidence.quadrant, d.evidence.n_slices
('positive', 'run_found', 'top_left', 3)
>>> decide(s[:4]).verdict  # slices 2 and 3 only: two in a row
'negative'
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Literal, Protocol

import numpy as np

from aggregator.schema import (
    NOT_CHEST,
    QUADRANTS,
    Box,
    CaseResult,
    Evidence,
    EvidenceSlice,
    Gap,
    LesionBox,
    ModelInfo,
    Quadrant,
    RejectedFile,
    RuleParams,
    SliceFinding,
    Timings,
    Verdict,
    counted,
    mm_text,
    quadrant_words,
    slice_span,
)
from ctscreen.contracts import EMPTY_BOX, MIN_BOX_AREA, PROB_CUTOFF, RUN_SLICES, SLICE_SIZE
from ctscreen.lungs import CHEST_BODY_CM2, CHEST_LUNG_FIELD_CM2
from ctscreen.postprocess import inside_valid_area, is_empty_box

logger = logging.getLogger(__name__)

__all__ = [
    "CaseDecision", "CaseRule", "PreparedSeries", "SliceInput", "SlicePrediction", "case_result", "decide",
    "quadrants_of", "replay", "slice_inputs", "to_original_grid",
]

_MM_EPS = 1e-6
"""Tolerance for comparing millimetre extents (positions carry float rounding from DICOM)."""


@dataclass(frozen=True)
class CaseRule:
    """Every parameter of the case rule; the defaults are the paper's, the open choices ours.

    Parameters
    ----------
    cutoff : float
        A box counts when its score (mean lesion probability over the region) is ``>= cutoff``.
        Paper: 0.50. Triton already applied its own cutoff to the maps; a higher value here filters
        regions by score, a lower one cannot bring back regions Triton never reported.
    min_area : int
        A box counts when it covers strictly more than this many pixels on the 512 grid,
        ``(x1 - x0 + 1) * (y1 - y0 + 1) > min_area``. Paper: 25.
    run_slices : int
        Consecutive slices with a lesion in the same quadrant needed for a positive case. Paper: 3.
    run_mm : float or None
        If given, the run must also cover at least this slab in millimetres (last minus first
        position plus the nominal spacing). None (default): slices only, as in the paper.
    quadrant_split : {"valid_area", "image"}
        Where each slice is split into quadrants: the centre of its valid-area box (default) or the
        image centre.
    spanning : {"every", "centre"}
        A box spanning a split line counts in every quadrant it covers (default) or only in the one
        holding its centre.
    gap_tolerance : float
        Neighbours further apart than ``gap_tolerance`` x the nominal spacing are not consecutive.
        Default 1.5 (a single missing slice breaks a run). Must be > 1.
    drop_outside_valid : bool
        Drop boxes whose centre lies outside a non-empty valid area (paper: yes). A slice with an
        empty valid area has no findings either way.
    min_lung_field_cm2 : float or None
        A series whose widest lung field (``lung_field_cm2`` of :func:`decide`, measured by ingest)
        is smaller than this, and whose widest body section is smaller than ``min_body_cm2``, is no chest
        CT: ``indeterminate`` (``not_chest``), whatever its boxes. Default
        :data:`ctscreen.lungs.CHEST_LUNG_FIELD_CM2` (50); None: no such check (the paper has none). A
        series that was not measured (no usable pixel spacing) is not checked.
    min_body_cm2 : float or None
        The body section (``body_cm2`` of :func:`decide`) below which a series with small lungs is no
        chest: default :data:`ctscreen.lungs.CHEST_BODY_CM2` (300). None: the lung field alone decides.
    """

    cutoff: float = PROB_CUTOFF
    min_area: int = MIN_BOX_AREA
    run_slices: int = RUN_SLICES
    run_mm: float | None = None
    quadrant_split: Literal["valid_area", "image"] = "valid_area"
    spanning: Literal["every", "centre"] = "every"
    gap_tolerance: float = 1.5
    drop_outside_valid: bool = True
    min_lung_field_cm2: float | None = CHEST_LUNG_FIELD_CM2
    min_body_cm2: float | None = CHEST_BODY_CM2

    def __post_init__(self) -> None:
        if not 0.0 <= self.cutoff <= 1.0:
            raise ValueError(f'Argument "cutoff" must lie in [0, 1], got {self.cutoff}.')
        if isinstance(self.min_area, bool) or not isinstance(self.min_area, int) or self.min_area < 0:
            raise ValueError(f'Argument "min_area" must be an int >= 0, got {self.min_area!r}.')
        if isinstance(self.run_slices, bool) or not isinstance(self.run_slices, int) or self.run_slices < 1:
            raise ValueError(f'Argument "run_slices" must be an int >= 1, got {self.run_slices!r}.')
        if self.run_mm is not None and not (math.isfinite(self.run_mm) and self.run_mm > 0):
            raise ValueError(f'Argument "run_mm" must be None or a finite number > 0, got {self.run_mm}.')
        if self.quadrant_split not in ("valid_area", "image"):
            raise ValueError(
                f'Argument "quadrant_split" must be "valid_area" or "image", got {self.quadrant_split!r}.'
            )
        if self.spanning not in ("every", "centre"):
            raise ValueError(f'Argument "spanning" must be "every" or "centre", got {self.spanning!r}.')
        if not (math.isfinite(self.gap_tolerance) and self.gap_tolerance > 1.0):
            raise ValueError(f'Argument "gap_tolerance" must be a finite number > 1, got {self.gap_tolerance}.')
        for name in ("min_lung_field_cm2", "min_body_cm2"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f'Argument "{name}" must be None or a finite number > 0, got {value}.')

    def params(self) -> RuleParams:
        """The parameters as the schema model recorded in every :class:`~aggregator.schema.CaseResult`."""
        return RuleParams(**asdict(self))

    @classmethod
    def from_params(cls, params: RuleParams) -> CaseRule:
        """The rule recorded in a result, to reproduce its verdict."""
        return cls(**params.model_dump())


@dataclass(frozen=True, eq=False)
class SliceInput:
    """What the serving path returns for one slice, plus where the slice lies.

    Parameters
    ----------
    sop_instance_uid : str
        The slice's SOP Instance UID.
    position_mm : float
        Position along the slice normal in mm (``ImagePositionPatient`` projected on the normal).
    boxes : numpy.ndarray
        ``[N, 5]`` lesion boxes ``(x0, y0, x1, y1, score)`` on the 512 grid, inclusive indices, as
        unpacked by :func:`ctscreen.postprocess.unpack_boxes`; all ``-1`` padding rows are ignored.
    valid_area : numpy.ndarray
        ``[4]`` valid-area box on the 512 grid, ``EMPTY_BOX`` (all -1) when empty.
    rows, cols : int or None
        The stored image's size, to map boxes back to its grid; None when unknown.
    to_original : callable or None
        Maps ``[N, 4]`` inclusive 512-grid boxes to the stored grid (ingest passes
        ``SliceInfo.grid.to_original``, which knows how a non-square image was padded). Without it,
        a square ``rows == cols`` image is mapped by :func:`to_original_grid` and a non-square one
        is not mapped (``original`` is None).
    frame_index : int or None
        The 0-based frame of a multi-frame object (an Enhanced CT's frames share its SOP Instance UID);
        None for a single-frame slice.
    """

    sop_instance_uid: str
    position_mm: float
    boxes: np.ndarray
    valid_area: np.ndarray
    rows: int | None = None
    cols: int | None = None
    to_original: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    frame_index: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sop_instance_uid, str) or not self.sop_instance_uid:
            raise ValueError('Argument "sop_instance_uid" must be a non-empty string.')
        if not math.isfinite(float(self.position_mm)):
            raise ValueError(f'Argument "position_mm" must be finite, got {self.position_mm}.')
        boxes = np.asarray(self.boxes, dtype=np.float32)
        if boxes.size == 0:
            boxes = np.zeros((0, 5), np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(f'Argument "boxes" must have shape [N, 5], got {boxes.shape}.')
        if not np.all(np.isfinite(boxes)):
            raise ValueError('Argument "boxes" must hold finite numbers only.')
        boxes = boxes[~np.all(boxes == -1.0, axis=1)]  # padding rows of the ensemble output
        if np.any(boxes[:, :4] < 0) or np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
            raise ValueError('Argument "boxes" holds a box with negative or out-of-order corners.')
        valid = np.asarray(self.valid_area, dtype=np.float32).reshape(-1)
        if valid.shape != (4,) or not np.all(np.isfinite(valid)):
            raise ValueError(f'Argument "valid_area" must be 4 finite numbers, got {self.valid_area!r}.')
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | np.integer) or value < 1):
                raise ValueError(f'Argument "{name}" must be None or an int >= 1, got {value!r}.')
        object.__setattr__(self, "position_mm", float(self.position_mm))
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "valid_area", valid)


@dataclass(frozen=True)
class CaseDecision:
    """The verdict on one series, its evidence and the per-slice findings, in position order."""

    verdict: Verdict
    reason: str
    message: str
    evidence: Evidence | None
    slices: tuple[SliceFinding, ...]
    gaps: tuple[Gap, ...]
    nominal_spacing_mm: float | None
    rule: CaseRule
    warnings: tuple[str, ...] = field(default_factory=tuple)
    lung_field_cm2: float | None = None
    """The series' widest lung field as measured by ingest (None: not measured)."""
    body_cm2: float | None = None
    """The series' widest body section as measured by ingest (None: not measured)."""

    @property
    def positive(self) -> bool:
        """True when the verdict is positive."""
        return self.verdict == "positive"

    def to_result(
        self,
        *,
        study_instance_uid: str,
        series_instance_uid: str,
        models: Iterable[ModelInfo] = (),
        timings: Timings | None = None,
        rejected: Iterable[RejectedFile] = (),
        gaps: Iterable[Gap] = (),
        warnings: Iterable[str] = (),
        job_id: str | None = None,
        created_at: datetime | None = None,
        software_version: str | None = None,
    ) -> CaseResult:
        """Wrap the decision into the versioned :class:`~aggregator.schema.CaseResult`.

        ``gaps`` and ``warnings`` given here (for example by ingest) are added to the decision's
        own, without duplicates.
        """
        all_gaps = list(self.gaps)
        all_gaps += [g for g in gaps if g not in all_gaps]
        all_warnings = list(self.warnings)
        all_warnings += [w for w in warnings if w not in all_warnings]
        if software_version is None:
            from ctscreen import __version__ as software_version
        return CaseResult(
            job_id=job_id,
            created_at=created_at,
            software_version=software_version,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            verdict=self.verdict,
            reason=self.reason,
            message=self.message,
            evidence=self.evidence,
            n_slices=len(self.slices),
            nominal_spacing_mm=self.nominal_spacing_mm,
            lung_field_cm2=self.lung_field_cm2,
            body_cm2=self.body_cm2,
            slices=list(self.slices),
            rule=self.rule.params(),
            models=list(models),
            timings=timings or Timings(),
            rejected=list(rejected),
            gaps=all_gaps,
            warnings=all_warnings,
        )


def to_original_grid(box: Sequence[float], rows: int, cols: int, grid: int = SLICE_SIZE) -> Box:
    """Map an inclusive box on the ``grid x grid`` model grid to the stored ``rows x cols`` grid.

    Pixel ``i`` of the grid spans ``[i, i + 1) * size / grid`` of the stored image on each axis (the
    gateway's convention for a square image, which it zooms without padding; a non-square image is
    padded first, and its mapping is the ``to_original`` callable of :class:`SliceInput`). The mapped
    box is the smallest one covering the same physical extent.

    >>> to_original_grid((0, 0, 511, 255), rows=256, cols=1024).model_dump()
    {'x0': 0, 'y0': 0, 'x1': 1023, 'y1': 127}
    >>> to_original_grid((10, 20, 30, 40), rows=512, cols=512).model_dump()
    {'x0': 10, 'y0': 20, 'x1': 30, 'y1': 40}
    """
    sx, sy = cols / grid, rows / grid
    x0 = min(cols - 1, max(0, math.floor(box[0] * sx + 1e-9)))
    y0 = min(rows - 1, max(0, math.floor(box[1] * sy + 1e-9)))
    x1 = min(cols - 1, max(x0, math.ceil((box[2] + 1) * sx - 1e-9) - 1))
    y1 = min(rows - 1, max(y0, math.ceil((box[3] + 1) * sy - 1e-9) - 1))
    return Box(x0=x0, y0=y0, x1=x1, y1=y1)


def _box(values: Sequence[float] | np.ndarray) -> Box:
    return Box(x0=round(values[0]), y0=round(values[1]), x1=round(values[2]), y1=round(values[3]))


def quadrants_of(box: Sequence[float], split: tuple[float, float], spanning: str = "every") -> list[Quadrant]:
    """Quadrants a box ``(x0, y0, x1, y1, ...)`` counts in, for a split point ``(cx, cy)``.

    With ``spanning="every"`` the box counts in each quadrant it covers; with ``"centre"`` only in
    the one holding its centre. A pixel or centre exactly on a split line lies on both sides.

    >>> quadrants_of((10, 10, 20, 20), (100, 100))
    ['top_left']
    >>> quadrants_of((90, 10, 110, 20), (100, 100))
    ['top_left', 'top_right']
    >>> quadrants_of((90, 10, 120, 20), (100, 100), "centre")
    ['top_right']
    >>> quadrants_of((80, 80, 100, 90), (100, 100))  # touches the vertical line
    ['top_left', 'top_right']
    """
    cx, cy = split
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    if spanning == "centre":
        x0 = x1 = (x0 + x1) / 2.0
        y0 = y1 = (y0 + y1) / 2.0
    left, right = x0 <= cx, x1 >= cx
    top, bottom = y0 <= cy, y1 >= cy
    covered = {
        "top_left": top and left,
        "top_right": top and right,
        "bottom_left": bottom and left,
        "bottom_right": bottom and right,
    }
    return [q for q in QUADRANTS if covered[q]]


NARROW_VALID_AREA = 0.7
"""A valid area narrower (or shorter) than this share of the series' median is one lung's (a base below
the other lung, an apex): its centre is not the chest's midline, so the series' median centre splits it."""


@dataclass(frozen=True)
class _SeriesFrame:
    """The series' median valid-area centre and size (None when no slice has a valid area)."""

    centre: tuple[float, float] | None
    size: tuple[float, float] | None

    @classmethod
    def of(cls, slices: Sequence[SliceInput]) -> _SeriesFrame:
        boxes = np.array([s.valid_area for s in slices if not is_empty_box(s.valid_area)], np.float64).reshape(-1, 4)
        if not len(boxes):
            return cls(None, None)
        centre = np.median((boxes[:, :2] + boxes[:, 2:]) / 2.0, axis=0)
        size = np.median(boxes[:, 2:] - boxes[:, :2] + 1.0, axis=0)
        return cls((float(centre[0]), float(centre[1])), (float(size[0]), float(size[1])))


def _split_point(valid: np.ndarray, rule: CaseRule, frame: _SeriesFrame | None = None) -> tuple[float, float]:
    """Where a slice's quadrants meet: its valid-area centre; on a slice whose valid area holds one lung only
    (narrower, or shorter, than :data:`NARROW_VALID_AREA` of the series' median), the series' median centre
    on that axis, so that one lesion does not change quadrant from a slice that shows both lungs to the next."""
    if rule.quadrant_split == "image" or is_empty_box(valid):
        centre = (SLICE_SIZE - 1) / 2.0
        return centre, centre
    own = [float(valid[0] + valid[2]) / 2.0, float(valid[1] + valid[3]) / 2.0]
    if frame is not None and frame.centre is not None and frame.size is not None:
        size = (float(valid[2] - valid[0] + 1), float(valid[3] - valid[1] + 1))
        for axis in (0, 1):
            if size[axis] < NARROW_VALID_AREA * frame.size[axis]:
                own[axis] = frame.centre[axis]
    return own[0], own[1]


def _filter(s: SliceInput, rule: CaseRule) -> tuple[np.ndarray, int]:
    """Boxes of one slice that count under ``rule``, and how many were dropped."""
    boxes = s.boxes
    if is_empty_box(s.valid_area):
        return boxes[:0], len(boxes)
    # The area measure of ctscreen.postprocess: inclusive pixel indices.
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    keep = (boxes[:, 4] >= np.float32(rule.cutoff)) & (area > rule.min_area)
    if rule.drop_outside_valid:
        keep &= inside_valid_area(boxes, s.valid_area)
    return boxes[keep], int(len(boxes) - keep.sum())


def _originals(s: SliceInput, boxes: np.ndarray) -> list[Box | None]:
    """``boxes [N, >=4]`` of one slice on its stored grid (None each when no mapping is known)."""
    if len(boxes) == 0:
        return []
    if s.to_original is not None:
        mapped = np.asarray(s.to_original(np.asarray(boxes[:, :4], np.float64)), np.float64)
        if mapped.shape[0] != len(boxes) or mapped.ndim != 2 or mapped.shape[1] < 4:
            raise ValueError(f'Argument "to_original" returned shape {mapped.shape} for {len(boxes)} boxes.')
        return [_box(np.clip(m[:4], 0, None)) for m in mapped]
    if s.rows is not None and s.rows == s.cols:
        return [to_original_grid(b, s.rows, s.cols) for b in boxes]
    return [None] * len(boxes)


def _finding(index: int, s: SliceInput, rule: CaseRule, frame: _SeriesFrame | None = None) -> SliceFinding:
    kept, dropped = _filter(s, rule)
    split = _split_point(s.valid_area, rule, frame)
    lesions = [
        LesionBox(
            grid=_box(row),
            original=original,
            score=float(min(1.0, max(0.0, row[4]))),
            quadrants=quadrants_of(row, split, rule.spanning),
        )
        for row, original in zip(kept, _originals(s, kept), strict=True)
    ]
    valid = None if is_empty_box(s.valid_area) else _box(s.valid_area)
    valid_original = _originals(s, s.valid_area[None, :])[0] if valid else None
    present = {q for b in lesions for q in b.quadrants}
    return SliceFinding(
        index=index,
        sop_instance_uid=s.sop_instance_uid,
        frame_index=s.frame_index,
        position_mm=s.position_mm,
        valid_area=valid,
        valid_area_original=valid_original,
        boxes=lesions,
        quadrants=[q for q in QUADRANTS if q in present],
        n_dropped=dropped,
    )


@dataclass(frozen=True)
class _Run:
    quadrant: Quadrant
    start: int  # index into the sorted slices
    stop: int  # exclusive
    extent_mm: float
    qualifies: bool

    @property
    def n(self) -> int:
        return self.stop - self.start


def _extent(positions: Sequence[float], start: int, stop: int, spacing: float | None) -> float:
    return positions[stop - 1] - positions[start] + (spacing or 0.0)


def _long_enough(n: int, extent_mm: float, rule: CaseRule) -> bool:
    return n >= rule.run_slices and (rule.run_mm is None or extent_mm >= rule.run_mm - _MM_EPS)


def _runs(
    findings: Sequence[SliceFinding],
    segments: Sequence[tuple[int, int]],
    positions: Sequence[float],
    spacing: float | None,
    rule: CaseRule,
) -> list[_Run]:
    """Maximal runs of consecutive slices with a lesion in one quadrant, within gap-free segments."""
    runs = []
    for q in QUADRANTS:
        for seg_start, seg_stop in segments:
            start = None
            for i in range(seg_start, seg_stop + 1):
                on = i < seg_stop and q in findings[i].quadrants
                if on and start is None:
                    start = i
                elif not on and start is not None:
                    extent = _extent(positions, start, i, spacing)
                    runs.append(_Run(q, start, i, extent, _long_enough(i - start, extent, rule)))
                    start = None
    return runs


def _missed_inside(findings: Sequence[SliceFinding], covered: Sequence[SliceFinding], run: _Run) -> int:
    """Slices without a valid area between the first and the last slice of ``run`` (a run over ``covered``,
    the slices that have one)."""
    first, last = covered[run.start].index, covered[run.stop - 1].index
    return sum(1 for f in findings[first : last + 1] if f.valid_area is None)


def _missing_inside(run: _Run, starts: Sequence[int], positions: Sequence[float], spacing: float | None) -> int:
    """The slices the gaps inside ``run`` leave out (``starts``: the first slice after each gap), by the nominal
    spacing: a gap of 10 mm in a 5 mm series leaves out one."""
    if not spacing:
        return 0
    return sum(max(0, round((positions[a] - positions[a - 1]) / spacing) - 1) for a in starts if run.start < a < run.stop)


def _best(runs: Sequence[_Run]) -> _Run | None:
    if not runs:
        return None
    return min(runs, key=lambda r: (not r.qualifies, -r.n, -r.extent_mm, r.start, QUADRANTS.index(r.quadrant)))


def _evidence(run: _Run, findings: Sequence[SliceFinding], ordered: Sequence[SliceInput], rule: CaseRule,
              frame: _SeriesFrame) -> Evidence:
    return Evidence(
        quadrant=run.quadrant,
        qualifies=run.qualifies,
        n_slices=run.n,
        extent_mm=round(max(0.0, run.extent_mm), 6),
        slices=[
            EvidenceSlice(
                index=f.index,
                sop_instance_uid=f.sop_instance_uid,
                position_mm=f.position_mm,
                boxes=[b for b in f.boxes if run.quadrant in b.quadrants],
                quadrant_original=_quadrant_original(ordered[f.index], run.quadrant, rule, frame),
            )
            for f in findings[run.start : run.stop]
        ],
    )


def _quadrant_original(s: SliceInput, quadrant: Quadrant, rule: CaseRule, frame: _SeriesFrame) -> Box | None:
    """``quadrant`` of one slice on its stored image: the grid's quadrant as the rule split this slice
    (:func:`_split_point`: a one-lung slice at the series' centre), mapped onto Rows x Columns (a slice stored
    mirrored shows it mirrored); None when no mapping is known."""
    if is_empty_box(s.valid_area) and rule.quadrant_split == "valid_area":
        return None  # the rule put no lesion of this slice anywhere
    sx, sy = _split_point(s.valid_area, rule, frame)
    last = SLICE_SIZE - 1.0
    x0, x1 = (0.0, sx) if quadrant.endswith("left") else (sx, last)
    y0, y1 = (0.0, sy) if quadrant.startswith("top") else (sy, last)
    [box] = _originals(s, np.array([[x0, y0, x1, y1]], np.float64))
    if box is None or not s.rows or not s.cols:
        return box
    x1c, y1c = min(box.x1, s.cols - 1), min(box.y1, s.rows - 1)
    return Box(x0=min(box.x0, x1c), y0=min(box.y0, y1c), x1=x1c, y1=y1c)


def _describe(run: _Run, findings: Sequence[SliceFinding]) -> str:
    first, last = findings[run.start], findings[run.stop - 1]
    return (
        f"{counted(run.n, 'slice', 'consecutive slices')} ({mm_text(run.extent_mm)} mm) with lesions in the "
        f"{quadrant_words(run.quadrant)} "
        f"quadrant, {slice_span(first.index, last.index)} ({mm_text(first.position_mm)} to {mm_text(last.position_mm)} mm)"
    )


def _requirement(rule: CaseRule) -> str:
    text = counted(rule.run_slices, "slice", "consecutive slices")
    return text + (f" covering {rule.run_mm:g} mm" if rule.run_mm is not None else "")


def decide(
    slices: Sequence[SliceInput],
    rule: CaseRule | None = None,
    *,
    spacing_mm: float | None = None,
    lung_field_cm2: float | None = None,
    body_cm2: float | None = None,
) -> CaseDecision:
    """Apply the case rule to one series.

    Parameters
    ----------
    slices : Sequence[SliceInput]
        Every slice of the series, in any order.
    rule : CaseRule or None
        The rule; None for the paper's defaults.
    spacing_mm : float or None
        Nominal distance between neighbouring slices (for example from SpacingBetweenSlices); None
        to use the median distance between neighbours.
    lung_field_cm2, body_cm2 : float or None
        The widest classical lung field and the widest body section of the series in cm² (ingest measures
        them on the HU, :func:`ctscreen.lungs.section_areas_cm2`); both below the rule's limits
        (``min_lung_field_cm2``, ``min_body_cm2``), the series is no chest CT. None: not measured, not
        checked.

    Returns
    -------
    CaseDecision
        Verdict, reason code (see :data:`aggregator.schema.REASONS`), message, evidence and the
        per-slice findings in position order.

    Raises
    ------
    ValueError
        When two slices share a SOP Instance UID or a position, ``spacing_mm`` is not > 0 or
        ``lung_field_cm2`` or ``body_cm2`` is not a finite number >= 0.
    """
    rule = rule or CaseRule()
    if spacing_mm is not None and not (math.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f'Argument "spacing_mm" must be None or a finite number > 0, got {spacing_mm}.')
    for name, value in (("lung_field_cm2", lung_field_cm2), ("body_cm2", body_cm2)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f'Argument "{name}" must be None or a finite number >= 0, got {value}.')
    ordered = sorted(slices, key=lambda s: s.position_mm)
    uids = [s.sop_instance_uid for s in ordered]
    frames = [(s.sop_instance_uid, s.frame_index) for s in ordered]  # an Enhanced CT's frames share its UID
    if len(set(frames)) != len(frames):
        dup = sorted({f for f in frames if frames.count(f) > 1}, key=str)[0]
        shown = repr(dup[0]) + ("" if dup[1] is None else f" frame {dup[1]}")
        raise ValueError(f'Argument "slices" holds SOP Instance UID {shown} more than once.')
    positions = [s.position_mm for s in ordered]
    diffs = np.diff(positions) if len(positions) > 1 else np.zeros(0)
    if np.any(diffs <= _MM_EPS):
        i = int(np.argmax(diffs <= _MM_EPS))
        raise ValueError(
            f'Argument "slices" holds two slices at position {positions[i]:.4f} mm '
            f"({uids[i]!r} and {uids[i + 1]!r})."
        )
    spacing = spacing_mm if spacing_mm is not None else (float(np.median(diffs)) if len(diffs) else None)

    gaps: list[Gap] = []
    segments: list[tuple[int, int]] = []
    seg_start = 0
    for i, d in enumerate(diffs):
        if spacing is not None and d > rule.gap_tolerance * spacing:
            gaps.append(
                Gap(
                    after_sop_instance_uid=uids[i],
                    before_sop_instance_uid=uids[i + 1],
                    distance_mm=float(d),
                    expected_mm=float(spacing),
                )
            )
            segments.append((seg_start, i + 1))
            seg_start = i + 1
    if ordered:
        segments.append((seg_start, len(ordered)))

    frame = _SeriesFrame.of(ordered)
    findings = [_finding(i, s, rule, frame) for i, s in enumerate(ordered)]
    runs = _runs(findings, segments, positions, spacing, rule)
    best = _best(runs)
    evidence = _evidence(best, findings, ordered, rule, frame) if best else None
    warnings = [
        f"gap of {g.distance_mm:.2f} mm (expected {g.expected_mm:.2f} mm) between {g.after_sop_instance_uid} "
        f"and {g.before_sop_instance_uid}"
        for g in gaps
    ]
    if len(ordered) < rule.run_slices:
        warnings.append(
            f"Only {counted(len(ordered), 'slice')}; the case rule looks for {counted(rule.run_slices, 'slice', 'consecutive slices')}."
        )
    need = _requirement(rule)

    def make(verdict: Verdict, reason: str, message: str, shown: Evidence | None = evidence) -> CaseDecision:
        return CaseDecision(
            verdict, reason, message, shown, tuple(findings), tuple(gaps), spacing, rule, tuple(warnings),
            lung_field_cm2, body_cm2,
        )

    def unproven(run: _Run, among: Sequence[SliceFinding]) -> Evidence:
        """The run a reason names as what would have satisfied the rule (never qualifying: not found)."""
        return _evidence(run, among, ordered, rule, frame).model_copy(update={"qualifies": False})

    # before the run: boxes on a head's sinuses make runs as well as lesions do. The check reads the
    # measures, never the boxes: for given measures, adding a box never turns a verdict away from positive
    small_lungs = (lung_field_cm2 is not None and rule.min_lung_field_cm2 is not None
                   and lung_field_cm2 < rule.min_lung_field_cm2)
    small_body = rule.min_body_cm2 is None or (body_cm2 is not None and body_cm2 < rule.min_body_cm2)
    if small_lungs and small_body:
        body = f" and its widest body section {body_cm2:.0f} cm²" if body_cm2 is not None else ""
        limits = f"{rule.min_lung_field_cm2:g} cm²" + (f" and {rule.min_body_cm2:g} cm²" if rule.min_body_cm2 else "")
        return make(
            "indeterminate",
            NOT_CHEST,
            f"The widest lung field of the series is {lung_field_cm2:.0f} cm²{body}, under the {limits} of a "
            "chest: not a chest CT (a head or a limb), or the lungs lie outside the field of view; its boxes "
            "are no lung lesions.",
        )
    if best is not None and best.qualifies:
        return make("positive", "run_found", _describe(best, findings) + f" (rule: {need}).")
    if findings and all(f.valid_area is None for f in findings):
        return make("indeterminate", "no_valid_area", "The valid-area model found no lung field on any slice.")
    if gaps:
        # a run across a gap: its lesion slices, and the slices the gap leaves out (unknown: they may hold the
        # lesion too), against the rule; a run that crosses no gap was judged in its segment already
        starts = [a for a, _ in segments[1:]]
        whole = _runs(findings, [(0, len(findings))], positions, spacing, rule)
        broken = [(r, missing) for r in whole if any(r.start < a < r.stop for a in starts)
                  for missing in [_missing_inside(r, starts, positions, spacing)]
                  if _long_enough(r.n + missing, r.extent_mm, rule)]
        if broken:  # its evidence is the broken run the message names, not a shorter one of a segment
            r = _best([b for b, _ in broken])
            assert r is not None
            missing = next(m for b, m in broken if b is r)
            unknown = (f" (with the {counted(missing, 'slice')} the gap leaves out, where the lesion may go on)"
                       if missing and not _long_enough(r.n, r.extent_mm, rule) else "")
            return make(
                "indeterminate",
                "run_broken_by_gap",
                f"{r.n} slices with lesions in the {quadrant_words(r.quadrant)} quadrant{unknown} would satisfy "
                f"the rule ({need}) but a gap in the series breaks the run.",
                unproven(r, findings),
            )
    # a slice inside the lungs on which the valid-area model found nothing has no findings, and broke a run
    # silently (negative): were the run long enough without it, the series is not called negative
    covered = [f for f in findings if f.valid_area is not None]
    if 0 < len(covered) < len(findings):
        at = [positions[f.index] for f in covered]
        bridged = _runs(covered, [(0, len(covered))], at, spacing, rule)
        # the slices without a valid area inside a run are unknown, not lesion-free: they count toward it
        r = _best([b for b in bridged if (m := _missed_inside(findings, covered, b))
                   and _long_enough(b.n + m, b.extent_mm, rule)])
        if r is not None:
            missed = _missed_inside(findings, covered, r)
            return make(
                "indeterminate",
                "run_broken_by_gap",
                f"{r.n} slices with lesions in the {quadrant_words(r.quadrant)} quadrant would satisfy the rule "
                f"({need}) but {counted(missed, 'slice')} among them {'has' if missed == 1 else 'have'} no valid area (the valid-area model found no "
                "lung field there), which breaks the run.",
                unproven(r, covered),
            )
    if not any(_long_enough(b - a, _extent(positions, a, b, spacing), rule) for a, b in segments):
        longest = max((b - a for a, b in segments), default=0)
        return make(
            "indeterminate",
            "too_few_slices",
            f"The longest gap-free stretch has {counted(longest, 'slice')}, too short for the rule ({need}).",
        )
    if best is None:
        return make("negative", "no_findings", f"No lesion on any of {counted(len(findings), 'slice')}.")
    return make(
        "negative", "no_run", f"Longest run: {_describe(best, findings)}; the rule needs {need}."
    )


def slice_inputs(result: CaseResult) -> list[SliceInput]:
    """The inputs a result was decided from, rebuilt from its per-slice findings (512 grid)."""
    out = []
    for f in result.slices:
        rows = np.array(
            [[b.grid.x0, b.grid.y0, b.grid.x1, b.grid.y1, b.score] for b in f.boxes], np.float32
        ).reshape(-1, 5)
        va = f.valid_area
        valid = np.array(EMPTY_BOX if va is None else (va.x0, va.y0, va.x1, va.y1), np.float32)
        out.append(SliceInput(f.sop_instance_uid, f.position_mm, rows, valid, frame_index=f.frame_index))
    return out


def replay(result: CaseResult, rule: CaseRule | None = None) -> CaseDecision:
    """Decide a stored result again, under its own rule or another one.

    Only the boxes the result kept are available, so a rule looser than the recorded one (lower
    ``cutoff`` or ``min_area``) cannot find more than the result holds; a stricter one is exact.
    The nominal spacing recorded in the result is reused.

    >>> import numpy as np
    >>> lesion = np.array([[150, 150, 170, 170, 0.7]], np.float32)
    >>> s = [SliceInput(f"u{i}", 2.0 * i, lesion, np.array([100, 100, 400, 400])) for i in range(3)]
    >>> r = decide(s).to_result(study_instance_uid="1", series_instance_uid="2")
    >>> replay(r).verdict, replay(r, CaseRule(cutoff=0.8)).verdict
    ('positive', 'negative')
    """
    rule = rule or CaseRule.from_params(result.rule)
    return decide(slice_inputs(result), rule, spacing_mm=result.nominal_spacing_mm,
                  lung_field_cm2=result.lung_field_cm2, body_cm2=result.body_cm2)


class SlicePrediction(Protocol):
    """The ensemble's answer for one slice (:class:`ctscreen.postprocess.SliceBoxes`, or the gateway's
    ``SliceOutput``)."""

    @property
    def boxes(self) -> np.ndarray:
        """``[N, 5]`` lesion boxes on the 512 grid."""

    @property
    def valid_area(self) -> np.ndarray:
        """``[4]`` valid-area box on the 512 grid."""


class _Grid(Protocol):
    def to_original(self, boxes: np.ndarray) -> np.ndarray: ...


class _PreparedSlice(Protocol):
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def position_mm(self) -> float: ...
    @property
    def rows(self) -> int: ...
    @property
    def cols(self) -> int: ...
    @property
    def grid(self) -> _Grid: ...
    @property
    def frame_index(self) -> int | None: ...


class _Refused(Protocol):
    @property
    def filename(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def message(self) -> str: ...


class PreparedSeries(Protocol):
    """A series ready for inference, as ingest prepares it (``gateway.ingest.PreparedStudy``)."""

    @property
    def study_instance_uid(self) -> str: ...
    @property
    def series_instance_uid(self) -> str: ...
    @property
    def slices(self) -> Sequence[_PreparedSlice]:
        """In slice order, one per output."""
    @property
    def spacing_mm(self) -> float | None: ...
    @property
    def lung_field_cm2(self) -> float | None:
        """The widest lung field of the series in cm² (None: not measured)."""
    @property
    def body_cm2(self) -> float | None:
        """The widest body section of the series in cm² (None: not measured)."""
    @property
    def rejected(self) -> Sequence[_Refused]: ...
    @property
    def excluded(self) -> Sequence[_Refused]: ...
    @property
    def warnings(self) -> Sequence[str]: ...


def case_result(
    study: PreparedSeries,
    outputs: Sequence[SlicePrediction],
    rule: CaseRule | None = None,
    *,
    models: Iterable[ModelInfo] = (),
    timings: Timings | None = None,
    job_id: str | None = None,
    created_at: datetime | None = None,
) -> CaseResult:
    """The :class:`~aggregator.schema.CaseResult` of a prepared series and the ensemble's outputs.

    Parameters
    ----------
    study : PreparedSeries
        The series as ingest prepared it: slices in order (SOP Instance UID, position along the
        normal, stored size, mapping back to the stored grid), nominal spacing, its widest lung
        field and body section, the files refused or left out, and ingest's warnings.
    outputs : Sequence[SlicePrediction]
        One per slice of ``study``, in the same order (``boxes`` and ``valid_area`` on the 512 grid).
    rule : CaseRule or None
        The job's rule; None for the paper's defaults.
    models, timings, job_id, created_at
        Recorded in the result as given.

    Returns
    -------
    CaseResult
        The verdict (:func:`decide`) with the refused files (rejected, then excluded) and the warnings
        of the decision, then of ingest.

    Raises
    ------
    ValueError
        ``outputs`` does not have one entry per slice, or the slices are inconsistent (see :func:`decide`).
    """
    inputs = [
        SliceInput(
            sop_instance_uid=str(meta.sop_instance_uid),
            position_mm=float(meta.position_mm),
            boxes=out.boxes,
            valid_area=out.valid_area,
            rows=int(meta.rows),
            cols=int(meta.cols),
            to_original=meta.grid.to_original,
            frame_index=meta.frame_index,
        )
        for meta, out in zip(study.slices, outputs, strict=True)
    ]
    decision = decide(inputs, rule, spacing_mm=float(study.spacing_mm) if study.spacing_mm else None,
                      lung_field_cm2=study.lung_field_cm2, body_cm2=study.body_cm2)
    return decision.to_result(
        study_instance_uid=str(study.study_instance_uid),
        series_instance_uid=str(study.series_instance_uid),
        models=models,
        timings=timings,
        rejected=[RejectedFile(filename=str(r.filename), reason=str(r.reason), message=str(r.message))
                  for r in (*study.rejected, *study.excluded)],
        warnings=[str(w) for w in study.warnings],
        job_id=job_id,
        created_at=created_at,
    )
