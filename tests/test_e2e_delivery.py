"""Results back to PACS and RIS, end to end with real peers: dcmtk ``storescu`` -> ctscreen (real embedded
Triton) -> Orthanc by C-STORE, a second Orthanc by STOW-RS (its DICOMweb plugin), and a small FHIR R4
receiver (``tests/fhir_receiver.py``) that validates every Bundle with ``fhir.resources``.

The positive phantom study goes to the PACS Orthanc first (it holds the images) and then to ctscreen
from the calling AE ``CT_ROOM_1``; its SR and key images must land in both Orthancs under the same
patient and study, the SR must parse with highdicom and its references resolve to instances the PACS
holds. A negative study follows the rules: not sent to the PACS (positive and indeterminate only), sent
to the RIS (all). ``ctscreen send`` re-sends on request.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import httpx
import pydicom
import pytest

import phantom
from ctscreen.embedded import free_port
from gateway.cli import run_stack, send_main
from gateway.client import screen_path
from tests.fhir_receiver import FhirReceiver
from tests.orthanc import OrthancServer, dicomweb_plugin, orthanc_bin
from tests.test_e2e_gateway import needs_trained
from tests.test_gateway_dimse import STORESCU, needs_dcmtk

pytestmark = [pytest.mark.timeout(600), pytest.mark.triton, needs_dcmtk, needs_trained,
              pytest.mark.skipif(orthanc_bin() is None or dicomweb_plugin() is None,
                                 reason="Orthanc + DICOMweb plugin not installed: scripts/setup.sh --test")]
N_SLICES = 40
AE = "CTSCREEN"


@pytest.fixture(scope="module")
def peers():
    pacs, web, ris = OrthancServer("PACS"), OrthancServer("WEBPACS"), FhirReceiver()
    try:
        yield pacs, web, ris
    finally:
        pacs.close()
        web.close()
        ris.close()


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("delivery-e2e")
    covid = phantom.make_study(seed=11, kind="covid", n_slices=N_SLICES, matrix=512)
    normal = phantom.make_study(seed=12, kind="normal", n_slices=24, matrix=512)
    return {"covid": Path(phantom.write_study(covid, out / "covid", montage=False, salt="deliv")) / "dicom",
            "normal": Path(phantom.write_study(normal, out / "normal", montage=False, salt="deliv"))}


@pytest.fixture(scope="module")
def gateway(triton, peers, tmp_path_factory):
    pacs, web, ris = peers
    destinations = {"destinations": [
        {"name": "pacs", "kind": "dicom", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port,
         "rule": {"verdicts": ["positive", "indeterminate"]}},
        {"name": "web", "kind": "stowrs", "url": web.dicomweb, "headers": {"Authorization": "Bearer t0ken-e2e"},
         "rule": {"verdicts": ["positive", "indeterminate"], "calling_ae_titles": ["CT_ROOM_1"]}},
        {"name": "ris", "kind": "fhir", "url": ris.url, "patient_id_system": "urn:oid:1.2.840.99999.1",
         "accession_system": "urn:oid:1.2.840.99999.2"},
    ]}
    path = tmp_path_factory.mktemp("destinations") / "destinations.json"
    path.write_text(json.dumps(destinations))
    port = free_port()
    overrides = {"stow_quiet_period_s": 1.0, "dicom_port": port, "dicom_host": "127.0.0.1", "dicom_ae_title": AE,
                 "destinations_file": path, "delivery_backoff_s": 0.5, "delivery_backoff_max_s": 1.0,
                 "delivery_poll_s": 0.2}
    with run_stack(port=0, triton_url=triton.grpc_url, settings_overrides=overrides) as stack:
        yield stack, port


def _storescu(port: int, aec: str, folder: Path, aet: str = "STORESCU") -> None:
    import subprocess

    done = subprocess.run([STORESCU, "-aet", aet, "-aec", aec, "+sd", "+r", "127.0.0.1", str(port), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _deliveries(url: str, job_id: str, timeout: float = 240.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    got: list = []
    while time.monotonic() < deadline:
        got = httpx.get(f"{url}/v1/jobs/{job_id}/deliveries", timeout=30).json()
        if len(got) == 3 and all(d["state"] in ("done", "failed", "skipped") for d in got):
            return {d["destination"]: d for d in got}
        time.sleep(0.3)
    raise AssertionError(f"deliveries of {job_id} not final: {got}")


def _job_of_study(url: str, uid: str, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/v1/studies/{uid}", timeout=30)
        if r.status_code == 200 and r.json().get("state") in ("done", "failed"):
            return r.json()
        time.sleep(0.3)
    raise AssertionError(f"study {uid} not screened")


@pytest.fixture(scope="module")
def positive(gateway, peers, studies):
    stack, port = gateway
    pacs, _, _ = peers
    _storescu(pacs.dicom_port, pacs.ae_title, studies["covid"])  # the PACS holds the images
    _storescu(port, AE, studies["covid"], aet="CT_ROOM_1")  # the route sends them to ctscreen
    uid = str(pydicom.dcmread(next(studies["covid"].rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    job = _job_of_study(stack.url, uid)
    assert job["state"] == "done" and job["result"]["verdict"] == "positive", job
    return job, _deliveries(stack.url, job["job_id"])


def _held(orthanc: OrthancServer, uid: str) -> dict[str, dict]:
    out = {}
    for inst in orthanc.instances_of_study(uid):
        out[inst["MainDicomTags"]["SOPInstanceUID"]] = {
            "modality": orthanc.get(f"/series/{inst['ParentSeries']}")["MainDicomTags"]["Modality"],
            "orthanc_study": orthanc.get(f"/series/{inst['ParentSeries']}")["ParentStudy"], "id": inst["ID"]}
    return out


def test_positive_result_lands_in_the_pacs_by_c_store_under_the_same_patient_and_study(positive, peers):
    import highdicom

    job, deliveries = positive
    pacs, _, _ = peers
    d = deliveries["pacs"]
    assert d["state"] == "done", d
    kinds = [o["kind"] for o in d["objects"]]
    assert kinds[0] == "sr" and kinds.count("key_image") == job["result"]["evidence"]["n_slices"]
    held = _held(pacs, job["study_instance_uid"])
    studies_in_pacs = {h["orthanc_study"] for h in held.values()}
    assert len(studies_in_pacs) == 1  # SR, key images and CT images: one patient, one study in Orthanc
    assert {held[o["uid"]]["modality"] for o in d["objects"]} == {"SR", "OT"}
    assert sum(h["modality"] == "CT" for h in held.values()) == N_SLICES
    sr_bytes = pacs.get(f"/instances/{held[d['objects'][0]['uid']]['id']}/file")
    sr = highdicom.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(sr_bytes)))
    refs = {g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for g in sr.content.get_planar_roi_measurement_groups()}
    assert refs and all(held.get(r, {}).get("modality") == "CT" for r in refs)  # resolve to instances it holds
    (verdict,) = sr.content.get_image_measurement_groups()[0].get_qualitative_evaluations()
    assert verdict.value.meaning == "Present"


def test_positive_result_lands_by_stow_rs_and_the_ris_gets_a_valid_report(positive, peers, studies):
    job, deliveries = positive
    _, web, ris = peers
    assert deliveries["web"]["state"] == "done", deliveries["web"]
    held = _held(web, job["study_instance_uid"])
    assert sorted(held) == sorted(o["uid"] for o in deliveries["web"]["objects"])
    assert deliveries["ris"]["state"] == "done" and not ris.errors, ris.errors
    reports = [r for r in ris.resources.values() if r["resourceType"] == "DiagnosticReport"
               and r["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{job['study_instance_uid']}"]
    assert len(reports) == 1 and reports[0]["identifier"][0]["value"] == job["job_id"]
    assert "Present" in json.dumps(ris.resources)
    # the site's own Patient and order, by conditional references the server resolves in the transaction
    source = pydicom.dcmread(next(studies["covid"].rglob("*.dcm")), stop_before_pixels=True)
    report = reports[0]
    assert report["subject"]["reference"] == f"Patient?identifier=urn:oid:1.2.840.99999.1|{source.PatientID}"
    assert report["basedOn"][0]["reference"] == \
        f"ServiceRequest?identifier=urn:oid:1.2.840.99999.2|{source.AccessionNumber}"
    assert report["conclusion"].startswith("Machine reading for screening, not a diagnosis")
    assert [c["code"] for c in report["conclusionCode"][0]["coding"]] == ["840544004"]


def test_negative_result_follows_the_rules(gateway, peers, studies):
    stack, _ = gateway
    pacs, web, ris = peers
    with httpx.Client(base_url=stack.url, timeout=300) as http:
        out = screen_path(http, studies["normal"], quiet=True)
    assert out.result is not None and out.result["verdict"] == "negative", out.error or out.result["reason"]
    deliveries = _deliveries(stack.url, out.job_id)
    assert deliveries["pacs"]["state"] == "skipped" and "negative" in deliveries["pacs"]["history"][-1]["detail"]
    assert deliveries["web"]["state"] == "skipped"
    assert deliveries["ris"]["state"] == "done"
    uid = out.result["study_instance_uid"]
    assert _held(pacs, uid) == {} and _held(web, uid) == {}
    assert any(r["resourceType"] == "DiagnosticReport" and r["identifier"][0]["value"] == out.job_id
               for r in ris.resources.values())


def test_resend_by_cli_is_idempotent_and_metrics_count_per_destination(gateway, positive, peers, capsys):
    stack, _ = gateway
    job, _ = positive
    pacs, _, ris = peers
    before = len(_held(pacs, job["study_instance_uid"]))
    assert send_main([job["job_id"], "--to", "pacs", "--url", stack.url]) == 1  # delivered already
    assert "already" in capsys.readouterr().err
    assert send_main([job["job_id"], "--to", "pacs", "--url", stack.url, "--force"]) == 0
    assert send_main([job["job_id"], "--to", "nowhere", "--url", stack.url]) == 1
    assert "No destination 'nowhere'" in capsys.readouterr().err
    d = _deliveries(stack.url, job["job_id"])["pacs"]
    assert d["state"] == "done" and "forced" in json.dumps(d["history"])
    assert len(_held(pacs, job["study_instance_uid"])) == before  # same UIDs: replaced, not duplicated
    n_reports = sum(r["resourceType"] == "DiagnosticReport" for r in ris.resources.values())
    assert send_main([job["job_id"], "--to", "ris", "--url", stack.url, "--force"]) == 0
    _deliveries(stack.url, job["job_id"])
    assert sum(r["resourceType"] == "DiagnosticReport" for r in ris.resources.values()) == n_reports
    metrics = httpx.get(f"{stack.url}/metrics", timeout=30).text
    assert 'ctscreen_delivery_failures_total{destination="pacs"} 0.0' in metrics
    assert 'ctscreen_deliveries_total{destination="pacs",outcome="done"}' in metrics
    assert "t0ken-e2e" not in metrics
