"""Decoding to HU: transfer syntaxes written by pydicom's own encoders, rescale arithmetic checked
against pydicom's ``apply_modality_lut``, refusals, and the resampling / box-mapping convention."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from scipy import ndimage

from gateway.dicom import (
    GridMapping,
    decode_file,
    decode_hu,
    header_value,
    native_fast_path,
    read_dataset,
    read_headers,
    rescale_to_hu,
    to_grid,
)
from gateway.errors import REASONS, GatewayError, NoPixelData, NotCT, NotDicom, Undecodable
from tests.gateway_dicom_factory import chest_like, ct_dataset, enhanced_ct, to_bytes


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
        JPEGLSLossless,
    ],
    ids=lambda s: s.name,
)
def test_lossless_syntaxes_round_trip_exactly(syntax: str) -> None:
    hu = chest_like(96, 96, seed=3)
    data = to_bytes(ct_dataset(hu), syntax)
    ds, headers = read_headers("x.dcm", data)
    assert str(ds.file_meta.TransferSyntaxUID) == syntax
    np.testing.assert_array_equal(decode_hu(ds, headers)[0], hu)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("from_file", [True, False], ids=["file", "bytes"])
def test_decoding_leaves_the_pixels_out_of_the_data_set(tmp_path: Path, syntax: str, from_file: bool) -> None:
    """Native Pixel Data left unread by the parse (``read_dataset``) is read into the decoded array alone: the
    data set, which a study keeps until it is screened, does not take in a copy of it (512 KB a slice), and
    decodes to the same HU again, a frame alone too."""
    hu = chest_like(256, 256, seed=5)  # 128 KB of pixels: over DEFER_BYTES
    data = to_bytes(ct_dataset(hu), syntax)
    source = tmp_path / "x.dcm"
    source.write_bytes(data)
    ds, headers = read_headers("x.dcm", read_dataset(source if from_file else data))
    np.testing.assert_array_equal(decode_hu(ds, headers)[0], hu)
    assert ds.get_item(0x7FE00010, keep_deferred=True).value is None
    np.testing.assert_array_equal(decode_hu(ds, headers, frame=0)[0], hu)


@pytest.mark.parametrize(("keyword", "raw", "charset"), [
    ("SOPInstanceUID", b"1.2.840.1\0", None), ("SOPInstanceUID", b" 1.2.3", None), ("SOPInstanceUID", b"1.02", None),
    ("Modality", b"CT", None), ("Modality", b"ct", None), ("Modality", b"CT\\MR ", None), ("ImageType", b"ORIGINAL\\PRIMARY ", None),
    ("RescaleIntercept", b"-1024 ", None), ("RescaleIntercept", b"1e400 ", None), ("RescaleSlope", b"1\\1 ", None),
    ("RescaleSlope", b"nan ", None), ("ImagePositionPatient", b"-85.0\\ -115.0\\-97.3 ", None), ("PixelSpacing", b"0,7\\0,7 ", None),
    ("SeriesNumber", b" 12 ", None), ("SeriesNumber", b"1.0 ", None), ("SeriesNumber", b"99999999999 ", None),
    ("SeriesDescription", b"Thorax  ", "ISO_IR 100"), ("SeriesDescription", "Thorax \u00c4".encode("latin-1"), "ISO_IR 100"),
    ("SeriesDescription", b"Thorax", "ISO 2022 IR 87"), ("ConvolutionKernel", b"B30f\\I40f ", None),
])
def test_header_value_reads_as_pydicom_does(keyword: str, raw: bytes, charset: str | None) -> None:
    """``header_value`` of an element still as the file holds it reads as pydicom's own value does (``str``, ``int``,
    ``float`` of each value) and leaves what pydicom would warn about, or read otherwise, to pydicom."""
    import warnings

    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = ct_dataset(chest_like(16, 16))
    if charset is not None:
        ds.SpecificCharacterSet = charset
    tag = Tag(tag_for_keyword(keyword))
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    data = to_bytes(ds)

    def read(get):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            try:
                value = get(read_dataset(data))
            except ValueError as exc:
                value = exc
        as_list = list(value) if isinstance(value, list | pydicom.multival.MultiValue) else [value]
        kind = float if dictionary_VR(tag) == "DS" else int if dictionary_VR(tag) in ("IS", "US") else str

        def as_read(v: object) -> str:  # what the headers make of a value: str(), int() or float() of it, or not
            try:
                return repr(kind(v))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                return f"unread {v!r}"

        return [as_read(v) for v in as_list], [str(w.message) for w in said]

    many = keyword in ("ImageType", "ImagePositionPatient", "PixelSpacing", "ConvolutionKernel")
    assert read(lambda ds: header_value(ds, keyword, many=many)) == read(lambda ds: ds.get(keyword))


def test_lossy_jpeg2000_is_close() -> None:
    hu = chest_like(128, 128, seed=4)
    got = decode_hu(*read_headers("x.dcm", to_bytes(ct_dataset(hu), JPEG2000)))[0].astype(np.int32)
    err = np.abs(got - hu)
    assert 0 < err.mean() < 20


@pytest.mark.parametrize(
    ("slope", "intercept", "signed"),
    [
        (1.0, -1024.0, False),
        (1.0, 0.0, True),
        (0.5, -1100.0, False),
        (2.0, -2048.0, False),
        (1.0, -1024.5, False),
    ],
)
def test_rescale_matches_pydicom_modality_lut(slope: float, intercept: float, signed: bool) -> None:
    hu = chest_like(64, 64, seed=5)
    hu = (np.rint((hu.astype(np.float64) - intercept) / slope) * slope + intercept).astype(np.float64)
    ds = ct_dataset(
        np.rint(hu).astype(np.int16) if slope == 1 and float(intercept).is_integer() else hu,
        slope=slope,
        intercept=intercept,
        signed=signed,
    )
    data = to_bytes(ds)
    got = decode_hu(*read_headers("x.dcm", data))[0]
    ref = apply_modality_lut(pydicom.dcmread(io.BytesIO(data)).pixel_array, ds)
    np.testing.assert_array_equal(got, np.rint(ref).astype(np.int16))


def test_rescale_to_hu_clips_to_int16() -> None:
    stored = np.array([[0, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(rescale_to_hu(stored, 1.0, -1024), [[-1024, 32767]])
    np.testing.assert_array_equal(rescale_to_hu(stored, 2.0, -70000), [[-32768, 32767]])
    for slope, intercept, want in ((1.0, -1024, [-1024, -1023, 976]), (1.0, -1024.0, [-1024, -1023, 976]),
                                   (0.5, 3, [3, 4, 1003])):  # the int16 pass, and the float one, into out
        out = np.full((3,), 7, dtype=np.int16)
        assert rescale_to_hu(np.array([0, 1, 2000], dtype=np.uint16), slope, intercept, out=out) is out
        np.testing.assert_array_equal(out, want)


def test_bare_dataset_without_preamble_is_read() -> None:
    ds = ct_dataset(chest_like(32, 32))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)  # no preamble, no file meta
    raw = buf.getvalue()
    assert raw[128:132] != b"DICM"
    np.testing.assert_array_equal(decode_file("raw", raw)[0].hu.shape, (512, 512))


@pytest.mark.parametrize(
    ("data", "exc"),
    [
        (b"", NotDicom),
        (b"hello world, this is not dicom at all" * 10, NotDicom),
        (b"\x89PNG\r\n\x1a\n" + bytes(300), NotDicom),
    ],
)
def test_not_dicom(data: bytes, exc: type) -> None:
    with pytest.raises(exc) as info:
        decode_file("junk.bin", data)
    assert info.value.reason == "not_dicom" and info.value.filename == "junk.bin"


def test_refusals_name_their_reason() -> None:
    mr = ct_dataset(chest_like(32, 32), modality="MR")
    with pytest.raises(NotCT, match="'MR'"):
        decode_file("mr.dcm", to_bytes(mr))

    nopix = ct_dataset(chest_like(32, 32))
    del nopix.PixelData
    with pytest.raises(NoPixelData):
        decode_file("nopix.dcm", to_bytes(nopix))

    sc8 = ct_dataset(chest_like(32, 32))
    sc8.BitsAllocated = sc8.BitsStored = 8
    sc8.HighBit = 7
    sc8.PixelData = bytes(32 * 32)
    with pytest.raises(NotCT, match="8-bit"):
        decode_file("sc.dcm", to_bytes(sc8))

    rgb = ct_dataset(chest_like(32, 32))
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation = 3, "RGB"
    with pytest.raises(NotCT, match="Colour"):
        read_headers("rgb.dcm", to_bytes(rgb))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_an_empty_pixel_data_is_no_pixel_data(syntax: str) -> None:
    """The fuzz campaign's Pixel Data of length 0 (its undefined length zeroed): refused as "'NoneType' object has
    no attribute 'read'" (encapsulated) or "the number of bytes of pixel data is less than expected (0 vs 2048
    bytes)" (native), when it was decoded."""
    data = to_bytes(ct_dataset(chest_like(32, 32)), syntax)
    at = data.index(b"\xe0\x7f\x10\x00")
    for empty in (data[:at + 8] + bytes(4) + data[at + 12:],  # length 0 (the pixels then read as elements)
                  data[:at + 8] + bytes(4)):  # length 0, the file's end
        with pytest.raises(NoPixelData, match="Pixel Data is empty"):
            read_headers("empty.dcm", empty)


@pytest.mark.parametrize(("syntax", "vr"), [(ExplicitVRLittleEndian, "SQ"), (ExplicitVRLittleEndian, "UT"),
                                           (ExplicitVRLittleEndian, "UC"), (RLELossless, "UT"), (RLELossless, "UC")])
def test_a_pixel_data_of_another_vr_is_refused_naming_it(syntax: str, vr: str) -> None:
    """The fuzz campaign's sweep of every VR over every element: Pixel Data as SQ escaped the decoder as the sequence
    reader's InvalidDicomError (the whole study failed as an internal error); as UT or UC it was refused in
    pydicom's words ("'str' object has no attribute 'read'", "memoryview: a bytes-like object is required")."""
    data = to_bytes(ct_dataset(chest_like(32, 32)), syntax)
    at = data.index(b"\xe0\x7f\x10\x00OB" if syntax == RLELossless else b"\xe0\x7f\x10\x00OW")
    with pytest.raises(NotDicom, match=rf"Pixel Data \(7FE0,0010\) has VR {vr}"):
        read_headers("vr.dcm", data[:at + 4] + vr.encode() + data[at + 6:])


@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_a_header_cut_inside_a_sequence_is_called_truncated(undefined: bool) -> None:
    """The fuzz campaign's truncations at each element boundary of real headers: a file cut inside a sequence
    was refused as "DICOM header cannot be parsed: error: unpack requires a buffer of 4 bytes" (inside its length)
    or "OSError: No tag to read at file position 436" (undefined length, where its end is due)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = ct_dataset(chest_like(16, 16))
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3"
    ds.ReferencedImageSequence = Sequence([item, item])
    data = to_bytes(ds)
    at = data.index(b"\x08\x00\x40\x11SQ")
    length = int.from_bytes(data[at + 8:at + 12], "little")
    if undefined:  # its items, then the file's end where the Sequence Delimitation Item is due
        cut = data[:at + 8] + b"\xff" * 4 + data[at + 12:at + 12 + length]
    else:  # inside the sequence's own length
        cut = data[:at + 10]
    with pytest.raises(NotDicom, match="truncated"):
        read_headers("cut.dcm", cut)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_file_is_refused_not_a_crash() -> None:
    data = to_bytes(ct_dataset(chest_like(64, 64)))
    with pytest.raises(Undecodable, match="cannot be decoded"):
        decode_file("cut.dcm", data[:-1000])
    j2k = to_bytes(ct_dataset(chest_like(128, 128)), JPEG2000Lossless)
    with pytest.raises(NotDicom, match="truncated"):
        decode_file("cut.j2k.dcm", j2k[:-2000])


@pytest.mark.parametrize(
    ("syntax", "match"),
    [(RLELossless, "cannot be decoded"), (JPEGLSLossless, "implausible")],
    ids=["rle", "jpegls"],
)
def test_garbled_compressed_data_is_undecodable(syntax: str, match: str) -> None:
    """1000 random bytes over the compressed stream: the RLE codec panics (pyo3 PanicException,
    a BaseException), JPEG-LS decodes to nonsense; both become a 422 undecodable."""
    data = bytearray(to_bytes(ct_dataset(chest_like(128, 128)), syntax))
    n = len(data)
    data[n - 3000 : n - 2000] = np.random.default_rng(0).integers(0, 255, 1000, dtype=np.uint8).tobytes()
    with pytest.raises(Undecodable, match=match):
        decode_file("garbled.dcm", bytes(data))


def test_noise_is_refused_as_undecodable() -> None:
    rng = np.random.default_rng(0)
    ds = ct_dataset(rng.integers(-1024, 3000, size=(64, 64)).astype(np.int16))
    with pytest.raises(Undecodable, match="noise"):
        decode_file("noise.dcm", to_bytes(ds))


@pytest.mark.parametrize(("intercept", "signed"), [(0.0, True), (-1024.0, False)])
def test_missing_rescale_on_ct_image_storage_is_read_from_where_air_is_stored(intercept, signed) -> None:
    """Air stored at -1000: intercept 0. Air stored near 0 (unsigned storage, and some signed): intercept
    -1024; without the tag every value read 1024 HU high (lungs as water), with only a warning."""
    hu = chest_like(32, 32)
    ds = ct_dataset(hu, intercept=intercept, signed=signed)
    del ds.RescaleSlope, ds.RescaleIntercept
    sl = decode_file("norescale.dcm", to_bytes(ds))[0]
    assert any("Rescale Slope/Intercept missing" in w for w in sl.warnings)
    np.testing.assert_array_equal(sl.hu, to_grid(hu)[0])


def test_a_real_unsigned_slice_without_rescale_reads_the_same_hu() -> None:
    path = Path(__file__).parents[1].parent / "shared" / "data" / "dicom-edge-cases" / "pydicom" / "693_UNCR.dcm"
    if not path.is_file():
        pytest.skip(f"edge-case corpus not present at {path.parent} (shared data not mounted)")
    reference = decode_file("693_UNCR.dcm", path.read_bytes())[0].hu
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleIntercept) == -1024  # air stored near 0 (in signed storage, here)
    del ds.RescaleSlope, ds.RescaleIntercept
    np.testing.assert_array_equal(decode_file("stripped.dcm", to_bytes(ds))[0].hu, reference)


def test_read_dataset_type_guard() -> None:
    with pytest.raises(TypeError, match='"data"'):
        read_dataset("not bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("n", [768, 128])
def test_resample_pixel_centre_convention(n: int) -> None:
    """A horizontal ramp hu[y, x] = x: 512-grid pixel j samples original coordinate (j+0.5)*s-0.5."""
    ramp = np.tile(np.arange(n, dtype=np.int16), (n, 1))
    out, grid = to_grid(ramp)
    assert out.shape == (512, 512) and out.dtype == np.int16
    s = n / 512
    assert grid == GridMapping(n, n, scale=s)
    j = np.arange(10, 500)
    np.testing.assert_allclose(out[256, j], np.rint((j + 0.5) * s - 0.5), atol=1)
    const, _ = to_grid(np.full((n, n), 40, np.int16))
    assert (const == 40).all()


@pytest.mark.parametrize(("n", "rect"), [(768, (150, 300, 299, 449)), (128, (70, 30, 99, 59))])
def test_box_found_on_512_grid_maps_back_to_the_original(n: int, rect: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = rect
    img = np.full((n, n), -1000, np.int16)
    img[y0 : y1 + 1, x0 : x1 + 1] = 500
    out, grid = to_grid(img)
    ys, xs = np.nonzero(out > -250)  # the half-way level: edges land where the linear ramp crosses it
    box512 = np.array([[xs.min(), ys.min(), xs.max(), ys.max(), 0.8]], dtype=np.float32)
    back = grid.to_original(box512)
    np.testing.assert_allclose(back[0, :4], rect, atol=1)
    assert back[0, 4] == pytest.approx(0.8)


def test_box_mapping_arithmetic() -> None:
    g128 = GridMapping(128, 128, scale=0.25)
    # 512 pixels 4..11 are original pixel 1..2; 8..15 are 2..3
    np.testing.assert_array_equal(g128.to_original(np.array([[4, 8, 11, 15]])), [[1, 2, 2, 3]])
    g768 = GridMapping(768, 768, scale=1.5)
    np.testing.assert_array_equal(g768.to_original(np.array([[2, 0, 5, 511]])), [[3, 0, 8, 767]])
    # padding rows stay -1, identity leaves boxes alone
    np.testing.assert_array_equal(g768.to_original(np.array([[-1, -1, -1, -1, -1]])), [[-1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(GridMapping(512, 512).to_original(np.array([[1, 2, 3, 4]])), [[1, 2, 3, 4]])
    # round trip covers the original box
    for g in (g128, g768, GridMapping(716, 512, scale=716 / 512, pad_left=102)):
        orig = np.array([[10, 20, 40, 60]])
        back = g.to_original(g.to_grid(orig))
        assert (back[0, :2] <= orig[0, :2]).all() and (back[0, 2:] >= orig[0, 2:]).all()
    with pytest.raises(ValueError, match='"boxes"'):
        g128.to_original(np.zeros((3,)))


@pytest.mark.parametrize("shape", [(512, 476), (400, 512), (512, 1), (1, 512)])
def test_a_field_with_one_side_of_512_is_padded_not_zoomed(shape: tuple[int, int],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The shortcut for a cropped field gives exactly what the linear zoom by 1 gave, and its mapping,
    without calling the zoom."""
    rng = np.random.default_rng(7)
    img = rng.integers(-1024, 3072, size=shape, dtype=np.int16)
    rows, cols = shape
    square = np.full((512, 512), -1024, np.float32)
    top, left = (512 - rows) // 2, (512 - cols) // 2
    square[top : top + rows, left : left + cols] = img
    zoomed = ndimage.zoom(square, 1.0, order=1, mode="nearest", grid_mode=True, prefilter=False)

    def no_zoom(*_: object, **__: object) -> None:
        raise AssertionError("zoomed by 1")

    monkeypatch.setattr("gateway.dicom.ndimage.zoom", no_zoom)
    out, grid = to_grid(img)
    np.testing.assert_array_equal(out, np.rint(zoomed).astype(np.int16))
    assert out.dtype == np.int16 and out.flags.c_contiguous
    assert grid == GridMapping(rows, cols, scale=1.0, pad_top=top, pad_left=left)


def test_non_square_is_padded_with_air_and_centred() -> None:
    img = np.full((300, 600), 100, np.int16)
    out, grid = to_grid(img)
    assert (grid.rows, grid.cols, grid.pad_top, grid.pad_left) == (300, 600, 150, 0)
    assert out[10, 256] == -1024 and out[256, 256] == 100 and out[500, 256] == -1024
    with pytest.raises(ValueError, match='"hu"'):
        to_grid(np.zeros((3, 3, 3), np.int16))


@pytest.mark.parametrize(("signed", "bits"), [(False, 12), (True, 12), (False, 16), (True, 16), (True, 13)])
def test_native_fast_path_matches_pydicom(signed: bool, bits: int) -> None:
    """Raw 16-bit words with junk above Bits Stored: masked (unsigned) or sign-extended (signed)
    exactly as pydicom's own decoder does."""
    ds = ct_dataset(chest_like(16, 16), intercept=0.0, signed=True)
    ds.PixelRepresentation = int(signed)
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelData = np.random.default_rng(bits).integers(0, 65536, 256, dtype=np.uint16).tobytes()
    data = to_bytes(ds)
    ref = pydicom.dcmread(io.BytesIO(data)).pixel_array.astype(np.int32)
    fast = native_fast_path(read_dataset(data))  # random words are noise: compare stored values
    assert fast is not None
    np.testing.assert_array_equal(fast[0].astype(np.int32), ref)


def test_enhanced_ct_per_frame_rescale_and_positions() -> None:
    from gateway.ingest import load_study

    frames = [chest_like(48, 48, seed=s) for s in range(3)]
    frames[1] = (frames[1] // 2) * 2  # representable with slope 2
    data = enhanced_ct(frames, [(1.0, -1024.0), (2.0, -2048.0), (1.0, -1100.0)], [10.0, 0.0, 5.0])
    ds, headers = read_headers("ect.dcm", data)
    assert [(h.slope, h.intercept) for h in headers] == [(1.0, -1024.0), (2.0, -2048.0), (1.0, -1100.0)]
    np.testing.assert_array_equal(decode_hu(ds, headers), np.stack(frames))
    study = load_study([("ect.dcm", data)])
    assert [s.position_mm for s in study.slices] == [0.0, 5.0, 10.0]
    assert [s.frame_index for s in study.slices] == [1, 2, 0]
    np.testing.assert_array_equal(study.hu[0], to_grid(frames[1])[0])


def test_forged_huge_matrix_is_refused_before_decoding() -> None:
    ds = ct_dataset(chest_like(16, 16))
    ds.Rows = ds.Columns = 60000
    with pytest.raises(GatewayError) as info:
        decode_file("huge.dcm", to_bytes(ds))
    assert info.value.reason == "too_large"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless], ids=lambda s: s.name
)
def test_mutated_files_raise_only_gateway_errors(syntax: str) -> None:
    """150 random corruptions (byte flips, truncations, spliced garbage) of a valid file: each
    either decodes to a 512 x 512 int16 slice or raises a GatewayError with a known reason."""
    base = to_bytes(ct_dataset(chest_like(32, 32)), syntax)
    rng = np.random.default_rng(zlib.crc32(syntax.encode()))
    reasons = set()
    for _ in range(150):
        data = bytearray(base)
        kind = rng.integers(3)
        if kind == 0:
            for pos in rng.integers(0, len(data), size=rng.integers(1, 8)):
                data[pos] = int(rng.integers(256))
        elif kind == 1:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            pos = int(rng.integers(0, len(data)))
            data[pos : pos + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        try:
            out = decode_file("m.dcm", bytes(data))
        except GatewayError as exc:
            assert exc.reason in REASONS
            reasons.add(exc.reason)
            continue
        assert all(s.hu.shape == (512, 512) and s.hu.dtype == np.int16 for s in out)
    assert reasons  # some corruptions are caught


@pytest.mark.parametrize(
    ("orientation", "flips"),
    [
        ((1, 0, 0, 0, 1, 0), (False, False)),
        ((1, 0, 0, 0, -1, 0), (True, False)),  # rows run anterior: stored upside down (prone protocols)
        ((-1, 0, 0, 0, 1, 0), (False, True)),  # columns run to the patient's right: mirrored
        ((-1, 0, 0, 0, -1, 0), (True, True)),
        ((1, 0, 0, 0, 0, -1), (False, False)),  # coronal: not an axial slice, left alone
        ((0, 0, 1, 1, 0, 0), (False, False)),  # sagittal-like axes: not swapped, left alone
    ],
)
@pytest.mark.parametrize("shape", [(512, 512), (300, 600), (768, 768)])
def test_slices_are_mirrored_into_the_radiological_convention_and_boxes_back(orientation, flips, shape):
    """The models see every axial slice anterior-up, patient's right on the left; a box found there
    maps back to the stored pixels of the finding."""
    rows, cols = shape
    stored = np.full(shape, -1000, np.int16)
    y0, x0 = rows // 5, cols // 6  # a finding near the stored image's top-left corner
    stored[y0 : y0 + rows // 10, x0 : x0 + cols // 10] = 300
    out, grid = to_grid(stored, orientation=orientation)
    assert (grid.flip_rows, grid.flip_cols, grid.transpose) == (*flips, False)
    ys, xs = np.nonzero(out > -350)
    # on the model grid the finding sits where the convention puts it
    assert (ys.mean() > 256) == flips[0] and (xs.mean() > 256) == flips[1]
    box = np.array([[xs.min(), ys.min(), xs.max(), ys.max(), 0.9]], np.float32)
    back = grid.to_original(box)[0]
    np.testing.assert_allclose(back[:4], [x0, y0, x0 + cols // 10 - 1, y0 + rows // 10 - 1], atol=2)
    # to_grid of the mapped-back box covers the model-grid box again
    again = grid.to_grid(back[None, :4])[0]
    assert again[0] <= box[0, 0] + 1 and again[2] >= box[0, 2] - 1 and again[1] <= box[0, 1] + 1


def stored_as(upright: np.ndarray, turn: bool, flip_rows: bool, flip_cols: bool) -> tuple[np.ndarray, tuple[int, ...]]:
    """``upright`` (stored as scanners usually do, Image Orientation (Patient) 1,0,0,0,1,0) stored another way:
    rows and columns swapped, then mirrored; and the Image Orientation (Patient) that says so, derived from
    where each stored pixel lies in the patient, not from the code under test."""
    stored, row, col = upright, np.array([1, 0, 0]), np.array([0, 1, 0])  # +column: patient's left; +row: posterior
    if turn:
        stored, row, col = stored.T, col, row
    if flip_rows:
        stored, col = stored[::-1], -col
    if flip_cols:
        stored, row = stored[:, ::-1], -row
    return np.ascontiguousarray(stored), tuple(int(v) for v in (*row, *col))


EIGHT_WAYS = [(turn, fr, fc) for turn in (False, True) for fr in (False, True) for fc in (False, True)]


@pytest.mark.parametrize(("turn", "flip_rows", "flip_cols"), EIGHT_WAYS)
@pytest.mark.parametrize(("shape", "spacing"), [((512, 512), (0.7, 0.7)), ((400, 640), (0.6, 0.6)),
                                                 ((300, 600), (0.5, 0.8))])
def test_every_turning_and_mirroring_reaches_the_grid_upright_and_boxes_go_back(turn, flip_rows, flip_cols, shape,
                                                                                spacing):
    """A decubitus slice (front to back along its rows) or a reformat turned by 90 degrees is swapped, then
    mirrored, so the models see the same upright image whichever of the eight ways it was stored; a box found
    there maps back to the stored pixels of the finding. The stored image's Pixel Spacing (row, column)
    swaps with its axes. Seen failing with the swap taken out of ``to_grid``."""
    rng = np.random.default_rng(7)
    upright = np.full(shape, -1000, np.int16)
    rows, cols = shape
    upright[rows // 8 : rows - rows // 8, cols // 10 : cols - cols // 10] = 40  # a body, not symmetric
    upright += rng.integers(-20, 20, shape).astype(np.int16)
    y0, x0 = rows // 5, cols // 6  # a finding in the patient's right anterior quadrant
    upright[y0 : y0 + rows // 10, x0 : x0 + cols // 9] = 300
    truth, truth_grid = to_grid(upright, orientation=(1, 0, 0, 0, 1, 0), spacing=spacing)
    stored, orientation = stored_as(upright, turn, flip_rows, flip_cols)
    stored_spacing = spacing[::-1] if turn else spacing
    out, grid = to_grid(stored, orientation=orientation, spacing=stored_spacing)
    assert grid.transpose == turn and (grid.rows, grid.cols) == stored.shape
    np.testing.assert_array_equal(out, truth)  # the very image the upright slice gives
    # the finding's box on the grid, back on the stored image: where the finding is stored
    ys, xs = np.nonzero(out > 200)
    box = np.array([[xs.min(), ys.min(), xs.max(), ys.max(), 0.9]], np.float32)
    marker = np.zeros(shape, bool)
    marker[y0 : y0 + rows // 10, x0 : x0 + cols // 9] = True
    sy, sx = np.nonzero(stored_as(marker, turn, flip_rows, flip_cols)[0])
    back = grid.to_original(box)[0]
    np.testing.assert_allclose(back[:4], [sx.min(), sy.min(), sx.max(), sy.max()], atol=2)
    assert back[4] == pytest.approx(0.9)
    again = grid.to_grid(back[None, :4])[0]  # and to the grid again: it covers the grid's box
    assert again[0] <= box[0, 0] + 1 and again[1] <= box[0, 1] + 1 and again[2] >= box[0, 2] - 1 and again[3] >= box[0, 3] - 1
    # the part of the grid on the stored image is the upright one's
    assert grid.footprint() == truth_grid.footprint()
    # padding rows stay padding
    assert grid.to_original(np.full((1, 5), -1.0))[0].tolist() == [-1.0] * 5


def test_a_read_error_of_the_volume_is_no_refusal_of_the_file(tmp_path, monkeypatch):
    """EIO (or a stale NFS handle) while reading a blob became 'not DICOM' or 'undecodable': the study was
    screened without the file, or failed for good. It passes through, for the worker to try again; a
    codec's own OSError without an errno (Pillow's "broken data stream") stays a refusal of the file."""
    import errno

    import pydicom as pd

    from gateway.dicom import read_dataset
    from gateway.errors import NotDicom
    from tests.gateway_app_fakes import ct_series

    _, [(name, data)] = ct_series(1, size=64)
    path = tmp_path / name
    path.write_bytes(data)
    real = pd.dcmread

    def failing(cause):
        def read(*args, **kwargs):
            raise cause
        return read

    monkeypatch.setattr(pd, "dcmread", failing(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError) as info:
        read_dataset(path, name)
    assert info.value.errno == errno.EIO and not isinstance(info.value, NotDicom)
    monkeypatch.setattr(pd, "dcmread", failing(OSError("broken data stream when reading image file")))
    with pytest.raises(NotDicom):
        read_dataset(path, name)
    monkeypatch.setattr(pd, "dcmread", real)
    assert read_dataset(path, name).Rows == 64
