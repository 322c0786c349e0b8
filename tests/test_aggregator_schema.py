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
