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


@pytest.mark.parametrize(("keyword", "vr"), [("SOPClassUID", "FL"), ("StudyInstanceUID", "SL")])
def test_a_uid_whose_bytes_do_not_fit_its_vr_is_not_dicom_naming_it(keyword, vr):
    """The HTTP fuzz campaign's STOW-RS instance whose SOP Class UID was rewritten as FL (26 bytes): pydicom's
    BytesLengthException, raised by the fallback reader's conversion, answered 503 internal_error with a traceback
    in the log (C-STORE: 0x0110 processing failure), for an instance the sender can only fix."""
    import struct

    import pydicom

    from tests.gateway_dicom_factory import chest_like, ct_dataset, to_bytes

    ds = ct_dataset(chest_like(16, 16), study_uid="1.2.3.456")  # 10 bytes written, as the SOP Class UID's 26
    tag = pydicom.datadict.tag_for_keyword(keyword)
    element = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"UI"
    raw = to_bytes(ds)
    assert raw.count(element) == 1
    with pytest.raises(NotDicom, match=rf"\({tag >> 16:04X},{tag & 0xFFFF:04X}\) cannot be read \(\d+ bytes of VR {vr}\)"):
        read_header(raw.replace(element, element[:4] + vr.encode()), "flipped.dcm")
