"""DICOM C-STORE into the gateway (``gateway.dimse``) with real peers, and the SR of a job.

Nothing is faked: dcmtk's ``storescu`` / ``echoscu`` (or pynetdicom as the SCU) talk DIMSE over TCP to
the gateway's Storage SCP; in the live tests the gateway runs under uvicorn on a free port with the
real embedded Triton of the session fixture ``triton``, and the studies are phantom DICOM files.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

import phantom
from aggregator.schema import CaseResult
from ctscreen.embedded import free_port
from gateway.audit import AuditLog
from gateway.cli import run_stack, serve_main
from gateway.dicom_security import PeerPolicy, parse_peers
from gateway.dimse import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, StorageScp
from gateway.dimse_scu import steady_reactor
from gateway.ingest import load_study
from gateway.metrics import Metrics
from gateway.store import FolderBlobs, Store
from gateway.store.migrate import upgrade
from gateway.stow import PATIENT_MISMATCH, Intake
from tests.gateway_dicom_factory import ct_dataset, study_companions
from tests.test_e2e_gateway import models_trained

pytestmark = pytest.mark.timeout(300)


def _dcmtk(name: str) -> str | None:
    """Path of dcmtk's ``name`` on PATH, skipping same-named Python scripts (pynetdicom installs its own
    ``storescu``/``echoscu`` console scripts into the venv, which comes first on PATH under scripts/test.sh)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / name
        try:
            with candidate.open("rb") as fh:
                if fh.read(4) == b"\x7fELF" and os.access(candidate, os.X_OK):
                    return str(candidate)
        except OSError:
            continue
    return None


STORESCU, ECHOSCU = _dcmtk("storescu"), _dcmtk("echoscu")
needs_dcmtk = pytest.mark.skipif(STORESCU is None or ECHOSCU is None,
                                 reason="dcmtk (storescu, echoscu) is not installed: scripts/setup.sh --test installs it")

ROOT = Path(__file__).resolve().parents[1]
MR = ROOT.parent / "shared" / "data" / "dicom-edge-cases" / "fo-dicom" / "GH064.dcm"
N_SLICES = 40
AE = "CTSCREEN"


@pytest.fixture(scope="module")
def dimse_studies(tmp_path_factory) -> dict[str, Path]:
    """A 512-matrix COVID phantom study as explicit-LE files, and its twin (other UIDs) as JPEG 2000."""
    out = tmp_path_factory.mktemp("dimse-studies")
    covid = phantom.make_study(seed=11, kind="covid", n_slices=N_SLICES, matrix=512)
    return {
        "plain": Path(phantom.write_study(covid, out / "plain", montage=False)) / "dicom",
        "j2k": Path(phantom.write_study(covid, out / "j2k", encoding="jpeg2000", salt="j2k", montage=False)) / "dicom",
    }


@pytest.fixture(scope="module")
def dimse_gateway(triton):
    """A live gateway with its Storage SCP on a free port and a 1 s quiet period."""
    port = free_port()
    overrides = {"stow_quiet_period_s": 1.0, "dicom_port": port, "dicom_host": "127.0.0.1", "dicom_ae_title": AE}
    with run_stack(port=0, triton_url=triton.grpc_url, settings_overrides=overrides) as stack:
        yield stack, port


def _storescu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STORESCU, "-aec", AE, *args], capture_output=True, text=True, timeout=120)


def _screened(url: str, uid: str, timeout: float = 120.0) -> dict:
    """The study's job once done (the quiet period triggers it)."""
    deadline = time.monotonic() + timeout
    view: dict = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        while time.monotonic() < deadline:
            r = http.get(f"/v1/studies/{uid}")
            if r.status_code == 200:
                view = r.json()
                if view.get("state") in ("done", "failed"):
                    return view
            time.sleep(0.2)
    raise AssertionError(f"study {uid} not screened in {timeout} s: {view}")


def _send_study(port: int, folder: Path, *propose: str, companions: Path | None = None) -> tuple[str, str]:
    """``storescu`` sends every file of ``folder`` (then those of ``companions``) in one association; returns the
    study UID and storescu's verbose log."""
    files = sorted(folder.rglob("*.dcm"))
    assert len(files) == N_SLICES
    more = [str(companions)] if companions is not None else []
    done = _storescu("-v", *propose, "+sd", "+r", "127.0.0.1", str(port), str(folder), *more)
    assert done.returncode == 0, done.stdout + done.stderr
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), done.stdout + done.stderr


def _companions_of(folder: Path, out: Path) -> Path:
    """A dose SR and a secondary capture of the study in ``folder``, written to ``out``."""
    study = str(pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    out.mkdir(parents=True, exist_ok=True)
    for n, ds in enumerate(study_companions(study)):
        ds.save_as(out / f"companion{n}.dcm", enforce_file_format=True)
    return out


def _per_slice(result: CaseResult) -> list[tuple]:
    return [(s.position_mm, s.valid_area, [(b.grid, round(b.score, 4)) for b in s.boxes]) for s in result.slices]


@pytest.fixture(scope="module")
def received(dimse_gateway, dimse_studies, tmp_path_factory) -> dict[str, dict]:
    """Each study pushed by storescu (plain: default syntaxes, with the study's dose SR and secondary capture
    in the same association, as a PACS routes a whole study; twin: JPEG 2000 lossless proposed)."""
    stack, port = dimse_gateway
    companions = _companions_of(dimse_studies["plain"], tmp_path_factory.mktemp("companions"))
    sent = {"plain": _send_study(port, dimse_studies["plain"], companions=companions),
            "j2k": _send_study(port, dimse_studies["j2k"], "-xv")}
    return {name: {**_screened(stack.url, uid), "storescu_log": log} for name, (uid, log) in sent.items()}


@pytest.mark.triton
@needs_dcmtk
def test_c_echo(dimse_gateway):
    _, port = dimse_gateway
    done = subprocess.run([ECHOSCU, "-v", "-aec", AE, "127.0.0.1", str(port)], capture_output=True, text=True,
                          timeout=60)
    out = done.stdout + done.stderr
    # echoscu exits 0 whatever status the C-ECHO response carries: the status is in its log
    assert done.returncode == 0 and "Received Echo Response (Success)" in out, out


@pytest.mark.triton
@needs_dcmtk
def test_storescu_study_is_screened_with_every_slice(received, dimse_studies):
    """storescu (halt on error, its default) sent the dose SR and the secondary capture after the CT: each was
    answered Success (discarded), and the study was screened with its CT slices alone."""
    view = received["plain"]
    assert view["state"] == "done", view
    log = received["plain"]["storescu_log"]
    assert log.count("Received Store Response (Success)") == N_SLICES + 2, log[-2000:]
    result = CaseResult.model_validate(view["result"])
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in dimse_studies["plain"].rglob("*.dcm")}
    assert result.n_slices == N_SLICES and {s.sop_instance_uid for s in result.slices} == sent
    assert [s.index for s in result.slices] == list(range(N_SLICES))
    if models_trained():
        assert result.verdict == "positive" and result.reason == "run_found", (result.reason, result.message)


@pytest.mark.triton
@needs_dcmtk
def test_jpeg2000_twin_gives_the_same_boxes(received, dimse_studies):
    ts = pydicom.dcmread(next(dimse_studies["j2k"].rglob("*.dcm")), stop_before_pixels=True).file_meta
    assert ts.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    assert "JPEG 2000 (Lossless only) -> JPEG 2000 (Lossless only)" in received["j2k"]["storescu_log"]  # sent as is
    plain = CaseResult.model_validate(received["plain"]["result"])
    j2k = CaseResult.model_validate(received["j2k"]["result"])
    assert j2k.study_instance_uid != plain.study_instance_uid
    assert (j2k.verdict, j2k.reason, j2k.n_slices) == (plain.verdict, plain.reason, plain.n_slices)
    assert _per_slice(j2k) == _per_slice(plain)


@pytest.mark.triton
@needs_dcmtk
def test_non_ct_instance_is_answered_success_and_not_kept(dimse_gateway):
    if not MR.is_file():
        pytest.skip(f"{MR} is absent (the shared DICOM edge cases)")
    stack, port = dimse_gateway
    done = _storescu("-v", "-xv", "127.0.0.1", str(port), str(MR))
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "Received Store Response (Success)" in out, out
    study = str(pydicom.dcmread(MR, stop_before_pixels=True).StudyInstanceUID)
    assert httpx.get(f"{stack.url}/v1/studies/{study}", timeout=30).status_code == 404


@needs_dcmtk
def test_non_ct_instance_is_refused_by_negotiation_when_asked(make_scp):
    """``CTSCREEN_DICOM_ACCEPT_NON_CT=refuse``: the behaviour before discarding, for a site that wants it."""
    if not MR.is_file():
        pytest.skip(f"{MR} is absent (the shared DICOM edge cases)")
    scp = make_scp(non_ct="refuse")
    done = _storescu("-xv", "127.0.0.1", str(scp.port), str(MR))
    out = done.stdout + done.stderr
    # associated (so the SCP was there), but MR Image Storage was not among the accepted contexts; a non-zero
    # exit alone would also come from a refused connection or a C-STORE refused after transfer
    assert done.returncode != 0 and "No presentation context for: (MR)" in out, out


@pytest.mark.triton
@needs_dcmtk
def test_sr_of_a_screened_job(received, dimse_gateway):
    stack, _ = dimse_gateway
    view = received["plain"]
    r = httpx.get(f"{stack.url}/v1/jobs/{view['job_id']}/sr", timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(io.BytesIO(r.content))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == view["study_instance_uid"]
    import highdicom

    report = highdicom.sr.Comprehensive3DSR.from_dataset(sr)
    (evaluation,) = report.content.get_image_measurement_groups()[0].get_qualitative_evaluations()
    expected = {"positive": "Present", "negative": "Absent", "indeterminate": "Indeterminate"}
    assert evaluation.value.meaning == expected[view["result"]["verdict"]]
    missing = httpx.get(f"{stack.url}/v1/jobs/nosuchjob/sr", timeout=30)
    assert missing.status_code == 404 and missing.json()["reason"] == "not_found"


def test_serve_refuses_a_bad_dicom_port(capsys):
    with pytest.raises(SystemExit) as exc:
        serve_main(["--dicom-port", "70000"])
    assert exc.value.code == 2 and "--dicom-port must be 1..65535" in capsys.readouterr().err


# --- the SCP alone: statuses a full buffer and an unreadable header get ---------------------------
@pytest.fixture
def make_scp(tmp_path_factory):
    """Start StorageScps (given options) on their own loop thread, each over an Intake (SQLite and a blob
    folder of its own) that holds at most 512 KiB of receiving studies (no sweeper: never screened), with an
    audit log (``scp.audit.path``) and metrics; all stopped at the end."""
    data = tmp_path_factory.mktemp("lone-scp")
    url = f"sqlite:///{data / 'state.db'}"
    upgrade(url)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    store = Store(url)
    started: list[StorageScp] = []

    def make(**options) -> StorageScp:
        n = len(started)
        stow = Intake(store, FolderBlobs(data / f"blobs{n}"), max_pending_studies=4, max_pending_bytes=512 * 1024)
        scp = StorageScp(stow, loop, port=free_port(), host="127.0.0.1", ae_title=AE, metrics=Metrics(),
                         audit=AuditLog(data / f"audit{n}.jsonl"), **options)
        scp.start()
        started.append(scp)
        return scp

    try:
        yield make
    finally:
        for scp in started:
            scp.stop()
            scp.audit.close()
        asyncio.run_coroutine_threadsafe(store.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def lone_scp(make_scp):
    """A StorageScp with the default options."""
    return make_scp()


def test_full_buffer_and_unreadable_header_get_their_status(lone_scp):
    """pynetdicom as the SCU: 0x0000 stored, 0xA700 out of resources, 0xC000 cannot understand."""

    small = ct_dataset(np.full((16, 16), -1000, np.int16))
    big = ct_dataset(np.full((512, 512), -1000, np.int16), study_uid=str(small.StudyInstanceUID))
    no_study = ct_dataset(np.full((16, 16), -1000, np.int16))
    del no_study.StudyInstanceUID
    statuses = _c_store(lone_scp.port, small, big, no_study)
    assert statuses == [SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND]
    held = asyncio.run_coroutine_threadsafe(_pending(lone_scp.stow, str(small.StudyInstanceUID)), lone_scp.loop)
    assert held.result(10) == ("receiving", 1)


def test_a_data_set_that_is_not_the_instance_its_command_names_is_refused(lone_scp, tmp_path, monkeypatch):
    """PS3.7: the Affected SOP Instance UID is the data set's. One that named another instance was stored under
    the data set's UID and answered 0x0000, so the sender counted as acknowledged an instance the gateway did not
    hold. pynetdicom sends a file as it is (chunked), its command with the meta group's UID: the file's meta names
    another instance."""
    from pynetdicom import _config

    ds = ct_dataset(np.full((16, 16), -1000, np.int16))
    path = tmp_path / "other.dcm"
    ds.save_as(path, enforce_file_format=True)
    uid = str(ds.SOPInstanceUID).encode()
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    path.write_bytes(path.read_bytes().replace(uid, other, 1))  # the meta group's (pydicom writes the data set's)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    (status,) = _c_store(lone_scp.port, path)
    assert status == 0xA900
    study = asyncio.run_coroutine_threadsafe(lone_scp.stow.store.study(str(ds.StudyInstanceUID)), lone_scp.loop)
    assert study.result(10) is None  # nothing kept


def test_a_state_store_that_cannot_answer_gets_out_of_resources(lone_scp, monkeypatch):
    """The store away (a fail-over) while an instance arrives: nothing was kept, and the sender is told to
    try again later (0xA700), counted; pynetdicom answered its own 0xC211 to the escaping exception."""

    from gateway.store.store import StoreUnreachable

    async def away(*_args):
        raise StoreUnreachable("The state store cannot be reached (ConnectionRefusedError).")

    monkeypatch.setattr(lone_scp.stow, "room_for", away)
    (status,) = _c_store(lone_scp.port, ct_dataset(np.full((16, 16), -1000, np.int16)))
    assert status == OUT_OF_RESOURCES


@pytest.mark.parametrize(("error", "expected"), [(errno.ENOSPC, OUT_OF_RESOURCES), (errno.EIO, 0x0110)])
def test_a_full_blob_volume_is_out_of_resources_and_a_failing_one_a_processing_failure(lone_scp, monkeypatch,
                                                                                      error, expected):
    """A blob write failing for a full volume (past the disk watermark's margin) answered 0x0110, a failure
    senders may not retry: the instance was lost on their side. A full volume is for now: 0xA700, sent again."""
    def broken(items):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(lone_scp.stow.blobs, "put_many", broken)
    (status,) = _c_store(lone_scp.port, ct_dataset(np.full((16, 16), -1000, np.int16)))
    assert status == expected


def _associations(scp: StorageScp, n: int, timeout: float = 10.0) -> list[dict]:
    """The audit records of the SCP once ``n`` associations have one (written as each ends: the SCU may return
    first), then a moment more, so that a second record of one would be seen."""
    deadline = time.monotonic() + timeout
    while True:
        records = [json.loads(line) for line in scp.audit.path.read_text().splitlines()]
        if sum(r["action"].startswith("DICOM association") for r in records) >= n or time.monotonic() > deadline:
            time.sleep(0.2)
            return [json.loads(line) for line in scp.audit.path.read_text().splitlines()]
        time.sleep(0.05)


def _requestor(*sop_classes: str):
    from pynetdicom import AE as ApplicationEntity

    scu = ApplicationEntity(ae_title="TESTSCU")
    for sop_class in sop_classes:
        scu.add_requested_context(sop_class, pydicom.uid.ExplicitVRLittleEndian)
    return scu


def _c_store(port: int, *datasets) -> list[int]:
    """The statuses of ``datasets`` sent by C-STORE over one association (CT Image Storage, explicit VR LE)."""
    from pynetdicom.sop_class import CTImageStorage

    assoc = _requestor(CTImageStorage).associate("127.0.0.1", port, ae_title=AE)
    assert assoc.is_established
    steady_reactor(assoc)
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _discarded(scp: StorageScp) -> dict[str, float]:
    return {s.labels["sop_class"]: s.value for metric in scp.metrics.registry.collect()  # type: ignore[union-attr]
            if metric.name == "ctscreen_dicom_discarded" for s in metric.samples if s.name.endswith("_total")}


def test_a_mixed_study_in_one_association_keeps_its_ct_and_discards_the_rest(make_scp):
    """A PACS routing a whole study sends its dose SR and secondary capture with the CT: every instance is
    answered Success, the CT is stored as ever, the others are not stored, and are counted and audited."""
    from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage, XRayRadiationDoseSRStorage

    scp = make_scp()
    ct = [ct_dataset(np.full((16, 16), -1000, np.int16)) for _ in range(3)]
    study = str(ct[0].StudyInstanceUID)
    for ds in ct[1:]:
        ds.StudyInstanceUID = study
    scu = _requestor(CTImageStorage, XRayRadiationDoseSRStorage, SecondaryCaptureImageStorage)
    assoc = scu.associate("127.0.0.1", scp.port, ae_title=AE)
    assert assoc.is_established
    steady_reactor(assoc)
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in [ct[0], *study_companions(study), *ct[1:]]]
    finally:
        assoc.release()
    assert statuses == [SUCCESS] * 5
    held = asyncio.run_coroutine_threadsafe(_held(scp.stow), scp.loop).result(10)
    assert sorted(str(pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).SOPInstanceUID) for _, d in held) == \
        sorted(str(ds.SOPInstanceUID) for ds in ct)
    records = _associations(scp, 1)
    assert [(r["action"], r["study_instance_uid"], r["outcome"]) for r in records] == [
        ("DICOM C-STORE x3", study, "ok"), ("DICOM association to CTSCREEN", None, "ok")]
    assert records[-1]["reason"] == "stored 3, discarded 2 (not CT)" and records[-1]["who"] == "TESTSCU@127.0.0.1"
    deadline = time.monotonic() + 5  # counted on the event loop
    while sum(_discarded(scp).values()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _discarded(scp) == {"XRayRadiationDoseSRStorage": 1.0, "SecondaryCaptureImageStorage": 1.0}


def test_refuse_negotiates_ct_only_as_before(make_scp):
    from pydantic import ValidationError
    from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage, XRayRadiationDoseSRStorage

    from gateway.settings import Settings

    scp = make_scp(non_ct="refuse")
    assoc = _requestor(CTImageStorage, XRayRadiationDoseSRStorage, SecondaryCaptureImageStorage).associate(
        "127.0.0.1", scp.port, ae_title=AE)
    assert assoc.is_established
    accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {CTImageStorage}
    assert _associations(scp, 1)[-1]["reason"] == "nothing stored"
    assert Settings().dicom_accept_non_ct == "discard"
    with pytest.raises(ValidationError, match="dicom_accept_non_ct"):
        Settings(dicom_accept_non_ct="drop")
    with pytest.raises(ValueError, match='Argument "non_ct"'):
        StorageScp(scp.stow, scp.loop, port=free_port(), non_ct="drop")


def test_every_association_has_one_audit_record(make_scp):
    """A C-ECHO, a called AE title not ours, a calling AE title not allowed, an association whose every context
    was refused, and an aborted one: one record each, with its outcome and no patient data."""
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

    scp = make_scp(non_ct="refuse", peers=PeerPolicy(parse_peers(["TESTSCU@127.0.0.1"])))
    echo = _requestor(Verification).associate("127.0.0.1", scp.port, ae_title=AE)
    assert int(echo.send_c_echo().Status) == SUCCESS
    echo.release()
    assert _requestor(Verification).associate("127.0.0.1", scp.port, ae_title="NOTCTSCREEN").is_rejected
    from pynetdicom import AE as ApplicationEntity

    stranger = ApplicationEntity(ae_title="STRANGER")
    stranger.add_requested_context(Verification)
    assert stranger.associate("127.0.0.1", scp.port, ae_title=AE).is_rejected
    # accepted with every context refused: the requestor then aborts it (pynetdicom does, as dcmtk does)
    assert not _requestor(MRImageStorage).associate("127.0.0.1", scp.port, ae_title=AE).is_established
    aborted = _requestor(CTImageStorage).associate("127.0.0.1", scp.port, ae_title=AE)
    assert int(aborted.send_c_store(ct_dataset(np.full((16, 16), -1000, np.int16))).Status) == SUCCESS
    aborted.abort()
    records = [r for r in _associations(scp, 5) if r["action"].startswith("DICOM association")]
    assert [(r["who"], r["action"], r["outcome"], r["reason"]) for r in records] == [
        ("TESTSCU@127.0.0.1", "DICOM association to CTSCREEN", "ok", "echo"),
        ("TESTSCU@127.0.0.1", "DICOM association to NOTCTSCREEN", "denied", "called_ae_not_recognised"),
        ("STRANGER@127.0.0.1", "DICOM association to CTSCREEN", "denied", "calling_ae_not_recognised"),
        ("TESTSCU@127.0.0.1", "DICOM association to CTSCREEN", "aborted",
         "aborted: nothing stored (no presentation context accepted)"),
        ("TESTSCU@127.0.0.1", "DICOM association to CTSCREEN", "aborted", "aborted: stored 1"),
    ]


def test_an_instance_of_another_patient_under_a_studys_uid_is_refused_and_audited(lone_scp):
    """A penetration test sent patient B's slice under patient A's Study Instance UID by C-STORE: stored (0x0000),
    the study's next version held both patients' series and B's was screened. Now 0xA901 into the receiving
    version and after its completion alike, nothing kept, the association's audit record says 0xA901 for the
    study and names no patient; A's own instances still come in."""

    def slice_of(patient_id: str, study_uid: str | None = None):
        ds = ct_dataset(np.full((16, 16), -1000, np.int16), study_uid=study_uid)
        ds.PatientID = patient_id
        return ds

    a = slice_of("PH00000000")
    uid = str(a.StudyInstanceUID)

    def send(*datasets) -> list[int]:
        return _c_store(lone_scp.port, *datasets)

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, lone_scp.loop).result(10)

    assert send(a, slice_of("PH00000007", uid), slice_of("PH00000000", uid)) == [SUCCESS, PATIENT_MISMATCH, SUCCESS]
    assert on_loop(_pending(lone_scp.stow, uid)) == ("receiving", 2)
    first = on_loop(lone_scp.stow.complete(uid))
    assert send(slice_of("PH00000007", uid)) == [PATIENT_MISMATCH]  # would have opened version 2
    study = on_loop(lone_scp.stow.store.study(uid))
    assert (study.state, study.job.job_id) == ("complete", first.job_id)
    records = _associations(lone_scp, 2)
    assert [(r["action"], r["study_instance_uid"], r["reason"]) for r in records if r["reason"] == "0xA901"] == [
        ("DICOM C-STORE x1", uid, "0xA901")] * 2
    assert "PH0" not in lone_scp.audit.path.read_text()


def test_a_called_ae_title_not_ours_is_audited_without_an_allow_list(lone_scp):
    """pynetdicom rejects it itself (no allow-list): the record names the title the peer called."""
    from pynetdicom.sop_class import Verification

    assert _requestor(Verification).associate("127.0.0.1", lone_scp.port, ae_title="ELSEWHERE").is_rejected
    (record,) = _associations(lone_scp, 1)
    assert (record["action"], record["outcome"], record["reason"]) == (
        "DICOM association to ELSEWHERE", "denied", "called_ae_not_recognised")


async def _pending(stow: Intake, uid: str):
    study = await stow.store.study(uid)
    return study.state, study.instances


async def _held(stow: Intake) -> list[tuple[str, bytes]]:
    from sqlalchemy import select

    from gateway.store.models import Instance

    async with stow.store.read() as s:
        rows = (await s.execute(select(Instance.filename, Instance.blob_key))).all()
    return [(name, stow.blobs.get(key)) for name, key in rows]


@pytest.fixture(scope="module")
def small_study(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Three 128-matrix phantom slices (explicit VR LE) and the HU the decoder reads from them."""
    folder = Path(phantom.write_study(phantom.make_study(seed=3, n_slices=3, matrix=128),
                                      tmp_path_factory.mktemp("small"), montage=False)) / "dicom"
    files = sorted(folder.glob("*.dcm"))
    return folder, load_study([(f.name, f.read_bytes()) for f in files]).hu


@needs_dcmtk
@pytest.mark.parametrize(
    ("encoder", "propose", "syntax"),
    [
        (None, "-xi", pydicom.uid.ImplicitVRLittleEndian),
        (None, "-xd", pydicom.uid.DeflatedExplicitVRLittleEndian),
        (["dcmconv", "+tb"], "-xb", pydicom.uid.ExplicitVRBigEndian),
        (["dcmcjpeg"], "-xs", pydicom.uid.JPEGLosslessSV1),
        (["dcmcjpls"], "-xt", pydicom.uid.JPEGLSLossless),
        (["dcmcrle"], "-xr", pydicom.uid.RLELossless),
    ],
    ids=["implicit", "deflated", "big-endian", "jpeg-lossless", "jpeg-ls", "rle"],
)
def test_transfer_syntaxes_arrive_as_sent_and_decode_to_the_same_hu(lone_scp, small_study, tmp_path, encoder,
                                                                      propose, syntax):
    """storescu sends in each syntax (files encoded by dcmtk first where storescu cannot convert)."""
    folder, hu = small_study
    if encoder is not None:
        for f in sorted(folder.glob("*.dcm")):
            subprocess.run([*encoder, str(f), str(tmp_path / f.name)], check=True, capture_output=True, timeout=60)
        folder = tmp_path
    done = _storescu("-v", propose, "+sd", "127.0.0.1", str(lone_scp.port), str(folder))
    assert done.returncode == 0, done.stdout + done.stderr
    held = asyncio.run_coroutine_threadsafe(_held(lone_scp.stow), lone_scp.loop).result(10)
    assert len(held) == 3
    assert {pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).file_meta.TransferSyntaxUID for _, d in held} == {
        syntax}
    assert np.array_equal(load_study(held).hu, hu)


def test_sr_is_409_until_the_job_is_done():
    """``TestClient`` with the fake Triton of ``tests.gateway_app_fakes`` (a slow one, so the job is caught
    running); the live test above reads the SR of a study screened by the real Triton."""
    from fastapi.testclient import TestClient

    from gateway.main import create_app
    from gateway.settings import Settings
    from tests.gateway_app_fakes import FakeFleet, ct_series

    uid, files = ct_series(6, lesion=(1, 2, 3))
    app = create_app(Settings(triton_urls="fake:1"), client_factory=FakeFleet(**{"fake:1": {"delay": 0.5}}))
    with TestClient(app) as client:
        job = client.post("/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in files])
        assert job.status_code == 202, job.text
        job_id = job.json()["job_id"]
        early = client.get(f"/v1/jobs/{job_id}/sr")
        assert early.status_code == 409 and early.json()["reason"] == "not_done", early.text
        deadline = time.monotonic() + 30
        while client.get(f"/v1/jobs/{job_id}").json()["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        done = client.get(f"/v1/jobs/{job_id}/sr")
    assert done.status_code == 200, done.text
    sr = pydicom.dcmread(io.BytesIO(done.content))
    assert sr.StudyInstanceUID == uid and sr.Modality == "SR"


def _echo_until_up(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if subprocess.run([ECHOSCU, "-aec", AE, "127.0.0.1", str(port)], capture_output=True, timeout=30).returncode == 0:
            return True
        time.sleep(0.3)
    return False


def _http_until_up(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return True
        except httpx.HTTPError:
            time.sleep(0.05)
    return False


@pytest.mark.triton
@needs_dcmtk
def test_serve_with_dicom_port_answers_c_echo(triton):
    """``ctscreen serve --dicom-port N`` (a real process) answers echoscu, then stops on Ctrl-C.

    The C-STORE SCP starts with the app, before the HTTP server is up; a Ctrl-C in that window aborts the
    start (exit 130, as documented in ``run_stack``), so the signal waits for both listeners."""
    import os
    import signal
    import sys

    dicom_port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "ctscreen.cli", "serve", "--port", str(http_port), "--triton-url", triton.grpc_url,
           "--dicom-port", str(dicom_port)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        up = _echo_until_up(dicom_port, proc) and _http_until_up(http_port, proc)
        proc.send_signal(signal.SIGINT)
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert up, out
    assert proc.returncode == 0 and f"DICOM C-STORE SCP: AE {AE} on 127.0.0.1:{dicom_port}" in out, out


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_refused_instances_count_in_the_association_record_and_a_released_one_is_ok(make_scp):
    """An instance answered 0xC000 was left out of the association's record (``stored 1`` for one stored and one
    refused); a released association is ``ok``, an aborted one ``aborted`` (the abort is written when its thread
    ends, the one handler for every way an association ends but a release)."""
    from pynetdicom.sop_class import CTImageStorage

    scp = make_scp()
    good = ct_dataset(np.full((16, 16), -1000, np.int16))
    bad = ct_dataset(np.full((16, 16), -1000, np.int16))
    bad.StudyInstanceUID = "not-a-uid"
    released = steady_reactor(_requestor(CTImageStorage).associate("127.0.0.1", scp.port, ae_title=AE))
    assert [int(released.send_c_store(ds).Status) for ds in (good, bad)] == [SUCCESS, CANNOT_UNDERSTAND]
    released.release()
    aborted = _requestor(CTImageStorage).associate("127.0.0.1", scp.port, ae_title=AE)
    assert int(aborted.send_c_store(bad).Status) == CANNOT_UNDERSTAND
    aborted.abort()
    records = [r for r in _associations(scp, 2) if r["action"].startswith("DICOM association")]
    assert [(r["outcome"], r["reason"]) for r in records] == [
        ("ok", "stored 1, refused 1 (0xC000)"), ("aborted", "aborted: refused 1 (0xC000)")], records


def test_stopping_the_scp_aborts_its_open_associations(make_scp):
    """stop() closed the listener only: an association already open went on getting 0x0000 while the gateway
    shut down (and 0xC211 once its loop had closed)."""
    from pynetdicom.sop_class import CTImageStorage

    scp = make_scp()
    assoc = _requestor(CTImageStorage).associate("127.0.0.1", scp.port, ae_title=AE)
    assert int(assoc.send_c_store(ct_dataset(np.full((16, 16), -1000, np.int16))).Status) == SUCCESS
    scp.stop()
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted and not assoc.is_established
    assert not _requestor(CTImageStorage).associate("127.0.0.1", scp.port, ae_title=AE).is_established


CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"
"""Siemens CSA Non-Image Storage: a private class a Siemens CT study carries beside its images."""


def test_a_private_class_in_a_study_is_accepted_and_discarded_and_every_ct_slice_kept(make_scp):
    """A private SOP class a sender proposed (Siemens CSA Non-Image objects travel with Siemens CT) was not
    negotiated: the sender's C-STORE of it failed (pynetdicom's SCU raises "no presentation context"), and a sender
    that stops at a failure kept the rest of the CT back. Under ``discard`` (the default) it is accepted, answered
    0x0000 and discarded, and counted; with ``refuse`` it stays unnegotiated."""
    from pynetdicom.sop_class import CTImageStorage

    ct = [ct_dataset(np.full((16, 16), -1000, np.int16)) for _ in range(3)]
    study = str(ct[0].StudyInstanceUID)
    for ds in ct:
        ds.StudyInstanceUID = study
    csa = ct_dataset(np.full((16, 16), -1000, np.int16))
    csa.StudyInstanceUID = study
    csa.SOPClassUID = csa.file_meta.MediaStorageSOPClassUID = CSA_NON_IMAGE
    for mode in ("discard", "refuse"):
        scp = make_scp(non_ct=mode)
        assoc = _requestor(CTImageStorage, CSA_NON_IMAGE).associate("127.0.0.1", scp.port, ae_title=AE)
        assert assoc.is_established
        steady_reactor(assoc)
        try:
            accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
            assert (CSA_NON_IMAGE in accepted) is (mode == "discard"), accepted
            statuses = [int(assoc.send_c_store(ds).Status) for ds in (ct[0], csa, *ct[1:])] if mode == "discard" else []
        finally:
            assoc.release()
        if mode == "discard":
            assert statuses == [SUCCESS] * 4
            records = _associations(scp, 1)
            assert records[-1]["reason"] == "stored 3, discarded 1 (not CT)", records


def test_an_instance_over_the_per_file_limit_is_refused_not_stored(lone_scp, monkeypatch):
    """A 1.2-2.5 GiB instance was written whole, stored and answered 0x0000, then its job failed too_large: the
    sender believed it delivered (20_dimse_huge.py). Over the per-file limit (a small one here) it is answered
    0xA700 and nothing is kept; one under it is stored. Before: 0x0000 and the study held the instance."""

    monkeypatch.setattr(lone_scp, "max_instance_bytes", 64 * 1024, raising=False)
    small = ct_dataset(np.full((16, 16), -1000, np.int16))
    big = ct_dataset(np.full((256, 256), -1000, np.int16))  # 128 KiB of pixels
    statuses = _c_store(lone_scp.port, big, small)
    assert statuses == [OUT_OF_RESOURCES, SUCCESS]
    study = asyncio.run_coroutine_threadsafe(lone_scp.stow.store.study(str(big.StudyInstanceUID)), lone_scp.loop)
    assert study.result(10) is None  # nothing kept


def test_an_instance_over_the_per_file_limit_is_not_written_past_it(make_scp, tmp_path, monkeypatch):
    """The 0xA700 of an instance over the per-file limit came once pynetdicom had written the whole of it to its
    temporary file (a 2.5 GiB instance took 2.5 GiB of the received folder's disk to be refused; C-STORE tells no
    size before the data set, and the handler runs after its last fragment). The file now keeps nothing once the
    instance passes the limit, and the rest is counted, not written; the refusal and the next instance are as
    before. Each file's size is read as pynetdicom removes it, after the handler answered. Before: 0xA700 with
    the whole instance (512 KiB) on disk."""
    import pynetdicom.service_class

    received = tmp_path / "received"
    scp = make_scp(received_dir=received)
    cap = 64 * 1024
    monkeypatch.setattr(scp, "max_instance_bytes", cap, raising=False)
    sizes: list[int] = []
    unlink = os.unlink

    def spy(path, *args, **kwargs):  # pynetdicom removes each instance's file once the handler has answered
        if Path(path).parent == received:
            sizes.append(Path(path).stat().st_size)
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(pynetdicom.service_class.os, "unlink", spy)
    small = ct_dataset(np.full((16, 16), -1000, np.int16))
    big = ct_dataset(np.full((512, 512), -1000, np.int16))  # 512 KiB of pixels
    statuses = _c_store(scp.port, big, small, big)
    assert statuses == [OUT_OF_RESOURCES, SUCCESS, OUT_OF_RESOURCES]
    assert len(sizes) == 3 and sizes[0] == sizes[2] == 0 and 0 < sizes[1] <= cap, sizes
    assert not list(received.glob("ctscreen-rx-*"))
    study = asyncio.run_coroutine_threadsafe(scp.stow.store.study(str(big.StudyInstanceUID)), scp.loop)
    assert study.result(10) is None  # nothing kept


def _command_set(**command) -> bytes:
    """A DIMSE command set built by hand, as a hand-rolled SCU builds one: ``command``'s elements after its Command
    Group Length, Implicit VR Little Endian (PS3.7 6.3.1)."""
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    cs = Dataset()
    for keyword, value in command.items():
        setattr(cs, keyword, value)
    cs.CommandGroupLength = len(encode(cs, True, True))
    return encode(cs, True, True)


def _raw_p_data(assoc, *pdvs: tuple[int, bytes], timeout: float = 10.0) -> Any:
    """Send one P-DATA of presentation data values built by hand (its context ID, then its message control header
    and fragment: PS3.8 E.2) over ``assoc``, whose reactor is held meanwhile (as pynetdicom's send_c_store holds
    it: it would take the answer); what came back: the response's primitive, the A-ABORT (A_ABORT: the SCP aborted
    the association) or A-P-ABORT (A_P_ABORT: the connection went without one) that ended the association, or
    None after ``timeout`` s without either."""
    from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, P_DATA

    pdata = P_DATA()
    pdata.presentation_data_value_list = [list(pdv) for pdv in pdvs]
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        assoc.dul.send_pdu(pdata)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rsp = assoc.dimse.get_msg(block=False)[1]
            if rsp is not None:
                return rsp
            if isinstance(end := assoc.dul.peek_next_pdu(), A_ABORT | A_P_ABORT):
                return end
            time.sleep(0.01)
        return None
    finally:
        assoc._reactor_checkpoint.set()


def _raw_c_store(assoc, data: bytes, **command) -> Any:
    """Send one C-STORE-RQ built by hand (its command set ``command``, then ``data`` as its data set) over ``assoc``;
    the response's primitive, or None once the association is gone (or after 10 s without one)."""
    from pynetdicom.dimse_primitives import C_STORE

    context_id = assoc.accepted_contexts[0].context_id
    rsp = _raw_p_data(assoc, (context_id, b"\x03" + _command_set(**command)), (context_id, b"\x02" + data))
    return rsp if isinstance(rsp, C_STORE) else None


@pytest.mark.parametrize("missing", ["AffectedSOPInstanceUID", "AffectedSOPClassUID", "both"])
def test_a_c_store_whose_command_lacks_an_affected_sop_uid_is_refused_and_the_association_lives(
        make_scp, tmp_path, caplog, missing):
    """PS3.7 9.3.1.1: a C-STORE-RQ's Affected SOP Class and Instance UIDs are mandatory. One without (a hand-rolled
    SCU's, or a P-DATA cut short: the fuzz campaign's factory slice cut at byte 422) killed the association's
    reader: pynetdicom's chunked receive (STORE_RECV_CHUNKED_DATASET, the gateway's) names its file's meta from
    them before any handler runs, so its AttributeError aborted the association without a status, logged with a
    traceback, and the audit said only "aborted". Now it is answered 0xC000 (cannot understand), the log says
    why (no UID, no patient data), nothing is kept (its file is removed), and the association goes on storing.
    Before: no response (``None``), an A-ABORT, and AttributeError's traceback logged at ERROR."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import CTImageStorage

    received = tmp_path / "received"
    lone_scp = make_scp(received_dir=received)
    ds = ct_dataset(np.full((16, 16), -1000, np.int16))
    ds.PatientName = "Secretname^Zqx"
    command = {"AffectedSOPClassUID": CTImageStorage, "CommandField": 0x0001, "MessageID": 7, "Priority": 0,
               "CommandDataSetType": 0x0001, "AffectedSOPInstanceUID": str(ds.SOPInstanceUID)}
    for keyword in (["AffectedSOPInstanceUID", "AffectedSOPClassUID"] if missing == "both" else [missing]):
        del command[keyword]
    assoc = _requestor(CTImageStorage).associate("127.0.0.1", lone_scp.port, ae_title=AE)
    assert assoc.is_established and assoc.accepted_contexts[0].transfer_syntax[0] == ExplicitVRLittleEndian
    steady_reactor(assoc)
    caplog.set_level(logging.INFO)
    try:
        rsp = _raw_c_store(assoc, encode(ds, False, True), **command)
        assert rsp is not None and assoc.is_established, "no response: the association was aborted"
        assert int(rsp.Status) == CANNOT_UNDERSTAND and int(rsp.MessageIDBeingRespondedTo) == 7
        assert rsp.ErrorComment.startswith("Command lacks Affected SOP") and rsp.AffectedSOPInstanceUID is None
        again = ct_dataset(np.full((16, 16), -1000, np.int16))
        assert int(assoc.send_c_store(again).Status) == SUCCESS  # the same association goes on
    finally:
        assoc.release()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text
    said = [r.getMessage() for r in caplog.records if "Affected SOP" in r.getMessage()]
    assert said and all(str(ds.PatientName) not in m and str(ds.PatientID) not in m for m in said), caplog.text
    records = [r for r in _associations(lone_scp, 1) if r["action"].startswith("DICOM association")]
    assert [(r["outcome"], r["reason"]) for r in records] == [("ok", "stored 1, refused 1 (0xC000)")], records
    study = asyncio.run_coroutine_threadsafe(lone_scp.stow.store.study(str(ds.StudyInstanceUID)), lone_scp.loop)
    assert study.result(10) is None  # nothing kept
    assert not list(received.glob("ctscreen-rx-*"))


VERIFICATION = "1.2.840.10008.1.1"


def _store_command(ds, **changes) -> dict[str, Any]:
    """The C-STORE-RQ command of ``ds`` (CT Image Storage, Message ID 7), with ``changes`` (None: the element left out)."""
    from pynetdicom.sop_class import CTImageStorage

    command = {"AffectedSOPClassUID": CTImageStorage, "CommandField": 0x0001, "MessageID": 7, "Priority": 0,
               "CommandDataSetType": 0x0001, "AffectedSOPInstanceUID": str(ds.SOPInstanceUID), **changes}
    return {keyword: value for keyword, value in command.items() if value is not None}


def _cut_before_command_field(ds, data: bytes) -> tuple[list[tuple[int, bytes]], str]:
    """A C-STORE-RQ of ``ds`` whose command set is cut where its Command Field (0000,0100) begins (its Command Group
    Length and Affected SOP Class UID kept: the fuzz campaign's P-DATA cut short), and the log's words for it."""
    encoded = _command_set(**_store_command(ds))
    cut = encoded.index(b"\x00\x00\x00\x01\x02\x00\x00\x00")  # (0000,0100), 2 bytes long
    return ([("ct", b"\x03" + encoded[:cut]), ("ct", b"\x02" + data)],
            f"its command set has no Command Field (0000,0100) (cut short: {cut - 12} of its {len(encoded) - 12} bytes)")


MALFORMED = {  # (the data set, its bytes) -> the message's presentation data values (their context: "ct" and "echo"
    # are the accepted ones), and the log's words for it
    "command cut before its Command Field": _cut_before_command_field,
    "C-STORE on a context not accepted": lambda ds, data: (
        [(99, b"\x03" + _command_set(**_store_command(ds))), (99, b"\x02" + data)],
        "a P-DATA on presentation context 99, which the association did not accept"),
    "Command Field naming no command": lambda ds, data: (
        [("ct", b"\x03" + _command_set(**_store_command(ds, CommandField=0x0FF0))), ("ct", b"\x02" + data)],
        "its command set's Command Field (0000,0100) names no DIMSE command"),
    "no Command Data Set Type": lambda ds, data: (
        [("ct", b"\x03" + _command_set(**_store_command(ds, CommandDataSetType=None))), ("ct", b"\x02" + data)],
        "its C-STORE-RQ command has no Command Data Set Type (0000,0800)"),
    "a data set before its command": lambda ds, data: (
        [("ct", b"\x02" + data)], "a data set fragment came before its command set"),
    # a second C-STORE's command before the first's data set ended (PS3.8 E.2: no fragment of another message until
    # the current one's last): pynetdicom took it for the message's command, left the first's file (received_dir)
    # for the sweep, never answered it and stored the second; in one P-DATA, and in the next one (None: a P-DATA
    # ends there)
    "a command amid the data set before it": lambda ds, data: (
        [*_store_command_and_data(ds, data, 7, b"\x00"), *_store_command_and_data(ds, data, 8)],
        "a command fragment came before the data set of the message before it ended"),
    "a command in the P-DATA after a data set fragment": lambda ds, data: (
        [*_store_command_and_data(ds, data, 7, b"\x00"), None, *_store_command_and_data(ds, data, 8)],
        "a command fragment came before the data set of the message before it ended"),
}


def _store_command_and_data(ds, data: bytes, message_id: int, header: bytes = b"\x02") -> list[tuple[str, bytes]]:
    """A C-STORE-RQ of ``ds`` (Message ID ``message_id``): its command, then its data set (the last fragment), or
    (``header`` 0x00) its first 100 bytes as a fragment that is not the last."""
    return [("ct", b"\x03" + _command_set(**_store_command(ds, MessageID=message_id))),
            ("ct", header + (data if header == b"\x02" else data[:100]))]

WITHOUT_MESSAGE_ID = {  # as MALFORMED
    "C-STORE": lambda ds, data: (
        [("ct", b"\x03" + _command_set(**_store_command(ds, MessageID=None))), ("ct", b"\x02" + data)],
        "its C-STORE-RQ command has no Message ID (0000,0110), which a response must name"),
    "C-ECHO": lambda ds, data: (
        [("echo", b"\x03" + _command_set(AffectedSOPClassUID=VERIFICATION, CommandField=0x0030,
                                          CommandDataSetType=0x0101))],
        "its C-ECHO-RQ command has no Message ID (0000,0110), which a response must name"),
    "C-CANCEL": lambda ds, data: (
        [("echo", b"\x03" + _command_set(CommandField=0x0FFF, CommandDataSetType=0x0101))],
        "its C-CANCEL-RQ command has no Message ID Being Responded To (0000,0120)"),
}


def _aborted_cleanly(make_scp, tmp_path: Path, caplog, message: Callable[[Any, bytes], tuple[list, str]]) -> None:
    """``message`` (an entry of :data:`MALFORMED`), sent by a pynetdicom SCU to an SCP of its own, gets an A-ABORT
    from the service user (source 0) within 10 s, one warning in its words (no patient data), no ERROR or traceback
    record, the association's audit record, nothing kept; and the SCP then stores a slice a second association
    sends."""
    from pynetdicom.dsutils import encode
    from pynetdicom.pdu_primitives import A_ABORT
    from pynetdicom.sop_class import CTImageStorage

    received = tmp_path / "received"
    scp = make_scp(received_dir=received)
    ds = ct_dataset(np.full((16, 16), -1000, np.int16))
    ds.PatientName = "Secretname^Zqx"
    pdvs, words = message(ds, encode(ds, False, True))
    assoc = _requestor(CTImageStorage, VERIFICATION).associate("127.0.0.1", scp.port, ae_title=AE)
    assert assoc.is_established
    steady_reactor(assoc)
    accepted = {str(cx.abstract_syntax): cx.context_id for cx in assoc.accepted_contexts}
    contexts = {"ct": accepted[CTImageStorage], "echo": accepted[VERIFICATION]}
    caplog.set_level(logging.INFO)
    *before, last = [[]]  # P-DATAs: None in pdvs ends one (each before the last gets no answer)
    for pdv in pdvs:
        if pdv is None:
            before.append(last)
            last = []
        else:
            last.append((contexts.get(pdv[0], pdv[0]), pdv[1]))
    try:
        for pdata in before:
            assert _raw_p_data(assoc, *pdata, timeout=0.5) is None
        end = _raw_p_data(assoc, *last)
        assert isinstance(end, A_ABORT) and end.abort_source == 0, end
    finally:
        assoc.abort()
    assert _c_store(scp.port, ct_dataset(np.full((16, 16), -1000, np.int16))) == [SUCCESS]  # the SCP goes on
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text
    said = [r.getMessage() for r in caplog.records if r.name == "gateway.dimse" and r.levelno == logging.WARNING]
    assert said == [f"DICOM association from TESTSCU@127.0.0.1 aborted (A-ABORT): {words}"], said
    records = [r for r in _associations(scp, 2) if r["action"].startswith("DICOM association")]
    assert [(r["outcome"], r["reason"]) for r in records] == [
        ("aborted", "aborted (malformed DIMSE message): nothing stored"), ("ok", "stored 1")], records
    study = asyncio.run_coroutine_threadsafe(scp.stow.store.study(str(ds.StudyInstanceUID)), scp.loop)
    assert study.result(10) is None  # nothing kept
    assert not list(received.glob("ctscreen-rx-*"))
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), scp.loop).result(10)  # after the count's call_soon_threadsafe
    counted = scp.metrics.registry.get_sample_value("ctscreen_errors_total", {"reason": "malformed_dimse"})
    assert counted == 1, counted


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_dimse_message_the_scp_cannot_decode_aborts_its_association_cleanly_and_the_scp_goes_on(
        make_scp, tmp_path, caplog, case):
    """The fuzz campaign's last DIMSE crashes: a P-DATA whose message pynetdicom 3.0.4 cannot decode (a command set
    cut before its Command Field, one naming no command or without its Command Data Set Type, a C-STORE on a
    presentation context the association did not accept) raised in ``DIMSEMessage.decode_msg`` and killed the
    association's reader thread: a traceback logged and on stderr ("Exception in thread ... run_reactor"), the TCP
    connection dropped without an A-ABORT (the sender saw an A-P-ABORT). A data set fragment before any command
    was an A-P-ABORT after pynetdicom's traceback ("Received an invalid DIMSE message"). Now the SCP ends such an
    association as dcmtk's storescp does, with an A-ABORT from the service user (source 0), says why in one
    warning (no patient data), audits it, keeps nothing, and serves the next association: a good one stores a slice.
    Before: an A_P_ABORT, not an A_ABORT, and ERROR records with a traceback."""
    _aborted_cleanly(make_scp, tmp_path, caplog, MALFORMED[case])


@pytest.mark.parametrize("case", list(WITHOUT_MESSAGE_ID))
def test_a_request_without_its_message_id_is_aborted_at_once_not_left_unanswered(make_scp, tmp_path, caplog, case):
    """PS3.7 9.3 and 10.3: a request's Message ID and a response's (or C-CANCEL's) Message ID Being Responded To are
    mandatory, and a response names the request's Message ID: no response can name a request without one (a
    response without it breaks the standard as well, and 0 is another request's ID). pynetdicom dropped such a
    request unanswered ("Received unexpected C-STORE service message", after a traceback of its own EVT_DIMSE_RECV
    logger), and the sender waited out its DIMSE timeout. Now the association is aborted at once, as dcmtk's
    storescp does ("Command Parse Failed: Element: (0000,0110)"), with one warning that says why.
    Before: nothing came back in 10 s (``None``), and ERROR records with a traceback."""
    _aborted_cleanly(make_scp, tmp_path, caplog, WITHOUT_MESSAGE_ID[case])


def test_commands_are_checked_in_the_scps_readers_only():
    """``dimse_messages.decode`` is pynetdicom's, module-wide: the gateway's own associations as a requestor
    (delivery, ``gateway.dimse_scu``) decode with ``decode_command`` too. A PACS's C-STORE-RSP without its Message ID
    Being Responded To is pynetdicom's to refuse there ("Received an invalid C-STORE-RSP response", an abort); a
    MalformedMessage raised in that reader, which has no StorageScp._receive around it, would kill the thread with
    a traceback."""
    from io import BytesIO

    from gateway.dimse import SCP_READER, MalformedMessage, decode_command

    response = _command_set(AffectedSOPClassUID=VERIFICATION, CommandField=0x8030, CommandDataSetType=0x0101, Status=0)
    assert decode_command(BytesIO(response), True, True).Status == 0  # as pynetdicom decodes it
    SCP_READER.active = True
    try:
        with pytest.raises(MalformedMessage, match=r"C-ECHO-RSP command has no Message ID Being Responded To"):
            decode_command(BytesIO(response), True, True)
    finally:
        SCP_READER.active = False


PRIORITIES_NOT_LOW_MEDIUM_HIGH = {  # the Priority (0000,0700) a C-STORE-RQ sends (None: empty; absent: left out),
    # what the log says it was
    "0x0007": ({"Priority": 0x0007}, "0x0007"),
    "0xFFFF": ({"Priority": 0xFFFF}, "0xFFFF"),
    "empty": ({"Priority": None}, "empty"),
    "two values": ({"Priority": [1, 0]}, "2 values"),
    "absent": ({}, "none"),
}


@pytest.mark.parametrize("case", list(PRIORITIES_NOT_LOW_MEDIUM_HIGH))
def test_a_c_store_whose_priority_is_not_low_medium_or_high_is_stored_as_medium(make_scp, tmp_path, caplog, case):
    """PS3.7 9.3.1.1: a C-STORE-RQ's Priority is LOW (0x0002), MEDIUM (0x0000) or HIGH (0x0001). One with another
    value (a hand-rolled SCU's; the fuzz campaign's) is stored by dcmtk's storescp as any other; pynetdicom 3.0.4
    refused to make its request primitive ("ValueError: Priority must be 0, 1, or 2", logged with its traceback
    at ERROR) and dropped the association with an A-P-ABORT, nothing stored. It only ranks the study, so the
    gateway reads it as MEDIUM (routine): both instances stored, the association goes on, said once at INFO for
    the association (the second at DEBUG), no ERROR or traceback record. An empty one was the same A-P-ABORT, and
    one with two values or none was stored after pynetdicom's EVT_DIMSE_RECV logger's traceback (one with none as
    LOW). Before (0x0007, 0xFFFF, empty): no response (``None``: the A-P-ABORT); two values, absent: the ERROR
    records (absent: the study ranked low)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import CTImageStorage

    from gateway.jobs import ROUTINE

    priority, said = PRIORITIES_NOT_LOW_MEDIUM_HIGH[case]
    received = tmp_path / "received"
    scp = make_scp(received_dir=received)
    first = ct_dataset(np.full((16, 16), -1000, np.int16))
    second = ct_dataset(np.full((16, 16), -1000, np.int16), study_uid=str(first.StudyInstanceUID))
    assoc = _requestor(CTImageStorage).associate("127.0.0.1", scp.port, ae_title=AE)
    assert assoc.is_established and assoc.accepted_contexts[0].transfer_syntax[0] == ExplicitVRLittleEndian
    steady_reactor(assoc)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="gateway.dimse")
    try:
        for ds in (first, second):
            rsp = _raw_c_store(assoc, encode(ds, False, True), **_store_command(ds, Priority=None), **priority)
            assert rsp is not None and assoc.is_established, "no response: the association was aborted"
            assert (int(rsp.Status), int(rsp.MessageIDBeingRespondedTo)) == (SUCCESS, 7)
    finally:
        assoc.release()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text
    words = f"C-STORE-RQ from TESTSCU@127.0.0.1: its Priority (0000,0700) is {said}, none of LOW, MEDIUM, HIGH (PS3.7 9.3); read as MEDIUM"
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "Priority" in r.getMessage()]
    assert lines == [(logging.INFO, f"{words} (said once per association)"), (logging.DEBUG, words)], lines
    records = [r for r in _associations(scp, 1) if r["action"].startswith("DICOM association")]
    assert [(r["outcome"], r["reason"]) for r in records] == [("ok", "stored 2")], records
    uid = str(first.StudyInstanceUID)
    assert asyncio.run_coroutine_threadsafe(_pending(scp.stow, uid), scp.loop).result(10) == ("receiving", 2)
    assert asyncio.run_coroutine_threadsafe(scp.stow.store.latest_priority(uid), scp.loop).result(10) == ROUTINE
    assert not list(received.glob("ctscreen-rx-*"))
