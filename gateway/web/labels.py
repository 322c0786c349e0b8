"""Labels of a study for the worklist: study date, accession number, series description.

Read from one stored instance's header (no pixels); patient name, ID and birth date are never read. They
are not free of patient data: the accession number identifies the order (as a RIS worklist shows it) and
the series description is free text an operator may have typed anything into; so the worklist needs
``results:read``, as the results do. A study date that is no DICOM date (``YYYYMMDD``) is not kept: a broken
length takes in the elements after it. The series description is the screened series' (an instance of
the series the result is about): scanners send the scout or topogram first, whose description is not the
study's.
"""

from __future__ import annotations

import io
import unicodedata
from dataclasses import dataclass

from gateway.store.store import CONTROL_CHARACTERS

__all__ = ["LABEL_KEYWORDS", "LABEL_PREFIX_BYTES", "LabelHeader", "dicom_date", "displayable", "label_prefix",
           "read_label_header"]

LABEL_KEYWORDS = ("StudyDate", "AccessionNumber", "SeriesDescription")
LABEL_PREFIX_BYTES = 1024 * 1024
"""How much of a stored instance is read for its labels: its header, not its pixel data (a 1.2 GiB instance was
read whole, 580 MB -> 4 GB of memory, at each worklist load)."""
_LIMITS = {"study_date": 8, "accession_number": 16, "series_description": 64}


def displayable(value: object) -> str:
    """A header value as one line of text a page may show as it is: a multi-valued one joined by DICOM's
    backslash (not a Python list), without control characters (PostgreSQL's text refuses a NUL, which an
    Accession Number may carry) and without Unicode format characters (a right-to-left override in an
    Accession Number showed ``ACC12\\u202e3456`` as ``ACC126543``).

    >>> displayable("ACC12\\u202e3456"), displayable(["Thorax", "Lung 1.0"]), displayable("A\\x00B\\u200b ")
    ('ACC123456', 'Thorax\\\\Lung 1.0', 'AB')
    """
    from pydicom.multival import MultiValue

    text = "\\".join(str(v) for v in value) if isinstance(value, list | tuple | MultiValue) else str(value)
    text = CONTROL_CHARACTERS.sub("", text)
    return "".join(c for c in text if unicodedata.category(c) != "Cf").strip()


def dicom_date(text: str) -> bool:
    """``text`` is a date as DICOM writes one (DA: ``YYYYMMDD``, a real day).

    >>> dicom_date("20201231"), dicom_date("20200231"), dicom_date("Zyxwvut9"), dicom_date("2020-12-31")
    (True, False, False, False)

    Digits are ASCII ones (DA's character repertoire): ``int`` and ``isdigit`` take others too.

    >>> dicom_date("\N{ARABIC-INDIC DIGIT TWO}0201231"), dicom_date("٢٠٢٠١٢٣١")
    (False, False)
    """
    import datetime

    if len(text) != 8 or not (text.isascii() and text.isdigit()):
        return False
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class LabelHeader:
    """The labels of one instance and the series it belongs to (to tell the screened series' instances)."""

    labels: dict[str, str | None]
    series_instance_uid: str | None


def read_label_header(data: bytes) -> LabelHeader:
    """The labels of the instance ``data`` (values missing or unreadable are None) and its Series Instance UID.

    >>> read_label_header(b"not dicom")
    LabelHeader(labels={'study_date': None, 'accession_number': None, 'series_description': None}, series_instance_uid=None)
    """
    out: dict[str, str | None] = dict.fromkeys(_LIMITS)
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True,
                             specific_tags=[*LABEL_KEYWORDS, "SeriesInstanceUID"])
        for keyword, name in zip(LABEL_KEYWORDS, _LIMITS, strict=True):
            out[name] = displayable(ds.get(keyword, "") or "")[: _LIMITS[name]] or None
        if out["study_date"] is not None and not dicom_date(out["study_date"]):
            out["study_date"] = None
        series = str(ds.get("SeriesInstanceUID", "") or "").strip() or None
    except Exception:  # noqa: BLE001 - a label is a convenience; the row shows its UID instead
        return LabelHeader(dict.fromkeys(_LIMITS), None)
    return LabelHeader(out, series)


def label_prefix(blobs: object, key: str, limit: int = LABEL_PREFIX_BYTES) -> bytes:
    """The first ``limit`` bytes of the blob ``key``: its header, which holds the labels (the data set up to
    its pixel data). A blob store that has files (``path(key)``) is read that far only; another is read whole.

    Raises
    ------
    OSError
        The blob cannot be read (gone, the store failed).
    """
    path = getattr(blobs, "path", None)
    if path is None:
        return bytes(blobs.get(key)[:limit])  # type: ignore[attr-defined]
    with open(path(key), "rb") as fh:
        return fh.read(limit)
