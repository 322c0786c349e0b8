"""What ctscreen sends to PACS and RIS, built without a network: the SR filed under the source's patient
and study, key images (Secondary Capture) with the boxes drawn, and the FHIR R4 DiagnosticReport.

Checked by a highdicom round trip, by dcmtk's ``dsrdump`` and ``dcmdump +E`` (errors on stderr fail the
test) and by the ``fhir.resources`` models.
"""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from aggregator.case import SliceInput, decide
from aggregator.fhir import IDENTIFIER_SYSTEM, to_fhir, validate_bundle
from aggregator.keyimages import BOX_RGB, key_images, lung_window
from aggregator.sr import to_sr
from tests.gateway_dicom_factory import ct_dataset
from tests.test_aggregator_sr import LESION, VA

highdicom = pytest.importorskip("highdicom")


def _series(n: int = 6, lesion_slices=(1, 2, 3)):
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


def _dcmtk_clean(tool: str, data: bytes, tmp_path, *args: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"dcmtk's {tool} is not installed (scripts/setup.sh --test installs dcmtk)")
    path = tmp_path / f"{generate_uid()}.dcm"
    path.write_bytes(data)
    done = subprocess.run([exe, *args, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr[-2000:]
    return done.stdout


def test_sr_files_under_the_source_patient_and_study_and_validates(tmp_path):
    result, sources = _series()
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
    dump = _dcmtk_clean("dsrdump", data, tmp_path)
    assert "Imaging Measurement Report" in dump and "SCOORD" in dump
    _dcmtk_clean("dcmdump", data, tmp_path, "+E")


def test_key_images_are_secondary_captures_with_boxes_in_a_lung_window(tmp_path):
    result, sources = _series()
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
        _dcmtk_clean("dcmdump", data, tmp_path, "+E")
    again = key_images(result, sources)
    assert [i.SOPInstanceUID for i in again] == [i.SOPInstanceUID for i in images]  # same result, same UIDs


def test_negative_result_has_no_key_images_and_missing_sources_are_refused():
    result, sources = _series(lesion_slices=(1, 2))
    assert result.verdict == "negative" and key_images(result, sources) == []
    positive, sources = _series()
    with pytest.raises(ValueError, match="lacks evidence slice"):
        key_images(positive, sources[:1])


def test_fhir_report_validates_and_refers_to_the_imaging_study():
    result, sources = _series()
    bundle = to_fhir(result, {"PatientID": "P-123", "IssuerOfPatientID": "HOSP", "AccessionNumber": "ACC-9"})
    from fhir.resources.R4B.bundle import Bundle

    parsed = Bundle.parse_obj(bundle)
    report = parsed.entry[0].resource
    assert report.resource_type == "DiagnosticReport"
    assert report.identifier[0].system == IDENTIFIER_SYSTEM and report.identifier[0].value == "job-1"
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{result.study_instance_uid}"
    assert report.subject.identifier.value == "P-123"
    observations = {e.resource.identifier[0].value.split("/", 1)[1]: e.resource for e in parsed.entry[1:]}
    assert {"verdict", "reason", "quadrant", "run"} <= set(observations)
    assert observations["verdict"].valueCodeableConcept.coding[0].display == "Present"
    assert observations["quadrant"].valueString == result.evidence.quadrant
    assert observations["run"].valueQuantity.value == result.evidence.n_slices
    assert [e.fullUrl for e in parsed.entry[1:]] == [r.reference for r in report.result]
    assert all(e.request.ifNoneExist.startswith(f"identifier={IDENTIFIER_SYSTEM}|") for e in parsed.entry)
    assert to_fhir(result) == to_fhir(result)  # one result, one bundle
    broken = {**bundle, "entry": [{**bundle["entry"][0], "resource": {"resourceType": "DiagnosticReport"}}]}
    with pytest.raises(ValueError, match="refused by the R4 models"):
        validate_bundle(broken)
