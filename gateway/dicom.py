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
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from aggregator.schema import counted
from ctscreen.contracts import SLICE_SIZE
from gateway.errors import NoPixelData, NotCT, NotDicom, TooLarge, Undecodable, ZipBomb
from gateway.phi import file_ref

logger = logging.getLogger(__name__)

__all__ = [
    "CT_SOP_CLASSES",
    "DEFLATED",
    "PAD_HU",
    "CodestreamHeader",
    "DecodedSlice",
    "FrameHeader",
    "GridMapping",
    "codestream_header",
    "decode_file",
    "decode_hu",
    "header_value",
    "image_noise_hu",
    "inflate_deflated",
    "part10_transfer_syntax",
    "read_dataset",
    "read_failed",
    "read_headers",
    "rescale_to_hu",
    "to_grid",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
CT_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT})
"""SOP classes that are CT images whatever (0008,0060) Modality says (it is sometimes absent)."""
DEFLATED = "1.2.840.10008.1.2.1.99"
"""Deflated Explicit VR Little Endian: the data set after the meta group is raw-deflated (:func:`inflate_deflated`)."""

PAD_HU = -1024
"""Fill value (air) used when a non-square slice is padded to a square before resampling."""

NOISE_LIMIT_HU = 400.0
"""A frame whose median absolute difference between horizontal neighbours exceeds this is noise.

Real CT, even low-dose, stays far below (the edge-case corpus: at most ~100 HU, a head scan
with dental metal artefacts); a wrongly decoded lossless JPEG (wrong predictor, lost sync)
reaches > 1000 HU."""

NOISY_HU: Final = 38.0
"""Image noise (:func:`image_noise_hu`, on the grid) above which a study is warned about. The models were measured
with noise added to real slices (``python -m benchmarks noise``, docs/models/real-ct.md): their false boxes did
not grow with 30 HU added (the measure then read 24-34 HU on the four real normal chest slices, whose own noise
reads 14-27 HU), and grew two to four times with 60 HU added (40-56 HU). The real training slices, 8-bit exports,
read 9-14 HU. Derived from the MedSeg test slices and the evaluation's normal chest slices (3 patients), the very
slices that evaluate it: no separate set checked it."""

MAX_MATRIX = 4096
"""Largest Rows or Columns accepted (CT is 512-1024; some micro-CT 2048)."""
MAX_PIXELS = 1 << 29
"""Most pixels (all frames) in one object: 1 GiB as int16."""

HIGH_HU = 4000
HIGH_HU_FRACTION = 0.05
"""More than this fraction of a frame above :data:`HIGH_HU` (bone is < 2000, the 12-bit CT scale ends
at 3071; metal reaches higher but covers far less of a slice) means the decode went wrong."""

MAX_FIELD_MM = 2560.0
"""A field of view (pixel spacing times the matrix) over this (2.5 m), or a spacing not above 0, is no CT's: the
scale is unknown (:func:`known_spacing`)."""


def known_spacing(spacing: Sequence[float] | None, rows: int, cols: int) -> bool:
    """Whether Pixel Spacing ``spacing`` of a ``rows x cols`` slice states a CT's scale (:data:`MAX_FIELD_MM`).

    >>> known_spacing((0.7, 0.7), 512, 512), known_spacing((5.6, 5.6), 64, 64), known_spacing((6.0, 6.0), 512, 512)
    (True, True, False)
    >>> known_spacing(None, 512, 512), known_spacing((0.0, 0.7), 512, 512)
    (False, False)
    """
    if spacing is None or len(spacing) != 2:
        return False
    row_mm, col_mm = (float(v) for v in spacing)
    return 0.0 < row_mm and 0.0 < col_mm and row_mm * rows <= MAX_FIELD_MM and col_mm * cols <= MAX_FIELD_MM

DEFER_BYTES = 64 * 1024
"""Values longer than this are read from the source bytes on first use (:func:`read_dataset`)."""

MAX_INFLATED_BYTES = 2 * MAX_PIXELS + 64 * 1024 * 1024
"""Most bytes a Deflated Explicit VR Little Endian data set may inflate to: the largest Pixel Data
accepted (:data:`MAX_PIXELS` as 16-bit) and 64 MiB for the rest (:func:`inflate_deflated`)."""
MAX_DEFLATE_RATIO = 100
"""Most a deflated data set larger than :data:`DEFLATE_RATIO_FLOOR` may expand (inflated / compressed
bytes), as for zip members: deflate shrinks real CT 2-5x, a run of zeros 1000x."""
DEFLATE_RATIO_FLOOR = 64 * 1024 * 1024
"""Inflated sizes up to this are not ratio-checked (an all-air slice deflates far beyond 100x)."""

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
_EXPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
_INFLATE_IN = 1024 * 1024  # compressed bytes fed to zlib at a time
_INFLATE_OUT = 16 * 1024 * 1024  # most inflated bytes zlib returns at a time


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
    transpose : bool
        The original's rows and columns were swapped first (a decubitus slice, whose image runs from the
        patient's front to back along its rows: :func:`standard_orientation`); ``rows`` and ``cols`` stay the original's,
        and the grid holds the ``cols x rows`` image.
    flip_rows, flip_cols : bool
        The (swapped) image was then mirrored top-bottom / left-right, to put it in the radiological
        convention the models learnt (anterior at the top, the patient's right on the image's left):
        see :func:`standard_orientation`.
    """

    rows: int
    cols: int
    scale: float = 1.0
    pad_top: int = 0
    pad_left: int = 0
    flip_rows: bool = False
    flip_cols: bool = False
    transpose: bool = False

    @property
    def is_identity(self) -> bool:
        """True when the slice was 512 x 512 and nothing was resampled, swapped or mirrored."""
        return (self.scale == 1.0 and self.pad_top == 0 and self.pad_left == 0
                and not self.flip_rows and not self.flip_cols and not self.transpose)

    @property
    def upright(self) -> tuple[int, int]:
        """``(rows, cols)`` of the original once swapped (:attr:`transpose`): the image the grid holds."""
        return (self.cols, self.rows) if self.transpose else (self.rows, self.cols)

    def _unflip(self, out: np.ndarray, keep: np.ndarray) -> None:
        """Mirror inclusive boxes ``out[keep]`` (the swapped original's grid) back where the flips took them."""
        rows, cols = self.upright
        if self.flip_cols:
            x0 = out[keep, 0].copy()
            out[keep, 0] = cols - 1 - out[keep, 2]
            out[keep, 2] = cols - 1 - x0
        if self.flip_rows:
            y0 = out[keep, 1].copy()
            out[keep, 1] = rows - 1 - out[keep, 3]
            out[keep, 3] = rows - 1 - y0

    def _swap(self, out: np.ndarray, keep: np.ndarray) -> None:
        """Swap x and y of inclusive boxes ``out[keep]`` when the original was transposed (its own inverse)."""
        if self.transpose:
            out[keep, :4] = out[keep][:, [1, 0, 3, 2]]

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
        rows, cols = self.upright
        x0 = np.floor(b[:, 0] * s + 1e-9) - self.pad_left
        y0 = np.floor(b[:, 1] * s + 1e-9) - self.pad_top
        x1 = np.ceil((b[:, 2] + 1) * s - 1e-9) - 1 - self.pad_left
        y1 = np.ceil((b[:, 3] + 1) * s - 1e-9) - 1 - self.pad_top
        mapped = np.stack(
            [
                np.clip(x0, 0, cols - 1),
                np.clip(y0, 0, rows - 1),
                np.clip(x1, 0, cols - 1),
                np.clip(y1, 0, rows - 1),
            ],
            axis=1,
        )
        out[~pad, :4] = mapped[~pad]
        self._unflip(out, ~pad)
        self._swap(out, ~pad)
        return out

    def to_grid(self, boxes: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_original`: original-grid boxes to the smallest covering 512-grid box."""
        b = _as_boxes(boxes, "boxes")
        out = b.astype(np.float64, copy=True)
        if out.shape[0] == 0 or self.is_identity:
            return out
        s = self.scale
        b = b.astype(np.float64, copy=True)
        every = np.ones(len(b), bool)
        self._swap(b, every)  # swapping and mirroring are each their own inverse
        self._unflip(b, every)
        out[:, 0] = np.floor((b[:, 0] + self.pad_left) / s + 1e-9)
        out[:, 1] = np.floor((b[:, 1] + self.pad_top) / s + 1e-9)
        out[:, 2] = np.ceil((b[:, 2] + 1 + self.pad_left) / s - 1e-9) - 1
        out[:, 3] = np.ceil((b[:, 3] + 1 + self.pad_top) / s - 1e-9) - 1
        out[:, :4] = np.clip(out[:, :4], 0, SLICE_SIZE - 1)
        return out

    def footprint(self, size: int = SLICE_SIZE) -> tuple[slice, slice]:
        """The rows and columns of the ``size`` grid that lie on the original image (not on what :func:`to_grid` put
        around it: air, a body wall)."""
        s = self.scale
        rows, cols = self.upright
        return (slice(max(0, math.ceil(self.pad_top / s - 1e-9)), min(size, math.floor((rows + self.pad_top) / s + 1e-9))),
                slice(max(0, math.ceil(self.pad_left / s - 1e-9)), min(size, math.floor((cols + self.pad_left) / s + 1e-9))))

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
            "transpose": self.transpose,
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
def read_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is the operating system failing a read (EIO, a stale NFS handle, a file gone), not a
    broken file: an :class:`OSError` with an errno. Such errors pass through the decoders' catch-alls, so
    that a job is tried again instead of screened without the file (a codec's own ``OSError``, e.g. Pillow's
    "broken data stream", has no errno and stays a refusal of the file)."""
    return isinstance(exc, OSError) and exc.errno is not None


_ITEM_TAGS: Final = frozenset({(0xFFFE, 0xE000), (0xFFFE, 0xE0DD),  # Item, Sequence Delimitation Item, and
                                (0xFEFF, 0x00E0), (0xFEFF, 0xDDE0)})  # the same read in the other byte order (a
# big endian file's UN sequence holds little endian items: read on, then dropped, as before, by read_dataset)
_pydicom_read_sequence_item = pydicom.filereader.read_sequence_item


def _item_or_refusal(fp: BinaryIO, is_implicit_VR: bool, is_little_endian: bool, *args: Any, **kwargs: Any) -> Any:
    """pydicom's reader of a sequence item, refusing a sequence whose next element is neither an item nor the
    sequence's end (PS3.5 7.5). pydicom reads any tag there as an item: a 24-byte broken sequence of undefined
    length ahead of 30 MiB of pixels made it read each 8 bytes of the pixels as an empty item, 4 million data
    sets (a minute of CPU and 2.4 GiB for one C-STORE instance of 30 MiB; an upload alike). Installed in
    :mod:`pydicom.filereader` when this module is imported, for every reader of the gateway."""
    at = fp.tell()
    head = fp.read(4)
    fp.seek(at)
    if len(head) == 4:
        tag = struct.unpack("<HH" if is_little_endian else ">HH", head)
        if tag not in _ITEM_TAGS:
            raise InvalidDicomError(f"a sequence holds ({tag[0]:04X},{tag[1]:04X}) at byte {at} where an item or "
                                    "its end must be: not a DICOM data set")
    return _pydicom_read_sequence_item(fp, is_implicit_VR, is_little_endian, *args, **kwargs)


pydicom.filereader.read_sequence_item = _item_or_refusal


def read_dataset(data: bytes | Path, filename: str = "<upload>") -> Dataset:
    """Parse DICOM bytes (Part 10 file, or a bare data set), or a file holding them, into a pydicom Dataset.

    Values longer than :data:`DEFER_BYTES` (native Pixel Data) are not copied: pydicom reads them from
    ``data`` when they are first used (decoding), so a data set kept until its pixels are decoded holds
    no second copy of them; from a file, it holds none at all until then (the file must stay until the
    pixels are decoded). Native 16-bit Pixel Data is read by :func:`decode_hu` into its result alone: the data
    set holds no copy of it afterwards either.

    A Deflated Explicit VR Little Endian file is inflated first, with bounds (:func:`inflate_deflated`);
    the inflated copy is what the data set then reads its deferred values from.

    Raises
    ------
    gateway.errors.NotDicom
        The bytes are not DICOM.
    gateway.errors.ZipBomb, gateway.errors.TooLarge
        A deflated data set inflates past the bounds of :func:`inflate_deflated`.
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
    deflated = has_magic and part10_transfer_syntax(data) == DEFLATED
    if deflated:
        # pydicom would inflate the whole data set, without bound: a 1 MB file can hold gigabytes of zeros
        data = inflate_deflated(data.read_bytes() if isinstance(data, Path) else data, filename)
        source = io.BytesIO(data)
    try:
        ds: Dataset = pydicom.dcmread(source, force=not has_magic, defer_size=DEFER_BYTES)
    except InvalidDicomError as exc:
        raise NotDicom(f"Not a DICOM file: {exc}", filename=filename) from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on broken input
        if read_failed(exc):
            raise
        raw = data.read_bytes() if isinstance(data, Path) else data
        if has_magic and part10_transfer_syntax(raw) == _EXPLICIT_BIG_ENDIAN:
            ds = _read_big_endian_with_un_sequences(raw, filename, exc)
        elif _ran_out(exc):
            raise NotDicom("The DICOM header ends inside an element or a sequence: the file is truncated, or a length "
                           "in it runs past its end.", filename=filename) from exc
        else:
            raise NotDicom(
                f"DICOM header cannot be parsed: {type(exc).__name__}: {exc}", filename=filename
            ) from exc
    if deflated:  # parsed from its inflated copy (explicit VR little endian): name the syntax it came in
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(DEFLATED)
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


def _ran_out(exc: BaseException) -> bool:
    """Whether pydicom's reader failed for want of bytes: an element's tag, VR or length cut short (``struct.error``,
    "unpack requires a buffer of 4 bytes"), or no item where a sequence of undefined length goes on ("No tag to read
    at file position 436"). Said so, not in those words: a truncated file is the usual cause."""
    return isinstance(exc, struct.error) or (isinstance(exc, OSError) and str(exc).startswith("No tag to read"))


def part10_transfer_syntax(data: bytes | Path) -> str | None:
    """The Transfer Syntax UID in the meta group of a Part 10 file (its bytes, or the file), or ``None``
    (no "DICM" prefix, no UID). Reads the meta group's element headers and the UID alone: never the data set,
    which pydicom's readers inflate whole when it is deflated.

    >>> part10_transfer_syntax(b"not DICOM") is None
    True
    """
    if isinstance(data, Path):
        with open(data, "rb") as fh:
            return _meta_group(fh)[1]
    return _meta_group(io.BytesIO(data))[1]


def same_data_set(a: bytes, b: bytes) -> bool:
    """Whether two Part 10 files (or bare data sets) hold the same data set, byte for byte, whatever their meta
    groups say (a C-STORE SCP writes its own; a STOW part is the sender's file).

    >>> meta = lambda n: bytes(128) + b"DICM" + bytes([2, 0, 0x13, 0]) + b"SH" + bytes([n, 0]) + b"x" * n
    >>> same_data_set(meta(2) + b"DATA", meta(4) + b"DATA"), same_data_set(meta(2) + b"DATA", meta(2) + b"DATB")
    (True, False)
    """
    at_a, at_b = _meta_group(io.BytesIO(a))[0], _meta_group(io.BytesIO(b))[0]
    return len(a) - at_a == len(b) - at_b and a[at_a:] == b[at_b:]


_RE_ENCODED: Final = frozenset({0x7FE00010, 0x00282110, 0x00282112, 0x00282114})
"""Pixel Data and the Lossy Image Compression attributes: what re-encoding an instance in another transfer
syntax changes (the pixels themselves are compared decoded)."""


def same_instance(a: bytes, b: bytes, filename: str = "<upload>") -> bool:
    """Whether two copies of an instance hold the same data set: byte for byte (:func:`same_data_set`), or
    with the same data elements (but for Pixel Data and the Lossy Image Compression attributes) and the same
    stored pixel values once decoded, whatever their transfer syntaxes and encodings (lengths, byte order,
    VR). A PACS that forwards a study again decompressed, or in JPEG-LS, RLE or JPEG 2000 lossless, sends
    the same instance, and it is not screened again; one re-encoded lossily, or with a pixel or an element
    corrected, is. A copy that cannot be read or decoded is not the same (screened again, never dropped).
    """
    if same_data_set(a, b):
        return True
    try:
        da, db = read_dataset(a, filename), read_dataset(b, filename)
        tags = {int(t) for t in da.keys()} | {int(t) for t in db.keys()}
        for tag in sorted(tags - _RE_ENCODED):
            if tag in da and tag in db and da[tag].value == db[tag].value:
                continue
            return False
        pa, pb = _stored_values(da, filename)[0], _stored_values(db, filename)[0]
        return pa.shape == pb.shape and bool(np.array_equal(pa, pb))
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException:  # noqa: BLE001 - unreadable or undecodable: not known to be the same
        return False


def _meta_group(fh: BinaryIO) -> tuple[int, str | None]:
    """Walk the meta group of a Part 10 file from its start: the offset of the data set after it and the
    Transfer Syntax UID (``(0, None)`` without the "DICM" prefix). The meta group is explicit VR little
    endian; an implicit VR one (some old writers) is walked too."""
    head = fh.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        return 0, None
    pos, ts = 132, None
    while True:
        fh.seek(pos)
        elem = fh.read(8)
        if len(elem) < 8 or struct.unpack_from("<H", elem)[0] != 0x0002:
            break
        vr = elem[4:6]
        if vr in _LONG_VRS:
            more = fh.read(4)
            if len(more) < 4:
                break
            length, value_at = struct.unpack("<L", more)[0], pos + 12
        elif vr.isalpha() and vr.isupper():
            length, value_at = struct.unpack_from("<H", elem, 6)[0], pos + 8
        else:  # implicit VR: a 4-byte length
            length, value_at = struct.unpack_from("<L", elem, 4)[0], pos + 8
        if length == 0xFFFFFFFF:  # no undefined lengths in a meta group: leave the rest to pydicom
            break
        if struct.unpack_from("<H", elem, 2)[0] == 0x0010 and length <= 256:
            ts = fh.read(length).rstrip(b"\0 ").decode("ascii", "replace") or None
        pos = value_at + length
    return pos, ts


def inflate_deflated(data: bytes, filename: str = "<upload>") -> bytes:
    """A Deflated Explicit VR Little Endian Part 10 file as an Explicit VR Little Endian one, for pydicom to
    parse: the same preamble and meta group (but for its Transfer Syntax UID), then the data set inflated.

    pydicom inflates a deflated data set whole (``zlib.decompress`` of everything after the meta group,
    raw deflate), without bound. Here inflation stops at :data:`MAX_INFLATED_BYTES`, and at
    :data:`MAX_DEFLATE_RATIO` times the compressed size once past :data:`DEFLATE_RATIO_FLOOR`: both
    :func:`read_dataset` (uploads) and :func:`gateway.stow.read_header` (STOW-RS, C-STORE) read
    deflated files through this.

    Raises
    ------
    gateway.errors.ZipBomb
        The data set expands more than :data:`MAX_DEFLATE_RATIO` times.
    gateway.errors.TooLarge
        It inflates past :data:`MAX_INFLATED_BYTES`.
    gateway.errors.NotDicom
        The meta group or the deflate stream is broken or truncated.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta_end, ts = _meta_group(io.BytesIO(data))
    if ts != DEFLATED:
        raise NotDicom(f"Transfer syntax {ts!r} is not Deflated Explicit VR Little Endian.", filename=filename)
    compressed = len(data) - meta_end
    limit = min(MAX_INFLATED_BYTES, max(DEFLATE_RATIO_FLOOR, MAX_DEFLATE_RATIO * compressed))
    try:
        meta = pydicom.dcmread(io.BytesIO(data[:meta_end])).file_meta
        meta.TransferSyntaxUID = pydicom.uid.UID(_EXPLICIT_LITTLE_ENDIAN)
        head = DicomBytesIO()
        head.write(data[:128] + b"DICM")
        write_file_meta_info(head, meta, enforce_standard=False)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on broken input
        raise NotDicom(f"DICOM meta group cannot be parsed: {type(exc).__name__}: {exc}", filename=filename) from exc
    parts, total = [head.getvalue()], 0
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as PS3.5 A.5 and pydicom
    view = memoryview(data)
    try:
        for start in range(meta_end, len(data), _INFLATE_IN):
            chunk: bytes | memoryview = view[start : start + _INFLATE_IN]
            while True:
                room = min(_INFLATE_OUT, limit - total + 1)  # one byte past the limit shows it is passed
                piece = inflater.decompress(chunk, room)
                total += len(piece)
                if total > limit:
                    if limit == MAX_INFLATED_BYTES:
                        raise TooLarge(
                            f"Deflated data set inflates past {limit} bytes ({compressed} bytes compressed): "
                            "over the largest object accepted.",
                            filename=filename,
                        )
                    raise ZipBomb(
                        f"Deflated data set expands more than {limit / max(compressed, 1):.0f}x ({compressed} "
                        f"-> more than {limit} bytes); the limit is {MAX_DEFLATE_RATIO}x above "
                        f"{DEFLATE_RATIO_FLOOR} bytes.",
                        filename=filename,
                    )
                parts.append(piece)
                chunk = inflater.unconsumed_tail
                if inflater.eof or (not chunk and len(piece) < room):  # else zlib may hold more output
                    break
            if inflater.eof:
                break
    except zlib.error as exc:
        raise NotDicom(f"Deflated data set cannot be inflated: {exc}", filename=filename) from exc
    if not inflater.eof:
        raise NotDicom("Deflated data set is truncated (the deflate stream does not end).", filename=filename)
    return b"".join(parts)


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
        pos = _meta_group(io.BytesIO(data))[0]  # file meta group: explicit VR little endian
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


_PLAIN_VALUE: Final = {vr: re.compile(pydicom.valuerep.VR_REGEXES[vr]) for vr in ("CS", "DS", "IS", "UI")}
_PLAIN_TEXT: Final = re.compile(r"[ -\[\]-~]*")  # printable ASCII but the backslash (LO, SH: one value)
_PLAIN_CHARSETS: Final = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"})
_KEYWORD_TAGS: dict[str, tuple[int, str]] = {}


def header_value(ds: Dataset, keyword: str, default: Any = None, *, many: bool = False) -> Any:
    """``ds.get(keyword, default)`` for what the per-frame headers read (:func:`read_headers`), read straight from the
    bytes of an element not converted yet when they are plain: one value (``many``: or several, as a list) of a US,
    UI, CS, DS, IS, LO or SH element, in the VR its tag has, whose characters are ones pydicom's checks pass without a
    word (printable ASCII; LO and SH in a character set that reads ASCII as ASCII). A str, int or float (a list of
    them), which ``str()``, ``int()`` or ``float()`` read as pydicom's own value; anything else is pydicom's
    ``ds.get``, as before. pydicom converting each element it is asked for costs ~8 us an element, a fifth of a
    slice's parse."""
    spec = _KEYWORD_TAGS.get(keyword)
    if spec is None:
        tag = pydicom.datadict.tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f'Argument "keyword" names no DICOM element: {keyword!r}.')
        spec = _KEYWORD_TAGS[keyword] = (tag, pydicom.datadict.dictionary_VR(tag))
    tag, vr = spec
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return default
    if isinstance(elem, pydicom.dataelem.RawDataElement) and elem.value and (elem.VR or vr) == vr:
        value = _plain(ds, elem.value, vr, bool(elem.is_little_endian), many)
        if value is not None:
            return value
    return ds.get(keyword, default)


def _plain(ds: Dataset, raw: bytes, vr: str, little_endian: bool, many: bool) -> Any:
    """:func:`header_value` of the bytes ``raw`` of a ``vr`` element; None when they are not plain."""
    if vr == "US":
        return int.from_bytes(raw, "little") if len(raw) == 2 and little_endian and not many else None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    most = pydicom.valuerep.MAX_VALUE_LEN.get(vr, 0)
    if vr in ("LO", "SH"):  # pydicom: split, each value checked for its length, then stripped of trailing spaces, NULs
        values = text.split("\\")
        if not _plain_charset(ds) or not all(len(v) <= most for v in values):
            return None
        values = [v.rstrip("\0 ") for v in values]
        if not all(_PLAIN_TEXT.fullmatch(v) for v in values):
            return None
    elif vr in _PLAIN_VALUE:  # pydicom: trailing spaces and NULs stripped (DS: leading spaces too), then split
        values = (text.strip() if vr == "DS" else text).rstrip(" \0").split("\\")
        pattern = _PLAIN_VALUE[vr]
        if not all(len(v) <= most and _PLAIN_TEXT.fullmatch(v) and pattern.match(v) for v in values):
            return None  # pydicom would warn of it, or read it otherwise (a UID's spaces stripped, ...)
        if vr == "DS":
            floats = [float(v) for v in values]
            if not all(math.isfinite(f) for f in floats):
                return None
            return _one_or_many(floats, many)
        if vr == "IS":
            ints = [int(v) for v in values]
            if not all(-(1 << 31) <= i < (1 << 31) for i in ints):
                return None
            return _one_or_many(ints, many)
    else:
        return None
    return _one_or_many(values, many)


def _one_or_many(values: list[Any], many: bool) -> Any:
    """As pydicom gives an element's values: one value alone, several as a list (``many``; else None)."""
    return values[0] if len(values) == 1 else values if many else None


def _plain_charset(ds: Dataset) -> bool:
    """Whether ``ds``'s Specific Character Set (none, or one value that reads ASCII as ASCII) decodes printable ASCII
    bytes as those characters, with no word from pydicom."""
    elem = ds.get_item(0x00080005, keep_deferred=True)
    if elem is None:
        return True
    value = elem.value
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii").strip(" \0")
        except UnicodeDecodeError:
            return False
    return isinstance(value, str) and value.strip() in _PLAIN_CHARSETS


def _fg_value(ds: Dataset, frame: int | None, seq: str, keyword: str, *, many: bool = False) -> Any:
    """Look ``keyword`` up in ``seq`` of the Per-Frame, then Shared Functional Groups, then top level
    (:func:`header_value`, ``many`` as there)."""
    if frame is not None:
        for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            items = ds.get(groups)
            if not items:
                continue
            item = items[frame] if groups.startswith("PerFrame") else items[0]  # one per frame (_headers checks)
            inner = item.get(seq)
            if inner and keyword in inner[0]:
                return inner[0][keyword].value
    return header_value(ds, keyword, many=many)


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


def _codes(value: Any) -> tuple[str, ...]:
    """A code string element's values, upper case: one value is one code, not its letters.

    >>> _codes(["original", "PRIMARY ", "AXIAL"]), _codes("DERIVED"), _codes(None)
    (('ORIGINAL', 'PRIMARY', 'AXIAL'), ('DERIVED',), ())
    """
    if value is None or value == "":
        return ()
    values = [value] if isinstance(value, str | bytes) else value
    return tuple(str(v).strip().upper() for v in values)


def joined_text(value: Any) -> str:
    r"""A string or multi-valued string element as one string (values joined by a backslash); "" when absent.

    >>> joined_text(["FC52", "AIDR 3D"]), joined_text("B70f"), joined_text(None)
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
        if read_failed(exc):  # a deferred value read from a file that failed: no fault of the file
            raise
        # an element whose bytes do not fit its VR (Slice Thickness written as FD): named, its bytes not quoted, as
        # pydicom's BytesLengthException quotes them (up to 256 bytes of the uploader's header, into the job's view)
        if (tag := _first_unreadable(ds)) is not None:
            raise unreadable(ds, tag, filename) from exc
        raise NotDicom(
            f"DICOM header has malformed values: {type(exc).__name__}: {exc}", filename=filename
        ) from exc


MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL IVOCT IVUS "
    "KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX REG RESP RF RG RTDOSE "
    "RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA "
    "XAPROTOCOL XC".split())
"""The Modality defined terms (PS3.3 C.7.3.1.1.1): the only values a refusal quotes."""


def modality_said(modality: str) -> str:
    """How a refusal names a Modality that is not CT: a defined term as it is; any other value withheld, by its
    length only. A Modality whose length was broken takes in the elements after it (the patient's name among
    them), and the refusal's message is kept in the result that every reader of results sees.

    >>> modality_said("MR"), modality_said("DOE^JANE MRN-778899")
    ("'MR'", 'an unrecognised value of 19 characters (withheld: it may hold patient data)')
    """
    if modality in MODALITIES:
        return repr(modality)
    return f"an unrecognised value of {len(modality)} characters (withheld: it may hold patient data)"


_DECODER_READS: Final = ("SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "Rows", "Columns",
                          "NumberOfFrames", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                          "PixelPaddingValue", "PixelPaddingRangeLimit", "ExtendedOffsetTable", "ExtendedOffsetTableLengths")
"""The elements of the image pixel module that decoding reads (:func:`decode_hu`, pydicom's decoders)."""
_DECODER_NUMBERS: Final = frozenset(_DECODER_READS) - {"PhotometricInterpretation"}


def unreadable(ds: Dataset, keyword: str | int, filename: str) -> NotDicom:
    """The refusal of ``ds`` whose element ``keyword`` (or tag) pydicom could not convert in the VR it was written with
    (a UID written as FL, Bits Allocated as SL holding 2 bytes, a VR that does not exist): the element named, its
    bytes not quoted (pydicom's message quotes them)."""
    elem = ds.get_item(keyword, keep_deferred=True)  # still as read: its bytes
    written = f"{len(elem.value)} bytes of VR {elem.VR}" if isinstance(elem.value, bytes) else f"VR {elem.VR}"
    try:
        name = pydicom.datadict.dictionary_description(elem.tag)
    except KeyError:  # a private or unknown element
        name = "Element"
    return NotDicom(f"{name} {elem.tag} cannot be read ({written}).", filename=filename)


def _first_unreadable(ds: Dataset) -> int | None:
    """The tag of the first element of ``ds`` (its top level, Pixel Data left out) that pydicom cannot convert in the
    VR it was written with, or None. Asked only once a header failed: converting every element costs ~8 us each."""
    for tag in list(ds.keys()):
        if tag == _PIXEL_DATA:
            continue
        try:
            ds[tag]
        except Exception:  # noqa: BLE001 - pydicom raises many types on a value that does not fit its VR
            return int(tag)
    return None


def _check_pixel_elements(ds: Dataset, filename: str) -> None:
    """Refuse ``ds`` when an element of :data:`_DECODER_READS` cannot be read in the VR it was written with (Bits
    Allocated as SL holding 2 bytes, a VR that does not exist), or reads as text where a number must be (Bits Stored
    as CS: "'<=' not supported between instances of 'int' and 'str'" from the decoder), naming it.

    pydicom converts an element when it is first read: some of these were first read by the decoder, after the
    header checks, and pydicom's BytesLengthException or NotImplementedError failed the whole study as an internal
    error. :func:`header_value` converts only an element that is not plain (a plain one converts without fail),
    so a well-formed file costs no conversion here.

    Raises
    ------
    gateway.errors.NotDicom
    """
    for keyword in _DECODER_READS:
        try:
            value = header_value(ds, keyword)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a value that does not fit its VR
            if read_failed(exc):
                raise
            raise unreadable(ds, keyword, filename) from None
        values = value if isinstance(value, list | pydicom.multival.MultiValue) else [value]
        if keyword in _DECODER_NUMBERS and not all(v is None or isinstance(v, int | float | bytes) for v in values):
            elem = ds[keyword]  # bytes: a VR left unresolved (UN), read as the padding code reads it
            raise NotDicom(f"{pydicom.datadict.dictionary_description(elem.tag)} {elem.tag} is not a number (VR "
                           f"{elem.VR}).", filename=filename)


def _check_frames_fit(ds: Dataset, pixels: Any, n_frames: int, rows: int, cols: int, filename: str) -> None:
    """Refuse a Number of Frames that the Pixel Data cannot hold: native, Rows x Columns x Bits Allocated each;
    encapsulated, at least an item (8 bytes) each.

    Each frame gets a :class:`FrameHeader` before any pixel is read: an 8 KiB slice saying 100,000 frames cost 8 s
    of CPU (the decoder refused it afterwards).

    Raises
    ------
    gateway.errors.NotDicom
    """
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    value = pixels.value
    defined = isinstance(pixels, pydicom.dataelem.RawDataElement) and pixels.length != 0xFFFFFFFF
    held = pixels.length if defined else len(value) if isinstance(value, bytes) else None
    if held is None:
        return
    if ts in _NATIVE:
        need = n_frames * rows * cols * (((_opt_int(header_value(ds, "BitsAllocated")) or 16) + 7) // 8)
    else:
        need = 8 * n_frames
    if need > held:
        raise NotDicom(f"{n_frames} frames of {rows}x{cols} pixels take at least {need} bytes; the Pixel Data holds "
                       f"{held}: Number of Frames is wrong, or the file is truncated.", filename=filename)


def _headers(filename: str, ds: Dataset) -> list[FrameHeader]:
    modality = str(header_value(ds, "Modality", "") or "").strip().upper()
    sop_class = str(header_value(ds, "SOPClassUID", "") or "")
    if modality and modality != "CT":
        raise NotCT(f"Modality is {modality_said(modality)}, not 'CT'.", filename=filename)
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
    _check_pixel_elements(ds, filename)
    pixels = ds.get_item(_PIXEL_DATA, keep_deferred=True)  # a deferred value is None with its length kept
    if pixels.VR not in _PIXEL_VRS:
        # read as what it claims: a sequence (the decoder met the sequence reader's InvalidDicomError), text
        raise NotDicom(f"Pixel Data (7FE0,0010) has VR {pixels.VR}: pixels are OB or OW.", filename=filename)
    spp = _opt_int(header_value(ds, "SamplesPerPixel")) or 1
    photometric = str(header_value(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if spp != 1 or not photometric.startswith("MONOCHROME"):
        raise NotCT(
            f"Colour image ({photometric}, {spp} samples per pixel) cannot hold HU.", filename=filename
        )
    bits_stored = _opt_int(header_value(ds, "BitsStored")) or _opt_int(header_value(ds, "BitsAllocated")) or 0
    if bits_stored <= 8:
        raise NotCT(
            f"{bits_stored}-bit pixels cannot hold Hounsfield units "
            f"(a screenshot or secondary capture, SOP Class {sop_class}).",
            filename=filename,
        )
    rows, cols = _opt_int(header_value(ds, "Rows")), _opt_int(header_value(ds, "Columns"))
    if not rows or not cols or rows < 0 or cols < 0:
        raise NotDicom("Rows or Columns missing.", filename=filename)
    if not pixels.value and (not isinstance(pixels, pydicom.dataelem.RawDataElement) or not pixels.length):
        # said here, not by the decoder: encapsulated, it failed as "'NoneType' object has no attribute 'read'";
        # after Rows and Columns, whose 0 empties it too
        raise NoPixelData("The CT object's Pixel Data is empty (length 0).", filename=filename)
    n_frames = _opt_int(header_value(ds, "NumberOfFrames")) or 1
    if n_frames < 1:
        raise NotDicom(f"Number of Frames is {n_frames}.", filename=filename)
    if rows > MAX_MATRIX or cols > MAX_MATRIX or n_frames * rows * cols > MAX_PIXELS:
        # checked before decoding: a forged header must not make a codec allocate gigabytes
        raise TooLarge(
            f"{counted(n_frames, 'frame')} of {rows}x{cols} pixels exceed the limits "
            f"({MAX_MATRIX}x{MAX_MATRIX}, {MAX_PIXELS} pixels per object).",
            filename=filename,
        )
    if n_frames > 1:
        _check_frames_fit(ds, pixels, n_frames, rows, cols, filename)

    multi = n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != n_frames:
        # each frame's position, orientation and rescale are its item's: a frame without one has none
        raise NotDicom(f"Per-Frame Functional Groups Sequence has {counted(len(per_frame), 'item')} for {counted(n_frames, 'frame')} "
                       "(PS3.3 C.7.6.16: one per frame).", filename=filename)
    frames: list[int | None] = list(range(n_frames)) if multi else [None]
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    base_type = _codes(header_value(ds, "ImageType", many=True))
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
        frame_type = _fg_value(ds, f, "CTImageFrameTypeSequence", "FrameType", many=True)
        image_type = _codes(frame_type) if frame_type else base_type
        ps = _floats(_fg_value(ds, f, "PixelMeasuresSequence", "PixelSpacing", many=True), 2)
        out.append(
            FrameHeader(
                filename=filename,
                frame_index=f,
                sop_instance_uid=str(header_value(ds, "SOPInstanceUID", "") or f"{filename}#nouid"),
                sop_class_uid=sop_class,
                study_instance_uid=str(header_value(ds, "StudyInstanceUID", "") or ""),
                series_instance_uid=str(header_value(ds, "SeriesInstanceUID", "") or ""),
                series_number=_opt_int(header_value(ds, "SeriesNumber")),
                series_description=str(header_value(ds, "SeriesDescription", "") or ""),
                modality=modality or "CT",
                image_type=image_type,
                orientation=_floats(  # type: ignore[arg-type]
                    _fg_value(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient", many=True), 6
                ),
                position=_floats(  # type: ignore[arg-type]
                    _fg_value(ds, f, "PlanePositionSequence", "ImagePositionPatient", many=True), 3
                ),
                slice_thickness=_opt_float(_fg_value(ds, f, "PixelMeasuresSequence", "SliceThickness")),
                pixel_spacing=ps,  # type: ignore[arg-type]
                instance_number=_opt_int(header_value(ds, "InstanceNumber")),
                rows=rows,
                cols=cols,
                slope=slope,
                intercept=intercept,
                transfer_syntax_uid=ts,
                intercept_missing=intercept_missing,
                lossy=lossy,
                warnings=tuple(warnings),
                convolution_kernel=joined_text(_fg_value(ds, f, "CTReconstructionSequence", "ConvolutionKernel", many=True)),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------
_NATIVE_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"})
_NATIVE = _NATIVE_LE | {_EXPLICIT_BIG_ENDIAN}
_RLE = "1.2.840.10008.1.2.5"
_JPEG_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # baseline
        "1.2.840.10008.1.2.4.51",  # extended
        "1.2.840.10008.1.2.4.57",  # lossless
        "1.2.840.10008.1.2.4.70",  # lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    }
)
_JLS_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
_CHECKED_SYNTAXES = _JPEG_SYNTAXES | _J2K_SYNTAXES | {_RLE}
"""Encapsulated syntaxes whose frame headers :func:`_check_codestreams` reads; any other is not decoded."""


def _native_layout(ds: Dataset) -> tuple[int, int, int, int, np.dtype] | None:
    """``(frames, rows, cols, bits stored, dtype)`` of native little-endian 16-bit data, or None (another
    syntax or layout), from the header alone."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if ts not in _NATIVE_LE or header_value(ds, "BitsAllocated") != 16 or (header_value(ds, "SamplesPerPixel") or 1) != 1:
        return None
    rows, cols = int(_required(ds, "Rows")), int(_required(ds, "Columns"))
    frames = _opt_int(header_value(ds, "NumberOfFrames")) or 1
    bits = _opt_int(header_value(ds, "BitsStored")) or 16
    if frames < 1 or not 1 <= bits <= 16:
        return None
    return frames, rows, cols, bits, np.dtype("<i2" if header_value(ds, "PixelRepresentation") == 1 else "<u2")


_ABSENT: Final = object()


def _required(ds: Dataset, keyword: str) -> Any:
    """``ds.<keyword>`` (:class:`AttributeError` when absent), as :func:`header_value` reads it."""
    value = header_value(ds, keyword, _ABSENT)
    return getattr(ds, keyword) if value is _ABSENT else value


def _native_raw(ds: Dataset, layout: tuple[int, int, int, int, np.dtype] | None = None) -> np.ndarray | None:
    """[F, R, C] view of native little-endian 16-bit data as stored (bits above Bits Stored kept), or None.
    ``layout``: :func:`_native_layout`'s, when the caller has it."""
    layout = layout or _native_layout(ds)
    if layout is None:
        return None
    frames, rows, cols, _, dtype = layout
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < frames * rows * cols * 2:
        return None
    return np.frombuffer(data, dtype=dtype, count=frames * rows * cols).reshape(frames, rows, cols)


_PIXEL_DATA: Final = 0x7FE00010
_PIXEL_VRS: Final = frozenset({None, "OB", "OW", "OB or OW", "UN"})
"""The VRs Pixel Data may be read with (None: implicit VR, looked up when it is converted)."""


def _native_owned(ds: Dataset, frame: int | None = None) -> tuple[np.ndarray, int] | None:
    """What :func:`_native_raw` views (frame ``frame`` only, when given) as a new array, and Bits Stored; or None.

    The array is the caller's to compute the stored values and then the HU in, in place (:func:`decode_hu`):
    no copy of the pixels besides it. Pixel Data not read yet (deferred, :func:`read_dataset`) is read from the
    file or buffer straight into it, without a copy as bytes, and without being kept in ``ds``; a value that
    cannot be read so (a file changed or truncated since it was parsed, another source) gives None, and
    :func:`_stored_values` reads it as before, with the same errors."""
    try:
        layout = _native_layout(ds)
    except (AttributeError, TypeError, ValueError):
        return None
    if layout is None:
        return None
    frames, rows, cols, bits, dtype = layout
    first, n = (0, frames) if frame is None else (frame, 1)
    out = np.empty((n, rows, cols), dtype=dtype)
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if isinstance(elem, pydicom.dataelem.RawDataElement) and elem.value is None:
        if elem.length == 0xFFFFFFFF or elem.length < frames * rows * cols * 2:
            return None
        return (out, bits) if _read_deferred_into(ds, elem, first * rows * cols * 2, out) else None
    try:
        raw = _native_raw(ds, layout)
    except (AttributeError, TypeError, ValueError):
        return None
    if raw is None:
        return None
    np.copyto(out, raw[first : first + n])
    return out, bits


def _read_deferred_into(ds: Dataset, elem: Any, offset: int, out: np.ndarray) -> bool:
    """Read ``out.nbytes`` bytes of the deferred value ``elem`` of ``ds``, from ``offset`` on, into ``out``, from
    where pydicom would read it (the file ``ds`` was parsed from, or its buffer), after the checks pydicom makes
    (the file is there, unchanged since, and holds that element there). False, ``out`` undefined, when a check
    fails or the value is short: pydicom's own read then raises, warns or reads what it does."""
    src = ds.filename or ds.buffer
    if ds.filename and ds.buffer and not getattr(ds.buffer, "closed", False):
        src = ds.buffer
    implicit = bool(elem.is_implicit_VR)
    head_at = elem.value_tell - pydicom.filereader.data_element_offset_to_value(implicit, elem.VR)
    tag = struct.pack("<HH", elem.tag >> 16, elem.tag & 0xFFFF) + (b"" if implicit else str(elem.VR).encode()[:2])
    want, target = out.nbytes, out.reshape(-1).view(np.uint8).data
    if isinstance(src, str):
        if ds.timestamp is None or not Path(src).exists():
            return False
        with open(src, "rb", buffering=0) as fh:
            if os.fstat(fh.fileno()).st_mtime != ds.timestamp:
                return False
            fh.seek(head_at)
            if fh.read(len(tag)) != tag:
                return False
            fh.seek(elem.value_tell + offset)
            got = 0
            while got < want:
                n = fh.readinto(target[got:])
                if not n:
                    return False
                got += n
        return True
    if isinstance(src, io.BytesIO) and not src.closed:
        with src.getbuffer() as view:
            if bytes(view[head_at : head_at + len(tag)]) != tag or len(view) < elem.value_tell + offset + want:
                return False
            target[:] = view[elem.value_tell + offset : elem.value_tell + offset + want]
        return True
    return False


def _unused_bits_cleared(arr: np.ndarray, bits_stored: int, *, in_place: bool = False) -> np.ndarray:
    """``arr`` with the bits above ``bits_stored`` masked off (unsigned) or the sign extended (signed), as
    pydicom's ``correct_unused_bits``; ``arr`` itself when there are none (or ``in_place``: cleared in it)."""
    shift = 8 * arr.dtype.itemsize - bits_stored
    if shift <= 0 or bits_stored < 1:
        return arr
    into = arr if in_place else None
    if arr.dtype.kind == "u":  # one masking pass, not two shifts (a quarter of the time, on every slice)
        return np.bitwise_and(arr, arr.dtype.type((1 << bits_stored) - 1), out=into)
    return np.right_shift(np.left_shift(arr, shift, out=into), shift, out=into)


def native_fast_path(ds: Dataset) -> np.ndarray | None:
    """Stored values of native little-endian 16-bit data straight from the buffer, or ``None``.

    Same result as pydicom's ``pixel_array`` (high bits above Bits Stored masked off for unsigned
    data, sign-extended for signed data), without its per-call set-up (~1 ms a slice).
    """
    raw = _native_raw(ds)
    return None if raw is None else _unused_bits_cleared(raw, _opt_int(ds.get("BitsStored")) or 16)


@dataclass(frozen=True)
class CodestreamHeader:
    """The image a compressed frame's own header declares: what a codec allocates, whatever Rows and
    Columns say."""

    kind: str
    """``"JPEG"`` (an SOF marker), ``"JPEG-LS"`` (SOF55) or ``"JPEG 2000"`` (SIZ, bare or inside a JP2 file)."""
    rows: int
    cols: int
    components: int


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
                          0xDE,  # DHP: the image size of a hierarchical JPEG
                          0xF7})  # SOF55: JPEG-LS
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: no length
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def codestream_header(frame: bytes) -> CodestreamHeader | None:
    """The image size a JPEG, JPEG-LS or JPEG 2000 frame declares, read from its markers alone (nothing is
    decoded); ``None`` when ``frame`` does not start like one of them or ends before its frame header.

    JPEG and JPEG-LS: the first SOF (or DHP) marker's Y, X and Nf; JPEG 2000: the SIZ marker's
    ``Ysiz - YOsiz``, ``Xsiz - XOsiz`` and Csiz, of the bare codestream or of a JP2 file's ``jp2c`` box.

    >>> codestream_header(bytes(16)) is None
    True
    >>> codestream_header(bytes.fromhex("ffd8 ffc3 000b 10 0200 0100 01 011100".replace(" ", "")))
    CodestreamHeader(kind='JPEG', rows=512, cols=256, components=1)
    """
    if frame[:2] == b"\xff\xd8":
        return _jpeg_header(frame)
    if frame[:4] == b"\xff\x4f\xff\x51":
        return _j2k_header(frame, 0)
    if frame[:12] == _JP2_SIGNATURE:
        pos = 0
        while pos + 8 <= len(frame):
            length, box = struct.unpack_from(">I4s", frame, pos)
            head = 8
            if length == 1 and pos + 16 <= len(frame):
                length, head = struct.unpack_from(">Q", frame, pos + 8)[0], 16
            elif length == 0:
                length = len(frame) - pos
            if box == b"jp2c":
                return _j2k_header(frame, pos + head)
            if length < head:
                return None
            pos += length
    return None


def _jpeg_header(b: bytes) -> CodestreamHeader | None:
    pos, n = 2, len(b)
    while True:
        pos = b.find(b"\xff", pos)  # decoders skip stray bytes between segments, as here
        if pos < 0 or pos + 1 >= n:
            return None
        marker = b[pos + 1]
        if marker in (0xFF, 0x00):  # fill byte, or a stuffed zero
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            return None
        if marker in _SOF_MARKERS:
            if pos + 10 > n:
                return None
            rows, cols = struct.unpack_from(">HH", b, pos + 5)
            kind = "JPEG-LS" if marker == 0xF7 else "JPEG"
            return CodestreamHeader(kind, rows, cols, b[pos + 9])
        if pos + 4 > n:
            return None
        pos += 2 + struct.unpack_from(">H", b, pos + 2)[0]


def _j2k_header(b: bytes, at: int) -> CodestreamHeader | None:
    # SOC, SIZ, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz
    if b[at : at + 4] != b"\xff\x4f\xff\x51" or len(b) < at + 42:
        return None
    x, y, x0, y0 = struct.unpack_from(">IIII", b, at + 8)
    components = struct.unpack_from(">H", b, at + 40)[0]
    return CodestreamHeader("JPEG 2000", y - y0, x - x0, components)


def _frames_of(ds: Dataset, n_frames: int) -> Iterator[tuple[bytes, ...]]:
    """The fragments of each frame of encapsulated Pixel Data, split as pydicom's decoders split them."""
    from pydicom.encaps import generate_fragmented_frames

    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    return generate_fragmented_frames(ds.PixelData, number_of_frames=n_frames, extended_offsets=extended)


def _check_codestreams(ds: Dataset, ts: str, filename: str) -> None:
    """Refuse encapsulated Pixel Data whose frames declare another image than Rows x Columns, one sample,
    before any codec sees it.

    The codecs allocate what a frame's own header declares (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ), not what
    Rows and Columns say, and those are all that the matrix limits check: a 100 KB file with a rewritten
    SIZ marker made openjpeg allocate 6 GB. RLE: pylibjpeg-rle writes into a Rows x Columns buffer, but
    when it fails pydicom falls back to its own decoder, which expands each segment whole (up to 64x its
    size) before comparing; so the segment count and sizes are checked against Rows x Columns, and
    :func:`_stored_values` keeps to pylibjpeg-rle when it is installed.

    Raises
    ------
    gateway.errors.Undecodable
    """
    if ts in _NATIVE or not ts:
        return
    name = pydicom.uid.UID(ts).name
    if ts not in _CHECKED_SYNTAXES:
        raise Undecodable(f"Pixel data in {name} is not decoded here (no codec whose frame size is checked "
                          "before decoding).", filename=filename)
    rows, cols = int(ds.Rows), int(ds.Columns)
    n_frames = _opt_int(ds.get("NumberOfFrames")) or 1
    frames = None
    for i in range(n_frames):  # one frame's fragments at a time: a copy of the whole Pixel Data is not needed
        try:
            frames = _frames_of(ds, n_frames) if frames is None else frames
            fragments = next(frames, None)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on broken items
            raise Undecodable(f"Encapsulated Pixel Data ({name}) cannot be split into frames: "
                              f"{type(exc).__name__}: {exc}", filename=filename) from exc
        if fragments is None:  # fewer frames than Number of Frames: the decoder says so
            return
        where = f"Frame {i + 1} of {n_frames}" if n_frames > 1 else "The frame"
        if ts == _RLE:
            bytes_per_sample = max(1, (_opt_int(ds.get("BitsAllocated")) or 16) // 8)
            _check_rle(b"".join(fragments), rows, cols, bytes_per_sample, where, filename)
            continue
        head = codestream_header(fragments[0]) if fragments else None
        if head is None and len(fragments) > 1:  # a frame header split across fragments
            head = codestream_header(b"".join(fragments))
        if head is None:
            raise Undecodable(f"{where} ({name}) starts with no JPEG, JPEG-LS or JPEG 2000 frame header: "
                              "refused before decoding.", filename=filename)
        if (head.rows, head.cols, head.components) != (rows, cols, 1):
            raise Undecodable(
                f"{where}'s {head.kind} codestream declares {head.rows}x{head.cols} pixels and "
                f"{counted(head.components, 'component')}, but Rows x Columns say {rows}x{cols} and 1 sample: refused "
                "before decoding (a codec allocates what the codestream declares: a forged or corrupt file).",
                filename=filename,
            )


def _check_rle(frame: bytes, rows: int, cols: int, bytes_per_sample: int, where: str, filename: str) -> None:
    if len(frame) < 64:
        raise Undecodable(f"{where} (RLE) is {len(frame)} bytes: shorter than the RLE header.", filename=filename)
    n_segments = struct.unpack_from("<I", frame)[0]
    if n_segments != bytes_per_sample:
        raise Undecodable(f"{where}'s RLE header declares {counted(n_segments, 'segment')}; {bytes_per_sample} expected "
                          f"({8 * bytes_per_sample} bits, 1 sample): refused before decoding.", filename=filename)
    offsets = [*struct.unpack_from(f"<{n_segments}I", frame, 4), len(frame)]
    # the least compact encoding there is, one-byte literal runs, doubles a segment (plus a pad byte)
    most = 2 * rows * cols + 2
    for k in range(n_segments):
        size = offsets[k + 1] - offsets[k]
        if offsets[k] < 64 or size < 0 or size > most:
            raise Undecodable(
                f"{where}'s RLE segment {k + 1} spans bytes {offsets[k]}..{offsets[k + 1]} of {len(frame)}: "
                f"no RLE encoding of {rows}x{cols} pixels takes more than {most} bytes a segment. Refused "
                "before decoding (a decoder may expand a segment 64x before checking its size).",
                filename=filename,
            )


def _stored_values(ds: Dataset, filename: str, frame: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decoded stored values as [F, R, C], with J2K signedness trusted over Pixel Representation, and the
    same values before the bits above Bits Stored were cleared (for Pixel Padding Value; the same array
    when there are none, or when the codec (JPEG 2000, JPEG-LS) already fitted its output to them).
    ``frame``: that frame only ([1, R, C]; the others are not decoded)."""
    try:
        raw = _native_raw(ds)
    except (AttributeError, TypeError, ValueError):
        raw = None
    if raw is not None:
        if frame is not None:
            raw = raw[frame : frame + 1]
        return _unused_bits_cleared(raw, _opt_int(ds.get("BitsStored")) or 16), raw
    from pydicom.pixels import pixel_array
    from pydicom.pixels.decoders import RLELosslessDecoder

    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    _check_codestreams(ds, ts, filename)
    # pylibjpeg-rle is bounded by Rows x Columns; pydicom's own RLE decoder (its fallback) is not
    plugin = "pylibjpeg" if ts == _RLE and "pylibjpeg" in RLELosslessDecoder.available_plugins else ""
    try:
        arr = pixel_array(ds, index=frame, decoding_plugin=plugin, correct_unused_bits=False)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # noqa: BLE001 - codecs raise anything, even pyo3's PanicException
        if read_failed(exc):  # the pixels read from a file that failed (EIO): no fault of the file
            raise
        ts_uid = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        name = getattr(ts_uid, "name", str(ts_uid))
        raise Undecodable(
            f"Pixel data ({name}) cannot be decoded: {type(exc).__name__}: {exc}", filename=filename
        ) from exc
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
    if ts in _J2K_SYNTAXES or ts in _JLS_SYNTAXES or arr.dtype.kind not in "iu":
        return arr, arr  # pydicom corrects these by the codestream's precision, not by Bits Stored
    # what pydicom's ``correct_unused_bits`` (asked not to) would have done
    return _unused_bits_cleared(arr, _opt_int(ds.get("BitsStored")) or 8 * arr.dtype.itemsize), arr


def _j2k_params(ds: Dataset) -> dict[str, Any]:
    from pydicom.encaps import generate_frames
    from pydicom.pixels.utils import get_j2k_parameters

    try:
        n_frames = _opt_int(ds.get("NumberOfFrames")) or 1
        first = next(generate_frames(ds.PixelData, number_of_frames=n_frames))
        return dict(get_j2k_parameters(first))
    except Exception:  # noqa: BLE001
        return {}


def _padding_range(ds: Dataset, dtype: np.dtype) -> tuple[int, int] | None:
    """Pixel Padding Value (0028,0120) and Pixel Padding Range Limit (0028,0121), as stored values of
    ``dtype`` (the decoded array's: signed when Pixel Representation is 1), lowest first; None without a
    usable Pixel Padding Value.

    Each is US or SS as Pixel Representation says; a writer that chose the other VR (GE's unsigned 63536 for
    -2000, or the reverse) wrote the same 16 bits, so the bits are read in ``dtype``'s own signedness.
    Both are readable (:func:`_check_pixel_elements`).
    """
    bits = 8 * dtype.itemsize

    def stored(keyword: str) -> int | None:
        value = ds.get(keyword)
        if isinstance(value, Sequence | pydicom.multival.MultiValue) and not isinstance(value, str | bytes):
            value = value[0] if len(value) else None
        if isinstance(value, bytes):  # VR left unresolved (UN, OB)
            value = int.from_bytes(value[: dtype.itemsize], "little") if len(value) >= dtype.itemsize else None
        try:
            pattern = int(value) & ((1 << bits) - 1)
        except (TypeError, ValueError):
            return None
        return pattern - (1 << bits) if dtype.kind == "i" and pattern >> (bits - 1) else pattern

    value = stored("PixelPaddingValue")
    if value is None:
        return None
    limit = stored("PixelPaddingRangeLimit")
    return (value, value) if limit is None else (min(value, limit), max(value, limit))


LOSSY_PADDING_TOLERANCE = 200
"""Stored values by which a lossy frame's padding may miss Pixel Padding Value (JPEG 2000 lossy returns -2000
as -1990 to -2010 far from edges, a JPEG-LS near-lossless frame within its NEAR); used only when the widened
range stays clear of tissue (all of it below -1100 HU or above :data:`HIGH_HU`)."""


def _lossy_padding(padding: tuple[int, int], slope: float, intercept: float) -> tuple[int, int]:
    """``padding`` widened by :data:`LOSSY_PADDING_TOLERANCE` for a lossy frame, when no tissue can lie in the
    widened range; else ``padding``."""
    lo, hi = padding[0] - LOSSY_PADDING_TOLERANCE, padding[1] + LOSSY_PADDING_TOLERANCE
    hu_lo, hu_hi = sorted((slope * lo + intercept, slope * hi + intercept))
    return (lo, hi) if hu_hi < -1100 or hu_lo > HIGH_HU else padding


def _padding_mask(raw: np.ndarray, padding: tuple[int, int] | None) -> np.ndarray | None:
    """Where a frame's raw stored values are padding (outside the scanner's field of view), or None if
    nowhere."""
    if padding is None:
        return None
    info = np.iinfo(raw.dtype)
    lo, hi = max(padding[0], int(info.min)), min(padding[1], int(info.max))
    if lo > hi:
        return None
    mask = raw == lo if lo == hi else (raw >= lo) & (raw <= hi)
    return mask if mask.any() else None


def rescale_to_hu(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray | None = None, *,
                  bits_stored: int | None = None) -> np.ndarray:
    """Return ``slope * stored + intercept`` rounded to int16 (clipped to the int16 range), written into
    ``out`` (an int16 array of the same shape) when given, so that a frame is copied once; ``out`` may be
    ``stored`` itself seen as int16 (``stored.view(np.int16)``: the HU replace the stored values).

    Integer arithmetic when ``slope == 1`` and the intercept is integral (the usual CT case). ``bits_stored``:
    the stored values are known to fit that many bits (their bits above it cleared), so that when the result
    must fit int16 their range is not looked for.
    """
    if out is None:
        out = np.empty(stored.shape, dtype=np.int16)
    if slope == 1.0 and float(intercept).is_integer():
        b = int(intercept)
        if stored.dtype in (np.int16, np.uint16) and stored.size:
            lo, hi = _range_of(stored, b, bits_stored)
            if hi <= 32767 and -32768 <= lo + b and hi + b <= 32767:
                # the usual CT case in one pass: the stored values and the result both fit int16
                if not _same_memory(out, stored):  # else the int16 view of stored values that fit it: the same
                    np.copyto(out, stored, casting="unsafe")
                out += np.int16(b)
                return out
        hu = stored.astype(np.int32) + b
    else:
        hu = np.rint(stored.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    np.copyto(out, np.clip(hu, -32768, 32767), casting="unsafe")
    return out


def _range_of(stored: np.ndarray, shift: int, bits_stored: int | None) -> tuple[int, int]:
    """Bounds of int16 or uint16 ``stored``: those ``bits_stored`` bits allow when the values shifted by ``shift``
    then fit int16 (nothing to look at), else the values' own minimum and maximum."""
    if bits_stored is not None and 1 <= bits_stored < 16:
        signed = stored.dtype.kind == "i"
        lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
        if -32768 <= lo + shift and hi + shift <= 32767:
            return lo, hi
    return int(stored.min()), int(stored.max())


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` are views of the very same elements (same start, shape and strides)."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.shape == b.shape
            and a.strides == b.strides)


def _check_plausible(hu: np.ndarray, filename: str, frame: int | None, padding: np.ndarray | None = None) -> None:
    # Sample every 8th row: the statistics are robust and this keeps them well under 1 ms a slice.
    sample = hu[::8]
    where = "" if frame is None else f" (frame {frame})"
    keep = None if padding is None else ~padding[::8]  # padding pixels are not the image
    n = sample.size if keep is None else int(np.count_nonzero(keep))
    if n == 0:  # nothing but padding: nothing to judge
        return
    above = sample > HIGH_HU
    high = float(np.count_nonzero(above if keep is None else above & keep)) / n
    if high > HIGH_HU_FRACTION:
        raise Undecodable(
            f"Decoded pixels{where} are implausible for CT: {100 * high:.0f}% above {HIGH_HU} HU "
            "(corrupt or mis-decoded compressed data, or wrong Pixel Representation).",
            filename=filename,
        )
    d = np.abs(np.diff(sample.astype(np.int32), axis=1))
    if keep is not None:
        d = d[keep[:, 1:] & keep[:, :-1]]  # pairs of image pixels only
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


def _air_stored_near_0(stored: np.ndarray, slope: float, padding: np.ndarray | None = None) -> bool:
    """Whether a frame's lowest values (its air), padding (Pixel Padding Value, and any value below -1500)
    left out, lie above :data:`AIR_STORED_NEAR_0`."""
    values = stored.astype(np.float32) * np.float32(slope)
    keep = values > -1500  # padding outside the field of view (-2000, -3024, ...)
    if padding is not None:
        keep &= ~padding
    values = values[keep]
    return bool(values.size) and float(np.percentile(values, 1)) > AIR_STORED_NEAR_0


def decode_hu(ds: Dataset, headers: Sequence[FrameHeader], filename: str = "<upload>", *,
              frame: int | None = None) -> np.ndarray:
    """Decode the frames of ``ds`` to HU on their original grid (``frame``: that one only, the others not
    decoded; the same HU as its plane of the whole).

    Compressed frames are refused before decoding when their own headers declare another matrix than
    Rows x Columns (:func:`_check_codestreams`). Pixels whose stored value is Pixel Padding Value
    (0028,0120), or within Pixel Padding Range Limit (0028,0121) of it, compared as stored (before the bits
    above Bits Stored are cleared, and before rescaling), lie outside the scanner's field of view: they
    become air (:data:`PAD_HU`) and are left out of the plausibility checks. In a lossy frame the padding may
    miss the value a little (:data:`LOSSY_PADDING_TOLERANCE`).

    Native pixels are read from ``ds``'s source (the file or the bytes it was parsed from) at each call, never
    kept in ``ds``: a file must stay until its last decode, not only its first.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The object, as returned by :func:`read_headers`.
    headers : Sequence[FrameHeader]
        Its frame headers (slope/intercept per frame), as returned by :func:`read_headers`.
    filename : str
        Name used in messages.
    frame : int | None
        Decode this frame only (0-based; its own slope and intercept).

    Returns
    -------
    numpy.ndarray
        int16 ``[F, rows, cols]`` (``[1, rows, cols]`` for one ``frame``).

    Raises
    ------
    gateway.errors.Undecodable
        The codec failed, a frame's codestream declares another matrix, the frame count disagrees, or a frame
        decodes to noise.
    """
    if frame is not None:
        if not 0 <= frame < len(headers):
            raise Undecodable(f"No frame {frame}: the header says {len(headers)}.", filename=filename)
        headers = [headers[frame]]
    owned = _native_owned(ds, frame)
    bits: int | None = None
    if owned is not None:  # native: the raw values, then the stored ones, then the HU, all in one array
        raw, bits = owned
        stored, out = raw, raw.view(np.int16)
    else:
        stored, raw = _stored_values(ds, filename, frame)
        out = np.empty(stored.shape, dtype=np.int16)
    if stored.shape[0] != len(headers):
        raise Undecodable(f"Decoded {stored.shape[0]} frames, header says {len(headers)}.", filename=filename)
    padding = _padding_range(ds, raw.dtype) if raw.dtype.kind in "iu" else None
    for i, h in enumerate(headers):
        padded = _lossy_padding(padding, h.slope, h.intercept) if padding is not None and h.lossy else padding
        pad = _padding_mask(raw[i], padded)
        if bits is not None:  # the padding was found on the raw values: the stored ones may now replace them
            _unused_bits_cleared(stored[i], bits, in_place=True)
        intercept = h.intercept
        if h.intercept_missing and _air_stored_near_0(stored[i], h.slope, pad):
            intercept = -1024.0  # air stored near 0: without it the lungs read as water (+1024 HU)
        rescale_to_hu(stored[i], h.slope, intercept, out=out[i], bits_stored=bits)  # each frame written once
        if pad is not None:
            _pad_with_air(out[i], pad, one_value=padded is not None and padded[0] == padded[1])
        _check_plausible(out[i], filename, h.frame_index, pad)
    return out


def _pad_with_air(hu: np.ndarray, pad: np.ndarray, *, one_value: bool) -> None:
    """``hu[pad] = PAD_HU``. When the padding is one stored value (``one_value``), every pixel under ``pad`` holds the
    same HU (a frame's HU are a function of its stored values): the one difference to :data:`PAD_HU` is added under
    the mask, in wrapping int16 arithmetic (exact), in a third of the time of boolean indexing."""
    if not one_value or not hu.flags.c_contiguous or not pad.flags.c_contiguous:
        hu[pad] = PAD_HU
        return
    delta = (PAD_HU - int(hu.flat[int(np.argmax(pad))]) + 32768) % 65536 - 32768
    if delta:
        hu += np.multiply(pad.view(np.uint8), np.int16(delta), dtype=np.int16)


def image_noise_hu(hu: np.ndarray) -> float | None:
    """The image noise of a slice in HU, or None where it holds too little soft tissue to tell.

    The 25th percentile of the standard deviation in 5 x 5 windows lying wholly in soft tissue and fat (windows
    whose means lie in -200 to 150 HU, with a margin of 3 pixels): the most uniform quarter of the body's
    tissue, where the spread is noise, not anatomy. It reads about 0.8 of the standard deviation of white noise added to a uniform region, a little
    less for noise correlated over a pixel or two (a soft kernel, low dose). Measured on the 512 grid, this is the
    noise the models see.

    >>> rng = np.random.default_rng(0)
    >>> flat = (40 + rng.normal(0, 50, (128, 128))).astype(np.int16)
    >>> 35 < image_noise_hu(flat) < 45, image_noise_hu(np.full((64, 64), -1000, np.int16))
    (True, None)
    """
    x = hu.astype(np.float32)
    mean = ndimage.uniform_filter(x, 5)
    sd = np.sqrt(np.maximum(ndimage.uniform_filter(x * x, 5) - mean * mean, 0.0))
    tissue = ((mean > -200) & (mean < 150)).astype(np.float32)  # judged on the 5 x 5 means: noise does not move them
    inside = ndimage.uniform_filter(tissue, 11) > 0.999  # the window and a margin of 3 pixels are all tissue
    inside &= sd > 0.5  # not the flat body wall to_grid puts around a cut field of view (no scanner makes flat tissue)
    if np.count_nonzero(inside) < 1000:
        return None
    return float(np.percentile(sd[inside], 25))


def standard_orientation(orientation: Sequence[float] | None) -> tuple[bool, bool, bool]:
    """``(transpose, flip_rows, flip_cols)`` that put an axial image into the radiological convention:
    first swap its rows and columns (``transpose``), then mirror it top-bottom and left-right.

    The models learnt axial slices as scanners usually store them (Image Orientation (Patient)
    ``1,0,0,0,1,0``: columns run to the patient's left, rows to posterior). A slice stored with a row
    direction pointing to the patient's right, or a column direction pointing anterior (prone
    protocols, some reformats), is mirrored back before inference and its boxes mirrored again on the
    way out. A slice whose image runs front to back along its rows and side to side down its columns (a
    patient lying on a side: decubitus; a reformat turned by 90 degrees) is swapped first: the image then shows the patient
    upright, one of the four mirrorings. Only the dominant axes count; a non-axial or unknown orientation
    is left as it is.

    >>> standard_orientation((1, 0, 0, 0, -1, 0)), standard_orientation((-1, 0, 0, 0, 1, 0))
    ((False, True, False), (False, False, True))
    >>> standard_orientation((0, -1, 0, 1, 0, 0)), standard_orientation(None)    # turned by 90 degrees
    ((True, True, False), (False, False, False))
    """
    if orientation is None or len(orientation) != 6:
        return False, False, False
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    axes = int(np.argmax(np.abs(row))), int(np.argmax(np.abs(col)))
    if axes not in ((0, 1), (1, 0)):
        return False, False, False
    transpose = axes == (1, 0)
    if transpose:  # the swapped image's rows run along the stored columns' direction, and its columns along the rows'
        row, col = col, row
    return transpose, bool(col[1] < 0), bool(row[0] < 0)


GRID_MM: Final = (0.62, 0.85)
"""Millimetres per 512-grid pixel the models see (both nets learnt real lungs at 0.7 mm a pixel, +-20 %, and the
phantom at 0.55-0.9): a slice whose field of view puts it outside this band on the grid (under 317 mm, over
435 mm) is zoomed into it (:func:`grid_side`). Measured on the 48 real MedSeg test slices re-imaged at each field
of view before this: false boxes a slice 0.96 at 250 mm, 0.35 at 300, 0.23 at 358; sensitivity 90 % at 500 mm
against 98 % at 358; a real normal slice got a box at 280-300 mm and none at 310-339."""

BODY_HU: Final = -500.0
"""Pixels above this are body (or table): a crop to :data:`GRID_MM` never cuts the largest such region, and a
slice whose border is mostly air does not cut the body (:func:`cuts_body`)."""

CUT_BODY_BORDER: Final = 0.1
"""A slice whose border is body for more than this fraction was reconstructed on a field of view that cuts the
chest wall: zoomed out (:func:`grid_side`), it gets a body wall around it (:func:`body_wall`)."""

WALL_HU, WALL_MM = 30.0, 12.0
"""The body wall put around a cut field of view zoomed out: soft tissue this thick, then air (the real-CT training
crops got the same, ``training.realct.place``), so that lungs the field cuts do not open onto air."""


def pixel_mm(spacing: Sequence[float]) -> float:
    """A pixel's side in mm: the mean of Pixel Spacing's two values (axial CT pixels are square)."""
    return float(np.mean([float(v) for v in spacing]))


def grid_side(hu: np.ndarray, spacing: Sequence[float] | None, size: int = SLICE_SIZE) -> int:
    """How many original pixels the ``size`` grid spans (a centred square): ``max(rows, cols)`` (the whole slice,
    padded to square), or, when Pixel Spacing puts that outside :data:`GRID_MM`, the side that puts it at the
    band's nearer edge. A larger side pads (a small field of view, zoomed out); a smaller one crops (a large field
    of view, zoomed in), but never into the body (:data:`BODY_HU`, its largest region), so a patient lying off
    centre or filling the field keeps every pixel of the chest.

    >>> hu = np.full((512, 512), -1000, np.int16)
    >>> grid_side(hu, (0.7, 0.7)), grid_side(hu, None), grid_side(hu, (0.49, 0.49)), grid_side(hu, (0.98, 0.98))
    (512, 512, 648, 444)
    >>> hu[20:492, 60:452] = 40                      # a body filling the field: nothing of it is cut
    >>> grid_side(hu, (0.98, 0.98))
    472
    """
    rows, cols = hu.shape
    n = max(rows, cols)
    if spacing is None or not known_spacing(spacing, rows, cols):
        return n
    mm = pixel_mm(spacing)
    lo, hi = GRID_MM
    if mm * n / size < lo:
        return int(math.ceil(size * lo / mm))
    if mm * n / size <= hi:
        return n
    side = int(math.floor(size * hi / mm))
    lab, m = ndimage.label(hu[::4, ::4] > BODY_HU)
    if m:  # the largest region's extent about the centre, in original pixels (a 4-pixel lattice, rounded out)
        ys, xs = np.nonzero(lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:])))
        half = max(rows / 2 - 4 * ys.min(), 4 * ys.max() + 4 - rows / 2, cols / 2 - 4 * xs.min(),
                   4 * xs.max() + 4 - cols / 2)
        side = max(side, int(math.ceil(2 * half)))
    return min(side, n)


def cuts_body(hu: np.ndarray) -> bool:
    """Whether the slice's field of view cuts the body: more than :data:`CUT_BODY_BORDER` of its border is body."""
    border = np.concatenate([hu[0], hu[-1], hu[1:-1, 0], hu[1:-1, -1]])
    return bool(np.mean(border > BODY_HU) > CUT_BODY_BORDER)


def body_wall(square: np.ndarray, shape: tuple[int, int], at: tuple[int, int], mm: float) -> None:
    """Fill, in ``square`` (the air canvas), an ellipse of soft tissue around a slice of ``shape`` to be placed at
    ``at``: its half-axes the slice's, times 1.2, plus :data:`WALL_MM` (as ``training.realct.place`` does)."""
    h, w = shape
    ring = WALL_MM / mm
    cy, cx = at[0] + h / 2, at[1] + w / 2
    yy, xx = np.ogrid[: square.shape[0], : square.shape[1]]
    inside = ((yy + 0.5 - cy) / (h / 2 * 1.2 + ring)) ** 2 + ((xx + 0.5 - cx) / (w / 2 * 1.2 + ring)) ** 2 <= 1.0
    square[inside] = WALL_HU


def to_grid(
    hu: np.ndarray, size: int = SLICE_SIZE, orientation: Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, GridMapping]:
    """Resample one HU slice to ``size x size``: swap and mirror it into the radiological convention, put it in the centre
    of a square of :func:`grid_side` original pixels (air around it, a body wall first where its field of view
    cuts the body; or cropped around the body), then linear zoom.

    Parameters
    ----------
    hu : numpy.ndarray
        2-D HU slice, any shape.
    size : int
        Output side (the model's 512).
    orientation : sequence of 6 floats or None
        Image Orientation (Patient), for :func:`standard_orientation`.
    spacing : sequence of 2 floats or None
        Pixel Spacing (mm), for :func:`grid_side`; without it the whole slice fills the grid.

    Returns
    -------
    tuple[numpy.ndarray, GridMapping]
        int16 ``[size, size]`` and the mapping back to the original grid.
    """
    if hu.ndim != 2 or min(hu.shape) < 1:
        raise ValueError(f'Argument "hu" must be a non-empty 2-D slice, got shape {hu.shape}.')
    stored_rows, stored_cols = hu.shape
    transpose, flip_rows, flip_cols = standard_orientation(orientation)
    if transpose:
        hu = hu.T
        spacing = None if spacing is None or len(spacing) != 2 else (spacing[1], spacing[0])
    if flip_rows:
        hu = hu[::-1]
    if flip_cols:
        hu = hu[:, ::-1]
    flips = {"flip_rows": flip_rows, "flip_cols": flip_cols, "transpose": transpose}
    rows, cols = hu.shape  # the swapped image's, from here on
    n = grid_side(hu, spacing, size)
    if rows == size and cols == size and n == size:
        return np.ascontiguousarray(hu, dtype=np.int16), GridMapping(stored_rows, stored_cols, **flips)
    pad_top, pad_left = (n - rows) // 2, (n - cols) // 2  # negative: that many pixels cropped
    mapping = GridMapping(stored_rows, stored_cols, scale=n / size, pad_top=pad_top, pad_left=pad_left, **flips)
    top, left = max(0, -pad_top), max(0, -pad_left)
    part = hu[top : top + n, left : left + n]
    at = (max(0, pad_top), max(0, pad_left))
    dtype = np.int16 if n == size else np.float32  # n == size: padding alone puts it on the grid (a zoom by 1
    square = np.full((n, n), PAD_HU, dtype=dtype)  # is the identity, and it cost ~7 ms a slice)
    if n > max(rows, cols) and spacing is not None and cuts_body(part):
        body_wall(square, (part.shape[0], part.shape[1]), at, pixel_mm(spacing))
    square[at[0] : at[0] + part.shape[0], at[1] : at[1] + part.shape[1]] = part
    if n == size:
        return square, mapping
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
        grid_hu, grid = to_grid(frame, orientation=h.orientation, spacing=h.pixel_spacing)
        out.append(DecodedSlice(header=h, hu=grid_hu, grid=grid, warnings=list(h.warnings)))
    return out
