"""What ctscreen sends to PACS and RIS, built without a network: the SR filed under the source's patient
and study, key images (Secondary Capture) with the boxes drawn, and the FHIR R4 DiagnosticReport.

Checked by a highdicom round trip, by dcmtk's ``dsrdump`` and ``dcmdump +E`` (errors on stderr fail the
test) and by the ``fhir.resources`` models.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from collections.abc import Collection

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from aggregator.case import SliceInput, decide
from aggregator.fhir import (
    DEVICE_SYSTEM,
    IDENTIFIER_SYSTEM,
    REPLACES,
    current_reports,
    to_fhir,
    validate_bundle,
)
from aggregator.keyimages import (
    BOX_RGB,
    KOS_SERIES_NUMBER,
    OF_INTEREST,
    key_images,
    key_object_selection,
    lung_window,
)
from aggregator.sr import to_sr
from tests.gateway_dicom_factory import ct_dataset
from tests.test_aggregator_sr import LESION, VA

highdicom = pytest.importorskip("highdicom")


def results_series(n: int = 6, lesion_slices=(1, 2, 3)):
    """Full 512 x 512 CT instances with patient and study attributes, and their case result."""
    study, series = generate_uid(), generate_uid()
    hu = np.full((512, 512), -1000, np.int16)
    hu[200:300, 200:300] = 40
    out = []
    for k in range(n):
        ds = ct_dataset(hu, position=(0.0, 0.0, 2.5 * k), study_uid=study, series_uid=series, instance_number=k + 1)
        ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = "Doe^Jane", "P-123", "HOSP"
        ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber = "19700101", "F", "ACC-9"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.StudyDescription = "20260102", "101500", "S1", "CT chest"
        ds.ReferringPhysicianName = "Ref^Doc"
        ds.PixelSpacing = [0.7, 0.7]
        out.append(dcmread(io.BytesIO(_bytes(ds))))
    inputs = [SliceInput(str(ds.SOPInstanceUID), 2.5 * k, LESION if k in lesion_slices else np.zeros((0, 5)), VA,
                         rows=512, cols=512) for k, ds in enumerate(out)]
    result = decide(inputs).to_result(study_instance_uid=study, series_instance_uid=series, job_id="job-1")
    return result, out


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dcmtk_clean(tool: str, data: bytes, tmp_path, *args: str, allowed: Collection[str] = ()) -> str:
    """``tool``'s output on ``data``; it must exit 0 with nothing on stderr but the ``allowed`` lines."""
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"dcmtk's {tool} is not installed (scripts/setup.sh --test installs dcmtk)")
    path = tmp_path / f"{generate_uid()}.dcm"
    path.write_bytes(data)
    done = subprocess.run([exe, *args, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and set(done.stderr.strip().splitlines()) <= set(allowed), done.stderr[-2000:]
    return done.stdout


def test_sr_files_under_the_source_patient_and_study_and_validates(tmp_path):
    result, sources = results_series()
    sr = to_sr(result, sources)
    data = _bytes(sr)
    back = highdicom.sr.Comprehensive3DSR.from_dataset(dcmread(io.BytesIO(data)))
    src = sources[0]
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "StudyDescription"):
        assert str(back.get(keyword)) == str(src.get(keyword)), keyword
    assert back.SeriesInstanceUID not in {str(s.SeriesInstanceUID) for s in sources}  # a new series
    refs = {r.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for r in back.content.get_planar_roi_measurement_groups()}
    assert refs == {s.sop_instance_uid for s in result.evidence.slices}  # the exact source instances
    dump = dcmtk_clean("dsrdump", data, tmp_path)
    assert "Imaging Measurement Report" in dump and "SCOORD" in dump
    assert dump.count("Image Library Group") == 1 and "Image Position (Patient) Z" in dump  # TID 1600
    dcmtk_clean("dcmdump", data, tmp_path, "+E")


def test_key_images_are_secondary_captures_with_boxes_in_a_lung_window(tmp_path):
    result, sources = results_series()
    images = key_images(result, sources)
    assert len(images) == len(result.evidence.slices) == 3
    series = {str(i.SeriesInstanceUID) for i in images}
    assert len(series) == 1 and series.isdisjoint({str(s.SeriesInstanceUID) for s in sources})
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    for image, ev in zip(images, result.evidence.slices, strict=True):
        data = _bytes(image)
        back = dcmread(io.BytesIO(data))
        assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
        assert (back.PatientID, back.IssuerOfPatientID, back.StudyInstanceUID, back.AccessionNumber) == (
            "P-123", "HOSP", result.study_instance_uid, "ACC-9")
        assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == ev.sop_instance_uid
        px = back.pixel_array
        box = ev.boxes[0].original
        assert tuple(px[box.y0, box.x0 + 5]) == BOX_RGB  # the drawn edge
        inside = px[box.y0 + 5, box.x0 + 5]
        src = by_uid[ev.sop_instance_uid]
        expected = lung_window(src.pixel_array.astype(np.float64) * float(src.RescaleSlope)
                               + float(src.RescaleIntercept))[box.y0 + 5, box.x0 + 5]
        assert tuple(inside) == (expected,) * 3  # grey, lung window
        dcmtk_clean("dcmdump", data, tmp_path, "+E")
    again = key_images(result, sources)
    assert [i.SOPInstanceUID for i in again] == [i.SOPInstanceUID for i in images]  # same result, same UIDs


@pytest.mark.parametrize(("part", "laterality", "expected"), [
    ("CHEST", None, ("CHEST", None)),
    ("LUNG", "R", ("LUNG", "R")),     # a paired part: its series' Laterality goes with it
    ("Chest wall", None, (None, None)),  # no CS value (lower case): left out, never copied malformed
    (None, None, (None, None)),
])
def test_key_images_keep_the_body_part_examined_of_their_slices(part, laterality, expected):
    """The key images had no Body Part Examined: dciodvfy (dicom3tools) then calls their Laterality, Type 2C on a
    paired part, missing ("Missing attribute for Type 2C Conditional - Module=<GeneralSeries>"), and a viewer's
    hanging protocol finds no body part for them. They now carry their slice's (and its series' Laterality)."""
    result, sources = results_series()
    for ds in sources:
        if part is not None:
            ds.BodyPartExamined = part
        if laterality is not None:
            ds.Laterality = laterality
    for image in key_images(result, sources):
        back = dcmread(io.BytesIO(_bytes(image)))
        assert (back.get("BodyPartExamined"), back.get("Laterality")) == expected


def test_negative_result_has_no_key_images_and_missing_sources_are_refused():
    result, sources = results_series(lesion_slices=(1, 2))
    assert result.verdict == "negative" and key_images(result, sources) == []
    assert key_object_selection(result, sources) is None  # nothing to flag
    positive, sources = results_series()
    with pytest.raises(ValueError, match="lacks evidence slice"):
        key_images(positive, sources[:1])
    with pytest.raises(ValueError, match="lacks evidence slice"):
        key_object_selection(positive, sources[:1])


def test_a_series_that_is_no_chest_shows_its_boxes_as_lesions_nowhere():
    """not_chest (a head's sinuses make a run): the SR holds the verdict only, no key images, no KOS, no run in
    the FHIR report; the same series as a chest shows them all."""
    result, sources = results_series()
    head = result.model_copy(update={"verdict": "indeterminate", "reason": "not_chest"})
    assert result.shows_lesions and not head.shows_lesions and head.evidence is not None
    assert key_images(head, sources) == [] and key_object_selection(head, sources) is None
    assert len(key_images(result, sources)) == 3 and key_object_selection(result, sources) is not None
    regions = highdicom.sr.Comprehensive3DSR.from_dataset(to_sr(head, sources)).content
    assert regions.get_planar_roi_measurement_groups() == []
    assert highdicom.sr.Comprehensive3DSR.from_dataset(to_sr(result, sources)).content.get_planar_roi_measurement_groups()
    parts = {e["resource"]["identifier"][0]["value"].rsplit("/", 1)[-1]
             for e in to_fhir(head)["entry"] if e["resource"]["resourceType"] == "Observation"}
    assert "run" not in parts and "quadrant" not in parts and "verdict" in parts
    assert {"run", "quadrant"} <= {e["resource"]["identifier"][0]["value"].rsplit("/", 1)[-1]
                                   for e in to_fhir(result)["entry"]}


def test_the_key_object_selection_flags_the_run_and_its_key_images_in_the_study(tmp_path):
    """The KOS a viewer shows as the study's key images: "Of Interest", the evidence run's own CT slices and
    the key images, in the source's patient and study, a new series; rebuilt, the same object."""
    from datetime import UTC, datetime

    result, sources = results_series()
    result = result.model_copy(update={"created_at": datetime(2026, 12, 5, 1, 2, 3, tzinfo=UTC)})  # as the worker
    images = key_images(result, sources)
    kos = key_object_selection(result, sources, images)
    assert kos is not None
    data = _bytes(kos)
    back = highdicom.ko.KeyObjectSelectionDocument.from_dataset(dcmread(io.BytesIO(data)))
    assert (back.SOPClassUID, back.Modality, back.SeriesNumber) == ("1.2.840.10008.5.1.4.1.1.88.59", "KO",
                                                                     KOS_SERIES_NUMBER)
    assert (back.PatientID, back.StudyInstanceUID, back.AccessionNumber) == ("P-123", result.study_instance_uid,
                                                                            "ACC-9")
    assert back.SeriesInstanceUID not in {str(s.SeriesInstanceUID) for s in sources} | {
        str(i.SeriesInstanceUID) for i in images}
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == OF_INTEREST
    slices = [s.sop_instance_uid for s in result.evidence.slices]
    referenced = [str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                  for item in back.ContentSequence if item.ValueType in ("IMAGE", "COMPOSITE")]
    assert referenced == slices + [str(i.SOPInstanceUID) for i in images]  # the run's slices, then the key images
    evidence = {str(inst.ReferencedSOPInstanceUID)
                for study in back.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for inst in series.ReferencedSOPSequence}
    assert evidence == set(referenced)
    texts = [str(item.TextValue) for item in back.ContentSequence if item.ValueType == "TEXT"]
    assert any("not a diagnosis" in t and "positive" in t for t in texts)
    dcmtk_clean("dcmdump", data, tmp_path, "+E")
    again = key_object_selection(result, sources, key_images(result, sources))
    assert again is not None and _bytes(again) == data  # same result, same object, byte for byte
    alone = key_object_selection(result, sources)  # no key images asked for: the slices only
    assert alone is not None and len([i for i in alone.ContentSequence if i.ValueType == "IMAGE"]) == 3
    # another content, another object: two destinations asking for different objects never get two KOS
    # under one SOP Instance UID (a PACS and a VNA behind one router would hold both)
    assert alone.SOPInstanceUID != kos.SOPInstanceUID
    assert (back.IssuerOfPatientID, back.StudyDescription) == ("HOSP", "CT chest")  # the whole patient and study
    multi = dcmread(io.BytesIO(_bytes(sources[2])))
    multi.NumberOfFrames = 2
    with pytest.raises(ValueError, match="multi-frame"):
        key_object_selection(result, [*sources[:2], multi, *sources[3:]])


def test_fhir_report_validates_and_refers_to_the_imaging_study():
    result, sources = results_series()
    bundle = to_fhir(result, {"PatientID": "P-123", "IssuerOfPatientID": "HOSP", "AccessionNumber": "ACC-9"})
    from fhir.resources.R4B.bundle import Bundle

    parsed = Bundle.parse_obj(bundle)
    report = parsed.entry[0].resource
    assert report.resource_type == "DiagnosticReport"
    assert report.identifier[0].system == IDENTIFIER_SYSTEM and report.identifier[0].value == "job-1"
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{result.study_instance_uid}"
    assert report.subject.identifier.value == "P-123"
    observations = {e.resource.identifier[0].value.split("/", 1)[1]: e.resource for e in parsed.entry[1:]
                    if e.resource.resource_type == "Observation"}
    assert {"verdict", "reason", "quadrant", "run"} == set(observations)
    assert observations["verdict"].valueCodeableConcept.coding[0].display == "Present"
    quadrant = observations["quadrant"].valueCodeableConcept
    assert quadrant.coding[0].code == result.evidence.quadrant  # the grid's name, for machines
    assert quadrant.text in ("right anterior", "left anterior", "right posterior", "left posterior")  # the patient's side
    assert observations["run"].valueQuantity.value == result.evidence.n_slices
    assert [e.fullUrl for e in parsed.entry[1:1 + len(observations)]] == [r.reference for r in report.result]
    assert all(e.request.method == "POST" and e.request.ifNoneExist == f"identifier={e.resource.identifier[0].system}|"
               f"{e.resource.identifier[0].value}" for e in parsed.entry)
    assert {e.resource.identifier[0].system for e in parsed.entry} == {IDENTIFIER_SYSTEM, DEVICE_SYSTEM}
    assert to_fhir(result) == to_fhir(result)  # one result, one bundle
    broken = {**bundle, "entry": [{**bundle["entry"][0], "resource": {"resourceType": "DiagnosticReport"}}]}
    with pytest.raises(ValueError, match="refused by the R4 models"):
        validate_bundle(broken)


def test_the_fhir_report_is_coded_as_a_machine_reading_not_as_the_radiologists_ct_chest_report():
    """LOINC 24627-2 "CT Chest" is the code of the radiologist's report of the exam: a RIS listing reports by
    code showed the machine reading as that report. The code is the SR's title, DICOM 126000 Imaging
    Measurement Report, and every resource that asserts something carries the AI-asserted security label."""
    result, _ = results_series()
    bundle = to_fhir(result)
    report = bundle["entry"][0]["resource"]
    assert report["code"]["coding"] == [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "126000",
                                         "display": "Imaging Measurement Report"}]
    assert "24627-2" not in str(report) and "machine reading" in report["code"]["text"]
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    asserted = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] != "Device"]
    assert len(asserted) == 5 and all(r["meta"]["security"] == [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST",
        "display": "Artificial Intelligence asserted"}] for r in asserted)


def test_the_fhir_device_names_the_algorithm_and_every_observation_refers_to_it():
    """The algorithm is a Device (manufacturer ctscreen, the software and every model's version and sha256),
    created once per configuration (conditional create by its identifier), the device of every observation;
    new weights under the same software are another Device."""
    from aggregator.fhir import device_identifier
    from aggregator.schema import ModelInfo

    result, _ = results_series()
    models = [ModelInfo(name="lesion", version="2.0.0", sha256="ab" * 32, platform="onnxruntime"),
              ModelInfo(name="ct_screen", version="1", platform="ensemble")]
    result = result.model_copy(update={"software_version": "9.9.9", "models": models})
    bundle = to_fhir(result)
    (device_entry,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Device"]
    device = device_entry["resource"]
    assert device_entry["request"] == {"method": "POST", "url": "Device",
                                       "ifNoneExist": f"identifier={DEVICE_SYSTEM}|{device_identifier(result)}"}
    assert device["manufacturer"] == "ctscreen" and device["deviceName"][0]["name"] == "ctscreen 9.9.9"
    assert [(v["type"]["text"], v["value"], v.get("component", {}).get("value")) for v in device["version"]] == [
        ("software", "9.9.9", None), ("model ct_screen (ensemble)", "1", None),
        ("model lesion (onnxruntime)", "2.0.0", "ab" * 32)]
    observations = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert observations and all(o["device"]["reference"] == device_entry["fullUrl"]
                                and o["device"]["identifier"] == device["identifier"][0] for o in observations)
    assert "device" not in bundle["entry"][0]["resource"]  # R4: a report's performer is never a Device
    assert not any("model-" in o["identifier"][0]["value"] for o in observations)  # the versions are the Device's
    again = to_fhir(result.model_copy(update={"job_id": "job-2"}))  # another reading, the same algorithm
    assert [e for e in again["entry"] if e["resource"]["resourceType"] == "Device"] == [device_entry]
    retrained = result.model_copy(update={"models": [models[0].model_copy(update={"sha256": "cd" * 32}), models[1]]})
    assert device_identifier(retrained) != device_identifier(result)


@pytest.mark.parametrize("lesion_slices", [(1, 2, 3), (1, 2)])
def test_the_sr_and_the_fhir_report_code_the_verdict_alike(lesion_slices):
    """The RIS and the PACS must read one verdict: FHIR's Absent was SNOMED CT 2667000, the SR's 272519000
    (the code PS3.16 gives Absent, as pydicom's code dictionary has it): two codes for one answer."""
    result, sources = results_series(lesion_slices=lesion_slices)

    def coded(items):  # every coded value of the SR's content tree, as (code, meaning)
        for item in items:
            for code in item.get("ConceptCodeSequence", []):
                yield code.CodeValue, code.CodeMeaning
            yield from coded(item.get("ContentSequence", []))

    sr_values = set(coded(dcmread(io.BytesIO(_bytes(to_sr(result, sources)))).ContentSequence))
    verdict = next(e["resource"] for e in to_fhir(result)["entry"]
                   if e["resource"]["identifier"][0]["value"].endswith("/verdict"))
    [coding] = verdict["valueCodeableConcept"]["coding"]
    assert (coding["code"], coding["display"]) in sr_values, (result.verdict, coding, sr_values)


def test_a_newer_reading_names_the_older_sr_and_the_older_report_it_replaces():
    """Version 2 of a study (late instances) is screened again: its SR names version 1's SR as a predecessor
    document, and its FHIR report names version 1's with the core extension diagnosticReport-replaces (its
    observations the same parts of version 1 with observation-replaces). Version 1 keeps its own status:
    it was set to cancelled before, which FHIR defines as a report never started or completed. Version 1 is
    in the bundle too, as conditional creates, so a RIS that never got it still holds the whole chain."""
    from aggregator.sr import sr_uids

    newer, sources = results_series()
    older = newer.model_copy(update={"job_id": "job-0", "verdict": "negative", "evidence": None})
    sr = to_sr(newer, sources, predecessors=[older])
    (item,) = sr.PredecessorDocumentsSequence
    assert item.StudyInstanceUID == older.study_instance_uid
    (series,) = item.ReferencedSeriesSequence
    (ref,) = series.ReferencedSOPSequence
    assert (series.SeriesInstanceUID, ref.ReferencedSOPInstanceUID) == sr_uids(older) != sr_uids(newer)
    # a result stored before the root was recorded (none) was made under pydicom's: the same UIDs
    assert older.uid_root is None and sr_uids(older) == sr_uids(older.model_copy(
        update={"uid_root": "1.2.826.0.1.3680043.8.498."}))
    assert "PredecessorDocumentsSequence" not in to_sr(newer, sources)  # a first reading names none

    bundle = to_fhir(newer, {"PatientID": "P-123"}, supersedes=[older])
    alone = to_fhir(older, {"PatientID": "P-123"})
    assert {e["request"]["method"] for e in bundle["entry"]} == {"POST"}  # nothing held is ever changed
    assert {e["resource"].get("status") for e in bundle["entry"]} == {"preliminary", "active"}  # active: the Device
    by_id = {e["resource"]["identifier"][0]["value"]: e["resource"] for e in bundle["entry"]}
    entries = {e["fullUrl"]: e for e in bundle["entry"]}
    assert all(entries[e["fullUrl"]] == e for e in alone["entry"])  # version 1 as its own bundle has it
    report, old_report = by_id["job-1"], by_id["job-0"]
    assert report is bundle["entry"][0]["resource"]
    assert report["extension"] == [{"url": REPLACES["DiagnosticReport"], "valueReference": {
        "type": "DiagnosticReport", "identifier": {"system": IDENTIFIER_SYSTEM, "value": "job-0"}}}]
    assert "extension" not in old_report and "replaces the earlier reading job-0" in report["conclusion"]
    for part in ("verdict", "reason"):  # version 1 is negative: no quadrant or run to replace
        assert by_id[f"job-1/{part}"]["extension"][0]["valueReference"]["identifier"]["value"] == f"job-0/{part}"
    assert "extension" not in by_id["job-1/run"] and "job-0/run" not in by_id
    assert [r["identifier"][0]["value"] for r in current_reports(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")] == ["job-1"]
    assert len({e["fullUrl"] for e in bundle["entry"]}) == len(bundle["entry"])  # one transaction, no clash
    assert sum(e["resource"]["resourceType"] == "Device" for e in bundle["entry"]) == 1  # same models: once


def _post(url: str, bundle: dict) -> int:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, json.dumps(bundle).encode(), {"Content-Type": "application/fhir+json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("order", [(1, 2, 3), (3, 2, 1), (2, 3, 1), (1, 3), (3, 1, 2, 1)],
                         ids=lambda o: "-".join(map(str, o)))
def test_a_study_screened_three_times_has_one_current_reading_at_the_ris_in_any_delivery_order(order):
    """Real transactions at the test FHIR server, in any order (a retry of an earlier reading late, one that
    never went, one sent twice): the current report is the newest reading's; nothing held changes once
    created, nothing is cancelled, and the Device that made the three readings is one resource."""
    from tests.fhir_receiver import FhirReceiver

    v3, _ = results_series()
    readings = [v3.model_copy(update={"job_id": f"job-{k}"}) for k in (1, 2, 3)]
    bundles = {k: to_fhir(readings[k - 1], {"PatientID": "P-123"}, supersedes=readings[:k - 1][::-1])
               for k in (1, 2, 3)}
    ris = FhirReceiver()
    try:
        held: dict[str, dict] = {}
        for k in order:
            assert _post(ris.url, bundles[k]) == 200, ris.errors
            for key, resource in ris.resources.items():  # what a server holds is never changed
                assert held.setdefault(key, resource) is resource
        assert not ris.errors, ris.errors
        assert ris.current_reports() == ["job-3"]
        assert {r["status"] for r in ris.of_type("DiagnosticReport")} == {"preliminary"}
        assert sorted(r["identifier"][0]["value"] for r in ris.of_type("DiagnosticReport")) == ["job-1", "job-2", "job-3"]
        assert len(ris.of_type("Device")) == 1
        dangling = {**bundles[2], "entry": bundles[2]["entry"][:1]}  # its results' entries left out
        assert _post(ris.url, dangling) == 400 and "references to no entry" in ris.errors[-1]
    finally:
        ris.close()


@pytest.mark.parametrize(("charset", "name"), [("ISO_IR 100", "Müller^Jörg"), ("ISO_IR 192", "Παπαδόπουλος^Νίκος")])
def test_key_images_keep_the_patients_name_in_its_character_set(charset, name):
    """highdicom copies the name but not the character set: a Latin-1 name went out as Latin-1 bytes with
    no (0008,0005), which a PACS reads as another patient's."""
    result, sources = results_series()
    for ds in sources:
        ds.SpecificCharacterSet, ds.PatientName = charset, name
    sources = [dcmread(io.BytesIO(_bytes(ds))) for ds in sources]
    for sc in key_images(result, sources):
        back = dcmread(io.BytesIO(_bytes(sc)))
        assert back.SpecificCharacterSet == charset and str(back.PatientName) == name
    sr = dcmread(io.BytesIO(_bytes(to_sr(result, sources))))
    assert str(sr.PatientName) == name


def test_fhir_report_finds_the_sites_patient_and_order_by_its_identifier_systems():
    """A RIS files a report under its own Patient and ServiceRequest: with the site's identifier systems the
    subject and the order are conditional references the server resolves in the transaction. Before, the
    subject carried a made-up system (urn:ctscreen:issuer:...) no RIS knows, and the order none."""
    from aggregator.fhir import NOTICE, IdentifierSystems

    result, _ = results_series()
    patient = {"PatientID": "P 1|2", "IssuerOfPatientID": "HOSP", "AccessionNumber": "ACC-9"}
    systems = IdentifierSystems(patient_id="urn:oid:1.2.3", issuers={"HOSP": "https://hosp.example/mrn"},
                                accession="urn:oid:1.2.4")
    report = to_fhir(result, patient, systems)["entry"][0]["resource"]
    # the value's "|" escaped for the search (a backslash, then percent-encoded): a bare one split it in two
    assert report["subject"]["reference"] == "Patient?identifier=https://hosp.example/mrn|P%201%5C%7C2"
    assert report["subject"]["identifier"] == {"system": "https://hosp.example/mrn", "value": "P 1|2"}
    assert report["basedOn"][0]["reference"] == "ServiceRequest?identifier=urn:oid:1.2.4|ACC-9"
    # an issuer the site did not list: not the site's system (the site's patient P 1|2 is someone else), an
    # identifier with its assigner, stored unresolved; a study naming no issuer is the site's own
    other = to_fhir(result, {**patient, "IssuerOfPatientID": "ELSEWHERE"}, systems)["entry"][0]["resource"]
    assert "reference" not in other["subject"] and other["subject"]["identifier"] == {
        "value": "P 1|2", "assigner": {"display": "ELSEWHERE"}}
    unnamed = to_fhir(result, {"PatientID": "P 1|2"}, systems)["entry"][0]["resource"]
    assert unnamed["subject"]["reference"].startswith("Patient?identifier=urn:oid:1.2.3|")  # the default system
    bare = to_fhir(result, patient)["entry"][0]["resource"]  # no systems: identifiers, stored unresolved
    assert "reference" not in bare["subject"] and bare["subject"]["identifier"] == {
        "value": "P 1|2", "assigner": {"display": "HOSP"}}
    # the conclusion says what this is; its code says COVID-19 for a positive result, nothing otherwise
    assert report["conclusion"].startswith(NOTICE) and result.verdict == "positive"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "840544004"
    negative, _ = results_series(lesion_slices=())
    assert "conclusionCode" not in to_fhir(negative, patient, systems)["entry"][0]["resource"]


def test_what_a_reader_sees_says_it_is_a_machine_reading_and_a_rebuild_is_the_same_object():
    """IHE AIR: the PACS shows who made a result; a reader must see it is not a diagnosis. And one SOP
    Instance UID, one content: the content date and time were the build's, so a payload rebuilt later (or
    the API's SR) went out under the same UID with other bytes."""
    import time as _time
    from datetime import UTC, datetime

    result, sources = results_series()
    result = result.model_copy(update={"created_at": datetime(2026, 1, 2, 10, 15, 30, tzinfo=UTC)})  # as screened
    first_sr, first_key = to_sr(result, sources), key_images(result, sources)[0]
    _time.sleep(1.1)
    again_sr, again_key = to_sr(result, sources), key_images(result, sources)[0]
    for first, again in ((first_sr, again_sr), (first_key, again_key)):
        assert first.SOPInstanceUID == again.SOPInstanceUID
        assert (first.ContentDate, first.ContentTime) == (again.ContentDate, again.ContentTime)
        assert (first.InstanceCreationDate, first.InstanceCreationTime) == (again.InstanceCreationDate,
                                                                            again.InstanceCreationTime)
        assert "TimezoneOffsetFromUTC" not in first  # the study's zone is not known (see below)
        assert "not a diagnosis" in first.SeriesDescription and len(first.SeriesDescription) <= 64
        assert first.ManufacturerModelName == "ctscreen" and first.SoftwareVersions == result.software_version
    assert str(first_sr.ContentDate) == result.created_at.strftime("%Y%m%d")


def test_an_objects_times_are_in_the_studys_zone_with_its_offset(monkeypatch):
    """Timezone Offset From UTC applies to every date and time of an object, the Study Date and Time it copies
    from the scanner (local) included: writing "+0000" beside them put the study an hour off, and the result
    before its scan. The object states the result's time in the study's own offset when the sources carry
    one; else in this machine's local time (TZ), with no offset."""
    import time as _time
    from datetime import datetime, timedelta, timezone

    result, sources = results_series()
    made = result.model_copy(update={"created_at": datetime(2026, 12, 5, 2, 2, 3, tzinfo=timezone(timedelta(hours=1)))})
    for src in sources:
        src.TimezoneOffsetFromUTC = "-0500"  # the scanner's zone
    for ds in (to_sr(made, sources), key_images(made, sources)[0], key_object_selection(made, sources)):
        assert (str(ds.ContentDate), str(ds.ContentTime)[:6], ds.TimezoneOffsetFromUTC) == ("20261204", "200203", "-0500")
        assert (str(ds.InstanceCreationDate), str(ds.InstanceCreationTime)[:6]) == ("20261204", "200203")
    for src in sources:
        del src.TimezoneOffsetFromUTC
    monkeypatch.setenv("TZ", "SITE-2")  # POSIX: UTC+2, no time-zone database needed
    _time.tzset()
    try:
        for ds in (to_sr(made, sources), key_images(made, sources)[0], key_object_selection(made, sources)):
            assert (str(ds.ContentDate), str(ds.ContentTime)[:6]) == ("20261205", "030203")
            assert "TimezoneOffsetFromUTC" not in ds
    finally:
        monkeypatch.delenv("TZ")
        _time.tzset()


@pytest.mark.parametrize("lesion_slices", [(1, 2, 3), ()])
def test_a_pacs_study_list_shows_the_verdict_and_the_series_date(lesion_slices):
    """A PACS lists a study's series by description and date: the SR's says the machine's verdict (a reviewer
    found positive and negative results alike in the list), and every object states its Series Date and Time."""
    from datetime import UTC, datetime

    from aggregator.keyimages import key_images

    result, sources = results_series(lesion_slices=lesion_slices)
    result = result.model_copy(update={"created_at": datetime(2026, 12, 5, 8, 30, tzinfo=UTC)})  # as the worker's
    sr = to_sr(result, sources)
    assert sr.SeriesDescription == f"ctscreen COVID-19 AI: {result.verdict.upper()} - not a diagnosis"
    assert len(sr.SeriesDescription) <= 64 and result.verdict in ("positive", "negative")
    for ds in [sr, *key_images(result, sources)]:
        assert (ds.SeriesDate, ds.SeriesTime) == (ds.InstanceCreationDate, ds.InstanceCreationTime) != ("", "")


def _texts(items) -> list[str]:
    """Every text value in an SR content tree (tracking identifiers included)."""
    out = []
    for item in items:
        if "TextValue" in item:
            out.append(str(item.TextValue))
        if "ContentSequence" in item:
            out += _texts(item.ContentSequence)
    return out


def test_every_output_numbers_the_runs_slices_as_the_message_does():
    """What a reader compares across the PACS, the RIS and the page agrees: slices numbered from 1 (the SR's
    lesion labels and the key images' derivation said "slice 1" for the message's "slice 2"), the patient's
    side only (a grid side, "image top left", is another side on a mirrored stored image), and a run that
    spans more slices than it counts is not called consecutive in the KOS."""
    result, sources = results_series(lesion_slices=(1, 2, 3))  # indexes 1-3: slices 2-4 to a reader
    assert [s.index for s in result.evidence.slices] == [1, 2, 3]
    side = {"top_left": "right anterior", "top_right": "left anterior", "bottom_left": "right posterior",
            "bottom_right": "left posterior"}[result.evidence.quadrant]
    assert "slices 2-4 (" in result.message and f"the {side} quadrant" in result.message
    images = key_images(result, sources)
    assert [str(i.DerivationDescription).split(" of the ")[0] for i in images] == [
        "ctscreen: slice 2", "ctscreen: slice 3", "ctscreen: slice 4"]
    assert all(f"the {side} run" in str(i.DerivationDescription) for i in images)
    kos = key_object_selection(result, sources, images)
    [text] = [t for t in _texts(kos.ContentSequence) if "slices with lesions" in t]
    assert f"3 slices with lesions in the {side} quadrant, slices 2-4." in text and "consecutive" not in text
    labels = [t for t in _texts(to_sr(result, sources).ContentSequence) if t.startswith("lesion ")]
    assert labels == [f"lesion {n}, slice {n + 1}, {side}" for n in (1, 2, 3)], labels
    conclusion = to_fhir(result)["entry"][0]["resource"]["conclusion"]
    assert result.message in conclusion
    version = f"(ctscreen {result.software_version})"  # the KOS named it, the RIS's conclusion did not
    assert result.software_version and version in conclusion and version in text
    assert not any("(image" in t for t in [result.message, text, *labels, *(str(i.DerivationDescription) for i in images)])


def test_the_message_rounds_millimetres_as_the_page_does():
    """Python's format rounds halves to even ("6.2" for 6.25 mm) where the page's toFixed(1) rounds them up."""
    inputs = [SliceInput(f"1.2.3.{k}", 1.25 * k, LESION, VA, rows=512, cols=512) for k in range(5)]
    result = decide(inputs).to_result(study_instance_uid="1.2.3", series_instance_uid="1.2.3.9", job_id="job-1")
    assert result.evidence.extent_mm == 6.25
    assert "5 consecutive slices (6.3 mm)" in result.message and "(0.0 to 5.0 mm)" in result.message


@pytest.mark.parametrize(("study", "effective"), [
    ({"StudyDate": "20261205", "StudyTime": "093015.25", "TimezoneOffsetFromUTC": "+0100"}, "2026-12-05T09:30:15.25+01:00"),
    ({"StudyDate": "20261205", "StudyTime": "0930", "TimezoneOffsetFromUTC": "-0330"}, "2026-12-05T09:30:00-03:30"),
    ({"StudyDate": "20261205", "StudyTime": "093015"}, "2026-12-05"),  # its zone unknown: the date alone
    ({"StudyDate": "20261205", "StudyTime": "9:30", "TimezoneOffsetFromUTC": "+0100"}, "2026-12-05"),
    ({"StudyDate": "2026XX05", "StudyTime": "093015", "TimezoneOffsetFromUTC": "+0100"}, None),
    ({}, None),
])
def test_the_fhir_report_and_observations_say_when_the_study_was_taken(study, effective):
    """No ``effectiveDateTime`` on the report nor the observations: a RIS could not place the reading in time
    (``issued`` is when the machine read it). It is the study's date and time with its offset, or the date alone
    where the zone is unknown (R4: a time needs a zone); the bundle validates with the R4 models."""
    from fhir.resources.R4B.bundle import Bundle

    result, _ = results_series()
    bundle = to_fhir(result, {"PatientID": "P-123", **study})
    Bundle.parse_obj(bundle)
    resources = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] in
                 ("DiagnosticReport", "Observation")]
    assert len(resources) >= 5
    assert {r.get("effectiveDateTime") for r in resources} == {effective}
    # R4's dateTime regex (fhir.resources takes a time without a zone, which R4 does not)
    r4 = (r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
          r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?")
    assert effective is None or re.fullmatch(r4, effective)
