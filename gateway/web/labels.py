"""Patient-free labels of a study for the worklist: study date, accession number, series description.

Read from one stored instance's header (no pixels); patient name, ID and birth date are never read.
"""

from __future__ import annotations

import io

from gateway.store.store import CONTROL_CHARACTERS

__all__ = ["LABEL_KEYWORDS", "read_labels"]

LABEL_KEYWORDS = ("StudyDate", "AccessionNumber", "SeriesDescription")
_LIMITS = {"study_date": 8, "accession_number": 16, "series_description": 64}


def read_labels(data: bytes) -> dict[str, str | None]:
    """The labels of the instance ``data`` (values missing or unreadable are None), without control characters
    (PostgreSQL's text refuses a NUL, which an Accession Number may carry).

    >>> read_labels(b"not dicom")
    {'study_date': None, 'accession_number': None, 'series_description': None}
    """
    out: dict[str, str | None] = dict.fromkeys(_LIMITS)
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True, specific_tags=list(LABEL_KEYWORDS))
        for keyword, name in zip(LABEL_KEYWORDS, _LIMITS, strict=True):
            value = CONTROL_CHARACTERS.sub("", str(ds.get(keyword, "") or "")).strip()
            out[name] = value[: _LIMITS[name]] or None
    except Exception:  # noqa: BLE001 - a label is a convenience; the row shows its UID instead
        return dict.fromkeys(_LIMITS)
    return out
