"""The audit trail (``gateway.audit``) and the guarantee that no log or audit line holds PHI.

Phantom studies (``phantom.write_study``: known patient names, IDs, birth dates and accession numbers) go
through every way in (upload, STOW-RS, DIMSE C-STORE) and every way out (job, study, events, SR), with an
API key, a refused credential and a bad UID on the way. Every application log record (DEBUG and up, every
logger, exceptions included) and every audit line is then scanned for each patient's identifiers.

Triton is the fake client of ``tests/gateway_app_fakes.py`` (Triton never sees headers; the PHI risk is in
the gateway's own logs); DICOM parsing, the job store, STOW, the SCP and the SR encoder are the real ones.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

import phantom
from ctscreen.embedded import free_port
from gateway import keys as keys_cli
from gateway.dimse_scu import steady_reactor
from gateway.main import create_app
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet, edited
from tests.test_gateway_app_api import STOW_TYPE, related_body

MALFORMED = {"PatientBirthDate": "03/02/1901", "StudyDate": "2020133", "StudyTime": "25:61:99",
             "PatientName": "GOUDURIX"}
"""Dates as some scanners write them (pydicom quotes such values in its warnings, highdicom refuses them),
and a one-component name (highdicom quotes it in a warning)."""


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("phi")
    folders = [Path(phantom.write_study(phantom.make_study(seed=seed, kind=kind, n_slices=8, matrix=128),
                                        out / f"{kind}-{seed}", montage=False)) / "dicom"
               for seed, kind in ((41, "covid"), (42, "normal"), (43, "covid"), (44, "covid"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in folders[3].glob("*.dcm"):
            ds = pydicom.dcmread(f)
            for keyword, value in MALFORMED.items():
                ds.add_new(pydicom.datadict.tag_for_keyword(keyword), pydicom.datadict.dictionary_VR(keyword), value)
            ds.save_as(f)
    return folders


def _phi(folder: Path) -> set[str]:
    ds = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    name = str(ds.PatientName)
    return {name, *name.split("^"), str(ds.PatientID), str(ds.PatientBirthDate), str(ds.AccessionNumber)} - {""}


def _wait(client: TestClient, url: str, headers: dict[str, str]) -> dict:
    deadline = time.monotonic() + 30
    while True:
        view = client.get(url, headers=headers).json()
        if view.get("state") in ("done", "failed") or time.monotonic() > deadline:
            return view
        time.sleep(0.05)


def test_no_phi_in_any_log_or_audit_line(studies, tmp_path, caplog, recwarn):
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    keyfile, audit_file = tmp_path / "keys.json", tmp_path / "audit.jsonl"
    dicom_port = free_port()
    settings = Settings(triton_urls="fake:1", auth_api_keys_file=keyfile, audit_log_file=audit_file,
                        data_dir=tmp_path / "data", stow_quiet_period_s=0.3, dicom_port=dicom_port,
                        dicom_host="127.0.0.1", dicom_allowed_peers="PHISCU@127.0.0.1")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        keys_cli.main(["--file", str(keyfile), "add", "robot2", "--scopes", "admin"])
    auth = {"X-API-Key": out.getvalue().strip()}
    upload, stow, dimse, malformed = studies
    with TestClient(create_app(settings, client_factory=FakeFleet()), raise_server_exceptions=False) as client:
        files = sorted(upload.glob("*.dcm"))
        # an export folder named after the patient, as PACS exports often are; a file in it refused, one re-sent
        head = pydicom.dcmread(files[0], stop_before_pixels=True)
        folder = f"{str(head.PatientName).replace('^', '_')}_{head.PatientID}"
        parts = [(f"{folder}/{f.name}", f.read_bytes()) for f in files]
        parts += [(f"{folder}/notes.txt", b"not dicom at all"), (f"{folder}/again.dcm", files[0].read_bytes())]
        # a client's request id made of the patient's name and ID: replaced, never logged nor audited
        r = client.post("/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in parts],
                        headers={**auth, "X-Request-ID": folder})
        assert r.status_code == 202, r.text
        assert r.headers["x-request-id"] != folder
        job = _wait(client, r.headers["location"], auth)
        assert job["state"] == "done", job
        assert client.get(f"{r.headers['location']}/sr", headers=auth).status_code == 200
        assert client.get(f"{r.headers['location']}/events", headers=auth).status_code == 200
        r = client.post("/dicomweb/studies", content=related_body([f.read_bytes() for f in sorted(stow.glob("*.dcm"))]),
                        headers={"content-type": STOW_TYPE, **auth})
        assert r.status_code == 200, r.text
        uid = r.headers["content-location"].rsplit("/", 1)[1]
        assert _wait(client, f"/v1/studies/{uid}", auth)["state"] == "done"
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage

        scu = AE(ae_title="PHISCU")
        scu.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", dicom_port, ae_title="CTSCREEN")
        assert assoc.is_established
        steady_reactor(assoc)
        statuses = [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in sorted(dimse.glob("*.dcm"))]
        assoc.release()
        assert set(statuses) == {0}
        dimse_uid = str(pydicom.dcmread(next(dimse.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
        assert _wait(client, f"/v1/studies/{dimse_uid}", auth)["state"] == "done"
        # dates a scanner wrote malformed: the SR is made with them left empty, and no line quotes them
        files = sorted(malformed.glob("*.dcm"))
        r = client.post("/v1/studies", files=[("files", (f.name, f.read_bytes(), "application/dicom")) for f in files],
                        headers=auth)
        assert r.status_code == 202, r.text
        assert _wait(client, r.headers["location"], auth)["state"] == "done"
        sr = client.get(f"{r.headers['location']}/sr", headers=auth)
        assert sr.status_code == 200, sr.text
        sr = pydicom.dcmread(io.BytesIO(sr.content))
        assert (sr.PatientBirthDate, sr.StudyDate, sr.StudyTime) == ("", "", "") and sr.PatientID
        # refusals on the way: no credential, a bad UID, a non-CT part
        assert client.get(f"/v1/studies/{dimse_uid}").status_code == 401
        assert client.get("/v1/studies/..%2F..", headers=auth).status_code in (400, 404)
    lines = [caplog.text, *(r.getMessage() for r in caplog.records), *(str(w.message) for w in recwarn)]
    audit = audit_file.read_text().splitlines()
    records = [json.loads(line) for line in audit]
    actions = {r["action"] for r in records}
    assert {"POST /v1/studies", "GET /v1/jobs/{job_id}/sr", "POST /dicomweb/studies"} <= actions, actions
    assert any(r["action"].startswith("DICOM C-STORE") and r["study_instance_uid"] == dimse_uid for r in records)
    assert any(r["who"] == "key:robot2" and r["outcome"] == "ok" for r in records)
    assert any(r["outcome"] == "denied" and r["status"] == 401 for r in records)
    assert all(set(r) == {"ts", "who", "auth", "scope", "action", "study_instance_uid", "job_id", "request_id", "client",
                          "status", "outcome", "reason"} for r in records)
    # an HTTP request's record has its id, a DICOM association's none
    assert all((r["request_id"] is None) == r["action"].startswith("DICOM") for r in records), records
    for folder in studies:
        for value in _phi(folder):
            assert len(value) >= 5  # the scan means something
            hits = [ln for ln in [*lines, *audit] if value in ln]
            assert hits == [], (value, hits[:3])


def _swallowing_modality(data: bytes) -> bytes:
    """One byte of the Modality element's length changed (2 -> 512): its value takes in the elements after it,
    the patient's name and ID among them, and the file is refused as not CT quoting that value."""
    at = data.find(b"\x08\x00\x60\x00CS\x02\x00CT")
    assert at > 0
    return data[: at + 6] + b"\x00\x02" + data[at + 8 :]


def test_header_values_a_refusal_or_a_failed_sr_quotes_never_reach_a_log_line(studies, tmp_path, caplog):
    """Two ways patient data reached the log at the default level, both seen there before the fix: a file refused
    as not CT whose broken Modality took in the patient's name and ID (``refused ...: not_ct (Modality is
    '...DOE^JANE...')`` on upload; the SCP's refusals log their reason alone too), and a patient's name
    stored with a wrong VR (FL), whose pydicom error the SR's context logged (``no SR context for study: ...
    b'DOE^JANE^X'``). The refusal now names a Modality that is no defined term by its length only: the
    result keeps it, and every reader of results sees it."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    caplog.set_level(logging.DEBUG)
    name, patient_id = "DOE^JANE^X", "MRN-778899"

    def identify(ds):
        ds.PatientName, ds.PatientID = name, patient_id

    def name_as_float(ds):  # the same study of the same patient (another patient's would be refused: patient_mismatch)
        ds.PatientID = patient_id
        value = name.encode() + (b" " if len(name) % 2 else b"")
        ds._dict[Tag(0x00100010)] = RawDataElement(Tag(0x00100010), "FL", len(value), value, 0, False, True)

    files = sorted(studies[1].glob("*.dcm"))
    good = edited([(f.name, f.read_bytes()) for f in files], identify)
    refused = [(good[0][0], _swallowing_modality(good[0][1])), *good[1:]]
    settings = Settings(triton_urls="fake:1", data_dir=tmp_path / "data")
    with TestClient(create_app(settings, client_factory=FakeFleet()), raise_server_exceptions=False) as client:
        r = client.post("/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in refused])
        assert r.status_code == 202, r.text
        job = _wait(client, r.headers["location"], {})
        assert job["state"] == "done" and [x["reason"] for x in job["result"]["rejected"]] == ["not_ct"], job
        # the refusal says what was wrong without quoting the value: the result is read by every reader of results
        # (a privacy review found the name in jobs' errors and results, served to results:read)
        message = job["result"]["rejected"][0]["message"]
        assert message.startswith("Modality is an unrecognised value of ") and "withheld" in message, message
        assert not [v for v in ("DOE", "JANE", patient_id) if v in json.dumps(job)], job
        r = client.post("/v1/studies", files=[("files", (n, d, "application/dicom"))
                                              for n, d in edited([(f.name, f.read_bytes()) for f in files], name_as_float)])
        assert r.status_code == 202, r.text
        assert _wait(client, r.headers["location"], {})["state"] == "done"
    messages = [r.getMessage() for r in caplog.records]
    assert any("no SR context" in m for m in messages)
    assert any(m.startswith("refused ") and "not_ct" in m for m in messages)
    for value in ("DOE^JANE", "DOE", "JANE", patient_id):
        hits = [m for m in messages if value in m]
        assert not hits, hits
