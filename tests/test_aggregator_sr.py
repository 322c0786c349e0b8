"""The case result as DICOM SR (TID 1500): built with highdicom, written, read back and checked."""

from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from aggregator.case import SliceInput, decide
from aggregator.sr import COVID19, to_sr
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
    assert evaluation.name.value == COVID19[0]
    return evaluation.value.meaning


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
