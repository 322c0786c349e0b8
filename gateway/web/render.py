"""Slices of a screened series as windowed PNG images, so the web page needs no DICOM decoder.

A done job's :class:`~aggregator.schema.CaseResult` lists its slices in position order, each by SOP
Instance UID. :class:`SeriesMap` finds the stored instance of each (headers only, read once per job and
kept in a small cache), :func:`render_png` decodes it to HU with the gateway's own decoder
(:func:`gateway.dicom.decode_hu`), applies a window and encodes an 8-bit grayscale PNG on the image's
own ``Rows x Columns`` grid: the grid of the result's ``original`` boxes, so the page draws them as they
are. Nothing here writes anything; the instances stay in the blob store.

Windows (centre, width in HU):

==============  ======  =====
``lung``        -600    1500
``mediastinum``   40     400
==============  ======  =====
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

import numpy as np
import pydicom

__all__ = ["WINDOWS", "InstancesGone", "LruCache", "Rendered", "SeriesMap", "SliceSource", "image_sides", "png_etag",
           "render_png", "window_u8"]

WINDOWS: Final[dict[str, tuple[float, float]]] = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0)}
"""Window presets: name -> (centre, width) in HU."""


class InstancesGone(LookupError):
    """The instances of a job are no longer stored (retention), or one of the slices is missing."""


@dataclass(frozen=True, slots=True)
class SliceSource:
    """Where one slice's pixels are: a stored instance, and the frame in it (multi-frame objects)."""

    filename: str
    blob_key: str
    frame: int


def window_u8(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """``hu`` through a window: ``centre - width/2`` -> 0, ``centre + width/2`` -> 255 (uint8).

    >>> window_u8(np.array([[-2000, -600, 1000]]), -600.0, 1500.0).tolist()
    [[0, 128, 255]]
    """
    if width <= 0:
        raise ValueError(f'Argument "width" must be > 0, got {width}.')
    lo = centre - width / 2.0
    scaled = (hu.astype(np.float32) - lo) * (255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def png_etag(job_id: str, index: int, window: str, blob_key: str) -> str:
    """A strong ETag of one rendered slice (a done job's slices never change)."""
    digest = hashlib.sha256(f"{job_id}:{index}:{window}:{blob_key}:1".encode()).hexdigest()[:24]
    return f'"{digest}"'


_LETTERS: Final = (("R", "L"), ("A", "P"), ("F", "H"))
"""The patient direction of each DICOM patient axis (x, y, z of LPS), towards minus and towards plus."""


def _toward(v: np.ndarray) -> str:
    """The patient direction ``v`` points to, its dominant axis first, an axis under a quarter left out (so an
    oblique slice reads e.g. ``LP``)."""
    letters = [_LETTERS[axis][bool(v[axis] > 0)] for axis in np.argsort(-np.abs(v)) if abs(v[axis]) >= 0.25]
    return "".join(letters[:2])


def image_sides(orientation: Sequence[float] | None) -> tuple[str, str, str, str] | None:
    """The patient directions at the image's left, top, right and bottom edges, from Image Orientation (Patient)
    (the row then the column direction cosines), as a viewer's orientation markers; None without one.

    The image is drawn as stored, on the grid of the result's boxes: a slice stored mirrored (a row direction to
    the patient's right) shows the patient's left on the image's left, and a reader going by the radiological
    convention would put a left-lung finding on the right without the markers.

    >>> image_sides((1, 0, 0, 0, 1, 0)), image_sides((-1, 0, 0, 0, 1, 0))
    (('R', 'A', 'L', 'P'), ('L', 'A', 'R', 'P'))
    >>> image_sides((0.8, 0.6, 0, 0, 0, -1)), image_sides(None)
    (('RA', 'H', 'LP', 'F'), None)
    """
    if orientation is None or len(orientation) != 6:
        return None
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    if not (np.isfinite(row).all() and np.isfinite(col).all()) or not (row.any() and col.any()):
        return None
    return _toward(-row), _toward(-col), _toward(row), _toward(col)


@dataclass(frozen=True, slots=True)
class Rendered:
    """A rendered slice: its PNG, and the patient directions at its left, top, right and bottom edges."""

    png: bytes
    sides: tuple[str, str, str, str] | None


def render_png(data: bytes, filename: str, frame: int, window: str) -> Rendered:
    """One frame of a stored instance as a windowed 8-bit grayscale PNG, with its orientation markers
    (:func:`image_sides`).

    Raises
    ------
    ValueError
        Unknown window.
    gateway.errors.GatewayError
        The instance cannot be decoded (it was decodable when screened, so this means it changed).
    """
    if window not in WINDOWS:
        raise ValueError(f'Argument "window" must be one of {", ".join(WINDOWS)}, got {window!r}.')
    from PIL import Image

    from gateway.dicom import decode_hu, read_headers

    ds, headers = read_headers(filename, data)
    frame = max(0, min(frame, len(headers) - 1))
    hu = decode_hu(ds, headers, filename, frame=frame)  # that frame only
    image = Image.fromarray(window_u8(hu[0], *WINDOWS[window]), mode="L")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return Rendered(buf.getvalue(), image_sides(headers[frame].orientation))


class SeriesMap:
    """SOP Instance UID (and frame) -> stored instance, for the slices of one job's result.

    Made by :meth:`build` from the job's stored instances: uploads do not record their UIDs, so the
    headers of each instance are read once (in a thread) and the map is cached by the caller.
    """

    def __init__(self, sources: dict[str, list[tuple[float | None, SliceSource]]]) -> None:
        self._sources = sources

    @classmethod
    def build(cls, instances: Sequence[tuple[str, str, str | None]], read: Callable[[str], bytes]) -> SeriesMap:
        """Read the headers of ``instances`` (``(filename, blob key, UID)``; blocking) and index their frames."""
        from gateway.dicom import read_headers

        sources: dict[str, list[tuple[float | None, SliceSource]]] = {}
        for filename, key, _uid in instances:
            try:
                data = read(key)
            except FileNotFoundError:
                continue
            single = _single_frame_uid(data)
            if single is not None:  # one slice: nothing else of its header is needed to find it; of two copies (a
                sources[single] = [(None, SliceSource(filename, key, 0))]  # re-send), the later, as ingest keeps it
                continue
            try:
                _ds, headers = read_headers(filename, data)
            except Exception:  # noqa: BLE001 - an instance the screening refused has no slice to show
                continue
            for i, h in enumerate(headers):
                sources.setdefault(h.sop_instance_uid, []).append(
                    (_along_normal(h.position, h.orientation), SliceSource(filename, key, i)))
        return cls(sources)

    def __len__(self) -> int:
        return len(self._sources)

    def find(self, sop_instance_uid: str, position_mm: float) -> SliceSource:
        """The source of a slice; for a multi-frame object, the frame nearest ``position_mm``.

        Raises
        ------
        InstancesGone
            No stored instance holds that slice.
        """
        frames = self._sources.get(sop_instance_uid)
        if not frames:
            raise InstancesGone(f"Instance {sop_instance_uid} is no longer stored.")
        if len(frames) == 1:
            return frames[0][1]
        return min(frames, key=lambda f: abs((f[0] if f[0] is not None else 0.0) - position_mm))[1]


_FIND_TAGS: Final = ["SOPInstanceUID", "NumberOfFrames", "PerFrameFunctionalGroupsSequence"]


def _single_frame_uid(data: bytes) -> str | None:
    """The SOP Instance UID of a stored single-frame object, read alone (pydicom's ``specific_tags``, no pixels):
    a third of the time of a checked header read, which a viewer's first image of a 1,000-slice upload waited on
    for each slice (uploads record no UIDs). None for a multi-frame object, a deflated one (pydicom would inflate
    it whole), or one that does not read: the full read then decides.

    >>> _single_frame_uid(b"not DICOM") is None
    True
    """
    from gateway.dicom import DEFLATED, part10_transfer_syntax

    try:
        if part10_transfer_syntax(data) in (None, DEFLATED):
            return None
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=_FIND_TAGS)
        frames = ds.get("NumberOfFrames")
        if "PerFrameFunctionalGroupsSequence" in ds or (frames not in (None, "") and int(frames) != 1):
            return None
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    except Exception:  # noqa: BLE001 - whatever it is, the checked read says
        return None
    return uid or None


def _along_normal(position: Sequence[float] | None, orientation: Sequence[float] | None) -> float | None:
    if position is None or orientation is None:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return float(np.dot(normal, np.asarray(position, float)))


K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A small least-recently-used cache (memory is only ever a cache; the store holds the truth)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
