"""Ingest of phantom studies written by ``phantom.write_study`` (real DICOM files on disk), mixed
with the series a real scanner adds: a scout, a second smaller axial series, a coronal reformat."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import phantom
from gateway.dicom import to_grid
from gateway.ingest import load_study
from tests.gateway_dicom_factory import CORONAL, ct_dataset, to_bytes

write_study = getattr(phantom, "write_study", None)
pytestmark = pytest.mark.skipif(write_study is None, reason="phantom.write_study not available yet")


@pytest.fixture(scope="module")
def covid(tmp_path_factory: pytest.TempPathFactory) -> tuple[phantom.Study, Path]:
    study = phantom.make_study(3, "covid", n_slices=10, matrix=128)
    out = write_study(
        study, tmp_path_factory.mktemp("covid"), encoding="jpeg2000", shuffle=True, montage=False
    )
    return study, out


def _read_dir(folder: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted((folder / "dicom").iterdir())]


def test_shuffled_jpeg2000_phantom_decodes_to_its_truth(covid: tuple[phantom.Study, Path]) -> None:
    truth, out = covid
    study = load_study(_read_dir(out), workers=2)
    assert study.n_slices == truth.hu.shape[0]
    # Study docs: index 0 is the most inferior slice, positions increase along +z (the normal)
    np.testing.assert_allclose([s.position_mm for s in study.slices], truth.positions[:, 2], atol=1e-3)
    for i in range(study.n_slices):
        np.testing.assert_array_equal(study.hu[i], to_grid(truth.hu[i])[0])
    assert all(s.grid.scale == 128 / 512 for s in study.slices)
    assert study.rejected == []


def _in_study(data: bytes | pydicom.Dataset, study_uid: str, patient_id: str) -> bytes:
    """``data`` as an instance of that study and its patient (another patient's would refuse the upload:
    mixed_patients)."""
    ds = pydicom.dcmread(io.BytesIO(data)) if isinstance(data, bytes) else data
    ds.StudyInstanceUID, ds.PatientID = study_uid, patient_id
    return to_bytes(ds)


def test_phantom_series_wins_over_scout_small_series_and_reformat(
    covid: tuple[phantom.Study, Path], tmp_path: Path
) -> None:
    truth, out = covid
    files = _read_dir(out)
    ref = load_study(files[:1])
    study_uid = ref.study_instance_uid
    patient = str(pydicom.dcmread(io.BytesIO(files[0][1]), stop_before_pixels=True).PatientID)
    # scout: a coronal LOCALIZER built from the phantom volume
    coronal = truth.hu[:, 64, :][::-1]
    files.append(
        (
            "scout.dcm",
            _in_study(
                ct_dataset(
                    coronal,
                    study_uid=study_uid,
                    orientation=CORONAL,
                    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                ),
                study_uid,
                patient,
            ),
        )
    )
    # a second, smaller axial series of another phantom (same study)
    other = phantom.make_study(4, "normal", n_slices=4, matrix=64)
    small = write_study(other, tmp_path / "small", encoding="explicit", salt="second", montage=False)
    files += [(f"small/{n}", _in_study(d, study_uid, patient)) for n, d in _read_dir(small)]
    # a coronal reformat with more images than the axial series: not axial, left out
    reformat_uid = generate_uid()
    for k in range(0, 128, 8):
        img = truth.hu[:, k, :][::-1]
        files.append(
            (
                f"cor/{k}.dcm",
                _in_study(
                    ct_dataset(
                        img,
                        study_uid=study_uid,
                        series_uid=reformat_uid,
                        orientation=CORONAL,
                        position=(0.0, float(k), 0.0),
                        image_type=("DERIVED", "SECONDARY", "REFORMATTED"),
                    ),
                    study_uid,
                    patient,
                ),
            )
        )
    study = load_study(files)
    assert study.series_instance_uid == ref.series_instance_uid
    assert study.n_slices == truth.hu.shape[0]
    reasons = {r.filename.split("/")[0]: r.reason for r in study.excluded}
    assert reasons == {"scout.dcm": "localizer", "cor": "not_original"}
    assert list(study.other_series.values()) == [4]
