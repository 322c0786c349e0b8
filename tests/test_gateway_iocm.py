"""The IHE IOCM Rejection Note (``objects: [..., rejection]``), delivered to real Orthanc servers.

A study screened again (version 2 after version 1, :func:`tests.test_gateway_delivery.done_job`) sends a
destination that asks for ``rejection`` a Key Object Selection titled (113001, DCM, "Rejected for Quality
Reasons") naming exactly the objects that destination acknowledged for version 1. Orthanc does not act on IOCM
notes: it stores the note like any KOS and keeps showing the instances it names, so these tests read what
Orthanc holds (the note's title, content and Current Requested Procedure Evidence Sequence against the
version-1 objects it stores), not whether an archive hid them.
"""

from __future__ import annotations

import asyncio
import io
import socket
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client import CollectorRegistry

from aggregator.keyimages import REJECTED_FOR_QUALITY, REJECTION_SERIES_NUMBER
from gateway.delivery import DestinationsError, parse_destinations
from gateway.delivery.deliverer import Deliverer
from tests.orthanc import OrthancServer, dicomweb_plugin, orthanc_bin
from tests.test_aggregator_results_out import dcmtk_clean
from tests.test_gateway_delivery import (
    delivery_settings,
    done_job,
    pacs_destination,
    until_states,
    write_study,
)

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(orthanc_bin() is None or dicomweb_plugin() is None,
                                 reason="Orthanc + DICOMweb plugin not installed: scripts/setup.sh --test")]
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture(scope="module")
def pacs_pair():
    """Two Orthanc servers: one whose destination asks for the rejection note, one whose does not."""
    servers = [OrthancServer("ORTHANC"), OrthancServer("ORTHANC2")]
    try:
        yield servers
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def study_files(tmp_path, request) -> list[Path]:
    return write_study(tmp_path / "study", request.node.name[-40:])


TID_2010_UNCHECKED = "W: Check for template constraints not yet supported"
"""What dsrdump (dcmtk 3.6.7) says of every KOS: it knows TID 2010 but does not check it (the "Of Interest"
KOS gets it too); any other line on stderr fails."""


def _held(orthanc: OrthancServer, study_uid: str) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID -> header of every instance Orthanc holds of the study (as stored, downloaded)."""
    out = {}
    for inst in orthanc.instances_of_study(study_uid):
        ds = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{inst['ID']}/file")), stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def _notes(held: dict[str, pydicom.Dataset]) -> dict[str, pydicom.Dataset]:
    return {uid: ds for uid, ds in held.items() if ds.SOPClassUID == KOS_CLASS
            and ds.ConceptNameCodeSequence[0].CodeValue == REJECTED_FOR_QUALITY[0]}


def _evidence(note: pydicom.Dataset) -> set[tuple[str, str, str, str]]:
    """(study, series, SOP class, instance) of each instance in the Current Requested Procedure Evidence Sequence."""
    return {(str(study.StudyInstanceUID), str(series.SeriesInstanceUID), str(ref.ReferencedSOPClassUID),
             str(ref.ReferencedSOPInstanceUID))
            for study in note.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}


def _content_refs(note: pydicom.Dataset) -> set[str]:
    return {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for item in note.ContentSequence
            if item.ValueType in ("IMAGE", "COMPOSITE")}


def _four_uids(held: dict[str, pydicom.Dataset], uids: set[str]) -> set[tuple[str, str, str, str]]:
    return {(str(held[u].StudyInstanceUID), str(held[u].SeriesInstanceUID), str(held[u].SOPClassUID), u) for u in uids}


def _uids(task: Any, kind: str | None = None) -> set[str]:
    return {o["uid"] for o in task.payload["objects"] if kind is None or o["kind"] == kind}


def test_a_rescreen_retracts_exactly_what_that_pacs_was_sent_and_only_where_asked(pacs_pair, study_files, tmp_path):
    """Version 2 at a PACS with ``rejection``: after its own SR, key images and KOS, a note titled DCM 113001
    (series 9904) whose content and evidence name version 1's SR, key images and KOS there, by study, series,
    SOP class and instance, and nothing else (no screened CT slice, not version 2's objects). A PACS without
    ``rejection`` gets none. Sent again (forced, and rebuilt from the store after its blobs went): the same
    note, one instance in Orthanc. dcmtk parses it cleanly."""
    iocm_pacs, plain_pacs = pacs_pair

    async def scenario():
        settings = delivery_settings(tmp_path)
        store, blobs, first = await done_job(settings, study_files)
        objects = ["sr", "key_images", "kos"]
        destinations = parse_destinations([
            {**pacs_destination(iocm_pacs, objects=[*objects, "rejection"]), "name": "iocm"},
            {**pacs_destination(plain_pacs, objects=objects), "name": "plain"}])
        deliverer = Deliverer(store, blobs, destinations, settings, CollectorRegistry())
        study = first.study_instance_uid
        try:
            v1 = {t.destination: t for t in await until_states(deliverer, first.job_id, {"done"})}
            assert [o["kind"] for o in v1["iocm"].payload["objects"]][-1] == "kos"  # nothing to retract yet
            _, _, second = await done_job(settings, study_files, stores=(store, blobs))
            v2 = {t.destination: t for t in await until_states(deliverer, second.job_id, {"done"})}
            kinds = [o["kind"] for o in v2["iocm"].payload["objects"]]
            assert kinds == ["sr", *["key_image"] * len(second.evidence.slices), "kos", "rejection"]
            note_uid = v2["iocm"].payload["objects"][-1]["uid"]
            assert set(v2["iocm"].sent) == _uids(v2["iocm"])

            held = _held(iocm_pacs, study)
            (uid, note), = _notes(held).items()
            assert uid == note_uid
            first_objects = _uids(v1["iocm"])
            assert len(first_objects) == 1 + len(first.evidence.slices) + 1 and first_objects <= held.keys()
            assert _evidence(note) == _four_uids(held, first_objects)  # each by its series, as Orthanc holds it
            assert _content_refs(note) == first_objects
            sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in study_files}
            assert not _content_refs(note) & (sources | _uids(v2["iocm"]))
            assert (note.ConceptNameCodeSequence[0].CodeValue, note.ConceptNameCodeSequence[0].CodingSchemeDesignator,
                    note.ConceptNameCodeSequence[0].CodeMeaning) == REJECTED_FOR_QUALITY
            assert int(note.SeriesNumber) == REJECTION_SERIES_NUMBER
            assert (note.PatientID, note.StudyInstanceUID) == (held[next(iter(first_objects))].PatientID, study)

            assert not _notes(_held(plain_pacs, study))  # no rejection asked: none sent
            assert "rejection" not in [o["kind"] for o in v2["plain"].payload["objects"]]

            await deliverer.tasks.resend(second.job_id, "iocm", "dicom", force=True)  # the same payload again
            (again,) = [t for t in await until_states(deliverer, second.job_id, {"done"}) if t.destination == "iocm"]
            assert again.payload["objects"][-1]["uid"] == note_uid
            for o in again.payload["objects"]:  # gone from the store: built again from the readings
                blobs.delete(o["blob_key"])
            await deliverer.tasks.resend(second.job_id, "iocm", "dicom", force=True)
            (rebuilt,) = [t for t in await until_states(deliverer, second.job_id, {"done"}) if t.destination == "iocm"]
            assert rebuilt.payload["objects"][-1]["uid"] == note_uid
            assert rebuilt.payload["objects"][-1]["blob_key"] != again.payload["objects"][-1]["blob_key"]
            assert list(_notes(_held(iocm_pacs, study))) == [note_uid]  # one note, never a second

            (inst,) = [i for i in iocm_pacs.instances_of_study(study)
                       if i["MainDicomTags"]["SOPInstanceUID"] == note_uid]
            data = iocm_pacs.get(f"/instances/{inst['ID']}/file")
            dump = dcmtk_clean("dsrdump", data, tmp_path, allowed={TID_2010_UNCHECKED})
            assert 'CONTAINER:(,,"Rejected for Quality Reasons")' in dump
            dcmtk_clean("dcmdump", data, tmp_path, "+E")
        finally:
            await deliverer.stop()
            await store.close()

    asyncio.run(scenario())


def test_a_pacs_that_never_acknowledged_the_earlier_reading_gets_no_note(pacs_pair, study_files, tmp_path):
    """Version 1 never reached the PACS (its delivery failed: association rejected) though its payload was
    built; version 2, once the destination is fixed, sends its objects and no rejection note: a note naming
    instances an archive does not hold is refused (dcm4chee: 0xA772)."""
    pacs = pacs_pair[0]

    async def scenario():
        settings = delivery_settings(tmp_path, delivery_max_attempts=1)
        store, blobs, first = await done_job(settings, study_files)
        wanted = ["sr", "key_images", "kos", "rejection"]
        wrong = Deliverer(store, blobs, parse_destinations([pacs_destination(pacs, ae_title="NOT_ORTHANC", objects=wanted)]),
                          settings, CollectorRegistry())
        fixed = Deliverer(store, blobs, parse_destinations([pacs_destination(pacs, objects=wanted)]), settings,
                          CollectorRegistry())
        try:
            (failed,) = await until_states(wrong, first.job_id, {"failed"})
            assert failed.payload["objects"] and failed.sent == ()
            _, _, second = await done_job(settings, study_files, stores=(store, blobs))
            (task,) = await until_states(fixed, second.job_id, {"done"})
            assert [o["kind"] for o in task.payload["objects"]][-1] == "kos"
            held = _held(pacs, second.study_instance_uid)
            assert set(held) == _uids(task) and not _notes(held)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_forced_resend_that_failed_leaves_the_next_reading_retracting_what_the_pacs_holds(
        pacs_pair, study_files, tmp_path):
    """The reviewer's case: version 1 delivered to an Orthanc (every object acknowledged), then sent again by force
    while that Orthanc was stopped: failed, nothing acknowledged. The force had forgotten what the PACS held, and
    version 2's delivery carried its SR, key images and KOS but no Rejection Note: version 1's objects stayed live
    there. Now the note names them."""
    pacs = pacs_pair[0]

    async def scenario():
        settings = delivery_settings(tmp_path, delivery_max_attempts=1)
        store, blobs, first = await done_job(settings, study_files)
        wanted = ["sr", "key_images", "kos", "rejection"]
        deliverer = Deliverer(store, blobs, parse_destinations([pacs_destination(pacs, objects=wanted)]), settings,
                              CollectorRegistry())
        with socket.socket() as closed:  # a port nothing listens on: the PACS stopped
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        stopped = Deliverer(store, blobs, parse_destinations([pacs_destination(pacs, port=port, objects=wanted)]),
                            settings, CollectorRegistry())
        try:
            (v1,) = await until_states(deliverer, first.job_id, {"done"})
            assert set(v1.sent) == _uids(v1)
            await stopped.tasks.resend(first.job_id, "pacs", "dicom", force=True)
            (failed,) = await until_states(stopped, first.job_id, {"failed"})
            assert failed.sent == ()
            _, _, second = await done_job(settings, study_files, stores=(store, blobs))
            (v2,) = await until_states(deliverer, second.job_id, {"done"})
            assert [o["kind"] for o in v2.payload["objects"]][-1] == "rejection"
            held = _held(pacs, first.study_instance_uid)
            (note,) = _notes(held).values()
            assert _content_refs(note) == _uids(v1)
            assert _evidence(note) == _four_uids(held, _uids(v1))
        finally:
            await stopped.stop()
            await deliverer.stop()
            await store.close()

    asyncio.run(scenario())


def test_a_reading_the_rule_leaves_out_still_retracts_and_each_object_is_retracted_once(
        pacs_pair, study_files, tmp_path):
    """A positives-only PACS with ``rejection``: version 2 (indeterminate, not a chest) is left out by the rule,
    yet version 1's positive objects there are retracted: the delivery sends the note alone (done, its detail
    naming the rule). Version 3 (positive) is sent whole with no note: version 1's objects were retracted by
    version 2's note, and a note is never retracted."""
    pacs = pacs_pair[1]

    async def scenario():
        settings = delivery_settings(tmp_path)
        store, blobs, first = await done_job(settings, study_files)
        dest = pacs_destination(pacs, objects=["sr", "key_images", "kos", "rejection"], rule={"verdicts": ["positive"]})
        deliverer = Deliverer(store, blobs, parse_destinations([dest]), settings, CollectorRegistry())
        study = first.study_instance_uid
        try:
            (v1,) = await until_states(deliverer, first.job_id, {"done"})
            _, _, second = await done_job(settings, study_files, stores=(store, blobs), not_chest=True)
            (v2,) = await until_states(deliverer, second.job_id, {"done", "skipped"})
            assert v2.state == "done" and [o["kind"] for o in v2.payload["objects"]] == ["rejection"]
            assert "indeterminate results are not sent here" in v2.history[-1]["detail"]
            (note_uid,) = _uids(v2)
            held = _held(pacs, study)
            assert list(_notes(held)) == [note_uid]
            assert _evidence(held[note_uid]) == _four_uids(held, _uids(v1))
            _, _, third = await done_job(settings, study_files, stores=(store, blobs))
            (v3,) = await until_states(deliverer, third.job_id, {"done"})
            assert "rejection" not in [o["kind"] for o in v3.payload["objects"]]
            assert list(_notes(_held(pacs, study))) == [note_uid]
        finally:
            await deliverer.stop()
            await store.close()

    asyncio.run(scenario())


def test_rejection_alone_is_refused_with_one_line():
    dicom = {"name": "p", "kind": "dicom", "ae_title": "A", "host": "h", "port": 104}
    with pytest.raises(DestinationsError, match="rejection retracts .* list at least one of sr, key_images, kos"):
        parse_destinations([{**dicom, "objects": ["rejection"]}])
    (web,) = parse_destinations([{"name": "w", "kind": "stowrs", "url": "http://x", "objects": ["sr", "rejection"]}])
    assert web.objects == ["sr", "rejection"]
