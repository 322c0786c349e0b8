"""The case result as DICOM SR (TID 1500): built with highdicom, written, read back and checked."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from aggregator.case import SliceInput, decide
from aggregator.sr import SUSPECTED_COVID19, to_sr
from tests.gateway_dicom_factory import ct_dataset

highdicom = pytest.importorskip("highdicom")

VA = np.array([100, 100, 400, 400], np.float32)
LESION = np.array([[150, 150, 170, 170, 0.9]], np.float32)


def _series(n: int = 6, lesion_slices=(1, 2, 3)):
    study, series = generate_uid(), generate_uid()
    hu = np.full((16, 16), -1000, np.int16)
    headers = []
    for k in range(n):
        ds = ct_dataset(hu, position=(0.0, 0.0, 2.5 * k), study_uid=study, series_uid=series, signed=True)
        ds.Rows, ds.Columns = 512, 512  # headers only: the SR needs no pixels
        del ds.PixelData
        headers.append(ds)
    inputs = [SliceInput(str(ds.SOPInstanceUID), 2.5 * k, LESION if k in lesion_slices else np.zeros((0, 5)), VA,
                         rows=512, cols=512) for k, ds in enumerate(headers)]
    result = decide(inputs).to_result(study_instance_uid=study, series_instance_uid=series, job_id="job-1")
    return result, headers


def _read_back(sr):
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return highdicom.sr.Comprehensive3DSR.from_dataset(dcmread(io.BytesIO(buf.getvalue())))


def _verdict(sr) -> str:
    group = sr.content.get_image_measurement_groups()[0]
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name.value == SUSPECTED_COVID19[0]
    return evaluation.value.meaning



def test_the_sr_states_the_same_suspected_concept_as_the_fhir_report():
    """The SR stated the disorder (SCT 840539006 "COVID-19") = Present, a diagnosis to coded consumers, while the FHIR
    report of the same reading deliberately says 840544004 "Suspected disease caused by SARS-CoV-2": a screening
    result is no diagnosis. Both say 840544004 now, as finding type and as the evaluated concept."""
    from aggregator.fhir import to_fhir

    result, headers = _series()
    group = _read_back(to_sr(result, headers)).content.get_image_measurement_groups()[0]
    finding = group.finding_type
    (evaluation,) = group.get_qualitative_evaluations()
    report = next(e["resource"] for e in to_fhir(result)["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    (coding,) = report["conclusionCode"][0]["coding"]
    assert (finding.value, finding.scheme_designator) == ("840544004", "SCT") == (coding["code"], "SCT")
    assert evaluation.name.value == "840544004" and evaluation.value.meaning == "Present"
    assert len(evaluation.name.meaning) <= 64  # LO

def test_positive_case_encodes_verdict_and_evidence_boxes():
    result, headers = _series()
    assert result.verdict == "positive"
    sr = _read_back(to_sr(result, headers))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == result.study_instance_uid
    assert _verdict(sr) == "Present"
    rois = sr.content.get_planar_roi_measurement_groups()
    assert len(rois) == 3
    region = rois[0].roi
    assert region.value.tolist() == [[150, 150], [171, 150], [171, 171], [150, 171], [150, 150]]
    refs = [r.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in rois]
    assert refs == [s.sop_instance_uid for s in result.evidence.slices]
    (prob,) = rois[0].get_measurements()
    assert prob.value == pytest.approx(0.9)


def test_negative_case_and_all_boxes():
    result, headers = _series(lesion_slices=(1, 2))
    assert result.verdict == "negative"
    assert len(_read_back(to_sr(result, headers)).content.get_planar_roi_measurement_groups()) == 2
    assert _verdict(_read_back(to_sr(result, headers))) == "Absent"
    assert len(_read_back(to_sr(result, headers, boxes="all")).content.get_planar_roi_measurement_groups()) == 2


def test_uids_are_stable_for_one_result():
    result, headers = _series()
    a, b = to_sr(result, headers), to_sr(result, headers)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID


def test_bad_evidence_is_refused():
    result, headers = _series()
    with pytest.raises(ValueError, match='"evidence"'):
        to_sr(result, [])
    other, other_headers = _series()
    with pytest.raises(ValueError, match="must belong to study"):
        to_sr(result, other_headers)
    with pytest.raises(ValueError, match='"boxes"'):
        to_sr(result, headers, boxes="some")


@pytest.mark.parametrize(("charset", "expected"), [("", None), ("ISO 2022 IR 100", "ISO_IR 100"),
                                                    ("ISO 2022 IR 6", None), ("ISO_IR 100", "ISO_IR 100")])
def test_character_sets_scanners_write_do_not_block_the_sr(charset, expected):
    """An empty Specific Character Set, or a lone ISO 2022 term, made highdicom refuse the SR (real files
    in dicom-edge-cases do both): the SR is made with the equivalent plain term, the name kept."""
    result, headers = _series()
    for ds in headers:
        ds.SpecificCharacterSet = charset
        ds.PatientName = "Müller^Hans"
    sr = to_sr(result, headers)
    assert sr.get("SpecificCharacterSet") == expected
    assert str(_read_back(sr).PatientName) == "Müller^Hans"
    assert all(ds.SpecificCharacterSet == charset for ds in headers)  # the caller's data sets are left as they were


@pytest.mark.parametrize(("charset", "name", "expected"), [
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "ISO_IR 192"),  # as Japanese scanners
    (["", "ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎", "ISO_IR 192"),
    (["ISO 2022 IR 6", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "ISO_IR 192"),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=홍^길동", "ISO_IR 192"),  # Korean: no set highdicom writes
    (["ISO 2022 IR 6", "ISO 2022 IR 149"], "Hong^Gildong=홍^길동", "ISO_IR 192"),
])
def test_code_extensions_scanners_write_do_not_block_the_sr(charset, name, expected, tmp_path):
    """An empty first value (the default repertoire), or a set highdicom does not know, made every SR, key
    image and KOS of the study fail for good: only its FHIR report reached anyone. Then ``\\ISO 2022 IR 87``
    was written ``ISO 2022 IR 6\\ISO 2022 IR 87``, whose names Orthanc 1.10 shows as raw escape sequences: code
    extensions are written in UTF-8, which pydicom and dcmtk's dcmdump read back as the name."""
    result, headers = _series()
    for ds in headers:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
    sr = to_sr(result, headers)
    assert sr.SpecificCharacterSet == expected
    assert str(_read_back(sr).PatientName) == name
    if shutil.which("dcmdump"):
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        dump = subprocess.run(["dcmdump", "+U8", str(path)], capture_output=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        assert f"[{name}]".encode() in dump.stdout, [ln for ln in dump.stdout.splitlines() if b"(0010,0010)" in ln]
    assert all(ds.SpecificCharacterSet == charset for ds in headers)  # the caller's data sets are left as they were


# --- Image Library (TID 1600) ----------------------------------------------------------------------------
IMAGE_LIBRARY, IMAGE_LIBRARY_GROUP = "111028", "126200"
TILTED = ["1", "0", "0", "0", "0.996195", "-0.087156"]  # a 5 degree gantry tilt


def _descriptors(items) -> dict[str, object]:
    """Descriptor meaning -> value (a code's value, a UID, a number) of Image Library content items."""
    out: dict[str, object] = {}
    for item in items:
        assert item.RelationshipType == "HAS ACQ CONTEXT"
        value = {"CODE": lambda i: i.ConceptCodeSequence[0].CodeValue, "UIDREF": lambda i: i.UID,
                 "NUM": lambda i: float(i.MeasuredValueSequence[0].NumericValue)}[item.ValueType](item)
        out[item.ConceptNameCodeSequence[0].CodeMeaning] = value
    return out


def _library(sr) -> tuple[list[dict[str, object]], dict[str, dict[str, object]]]:
    """The Image Library of ``sr``: each group's own descriptors, and each entry's by SOP Instance UID (in order)."""
    items = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == IMAGE_LIBRARY]
    if not items:
        return [], {}
    (library,) = items
    groups, entries = [], {}
    for group in library.ContentSequence:
        assert group.ConceptNameCodeSequence[0].CodeValue == IMAGE_LIBRARY_GROUP
        images = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
        groups.append(_descriptors(i for i in group.ContentSequence if i.ValueType != "IMAGE"))
        for image in images:
            uid = image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            assert uid not in entries  # one entry per image
            entries[uid] = _descriptors(image.ContentSequence)
    return groups, entries


def _stated(ds) -> dict[str, object]:
    """The descriptors an entry should carry: the source header's own values."""
    row, column = (float(v) for v in ds.PixelSpacing)
    position, orientation = ds.ImagePositionPatient, ds.ImageOrientationPatient
    return {"Modality": ds.Modality, "Frame of Reference UID": ds.FrameOfReferenceUID,
            "Pixel Data Rows": float(ds.Rows), "Pixel Data Columns": float(ds.Columns),
            "Horizontal Pixel Spacing": column, "Vertical Pixel Spacing": row,
            "Spacing between slices": float(ds.SpacingBetweenSlices), "Slice Thickness": float(ds.SliceThickness),
            **{f"Image Position (Patient) {a}": float(position[i]) for i, a in enumerate("XYZ")},
            **{f"Image Orientation (Patient) {d} {a}": float(orientation[3 * j + i])
               for j, d in enumerate(("Row", "Column")) for i, a in enumerate("XYZ")}}


@pytest.mark.parametrize(("boxes", "listed"), [("evidence", [1, 2, 3]), ("all", [1, 2, 3, 6])])
def test_image_library_lists_each_referenced_image_once_with_its_own_header_values(boxes, listed):
    """TID 1500 / IHE AIR: a viewer places the regions from the library without fetching the images. It lists
    the images the report references (the run's, and those of the regions: slice 6 holds a box outside the
    run), not the whole series, each once, with the values its own header states (anisotropic pixels, a
    tilted gantry and per-slice positions, so a swapped or shared value shows)."""
    result, headers = _series(8, lesion_slices=(1, 2, 3, 6))
    frame_of_reference = generate_uid()
    for k, ds in enumerate(headers):
        ds.FrameOfReferenceUID, ds.PixelSpacing, ds.SpacingBetweenSlices = frame_of_reference, ["0.6", "0.8"], "2.5"
        ds.SliceThickness, ds.ImageOrientationPatient = "1.25", TILTED
        ds.ImagePositionPatient = [f"{-180.5 + k}", f"{-170.25 - k}", f"{2.5 * k}"]
    assert result.verdict == "positive" and [s.index for s in result.evidence.slices] == [1, 2, 3]
    sr = _read_back(to_sr(result, headers, boxes=boxes))
    groups, entries = _library(sr)
    assert list(entries) == [str(headers[k].SOPInstanceUID) for k in listed]
    assert groups == [{"Modality": "CT", "Frame of Reference UID": frame_of_reference}]
    for k in listed:
        assert entries[str(headers[k].SOPInstanceUID)] == _stated(headers[k]), k
    rois = {r.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for r in sr.content.get_planar_roi_measurement_groups()}
    assert rois <= set(entries)  # every region's image is in the library


def test_image_library_carries_only_what_the_headers_state(caplog):
    """Headers without geometry (as the API makes an SR from a result an earlier release stored: SOP class and
    instance, Rows, Columns, the study's Modality, gateway.report.SrContext): the entries carry modality, rows
    and columns, nothing made up, and the log names what was left out; an empty Type 2 Slice Thickness is no
    value either. A series that is no chest references no image: no library."""
    result, headers = _series()
    for ds in headers:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            delattr(ds, keyword)
        ds.SliceThickness = ""
    caplog.set_level(logging.INFO, logger="aggregator.sr")
    sr = _read_back(to_sr(result, headers))
    groups, entries = _library(sr)
    assert groups == [{"Modality": "CT"}]
    assert list(entries) == [s.sop_instance_uid for s in result.evidence.slices]
    assert all(e == {"Modality": "CT", "Pixel Data Rows": 512.0, "Pixel Data Columns": 512.0} for e in entries.values())
    (line,) = [r.getMessage() for r in caplog.records if "image library" in r.getMessage()]
    assert all(f"{k} (3 of 3 images)" in line for k in ("FrameOfReferenceUID", "ImagePositionPatient",
                                                         "ImageOrientationPatient", "PixelSpacing", "SliceThickness"))
    head = result.model_copy(update={"verdict": "indeterminate", "reason": "not_chest"})
    assert IMAGE_LIBRARY not in {i.ConceptNameCodeSequence[0].CodeValue for i in to_sr(head, headers).ContentSequence}


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
                                       "1.2.840.10008.5.1.4.1.1.2.2"])  # CT, Enhanced CT, Legacy Converted
def test_sr_header_keywords_name_every_attribute_the_sr_reads_of_its_sources(monkeypatch, sop_class):
    """What a header needs to make the same SR (``gateway.report`` keeps no more of the first slice's): every
    attribute ``to_sr`` and highdicom read of the sources, as they read them (each lookup noted, whether the
    attribute is there or not), is in SR_HEADER_KEYWORDS. A later highdicom that copies more fails here."""
    from pydicom.datadict import keyword_for_tag, tag_for_keyword
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag

    import aggregator.sr as sr_module
    from aggregator.sr import SR_HEADER_KEYWORDS

    seen: set[str] = set()

    def note(key) -> None:
        if isinstance(key, str):
            if tag_for_keyword(key) is not None:
                seen.add(key)
        elif not isinstance(key, slice):
            seen.add(keyword_for_tag(Tag(key)) or str(Tag(key)))

    class Noting(Dataset):
        """A header that notes each attribute looked up in it; walking it whole is noted as "*"."""

        def __getattr__(self, name):
            note(name)
            return super().__getattr__(name)

        def __getitem__(self, key):
            note(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            note(key)
            return super().get(key, default)

        def get_item(self, key, *, keep_deferred=False):
            note(key)
            return super().get_item(key, keep_deferred=keep_deferred)

        def __contains__(self, key):
            note(key)
            return super().__contains__(key)

        def __iter__(self):
            seen.add("*")
            return super().__iter__()

        def keys(self):
            seen.add("*")
            return super().keys()

    result, headers = _series()
    for ds in headers:
        ds.SOPClassUID = sop_class
        ds.Manufacturer = "ACME"  # highdicom reads the rest of the acquisition equipment only then
    usable = sr_module.usable_headers
    monkeypatch.setattr(sr_module, "usable_headers", lambda datasets: [Noting(ds) for ds in usable(datasets)])
    to_sr(result, headers)
    assert "*" not in seen  # highdicom reads attributes by name, none by walking a header
    assert {"PatientName", "OtherPatientIDsSequence", "StudyDescription", "InstitutionAddress", "StationName",
            "ImagePositionPatient"} <= seen  # the noting works: the modules, the equipment, the library
    assert seen - set(SR_HEADER_KEYWORDS) == set()
