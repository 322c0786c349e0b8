"""Decode DICOM CT objects to Hounsfield units on the model's 512 x 512 grid.

Three steps, each usable alone:

1. :func:`read_headers` parses the bytes (any transfer syntax pydicom reads: implicit/explicit VR
   little endian, explicit big endian, deflated, and every encapsulated syntax with a codec plugin:
   JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE), refuses what is not a CT image
   (:class:`~gateway.errors.NotDicom`, :class:`~gateway.errors.NotCT`,
   :class:`~gateway.errors.NoPixelData`) and returns one :class:`FrameHeader` per frame. Enhanced
   (multi-frame) CT takes geometry and rescale from the Per-Frame, then the Shared Functional
   Groups, then the top level.
2. :func:`decode_hu` decodes the pixels and applies ``HU = slope * stored + intercept`` per frame,
   as int16 on the original grid; pixels that cannot be decoded, or decode to noise, raise
   :class:`~gateway.errors.Undecodable`.
3. :func:`to_grid` resamples a slice that is not 512 x 512 to 512 x 512 and returns the
   :class:`GridMapping` that maps boxes back to the original pixel grid.

Pixel-centre convention
-----------------------
Pixel ``i`` covers the interval ``[i, i + 1)`` of its axis and its centre is ``i + 0.5``. A
non-square slice is first padded with air (:data:`PAD_HU`) to a centred ``N x N`` square
(``N = max(rows, cols)``), then scaled by ``512 / N`` so that the outer *edges* of the two grids
coincide (``scipy.ndimage.zoom(..., grid_mode=True)``, linear interpolation). A 512-grid pixel
centre ``j + 0.5`` therefore lies at ``(j + 0.5) * s - pad`` in the original grid, with
``s = N / 512``; a box of inclusive 512-grid pixels ``x0..x1`` covers ``[x0 * s, (x1 + 1) * s)``
of the padded original and maps to inclusive original pixels
``floor(x0 * s) - pad .. ceil((x1 + 1) * s) - 1 - pad``, clipped to the image.
"""

from __future__ import annotations

import io
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from ctscreen.contracts import SLICE_SIZE
from gateway.errors import NoPixelData, NotCT, NotDicom, TooLarge, Undecodable
from gateway.phi import file_ref

logger = logging.getLogger(__name__)

__all__ = [
    "CT_SOP_CLASSES",
    "PAD_HU",
    "DecodedSlice",
    "FrameHeader",
    "GridMapping",
    "decode_file",
    "decode_hu",
    "read_dataset",
    "read_headers",
    "rescale_to_hu",
    "to_grid",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
CT_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT})
"""SOP classes that are CT images whatever (0008,0060) Modality says (it is sometimes absent)."""

PAD_HU = -1024
"""Fill value (air) used when a non-square slice is padded to a square before resampling."""

NOISE_LIMIT_HU = 400.0
"""A frame whose median absolute difference between horizontal neighbours exceeds this is noise.

Real CT, even low-dose, stays far below (the edge-case corpus: at most ~100 HU, a head scan
with dental metal artefacts); a wrongly decoded lossless JPEG (wrong predictor, lost sync)
reaches > 1000 HU."""

MAX_MATRIX = 4096
"""Largest Rows or Columns accepted (CT is 512-1024; some micro-CT 2048)."""
MAX_PIXELS = 1 << 29
"""Most pixels (all frames) in one object: 1 GiB as int16."""

HIGH_HU = 4000
HIGH_HU_FRACTION = 0.05
"""More than this fraction of a frame above :data:`HIGH_HU` (bone is < 2000, the 12-bit CT scale ends
at 3071; metal reaches higher but covers far less of a slice) means the decode went wrong."""

DEFER_BYTES = 64 * 1024
"""Values longer than this are read from the source bytes on first use (:func:`read_dataset`)."""

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)
_EXPLICIT_BIG_ENDIAN = "1.2.840.10008.1.2.2"


# --------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridMapping:
    """How a slice's original pixel grid maps onto the 512 x 512 model grid.

    See the module docstring for the pixel-centre convention.

    Attributes
    ----------
    rows, cols : int
        Original matrix.
    scale : float
        Original pixels per 512-grid pixel (``max(rows, cols) / 512``).
    pad_top, pad_left : int
        Air rows/columns added above/left of the original to make it square.
    flip_rows, flip_cols : bool
        The original was mirrored top-bottom / left-right first, to put it in the radiological
        convention the models learnt (anterior at the top, the patient's right on the image's left):
        see :func:`standard_flips`.
    """

    rows: int
    cols: int
    scale: float = 1.0
    pad_top: int = 0
    pad_left: int = 0
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def is_identity(self) -> bool:
        """True when the slice was 512 x 512 and nothing was resampled or mirrored."""
        return (self.scale == 1.0 and self.pad_top == 0 and self.pad_left == 0
                and not self.flip_rows and not self.flip_cols)

    def _unflip(self, out: np.ndarray, keep: np.ndarray) -> None:
        """Mirror inclusive boxes ``out[keep]`` (original grid) back where the flips took them."""
        if self.flip_cols:
            x0 = out[keep, 0].copy()
            out[keep, 0] = self.cols - 1 - out[keep, 2]
            out[keep, 2] = self.cols - 1 - x0
        if self.flip_rows:
            y0 = out[keep, 1].copy()
            out[keep, 1] = self.rows - 1 - out[keep, 3]
            out[keep, 3] = self.rows - 1 - y0

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map boxes ``(x0, y0, x1, y1, ...)`` of inclusive 512-grid pixels to the original grid.

        Parameters
        ----------
        boxes : numpy.ndarray
            ``[N, >=4]``; columns past the fourth (scores) are copied. Rows whose four coordinates
            are all ``-1`` (padding) are copied unchanged.

        Returns
        -------
        numpy.ndarray
            float64 ``[N, same]``, integral coordinates of inclusive original pixels, clipped.
        """
        b = _as_boxes(boxes, "boxes")
        out = b.astype(np.float64, copy=True)
        if out.shape[0] == 0 or self.is_identity:
            return out
        pad = np.all(b[:, :4] == -1, axis=1)
        s = self.scale
        x0 = np.floor(b[:, 0] * s + 1e-9) - self.pad_left
        y0 = np.floor(b[:, 1] * s + 1e-9) - self.pad_top
        x1 = np.ceil((b[:, 2] + 1) * s - 1e-9) - 1 - self.pad_left
        y1 = np.ceil((b[:, 3] + 1) * s - 1e-9) - 1 - self.pad_top
        mapped = np.stack(
            [
                np.clip(x0, 0, self.cols - 1),
                np.clip(y0, 0, self.rows - 1),
                np.clip(x1, 0, self.cols - 1),
                np.clip(y1, 0, self.rows - 1),
            ],
            axis=1,
        )
        out[~pad, :4] = mapped[~pad]
        self._unflip(out, ~pad)
        return out

    def to_grid(self, boxes: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_original`: original-grid boxes to the smallest covering 512-grid box."""
        b = _as_boxes(boxes, "boxes")
        out = b.astype(np.float64, copy=True)
        if out.shape[0] == 0 or self.is_identity:
            return out
        s = self.scale
        b = b.astype(np.float64, copy=True)
        self._unflip(b, np.ones(len(b), bool))  # mirroring is its own inverse
        out[:, 0] = np.floor((b[:, 0] + self.pad_left) / s + 1e-9)
        out[:, 1] = np.floor((b[:, 1] + self.pad_top) / s + 1e-9)
        out[:, 2] = np.ceil((b[:, 2] + 1 + self.pad_left) / s - 1e-9) - 1
        out[:, 3] = np.ceil((b[:, 3] + 1 + self.pad_top) / s - 1e-9) - 1
        out[:, :4] = np.clip(out[:, :4], 0, SLICE_SIZE - 1)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "rows": self.rows,
            "cols": self.cols,
            "scale": self.scale,
            "pad_top": self.pad_top,
            "pad_left": self.pad_left,
            "flip_rows": self.flip_rows,
            "flip_cols": self.flip_cols,
        }


def _as_boxes(boxes: np.ndarray, name: str) -> np.ndarray:
    b = np.asarray(boxes)
    if b.ndim != 2 or b.shape[1] < 4:
        raise ValueError(f'Argument "{name}" must have shape [N, >=4], got {b.shape}.')
    return b


MISSING_RESCALE = ("Rescale Slope/Intercept missing (the CT Image IOD requires them): slope 1 assumed, and "
                   "intercept -1024 where air is stored near 0, else 0.")
AIR_STORED_NEAR_0 = -200.0
"""A frame without Rescale Intercept whose 1st percentile of stored values (padding below -1500 left out)
lies above this holds no air at -1000: its air is stored near 0 (unsigned storage, and some signed), and
its intercept is -1024."""


ALWAYS_LOSSY = frozenset({
    "1.2.840.10008.1.2.4.50",   # JPEG baseline
    "1.2.840.10008.1.2.4.51",   # JPEG extended
    "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG Recompression: a JPEG baseline file, repacked losslessly
})
MAYBE_LOSSY = frozenset({
    "1.2.840.10008.1.2.4.81",   # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
    "1.2.840.10008.1.2.4.93",   # JPEG 2000 Part 2 multi-component
    "1.2.840.10008.1.2.4.112",  # JPEG XL
    "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000 (the lossless-only HTJ2K syntaxes are .201, .202)
})


def lossy_compressed(ds: Any, transfer_syntax_uid: str) -> bool:
    """Whether an object's pixels went through lossy compression: Lossy Image Compression (0028,2110) is
    "01" (also when a lossy copy was stored again losslessly), or its transfer syntax is lossy (JPEG
    baseline or extended, and JPEG XL's recompression of one, always; JPEG-LS near-lossless, JPEG 2000,
    HTJ2K and JPEG XL unless the object says "00").

    >>> from pydicom import Dataset
    >>> [lossy_compressed(Dataset(), ts) for ts in ("1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.201")]
    [True, False]
    >>> stored = Dataset(); stored.LossyImageCompression = "00"
    >>> lossy_compressed(stored, "1.2.840.10008.1.2.4.203"), lossy_compressed(stored, "1.2.840.10008.1.2.4.50")
    (False, True)
    >>> lossy_compressed(Dataset(), "1.2.840.10008.1.2.4.111")  # JPEG XL repacking a JPEG baseline file
    True
    """
    flag = str(ds.get("LossyImageCompression", "") or "").strip()
    if flag == "01" or transfer_syntax_uid in ALWAYS_LOSSY:
        return True
    return transfer_syntax_uid in MAYBE_LOSSY and flag != "00"


@dataclass(frozen=True)
class FrameHeader:
    """What series selection and sorting need to know about one frame (one slice)."""

    filename: str
    frame_index: int | None
    """0-based frame of a multi-frame object; ``None`` for single-frame objects."""
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    series_number: int | None
    series_description: str
    modality: str
    image_type: tuple[str, ...]
    orientation: tuple[float, float, float, float, float, float] | None
    position: tuple[float, float, float] | None
    slice_thickness: float | None
    pixel_spacing: tuple[float, float] | None
    instance_number: int | None
    rows: int
    cols: int
    slope: float
    intercept: float
    transfer_syntax_uid: str
    warnings: tuple[str, ...] = ()
    intercept_missing: bool = False
    """No Rescale Intercept: :func:`decode_hu` takes -1024 when the stored air is near 0, else 0."""
    lossy: bool = False
    """The pixels went through lossy compression (:func:`lossy_compressed`)."""
    convolution_kernel: str = ""
    """Convolution Kernel (0018,1210; values joined by a backslash), from the CT Reconstruction functional group of an
    enhanced CT frame; empty when absent."""

    @property
    def key(self) -> tuple[str, int]:
        """Unique id of the frame: ``(sop_instance_uid, frame_index or 0)``."""
        return (self.sop_instance_uid, self.frame_index or 0)


@dataclass
class DecodedSlice:
    """One frame decoded to HU on the 512 grid."""

    header: FrameHeader
    hu: np.ndarray
    """int16 [512, 512]."""
    grid: GridMapping
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def read_dataset(data: bytes | Path, filename: str = "<upload>") -> Dataset:
    """Parse DICOM bytes (Part 10 file, or a bare data set), or a file holding them, into a pydicom Dataset.

    Values longer than :data:`DEFER_BYTES` (native Pixel Data) are not copied: pydicom reads them from
    ``data`` when they are first used (decoding), so a data set kept until its pixels are decoded holds
    no second copy of them; from a file, it holds none at all until then (the file must stay until the
    pixels are decoded).

    Raises
    ------
    gateway.errors.NotDicom
        The bytes are not DICOM.
    """
    if isinstance(data, Path):
        size = data.stat().st_size
        with open(data, "rb") as fh:
            head = fh.read(132)
        source: Any = str(data)
    elif isinstance(data, bytes | bytearray | memoryview):
        data = bytes(data)
        size, head, source = len(data), data[:132], io.BytesIO(data)
    else:
        raise TypeError(f'Argument "data" must be bytes or a path, got {type(data).__name__}.')
    if size < 8:
        raise NotDicom(f"{size} bytes is too short to be DICOM.", filename=filename)
    has_magic = len(head) >= 132 and head[128:132] == b"DICM"
    try:
        ds: Dataset = pydicom.dcmread(source, force=not has_magic, defer_size=DEFER_BYTES)
    except InvalidDicomError as exc:
        raise NotDicom(f"Not a DICOM file: {exc}", filename=filename) from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on broken input
        raw = data.read_bytes() if isinstance(data, Path) else data
        if has_magic and _transfer_syntax_of(raw) == _EXPLICIT_BIG_ENDIAN:
            ds = _read_big_endian_with_un_sequences(raw, filename, exc)
        else:
            raise NotDicom(
                f"DICOM header cannot be parsed: {type(exc).__name__}: {exc}", filename=filename
            ) from exc
    if not has_magic:
        # force=True parses anything; accept it only if it looks like a data set.
        try:
            sop = str(ds.get("SOPClassUID", ""))
        except Exception:  # noqa: BLE001
            sop = ""
        if not sop or not all(c.isdigit() or c == "." for c in sop):
            raise NotDicom("No DICOM preamble and no SOP Class UID: not DICOM.", filename=filename)
        if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta = ds.file_meta if hasattr(ds, "file_meta") else pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds


def _transfer_syntax_of(data: bytes) -> str | None:
    """The Transfer Syntax UID of a Part 10 file's meta group, read without touching its data set."""
    from pydicom.filereader import read_partial

    try:
        meta = read_partial(io.BytesIO(data), stop_when=lambda *_: True).file_meta
        return str(meta.get("TransferSyntaxUID", "")) or None
    except Exception:  # noqa: BLE001
        return None


_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def _read_big_endian_with_un_sequences(data: bytes, filename: str, cause: Exception) -> Dataset:
    """Re-read an Explicit VR Big Endian file whose undefined-length UN elements pydicom misparses.

    PS3.5 6.2.2: a UN element of undefined length holds an Implicit VR Little Endian sequence,
    even in a big endian file; pydicom 3.0 reads it as big endian and fails. We walk the top-level
    elements ourselves, drop such elements (they are never pixel data nor geometry), and parse the
    rest with pydicom.

    Why a walker and not pydicom alone: pydicom (3.0.2) has no public switch for this case.
    ``data_element_generator`` turns an undefined-length UN into SQ (``infer_sq_for_un_vr``) and
    reads it in the file's byte order (``OSError``); turning it and ``replace_un_with_known_vr`` off
    makes it look for a big endian Sequence Delimiter that the little endian value does not hold,
    so the rest of the file, pixel data included, is swallowed with only a warning. Both settings
    are process-wide (``pydicom.config``), so flipping them per file would not be thread-safe
    either. The walker uses public pydicom API only: :func:`pydicom.filereader.read_sequence` finds
    where a sequence ends, :func:`pydicom.filereader.read_partial` reads the meta group.
    """
    from pydicom.filereader import read_sequence

    try:
        pos = 132
        while pos + 8 <= len(data):  # file meta group: always explicit VR little endian
            group = struct.unpack_from("<H", data, pos)[0]
            if group != 0x0002:
                break
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                pos += 12 + struct.unpack_from("<L", data, pos + 8)[0]
            else:
                pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
        out = bytearray(data[:pos])
        dropped = []
        while pos + 8 <= len(data):
            group, elem = struct.unpack_from(">HH", data, pos)
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                length, head = struct.unpack_from(">L", data, pos + 8)[0], 12
            else:
                length, head = struct.unpack_from(">H", data, pos + 6)[0], 8
            if length == 0xFFFFFFFF:
                fp = io.BytesIO(data[pos + head :])
                implicit_le = vr == b"UN"
                read_sequence(fp, implicit_le, implicit_le, 0xFFFFFFFF, "iso8859")
                end = pos + head + fp.tell()
                if implicit_le:
                    dropped.append(f"({group:04X},{elem:04X})")
                else:
                    out += data[pos:end]
                pos = end
            else:
                out += data[pos : pos + head + length]
                pos += head + length
        ds = pydicom.dcmread(io.BytesIO(bytes(out)))
    except Exception as exc:  # noqa: BLE001
        raise NotDicom(
            f"DICOM header cannot be parsed: {type(cause).__name__}: {cause}", filename=filename
        ) from exc
    logger.info("%s: dropped undefined-length UN elements %s from a big endian file", file_ref(filename), dropped)
    return ds


def _fg_value(ds: Dataset, frame: int | None, seq: str, keyword: str) -> Any:
    """Look ``keyword`` up in ``seq`` of the Per-Frame, then Shared Functional Groups, then top level."""
    if frame is not None:
        for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            items = ds.get(groups)
            if not items:
                continue
            item = items[frame] if groups.startswith("PerFrame") and len(items) > frame else items[0]
            inner = item.get(seq)
            if inner and keyword in inner[0]:
                return inner[0][keyword].value
    return ds.get(keyword)


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        vals = tuple(
            float(v)
            for v in (
                value
                if isinstance(value, Sequence | pydicom.multival.MultiValue) and not isinstance(value, str)
                else [value]
            )
        )
    except (TypeError, ValueError):
        return None
    if len(vals) != n or not all(math.isfinite(v) for v in vals):
        return None
    return vals


def _text(value: Any) -> str:
    r"""A string or multi-valued string element as one string (values joined by a backslash); "" when absent.

    >>> _text(["FC52", "AIDR 3D"]), _text("B70f"), _text(None)
    ('FC52\\AIDR 3D', 'B70f', '')
    """
    if value is None:
        return ""
    if isinstance(value, Sequence | pydicom.multival.MultiValue) and not isinstance(value, str):  # as _floats
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _opt_float(value: Any) -> float | None:
    try:
        v = float(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None
    return v if v is not None and math.isfinite(v) else None


def _opt_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def read_headers(filename: str, data: bytes | Dataset) -> tuple[Dataset, list[FrameHeader]]:
    """Parse one object and describe each of its frames; refuse anything that is not a CT image.

    Parameters
    ----------
    filename : str
        Name used in messages.
    data : bytes | pydicom.dataset.Dataset
        The file's bytes, or an already parsed data set.

    Returns
    -------
    tuple[pydicom.dataset.Dataset, list[FrameHeader]]
        The data set (pixels not yet decoded) and one header per frame.

    Raises
    ------
    gateway.errors.NotDicom, gateway.errors.NotCT, gateway.errors.NoPixelData
    """
    ds = data if isinstance(data, Dataset) else read_dataset(data, filename)
    try:
        return ds, _headers(filename, ds)
    except (NotCT, NoPixelData, NotDicom, TooLarge):
        raise
    except Exception as exc:  # noqa: BLE001 - malformed values surface lazily in pydicom
        raise NotDicom(
            f"DICOM header has malformed values: {type(exc).__name__}: {exc}", filename=filename
        ) from exc


def _headers(filename: str, ds: Dataset) -> list[FrameHeader]:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if modality and modality != "CT":
        raise NotCT(f"Modality is {modality!r}, not 'CT'.", filename=filename)
    if not modality and not sop_class:
        raise NotDicom(
            "Neither SOP Class UID nor Modality: not a DICOM image, or a truncated file.", filename=filename
        )
    if not modality and sop_class not in CT_SOP_CLASSES:
        raise NotCT(
            f"No Modality and SOP Class {sop_class or 'absent'} is not a CT image.", filename=filename
        )
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise NoPixelData("CT object has no Pixel Data.", filename=filename)
    if "PixelData" not in ds:
        raise NotCT("Float pixel data is not a CT image.", filename=filename)
    spp = _opt_int(ds.get("SamplesPerPixel")) or 1
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if spp != 1 or not photometric.startswith("MONOCHROME"):
        raise NotCT(
            f"Colour image ({photometric}, {spp} samples per pixel) cannot hold HU.", filename=filename
        )
    bits_stored = _opt_int(ds.get("BitsStored")) or _opt_int(ds.get("BitsAllocated")) or 0
    if bits_stored <= 8:
        raise NotCT(
            f"{bits_stored}-bit pixels cannot hold Hounsfield units "
            f"(a screenshot or secondary capture, SOP Class {sop_class}).",
            filename=filename,
        )
    rows, cols = _opt_int(ds.get("Rows")), _opt_int(ds.get("Columns"))
    if not rows or not cols or rows < 0 or cols < 0:
        raise NotDicom("Rows or Columns missing.", filename=filename)
    n_frames = _opt_int(ds.get("NumberOfFrames")) or 1
    if n_frames < 1:
        raise NotDicom(f"Number of Frames is {n_frames}.", filename=filename)
    if rows > MAX_MATRIX or cols > MAX_MATRIX or n_frames * rows * cols > MAX_PIXELS:
        # checked before decoding: a forged header must not make a codec allocate gigabytes
        raise TooLarge(
            f"{n_frames} frame(s) of {rows}x{cols} pixels exceed the limits "
            f"({MAX_MATRIX}x{MAX_MATRIX}, {MAX_PIXELS} pixels per object).",
            filename=filename,
        )

    multi = n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
    frames: list[int | None] = list(range(n_frames)) if multi else [None]
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    base_type = tuple(str(v).strip().upper() for v in (ds.get("ImageType") or ()))
    lossy = lossy_compressed(ds, ts)
    out = []
    for f in frames:
        warnings: list[str] = []
        raw_slope = _fg_value(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
        raw_intercept = _fg_value(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
        slope, intercept = _opt_float(raw_slope), _opt_float(raw_intercept)
        for keyword, raw, value in (("Slope", raw_slope, slope), ("Intercept", raw_intercept, intercept)):
            if value is None and raw is not None and str(raw).strip() != "":
                # present but NaN, inf or not a number: assuming a default would screen garbage
                raise NotCT(f"Rescale {keyword} is {str(raw).strip()!r}, not a finite number: "
                            "stored values cannot be converted to HU.", filename=filename)
        intercept_missing = intercept is None
        if slope is None or intercept is None:
            if sop_class not in CT_SOP_CLASSES:
                raise NotCT(
                    f"SOP Class {sop_class} without Rescale Slope/Intercept: values are "
                    "not Hounsfield units.",
                    filename=filename,
                )
            warnings.append(MISSING_RESCALE)
            slope = 1.0 if slope is None else slope
            intercept = 0.0 if intercept is None else intercept
        if slope == 0:
            raise NotCT("Rescale Slope is 0.", filename=filename)
        frame_type = _fg_value(ds, f, "CTImageFrameTypeSequence", "FrameType")
        image_type = tuple(str(v).strip().upper() for v in frame_type) if frame_type else base_type
        ps = _floats(_fg_value(ds, f, "PixelMeasuresSequence", "PixelSpacing"), 2)
        out.append(
            FrameHeader(
                filename=filename,
                frame_index=f,
                sop_instance_uid=str(ds.get("SOPInstanceUID", "") or f"{filename}#nouid"),
                sop_class_uid=sop_class,
                study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
                series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
                series_number=_opt_int(ds.get("SeriesNumber")),
                series_description=str(ds.get("SeriesDescription", "") or ""),
                modality=modality or "CT",
                image_type=image_type,
                orientation=_floats(  # type: ignore[arg-type]
                    _fg_value(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
                ),
                position=_floats(  # type: ignore[arg-type]
                    _fg_value(ds, f, "PlanePositionSequence", "ImagePositionPatient"), 3
                ),
                slice_thickness=_opt_float(_fg_value(ds, f, "PixelMeasuresSequence", "SliceThickness")),
                pixel_spacing=ps,  # type: ignore[arg-type]
                instance_number=_opt_int(ds.get("InstanceNumber")),
                rows=rows,
                cols=cols,
                slope=slope,
                intercept=intercept,
                transfer_syntax_uid=ts,
                intercept_missing=intercept_missing,
                lossy=lossy,
                warnings=tuple(warnings),
                convolution_kernel=_text(_fg_value(ds, f, "CTReconstructionSequence", "ConvolutionKernel")),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------
_NATIVE_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"})


def native_fast_path(ds: Dataset) -> np.ndarray | None:
    """Stored values of native little-endian 16-bit data straight from the buffer, or ``None``.

    Same result as pydicom's ``pixel_array`` (high bits above Bits Stored masked off for unsigned
    data, sign-extended for signed data), without its per-call set-up (~1 ms a slice).
    """
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if ts not in _NATIVE_LE or ds.get("BitsAllocated") != 16 or (ds.get("SamplesPerPixel") or 1) != 1:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = _opt_int(ds.get("NumberOfFrames")) or 1
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < frames * rows * cols * 2 or frames < 1:
        return None
    signed = ds.get("PixelRepresentation") == 1
    bits = _opt_int(ds.get("BitsStored")) or 16
    if not 1 <= bits <= 16:
        return None
    arr = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=frames * rows * cols)
    arr = arr.reshape(frames, rows, cols)
    if bits < 16:
        if signed:
            shift = 16 - bits
            arr = np.right_shift(np.left_shift(arr, shift), shift)
        else:
            arr = arr & np.uint16((1 << bits) - 1)
    return arr


def _stored_values(ds: Dataset, filename: str) -> np.ndarray:
    """Decoded stored values as [F, R, C], with J2K signedness trusted over Pixel Representation."""
    try:
        fast = native_fast_path(ds)
    except (AttributeError, TypeError, ValueError):
        fast = None
    if fast is not None:
        return fast
    try:
        arr = ds.pixel_array
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # noqa: BLE001 - codecs raise anything, even pyo3's PanicException
        ts = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        name = getattr(ts, "name", str(ts))
        raise Undecodable(
            f"Pixel data ({name}) cannot be decoded: {type(exc).__name__}: {exc}", filename=filename
        ) from exc
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if ts in _J2K_SYNTAXES and arr.dtype == np.uint16:
        # pydicom can only repair a sign mismatch when Bits Stored < precision; a 16-bit signed
        # codestream labelled Pixel Representation 0 (Toshiba) comes back as uint16 65535 = -1.
        params = _j2k_params(ds)
        if params.get("is_signed") and int(params.get("precision", 0)) == 16:
            arr = arr.view(np.int16)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise Undecodable(f"Decoded pixel array has unexpected shape {arr.shape}.", filename=filename)
    return arr


def _j2k_params(ds: Dataset) -> dict[str, Any]:
    from pydicom.encaps import generate_frames
    from pydicom.pixels.utils import get_j2k_parameters

    try:
        n_frames = _opt_int(ds.get("NumberOfFrames")) or 1
        first = next(generate_frames(ds.PixelData, number_of_frames=n_frames))
        return dict(get_j2k_parameters(first))
    except Exception:  # noqa: BLE001
        return {}


def rescale_to_hu(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray | None = None) -> np.ndarray:
    """Return ``slope * stored + intercept`` rounded to int16 (clipped to the int16 range), written into
    ``out`` (an int16 array of the same shape) when given, so that a frame is copied once.

    Integer arithmetic when ``slope == 1`` and the intercept is integral (the usual CT case).
    """
    if out is None:
        out = np.empty(stored.shape, dtype=np.int16)
    if slope == 1.0 and float(intercept).is_integer():
        b = int(intercept)
        if stored.dtype in (np.int16, np.uint16) and stored.size:
            lo, hi = int(stored.min()), int(stored.max())
            if hi <= 32767 and -32768 <= lo + b and hi + b <= 32767:
                # the usual CT case in one pass: the stored values and the result both fit int16
                np.copyto(out, stored, casting="unsafe")
                out += np.int16(b)
                return out
        hu = stored.astype(np.int32) + b
    else:
        hu = np.rint(stored.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    np.copyto(out, np.clip(hu, -32768, 32767), casting="unsafe")
    return out


def _check_plausible(hu: np.ndarray, filename: str, frame: int | None) -> None:
    # Sample every 8th row: the statistics are robust and this keeps them well under 1 ms a slice.
    sample = hu[::8]
    where = "" if frame is None else f" (frame {frame})"
    high = float(np.count_nonzero(sample > HIGH_HU)) / max(sample.size, 1)
    if high > HIGH_HU_FRACTION:
        raise Undecodable(
            f"Decoded pixels{where} are implausible for CT: {100 * high:.0f}% above {HIGH_HU} HU "
            "(corrupt or mis-decoded compressed data, or wrong Pixel Representation).",
            filename=filename,
        )
    d = np.abs(np.diff(sample.astype(np.int32), axis=1))
    if d.size == 0:  # a single-column frame: nothing to compare
        return
    # "the median is above the limit", counted (a partition per slice cost more than the decode)
    if np.count_nonzero(d > NOISE_LIMIT_HU) > d.size // 2:
        med = float(np.median(d))
        raise Undecodable(
            f"Decoded pixels{where} are noise, not an image: median neighbour difference "
            f"{med:.0f} HU > {NOISE_LIMIT_HU:.0f} HU (corrupt or mis-decoded compressed data).",
            filename=filename,
        )


def _air_stored_near_0(stored: np.ndarray, slope: float) -> bool:
    """Whether a frame's lowest values (its air), padding below -1500 left out, lie above
    :data:`AIR_STORED_NEAR_0`."""
    values = stored.astype(np.float32) * np.float32(slope)
    values = values[values > -1500]  # padding outside the field of view (-2000, -3024, ...)
    return bool(values.size) and float(np.percentile(values, 1)) > AIR_STORED_NEAR_0


def decode_hu(ds: Dataset, headers: Sequence[FrameHeader], filename: str = "<upload>") -> np.ndarray:
    """Decode the frames of ``ds`` to HU on their original grid.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The object, as returned by :func:`read_headers`.
    headers : Sequence[FrameHeader]
        Its frame headers (slope/intercept per frame), as returned by :func:`read_headers`.
    filename : str
        Name used in messages.

    Returns
    -------
    numpy.ndarray
        int16 ``[F, rows, cols]``.

    Raises
    ------
    gateway.errors.Undecodable
        The codec failed, the frame count disagrees, or a frame decodes to noise.
    """
    stored = _stored_values(ds, filename)
    if stored.shape[0] != len(headers):
        raise Undecodable(f"Decoded {stored.shape[0]} frames, header says {len(headers)}.", filename=filename)
    out = np.empty(stored.shape, dtype=np.int16)
    for i, h in enumerate(headers):
        intercept = h.intercept
        if h.intercept_missing and _air_stored_near_0(stored[i], h.slope):
            intercept = -1024.0  # air stored near 0: without it the lungs read as water (+1024 HU)
        rescale_to_hu(stored[i], h.slope, intercept, out=out[i])  # each frame written once, in place
        _check_plausible(out[i], filename, h.frame_index)
    return out


def standard_flips(orientation: Sequence[float] | None) -> tuple[bool, bool]:
    """``(flip_rows, flip_cols)`` that put an axial image into the radiological convention.

    The models learnt axial slices as scanners usually store them (Image Orientation (Patient)
    ``1,0,0,0,1,0``: columns run to the patient's left, rows to posterior). A slice stored with a row
    direction pointing to the patient's right, or a column direction pointing anterior (prone
    protocols, some reformats), is mirrored back before inference and its boxes mirrored again on the
    way out. Only the dominant axis counts; a non-axial or unknown orientation is left as it is.

    >>> standard_flips((1, 0, 0, 0, -1, 0)), standard_flips((-1, 0, 0, 0, 1, 0)), standard_flips(None)
    ((True, False), (False, True), (False, False))
    """
    if orientation is None or len(orientation) != 6:
        return False, False
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    axial = np.argmax(np.abs(row)) == 0 and np.argmax(np.abs(col)) == 1
    if not axial:
        return False, False
    return bool(col[1] < 0), bool(row[0] < 0)


def to_grid(
    hu: np.ndarray, size: int = SLICE_SIZE, orientation: Sequence[float] | None = None
) -> tuple[np.ndarray, GridMapping]:
    """Resample one HU slice to ``size x size`` (mirror into the radiological convention, pad to
    square with air, then linear zoom).

    Parameters
    ----------
    hu : numpy.ndarray
        2-D HU slice, any shape.
    size : int
        Output side (the model's 512).
    orientation : sequence of 6 floats or None
        Image Orientation (Patient), for :func:`standard_flips`.

    Returns
    -------
    tuple[numpy.ndarray, GridMapping]
        int16 ``[size, size]`` and the mapping back to the original grid.
    """
    if hu.ndim != 2 or min(hu.shape) < 1:
        raise ValueError(f'Argument "hu" must be a non-empty 2-D slice, got shape {hu.shape}.')
    rows, cols = hu.shape
    flip_rows, flip_cols = standard_flips(orientation)
    if flip_rows:
        hu = hu[::-1]
    if flip_cols:
        hu = hu[:, ::-1]
    flips = {"flip_rows": flip_rows, "flip_cols": flip_cols}
    if rows == size and cols == size:
        return np.ascontiguousarray(hu, dtype=np.int16), GridMapping(rows, cols, **flips)
    n = max(rows, cols)
    pad_top, pad_left = (n - rows) // 2, (n - cols) // 2
    mapping = GridMapping(rows, cols, scale=n / size, pad_top=pad_top, pad_left=pad_left, **flips)
    if n == size:  # a cropped field (e.g. 512 x 476): padding alone puts it on the grid (a zoom by 1 is the
        # identity, and it cost ~7 ms a slice)
        square = np.full((n, n), PAD_HU, dtype=np.int16)
        square[pad_top : pad_top + rows, pad_left : pad_left + cols] = hu
        return square, mapping
    square = np.full((n, n), PAD_HU, dtype=np.float32)
    square[pad_top : pad_top + rows, pad_left : pad_left + cols] = hu
    out = ndimage.zoom(square, size / n, order=1, mode="nearest", grid_mode=True, prefilter=False)
    if out.shape != (size, size):  # zoom rounds the output shape; n * size / n is exact
        raise AssertionError(f"zoom produced {out.shape}")
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16), mapping


def decode_file(filename: str, data: bytes | Dataset) -> list[DecodedSlice]:
    """Read, check and decode one object to 512-grid HU slices (one per frame).

    Raises
    ------
    gateway.errors.NotDicom, gateway.errors.NotCT, gateway.errors.NoPixelData,
    gateway.errors.Undecodable
    """
    ds, headers = read_headers(filename, data)
    native = decode_hu(ds, headers, filename)
    out = []
    for h, frame in zip(headers, native, strict=True):
        grid_hu, grid = to_grid(frame, orientation=h.orientation)
        out.append(DecodedSlice(header=h, hu=grid_hu, grid=grid, warnings=list(h.warnings)))
    return out
