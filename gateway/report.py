"""What a finished job needs to be sent back to PACS as a DICOM SR, and the SR itself.

:func:`aggregator.sr.to_sr` needs the screened images' headers (patient, study, SOP class and
instance of each slice). A job keeps only that, as a small :class:`SrContext` (about a hundred bytes per
slice, no pixels), taken by ingest from the data sets it parsed (:func:`sr_context`; the files are not
read again for it), so the SR can be made from the job at any time afterwards (:func:`encode_sr`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aggregator.schema import CaseResult

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

__all__ = ["SrContext", "encode_sr", "sr_context"]

STUDY_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                  "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyInstanceUID", "Modality")


@dataclass(frozen=True, slots=True)
class SrContext:
    """The headers an SR of a study needs.

    Attributes
    ----------
    study : tuple[tuple[str, str], ...]
        Patient and study attributes (keyword, value) of the screened series.
    instances : tuple[tuple[str, str, str, int, int, int], ...]
        ``(SOPClassUID, SOPInstanceUID, SeriesInstanceUID, NumberOfFrames, Rows, Columns)`` per screened
        instance.
    """

    study: tuple[tuple[str, str], ...]
    instances: tuple[tuple[str, str, str, int, int, int], ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (kept in the state store beside the result)."""
        return {"study": [list(p) for p in self.study], "instances": [list(i) for i in self.instances]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SrContext:
        """The inverse of :meth:`to_json`."""
        return cls(tuple((str(k), str(v)) for k, v in data["study"]),
                   tuple((str(a), str(b), str(c), int(d), int(e), int(f)) for a, b, c, d, e, f in data["instances"]))

    def datasets(self) -> list[Any]:
        """Header-only pydicom data sets, one per instance (the ``evidence`` of :func:`~aggregator.sr.to_sr`)."""
        from pydicom.dataset import Dataset

        out = []
        for sop_class, sop_instance, series, frames, rows, cols in self.instances:
            ds = Dataset()
            for keyword, value in self.study:
                setattr(ds, keyword, value)
            ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = sop_class, sop_instance, series
            ds.Rows, ds.Columns = rows, cols  # highdicom wants a pixel description of a source image
            if frames > 1:
                ds.NumberOfFrames = frames
            out.append(ds)
        return out


def sr_context(datasets: Iterable[Any]) -> SrContext | None:
    """The :class:`SrContext` of the screened instances, from their parsed data sets (in arrival order).

    The patient and study attributes come from the first instance; an instance without a SOP Instance
    UID is left out. Never raises: returns None (and logs) when the headers cannot be used, or None
    when ``datasets`` is empty.
    """
    try:
        study_attrs: tuple[tuple[str, str], ...] | None = None
        found: dict[str, tuple[str, str, str, int, int, int]] = {}
        for ds in datasets:
            uid = str(ds.get("SOPInstanceUID", ""))
            if not uid:
                continue
            found[uid] = (str(ds.SOPClassUID), uid, str(ds.get("SeriesInstanceUID", "")),
                          int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("Rows", 0) or 0),
                          int(ds.get("Columns", 0) or 0))
            if study_attrs is None:
                study_attrs = tuple((k, str(ds.get(k, "") or "")) for k in STUDY_KEYWORDS)
        if study_attrs is None:
            return None
        return SrContext(study_attrs, tuple(found.values()))
    except Exception as exc:  # noqa: BLE001 - the SR is an extra; screening goes on without it
        logger.warning("no SR context for study: %s: %s", type(exc).__name__, exc)
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
