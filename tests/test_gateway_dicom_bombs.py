"""Hostile DICOM on the ingest path: decompression bombs and Pixel Padding Value.

1. Compressed frames whose own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ) declares another matrix
   than Rows x Columns are refused before any codec sees them: a codec allocates what the codestream
   declares, and the matrix limits read Rows and Columns only. RLE segments too large for Rows x
   Columns likewise (pydicom's fallback RLE decoder expands a segment whole before checking it).
2. A Deflated Explicit VR Little Endian data set inflates with bounds, for uploads (``read_dataset``) and
   STOW-RS / C-STORE (``stow.read_header``) alike.
3. Pixels stored as Pixel Padding Value (0028,0120), or within Pixel Padding Range Limit (0028,0121), are
   air, not tissue, and are left out of the plausibility checks.

The bombs are small: each test shows the refusal (its reason, and that no decoder ran, or a generous
memory bound) without the old code path allocating more than tens of MiB.
"""

from __future__ import annotations

import io
import logging
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

import gateway.dicom as gdicom
from gateway.dicom import PAD_HU, decode_file, read_dataset
from gateway.errors import GatewayError, NotDicom, TooLarge, Undecodable, ZipBomb
from gateway.ingest import load_study
from gateway.stow import read_header
from tests.gateway_dicom_factory import chest_like, ct_dataset, enhanced_ct, make_series, to_bytes

EDGE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom-edge-cases"
MiB = 1024 * 1024


@pytest.fixture
def decoder_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Transfer syntaxes pydicom's decoders were asked to decode (every decode path goes through
    ``Decoder.as_array``)."""
    calls: list[str] = []
    original = Decoder.as_array

    def spy(self: Decoder, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(self.UID))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "as_array", spy)
    return calls


def _save(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _with_frames(data: bytes, frames: list[bytes], transfer_syntax: str | None = None) -> bytes:
    """``data`` with its Pixel Data replaced by ``frames`` (encapsulated, one fragment each)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(transfer_syntax)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.NumberOfFrames = len(frames)
    if len(frames) == 1:
        del ds.NumberOfFrames
    return _save(ds)


def _j2k_slice(rows: int = 64, cols: int = 64) -> tuple[bytes, bytes]:
    """A real lossless JPEG 2000 CT slice and its codestream."""
    data = to_bytes(ct_dataset(chest_like(rows, cols)), JPEG2000Lossless)
    frame = next(generate_frames(pydicom.dcmread(io.BytesIO(data)).PixelData, number_of_frames=1))
    return data, frame


def _forged_siz(codestream: bytes, rows: int, cols: int) -> bytes:
    out = bytearray(codestream)
    struct.pack_into(">II", out, 8, cols, rows)  # Xsiz, Ysiz (XOsiz = YOsiz = 0)
    return bytes(out)


# --------------------------------------------------------------------------------------------
# 1. codestream headers
# --------------------------------------------------------------------------------------------
def test_codestream_header_reads_each_family() -> None:
    _, j2k = _j2k_slice(64, 48)
    assert gdicom.codestream_header(j2k) == gdicom.CodestreamHeader("JPEG 2000", 64, 48, 1)
    jp2 = (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + struct.pack(">I4s", 20, b"ftyp") + b"jp2 \x00\x00\x00\x00jp2 "
           + struct.pack(">I4s", 8 + len(j2k), b"jp2c") + j2k)
    assert gdicom.codestream_header(jp2) == gdicom.CodestreamHeader("JPEG 2000", 64, 48, 1)
    # APP0 segment, fill bytes, DQT-like segment, then SOF3 / SOF55
    app = b"\xff\xe0\x00\x06JFIF" + b"\xff\xff"
    sof3 = b"\xff\xd8" + app + b"\xff\xc3\x00\x0b\x10" + struct.pack(">HH", 512, 256) + b"\x01\x01\x11\x00"
    assert gdicom.codestream_header(sof3) == gdicom.CodestreamHeader("JPEG", 512, 256, 1)
    sof55 = b"\xff\xd8\xff\xf7\x00\x0b\x10" + struct.pack(">HH", 300, 200) + b"\x03\x01\x11\x00"
    assert gdicom.codestream_header(sof55) == gdicom.CodestreamHeader("JPEG-LS", 300, 200, 3)
    for partial in (b"", b"\xff\xd8", sof3[:-6], j2k[:30], b"\xff\xd8\xff\xda\x00\x02", bytes(64)):
        assert gdicom.codestream_header(partial) is None


@pytest.mark.parametrize(("rows", "cols"), [(4096, 4096), (64, 65535), (32, 32)])
def test_a_forged_j2k_siz_is_refused_before_decoding(rows: int, cols: int, decoder_calls: list[str]) -> None:
    """The reviewer's bomb, small: a 64 x 64 slice whose SIZ marker says another size (larger: a bomb;
    smaller: a corrupt file) is refused naming both sizes, and no decoder runs."""
    data, codestream = _j2k_slice()
    assert [s.hu.shape for s in decode_file("good.dcm", data)] == [(512, 512)]  # the control decodes
    decoder_calls.clear()
    bomb = _with_frames(data, [_forged_siz(codestream, rows, cols)])
    with pytest.raises(Undecodable) as info:
        decode_file("bomb.dcm", bomb)
    assert info.value.reason == "undecodable"
    assert f"declares {rows}x{cols} pixels" in info.value.message and "64x64" in info.value.message
    assert decoder_calls == []


@pytest.mark.parametrize(
    ("syntax", "marker", "rows", "cols", "components"),
    [
        (JPEGLosslessSV1, 0xC3, 4096, 4096, 1),  # lossless SOF3, the usual CT syntax
        (JPEGLosslessSV1, 0xC1, 4096, 64, 1),  # extended SOF1 in the wrong syntax: still its size
        (JPEGLSLossless, 0xF7, 4096, 4096, 1),  # SOF55
        (JPEGLSLossless, 0xF7, 64, 64, 200),  # right size, 200 components: 200 frames' worth
    ],
)
def test_a_forged_jpeg_frame_header_is_refused_before_decoding(
    syntax: str, marker: int, rows: int, cols: int, components: int, decoder_calls: list[str]
) -> None:
    data = to_bytes(ct_dataset(chest_like(64, 64)))
    sof = bytes([0xFF, marker]) + struct.pack(">HBHHB", 8 + 3 * components, 16, rows, cols, components)
    sof += b"\x01\x11\x00" * components
    frame = b"\xff\xd8" + b"\xff\xe0\x00\x04\x00\x00" + sof + b"\xff\xda\x00\x08\x01\x01\x00\x01\x00\x00" + bytes(64)
    with pytest.raises(Undecodable) as info:
        decode_file("bomb.dcm", _with_frames(data, [frame], syntax))
    assert f"declares {rows}x{cols} pixels and {components} component{'' if components == 1 else 's'}" in info.value.message
    assert "64x64" in info.value.message
    assert decoder_calls == []


def test_a_frame_without_a_frame_header_is_refused(decoder_calls: list[str]) -> None:
    data = to_bytes(ct_dataset(chest_like(64, 64)))
    for frame in (b"\xff\xd8\xff\xda\x00\x02" + bytes(100), b"GIF89a" + bytes(100)):
        with pytest.raises(Undecodable, match="no JPEG, JPEG-LS or JPEG 2000 frame header"):
            decode_file("junk.dcm", _with_frames(data, [frame], JPEGLosslessSV1))
    assert decoder_calls == []


def test_every_frame_of_a_multi_frame_object_is_checked(decoder_calls: list[str]) -> None:
    """Enhanced / multi-frame objects: the forged frame need not be the first."""
    data, codestream = _j2k_slice()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.EnhancedCTImageStorage
    good = _save(ds)
    two = _with_frames(good, [codestream, codestream])
    assert len(decode_file("two.dcm", two)) == 2  # the control decodes
    decoder_calls.clear()
    with pytest.raises(Undecodable) as info:
        decode_file("bomb.dcm", _with_frames(good, [codestream, _forged_siz(codestream, 4096, 4096)]))
    assert info.value.message.startswith("Frame 2 of 2's JPEG 2000 codestream declares 4096x4096")
    assert decoder_calls == []


def test_a_forged_frame_is_refused_in_a_study_and_the_rest_screened(decoder_calls: list[str]) -> None:
    series = make_series(3, transfer_syntax=JPEG2000Lossless)
    name, data, _, _ = series[1]
    codestream = next(generate_frames(pydicom.dcmread(io.BytesIO(data)).PixelData, number_of_frames=1))
    sources = [(n, d) for n, d, _, _ in series]
    sources[1] = (name, _with_frames(data, [_forged_siz(codestream, 4096, 4096)]))
    study = load_study(sources, workers=1)
    assert study.n_slices == 2
    assert [(r.filename, r.reason) for r in study.rejected] == [(name, "undecodable")]
    assert "declares 4096x4096" in study.rejected[0].message
    assert len(decoder_calls) == 2  # the two good slices


@pytest.mark.parametrize(
    ("rel", "marker"),
    [("dwv/nema-ct1_jpll.dcm", b"\xff\xc3"), ("pylibjpeg-data/CT1_JLSN.dcm", b"\xff\xf7")],
)
def test_real_jpeg_and_jpeg_ls_files_with_a_forged_frame_header(rel: str, marker: bytes,
                                                                decoder_calls: list[str]) -> None:
    """The reviewer's jpegbomb.py on real files: SOF3 (JPEG lossless) and SOF55 (JPEG-LS)."""
    path = EDGE / rel
    if not path.is_file():
        pytest.skip(f"edge-case corpus file {rel} not present under {EDGE} (shared data not mounted)")
    ds = pydicom.dcmread(path)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    at = frame.find(marker)
    struct.pack_into(">HH", frame, at + 5, 4096, 4096)
    ds.PixelData = encapsulate([bytes(frame)])
    with pytest.raises(Undecodable, match="codestream declares 4096x4096 pixels"):
        decode_file("bomb.dcm", _save(ds))
    assert decoder_calls == []


def _rle_frame(segments: list[bytes]) -> bytes:
    header = struct.pack("<I", len(segments))
    offset = 64
    for seg in segments:
        header += struct.pack("<I", offset)
        offset += len(seg)
    return header.ljust(64, b"\0") + b"".join(segments)


def test_rle_still_decodes_and_an_oversized_segment_is_refused_before_decoding(decoder_calls: list[str]) -> None:
    """pylibjpeg-rle writes into a Rows x Columns buffer, but when it fails (here: the first segment is
    short) pydicom falls back to its own RLE decoder, which expands the next segment whole (64x its size:
    16 MiB from this 256 KiB one) before comparing. Such a segment is refused before decoding."""
    hu = chest_like(64, 64)
    data = to_bytes(ct_dataset(hu), RLELossless)
    np.testing.assert_array_equal(gdicom.decode_hu(*gdicom.read_headers("rle.dcm", data))[0], hu)
    decoder_calls.clear()
    bomb = _rle_frame([b"\x00\x07", b"\x81\x00" * (128 * 1024)])  # 1 literal byte; runs of 128 zeros
    tracemalloc.start()
    try:
        with pytest.raises(Undecodable) as info:
            decode_file("rle_bomb.dcm", _with_frames(data, [bomb]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "RLE segment 2" in info.value.message
    assert decoder_calls == []
    assert peak < 8 * MiB, peak
    with pytest.raises(Undecodable, match="declares 3 segment"):
        decode_file("rle3.dcm", _with_frames(data, [_rle_frame([b"\x00\x07"] * 3)]))


def test_a_frame_every_decoder_fails_on_logs_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A JPEG-LS frame with a marker segment of length 1 (the HTTP fuzz campaign's corrupt JPEG-LS slices): each of
    pydicom's plugins that failed on it was logged at ERROR with its traceback (pydicom's LOGGER.exception), two
    tracebacks in the gateway's log for a file it refuses with every plugin's words. A DEBUG line each now."""
    from gateway.phi import protect_logs

    protect_logs()
    data = to_bytes(ct_dataset(chest_like(64, 64)), JPEGLSLossless)
    frame = next(generate_frames(pydicom.dcmread(io.BytesIO(data)).PixelData, number_of_frames=1))
    at = frame.index(b"\xff\xda")  # start of scan: a bad LSE marker segment ahead of it
    with caplog.at_level(logging.DEBUG), pytest.raises(Undecodable, match="marker"):
        decode_file("lse.dcm", _with_frames(data, [frame[:at] + b"\xff\xf8\x00\x01" + frame[at:]]))
    failures = [r for r in caplog.records if r.name.startswith("pydicom.pixels")]
    assert failures and all(r.levelno == logging.DEBUG and not r.exc_info for r in failures), failures


@pytest.mark.parametrize("syntax", [None, RLELossless], ids=["native", "rle"])
def test_more_frames_than_the_pixel_data_can_hold_are_refused_with_the_header(syntax: str | None) -> None:
    """The fuzz campaign's 8 KiB slice saying Number of Frames 100000: read_headers described 100,000 frames (8 s of
    CPU in the upload's thread, for 16 KiB sent), then the decoder refused it. Refused now from the header: a native
    frame takes Rows x Columns x its bytes, an encapsulated one at least an item (8 bytes)."""
    data = to_bytes(ct_dataset(chest_like(64, 64)), syntax) if syntax else to_bytes(ct_dataset(chest_like(64, 64)))
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.NumberOfFrames = 20000
    with pytest.raises(NotDicom, match="20000 frames of 64x64 pixels .* Pixel Data holds"):
        gdicom.read_headers("frames.dcm", _save(ds))


def test_an_encapsulated_syntax_without_a_header_check_is_not_decoded(decoder_calls: list[str]) -> None:
    data = to_bytes(ct_dataset(chest_like(64, 64)))
    mpeg2 = "1.2.840.10008.1.2.4.100"
    with pytest.raises(Undecodable, match="not decoded here"):
        decode_file("mpeg2.dcm", _with_frames(data, [bytes(100)], mpeg2))
    assert decoder_calls == []


# --------------------------------------------------------------------------------------------
# 2. deflated data sets
# --------------------------------------------------------------------------------------------
def deflate_bomb(zero_mib: int, *, truncate: int = 0) -> bytes:
    """A Deflated Explicit VR Little Endian CT slice (64 x 64) holding a private OB element of
    ``zero_mib`` MiB of zeros: about 1 KiB of deflate stream per MiB. Built without holding the zeros."""
    ds = ct_dataset(chest_like(64, 64))
    ds.add_new(0x00090010, "LO", "BOMB")
    ds.add_new(0x00091010, "OB", b"")
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    raw = fp.getvalue()
    empty = bytes.fromhex("09001010") + b"OB\0\0" + bytes(4)
    at = raw.index(empty)
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [co.compress(raw[:at] + empty[:8] + (zero_mib * MiB).to_bytes(4, "little"))]
    zeros = bytes(MiB)
    parts += [co.compress(zeros) for _ in range(zero_mib)]
    parts += [co.compress(raw[at + len(empty):]), co.flush()]
    meta = DicomBytesIO()
    meta.write(b"\0" * 128 + b"DICM")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = b"".join(parts)
    return meta.getvalue() + body[: len(body) - truncate]


def _peak(fn: Callable[..., object], *args: object) -> tuple[GatewayError, int]:
    """``fn(*args)``'s exception and the peak of memory traced meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(GatewayError) as info:
            fn(*args)
        return info.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def small_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ratio-check from 1 MiB up (64 MiB in service), so that a 24 MiB bomb shows it."""
    monkeypatch.setattr(gdicom, "DEFLATE_RATIO_FLOOR", MiB, raising=False)


def test_an_honest_deflated_file_is_read_from_bytes_and_from_a_file(tmp_path: Path, small_floor: None) -> None:
    hu = chest_like(128, 128)
    data = to_bytes(ct_dataset(hu), DeflatedExplicitVRLittleEndian)
    path = tmp_path / "deflated.dcm"
    path.write_bytes(data)
    for source in (data, path):
        ds = read_dataset(source, "d.dcm")
        assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        np.testing.assert_array_equal(gdicom.decode_hu(*gdicom.read_headers("d.dcm", ds))[0], hu)
        assert read_header(source, "d.dcm").sop_class_uid == pydicom.uid.CTImageStorage
    study = load_study([("d.dcm", path)], workers=1)  # decoded after parsing, from the inflated copy
    assert study.n_slices == 1


def test_a_deflate_bomb_is_refused_for_uploads(small_floor: None) -> None:
    bomb = deflate_bomb(24)
    assert len(bomb) < 64 * 1024
    error, peak = _peak(read_dataset, bomb, "bomb.dcm")
    assert isinstance(error, ZipBomb) and error.reason == "zip_bomb", error
    assert "Deflated data set expands more than" in error.message
    assert peak < 12 * MiB, peak  # stopped at the 1 MiB floor (the old path held 24 MiB, twice)


def test_a_deflate_bomb_is_refused_for_stow_and_c_store(tmp_path: Path, small_floor: None) -> None:
    """STOW-RS and C-STORE read the three UIDs with stow.read_header, whose callers answer "cannot
    understand" to any invalid input and count it by its reason: the bomb is a ZipBomb there too."""
    path = tmp_path / "bomb.dcm"
    path.write_bytes(deflate_bomb(24))
    for source in (path.read_bytes(), path):
        error, peak = _peak(read_header, source, "bomb.dcm")
        assert isinstance(error, ZipBomb) and error.reason == "zip_bomb", error
        assert "expands more than" in error.message
        assert peak < 12 * MiB, peak


def test_a_deflate_bomb_sent_by_stow_rs_is_cannot_understand_counted_as_a_zip_bomb(small_floor: None) -> None:
    from fastapi.testclient import TestClient

    from gateway.main import create_app
    from gateway.settings import Settings
    from tests.gateway_app_fakes import FakeFleet

    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + deflate_bomb(24)
            + f"\r\n--{boundary}--\r\n".encode())
    app = create_app(Settings(triton_urls="fake:1", stow_quiet_period_s=3600, shutdown_grace_s=1),
                     client_factory=FakeFleet())
    with TestClient(app) as client:
        r = client.post("/dicomweb/studies", content=body,
                        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        metrics = client.get("/metrics").text
    assert r.status_code == 409, r.text  # nothing stored: every instance failed
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]  # cannot understand
    assert 'ctscreen_errors_total{reason="zip_bomb"} 1.0' in metrics


def test_the_absolute_inflation_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gdicom, "MAX_INFLATED_BYTES", 4 * MiB, raising=False)
    monkeypatch.setattr(gdicom, "DEFLATE_RATIO_FLOOR", 64 * MiB, raising=False)
    error, _ = _peak(read_dataset, deflate_bomb(8), "big.dcm")
    assert isinstance(error, TooLarge) and error.reason == "too_large", error
    assert read_dataset(deflate_bomb(2), "fits.dcm").file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian


def test_a_truncated_deflate_stream_is_not_dicom() -> None:
    with pytest.raises(NotDicom):
        read_dataset(deflate_bomb(1, truncate=200), "cut.dcm")


# --------------------------------------------------------------------------------------------
# 3. Pixel Padding Value
# --------------------------------------------------------------------------------------------
N = 64


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    """A chest-like slice in HU and the mask of the corners outside a circular field of view (28 %)."""
    y, x = np.mgrid[:N, :N]
    outside = np.hypot(x - N / 2 + 0.5, y - N / 2 + 0.5) >= 0.48 * N
    return chest_like(N, N), outside


def _padded(stored: np.ndarray, *, signed: bool, bits: int = 16, intercept: float = -1024.0,
            **elements: object) -> pydicom.Dataset:
    ds = ct_dataset(np.zeros((N, N), np.int16), signed=signed, intercept=intercept)
    ds.BitsStored, ds.HighBit = bits, bits - 1
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    return ds


@pytest.mark.parametrize("bits", [16, 12])
def test_unsigned_padding_outside_the_stored_bits_is_air(bits: int) -> None:
    """The reviewer's t_padding.py: unsigned pixels, intercept -1024, padding 63536 (GE's -2000 as 16
    bits). Bits Stored 16: refused as "28% above 4000 HU"; 12: the padding read +1072 HU, a bone ring."""
    hu, outside = _phantom()
    stored = (hu.astype(np.int64) + 1024).astype(np.uint16)
    stored[outside] = 63536
    data = to_bytes(_padded(stored, signed=False, bits=bits, PixelPaddingValue=63536))
    got = decode_file("pad.dcm", data)[0]
    native = gdicom.decode_hu(*gdicom.read_headers("pad.dcm", data))[0]
    assert np.all(native[outside] == PAD_HU)
    np.testing.assert_array_equal(native[~outside], hu[~outside])
    assert got.hu[0, 0] == PAD_HU and got.hu.max() < 1500


def test_a_stored_value_equal_to_the_masked_padding_is_still_tissue() -> None:
    """Bits Stored 12: 63536 masks to 2096 (+1072 HU, bone). Padding is matched on the raw stored value,
    so bone stored as 2096 stays bone."""
    hu, outside = _phantom()
    stored = (hu.astype(np.int64) + 1024).astype(np.uint16)
    stored[outside] = 63536
    stored[30:34, 30:34] = 2096
    ds = _padded(stored, signed=False, bits=12, PixelPaddingValue=63536)
    native = gdicom.decode_hu(*gdicom.read_headers("bone.dcm", to_bytes(ds)))[0]
    assert np.all(native[30:34, 30:34] == 1072) and np.all(native[outside] == PAD_HU)


def test_signed_ge_padding_is_air_not_minus_3024() -> None:
    hu, outside = _phantom()
    stored = hu.astype(np.int16) + 1024
    stored[outside] = -2000
    ds = _padded(stored, signed=True, PixelPaddingValue=-2000)
    data = to_bytes(ds)
    assert pydicom.dcmread(io.BytesIO(data))["PixelPaddingValue"].VR == "SS"
    native = gdicom.decode_hu(*gdicom.read_headers("ge.dcm", data))[0]
    assert np.all(native[outside] == PAD_HU)
    np.testing.assert_array_equal(native[~outside], hu[~outside])


def test_padding_written_with_the_other_vr_and_a_padding_range() -> None:
    """Pixel Representation 0 with the padding written as SS -2000 (the same 16 bits as 63536); and a
    range: Pixel Padding Value .. Pixel Padding Range Limit, in either order, inclusive."""
    hu, outside = _phantom()
    stored = (hu.astype(np.int64) + 1024).astype(np.uint16)
    stored[outside] = 63536
    ds = _padded(stored, signed=False)
    ds.add_new(0x00280120, "SS", -2000)
    native = gdicom.decode_hu(*gdicom.read_headers("ss.dcm", to_bytes(ds)))[0]
    assert np.all(native[outside] == PAD_HU)

    signed = hu.astype(np.int16) + 1024
    rng = np.random.default_rng(1)
    signed[outside] = rng.integers(-3000, -1999, size=int(outside.sum()))
    for value, limit in ((-3000, -2000), (-2000, -3000)):
        ds = _padded(signed, signed=True, PixelPaddingValue=value, PixelPaddingRangeLimit=limit)
        native = gdicom.decode_hu(*gdicom.read_headers("range.dcm", to_bytes(ds)))[0]
        assert np.all(native[outside] == PAD_HU), (value, limit)
        np.testing.assert_array_equal(native[~outside], hu[~outside])


def test_padding_in_every_frame_of_an_enhanced_ct() -> None:
    hu, outside = _phantom()
    data = enhanced_ct([hu, hu], [(1.0, -1024.0), (2.0, -1024.0)], [0.0, 1.0])
    ds = pydicom.dcmread(io.BytesIO(data))
    frames = np.frombuffer(ds.PixelData, "<u2").reshape(2, N, N).copy()
    frames[:, outside] = 63536
    ds.PixelData = frames.tobytes()
    ds.add_new(0x00280120, "US", 63536)  # Pixel Padding Value
    native = gdicom.decode_hu(*gdicom.read_headers("enh.dcm", _save(ds)))
    for frame in native:
        assert np.all(frame[outside] == PAD_HU)
        assert np.abs(frame[~outside].astype(np.int32) - hu[~outside]).max() <= 1  # slope 2 rounds


@pytest.mark.parametrize("items", [1, 3])
def test_an_enhanced_ct_with_a_per_frame_item_short_or_over_is_refused(items: int) -> None:
    """Frames past the sequence's end took the first frame's position and rescale: three frames at one
    place, screened as a stack."""
    hu, _ = _phantom()
    ds = pydicom.dcmread(io.BytesIO(enhanced_ct([hu, hu], [(1.0, -1024.0)] * 2, [0.0, 1.0])))
    per = ds.PerFrameFunctionalGroupsSequence
    ds.PerFrameFunctionalGroupsSequence = pydicom.sequence.Sequence(list(per)[:items] + list(per)[:max(0, items - 2)])
    with pytest.raises(NotDicom, match=f"has {items} item.* for 2 frame"):
        gdicom.read_headers("short.dcm", _save(ds))


def test_padding_in_compressed_pixels_is_matched_before_the_unused_bits_are_cleared() -> None:
    """RLE (decoded by pydicom's plugins): Bits Stored 12, padding 63536 kept in the 16 bits."""
    hu, outside = _phantom()
    stored = (hu.astype(np.int64) + 1024).astype(np.uint16)
    stored[outside] = 63536
    ds = _padded(stored, signed=False)
    ds.compress(RLELossless)
    ds.BitsStored, ds.HighBit, ds.PixelPaddingValue = 12, 11, 63536
    native = gdicom.decode_hu(*gdicom.read_headers("rle.dcm", _save(ds)))[0]
    assert np.all(native[outside] == PAD_HU)
    np.testing.assert_array_equal(native[~outside], hu[~outside])


def test_padding_through_ingest_from_files(tmp_path: Path) -> None:
    """load_study from files (the path STOW-RS and C-STORE studies take): padded slices are screened."""
    hu, outside = _phantom()
    sources = []
    for name, data, _, _ in make_series(3, rows=N, cols=N):
        ds = pydicom.dcmread(io.BytesIO(data))
        stored = (hu.astype(np.int64) + 1024).astype(np.uint16)
        stored[outside] = 63536
        ds.PixelData = stored.tobytes()
        ds.add_new(0x00280120, "US", 63536)  # Pixel Padding Value
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        sources.append((name, path))
    study = load_study(sources, workers=1)
    assert study.n_slices == 3 and study.rejected == []
    assert all(int(study.hu[i][0, 0]) == PAD_HU for i in range(3))


@pytest.mark.parametrize(("tag", "vr"), [(0x00280120, "SL"), (0x00280121, "SL"), (0x00280100, "SL"),
                                         (0x00280103, "FD"), (0x00280120, "FS")])
def test_a_pixel_element_whose_bytes_do_not_fit_its_vr_refuses_that_file_only(tag: int, vr: str) -> None:
    """The fuzz campaign's VR flips of real files: (0028,0120) Pixel Padding Value as SL holding 2 bytes, Bits
    Allocated as SL, Pixel Representation as FD, a VR that does not exist. pydicom converts an element when it is
    first read; these were first read by the decoder, after the header checks, and its BytesLengthException or
    NotImplementedError failed the whole study as an internal error. That file is refused, naming the element."""
    files = [(name, data) for name, data, _, _ in make_series(4, rows=N, cols=N)]
    ds = pydicom.dcmread(io.BytesIO(files[0][1]))
    ds.add_new(0x00280120, "US", 0)
    if tag == 0x00280121:
        ds.add_new(tag, "US", 10)
    raw = _save(ds)
    element = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    assert raw.count(element + b"US") == 1
    files[0] = ("bad.dcm", raw.replace(element + b"US", element + vr.encode()))
    study = load_study(files, workers=1)
    assert study.n_slices == 3
    [(name, reason, message)] = study.rejected
    assert (name, reason) == ("bad.dcm", "not_dicom")
    assert f"({tag >> 16:04X},{tag & 0xFFFF:04X}) cannot be read (2 bytes of VR {vr})" in message, message


@pytest.mark.parametrize(("keyword", "vr"), [("BitsStored", "CS"), ("BitsStored", "PN"), ("PixelRepresentation", "TM"),
                                             ("Rows", "DA")])
def test_a_pixel_element_written_as_text_is_refused_naming_it(keyword: str, vr: str) -> None:
    """The fuzz campaign's Bits Stored rewritten as CS (its 2 bytes then read as text): the decoder's words were
    "TypeError: '<=' not supported between instances of 'int' and 'str'", or 'PersonName' with PN."""
    tag, raw = _vr_rewritten(ct_dataset(chest_like(N, N)), keyword, "US", vr)
    with pytest.raises(NotDicom) as refused:
        gdicom.read_headers("text.dcm", raw)
    assert f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not a number (VR {vr})" in refused.value.message, refused.value


def _vr_rewritten(ds: pydicom.Dataset, keyword: str, was: str, vr: str) -> tuple[int, bytes]:
    """``(tag, the file of ds)`` with the VR of its one element ``keyword`` rewritten from ``was`` to ``vr``, its
    bytes as they were."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    raw = _save(ds)
    element = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    assert raw.count(element + was.encode()) == 1
    return tag, raw.replace(element + was.encode(), element + vr.encode())


def _broken_sequence_ahead_of_pixels(pixel_bytes: int, where: int = 0x0040A730) -> bytes:
    """A CT instance with a 24-byte broken sequence of undefined length (its next element is no item) ahead of
    ``pixel_bytes`` of native pixel data."""
    ds = ct_dataset(np.full((16, 16), -1000, np.int16))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    broken = struct.pack("<HH", where >> 16, where & 0xFFFF) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFFFFFF) + b"\x01" * 16
    pixels = struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00" + struct.pack("<I", pixel_bytes) + b"\x00" * pixel_bytes
    return buf.getvalue() + broken + pixels


@pytest.mark.parametrize("where", [0x0040A730, 0x00081140], ids=["after_the_uids", "among_the_uids"])
def test_a_sequence_that_holds_no_items_is_refused_before_pydicom_reads_the_pixels_as_items(tmp_path: Path,
                                                                                             where: int) -> None:
    """pydicom reads any tag inside a sequence as an item: a broken sequence ahead of 30 MiB of pixels made it read
    each 8 bytes of them as an empty item (4 million data sets: a minute and 2.4 GiB for one C-STORE or STOW
    instance, an upload alike). The gateway's readers refuse such a sequence where it starts (not DICOM), so the
    parse counts a handful of data sets, whatever the size of the pixels. Seen failing (over 100,000 data sets)
    without the check."""
    data = _broken_sequence_ahead_of_pixels(20 * 1024 * 1024 + 1024, where)
    path = tmp_path / "broken.dcm"
    path.write_bytes(data)
    made = 0
    real_init = pydicom.Dataset.__init__

    def counting(self, *args, **kwargs):
        nonlocal made
        made += 1
        real_init(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pydicom.Dataset, "__init__", counting)
        for read in (lambda: read_header(path, "broken.dcm"), lambda: read_dataset(path, "broken.dcm"),
                     lambda: read_dataset(data, "broken.dcm")):
            made = 0
            with pytest.raises(NotDicom) as info:
                read()
            assert "where an item or its end must be" in info.value.message, info.value.message
            assert made < 100, made


@pytest.mark.parametrize(("keyword", "vr"), [("SliceThickness", "FD"), ("ImagePositionPatient", "SL")])
def test_a_header_element_whose_bytes_do_not_fit_its_vr_is_named_not_quoted(keyword: str, vr: str) -> None:
    """The fuzz campaign's last kind of unclear refusal (about 170 of 10 600): an element the header checks read,
    written in a VR its bytes do not fit (Slice Thickness "1.25" as FD), was refused as "DICOM header has malformed
    values: BytesLengthException: ... Instead received b'1.25' ...": pydicom's words, quoting the header's bytes into
    the job's view. The element is named now, its bytes not quoted."""
    ds = ct_dataset(chest_like(N, N))
    ds.SliceThickness = "1.25"
    ds.ImagePositionPatient = ["0", "0", "-100.5"]
    tag, raw = _vr_rewritten(ds, keyword, "DS", vr)
    with pytest.raises(NotDicom) as refused:
        gdicom.read_headers("bad.dcm", raw)
    message = refused.value.message
    assert f"({tag >> 16:04X},{tag & 0xFFFF:04X}) cannot be read (" in message and f"of VR {vr})" in message, message
    assert "b'" not in message and "1.25" not in message and "100.5" not in message, message
