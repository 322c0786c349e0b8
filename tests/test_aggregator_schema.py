"""The case-result schema: the committed JSON Schema is current, and results round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from aggregator.case import CaseRule, SliceInput, decide
from aggregator.schema import (
    REASONS,
    SCHEMA_VERSION,
    Box,
    CaseResult,
    ModelInfo,
    RejectedFile,
    Timings,
    json_schema_text,
    stored_result,
)

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "schema" / "case-result.schema.json"


def test_committed_json_schema_is_current():
    """Regenerate with: python -m aggregator.schema > docs/schema/case-result.schema.json"""
    assert SCHEMA_FILE.read_text() == json_schema_text()


def _result() -> CaseResult:
    va = np.array([100, 100, 400, 400], np.float32)
    box = np.array([[150, 150, 170, 170, 0.9]], np.float32)
    slices = [SliceInput(f"1.2.3.{i}", 2.5 * i, box, va, rows=256, cols=256) for i in range(4)]
    return decide(slices, CaseRule()).to_result(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        models=[ModelInfo(name="lesion", version="1", sha256="ab" * 32, platform="onnxruntime")],
        timings=Timings(inference_s=0.5, total_s=1.0),
        rejected=[RejectedFile(filename="x.txt", reason="not_dicom", message="no DICM preamble")],
        warnings=["ingest warning"],
    )


def test_result_round_trips_through_json():
    result = _result()
    again = CaseResult.model_validate_json(result.model_dump_json())
    assert again == result
    assert again.schema_version == SCHEMA_VERSION
    assert again.verdict == "positive" and again.reason in REASONS
    assert again.rule == CaseRule().params()
    assert again.slices[0].boxes[0].original == Box(x0=75, y0=75, x1=85, y1=85)
    assert again.warnings == ["ingest warning"]


def test_result_matches_its_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(_result().model_dump_json()), json.loads(json_schema_text()))


@pytest.mark.parametrize(
    "bad",
    [
        {"x0": 5, "y0": 0, "x1": 4, "y1": 0},
        {"x0": -1, "y0": 0, "x1": 4, "y1": 0},
        {"x0": 0, "y0": 0, "x1": 4, "y1": 0, "z": 1},
    ],
)
def test_box_rejects_bad_corners_and_unknown_fields(bad):
    with pytest.raises(ValidationError):
        Box(**bad)


def test_result_rejects_unknown_verdict_and_bad_reason_code():
    data = json.loads(_result().model_dump_json())
    with pytest.raises(ValidationError):
        CaseResult.model_validate({**data, "verdict": "maybe"})
    with pytest.raises(ValidationError):
        CaseResult.model_validate({**data, "reason": "Not A Code"})


def _later(data: dict) -> dict:
    """``data`` as a later release might write it: a field this release does not know at the top and inside every
    kind of nested object (a single one, one in a list, one in a list in a list, one in an optional box)."""
    evidence, first, second = data["evidence"], data["slices"][0], data["slices"][1]
    box = {**first["boxes"][0], "a_later_box_field": "x", "grid": {**first["boxes"][0]["grid"], "a_later_corner": 1}}
    return {
        **data, "a_later_field": {"any": ["json"]},
        "rule": {**data["rule"], "a_later_limit": 2.0},
        "timings": {**data["timings"], "a_later_stage_s": 0.1},
        "models": [{**data["models"][0], "a_later_digest": "cd"}],
        "rejected": [{**data["rejected"][0], "a_later_hint": None}],
        "evidence": {**evidence, "a_later_score": 0.5,
                     "slices": [{**evidence["slices"][0], "a_later_note": ""}, *evidence["slices"][1:]]},
        "slices": [{**first, "boxes": [box], "a_later_hu": [-700]},
                   {**second, "valid_area": {**second["valid_area"], "a_later_side": "left"}}, *data["slices"][2:]],
    }


def test_a_stored_result_a_later_release_wrote_is_read_with_its_unknown_fields_dropped_at_every_level():
    """A pod of this release reads a result a pod of a later one stored (a rolling upgrade, a rollback): the later
    fields are dropped wherever they sit and the rest is read as written. The published schema and ``CaseResult``
    itself stay strict: a producer must not invent fields."""
    jsonschema = pytest.importorskip("jsonschema")
    result = _result()
    later = _later(json.loads(result.model_dump_json()))
    assert stored_result(later) == result
    assert stored_result(json.loads(result.model_dump_json())) == result  # this release's own, unchanged
    with pytest.raises(ValidationError, match="a_later_field") as strict:
        CaseResult.model_validate(later)
    assert {e["type"] for e in strict.value.errors()} == {"extra_forbidden"}
    assert len(strict.value.errors()) == json.dumps(later).count('"a_later_')  # every level was reached
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(later, json.loads(json_schema_text()))


@pytest.mark.parametrize(("change", "field"), [
    (lambda d: {**d, "verdict": "maybe"}, "verdict"),
    (lambda d: {k: v for k, v in d.items() if k != "rule"}, "rule"),
    (lambda d: {**d, "n_slices": "many"}, "n_slices"),
    (lambda d: {**d, "slices": [{**d["slices"][0], "boxes": [{**d["slices"][0]["boxes"][0], "score": 7}]}]},
     "slices.0.boxes.0.score"),
    (lambda d: {**d, "evidence": {**d["evidence"], "slices": "none"}}, "evidence.slices"),
], ids=["verdict", "missing-rule", "n_slices", "nested-score", "nested-type"])
def test_a_malformed_stored_result_is_refused_with_the_field_named_even_beside_later_fields(change, field):
    """Tolerance is for fields this release does not know, nothing else: a wrong value, a wrong type or a missing
    field, at the top or nested, is still refused, and the error names it (not the later fields beside it)."""
    data = change(_later(json.loads(_result().model_dump_json())))
    with pytest.raises(ValidationError) as refused:
        stored_result(data)
    assert [".".join(map(str, e["loc"])) for e in refused.value.errors()] == [field]
    for bad in (None, "a result", [1, 2]):
        with pytest.raises(ValidationError, match="CaseResult"):
            stored_result(bad)
