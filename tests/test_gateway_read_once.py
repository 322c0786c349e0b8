"""One upload, followed through the in-process gateway (routes, ingest, worker, result; only Triton is the
fake of ``tests/gateway_app_fakes.py``): every file is parsed by pydicom exactly once, a zip is expanded
once, and a gap in the series is reported once."""

from __future__ import annotations

import io
import zipfile
from collections import Counter

import pydicom
import pytest
from fastapi.testclient import TestClient

import gateway.uploads
from gateway.main import create_app
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet, ct_series
from tests.gateway_app_fakes import wait_job as _wait

N = 7


@pytest.fixture
def parses(monkeypatch) -> Counter[str]:
    """SOP Instance UID -> how many times ``pydicom.dcmread`` parsed it (any caller, any thread)."""
    seen: Counter[str] = Counter()
    real = pydicom.dcmread

    def counting(*args, **kwargs):
        ds = real(*args, **kwargs)
        seen[str(ds.get("SOPInstanceUID", "?"))] += 1
        return ds

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return seen


@pytest.fixture
def expansions(monkeypatch) -> list[str]:
    """Names of the zip archives expanded."""
    names: list[str] = []
    real = gateway.uploads._iter_zip

    def counting(filename, data, limits):
        names.append(filename)
        return real(filename, data, limits)

    monkeypatch.setattr(gateway.uploads, "_iter_zip", counting)
    return names


def _uids(files: list[tuple[str, bytes]]) -> set[str]:
    return {str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID) for _, data in files}


@pytest.mark.parametrize("as_zip", [False, True], ids=["multipart", "zip"])
def test_each_uploaded_file_is_parsed_once(parses, expansions, as_zip):
    _, files = ct_series(N, lesion=[2, 3, 4])
    uids = _uids(files)
    parses.clear()
    app = create_app(Settings(triton_urls="fake:1"), client_factory=FakeFleet())
    with TestClient(app) as client:
        if as_zip:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                for name, data in files:
                    zf.writestr(f"study/{name}", data)
            r = client.post("/v1/studies", content=buf.getvalue(),
                            headers={"Content-Type": "application/zip", "X-Filename": "study.zip"})
        else:
            r = client.post("/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in files])
        assert r.status_code == 202, r.text
        view = _wait(client, r.json()["job_id"])
        assert view["result"]["verdict"] == "positive"
        assert client.get(f"/v1/jobs/{view['job_id']}/sr").status_code == 200  # the SR needs no second read
    assert dict(parses) == dict.fromkeys(uids, 1)
    assert expansions == (["study.zip"] if as_zip else [])


def test_a_stow_study_is_parsed_once_when_screened(parses):
    """STOW-RS: an instance's three UIDs are read on arrival (to answer for it and file it under its
    study); the job, maybe on another replica, parses each stored file once."""
    uid, files = ct_series(N, lesion=[2, 3, 4])
    uids = _uids(files)
    body = b"".join(b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + d + b"\r\n" for _, d in files)
    app = create_app(Settings(triton_urls="fake:1", stow_quiet_period_s=3600), client_factory=FakeFleet())
    with TestClient(app) as client:
        parses.clear()
        r = client.post("/dicomweb/studies", content=body + b"--b0undary--\r\n",
                        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary'})
        assert r.status_code == 200, r.text
        assert dict(parses) == dict.fromkeys(uids, 1)
        parses.clear()
        job = client.post(f"/v1/studies/{uid}/complete").json()
        assert _wait(client, job["job_id"])["result"]["verdict"] == "positive"
    assert dict(parses) == dict.fromkeys(uids, 1)


def test_a_gap_is_one_gap_and_one_warning():
    _, files = ct_series(8, lesion=[1, 2, 3])
    files = [f for f in files if f[0] != "slice0005.dcm"]  # 20 mm to 30 mm: one missing slice
    app = create_app(Settings(triton_urls="fake:1"), client_factory=FakeFleet())
    with TestClient(app) as client:
        r = client.post("/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in files])
        result = _wait(client, r.json()["job_id"])["result"]
    assert result["verdict"] == "positive" and len(result["gaps"]) == 1
    assert len([w for w in result["warnings"] if "gap" in w.lower()]) == 1, result["warnings"]
