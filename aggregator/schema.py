"""The case result: the one versioned document the gateway API, the CLI and the reports exchange.

Pydantic v2 models; ``docs/schema/case-result.schema.json`` is generated from :class:`CaseResult`
(``python -m aggregator.schema > docs/schema/case-result.schema.json``) and a test keeps it current.

Layout
------
::

    CaseResult
    ├── schema_version, job_id, created_at, software_version, uid_root
    ├── study_instance_uid, series_instance_uid
    ├── verdict (positive | negative | indeterminate), reason (code), message (text)
    ├── evidence: Evidence | None       the run of slices, its quadrant and its boxes
    ├── slices: [SliceFinding]          every slice in position order, boxes in both grids (frame_index
    │                                   of a multi-frame object's slice: added in 1.3.0)
    ├── rule: RuleParams                every case-rule parameter used
    ├── nominal_spacing_mm, n_slices, lung_field_cm2, body_cm2 (added in 1.2.0, with reason not_chest)
    ├── models: [ModelInfo], timings: Timings (receive_s and quiet_s, and queued_s filled: added in 1.4.0)
    └── rejected: [RejectedFile], gaps: [Gap], warnings: [str]

Coordinates
-----------
Boxes are inclusive pixel indices ``(x0, y0, x1, y1)``: ``x`` is the column, ``y`` the row. ``grid``
boxes are on the 512 x 512 grid the models saw; ``original`` boxes are on the stored image's own
``Rows x Columns`` grid (see :func:`aggregator.case.to_original_grid`).

Versioning
----------
``SCHEMA_VERSION`` follows semantic versioning: a new optional field bumps the minor version, a
removed or renamed field or a changed meaning bumps the major version.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

SCHEMA_VERSION: Final = "1.4.0"
"""Version of the :class:`CaseResult` document."""

Verdict = Literal["positive", "negative", "indeterminate"]
Quadrant = Literal["top_left", "top_right", "bottom_left", "bottom_right"]
"""Quadrants on the 512 grid the models saw (row 0 at the top). Ingest mirrors every axial slice into the
radiological convention first (:func:`gateway.dicom.standard_orientation`: columns to the patient's left, rows
to posterior), so on the grid the image's left is the patient's right and its top is anterior, whatever
the stored image's orientation; :func:`quadrant_words` names the patient's side to a reader."""

QUADRANTS: Final[tuple[Quadrant, ...]] = ("top_left", "top_right", "bottom_left", "bottom_right")

_ANATOMY: Final[dict[str, str]] = {"top_left": "right anterior", "top_right": "left anterior",
                                   "bottom_left": "right posterior", "bottom_right": "left posterior"}


def quadrant_words(quadrant: str) -> str:
    """A quadrant as a reader's text: the patient's side, which holds on every image of the study. The grid's
    names misled on a stored image mirrored from the grid (a prone protocol, a reformat): "top left" there
    is the stored image's bottom left, where the key image and the page draw the box; so the text names no
    image side (the page and the key images show it).

    >>> quadrant_words("top_left")
    'right anterior'
    """
    return _ANATOMY.get(quadrant, quadrant)


def mm_text(value: float) -> str:
    """Millimetres to one decimal, halves rounded up as the page's ``toFixed(1)`` rounds them (Python's
    format rounds them to even: an extent of 6.25 mm read "6.2 mm" in the message and "6.3 mm" on the page).

    >>> [mm_text(v) for v in (6.25, 96.25, -96.25, 0.15, 45.0)]
    ['6.3', '96.3', '-96.3', '0.1', '45.0']
    """
    return str(Decimal(value).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and its noun, the singular for one (``plural``: ``noun`` + "s" unless given). Messages read
    "1 slice(s) with lesions" in the SR a reader opens.

    >>> counted(1, "slice"), counted(3, "slice"), counted(0, "object"), counted(3, "slice", "consecutive slices")
    ('1 slice', '3 slices', '0 objects', '3 consecutive slices')
    """
    return f"1 {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def slice_span(first_index: int, last_index: int) -> str:
    """Slices ``first_index``..``last_index`` (0-based, as ``index`` in the result) as a reader's text: numbered
    from 1, as the web page's viewer and strip number them. A message read "slices 4-12" beside a viewer that
    showed the same run as slices 5 to 13.

    >>> slice_span(4, 12)
    'slices 5-13'
    >>> slice_span(0, 0)
    'slice 1'
    """
    if first_index == last_index:
        return f"slice {first_index + 1}"
    return f"slices {first_index + 1}-{last_index + 1}"

REASONS: Final[dict[str, str]] = {
    "run_found": "positive: lesions in the same quadrant on enough consecutive slices",
    "no_run": "negative: lesions found, but no run long enough in any quadrant",
    "no_findings": "negative: no lesion box survived the filters on any slice",
    "too_few_slices": "indeterminate: no gap-free stretch of the series is long enough to hold a run",
    "no_valid_area": "indeterminate: the valid-area model found no lung field on any slice",
    "run_broken_by_gap": "indeterminate: a run would qualify but a gap in the series breaks it",
    "not_chest": "indeterminate: the series' widest lung field and body section are smaller than a chest's (a head "
                 "or limb CT); its boxes are no lung lesions",
    "transfer_interrupted": "indeterminate: no run was found, but the study's transfer ended without a release (an "
                            "aborted C-STORE association): its slices may be only part of the study (set by the gateway)",
}
"""Reason codes the aggregator emits, with their meaning. Callers (the gateway) may add their own
codes for studies that never reach the case rule (for example ``no_usable_series``)."""

NOT_CHEST: Final = "not_chest"
"""The reason of a series that is no chest CT (:attr:`CaseResult.shows_lesions` is False)."""

_CODE = r"^[a-z][a-z0-9_]*$"


STORED: Final = {"stored": True}
"""Validation context of a result read back from storage (``CaseResult.model_validate(data, context=STORED)``):
fields this release does not know, which a later release wrote, are dropped at every level instead of refused,
so a rolled-back gateway still reads the results the later one made. Anything else stays strict."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_later_fields(cls, data: Any, info: ValidationInfo) -> Any:
        if info.context and info.context.get("stored") and isinstance(data, dict):
            return {k: v for k, v in data.items() if k in cls.model_fields}
        return data


class Box(_Model):
    """An axis-aligned box, inclusive pixel indices: ``x`` is the column, ``y`` the row."""

    x0: int = Field(ge=0)
    y0: int = Field(ge=0)
    x1: int = Field(ge=0)
    y1: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        if self.x1 < self.x0 or self.y1 < self.y0:
            raise ValueError(f"box corners out of order: ({self.x0}, {self.y0}, {self.x1}, {self.y1})")
        return self

    @property
    def area(self) -> int:
        """Pixels covered, ``(x1 - x0 + 1) * (y1 - y0 + 1)`` (the paper's "> 25 pixels" measure)."""
        return (self.x1 - self.x0 + 1) * (self.y1 - self.y0 + 1)


class LesionBox(_Model):
    """One lesion region that survived the case rule's filters."""

    grid: Box = Field(description="box on the 512 x 512 model grid")
    original: Box | None = Field(
        default=None, description="the same box on the stored image's Rows x Columns grid"
    )
    score: float = Field(ge=0.0, le=1.0, description="mean lesion probability over the region")
    quadrants: list[Quadrant] = Field(description="quadrants this box counts in (see the rule)")


class SliceFinding(_Model):
    """What the models and the rule found on one slice."""

    index: int = Field(ge=0, description="0-based index in position order (not file order); text for a reader "
                                         "(the message, the web page) numbers slices from 1")
    sop_instance_uid: str
    frame_index: int | None = Field(default=None, ge=0, description="0-based frame of a multi-frame object (an "
                                    "Enhanced CT's frames share its SOP Instance UID); None for a single-frame slice. "
                                    "(Added in 1.3.0: a result of a multi-frame series could not be replayed.)")
    position_mm: float = Field(description="position along the slice normal turned toward the head (the patient z of an axial slice, as a PACS shows its location), mm")
    valid_area: Box | None = Field(default=None, description="valid-area box on the 512 grid; None when empty")
    valid_area_original: Box | None = None
    boxes: list[LesionBox] = Field(default_factory=list)
    quadrants: list[Quadrant] = Field(default_factory=list, description="quadrants with a lesion")
    n_dropped: int = Field(default=0, ge=0, description="boxes received but removed by the filters")


class EvidenceSlice(_Model):
    """One slice of the evidence run, with the boxes that count in the run's quadrant."""

    index: int = Field(ge=0)
    sop_instance_uid: str
    position_mm: float
    boxes: list[LesionBox]
    quadrant_original: Box | None = Field(
        default=None, description="the run's quadrant on this slice's stored image (Rows x Columns), as the rule "
        "split the slice (a one-lung slice at the series' centre; a slice stored mirrored shows it mirrored); "
        "None when the stored grid is unknown")


class Evidence(_Model):
    """The longest run of consecutive slices with a lesion in one quadrant."""

    quadrant: Quadrant
    qualifies: bool = Field(description="True when the run satisfies the rule's run length (the case is then positive, "
                                        "unless the series is no chest CT: reason not_chest)")
    n_slices: int = Field(ge=1)
    extent_mm: float = Field(
        ge=0.0, description="slab covered: last minus first position plus the nominal spacing"
    )
    slices: list[EvidenceSlice]


class RuleParams(_Model):
    """Every parameter of :class:`aggregator.case.CaseRule`, as used for this result."""

    cutoff: float = Field(ge=0.0, le=1.0)
    min_area: int = Field(ge=0)
    run_slices: int = Field(ge=1)
    run_mm: float | None = Field(default=None, gt=0.0)
    quadrant_split: Literal["valid_area", "image"]
    spanning: Literal["every", "centre"]
    gap_tolerance: float = Field(gt=1.0)
    drop_outside_valid: bool
    min_lung_field_cm2: float | None = Field(
        default=None, gt=0.0,
        description="a series whose widest lung field (cm²) is smaller, and whose widest body section is smaller "
                    "than min_body_cm2, is no chest CT (not_chest); null: not checked (results made before the "
                    "check record none). (Added in 1.2.0.)")
    min_body_cm2: float | None = Field(
        default=None, gt=0.0,
        description="the body section (cm²) below which a series with small lungs is no chest CT; null: the lung "
                    "field alone decides. (Added in 1.2.0.)")


class ModelInfo(_Model):
    """A model that took part in the result."""

    name: str
    version: str
    sha256: str | None = None
    platform: str | None = Field(default=None, description="e.g. onnxruntime, tensorrt_plan, python")


class Timings(_Model):
    """Wall-clock durations in seconds; None for a stage that did not run or was not measured.

    The time from the study's arrival to its verdict is ``receive_s + total_s`` from the first instance
    received (an upload: its acceptance), ``quiet_s + total_s`` from the last one.
    """

    receive_s: float | None = Field(
        default=None, ge=0.0,
        description="From the first instance of the study version received to its job created: the instances "
        "arriving and the quiet period after the last (STOW-RS, C-STORE); 0 for an upload, accepted whole. "
        "(Added in 1.4.0.)")
    quiet_s: float | None = Field(
        default=None, ge=0.0,
        description="From the last instance of the study version received to its job created: the quiet period "
        "the gateway waited for more (STOW-RS, C-STORE; shorter when POST .../complete closed it); 0 for an "
        "upload. (Added in 1.4.0.)")
    queued_s: float | None = Field(
        default=None, ge=0.0,
        description="Waiting for a worker: from the job created (or queued again: a try released for want of "
        "Triton or at a replica's shut-down, a holder lost, a retry) to a worker claiming it, summed over its tries; "
        "part of total_s. "
        "(Filled from 1.4.0; null before.)")
    ingest_s: float | None = Field(
        default=None, ge=0.0,
        description="Reading the files and deciding the series; for a study streamed through, the first batch "
        "decoded too (the rest is decoded during inference_s).")
    inference_s: float | None = Field(
        default=None, ge=0.0,
        description="From the first request to the last answer (decoding the rest of a streamed study overlaps it).")
    aggregate_s: float | None = Field(default=None, ge=0.0)
    total_s: float | None = Field(
        default=None, ge=0.0,
        description="From the job created (the study complete, or the upload accepted; a retried job: its first "
        "creation) to the result: queued_s, every try and the screening. The time before it: receive_s, quiet_s.")
    stages_ms_per_slice: dict[str, float] | None = Field(
        default=None,
        description="Milliseconds per screened slice spent in each stage, summed over the stage's parallel "
        "workers (stages overlap: a study is decoded while it is screened, and several requests are in "
        "flight): decode (pixel data to HU), resample (to the 512 grid), grpc (request round trip less "
        "Triton's own time), queue and compute (Triton's statistics, summed over the ensemble's models; "
        "the two segmentation models run side by side, so together they can pass the ensemble's own "
        "time; for a model that is no ensemble, such as the cpu profile's ct_screen_fused, its own "
        "queue and compute, post-processing included), postprocess (Triton's post-processing model and "
        "unpacking its answer), aggregate (the "
        "case rule and the result). Triton's stages are left out (grpc is then the whole round trip) "
        "when its statistics could not be read; they are averages over the study's window and include "
        "other studies screened at the same time. (Added in 1.1.0.)",
    )

    @model_validator(mode="after")
    def _stages_non_negative(self) -> Timings:
        bad = {k: v for k, v in (self.stages_ms_per_slice or {}).items() if not v >= 0}
        if bad:
            raise ValueError(f"stages_ms_per_slice must be >= 0, got {bad}")
        return self


class RejectedFile(_Model):
    """A file of the upload that did not become a slice, and why."""

    filename: str
    reason: str = Field(pattern=_CODE, description="machine-readable code, e.g. not_dicom")
    message: str


class Gap(_Model):
    """Two neighbouring slices further apart than ``gap_tolerance`` x the nominal spacing."""

    after_sop_instance_uid: str
    before_sop_instance_uid: str
    distance_mm: float = Field(ge=0.0)
    expected_mm: float = Field(ge=0.0)


class CaseResult(_Model):
    """The verdict on one series of one study, with everything needed to check and reproduce it."""

    schema_version: str = SCHEMA_VERSION
    job_id: str | None = None
    created_at: datetime | None = None
    software_version: str | None = None
    uid_root: str | None = Field(
        None, description="the DICOM UID root its SR and key images are made under, fixed when the result is made "
                          "(the site's, else pydicom's), so a result sent again, or named by a later reading, keeps "
                          "its UIDs when the site's root changes; null: pydicom's (a result made before it was "
                          "recorded, when no site root could be set)")
    study_instance_uid: str
    series_instance_uid: str
    verdict: Verdict
    reason: str = Field(pattern=_CODE, description="machine-readable reason, see aggregator.schema.REASONS")
    message: str = Field(description="one human-readable sentence")
    evidence: Evidence | None = Field(
        default=None, description="the longest run found (qualifying or not); None when no lesion"
    )
    n_slices: int = Field(ge=0)
    nominal_spacing_mm: float | None = Field(default=None, ge=0.0)
    lung_field_cm2: float | None = Field(
        default=None, ge=0.0,
        description="the widest classical lung field of the series in cm², measured by ingest on the HU of up to "
                    "12 slices spread over it (rule.min_lung_field_cm2); null: not measured (no usable pixel "
                    "spacing). (Added in 1.2.0.)")
    body_cm2: float | None = Field(
        default=None, ge=0.0,
        description="the widest body section of the same slices in cm² (rule.min_body_cm2). (Added in 1.2.0.)")
    slices: list[SliceFinding] = Field(default_factory=list)
    rule: RuleParams
    models: list[ModelInfo] = Field(default_factory=list)
    timings: Timings = Field(default_factory=Timings)
    rejected: list[RejectedFile] = Field(default_factory=list)
    gaps: list[Gap] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    @property
    def shows_lesions(self) -> bool:
        """False for a series that is no chest CT (reason ``not_chest``): its boxes are no lung lesions, so no object
        made from the result (the SR's regions, key images, KOS, the FHIR run) shows them as lesions."""
        return self.reason != NOT_CHEST


def stored_result(data: Any) -> CaseResult:
    """A result read back from storage: strict first (the fast path, every result this release wrote); only when a
    later release's fields are what it refuses, again with those dropped (:data:`STORED`).

    >>> r = CaseResult(study_instance_uid="1", series_instance_uid="2", verdict="negative", reason="no_findings",
    ...                message="m", n_slices=0, rule=RuleParams(cutoff=0.5, min_area=25, run_slices=3,
    ...                quadrant_split="valid_area", spanning="every", gap_tolerance=1.5, drop_outside_valid=True))
    >>> later = {**r.model_dump(mode="json"), "a_later_field": 1}
    >>> stored_result(later) == r
    True
    """
    try:
        return CaseResult.model_validate(data)
    except ValidationError as exc:
        if not any(e["type"] == "extra_forbidden" for e in exc.errors()):
            raise
    return CaseResult.model_validate(data, context=STORED)


def json_schema() -> dict:
    """The JSON Schema of :class:`CaseResult` (what ``docs/schema/case-result.schema.json`` holds)."""
    schema = CaseResult.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://ctscreen.invalid/schema/case-result/{SCHEMA_VERSION}"
    return schema


def json_schema_text() -> str:
    """:func:`json_schema` as stable, sorted, newline-terminated JSON text."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # pragma: no cover - regeneration entry point
    sys.stdout.write(json_schema_text())
