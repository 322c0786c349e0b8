"""Deliveries as durable tasks, against a real Orthanc (``tests/orthanc.py``), without Triton.

A done job is made in a real state store (SQLite) and blob folder from phantom DICOM files and a case
result with boxes on three slices; the :class:`~gateway.delivery.deliverer.Deliverer` then sends its SR and
key images by C-STORE to Orthanc. Orthanc stopped during delivery: the task retries with back-off and
delivers once it is back, exactly once. Attempts exhausted: ``failed`` with the payload kept, re-sent on
request. The destinations file: one-line errors, secrets never shown.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from prometheus_client import CollectorRegistry

import phantom
from aggregator.case import SliceInput, decide
from gateway.delivery import DestinationsError, load_destinations, parse_destinations
from gateway.delivery.deliverer import Deliverer
from gateway.report import sr_context
from gateway.settings import Settings
from gateway.store import FolderBlobs, Store, new_key
from gateway.store.deliveries import Deliveries
from gateway.store.migrate import upgrade
from tests.fhir_receiver import FhirReceiver
from tests.orthanc import OrthancServer, dicomweb_plugin, orthanc_bin
from tests.test_gateway_dicom_security import pki  # noqa: F401 - a fixture: the test CA's certificates

pytestmark = [pytest.mark.timeout(120)]
needs_orthanc = pytest.mark.skipif(orthanc_bin() is None or dicomweb_plugin() is None,
                                   reason="Orthanc + DICOMweb plugin not installed: scripts/setup.sh --test")
N_SLICES = 8
LESION = np.array([[200, 180, 240, 220, 0.9]], np.float32)
VA = np.array([60, 60, 450, 450], np.float32)


@pytest.fixture(scope="module")
def orthanc():
    if orthanc_bin() is None or dicomweb_plugin() is None:
        pytest.skip("Orthanc + DICOMweb plugin not installed: scripts/setup.sh --test installs them")
    server = OrthancServer()
    try:
        yield server
    finally:
        server.close()


def write_study(out: Path, salt: str) -> list[Path]:
    """A small phantom study; each ``salt`` gives other UIDs (a study Orthanc has not seen)."""
    study = phantom.make_study(seed=5, kind="covid", n_slices=N_SLICES, matrix=256)
    return sorted((Path(phantom.write_study(study, out / salt, montage=False, salt=salt)) / "dicom").rglob("*.dcm"))


@pytest.fixture
def study_files(tmp_path, request) -> list[Path]:
    return write_study(tmp_path / "study", request.node.name[-40:].replace("[", "_").replace("]", "_"))


def delivery_settings(tmp_path: Path, **kw) -> Settings:
    base = {"data_dir": tmp_path, "delivery_backoff_s": 0.2, "delivery_backoff_max_s": 0.4,
            "delivery_max_attempts": 50, "delivery_poll_s": 0.1}
    return Settings(**{**base, **kw})


async def done_job(settings: Settings, files: list[Path], *, filename_prefix: str = "upload/",
                    stores: tuple[Store, FolderBlobs] | None = None, not_chest: bool = False, positive: bool = True):
    """A done job in a fresh store (or in ``stores``, a study's next version): the files as its instances, a
    positive result on slices 2..4 (``not_chest``: the same run, on a series measured as no chest; not
    ``positive``: no lesion, negative)."""
    if stores is None:
        await asyncio.to_thread(upgrade, settings.database())
    store, blobs = stores or (Store(settings.database()), FolderBlobs(settings.blobs()))
    view = await accepted_job(store, blobs, files, filename_prefix=filename_prefix)
    result = await finish_job(store, settings, view.job_id, files, not_chest=not_chest, positive=positive)
    return store, blobs, result


async def accepted_job(store: Store, blobs: FolderBlobs, files: list[Path], *, filename_prefix: str = "upload/"):
    """The files accepted as a study's next version, its job claimed (as a worker claims it)."""
    stored = []
    for f in files:
        data = f.read_bytes()
        key = new_key()
        blobs.put(key, data)
        stored.append((f"{filename_prefix}{f.name}", key, len(data)))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    view = await store.accept_upload(study_uid, stored, 3600.0)
    claimed = await store.claim(30.0)
    assert claimed is not None and claimed.id == view.job_id
    return view


async def finish_job(store: Store, settings: Settings, job_id: str, files: list[Path], *, not_chest: bool = False,
                     positive: bool = True):
    """Write a claimed job's result, made from ``files`` as the worker makes it (under the site's UID root)."""
    headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in files),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    study_uid = str(headers[0].StudyInstanceUID)
    inputs = [SliceInput(str(d.SOPInstanceUID), float(d.ImagePositionPatient[2]),
                         LESION if positive and k in (2, 3, 4) else np.zeros((0, 5)), VA, rows=int(d.Rows),
                         cols=int(d.Columns))
              for k, d in enumerate(headers)]
    measured = {"lung_field_cm2": 12.0, "body_cm2": 200.0} if not_chest else {}
    result = decide(inputs, **measured).to_result(
        study_instance_uid=study_uid, series_instance_uid=str(headers[0].SeriesInstanceUID), job_id=job_id
    ).model_copy(update={"uid_root": settings.uid_root})
    assert result.verdict == ("indeterminate" if not_chest else "positive" if positive else "negative")
    context = sr_context(headers)
    assert await store.finish(job_id, result, context.to_json() if context else None)
    return result


def pacs_destination(orthanc: OrthancServer, **kw) -> dict:
    return {"name": "pacs", "kind": "dicom", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
            "port": orthanc.dicom_port, **kw}


async def until_states(deliverer: Deliverer, job_id: str, states: set[str], timeout: float = 60.0, *,
                 at_least_attempts: int = 0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await deliverer.poll()
        await asyncio.sleep(0.1)
        tasks = await deliverer.tasks.of_job(job_id)
        if tasks and all(t.state in states and t.attempts >= at_least_attempts for t in tasks):
            return tasks
    raise AssertionError(f"deliveries of {job_id} not in {states}: {await deliverer.tasks.of_job(job_id)}")


def _orthanc_series(orthanc: OrthancServer, study_uid: str) -> dict[str, list[str]]:
    """Modality -> SOP Instance UIDs Orthanc holds for the study."""
    out: dict[str, list[str]] = {}
    for inst in orthanc.instances_of_study(study_uid):
        series = orthanc.get(f"/series/{inst['ParentSeries']}")
        out.setdefault(series["MainDicomTags"]["Modality"], []).append(inst["MainDicomTags"]["SOPInstanceUID"])
    return out


@needs_orthanc
def test_orthanc_down_during_delivery_then_back_delivers_exactly_once(orthanc, study_files, tmp_path):
    async def scenario():
        settings = delivery_settings(tmp_path)
        store, blobs, result = await done_job(settings, study_files)
        registry = CollectorRegistry()
        deliverer = Deliverer(store, blobs, parse_destinations([pacs_destination(orthanc)]), settings, registry)
        try:
            orthanc.stop()
            tasks = await until_states(deliverer, result.job_id, {"pending"}, at_least_attempts=2)
            assert "cannot reach" in (tasks[0].error or "") or "no association" in (tasks[0].error or "")
            assert tasks[0].payload and tasks[0].sent == ()
            failures = registry.get_sample_value("ctscreen_delivery_failures_total", {"destination": "pacs"})
            assert failures >= 2
            orthanc.start()
            (task,) = await until_states(deliverer, result.job_id, {"done"})
            objects = task.payload["objects"]
            assert [o["kind"] for o in objects] == ["sr"] + ["key_image"] * len(result.evidence.slices)
            assert sorted(task.sent) == sorted(o["uid"] for o in objects)
            held = _orthanc_series(orthanc, result.study_instance_uid)
            assert held.get("SR") == [objects[0]["uid"]]
            assert sorted(held.get("OT", [])) == sorted(o["uid"] for o in objects[1:])
            sent_total = registry.get_sample_value("ctscreen_delivery_objects_total", {"destination": "pacs"})
            assert sent_total == len(objects)  # each object acknowledged once: nothing sent twice
            for _ in range(3):  # a done task is never sent again by the loop
                await deliverer.poll()
            assert registry.get_sample_value("ctscreen_delivery_objects_total", {"destination": "pacs"}) == len(objects)
            assert registry.get_sample_value("ctscreen_deliveries_total",
                                             {"destination": "pacs", "outcome": "done"}) == 1
            with pytest.raises(ValueError, match="delivered to pacs already"):
                await deliverer.tasks.resend(result.job_id, "pacs", "dicom")
        finally:
            if orthanc._proc is None:
                orthanc.start()
            await store.close()

    asyncio.run(scenario())


@needs_orthanc
def test_a_pacs_that_asks_for_the_kos_gets_it_flagging_the_run_it_holds(orthanc, study_files, tmp_path):
    """objects [sr, key_images, kos]: Orthanc (a real PACS) stores the KO beside the SR and the key images, and
    every instance the KO flags is one it holds: the study's own slices of the run and the key images."""
    async def scenario():
        settings = delivery_settings(tmp_path)
        store, blobs, result = await done_job(settings, study_files)
        pacs = pacs_destination(orthanc, objects=["sr", "key_images", "kos"])
        deliverer = Deliverer(store, blobs, parse_destinations([pacs]), settings, CollectorRegistry())
        try:
            orthanc.store(*study_files)  # the PACS holds the study the modality sent it
            (task,) = await until_states(deliverer, result.job_id, {"done"})
            kinds = [o["kind"] for o in task.payload["objects"]]
            assert kinds == ["sr"] + ["key_image"] * len(result.evidence.slices) + ["kos"]
            held = _orthanc_series(orthanc, result.study_instance_uid)
            kos_uid = task.payload["objects"][-1]["uid"]
            assert held.get("KO") == [kos_uid]
            ids = {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in orthanc.instances_of_study(result.study_instance_uid)}
            kos = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{ids[kos_uid]}/file")))
            flagged = [str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                       for item in kos.ContentSequence if item.ValueType in ("IMAGE", "COMPOSITE")]
            key_images = sorted(o["uid"] for o in task.payload["objects"] if o["kind"] == "key_image")
            assert flagged[:3] == [s.sop_instance_uid for s in result.evidence.slices]
            assert sorted(flagged[3:]) == key_images == sorted(held["OT"])
            assert set(flagged) <= set(ids)  # nothing flagged that the PACS does not hold
        finally:
            await store.close()

    asyncio.run(scenario())


@needs_orthanc
def test_a_series_that_is_no_chest_stays_off_a_worklist_that_says_so_and_reaches_others_without_lesions(
        orthanc, study_files, tmp_path):
    """except_reasons: [not_chest] skips the head CT a router sent on; a destination without it gets the SR of the
    verdict, and no key images (its boxes are no lesions), even when it asks for them and for the KOS."""
    async def scenario():
        settings = delivery_settings(tmp_path)
        store, blobs, result = await done_job(settings, study_files, not_chest=True)
        worklist = pacs_destination(orthanc, rule={"verdicts": ["positive", "indeterminate"], "except_reasons": ["not_chest"]})
        archive = {**pacs_destination(orthanc, objects=["sr", "key_images", "kos"]), "name": "archive"}
        deliverer = Deliverer(store, blobs, parse_destinations([worklist, archive]), settings, CollectorRegistry())
        try:
            tasks = {t.destination: t for t in await until_states(deliverer, result.job_id, {"done", "skipped"})}
            assert tasks["pacs"].state == "skipped"
            assert any("not_chest results are not sent here" in (e.get("detail") or "") for e in tasks["pacs"].history)
            assert tasks["archive"].state == "done"
            assert [o["kind"] for o in tasks["archive"].payload["objects"]] == ["sr"]
            assert set(_orthanc_series(orthanc, result.study_instance_uid)) == {"SR"}
        finally:
            await store.close()

    asyncio.run(scenario())


@needs_orthanc
def test_a_study_screened_again_leaves_one_live_reading_in_the_pacs_and_the_ris(orthanc, study_files, tmp_path):
    """Version 2 of a study (an instance arrived after it was screened) is delivered after version 1: its SR
    names version 1's SR in the Predecessor Documents Sequence, and its FHIR report names version 1's as the
    one it replaces (diagnosticReport-replaces), which keeps its own status: the RIS's current report is
    version 2's. Version 1 sent again late (a re-send) is skipped as superseded: the RIS is left as it was.
    Every object is made under the site's UID root."""
    from aggregator.fhir import report_identifier

    async def scenario():
        settings = delivery_settings(tmp_path, uid_root="1.2.840.99999.7")  # the site's UID root: every object under it
        store, blobs, first = await done_job(settings, study_files)
        ris = FhirReceiver()
        destinations = parse_destinations([pacs_destination(orthanc), {"name": "ris", "kind": "fhir", "url": ris.url}])
        deliverer = Deliverer(store, blobs, destinations, settings, CollectorRegistry())

        def statuses() -> dict[str, str]:
            return {r["identifier"][0]["value"]: r["status"] for r in ris.of_type("DiagnosticReport")}

        def sr_uid(tasks) -> str:
            (pacs,) = [t for t in tasks if t.destination == "pacs"]
            return next(o["uid"] for o in pacs.payload["objects"] if o["kind"] == "sr")

        try:
            first_tasks = await until_states(deliverer, first.job_id, {"done"})
            first_sr = sr_uid(first_tasks)
            (pacs,) = [t for t in first_tasks if t.destination == "pacs"]
            assert all(o["uid"].startswith("1.2.840.99999.7.") for o in pacs.payload["objects"])
            assert statuses() == {report_identifier(first): "preliminary"}
            assert ris.current_reports() == [report_identifier(first)]
            held_first = dict(ris.resources)
            _, _, second = await done_job(settings, study_files, stores=(store, blobs))
            second_sr = sr_uid(await until_states(deliverer, second.job_id, {"done"}))
            assert statuses() == {report_identifier(first): "preliminary", report_identifier(second): "preliminary"}
            assert ris.current_reports() == [report_identifier(second)]
            assert not ris.errors, ris.errors
            assert all(ris.resources[k] is v for k, v in held_first.items())  # version 1 as it was
            assert {r["status"] for r in ris.resources.values()} <= {"preliminary", "active"}  # nothing cancelled
            assert len(ris.of_type("Device")) == 1  # the same algorithm made both
            held = {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in orthanc.instances_of_study(first.study_instance_uid)}
            assert {first_sr, second_sr} <= held.keys()
            sr = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{held[second_sr]}/file")))
            (series,) = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence
            assert [r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence] == [first_sr]
            assert "PredecessorDocumentsSequence" not in pydicom.dcmread(
                io.BytesIO(orthanc.get(f"/instances/{held[first_sr]}/file")))
            # sent again late (a re-send an operator asks for after an outage), the superseded reading reaches
            # no destination: it would stand beside the current one where a peer has no replaces chain
            await deliverer.tasks.resend(first.job_id, "ris", "fhir", force=True)
            (again,) = [t for t in await until_states(deliverer, first.job_id, {"done", "skipped"})
                        if t.destination == "ris"]
            assert again.state == "skipped" and again.history[-1]["detail"].startswith("superseded: version 2")
            assert ris.current_reports() == [report_identifier(second)] and not ris.errors
            assert all(ris.resources[k] is v for k, v in held_first.items())
        finally:
            await deliverer.stop()
            ris.close()
            await store.close()

    asyncio.run(scenario())


@needs_orthanc
def test_a_reading_built_before_an_outage_and_superseded_during_it_reaches_no_destination(orthanc, study_files,
                                                                                          tmp_path):
    """Version 1's objects were built, the PACS was down, and version 2 was screened meanwhile. Once the PACS was
    back the retries went in back-off order: version 2 first (nothing of version 1 acknowledged, so no note),
    then version 1, whose positive SR and key images then stood live beside the current reading."""
    async def scenario():
        settings = delivery_settings(tmp_path)
        store, blobs, first = await done_job(settings, study_files)
        down = Deliverer(store, blobs, parse_destinations([{**pacs_destination(orthanc), "port": 9}]), settings,
                         CollectorRegistry())
        try:  # version 1 built and tried: the peer refuses the connection
            (built,) = await until_states(down, first.job_id, {"pending"}, at_least_attempts=1)
            assert built.payload is not None
        finally:
            await down.stop()
        _, _, second = await done_job(settings, study_files, stores=(store, blobs), positive=False)
        deliverer = Deliverer(store, blobs, parse_destinations([pacs_destination(orthanc)]), settings,
                              CollectorRegistry())
        try:
            (later,) = await until_states(deliverer, second.job_id, {"done"})
            (earlier,) = await until_states(deliverer, first.job_id, {"skipped"})
            assert earlier.history[-1]["detail"].startswith("superseded: version 2 of the study")
            held = set(_orthanc_series(orthanc, first.study_instance_uid).get("SR", []))
            assert held == {o["uid"] for o in later.payload["objects"] if o["kind"] == "sr"}  # version 2's SR only
        finally:
            await deliverer.stop()
            await store.close()

    asyncio.run(scenario())


@needs_orthanc
def test_an_earlier_version_screened_after_a_later_one_replaces_nothing(orthanc, study_files, tmp_path):
    """Version 1 failed, version 2 was screened and delivered, then an operator retried version 1: its result,
    written last, was taken for the newest reading; it became the RIS's current report and its Rejection Note
    retracted version 2's SR at the PACS. Readings are ordered by version: version 1 reaches no destination.
    A failed version 1 is no longer retried once version 2 exists (409 superseded), but its result can still be
    written last: it was being screened (a slow or taken-over lease) while version 2 was received, screened and
    delivered, and it finishes after."""
    from aggregator.fhir import report_identifier

    async def scenario():
        settings = delivery_settings(tmp_path)
        await asyncio.to_thread(upgrade, settings.database())
        store, blobs = Store(settings.database()), FolderBlobs(settings.blobs())
        first = await accepted_job(store, blobs, study_files[:-1])  # claimed: being screened
        _, _, second = await done_job(settings, study_files, stores=(store, blobs))
        ris = FhirReceiver()
        deliverer = Deliverer(store, blobs, parse_destinations([
            pacs_destination(orthanc, objects=["sr", "key_images", "rejection"]),
            {"name": "ris", "kind": "fhir", "url": ris.url}]), settings, CollectorRegistry())
        try:
            await until_states(deliverer, second.job_id, {"done"})
            before = _orthanc_series(orthanc, second.study_instance_uid)
            await finish_job(store, settings, first.job_id, study_files[:-1], positive=False)
            assert await store.earlier_results(first.job_id) == []  # no reading came before version 1
            assert [r.job_id for r in await store.earlier_results(second.job_id)] == [first.job_id]
            for task in await until_states(deliverer, first.job_id, {"skipped"}):
                assert task.history[-1]["detail"].startswith("superseded: version 2 of the study"), task
            assert _orthanc_series(orthanc, second.study_instance_uid) == before  # nothing retracted, nothing added
            assert ris.current_reports() == [report_identifier(second)] and not ris.errors
        finally:
            await deliverer.stop()
            ris.close()
            await store.close()

    asyncio.run(scenario())


def test_a_reading_a_fhir_rule_leaves_out_still_replaces_the_one_sent_there(study_files, tmp_path):
    """A RIS that takes positives only held version 1's positive report; version 2, negative, was skipped by the
    rule, so the positive stayed the RIS's current report. It goes, replacing it (a FHIR receiver of ours,
    ``tests/fhir_receiver.py``, that keeps the replaces chain as a server does)."""
    from aggregator.fhir import report_identifier

    async def scenario():
        settings = delivery_settings(tmp_path)
        store, blobs, first = await done_job(settings, study_files)
        ris = FhirReceiver()
        deliverer = Deliverer(store, blobs, parse_destinations([{"name": "ris", "kind": "fhir", "url": ris.url,
                                                                 "rule": {"verdicts": ["positive"]}}]),
                              settings, CollectorRegistry())
        try:
            await until_states(deliverer, first.job_id, {"done"})
            _, _, second = await done_job(settings, study_files, stores=(store, blobs), positive=False)
            (task,) = await until_states(deliverer, second.job_id, {"done", "skipped"})
            assert task.state == "done" and "sent all the same" in task.payload["rule"]
            assert ris.current_reports() == [report_identifier(second)] and not ris.errors
            # the RIS holds this study's readings now: each later one replaces the one before there
            _, _, third = await done_job(settings, study_files, stores=(store, blobs), positive=False)
            (task,) = await until_states(deliverer, third.job_id, {"done", "skipped"})
            assert task.state == "done" and ris.current_reports() == [report_identifier(third)]
        finally:
            await deliverer.stop()
            ris.close()
            await store.close()

    asyncio.run(scenario())


def test_a_webhooks_secret_in_its_url_stays_out_of_the_log(study_files, tmp_path, caplog):
    """ctscreen's lines name a destination by its URL without the query, but httpx logged every request's whole
    URL at INFO: a webhook's token in its query string went to the log at --log-level info."""
    from gateway.logs import ContextFilter
    from gateway.phi import protect_logs

    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(ContextFilter())  # what gateway.logs.configure puts on the process's handlers
    protect_logs()  # what create_app does for the gateway's process

    async def scenario():
        settings = delivery_settings(tmp_path)
        store, blobs, first = await done_job(settings, study_files)
        ris = FhirReceiver()
        deliverer = Deliverer(store, blobs, parse_destinations([{"name": "hook", "kind": "fhir",
                                                                 "url": f"{ris.url}?token=s3cret-token"}]),
                              settings, CollectorRegistry())
        try:
            await until_states(deliverer, first.job_id, {"done"})
        finally:
            await deliverer.stop()
            ris.close()
            await store.close()
        return first.job_id

    job_id = asyncio.run(scenario())
    assert "delivered" in caplog.text and "s3cret-token" not in caplog.text
    # the delivery's records carry its job's id (gateway.logs.JOB_ID), as the screening's do
    delivered = [r for r in caplog.records if r.getMessage().endswith("attempt 1)") and "delivered" in r.getMessage()]
    assert delivered and all(r.job_id == job_id for r in delivered), [(r.getMessage(), r.job_id)
                                                                       for r in caplog.records]


def test_key_images_built_again_are_the_same_objects_byte_for_byte(study_files, tmp_path):
    """Each destination builds its own payload, and a lost blob is built again: the key images carried the
    build's clock in Date and Time of Secondary Capture, other bytes under the same SOP Instance UID."""
    from gateway.delivery.payloads import build_dicom

    blobs, result, sources = _done_sources(study_files, tmp_path)
    result = result.model_copy(update={"created_at": datetime(2026, 3, 1, 9, 30, 15, tzinfo=UTC)})  # as the worker's

    def build() -> dict[str, bytes]:
        def put(data: bytes) -> str:
            key = new_key()
            blobs.put(key, data)
            return key

        return {o["uid"]: blobs.get(o["blob_key"]) for o in build_dicom(result, sources, ["sr", "key_images", "kos"], put)}

    first = build()
    time.sleep(0.05)
    again = build()
    assert first.keys() == again.keys() and len(first) >= 3
    assert [uid for uid in first if first[uid] != again[uid]] == []


@needs_orthanc
def test_the_failed_deliveries_of_an_outage_are_listed_and_sent_again_in_one_call(orthanc, tmp_path):
    """After an outage longer than the tries each failed delivery had to be found in the logs and re-sent by its
    job: GET /v1/deliveries?state=failed lists them, POST /v1/deliveries/resend?destination= sends them all.
    Through the whole app (real store, real Orthanc); Triton is faked (``FakeFleet``): only delivery is tested."""
    from fastapi.testclient import TestClient

    from gateway.main import create_app
    from tests.gateway_app_fakes import FakeFleet, ct_series, wait_job

    destinations = tmp_path / "destinations.json"
    destinations.write_text(json.dumps({"destinations": [{**pacs_destination(orthanc), "objects": ["sr"]}]}))
    settings = delivery_settings(tmp_path / "data", destinations_file=destinations, delivery_max_attempts=1)
    jobs = []
    orthanc.stop()
    try:
        with TestClient(create_app(settings, client_factory=FakeFleet())) as client:
            for _ in range(2):
                _, files = ct_series(9, lesion=(3, 4, 5), size=256)
                r = client.post("/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in files])
                assert r.status_code == 202, r.text
                jobs.append(wait_job(client, r.json()["job_id"])["job_id"])
            deadline = time.monotonic() + 60
            while len(failed := client.get("/v1/deliveries").json()) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert sorted(d["job_id"] for d in failed) == sorted(jobs)
            assert all(d["state"] == "failed" and d["destination"] == "pacs" and d["error"] for d in failed)
            assert client.get("/v1/deliveries", params={"state": "done"}).json() == []
            assert client.get("/v1/deliveries", params={"destination": "ris"}).status_code == 404
            assert client.post("/v1/deliveries/resend").status_code == 422  # which destination: always named
            orthanc.start()
            r = client.post("/v1/deliveries/resend", params={"destination": "pacs"})
            assert (r.status_code, r.json()) == (202, {"destination": "pacs", "queued": 2})
            while len(client.get("/v1/deliveries", params={"state": "done"}).json()) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.get("/v1/deliveries").json() == []
            assert sorted(d["job_id"] for d in client.get("/v1/deliveries", params={"state": "done"}).json()) == sorted(jobs)
    finally:
        orthanc.start()


@needs_orthanc
def test_exhausted_attempts_fail_keep_the_payload_and_resend_delivers(orthanc, study_files, tmp_path):
    async def scenario():
        settings = delivery_settings(tmp_path, delivery_max_attempts=2)
        store, blobs, result = await done_job(settings, study_files, filename_prefix="dimse:CT_ROOM_1@127.0.0.1#")
        wrong = pacs_destination(orthanc, port=orthanc.dicom_port, ae_title="NOT_ORTHANC")  # Orthanc rejects the called AE
        ris_rule = {"name": "only-ct2", "kind": "dicom", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                    "port": orthanc.dicom_port, "rule": {"calling_ae_titles": ["CT_ROOM_2"]}}
        deliverer = Deliverer(store, blobs, parse_destinations([wrong, ris_rule]), settings, CollectorRegistry())
        try:
            tasks = {t.destination: t for t in await until_states(deliverer, result.job_id, {"failed", "skipped"})}
            assert tasks["only-ct2"].state == "skipped"  # the study came from CT_ROOM_1
            failed = tasks["pacs"]
            assert failed.state == "failed" and "rejected" in failed.error
            assert all(blobs.get(o["blob_key"]) for o in failed.payload["objects"])  # payload kept
            assert _orthanc_series(orthanc, result.study_instance_uid) == {}
            fixed = Deliverer(store, blobs, parse_destinations([pacs_destination(orthanc)]), settings, CollectorRegistry())
            again = await fixed.tasks.resend(result.job_id, "pacs", "dicom")
            assert again.state == "pending" and again.attempts == 0
            (done,) = [t for t in await until_states(fixed, result.job_id, {"done", "skipped"}) if t.destination == "pacs"]
            assert done.payload == failed.payload  # the same objects, built once
            assert set(_orthanc_series(orthanc, result.study_instance_uid)) == {"SR", "OT"}
        finally:
            await store.close()

    asyncio.run(scenario())


@needs_orthanc
def test_a_payload_whose_blobs_went_missing_is_built_again_with_the_same_uids(orthanc, study_files, tmp_path):
    """A failed delivery keeps its payload, but its blobs can go (a volume restored from an older backup, a
    hand clean-up): the re-send builds the payload again from the stored instances and delivers the same
    objects (their UIDs derive from the job), instead of failing for good."""
    async def scenario():
        settings = delivery_settings(tmp_path, delivery_max_attempts=1)
        store, blobs, result = await done_job(settings, study_files)
        wrong = pacs_destination(orthanc, ae_title="NOT_ORTHANC")  # Orthanc rejects the called AE
        deliverer = Deliverer(store, blobs, parse_destinations([wrong]), settings, CollectorRegistry())
        try:
            (failed,) = await until_states(deliverer, result.job_id, {"failed"})
            gone = [o["blob_key"] for o in failed.payload["objects"]]
            for key in gone:
                blobs.delete(key)
            fixed = Deliverer(store, blobs, parse_destinations([pacs_destination(orthanc)]), settings, CollectorRegistry())
            await fixed.tasks.resend(result.job_id, "pacs", "dicom")
            (done,) = await until_states(fixed, result.job_id, {"done", "failed"})
            assert done.state == "done", done.error
            uids = [o["uid"] for o in failed.payload["objects"]]
            assert [o["uid"] for o in done.payload["objects"]] == uids
            assert not set(gone) & {o["blob_key"] for o in done.payload["objects"]}  # built again
            held = _orthanc_series(orthanc, result.study_instance_uid)
            assert sorted(held["SR"] + held["OT"]) == sorted(uids)
            assert sum("built" in (e.get("detail") or "") for e in done.history) == 2  # once, then again
        finally:
            await store.close()

    asyncio.run(scenario())


def test_destinations_file_errors_are_one_line_and_keep_secrets(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PACS_TOKEN", "s3cr3t-token")
    good = tmp_path / "d.yaml"
    good.write_text("destinations:\n"
                    "  - {name: web, kind: stowrs, url: 'http://pacs/dicom-web',"
                    " headers: {Authorization: 'Bearer ${PACS_TOKEN}'}}\n"
                    "  - {name: ris, kind: fhir, url: 'https://ris/fhir', rule: {verdicts: [positive]},"
                    " patient_id_system: 'urn:oid:1.2.3', issuer_systems: {HOSP: 'https://hosp/mrn'},"
                    " accession_system: 'urn:oid:1.2.4'}\n")
    web, ris = load_destinations(good)
    assert ris.systems().of_patient("HOSP") == "https://hosp/mrn" and ris.systems().of_patient(None) == "urn:oid:1.2.3"
    assert ris.systems().accession == "urn:oid:1.2.4"
    assert web.header_values() == {"Authorization": "Bearer s3cr3t-token"}
    assert "s3cr3t" not in repr(web) and "s3cr3t" not in str(web.model_dump())
    assert ris.rule.admits("negative", set()) and ris.rule.admits("positive", set()) is None
    with pytest.raises(DestinationsError, match="unknown reason code.*notchest"):  # a typo would skip nothing
        parse_destinations([{"name": "p", "kind": "fhir", "url": "http://x", "rule": {"except_reasons": ["notchest"]}}])
    cases = {
        "dup.json": (json.dumps([{"name": "a", "kind": "fhir", "url": "http://x"}] * 2), "unique"),
        "port.yaml": ("destinations: [{name: p, kind: dicom, ae_title: A, host: h, port: 70000}]", "port"),
        "kind.yaml": ("destinations: [{name: p, kind: ftp}]", "destinations.0"),
        "env.yaml": ("destinations: [{name: w, kind: fhir, url: 'http://x', headers: {X: '${NOPE_UNSET}'}}]",
                     "NOPE_UNSET"),
        "bad.yaml": ("destinations: [unclosed", "not valid YAML"),
        "system.yaml": ("destinations: [{name: r, kind: fhir, url: 'http://x', patient_id_system: 'no scheme'}]",
                        "patient_id_system"),
        # each of these loaded, then failed every delivery with a traceback, retried for about a day
        "url_port.yaml": ("destinations: [{name: r, kind: fhir, url: 'http://127.0.0.1:99999/fhir'}]", "1 to 65535"),
        "header_value.yaml": ("destinations: [{name: r, kind: fhir, url: 'http://x', headers: {A: 'Bearer t\u00f6k'}}]",
                              "ASCII on one line"),
        "header_name.yaml": ("destinations: [{name: r, kind: fhir, url: 'http://x', headers: {'A B': 'x'}}]",
                             "no HTTP header name"),
        "not_a_ca.yaml": (f"destinations: [{{name: p, kind: dicom, ae_title: A, host: h, port: 104, objects: [sr], "
                          f"tls: {{ca_file: '{tmp_path / 'd.yaml'}'}}}}]", "do not make a TLS context"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DestinationsError, match=expected) as exc:
            load_destinations(path)
        assert "\n" not in str(exc.value)
    for encoding in ("utf-16", "latin-1"):  # UTF-16: what Windows PowerShell writes by default (was a traceback)
        path = tmp_path / f"{encoding}.yaml"
        path.write_text("destinations: [{name: r\u00e9, kind: fhir, url: 'http://x'}]", encoding=encoding)
        with pytest.raises(DestinationsError, match="not UTF-8 text"):
            load_destinations(path)
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text("destinations: [{name: w, kind: fhir, url: 'ftp://x', headers: {A: 'Bearer s3cr3t-token'}}]")
    with pytest.raises(DestinationsError) as exc:
        load_destinations(leaky)
    assert "s3cr3t" not in str(exc.value)
    # a password in the URL was used (httpx sends it as Basic auth) and written into every delivery error: the
    # log, the stored error the deliveries API and the web page show
    for url in ("https://ris:s3cr3t@ris.example/fhir", "https://s3cr3t@ris.example/dicomweb"):
        leaky.write_text(f"destinations: [{{name: w, kind: stowrs, url: '{url}', objects: [sr]}}]")
        with pytest.raises(DestinationsError, match="no user name or password: give credentials as a header") as exc:
            load_destinations(leaky)
        assert "s3cr3t" not in str(exc.value)
    from gateway.cli import serve_main

    with pytest.raises(SystemExit) as stop:
        serve_main(["--destinations", str(tmp_path / "port.yaml")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert stop.value.code == 2 and last.startswith("ctscreen serve: error: destinations file") and "port" in last
    with pytest.raises(ValueError, match="destinations"):
        Settings(destinations_file=tmp_path / "missing.yaml")


def test_ae_titles_hosts_and_stow_urls_are_checked_or_expanded_at_start(monkeypatch):
    """An AE title with a backslash, a control character, a non-ASCII letter or only spaces was accepted and
    every association then failed, retried for a day; a ``${VAR}`` in ``url`` or ``host`` was sent as written
    (headers alone were expanded); a STOW-RS base with a query string was posted to ``...?apikey=abc/studies``.
    Each stops the start in one line naming the destination and the field; ``${VAR}`` is expanded as in headers."""
    monkeypatch.setenv("PACS_HOST", "pacs.example.org")
    monkeypatch.delenv("NOPE_UNSET", raising=False)

    def dicom(**kw) -> dict:
        return {"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "pacs", "port": 104, **kw}

    for bad, field in [({"ae_title": "PACS\\1"}, "ae_title"), ({"ae_title": "    "}, "ae_title"),
                       ({"ae_title": "PACS\t1"}, "ae_title"), ({"ae_title": "A" * 17}, "ae_title"),
                       ({"calling_ae_title": "CTSCR\u00c9EN"}, "calling_ae_title"),
                       ({"calling_ae_title": ""}, "calling_ae_title")]:
        with pytest.raises(DestinationsError) as exc:
            parse_destinations([dicom(**bad)])
        assert str(exc.value).startswith(f"destinations: destination 'pacs' (destinations.0.{field}): "), str(exc.value)
        assert "\n" not in str(exc.value)
    assert parse_destinations([dicom(ae_title="PACS_1 (CT)", calling_ae_title=" CTSCREEN")])
    [pacs, web] = parse_destinations([dicom(host="${PACS_HOST}"),
                                      {"name": "web", "kind": "stowrs", "url": "https://${PACS_HOST}/dicom-web"}])
    assert pacs.host == "pacs.example.org" and web.url == "https://pacs.example.org/dicom-web"
    with pytest.raises(DestinationsError, match=r"'pacs' \(destinations.0.host\): .*unset environment variable NOPE_UNSET"):
        parse_destinations([dicom(host="${NOPE_UNSET}")])
    with pytest.raises(DestinationsError, match=r"'web' \(destinations.0.url\): .*unset environment variable NOPE_UNSET"):
        parse_destinations([{"name": "web", "kind": "stowrs", "url": "https://${NOPE_UNSET}/dicom-web"}])
    for url in ("https://pacs/dicom-web?apikey=abc", "https://pacs/dicom-web#studies", "https://pacs/dicom-web?"):
        with pytest.raises(DestinationsError, match=r"'web' \(destinations.0.url\): .*no query string or fragment"):
            parse_destinations([{"name": "web", "kind": "stowrs", "url": url}])
    assert parse_destinations([{"name": "hook", "kind": "fhir", "url": "https://ris/hook?source=ctscreen"}])


def _done_sources(study_files: list[Path], tmp_path: Path):
    """A done job of ``study_files``: its blob store, its result and its instances as ``(filename, bytes)``."""
    async def scenario():
        settings = delivery_settings(tmp_path)
        store, blobs, result = await done_job(settings, study_files)
        files, _ = await Deliveries(store).job_sources(result.job_id)
        await store.close()
        return blobs, result, [(n, blobs.get(k)) for n, k in files]

    return asyncio.run(scenario())


def _built(study_files: list[Path], tmp_path: Path):
    """The SR and key images the payload builder makes from a done job of ``study_files``."""
    from gateway.delivery.payloads import build_dicom

    blobs, result, sources = _done_sources(study_files, tmp_path)
    made = build_dicom(result, sources, ["sr", "key_images"], lambda data: (k := new_key(), blobs.put(k, data))[0])
    return blobs, result, made


def test_sr_of_a_stored_job_parses_and_refers_to_its_instances(study_files, tmp_path):
    """The payload builder reads the stored instances (blob folder) and makes a highdicom-readable SR."""
    import highdicom

    blobs, result, made = _built(study_files, tmp_path)
    sr = highdicom.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(blobs.get(made[0]["blob_key"]))))
    src = pydicom.dcmread(study_files[0], stop_before_pixels=True)
    assert (sr.PatientID, sr.StudyInstanceUID) == (src.PatientID, src.StudyInstanceUID)
    refs = {g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for g in sr.content.get_planar_roi_measurement_groups()}
    assert refs == {s.sop_instance_uid for s in result.evidence.slices}


def test_dates_a_scanner_wrote_malformed_are_left_empty_and_never_logged(study_files, tmp_path, caplog):
    """A birth date like 03/02/1901 (as some scanners write it) made every SR and key image fail, with
    highdicom's error quoting the value in the delivery's error. The objects are now made with the bad
    dates left empty (the patient's identity kept), and no log record or warning quotes them."""
    import warnings

    import highdicom

    from gateway.phi import protect_logs

    bad = {"PatientBirthDate": "03/02/1901", "StudyDate": "2020133", "StudyTime": "25:61:99"}
    with warnings.catch_warnings():  # the test's own writing of the files is not what is checked
        warnings.simplefilter("ignore")
        for f in study_files:
            ds = pydicom.dcmread(f)
            for keyword, value in bad.items():
                ds.add_new(pydicom.datadict.tag_for_keyword(keyword), pydicom.datadict.dictionary_VR(keyword), value)
            ds.save_as(f)
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        protect_logs()  # what create_app does for the gateway's process
        blobs, result, made = _built(study_files, tmp_path)
    assert [m["kind"] for m in made][:1] == ["sr"] and len(made) == 1 + len(result.evidence.slices)
    src = pydicom.dcmread(study_files[0], stop_before_pixels=True)
    for m in made:
        out = pydicom.dcmread(io.BytesIO(blobs.get(m["blob_key"])))
        assert (out.PatientID, out.PatientName) == (src.PatientID, src.PatientName)
        assert (out.PatientBirthDate, out.StudyDate, out.StudyTime) == ("", "", "")
    highdicom.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(blobs.get(made[0]["blob_key"]))))
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert any("PatientBirthDate" in line for line in said)  # which attribute was left empty is logged
    for value in bad.values():
        assert not [line for line in said if value in line], value


@pytest.mark.parametrize(("sex", "written"), [("U", ""), ("W", ""), ("X", ""), ("m", "M"), ("O", "O")])
def test_a_patients_sex_outside_m_f_o_is_left_empty_and_the_objects_are_made(study_files, tmp_path, caplog, sex,
                                                                              written):
    """Scanners write U (unknown) or W; highdicom takes M, F and O only and refused the SR, the key images and the
    KOS for it: the delivery failed, nothing reached the PACS (a reviewer's reproduction through storescu). The
    objects are made with it left empty (m read as M), and the log names the attribute, never the value."""
    for f in study_files:
        ds = pydicom.dcmread(f)
        ds.PatientSex = sex
        ds.save_as(f)
    caplog.set_level(logging.DEBUG)
    blobs, result, made = _built(study_files, tmp_path)
    assert [m["kind"] for m in made][:1] == ["sr"] and len(made) == 1 + len(result.evidence.slices)
    assert {pydicom.dcmread(io.BytesIO(blobs.get(m["blob_key"]))).PatientSex for m in made} == {written}
    if not written:
        assert any("PatientSex" in r.getMessage() for r in caplog.records)


class _Hang:
    """A PACS that hangs: it accepts TCP connections (the kernel's backlog) and never answers."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def _run_then_close(scenario, hangs: list[_Hang]):
    try:
        return asyncio.run(scenario())
    finally:
        for h in hangs:
            h.close()


@needs_orthanc
def test_a_destination_that_hangs_does_not_delay_another(orthanc, study_files, tmp_path):
    """With one slot per replica for all destinations, a hanging PACS held it for its whole timeout while
    the healthy one waited. Each destination now has its own slots: the healthy delivery ends while the
    hanging one is still being sent."""
    hang = _Hang()

    async def scenario():
        settings = delivery_settings(tmp_path, delivery_concurrency=1)
        store, blobs, result = await done_job(settings, study_files)
        hanging = {"name": "hang", "kind": "dicom", "ae_title": "HANG", "host": "127.0.0.1", "port": hang.port,
                   "timeout_s": 8}
        deliverer = Deliverer(store, blobs, parse_destinations([hanging, pacs_destination(orthanc)]), settings,
                              CollectorRegistry())
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                await deliverer.poll()
                await asyncio.sleep(0.1)
                tasks = {t.destination: t for t in await deliverer.tasks.of_job(result.job_id)}
                if tasks.get("pacs") is not None and tasks["pacs"].state == "done":
                    break
            assert tasks["pacs"].state == "done", tasks
            assert tasks["hang"].state == "sending", tasks["hang"]  # still waiting for its association
        finally:
            await deliverer.stop()
            await store.close()

    _run_then_close(scenario, [hang])


def test_a_replica_stopping_mid_send_gives_the_delivery_back_at_once_without_counting_the_try(study_files, tmp_path):
    """A rolling restart cancelled the sends in flight and left their leases to lapse (120 s), each cut
    send counted as a try. Stopping now gives them back: pending, due now, the try not counted."""
    hang = _Hang()

    async def scenario():
        settings = delivery_settings(tmp_path)
        store, blobs, result = await done_job(settings, study_files)
        hanging = {"name": "hang", "kind": "dicom", "ae_title": "HANG", "host": "127.0.0.1", "port": hang.port,
                   "timeout_s": 30}
        deliverer = Deliverer(store, blobs, parse_destinations([hanging]), settings, CollectorRegistry())
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                await deliverer.poll()
                await asyncio.sleep(0.1)
                (task,) = await deliverer.tasks.of_job(result.job_id)
                if task.state == "sending":
                    break
            assert (task.state, task.attempts) == ("sending", 1), task
            await deliverer.stop()  # the replica shuts down mid-send
            (task,) = await deliverer.tasks.of_job(result.job_id)
            other = Deliveries(Store(settings.database(), owner="another-replica"))
            try:
                taken = await other.claim(60, ["hang"])  # at once, not after the lease
            finally:
                await other.store.close()
            return task, taken
        finally:
            await store.close()

    task, taken = _run_then_close(scenario, [hang])
    assert (task.state, task.attempts) == ("pending", 0), task
    assert taken is not None and taken.attempts == 1


def test_building_a_studys_objects_reads_only_the_key_images_pixels(tmp_path, monkeypatch):
    """The payload was built from every instance's bytes, then every instance parsed with its pixels (and
    the SR's header copies read them too): a 600-slice study held twice its size while its SR was built.
    From the blob files the pixels are read only for the key images, and the objects are the same."""
    import pydicom.filereader

    from gateway.delivery import payloads
    from gateway.store import instance_sources
    from tests.gateway_app_fakes import ct_series

    study_files = []
    for name, data in ct_series(40, size=256)[1]:  # 128 KiB of pixels a slice: read when used
        study_files.append(tmp_path / "study" / name)
        study_files[-1].parent.mkdir(exist_ok=True)
        study_files[-1].write_bytes(data)

    async def stored():
        settings = delivery_settings(tmp_path)
        store, blobs, result = await done_job(settings, study_files)
        files, _ = await Deliveries(store).job_sources(result.job_id)
        await store.close()
        return blobs, result, files

    blobs, result, files = asyncio.run(stored())
    read = pydicom.filereader.read_deferred_data_element  # imported by Dataset.__getitem__ when it reads one
    pixels_read: list[int] = []

    def counting(*args, **kwargs):  # pydicom's own deferred read, counted when it reads Pixel Data
        elem = read(*args, **kwargs)
        pixels_read.extend([1] if elem.tag == 0x7FE00010 else [])
        return elem

    monkeypatch.setattr(pydicom.filereader, "read_deferred_data_element", counting)
    kinds = ["sr", "key_images", "kos"]
    from_files = payloads.build_dicom(result, instance_sources(blobs, files), kinds, lambda data: new_key())
    from_bytes = payloads.build_dicom(result, [(n, blobs.get(k)) for n, k in files], kinds, lambda data: new_key())
    assert [(o["kind"], o["uid"]) for o in from_files] == [(o["kind"], o["uid"]) for o in from_bytes]
    n_key_images = sum(o["kind"] == "key_image" for o in from_files)
    assert 0 < len(pixels_read) <= n_key_images, (len(pixels_read), n_key_images)  # of 40 slices


def _deliver_to_scp(scp, study_files: list[Path], tmp_path: Path, *, evt_handlers=(), drive=None, **settings_kw):
    """Screen a study, deliver it to the pynetdicom SCP ``scp`` (served on a free port) and return the
    delivery task once it is done or failed (or what ``drive(deliverer, job_id)`` returns, when given)."""
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=list(evt_handlers))
    port = server.server_address[1]

    async def scenario():
        settings = delivery_settings(tmp_path, **settings_kw)
        store, blobs, result = await done_job(settings, study_files)
        dest = {"name": "pacs", "kind": "dicom", "ae_title": scp.ae_title, "host": "127.0.0.1", "port": port}
        deliverer = Deliverer(store, blobs, parse_destinations([dest]), settings, CollectorRegistry())
        try:
            if drive is not None:
                return await drive(deliverer, result.job_id)
            return await until_states(deliverer, result.job_id, {"done", "failed"})
        finally:
            await store.close()

    try:
        (task,) = asyncio.run(scenario())
    finally:
        server.shutdown()
    return task


def test_a_destination_without_the_sr_class_fails_at_once_naming_it(study_files, tmp_path, caplog):
    """pynetdicom raised ValueError for an object whose class the peer did not accept; the catch-all
    retried it past every limit, a traceback each time. It is a permanent refusal that says what to change."""
    from pynetdicom import AE
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    scp = AE(ae_title="SC_ONLY")
    scp.add_supported_context(SecondaryCaptureImageStorage)
    task = _deliver_to_scp(scp, study_files, tmp_path, delivery_max_attempts=5)
    assert task.state == "failed" and task.attempts == 1 and task.sent == ()
    assert "Comprehensive 3D SR Storage" in task.error and "objects" in task.error
    assert not [r for r in caplog.records if r.exc_info]


def test_an_unexpected_error_is_retried_only_up_to_the_attempts(study_files, tmp_path, monkeypatch):
    from gateway.delivery import payloads

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(payloads, "build_dicom", broken)

    async def scenario():
        settings = delivery_settings(tmp_path, delivery_max_attempts=2)
        store, blobs, result = await done_job(settings, study_files)
        dest = {"name": "pacs", "kind": "dicom", "ae_title": "ANY", "host": "127.0.0.1", "port": 9}
        deliverer = Deliverer(store, blobs, parse_destinations([dest]), settings, CollectorRegistry())
        try:
            return await until_states(deliverer, result.job_id, {"failed"}, timeout=20)
        finally:
            await store.close()

    (task,) = asyncio.run(scenario())
    assert task.attempts == 2 and task.error == "internal error: RuntimeError"


def test_peers_that_hang_do_not_take_the_threads_the_gateway_reads_with(study_files, tmp_path):
    """C-STORE sends ran on the event loop's default thread pool (6 threads on 2 cores), which blob reads
    and API-key checks share: a few hanging PACS filled it. They have threads of their own now. The
    default pool is made 2 threads here, as many as the hanging sends."""
    from concurrent.futures import ThreadPoolExecutor

    hangs = [_Hang(), _Hang()]

    async def scenario():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))
        settings = delivery_settings(tmp_path, delivery_concurrency=1)
        store, blobs, result = await done_job(settings, study_files)
        dests = [{"name": f"hang{i}", "kind": "dicom", "ae_title": "HANG", "host": "127.0.0.1", "port": h.port,
                  "timeout_s": 10} for i, h in enumerate(hangs)]
        deliverer = Deliverer(store, blobs, parse_destinations(dests), settings, CollectorRegistry())
        try:
            for _ in range(100):
                await deliverer.poll()
                await asyncio.sleep(0.1)
                tasks = await deliverer.tasks.of_job(result.job_id)
                if len(tasks) == 2 and all(t.state == "sending" and t.payload for t in tasks):
                    break
            await asyncio.sleep(1.0)  # both sends are waiting for their association now
            assert await asyncio.wait_for(asyncio.to_thread(lambda: "read"), 4.0) == "read"
            assert {t.state for t in await deliverer.tasks.of_job(result.job_id)} == {"sending"}
        finally:
            await deliverer.stop()
            await store.close()

    _run_then_close(scenario, hangs)


def test_a_peer_that_holds_the_objects_already_counts_as_delivered(study_files, tmp_path):
    """A PACS that refuses overwrites answers a resend, or a retry after a lost answer, with 0x0111 (duplicate
    SOP instance). Our UIDs are stable per result: it holds this very object. That was retried, then failed."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

    scp = AE(ae_title="NO_OVERWRITE")
    for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
        scp.add_supported_context(sop_class)
    stored: list[str] = []

    def on_store(event):
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0111

    task = _deliver_to_scp(scp, study_files, tmp_path, delivery_max_attempts=3,
                           evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert task.state == "done" and task.attempts == 1, task.error
    assert sorted(task.sent) == sorted(stored) and stored


def test_a_c_store_status_is_classed_as_the_standard_defines_it(caplog):
    """Only 0xA900-0xCFFF was a permanent failure and only 0xB000/B006/B007 a warning: 0x0122 (SOP class not
    supported) was retried about 300 times over a day, and a stored object answered with warning 0x0116 was sent
    again and failed. Success and warnings are stored (logged); 0xA7xx, 0x0213 and 0x0210 tried again; any other
    failure permanent, its error naming the SOP class and the status's meaning. A real pynetdicom SCP."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    from gateway.delivery.senders import SendError, send_dicom
    from tests.gateway_dicom_factory import ct_dataset, to_bytes

    answer = [0]
    scp = AE(ae_title="PACS")
    scp.add_supported_context(CTImageStorage)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: answer[0])])
    try:
        [dest] = parse_destinations([{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                      "port": server.server_address[1], "objects": ["sr"], "timeout_s": 10}])
        ds = ct_dataset(np.full((16, 16), -1000, np.int16))
        item = (str(ds.SOPInstanceUID), str(ds.SOPClassUID), to_bytes(ds))
        for code, meaning in [(0x0001, "Warning"), (0x0107, "Attribute List Error"),
                              (0x0116, "Attribute Value Out of Range"), (0xB000, "Coercion of Data Elements"),
                              (0xB006, "Element Discarded"), (0xB007, "Data Set Does Not Match SOP Class")]:
            answer[0] = code
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="gateway.delivery.senders"):
                assert send_dicom(dest, [item], "CTSCREEN") == [item[0]], hex(code)
            assert [r.getMessage() for r in caplog.records if r.name == "gateway.delivery.senders"] == [
                f"{dest.where} stored a CT Image Storage object with a warning (C-STORE status 0x{code:04X}: {meaning})"]
        for code, permanent, meaning in [
                (0xA700, False, "Out of Resources"), (0xA7FF, False, "Out of Resources"),
                (0x0213, False, "Resource Limitation"), (0x0210, False, "Duplicate Invocation"),
                (0x0122, True, "SOP Class Not Supported"), (0x0124, True, "Not Authorised"),
                (0x0117, True, "Invalid Object Instance"), (0x0211, True, "Unrecognised Operation"),
                (0x0110, True, "Processing Failure"), (0xA900, True, "Data Set Does Not Match SOP Class"),
                (0xC000, True, "Cannot Understand"), (0x0500, True, "a status DICOM does not define")]:
            answer[0] = code
            with pytest.raises(SendError) as exc:
                send_dicom(dest, [item], "CTSCREEN")
            assert exc.value.permanent is permanent and exc.value.sent == [], (hex(code), str(exc.value))
            assert f"C-STORE status 0x{code:04X}" in str(exc.value) and meaning in str(exc.value), str(exc.value)
            assert "CT Image Storage" in str(exc.value)
    finally:
        server.shutdown()


def test_a_pacs_that_ends_the_association_between_two_c_stores_is_tried_again_keeping_what_it_stored(monkeypatch):
    """A PACS that aborts (or closes) the association after answering a C-STORE, as one that limits the operations
    of an association does: the next C-STORE raised pynetdicom's RuntimeError ("must be established"), which the
    deliverer took for an internal error (a traceback, the longest back-off), losing the acknowledgement of what
    the PACS had stored. Now a transient SendError that keeps it. A real pynetdicom SCP; the sender's read of the
    second object waits for the abort, so that it comes before the next C-STORE (the race a real PACS wins at times)."""
    import threading

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    from gateway.delivery.senders import SendError, send_dicom
    from tests.gateway_dicom_factory import ct_dataset, to_bytes

    aborted = threading.Event()

    def on_store(event):
        def abort() -> None:
            event.assoc.abort()
            aborted.set()
        threading.Timer(0.05, abort).start()  # after the answer has gone
        return 0x0000

    reads = [0]
    real = pydicom.dcmread

    def read(*args, **kwargs):
        reads[0] += 1
        if reads[0] == 2:
            assert aborted.wait(10)
            time.sleep(0.5)  # the A-ABORT reaches the sender's association
        return real(*args, **kwargs)

    scp = AE(ae_title="PACS")
    scp.add_supported_context(CTImageStorage)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        [dest] = parse_destinations([{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                      "port": server.server_address[1], "timeout_s": 10}])
        datasets = [ct_dataset(np.full((16, 16), -1000, np.int16)) for _ in range(3)]
        items = [(str(ds.SOPInstanceUID), str(ds.SOPClassUID), to_bytes(ds)) for ds in datasets]
        monkeypatch.setattr(pydicom, "dcmread", read)
        with pytest.raises(SendError) as exc:
            send_dicom(dest, items, "CTSCREEN")
        assert not exc.value.permanent and exc.value.sent == [items[0][0]], str(exc.value)
        assert str(exc.value) == (f"{dest.where} ended the association after 1 of 3 objects (an A-ABORT or the "
                                  "connection closed); the rest go at the next try")
    finally:
        server.shutdown()


@pytest.mark.parametrize(("status", "reasons", "done"), [
    (409, [0x0111, 0x0111], True),   # every object held already
    (202, [0x0111], True),           # one held already, the other stored
    (409, [0x0111, 0xA900], False),  # one refused for good
])
def test_stow_failures_for_objects_held_already_count_as_delivered(status, reasons, done):
    """A DICOMweb server's answer, scripted (httpx.MockTransport): no server here refuses duplicates."""
    import httpx

    from gateway.delivery.config import StowDestination
    from gateway.delivery.senders import SendError, send_stow

    uids = ["1.2.3.1", "1.2.3.2"]
    answer = {"00081198": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}
        for uid, reason in zip(uids[:len(reasons)], reasons, strict=True)]}}
    transport = httpx.MockTransport(lambda request: httpx.Response(status, json=answer))
    dest = StowDestination(name="web", kind="stowrs", url="http://pacs/dicom-web")
    items = [(uid, "1.2.840.10008.5.1.4.1.1.88.34", b"x") for uid in uids]

    async def send():
        async with httpx.AsyncClient(transport=transport) as client:
            return await send_stow(dest, items, client)

    if done:
        assert asyncio.run(send()) == uids
    else:
        with pytest.raises(SendError) as exc:
            asyncio.run(send())
        assert exc.value.permanent and exc.value.sent == ["1.2.3.1"]


def _stow_answered(status: int, answer: Any, uids: list[str], headers: dict[str, str] | None = None) -> list[str]:
    """What :func:`send_stow` makes of a DICOMweb server's ``answer`` (scripted: httpx.MockTransport; with
    ``headers``) to the STOW-RS of SRs with these ``uids``: the UIDs it counts as delivered (or its SendError)."""
    import httpx

    from gateway.delivery.config import StowDestination
    from gateway.delivery.senders import send_stow

    transport = httpx.MockTransport(lambda request: httpx.Response(status, json=answer, headers=headers))
    dest = StowDestination(name="web", kind="stowrs", url="http://pacs/dicom-web")

    async def send():
        async with httpx.AsyncClient(transport=transport) as client:
            return await send_stow(dest, [(uid, "1.2.840.10008.5.1.4.1.1.88.34", b"x") for uid in uids], client)

    return asyncio.run(send())


@pytest.mark.parametrize(("reasons", "permanent"), [
    ([0xA700, 0xA7FF], False),  # out of resources, as the reviewer's server answered (42752)
    ([0xA700, 0xC000], True),   # one of them cannot be understood: trying again cannot deliver both
    ([0x0122, 0x0122], True),
])
def test_a_stow_409_for_want_of_resources_is_tried_again_saying_its_reasons(reasons, permanent):
    """Every 409 with a failure was a 4xx, failed for good after one try, though its Failure Reason 0xA7xx (out of
    resources) is what a C-STORE 0xA7xx says, and that is tried again; the error did not say the reason. A
    DICOMweb server's answer, scripted (httpx.MockTransport): no server here runs out of resources on demand."""
    from gateway.delivery.senders import SendError

    uids = ["1.2.3.1", "1.2.3.2"]
    answer = {"00081198": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}
        for uid, reason in zip(uids, reasons, strict=True)]}}
    with pytest.raises(SendError) as exc:
        _stow_answered(409, answer, uids)
    assert exc.value.permanent is permanent and exc.value.sent == [], str(exc.value)
    assert str(exc.value).startswith("http://pacs/dicom-web answered HTTP 409 (failure reason 0x"), str(exc.value)
    assert all(f"0x{r:04X}" in str(exc.value) for r in reasons), str(exc.value)


def test_a_stow_202_with_warnings_only_is_delivered_and_logs_them(caplog):
    """A 202 that lists every object stored with a Warning Reason (0xB000, coercion) and none failed was "refused
    some of 2 object(s)", tried again and failed at last: they are stored, the warning logged. A 202 that names
    only some as stored, none failed, leaves the others to be sent again. Scripted answers (httpx.MockTransport)."""
    from gateway.delivery.senders import SendError

    uids = ["1.2.3.1", "1.2.3.2"]

    def stored(listed: list[str]) -> dict:
        return {"00081199": {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.34"]},
             "00081155": {"vr": "UI", "Value": [uid]}, "00081196": {"vr": "US", "Value": [0xB000]}} for uid in listed]}}

    with caplog.at_level(logging.WARNING, logger="gateway.delivery.senders"):
        assert _stow_answered(202, stored(uids), uids) == uids
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.delivery.senders"] == [
        "http://pacs/dicom-web stored the objects with a warning (warning reason 0xB000 Coercion of Data Elements)"]
    with pytest.raises(SendError, match="naming 1 of 2 objects stored") as exc:
        _stow_answered(202, stored(uids[:1]), uids)
    assert exc.value.sent == uids[:1] and not exc.value.permanent
    with pytest.raises(SendError) as exc:  # an answer that says nothing: nothing counts as delivered
        _stow_answered(202, {}, uids)
    assert exc.value.sent == []


@pytest.mark.parametrize(("status", "answer", "done"), [
    (200, [{"00081199": {"vr": "SQ"}}], True),  # the data set as a one-item array (the DICOM JSON model's list)
    (200, "OK", True),                         # JSON, but no data set
    (200, {"00081198": None, "00081199": {"vr": "SQ", "Value": None}}, True),
    (202, {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": []},
                                               "00081197": {"vr": "US", "Value": [0xC000]}}]},
           "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.1"]}}]}}, False),
])
def test_a_stow_answer_that_is_no_store_instances_response_is_read_by_its_status(status, answer, done):
    """A STOW-RS answer whose body is not the Store Instances Response data set the sender read (an array of it, a
    bare JSON value, a sequence whose Value is null or an empty UID) raised AttributeError or IndexError: an
    "internal error", every object sent again at the longest back-off for a day, though a 200 says all were stored.
    Now a 200 is delivered whatever its body, and a 202's failure naming no instance leaves unacknowledged what the
    answer does not name. Scripted answers (httpx.MockTransport): no DICOMweb server here answers so."""
    from gateway.delivery.senders import SendError

    uids = ["1.2.3.1", "1.2.3.2"]
    if done:
        assert _stow_answered(status, answer, uids) == uids
    else:
        with pytest.raises(SendError) as exc:
            _stow_answered(status, answer, uids)
        assert not exc.value.permanent and exc.value.sent == uids[:1], str(exc.value)
        assert "failure reason 0xC000 Cannot Understand" in str(exc.value)


def test_a_stow_failure_that_names_no_instance_leaves_unacknowledged_what_the_answer_does_not_name():
    """A failure item without its SOP Instance UID (a part the server could not parse) marked every object
    acknowledged, the failed one never sent again. Scripted answer (httpx.MockTransport)."""
    import httpx

    from gateway.delivery.config import StowDestination
    from gateway.delivery.senders import SendError, send_stow

    uids = ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    answer = {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [0xC000]}}]},
              "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in uids[:2]]}}
    transport = httpx.MockTransport(lambda request: httpx.Response(202, json=answer))
    dest = StowDestination(name="web", kind="stowrs", url="http://pacs/dicom-web")

    async def send():
        async with httpx.AsyncClient(transport=transport) as client:
            return await send_stow(dest, [(uid, "1.2.840.10008.5.1.4.1.1.88.34", b"x") for uid in uids], client)

    with pytest.raises(SendError) as exc:
        asyncio.run(send())
    assert not exc.value.permanent and exc.value.sent == uids[:2]


def _fhir_refusal(answer: Any) -> Any:
    """The SendError of one bundle sent to a FHIR destination that answers ``answer`` (an ``httpx.Response``, or a
    function of the request that returns or raises)."""
    import httpx

    from gateway.delivery.config import FhirDestination
    from gateway.delivery.senders import SendError, send_fhir

    dest = FhirDestination(name="ris", kind="fhir", url="http://ris/fhir")

    async def send():
        respond = answer if callable(answer) else lambda request: answer
        async with httpx.AsyncClient(transport=httpx.MockTransport(respond)) as client:
            return await send_fhir(dest, [("job", "", b"{}")], client)

    with pytest.raises(SendError) as exc:
        asyncio.run(send())
    return exc


@pytest.mark.parametrize(("status", "permanent"), [(301, True), (308, True), (302, False), (307, False)])
def test_a_redirect_is_said_and_a_permanent_one_fails_at_once(status, permanent):
    """A STOW-RS or FHIR URL the server redirects (http to https, a moved base) answered 'HTTP 301' alone and was sent
    again for a day of back-off (300 tries): redirects are not followed. A permanent one (301, 308) now fails at once,
    saying to set the url; a temporary one is tried again, saying so; neither quotes the Location (a URL may carry a
    token). Scripted answers (httpx.MockTransport)."""
    import httpx

    from gateway.delivery.senders import SendError

    location = {"Location": "https://ris/fhir?token=s3cret"}
    with pytest.raises(SendError) as stow:
        _stow_answered(status, None, ["1.2.3.1"], headers=location)
    for exc in (stow.value, _fhir_refusal(httpx.Response(status, headers=location)).value):
        assert exc.permanent is permanent and exc.sent == [], str(exc)
        assert f"answered HTTP {status} (a redirect, which is not followed: set the destination's url to where it " \
               "points" in str(exc) and "s3cret" not in str(exc)


def test_a_fhir_refusal_says_its_issue_codes_and_never_their_diagnostics():
    """A RIS's 4xx came back as "answered HTTP 422" alone: the operator could not tell a missing Patient from a
    malformed bundle. Its OperationOutcome's codes are kept; its diagnostics, which quote the identifier it
    could not resolve, are not. Scripted answer (httpx.MockTransport)."""
    import httpx

    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "not-found", "diagnostics": "No Patient matches identifier urn:oid:2.999.1|P-12345",
         "expression": ["Bundle.entry[0].resource.subject"]}]}
    exc = _fhir_refusal(httpx.Response(422, json=outcome))
    assert str(exc.value).startswith("http://ris/fhir answered HTTP 422 (OperationOutcome: error not-found)")
    assert "P-12345" not in str(exc.value)
    broken = _fhir_refusal(httpx.Response(400, json={"resourceType": "OperationOutcome", "issue": None}))
    assert str(broken.value) == "http://ris/fhir answered HTTP 400" and broken.value.permanent  # was a TypeError


@pytest.mark.parametrize(("status", "outcome", "permanent"), [
    (404, {"severity": "error", "code": "processing"}, False),  # HAPI-1091: a conditional reference matches nothing
    (422, {"severity": "error", "code": "not-found"}, False),
    (412, None, False),  # a conditional match the server could not make (yet)
    (404, None, True),  # no FHIR answer: a wrong URL
    (400, {"severity": "error", "code": "structure"}, True),  # a bundle it cannot take: trying again cannot help
    (403, {"severity": "error", "code": "forbidden"}, True),
])
def test_a_ris_that_does_not_know_the_patient_or_order_yet_is_tried_again(status, outcome, permanent):
    """Images often reach screening before the RIS holds the order or the patient's registration; a RIS that
    could not resolve the report's conditional references failed the delivery at once, for an operator to send
    again by hand. It is tried again with the other failures' back-off; a refusal of the bundle itself stays
    permanent. Scripted answers (httpx.MockTransport); the delivery through a RIS that learns the patient later
    is the test below."""
    import httpx

    body = {"resourceType": "OperationOutcome", "issue": [outcome]} if outcome else None
    exc = _fhir_refusal(httpx.Response(status, json=body) if body else httpx.Response(status, text="no"))
    assert exc.value.permanent is permanent, str(exc.value)
    assert str(exc.value).startswith(f"http://ris/fhir answered HTTP {status}")
    assert ("may not know the patient or the order yet" in str(exc.value)) is not permanent


def test_a_report_for_a_patient_the_ris_registers_later_is_delivered_once_it_does(study_files, tmp_path):
    """The RIS resolves the report's conditional patient reference (a FHIR receiver of ours that answers 404
    not-found, as HAPI FHIR does, until it knows the patient): the delivery waits in back-off, then lands."""
    async def scenario():
        settings = delivery_settings(tmp_path)
        store, blobs, result = await done_job(settings, study_files)
        ris = FhirReceiver(patients=set())
        deliverer = Deliverer(store, blobs, parse_destinations([{"name": "ris", "kind": "fhir", "url": ris.url,
                                                                 "patient_id_system": "urn:oid:1.2.3"}]),
                              settings, CollectorRegistry())
        try:
            (task,) = await until_states(deliverer, result.job_id, {"pending"}, at_least_attempts=2)
            assert "404 (OperationOutcome: error processing)" in (task.error or "") and not ris.bundles
            assert ris.unresolved and ris.unresolved[0].startswith("urn:oid:1.2.3|")
            ris.patients.update(ris.unresolved)  # the registration arrives
            (task,) = await until_states(deliverer, result.job_id, {"done", "failed"})
            assert task.state == "done", task.error
            assert [r["subject"]["reference"] for r in ris.of_type("DiagnosticReport")] == [
                f"Patient?identifier={ris.unresolved[0]}"]
        finally:
            await deliverer.stop()
            ris.close()
            await store.close()

    asyncio.run(scenario())


def _key_object(title: tuple[str, str, str]) -> tuple[str, str, bytes]:
    """A Key Object Selection document with ``title`` as an item to send: (uid, SOP class, Part 10 bytes)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, KeyObjectSelectionDocumentStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = KeyObjectSelectionDocumentStorage, generate_uid()
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "KO", generate_uid(), generate_uid()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = title
    ds.ConceptNameCodeSequence = [code]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return str(ds.SOPInstanceUID), str(ds.SOPClassUID), out.getvalue()


def test_dcm4chee_s_already_received_answer_means_held_for_a_rejection_note_only():
    """dcm4chee-arc answers a Rejection Note it holds already with 0xA770 ("Rejection Note [uid=...] already
    received", its StoreService.DUPLICATE_REJECTION_NOTE): a forced re-send, or a retry after a lost answer, of
    our note (its UID derives from its content). Not dcm4chee here: a real pynetdicom C-STORE SCP answers as it
    does. For the note that is delivered; for any other object 0xA7xx keeps DICOM's "out of resources" (retried)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import KeyObjectSelectionDocumentStorage

    from aggregator.keyimages import OF_INTEREST, REJECTED_FOR_QUALITY
    from gateway.delivery.config import DicomDestination
    from gateway.delivery.senders import DUPLICATE_REJECTION_NOTE, SendError, send_dicom

    scp = AE(ae_title="DCM4CHEE")
    scp.add_supported_context(KeyObjectSelectionDocumentStorage)
    server = scp.start_server(("127.0.0.1", 0), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: DUPLICATE_REJECTION_NOTE)])
    try:
        dest = DicomDestination(name="arc", kind="dicom", host="127.0.0.1", port=server.server_address[1],
                                ae_title="DCM4CHEE", objects=["sr", "kos", "rejection"], timeout_s=10)
        note, kos = _key_object(REJECTED_FOR_QUALITY), _key_object(OF_INTEREST)
        assert send_dicom(dest, [note], "CTSCREEN", notes={note[0]}) == [note[0]]
        with pytest.raises(SendError, match="out of resources") as exc:
            send_dicom(dest, [note, kos], "CTSCREEN", notes={note[0]})
        assert exc.value.sent == [note[0]] and not exc.value.permanent
    finally:
        server.shutdown()


@pytest.mark.parametrize(("reasons", "done"), [
    ([0xA770, 0xA770], False),  # the note held already; the KOS refused (out of resources)
    ([0xA770], True),           # the note held already, the KOS stored
])
def test_stow_already_received_answer_means_held_for_a_rejection_note_only(reasons, done):
    """dcm4chee-arc's STOW-RS answer for a Rejection Note it holds already (failure reason 0xA770), scripted
    (httpx.MockTransport): no DICOMweb server here implements IOCM."""
    import httpx

    from aggregator.keyimages import OF_INTEREST, REJECTED_FOR_QUALITY
    from gateway.delivery.config import StowDestination
    from gateway.delivery.senders import SendError, send_stow

    items = [_key_object(REJECTED_FOR_QUALITY), _key_object(OF_INTEREST)]
    answer = {"00081198": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}
        for (uid, _, _), reason in zip(items, reasons, strict=False)]}}
    transport = httpx.MockTransport(lambda request: httpx.Response(202, json=answer))
    dest = StowDestination(name="web", kind="stowrs", url="http://pacs/dicom-web")

    async def send():
        async with httpx.AsyncClient(transport=transport) as client:
            return await send_stow(dest, items, client, notes={items[0][0]})

    if done:
        assert asyncio.run(send()) == [uid for uid, _, _ in items]
    else:
        with pytest.raises(SendError) as exc:
            asyncio.run(send())
        assert exc.value.sent == [items[0][0]]


@pytest.mark.parametrize(("case", "says"), [
    ("busy", "for now (transient): local limit exceeded, said the DICOM UL service-provider (presentation)"),
    ("calling", "for good (permanent): calling AE title CTSCREEN not recognised, said the DICOM UL service-user"),
    ("called", "for good (permanent): called AE title NOT_PACS not recognised, said the DICOM UL service-user"),
], ids=["at_its_association_limit", "refusing_our_ae_title", "not_its_ae_title"])
def test_a_pacs_that_rejects_an_association_for_now_is_tried_again(case, says):
    """A-ASSOCIATE-RJ result 2 (transient: a PACS at its association limit, busy with a modality) failed the delivery
    for good after one attempt, for an operator to resend by hand; result 1 (permanent: our AE title, or the one we
    call, not known there) stays permanent. The error said "association rejected by PACS@host:port" alone; it says
    the result, the reason and its source in words (PS3.8 9.3.4), and the AE title concerned. A real pynetdicom SCP."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, Verification

    from gateway.delivery.senders import SendError, send_dicom
    from tests.gateway_dicom_factory import ct_dataset, to_bytes

    busy = case == "busy"
    scp = AE(ae_title="PACS")
    scp.maximum_associations = 1
    scp.add_supported_context(CTImageStorage)
    scp.add_supported_context(Verification)
    scp.require_calling_aet = {"busy": ["MODALITY"], "calling": ["SOMEONE"], "called": ["CTSCREEN"]}[case]
    scp.require_called_aet = True
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)])
    held = None
    try:
        port = server.server_address[1]
        if busy:  # a modality holds the PACS's only association
            other = AE(ae_title="MODALITY")
            other.add_requested_context(Verification)
            held = other.associate("127.0.0.1", port, ae_title="PACS")
            assert held.is_established
        [dest] = parse_destinations([{"name": "pacs", "kind": "dicom", "ae_title": "NOT_PACS" if case == "called" else
                                      "PACS", "host": "127.0.0.1", "port": port, "objects": ["sr"]}])
        ds = ct_dataset(np.full((16, 16), -1000, np.int16))
        with pytest.raises(SendError) as info:
            send_dicom(dest, [(str(ds.SOPInstanceUID), str(ds.SOPClassUID), to_bytes(ds))], "MODALITY" if busy else "CTSCREEN")
        assert info.value.permanent is (not busy), str(info.value)
        assert str(info.value) == f"association rejected by {dest.where} {says}"
    finally:
        if held is not None:
            held.release()
        server.shutdown()


def test_a_tls_handshake_that_fails_says_so(pki):  # noqa: F811 - the fixture imported above
    """A PACS whose certificate did not verify (another CA, or not issued to the name checked) failed as "no
    association with PACS@host:port (refused, aborted or timed out)", nothing said of TLS: the error says the
    handshake failed and OpenSSL's reason. Tried again as before (a certificate can be renewed). A real pynetdicom
    SCP on TLS; the certificates of tests/test_gateway_dicom_security.py (the server's is for 127.0.0.1)."""
    import ssl

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    from gateway.delivery.senders import SendError, send_dicom
    from tests.gateway_dicom_factory import ct_dataset, to_bytes

    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki / "server.crt", pki / "server.key")
    scp = AE(ae_title="PACS")
    scp.add_supported_context(CTImageStorage)
    server = scp.start_server(("127.0.0.1", 0), block=False, ssl_context=server_tls,
                              evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)])
    try:
        def send(**tls) -> list[str]:
            [dest] = parse_destinations([{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                          "port": server.server_address[1], "objects": ["sr"], "timeout_s": 10,
                                          "tls": tls}])
            ds = ct_dataset(np.full((16, 16), -1000, np.int16))
            return send_dicom(dest, [(str(ds.SOPInstanceUID), str(ds.SOPClassUID), to_bytes(ds))], "CTSCREEN")

        assert len(send(ca_file=str(pki / "ca.crt"))) == 1
        for tls, says in [({"ca_file": str(pki / "ca.crt"), "server_hostname": "pacs.example.org"}, "Hostname mismatch"),
                          ({"ca_file": str(pki / "rogue.crt")}, "local issuer certificate")]:
            with pytest.raises(SendError) as exc:
                send(**tls)
            assert str(exc.value).startswith("TLS handshake with PACS@127.0.0.1:"), str(exc.value)
            assert "certificate verify failed" in str(exc.value) and says in str(exc.value), str(exc.value)
            assert not exc.value.permanent
    finally:
        server.shutdown()


def _counting_scp(ae_title: str, delay_s: float = 0.0):
    """A pynetdicom C-STORE SCP that takes the SR and key images, counting every instance it receives (and
    answering each after ``delay_s``: a slow PACS)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

    scp = AE(ae_title=ae_title)
    for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
        scp.add_supported_context(sop_class)
    received: list[str] = []

    def on_store(event):
        received.append(str(event.request.AffectedSOPInstanceUID))
        time.sleep(delay_s)
        return 0x0000

    return scp, received, [(evt.EVT_C_STORE, on_store)]


def test_an_acknowledgement_the_store_could_not_record_at_once_is_recorded_not_sent_again(study_files, tmp_path,
                                                                                          monkeypatch):
    """A database outage as the PACS acknowledged: mark_sent raised, the catch-all retried the task, and the
    next attempt (another replica's, once the lease lapsed, in a review's run on PostgreSQL) sent every object
    again. The deliverer now records what was acknowledged once the store answers. The outage is simulated
    (the store refuses the first two writes of the acknowledgement: a real outage is the review's PostgreSQL
    run, which needs a restart mid-send); the PACS is a real pynetdicom SCP."""
    from gateway.store.store import StoreUnreachable

    real, refusals = Deliveries.mark_sent, [2]

    async def away_then_back(self, task_id, uids):
        if refusals[0]:
            refusals[0] -= 1
            raise StoreUnreachable("The state store cannot be reached (ConnectionRefusedError).")
        return await real(self, task_id, uids)

    monkeypatch.setattr(Deliveries, "mark_sent", away_then_back)
    scp, received, handlers = _counting_scp("COUNTING")
    task = _deliver_to_scp(scp, study_files, tmp_path, evt_handlers=handlers)
    assert (task.state, task.attempts) == ("done", 1), task
    assert received and len(received) == len(set(received)), "an object sent twice"
    assert sorted(task.sent) == sorted(received) and refusals == [0]


def test_a_replica_stopping_lets_a_send_under_way_finish_within_the_grace(study_files, tmp_path):
    """A rolling restart cut off a send to a slow PACS that had the objects already; another replica sent them
    all again. Stopping now gives sends under way the shut-down grace first (CTSCREEN_SHUTDOWN_GRACE_S)."""
    scp, received, handlers = _counting_scp("SLOW", delay_s=0.3)

    async def stop_mid_send(deliverer, job_id):
        deadline = time.monotonic() + 60
        while not received and time.monotonic() < deadline:  # the PACS is receiving
            await deliverer.poll()
            await asyncio.sleep(0.05)
        assert received, "the delivery never started"
        await deliverer.stop(grace_s=30)  # the replica shuts down mid-send
        return await deliverer.tasks.of_job(job_id)

    task = _deliver_to_scp(scp, study_files, tmp_path, evt_handlers=handlers, drive=stop_mid_send)
    assert (task.state, task.attempts) == ("done", 1), task
    assert len(received) > 1 and len(received) == len(set(received)) and sorted(task.sent) == sorted(received)


def test_a_study_screened_again_while_its_earlier_reading_is_being_sent_retracts_it(study_files, tmp_path):
    """Version 2 was screened while version 1 was still being sent to a slow PACS: version 2's payload was built at
    once, before the PACS had acknowledged anything of version 1, so it carried no Rejection Note, and version 1's
    positive SR and key images then stood live in the PACS beside it. Version 2's delivery now waits for version
    1's to end: its note retracts all of version 1's objects, and reaches the PACS after them. A real pynetdicom
    SCP that answers each C-STORE after 0.3 s."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        Comprehensive3DSRStorage,
        KeyObjectSelectionDocumentStorage,
        SecondaryCaptureImageStorage,
    )

    scp = AE(ae_title="SLOW")
    for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage, KeyObjectSelectionDocumentStorage):
        scp.add_supported_context(sop_class)
    received: list[str] = []

    def on_store(event):
        received.append(str(event.request.AffectedSOPInstanceUID))
        time.sleep(0.3)
        return 0x0000

    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    async def scenario():
        settings = delivery_settings(tmp_path, delivery_concurrency=2)
        store, blobs, first = await done_job(settings, study_files)
        dest = {"name": "pacs", "kind": "dicom", "ae_title": "SLOW", "host": "127.0.0.1",
                "port": server.server_address[1], "objects": ["sr", "key_images", "rejection"]}
        deliverer = Deliverer(store, blobs, parse_destinations([dest]), settings, CollectorRegistry())
        try:
            deadline = time.monotonic() + 60
            while not received and time.monotonic() < deadline:  # version 1 is being sent
                await deliverer.poll()
                await asyncio.sleep(0.05)
            _, _, second = await done_job(settings, study_files, stores=(store, blobs), positive=False)
            (later,) = await until_states(deliverer, second.job_id, {"done", "failed", "skipped"})
            (earlier,) = await deliverer.tasks.of_job(first.job_id)
            note = next((o for o in later.payload["objects"] if o["kind"] == "rejection"), None)
            return earlier, later, note and pydicom.dcmread(io.BytesIO(blobs.get(note["blob_key"])))
        finally:
            await deliverer.stop()
            await store.close()

    try:
        earlier, later, note = asyncio.run(scenario())
    finally:
        server.shutdown()
    assert (earlier.state, later.state) == ("done", "done"), (earlier, later)
    assert note is not None, "version 2 went without a Rejection Note"
    retracted = {str(ref.ReferencedSOPInstanceUID) for study in note.CurrentRequestedProcedureEvidenceSequence
                 for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert retracted == set(earlier.sent) and len(retracted) > 1  # the SR and the key images
    assert received.index(str(note.SOPInstanceUID)) > max(received.index(uid) for uid in earlier.sent)


def test_reports_go_to_a_fhir_server_one_at_a_time(tmp_path):
    """Two bundles with the same conditional creates (the Device's ``ifNoneExist``) in flight at once made two
    Devices at HAPI FHIR (hapifhir/hapi-fhir#3141), and every later conditional create then failed 412. Three
    studies screened, delivered with two slots a destination by two replicas (two deliverers with stores of
    their own on one database) to a FHIR server of ours that takes 0.3 s a transaction: never two at once."""
    studies = [write_study(tmp_path / "studies", f"serial{i}") for i in range(3)]

    async def scenario():
        settings = delivery_settings(tmp_path, delivery_concurrency=2)
        store, blobs, first = await done_job(settings, studies[0])
        jobs = [first] + [(await done_job(settings, files, stores=(store, blobs)))[2] for files in studies[1:]]
        ris = FhirReceiver(delay_s=0.3)
        other = Store(settings.database(), owner="another-replica")
        replicas = [Deliverer(s, blobs, parse_destinations([{"name": "ris", "kind": "fhir", "url": ris.url}]), settings,
                              CollectorRegistry()) for s in (store, other)]
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                for replica in replicas:
                    await replica.poll()
                await asyncio.sleep(0.05)
                tasks = [t for j in jobs for t in await replicas[0].tasks.of_job(j.job_id)]
                if len(tasks) == 3 and all(t.state == "done" for t in tasks):
                    break
            return tasks, ris.most_in_flight, len(ris.of_type("Device")), ris.errors
        finally:
            for replica in replicas:
                await replica.stop()
            ris.close()
            await other.close()
            await store.close()

    tasks, most, devices, errors = asyncio.run(scenario())
    assert [t.state for t in tasks] == ["done"] * 3 and not errors
    assert most == 1, f"{most} transactions at once"
    assert devices == 1


def test_a_fhir_server_holding_duplicates_fails_the_delivery_for_good_saying_so():
    """Two Devices with one identifier at HAPI FHIR (made by two conditional creates at once) fail every later
    conditional create of it with 412; that was tried for a day as "the RIS may not know the patient". It is
    permanent, says what is wrong, and never quotes the diagnostics (they name the identifier). HAPI FHIR's
    answers, scripted (httpx.MockTransport)."""
    import httpx

    for diagnostics in ('HAPI-0958: Failed to CREATE resource with match URL "Device?identifier=urn:ctscreen:device|'
                        'ctscreen/1.0/abc" because this search matched 2 resources',
                        'HAPI-2207: Invalid match URL "Patient?identifier=urn:oid:1.2|P-12345" - Multiple resources '
                        'match this search'):
        outcome = {"resourceType": "OperationOutcome",
                   "issue": [{"severity": "error", "code": "processing", "diagnostics": diagnostics}]}
        exc = _fhir_refusal(httpx.Response(412, json=outcome))
        assert exc.value.permanent, str(exc.value)
        assert "more than one resource matches" in str(exc.value) and "may not know" not in str(exc.value)
        assert "P-12345" not in str(exc.value) and "abc" not in str(exc.value)


@pytest.mark.parametrize(("answer", "permanent", "says"), [
    ((409, {}), False, "a version conflict: tried again"),
    ((401, {}), False, "token may have expired"),
    ((503, {"Retry-After": "7"}), False, "asks to wait 7 s"),
    ((429, {"Retry-After": "7"}), False, "asks to wait 7 s"),
    ((503, {"Retry-After": "²".encode()}), False, "503"),  # a digit to str.isdigit: float() raised, a traceback
    ("timeout", False, "timed out waiting for the answer of http://ris/fhir (the server may have stored it)"),
])
def test_a_fhir_servers_answer_is_classed_as_it_means(answer, permanent, says):
    """A 409 (a version conflict) and a 401 (an expired token) failed the delivery for good; a read timeout said
    "cannot reach" of a server that may have stored the bundle; a Retry-After was not read. Scripted answers
    (httpx.MockTransport); the waits they make are the test below."""
    import httpx

    def respond(request):
        if answer == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        status, headers = answer
        return httpx.Response(status, headers=headers, json={"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "conflict" if status == 409 else "security"}]})

    exc = _fhir_refusal(respond)
    assert exc.value.permanent is permanent and says in str(exc.value), str(exc.value)
    assert exc.value.wait_s == (7.0 if says.startswith("asks") else None)
    assert exc.value.longest is (answer != "timeout" and answer[0] == 401)


@pytest.mark.parametrize(("status", "headers", "wait"), [
    (503, {"Retry-After": "3"}, 3.0),  # more than the back-off (0.2 s): waited
    (429, {"Retry-After": "3600"}, 5.0),  # more than the longest back-off: that
    (401, {}, 5.0),  # an expired token: the longest back-off
])
def test_a_destination_that_asks_to_wait_is_given_the_time(study_files, tmp_path, status, headers, wait):
    """A RIS answering 503 with Retry-After was tried again after the back-off's 0.2 s (and 0.4, 0.8, ...), each a
    try counted against the attempts; a 401 failed for good. A FHIR server of ours that answers so first."""
    async def scenario():
        settings = delivery_settings(tmp_path, delivery_backoff_max_s=5.0)
        store, blobs, result = await done_job(settings, study_files)
        ris = FhirReceiver()
        ris.answers.append((status, headers, None))
        deliverer = Deliverer(store, blobs, parse_destinations([{"name": "ris", "kind": "fhir", "url": ris.url}]),
                              settings, CollectorRegistry())
        try:
            return await until_states(deliverer, result.job_id, {"pending"}, at_least_attempts=1)
        finally:
            await deliverer.stop()
            ris.close()
            await store.close()

    (task,) = asyncio.run(scenario())
    assert task.next_attempt_at - task.updated_at == pytest.approx(wait, abs=0.01), task
    assert f"answered HTTP {status}" in task.error


def test_a_forced_resend_that_fails_shows_no_delivery_time(study_files, tmp_path):
    """Delivered, sent again by force to a PACS gone meanwhile, failed: the API still showed the first delivery's
    time as its ``delivered_at`` beside state failed. A real pynetdicom SCP, stopped before the re-send."""
    from gateway.api.deliveries import delivery_view

    scp, received, handlers = _counting_scp("GONE")
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    port, stopped = server.server_address[1], []

    async def scenario():
        settings = delivery_settings(tmp_path, delivery_max_attempts=1)
        store, blobs, result = await done_job(settings, study_files)
        dest = {"name": "pacs", "kind": "dicom", "ae_title": "GONE", "host": "127.0.0.1", "port": port, "timeout_s": 5}
        deliverer = Deliverer(store, blobs, parse_destinations([dest]), settings, CollectorRegistry())
        try:
            (done,) = await until_states(deliverer, result.job_id, {"done", "failed"})
            assert done.state == "done" and done.delivered_at is not None, done
            server.shutdown()
            stopped.append(True)
            await deliverer.tasks.resend(result.job_id, "pacs", "dicom", force=True)
            (failed,) = await until_states(deliverer, result.job_id, {"failed"})
            return delivery_view(failed)
        finally:
            await deliverer.stop()
            await store.close()

    try:
        view = asyncio.run(scenario())
    finally:
        if not stopped:
            server.shutdown()
    assert view.state == "failed" and view.delivered_at is None, view
    assert [e["state"] for e in view.history].count("done") == 1  # the earlier delivery stays in its history


def test_a_fhir_payload_dates_the_reading_by_the_study_in_its_time_zone():
    """The FHIR payload built for a delivery carries the study's date, time and Timezone Offset From UTC (kept with
    the result in its SR headers) as the report's ``effectiveDateTime``."""
    from gateway.delivery.payloads import build_fhir
    from tests.test_aggregator_results_out import results_series

    result, sources = results_series()
    for ds in sources:
        ds.StudyDate, ds.StudyTime, ds.TimezoneOffsetFromUTC = "20261205", "093015", "+0100"
    context = sr_context(sources)
    assert context is not None
    kept: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        kept[str(len(kept))] = data
        return str(len(kept) - 1)

    (made,) = build_fhir(result, context.to_json(), put)
    report = json.loads(kept[made["blob_key"]])["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport" and report["effectiveDateTime"] == "2026-12-05T09:30:15+01:00"
