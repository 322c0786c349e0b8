"""One SR, one object: ``GET /v1/jobs/{id}/sr`` and the SR the deliverer sends to the PACS are the same bytes.

Both carry the SOP Instance UID derived from the result, so two different contents under it would be two
objects under one UID (PS3.5 9: a UID identifies one object; a PACS that gets both keeps either). The
delivered SR is made from the stored instances' full headers (``gateway.delivery.payloads``), the API's from
the headers kept with the result (``gateway.report.SrContext``). A real app (fake Triton, real DICOM, real
store and deliverer) screens a study whose headers state what the SR copies or describes (Study
Description, a time zone on all but the first slice, other patient and equipment attributes, a DS written
with trailing zeros, a Latin-1 name, per-slice geometry), uploaded in shuffled order, and sends the SR to a
real Orthanc (``tests/orthanc.py``): the API's bytes are the payload's, and Orthanc's copy holds the same
data set. A context stored by the previous release (no header, no geometry) still makes an SR, with what
differs listed; one written by a later release (longer per-instance rows, new keys) is still read.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset

from gateway.main import create_app
from gateway.report import SrContext
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet, ct_series, wait_job
from tests.orthanc import OrthancServer, dicomweb_plugin, orthanc_bin

pytestmark = [pytest.mark.timeout(180)]
N_SLICES, RUN = 9, [3, 4, 5]


@pytest.fixture(scope="module")
def orthanc():
    if orthanc_bin() is None or dicomweb_plugin() is None:  # the tests without a PACS run anyway
        pytest.skip("Orthanc + DICOMweb plugin not installed: scripts/setup.sh --test")
    server = OrthancServer()
    try:
        yield server
    finally:
        server.close()


def _study() -> tuple[str, list[tuple[str, bytes]]]:
    """A 9-slice series with the marker on slices 3-5, shuffled, with headers a scanner writes."""
    uid, files = ct_series(N_SLICES, lesion=RUN, size=256)
    out = []
    for name, data in files:
        ds = pydicom.dcmread(io.BytesIO(data))
        z = float(ds.ImagePositionPatient[2])
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = "Müller^Jürgen", "MRN-7", "HOSP_A"
        ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19600102", "F", "065Y"
        ds.PatientWeight, ds.PatientSize = "70.000", "1.650"  # as written, not as a float prints
        other = Dataset()
        other.PatientID, other.IssuerOfPatientID = "X-1", "HOSP_B"
        ds.OtherPatientIDsSequence = [other]
        ds.StudyDescription, ds.AccessionNumber, ds.StudyID = "CT THORAX HR", "ACC-1", "7"
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20261205", "083000", "Ref^Doc"
        ds.Manufacturer, ds.ManufacturerModelName, ds.StationName = "ACME", "Scan 9", "CT1"
        ds.InstitutionName, ds.DeviceSerialNumber, ds.SoftwareVersions = "Hosp", "42", "1.0"
        ds.AcquisitionDate, ds.AcquisitionTime = "20261205", "083512"
        ds.SpacingBetweenSlices = "5.00"
        ds.ImagePositionPatient = ["-125.5", f"{-124.25 - z / 5:.2f}", f"{z:.1f}"]  # per-slice x, y too
        if z > 0:  # the first slice along the normal states no zone; the SR takes the next one's
            ds.TimezoneOffsetFromUTC = "+0530"
        ds.add_new(0x00091010, "LO", "private")
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((name, buf.getvalue()))
    return uid, out


def _deliveries(client: TestClient, job_id: str, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    got: list[dict] = []
    while time.monotonic() < deadline:
        got = client.get(f"/v1/jobs/{job_id}/deliveries").json()
        if got and all(d["state"] in ("done", "failed", "skipped") for d in got):
            assert all(d["held_behind"] is None for d in got)  # ended: held behind nothing
            return got
        time.sleep(0.1)
    raise AssertionError(f"deliveries of {job_id} not final: {got}")


def _elements(ds: Dataset, at: str = "") -> dict[str, tuple[str, object]]:
    """Every element of ``ds`` (sequences item by item), by path: (VR, value as it reads)."""
    out: dict[str, tuple[str, object]] = {}
    for elem in ds:
        path = f"{at}{elem.tag}"
        if elem.VR == "SQ":
            out[path] = ("SQ", len(elem.value))
            for n, item in enumerate(elem.value):
                out |= _elements(item, f"{path}[{n}].")
        else:
            out[path] = (elem.VR, elem.value)
    return out


def _differing(a: Dataset, b: Dataset) -> list[str]:
    ea, eb = _elements(a), _elements(b)
    return sorted(p for p in ea.keys() | eb.keys() if ea.get(p) != eb.get(p))


@pytest.fixture
def screened(orthanc, tmp_path):
    """A done job of :func:`_study`, its SR delivered to Orthanc; yields the client, job id and payload SR bytes."""
    destinations = tmp_path / "destinations.json"
    destinations.write_text(json.dumps({"destinations": [
        {"name": "pacs", "kind": "dicom", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
         "port": orthanc.dicom_port, "objects": ["sr"]}]}))
    settings = Settings(triton_urls="fake:1", data_dir=tmp_path / "data", destinations_file=destinations,
                        delivery_poll_s=0.1, delivery_backoff_s=0.2, delivery_backoff_max_s=0.4)
    _, files = _study()
    with TestClient(create_app(settings, client_factory=FakeFleet())) as client:
        r = client.post("/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in files])
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        view = wait_job(client, job_id)
        assert view["state"] == "done" and view["result"]["verdict"] == "positive", view
        assert [s["index"] for s in view["result"]["evidence"]["slices"]] == RUN
        (delivery,) = _deliveries(client, job_id)
        assert delivery["state"] == "done", delivery
        (task,) = client.portal.call(client.app.state.deliverer.tasks.of_job, job_id)
        (made,) = task.payload["objects"]
        assert made["kind"] == "sr"
        yield client, job_id, client.app.state.blobs.get(made["blob_key"]), settings


def test_the_api_sr_is_the_delivered_sr_byte_for_byte(screened, orthanc):
    client, job_id, delivered, _ = screened
    served = client.get(f"/v1/jobs/{job_id}/sr")
    assert served.status_code == 200
    api = pydicom.dcmread(io.BytesIO(served.content))
    sent = pydicom.dcmread(io.BytesIO(delivered))
    assert _differing(api, sent) == []  # named first, so a failure says which elements
    assert served.content == delivered
    # what made them differ before is there: copied, stated, described
    assert (api.StudyDescription, api.TimezoneOffsetFromUTC, str(api.PatientName)) == \
        ("CT THORAX HR", "+0530", "Müller^Jürgen")
    assert api.PatientWeight.original_string == "70.000"
    library = next(i for i in api.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028")
    meanings = {d.ConceptNameCodeSequence[0].CodeMeaning for g in library.ContentSequence
                for e in g.ContentSequence if e.ValueType == "IMAGE" for d in e.ContentSequence}
    assert {"Frame of Reference UID", "Image Position (Patient) Y", "Slice Thickness"} <= meanings
    # and the PACS holds that data set (its file meta is Orthanc's own: who stored it, how it arrived)
    (held,) = [i for i in orthanc.instances_of_study(api.StudyInstanceUID)
               if i["MainDicomTags"]["SOPInstanceUID"] == api.SOPInstanceUID]
    pacs = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{held['ID']}/file")))
    assert _differing(pacs, api) == []


def test_the_stored_context_is_bounded_by_the_images_the_sr_references(screened):
    """Per instance the store keeps its UIDs and size; one header (what the SR reads of the first slice's: no
    pixel data, no private elements) and the geometry of the evidence run's images only, not the whole series'."""
    _, job_id, _, settings = screened
    with sqlite3.connect(settings.data_dir / "ctscreen.db") as db:
        (stored,) = db.execute("SELECT sr_context FROM results WHERE job_id = ?", (job_id,)).fetchone()
    context = SrContext.from_json(json.loads(stored))
    assert len(context.instances) == N_SLICES and all(len(i) == 6 for i in json.loads(stored)["instances"])
    assert len(context.images) == len(RUN)
    header = context.header_dataset()
    assert header is not None and "PixelData" not in header and not any(e.tag.is_private for e in header)
    assert len(stored) < 6000


def test_a_context_stored_by_the_previous_release_still_makes_its_sr(screened):
    """A result written by the previous release kept only the study pairs and the per-instance rows: its SR is
    still served (same UIDs, same verdict and regions), made from what is there. It lacks what those pairs do
    not hold: the attributes of the patient and study modules beyond them (Study Description, Other Patient
    IDs, age, weight, size), the Specific Character Set, the time zone (its times are then the gateway's local time, and no offset is
    written), the acquisition equipment, and the Image Library's geometry (frame of reference, pixel spacing,
    slice thickness and spacing, position, orientation)."""
    client, job_id, delivered, settings = screened
    with sqlite3.connect(settings.data_dir / "ctscreen.db") as db:
        (stored,) = db.execute("SELECT sr_context FROM results WHERE job_id = ?", (job_id,)).fetchone()
        previous = {k: v for k, v in json.loads(stored).items() if k in ("study", "instances")}
        db.execute("UPDATE results SET sr_context = ? WHERE job_id = ?", (json.dumps(previous), job_id))
    served = client.get(f"/v1/jobs/{job_id}/sr")
    assert served.status_code == 200
    api, sent = pydicom.dcmread(io.BytesIO(served.content)), pydicom.dcmread(io.BytesIO(delivered))
    assert (api.SOPInstanceUID, api.SeriesInstanceUID) == (sent.SOPInstanceUID, sent.SeriesInstanceUID)
    assert "StudyDescription" not in api and "TimezoneOffsetFromUTC" not in api
    top = {p.split(".")[0].split("[")[0] for p in _differing(api, sent)}
    names = {pydicom.datadict.keyword_for_tag(int(t.strip("()").replace(",", ""), 16)) for t in top}
    assert names <= {"SpecificCharacterSet", "StudyDescription", "OtherPatientIDsSequence", "PatientAge", "PatientWeight", "PatientSize",
                     "TimezoneOffsetFromUTC", "InstanceCreationDate", "InstanceCreationTime", "SeriesDate", "SeriesTime", "ContentDate",
                     "ContentTime", "ContributingEquipmentSequence", "ContentSequence"}, names


def test_a_context_written_by_a_later_release_is_read():
    """A later release may add a value to the per-instance rows or the study pairs, or new keys: this one
    reads what it knows (a rolling upgrade or a rollback runs it on that release's rows)."""
    later = {"study": [["PatientID", "p", "extra"]],
             "instances": [["1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.3", 1, 512, 512, "future"]],
             "header": "", "images": {"1.2.3.4": [["SliceThickness", "1.0", "future"]]}, "coming": {"x": 1}}
    context = SrContext.from_json(later)
    assert context.study == (("PatientID", "p"),)
    assert context.instances == (("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.3", 1, 512, 512),)
    assert context.images == (("1.2.3.4", (("SliceThickness", "1.0"),)),)
    (ds,) = context.datasets()
    assert (ds.PatientID, ds.SOPInstanceUID, float(ds.SliceThickness)) == ("p", "1.2.3.4", 1.0)
    assert SrContext.from_json(context.to_json()) == context


def test_the_fhir_payload_reads_a_later_releases_context_as_the_sr_does():
    """The FHIR report's patient comes from the same stored context (its ``study`` pairs), read the same way:
    a pair with a later release's extra value still names the patient."""
    from datetime import UTC, datetime

    from aggregator.case import SliceInput, decide
    from gateway.delivery.payloads import build_fhir

    later = {"study": [["PatientID", "P-7", "extra"], ["AccessionNumber", "A-1"]],
             "instances": [["1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.3", 1, 512, 512, "future"]]}
    inputs = [SliceInput("1.2.3.4", 0.0, np.zeros((0, 5)), np.array([0, 0, 511, 511], np.float32))]
    result = decide(inputs).to_result(study_instance_uid="1.2.3", series_instance_uid="1.2.3.9", job_id="job-f",
                                      created_at=datetime(2026, 12, 5, 8, 30, tzinfo=UTC))
    blobs: dict[str, bytes] = {}

    def put(payload: bytes) -> str:
        blobs[key := f"blob-{len(blobs)}"] = payload
        return key

    (made,) = build_fhir(result, later, put)
    report = json.loads(blobs[made["blob_key"]])["entry"][0]["resource"]
    assert report["subject"]["identifier"]["value"] == "P-7"
    assert report["basedOn"][0]["identifier"]["value"] == "A-1"


def test_an_enhanced_ct_makes_the_same_sr_from_its_kept_header_as_the_deliverer_from_its_file():
    """An Enhanced CT is the whole series in one instance: its kept header leaves out the functional groups (a
    value per frame, which the SR does not read), so the context stays small, and the SR is the same bytes."""
    from datetime import UTC, datetime

    import numpy as np

    from aggregator.case import SliceInput, decide
    from gateway.delivery.payloads import build_dicom
    from gateway.ingest import load_study
    from gateway.report import encode_sr
    from tests.gateway_dicom_factory import chest_like, enhanced_ct

    n = 60
    data = enhanced_ct([chest_like(32, 32, seed=s) for s in range(n)], [(1.0, -1024.0)] * n, [float(z) for z in range(n)])
    context = load_study([("ect.dcm", data)]).sr_context
    assert context is not None and len(json.dumps(context.to_json())) < 3000
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    box = np.array([[100, 100, 140, 140, 0.9]], np.float32)
    inputs = [SliceInput(str(ds.SOPInstanceUID), float(z), box if z in (3, 4, 5) else np.zeros((0, 5)),
                         np.array([0, 0, 511, 511], np.float32), rows=32, cols=32, frame_index=z) for z in range(n)]
    result = decide(inputs).to_result(study_instance_uid=str(ds.StudyInstanceUID),
                                      series_instance_uid=str(ds.SeriesInstanceUID), job_id="job-ect",
                                      created_at=datetime(2026, 12, 5, 8, 30, tzinfo=UTC))  # as the worker's
    assert result.verdict == "positive"
    blobs: dict[str, bytes] = {}

    def put(payload: bytes) -> str:
        blobs[key := f"blob-{len(blobs)}"] = payload
        return key

    (made,) = build_dicom(result, [("ect.dcm", data)], ["sr"], put)
    kept, sent = encode_sr(result, context.for_result(result)), blobs[made["blob_key"]]
    assert _differing(pydicom.dcmread(io.BytesIO(kept)), pydicom.dcmread(io.BytesIO(sent))) == []
    assert kept == sent


NOT_READ = {"PatientAddress": "1 Main St^^Town", "PatientTelephoneNumbers": "555-0100", "MilitaryRank": "Major",
            "PatientMotherBirthName": "Mother^Maiden", "EthnicGroup": "group", "OperatorsName": "Op^Erator",
            "PerformingPhysicianName": "Perf^Doc", "ProtocolName": "CHEST LOW DOSE", "BodyPartExamined": "CHEST",
            "PerformedProcedureStepDescription": "CT THORAX", "InstitutionCodeSequence": None, "RequestAttributesSequence": None}
"""Header attributes a scanner or a worklist writes that the SR does not read (with a private element)."""


def _more_than_the_sr_reads(ds: Dataset) -> None:
    for keyword, value in NOT_READ.items():
        if value is None:
            item = Dataset()
            item.RequestedProcedureID, item.CodeValue = "RP-9", "H1"
            setattr(ds, keyword, [item])
        else:
            setattr(ds, keyword, value)
    ds.add_new(0x00291010, "OB", b"\x01" * 64)
    ds.add_new(0x00091010, "LO", "private")
    # and what the SR copies: the patient and study modules, the acquisition equipment
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge, ds.AccessionNumber = "19600102", "F", "065Y", "ACC-1"
    ds.StudyID, ds.StudyDate, ds.StudyTime, ds.StudyDescription = "7", "20261205", "083000", "CT THORAX HR"
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = "X-1", "HOSP_B"
    ds.OtherPatientIDsSequence = [other]
    ds.Manufacturer, ds.StationName, ds.InstitutionName, ds.InstitutionAddress = "ACME", "CT1", "Hosp", "2 Hosp Rd"


def test_the_kept_header_holds_only_what_the_sr_reads():
    """Data minimisation: of the first slice's header the context keeps the attributes the SR reads
    (``aggregator.sr.SR_HEADER_KEYWORDS``), not the patient's address, the operators, the request or a private
    element; the SR made from it is still the deliverer's (from the stored files), patient and study included."""
    from datetime import UTC, datetime

    from aggregator.case import SliceInput, decide
    from aggregator.sr import SR_HEADER_KEYWORDS
    from gateway.delivery.payloads import build_dicom
    from gateway.ingest import load_study
    from gateway.report import encode_sr
    from tests.gateway_app_fakes import edited

    _, files = ct_series(6, lesion=[2, 3, 4], size=64)
    files = edited(files, _more_than_the_sr_reads)
    context = load_study(files).sr_context
    assert context is not None
    header = context.header_dataset()
    assert header is not None and {e.keyword for e in header} <= set(SR_HEADER_KEYWORDS)
    assert not set(NOT_READ) & {e.keyword for e in header} and not any(e.tag.is_private for e in header)
    assert header.OtherPatientIDsSequence[0].PatientID == "X-1" and header.InstitutionAddress == "2 Hosp Rd"

    headers = sorted((pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True) for _, d in files),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    box = np.array([[10, 10, 20, 20, 0.9]], np.float32)
    inputs = [SliceInput(str(d.SOPInstanceUID), float(d.ImagePositionPatient[2]), box if k in (2, 3, 4) else
                         np.zeros((0, 5)), np.array([0, 0, 63, 63], np.float32), rows=64, cols=64)
              for k, d in enumerate(headers)]
    result = decide(inputs).to_result(study_instance_uid=str(headers[0].StudyInstanceUID),
                                      series_instance_uid=str(headers[0].SeriesInstanceUID), job_id="job-min",
                                      created_at=datetime(2026, 12, 5, 8, 30, tzinfo=UTC))
    assert result.verdict == "positive"
    blobs: dict[str, bytes] = {}

    def put(payload: bytes) -> str:
        blobs[key := f"blob-{len(blobs)}"] = payload
        return key

    (made,) = build_dicom(result, files, ["sr"], put)
    kept, sent = encode_sr(result, context.for_result(result)), blobs[made["blob_key"]]
    sr = pydicom.dcmread(io.BytesIO(kept))
    assert _differing(sr, pydicom.dcmread(io.BytesIO(sent))) == []
    assert kept == sent
    assert (str(sr.PatientName), sr.PatientID, sr.PatientBirthDate, sr.PatientSex, sr.AccessionNumber, sr.StudyID,
            sr.StudyDate, sr.StudyTime, sr.StudyDescription, sr.StudyInstanceUID) == \
        ("Test^Gateway", "TEST", "19600102", "F", "ACC-1", "7", "20261205", "083000", "CT THORAX HR",
         result.study_instance_uid)
    assert sr.OtherPatientIDsSequence[0].PatientID == "X-1"  # highdicom copies the Patient module whole
    assert sr.ContributingEquipmentSequence[0].InstitutionAddress == "2 Hosp Rd"  # and the acquisition equipment
    assert not set(NOT_READ) & {e.keyword for e in sr}


def test_the_sr_context_does_not_depend_on_what_read_the_header_before() -> None:
    """An image's descriptors in the SR context are what pydicom parses them to, whether an element was read before
    (by pydicom) or is still as the file holds it (the frame headers read the common elements straight from the
    bytes): a space after a backslash in Image Position (Patient) is kept out either way."""
    from gateway.dicom import read_dataset
    from gateway.report import sr_context
    from tests.gateway_dicom_factory import chest_like, ct_dataset, to_bytes

    data = to_bytes(ct_dataset(chest_like(32, 32), position=(-85.0, -115.0, -97.3)))
    assert data.count(b"-85.0000\\-115.0000") == 1
    data = data.replace(b"-85.0000\\-115.0000", b"-85.000\\ -115.0000")  # the same length, the same numbers
    untouched, read = read_dataset(data), read_dataset(data)
    assert [float(v) for v in read.ImagePositionPatient] == [-85.0, -115.0, -97.3]  # parsed by pydicom first
    a, b = sr_context([untouched]), sr_context([read])
    assert a is not None and a == b
    assert dict(a.images[0][1])["ImagePositionPatient"] == "-85.000\\-115.0000\\-97.3000"
