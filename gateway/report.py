"""What a finished job needs to be sent back to PACS as a DICOM SR, and the SR itself.

:func:`aggregator.sr.to_sr` needs the screened images' headers. A job keeps what it reads of them, as a small
:class:`SrContext` taken by ingest from the data sets it parsed (:func:`sr_context`; the files are not read
again for it), so the SR can be made from the job at any time afterwards (:func:`encode_sr`), after the
instances' retention too, and is the SR the deliverer makes from the stored instances, byte for byte: one
SOP Instance UID, one object. It keeps the SOP class, instance and series, frames, rows and columns of every
instance (about a hundred bytes each; the SR lists them all as evidence), of the first slice's header the
attributes the SR reads (:data:`aggregator.sr.SR_HEADER_KEYWORDS`: highdicom copies its patient, study and
acquisition equipment; nothing else a header holds, such as Patient's Address, Operators' Name or private
elements, is kept), the first Timezone Offset From UTC the instances state, and the Image Library's descriptors
of the images the SR references (:meth:`SrContext.for_result`: the evidence run's, not the whole series').
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import Tag

from aggregator.schema import CaseResult
from aggregator.sr import IMAGE_LIBRARY_KEYWORDS, SR_HEADER_KEYWORDS, library_uids, timezone_offset

logger = logging.getLogger(__name__)

__all__ = ["SrContext", "encode_sr", "sr_context"]

STUDY_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                  "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyInstanceUID", "Modality")
_PER_INSTANCE = ("Rows", "Columns")  # in each instance's row already
_DESCRIBED = tuple((k, tag_for_keyword(k), dictionary_VR(k)) for k in IMAGE_LIBRARY_KEYWORDS if k not in _PER_INSTANCE)
_KEPT = tuple(Tag(k) for k in SR_HEADER_KEYWORDS)  # a misspelt keyword fails at import


@dataclass(frozen=True, slots=True)
class SrContext:
    """The headers an SR of a study needs.

    Attributes
    ----------
    study : tuple[tuple[str, str], ...]
        Patient and study attributes (keyword, value) of the screened series (the FHIR report's patient; the
        SR's when no ``header`` was kept).
    instances : tuple[tuple[str, str, str, int, int, int], ...]
        ``(SOPClassUID, SOPInstanceUID, SeriesInstanceUID, NumberOfFrames, Rows, Columns)`` per screened
        instance.
    header : bytes
        Of the first slice's header the attributes the SR reads (:data:`~aggregator.sr.SR_HEADER_KEYWORDS`),
        encoded as a data set (Explicit VR Little Endian): what highdicom copies is there as the source wrote
        it. Empty when kept by an earlier release, or when it could not be encoded. (An earlier release kept
        every public element but the binary ones: its rows still make the same SR.)
    images : tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
        ``(SOPInstanceUID, ((keyword, value), ...))``: the :data:`~aggregator.sr.IMAGE_LIBRARY_KEYWORDS` an
        instance's header states, each value as its DICOM string (``"0.7\\0.7"``).
    timezone_offset : str or None
        The first Timezone Offset From UTC the instances state (:func:`aggregator.sr.timezone_offset`).
    """

    study: tuple[tuple[str, str], ...]
    instances: tuple[tuple[str, str, str, int, int, int], ...]
    header: bytes = b""
    images: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    timezone_offset: str | None = None

    def for_result(self, result: CaseResult) -> SrContext:
        """This context with the descriptors of only the images the SR of ``result`` references (kept with it)."""
        wanted = library_uids(result)
        return replace(self, images=tuple(i for i in self.images if i[0] in wanted))

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (kept in the state store beside the result). ``study`` and ``instances`` keep the
        previous release's shape, which reads them and ignores the other keys."""
        return {"study": [list(p) for p in self.study], "instances": [list(i) for i in self.instances],
                "header": base64.b64encode(self.header).decode("ascii"),
                "images": {uid: [list(p) for p in pairs] for uid, pairs in self.images},
                "timezone_offset": self.timezone_offset}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SrContext:
        """The inverse of :meth:`to_json`; also of what the previous release wrote (``study`` and ``instances``
        only), and of what a later one may write: values added to a row or a pair, and keys, are not read."""
        return cls(tuple((str(p[0]), str(p[1])) for p in data["study"]),
                   tuple((str(i[0]), str(i[1]), str(i[2]), int(i[3]), int(i[4]), int(i[5])) for i in data["instances"]),
                   base64.b64decode(data.get("header") or ""),
                   tuple((str(uid), tuple((str(p[0]), str(p[1])) for p in pairs))
                         for uid, pairs in (data.get("images") or {}).items()),
                   data.get("timezone_offset") or None)

    def header_dataset(self) -> Any:
        """The kept header as a pydicom data set, or None."""
        if not self.header:
            return None
        from pydicom.filereader import read_dataset

        return read_dataset(io.BytesIO(self.header), is_implicit_VR=False, is_little_endian=True)

    def datasets(self) -> list[Any]:
        """Header-only pydicom data sets, one per instance (the ``evidence`` of :func:`~aggregator.sr.to_sr`):
        the kept header for its instance, for the others their UIDs and size, the study's attributes, the time
        zone and their kept descriptors."""
        from pydicom.dataset import Dataset

        header = self.header_dataset()
        first = str(header.get("SOPInstanceUID", "")) if header is not None else None
        described = dict(self.images)
        out = []
        for sop_class, sop_instance, series, frames, rows, cols in self.instances:
            if sop_instance == first:
                out.append(header)
                continue
            ds = Dataset()
            for keyword, value in self.study:
                setattr(ds, keyword, value)
            ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = sop_class, sop_instance, series
            ds.Rows, ds.Columns = rows, cols  # highdicom wants a pixel description of a source image
            if frames > 1:
                ds.NumberOfFrames = frames
            for keyword, value in described.get(sop_instance, ()):
                setattr(ds, keyword, value)
            if self.timezone_offset is not None:  # the first header's own offset comes first, if it is one
                ds.TimezoneOffsetFromUTC = self.timezone_offset
            out.append(ds)
        return out


def _dicom_string(value: Any) -> str:
    """A header value as its DICOM string: values joined by backslashes, as written (a DS keeps its digits)."""
    if value is None:
        return ""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return str(value)
    return "\\".join(str(v) for v in value)


def _described(ds: Any) -> tuple[tuple[str, str], ...]:
    """The :data:`~aggregator.sr.IMAGE_LIBRARY_KEYWORDS` ``ds`` states (but rows and columns), as DICOM strings:
    a value not parsed yet as its bytes say (:func:`_parsed_string`; a quarter of the time, for every slice of a
    study)."""
    out = []
    for keyword, tag, vr in _DESCRIBED:
        elem = ds.get_item(tag)
        if elem is not None:
            value = elem.value
            out.append((keyword, _parsed_string(value, vr) if isinstance(value, bytes) else _dicom_string(value)))
    return tuple(out)


def _parsed_string(value: bytes, vr: str) -> str:
    r"""The bytes of a value not parsed yet as :func:`_dicom_string` of what pydicom parses them to (a DS value
    without its spaces, a CS value keeping its leading ones), so that what the context holds is the same whether
    an element was read before (the frame headers read some of them, or not) or not.

    >>> _parsed_string(b"-85.0\\ -115.0\\-97.3 ", "DS"), _parsed_string(b" CT ", "CS"), _parsed_string(b"1.2.3\0", "UI")
    ('-85.0\\-115.0\\-97.3', ' CT', '1.2.3')
    """
    text = value.decode("ascii", "replace")
    if vr == "DS":  # stripped, split, each value read as its digits
        return "\\".join(v.strip() for v in text.strip().rstrip(" \0").split("\\"))
    if vr == "UI":  # each UID stripped
        return "\\".join(v.strip() for v in text.rstrip("\0 ").split("\\"))
    return text.rstrip(" \0")


def _header(ds: Any) -> bytes:
    """The :data:`~aggregator.sr.SR_HEADER_KEYWORDS` ``ds`` holds, as an Explicit VR Little Endian data set:
    no other element is read (pixel data, an enhanced CT's functional groups, an address, a private element);
    empty (and logged) when they cannot be encoded."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    try:
        kept = Dataset()
        for tag in _KEPT:
            if tag in ds:
                kept.add(ds[tag])
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, kept)
        return buf.getvalue()
    except Exception as exc:  # noqa: BLE001 - the SR is then made from the study's attributes, as before
        logger.warning("SR context: the first header cannot be kept (%s); the SR copies the study's attributes only",
                       type(exc).__name__)
        return b""


def sr_context(datasets: Iterable[Any]) -> SrContext | None:
    """The :class:`SrContext` of the screened instances, from their parsed data sets, in slice order (of the first
    slice's header what the SR reads of it; the descriptors of every instance, until
    :meth:`SrContext.for_result` keeps those of the images the SR references).

    An instance without a SOP Instance UID is left out. Never raises: returns None (and logs) when the
    headers cannot be used, or None when ``datasets`` is empty.
    """
    try:
        study_attrs: tuple[tuple[str, str], ...] | None = None
        header = b""
        found: dict[str, tuple[str, str, str, int, int, int]] = {}
        described: dict[str, tuple[tuple[str, str], ...]] = {}
        kept = []
        for ds in datasets:
            uid = str(ds.get("SOPInstanceUID", ""))
            if not uid:
                continue
            kept.append(ds)
            found[uid] = (str(ds.SOPClassUID), uid, str(ds.get("SeriesInstanceUID", "")),
                          int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("Rows", 0) or 0),
                          int(ds.get("Columns", 0) or 0))
            described[uid] = _described(ds)
            if study_attrs is None:
                study_attrs = tuple((k, str(ds.get(k, "") or "")) for k in STUDY_KEYWORDS)
                header = _header(ds)
        if study_attrs is None:
            return None
        return SrContext(study_attrs, tuple(found.values()), header, tuple(described.items()), timezone_offset(kept))
    except Exception as exc:  # noqa: BLE001 - the SR is an extra; screening goes on without it
        # its type only: pydicom's messages quote the value it choked on (a patient's name stored with a wrong VR)
        logger.warning("no SR context for study: %s (its message is withheld: it may quote patient data)",
                       type(exc).__name__)
        return None


def encode_sr(result: CaseResult, context: SrContext, earlier: Sequence[CaseResult] = ()) -> bytes:
    """The DICOM Part 10 bytes of the Comprehensive 3D SR (TID 1500) of ``result`` (``earlier``: the study's
    earlier readings, its predecessors; the same as the delivered SR's, so one SOP Instance UID, one content).

    Raises
    ------
    ValueError
        When ``context`` does not belong to the result's study (from :func:`aggregator.sr.to_sr`).
    """
    from aggregator.sr import to_sr

    sr = to_sr(result, context.datasets(), predecessors=earlier)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
