"""Hand-made nasty inputs through ``POST /v1/studies`` and ``POST /dicomweb/studies``.

Each must get a specific 4xx with a ``reason``, or be accepted and screened correctly (a study too
short for the case rule comes back indeterminate, never negative). DICOM parsing, series selection and
the case rule are the real ones; Triton is the fake client of ``tests/gateway_app_fakes.py`` (a mock:
these tests are about input handling, the real inference path is ``tests/test_e2e_gateway.py``).
"""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

from gateway.main import create_app
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet, ct_series, edited
from tests.test_gateway_app_api import upload_files, wait_job

STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'


@pytest.fixture(scope="module")
def client():
    app = create_app(Settings(triton_urls="fake:1", stow_quiet_period_s=60), client_factory=FakeFleet())
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _related(parts: list[bytes]) -> bytes:
    out = b"".join(b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    return out + b"--b0undary--\r\n"


def _stow_and_screen(client, files) -> dict:
    """STOW-RS the files as one study, declare it complete, return its study view once finished."""
    r = client.post("/dicomweb/studies", content=_related([d for _, d in files]), headers={"content-type": STOW_TYPE})
    assert r.status_code == 200, r.text
    location = r.headers["content-location"]
    assert client.post(location + "/complete").status_code == 202
    deadline = time.monotonic() + 20
    while (view := client.get(location).json())["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    return view


def _matrix(rows: int, cols: int):
    def edit(ds):
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = np.zeros((rows, cols), np.int16).tobytes()

    return edit


def _set(keyword: str, value):
    return lambda ds: setattr(ds, keyword, value)


def _drop(keyword: str):
    return lambda ds: delattr(ds, keyword)


_, SERIES = ct_series(6, size=64)
_EMPTY_ZIP = io.BytesIO()
zipfile.ZipFile(_EMPTY_ZIP, "w").close()

# (name, edit of a 6-slice series or a request, expected status, expected reason)
REFUSED = [
    ("nan_slope", _set("RescaleSlope", "NaN"), 422, "not_ct"),  # was: assumed 1, screened
    ("inf_slope", _set("RescaleSlope", "inf"), 422, "not_ct"),  # was: assumed 1, screened
    ("nan_intercept", _set("RescaleIntercept", "nan"), 422, "not_ct"),  # was: assumed 0 -> "positive"
    ("one_pixel", _matrix(1, 1), 422, "no_usable_series"),  # was: upscaled to 512, screened "negative"
    ("zero_rows", _matrix(0, 64), 415, "not_dicom"),
    ("no_position", _drop("ImagePositionPatient"), 422, "no_usable_series"),
    ("no_orientation", _drop("ImageOrientationPatient"), 422, "no_usable_series"),
    # finite but no scanner's: the position arithmetic overflowed into 503 internal_error (Retry-After: retried forever)
    ("huge_position", _set("ImagePositionPatient", [1e308, 1e308, 1e308]), 422, "no_usable_series"),
    ("huge_orientation", _set("ImageOrientationPatient", [1e308, 0, 0, 0, 1e308, 0]), 422, "no_usable_series"),
    ("tiny_orientation", _set("ImageOrientationPatient", [1e-3, 0, 0, 0, 1e-3, 0]), 422, "no_usable_series"),
    # Type 1 UIDs missing: filed under "" (no study URL, no SR, past the mixed-studies check), or named by file
    ("no_study_uid", _drop("StudyInstanceUID"), 400, "invalid_uid"),
    ("no_series_uid", _drop("SeriesInstanceUID"), 400, "invalid_uid"),
    ("no_sop_uid", _drop("SOPInstanceUID"), 400, "invalid_uid"),
]


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize(("name", "edit", "status", "reason"), REFUSED, ids=[c[0] for c in REFUSED])
def test_upload_refuses_bad_ct(client, name, edit, status, reason):
    r = client.post("/v1/studies", files=upload_files(edited(SERIES, edit)))
    assert (r.status_code, r.json()["reason"]) == (status, reason), r.text
    assert r.json()["message"]
    if name == "one_pixel":
        assert {x["reason"] for x in r.json()["rejected"]} == {"too_small"}, r.text


@pytest.mark.parametrize(
    ("kwargs", "status", "reason"),
    [
        (dict(content=b""), 415, "not_dicom"),
        (dict(content=b'{"a": 1}', headers={"content-type": "application/json"}), 415, "not_dicom"),
        (dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}), 400, "bad_upload"),
        (dict(files=[("files", ("empty.zip", _EMPTY_ZIP.getvalue(), "application/zip"))]), 400, "bad_upload"),
        (dict(files=upload_files([(n, d[: len(d) // 2]) for n, d in SERIES])), 422, "undecodable"),
        (dict(files=upload_files([(n, d[:300]) for n, d in SERIES])), 415, "not_dicom"),
    ],
    ids=["empty_body", "json", "multipart_no_boundary", "empty_zip", "truncated_pixels", "truncated_header"],
)
def test_upload_refuses_bad_requests(client, kwargs, status, reason):
    r = client.post("/v1/studies", **kwargs)
    assert (r.status_code, r.json()["reason"]) == (status, reason), r.text


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("edit", [_set("ImagePositionPatient", [1e308, 1e308, 1e308]),
                                  _set("ImageOrientationPatient", [1e308, 0, 0, 0, 1e308, 0])],
                         ids=["huge_position", "huge_orientation"])
def test_one_slice_with_impossible_geometry_is_left_out_and_the_rest_screened(client, edit):
    """Before: 503 internal_error for the whole upload (OverflowError), and via STOW-RS a job failing for good."""
    files = SERIES[:1] + edited(SERIES[1:2], edit) + SERIES[2:]
    r = client.post("/v1/studies", files=upload_files(files))
    assert r.status_code == 202, r.text
    view = wait_job(client, r.json()["job_id"])
    assert view["state"] == "done" and view["result"]["n_slices"] == 5, view
    assert [x["reason"] for x in view["result"]["rejected"]] == ["no_geometry"], view["result"]["rejected"]
    _, another = ct_series(6, size=64)
    stowed = _stow_and_screen(client, edited(another[:1], edit) + another[1:])
    assert stowed["state"] == "done" and stowed["result"]["n_slices"] == 5, stowed


def test_a_file_without_its_study_uid_is_refused_and_counts_for_no_study(client):
    """Before: the file's series was screened and filed under ``""`` (no /v1/studies URL), and an upload of study
    A plus study B without its Study Instance UID passed the mixed-studies check. Now B's files are refused
    (400 ``invalid_uid`` each) and A is screened alone, B's files listed as refused."""
    _, other = ct_series(6, size=64)
    r = client.post("/v1/studies", files=upload_files(SERIES[:4] + edited(other, _drop("StudyInstanceUID"))))
    assert r.status_code == 202, r.text
    view = wait_job(client, r.json()["job_id"])
    study_uid = str(pydicom.dcmread(io.BytesIO(SERIES[0][1]), stop_before_pixels=True).StudyInstanceUID)
    assert view["study_instance_uid"] == study_uid and view["result"]["n_slices"] == 4, view
    assert [x["reason"] for x in view["result"]["rejected"]] == ["invalid_uid"] * 6, view["result"]["rejected"]


def test_upload_of_two_studies_is_refused_not_half_screened(client):
    """Before: 202, the first study screened and the second (positive) dropped with only a warning."""
    _, other = ct_series(4, lesion=[0, 1, 2], size=64)
    r = client.post("/v1/studies", files=upload_files(SERIES + other))
    assert (r.status_code, r.json()["reason"]) == (422, "mixed_studies"), r.text
    assert "2 studies" in r.json()["message"]


def _patient(patient_id: str, issuer: str | None = None):
    def edit(ds):
        ds.PatientID = patient_id
        if issuer is not None:
            ds.IssuerOfPatientID = issuer

    return edit


def test_an_upload_of_two_patients_series_under_one_study_is_refused_and_nothing_kept(client):
    """Before: 202, one study of two patients' series (PatientID PH00000000 and PH00000007, a penetration test),
    screened as one. Now 422 ``mixed_patients``, no patient data in the message, and no study recorded."""
    uid, study = ct_series(4, size=64)
    _, other = ct_series(4, size=64, study_uid=uid)
    files = edited(study, _patient("PH00000000")) + edited(other, _patient("PH00000007"))
    r = client.post("/v1/studies", files=upload_files(files))
    assert (r.status_code, r.json()["reason"]) == (422, "mixed_patients"), r.text
    assert "PH0" not in r.text and "2 patients" in r.json()["message"]
    assert client.get(f"/v1/studies/{uid}").status_code == 404
    # the same ID from another issuer is another patient too
    r = client.post("/v1/studies", files=upload_files(edited(study, _patient("PH00000000", "HOSP-A"))
                                                      + edited(other, _patient("PH00000000"))))
    assert (r.status_code, r.json()["reason"]) == (422, "mixed_patients"), r.text


def test_an_upload_naming_another_patient_than_the_studys_is_refused_and_its_reading_kept(client):
    """Before: the second upload (patient B's slices under A's Study Instance UID) was version 2, screened, and
    superseded A's reading. Now 409 ``patient_mismatch`` and the study's latest job is still A's; A's own
    study sent again is still taken (version 2)."""
    uid, study = ct_series(4, size=64)
    r = client.post("/v1/studies", files=upload_files(edited(study, _patient("PH00000000"))))
    assert r.status_code == 202, r.text
    first = wait_job(client, r.json()["job_id"])["job_id"]
    _, other = ct_series(4, size=64, study_uid=uid)
    r = client.post("/v1/studies", files=upload_files(edited(other, _patient("PH00000007"))))
    assert (r.status_code, r.json()["reason"]) == (409, "patient_mismatch"), r.text
    assert "PH0" not in r.text
    assert client.get(f"/v1/studies/{uid}").json()["job_id"] == first
    r = client.post("/v1/studies", files=upload_files(edited(study, _patient("PH00000000"))))
    assert r.status_code == 202, r.text
    assert wait_job(client, r.json()["job_id"])["state"] == "done"
    assert client.get(f"/v1/studies/{uid}").json()["job_id"] == r.json()["job_id"] != first


def test_a_stow_instance_of_another_patient_under_a_studys_uid_fails_and_nothing_is_kept(client):
    """Before: stored (200) into the study's version, which then held both patients' series. Now that instance
    fails with FailureReason 0xA901 (409 when it is the only one, 202 beside A's own), no patient data in the
    answer, and the study holds A's instances alone."""
    uid, study = ct_series(4, size=64)
    a = edited(study, _patient("PH00000000"))
    _, other = ct_series(2, size=64, study_uid=uid)
    b = edited(other, _patient("PH00000007"))
    r = client.post(f"/dicomweb/studies/{uid}", content=_related([d for _, d in a[:2]]), headers={"content-type": STOW_TYPE})
    assert r.status_code == 200, r.text
    r = client.post(f"/dicomweb/studies/{uid}", content=_related([b[0][1]]), headers={"content-type": STOW_TYPE})
    assert r.status_code == 409, r.text
    assert [f["00081197"]["Value"] for f in r.json()["00081198"]["Value"]] == [[0xA901]] and "PH0" not in r.text
    r = client.post("/dicomweb/studies", content=_related([a[2][1], b[1][1], a[3][1]]), headers={"content-type": STOW_TYPE})
    assert r.status_code == 202, r.text
    assert [f["00081197"]["Value"] for f in r.json()["00081198"]["Value"]] == [[0xA901]]
    assert client.get(f"/v1/studies/{uid}").json()["instances_received"] == 4


@pytest.mark.parametrize(
    "files",
    [ct_series(2, lesion=[0, 1], size=64)[1], ct_series(1, size=64)[1],
     edited(SERIES, _set("ImagePositionPatient", [-250.0, -250.0, 0.0]))],
    ids=["two_slices_with_lesions", "one_slice", "all_at_one_position"],
)
def test_too_short_study_is_screened_indeterminate(client, files):
    r = client.post("/v1/studies", files=upload_files(files))
    assert r.status_code == 202, r.text
    view = wait_job(client, r.json()["job_id"])
    assert view["state"] == "done" and view["result"]["verdict"] == "indeterminate", view


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b"", STOW_TYPE, 400, "bad_upload"),
        (b"abc", "", 415, "unsupported_media_type"),
        (b"abc", 'multipart/related; type="application/dicom"', 400, "bad_upload"),
        (b"--b0undary--\r\n", STOW_TYPE, 400, "bad_upload"),  # the type is right, the body malformed (was 415)
    ],
    ids=["empty", "no_content_type", "no_boundary", "zero_parts"],
)
def test_stow_refuses_bad_requests(client, body, content_type, status, reason):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/dicomweb/studies", content=body, headers=headers)
    assert (r.status_code, r.json()["reason"]) == (status, reason), r.text


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_stow_nan_slope_study_fails_with_reason(client):
    view = _stow_and_screen(client, edited(ct_series(6, size=64)[1], _set("RescaleSlope", "NaN")))
    assert view["state"] == "failed" and view["error"]["reason"] == "no_usable_series", view
    assert {r["reason"] for r in view["error"]["detail"]["rejected"]} == {"not_ct"}, view


def test_stow_two_slice_study_is_indeterminate(client):
    view = _stow_and_screen(client, ct_series(2, lesion=[0, 1], size=64)[1])
    assert view["state"] == "done" and view["result"]["verdict"] == "indeterminate", view
