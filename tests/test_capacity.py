"""The capacity table (issue #11 item 4): which figures it takes from where, and one real run."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks import capacity
from training import evaluate_real

REPO = capacity.REPO_ROOT


def test_calibrated_cutoff_comes_from_the_card() -> None:
    assert capacity.calibrated_cutoff({"training": {"calibration": {"cutoff": 0.6, "table": []}}}) == 0.6
    assert capacity.calibrated_cutoff({"training": {}}) is None


def test_a_candidate_folder_without_its_files_is_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        capacity.main(["--candidate", f"x={tmp_path}", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "candidate x: no model.onnx" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        capacity.main(["--candidate", "no-equals-sign"])


def test_capacity_row_of_the_shipped_model_on_the_real_hu_slices(tmp_path) -> None:
    """One real run (ONNX Runtime on the shipped files, the real HU slices of dicom-edge-cases)."""
    if not evaluate_real.EDGE_CASES.is_dir():
        pytest.skip(f"real DICOM edge cases absent ({evaluate_real.EDGE_CASES}): nothing real to run on")
    try:
        capacity.realct.real_ct_root(None)
    except capacity.realct.DataError as exc:
        pytest.skip(f"real CT absent: {exc}")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for f in ("model.onnx", "model_card.json"):
        shutil.copy(REPO / "model_repository" / "lesion" / "1" / f, shipped / f)
    out = tmp_path / "out"
    assert capacity.main(["--candidate", f"lite={shipped}", "--sections", "dicom", "--reps", "1",
                          "--val-phantom-studies", "0",
                          "--out", str(out)]) == 0
    doc = json.loads((out / "capacity.json").read_text())
    (row,) = doc["candidates"]
    assert row["shipped"] is True and row["architecture"] == "mobilenet_v2 d4 (48,32,16,16) @256"
    assert row["speed"]["batch1"] > 0 and row["calibrated_cutoff"] == 0.5
    # the validation figures are measured on the real validation split (10 radiologist slices: 0.1 steps)
    assert row["validation"]["sensitivity"] >= 0.9 and row["validation"]["false_boxes_per_slice"] <= 0.3
    boxes = row["held_out"]["real_dicom_boxes"]
    assert boxes["pydicom/explicit_VR-UN.dcm"] == 0 and len(boxes) == 6
    assert "lite **shipped**" in (out / "capacity.md").read_text()
