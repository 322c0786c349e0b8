"""STOW-RS instance headers: the hard encodings the decoder reads are readable by STOW too."""

from pathlib import Path

import pytest

from gateway.errors import NotDicom
from gateway.stow import CT_STORAGE, read_header

EDGE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom-edge-cases"


def test_big_endian_undefined_length_instance_header_is_read():
    files = sorted((EDGE / "fo-dicom").glob("*BigEndian*")) if EDGE.is_dir() else []
    if not files:
        pytest.skip(f"edge-case corpus not found at {EDGE}")
    header = read_header(files[0].read_bytes(), files[0].name)
    assert header.sop_class_uid in CT_STORAGE
    assert header.study_instance_uid.startswith("1.3.6.1.4.1.5962")


def test_garbage_is_not_dicom_with_a_reason():
    with pytest.raises(NotDicom) as info:
        read_header(b"%PDF-1.7 not a DICOM instance" * 8, "report.pdf")
    assert info.value.reason == "not_dicom"
