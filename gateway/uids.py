"""Identifiers that reach a file system or a database, validated first (issue 14, input hygiene).

A DICOM UID (PS3.5 section 9.1) is at most 64 characters of digits and dots: components separated by
single dots, each a run of digits without a leading zero (``0`` alone is allowed). Anything else
(``..``, ``/``, ``%2e``, NUL, a 10 kB string) is refused here, before it can meet a path join, a spool
folder or a SQL statement. Job ids are the 32 hex digits :func:`uuid.uuid4` gives.

>>> check_uid("1.2.840.10008.5.1.4.1.1.2")
'1.2.840.10008.5.1.4.1.1.2'
>>> check_uid("..")
Traceback (most recent call last):
...
gateway.errors.InvalidUid: StudyInstanceUID '..' is not a DICOM UID: digits and single dots only, no leading zeros, at most 64 characters.
"""

from __future__ import annotations

import re

from gateway.errors import InvalidUid

__all__ = ["InvalidUid", "check_uid", "is_job_id", "is_uid"]

UID_MAX = 64
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def is_uid(value: object) -> bool:
    """Whether ``value`` is a string obeying the DICOM UID grammar (PS3.5 9.1).

    >>> [is_uid(v) for v in ("1.2.3", "1.02.3", "1..2", "", "1.2.", "a.1")]
    [True, False, False, False, False, False]
    """
    return isinstance(value, str) and 0 < len(value) <= UID_MAX and _UID.fullmatch(value) is not None


def check_uid(value: object, name: str = "StudyInstanceUID") -> str:
    """Return ``value`` when it is a DICOM UID, else raise :class:`InvalidUid` (400 ``invalid_uid``).

    The message quotes at most 70 characters of the value (as ``repr``), so a hostile value cannot
    flood a log line or carry control characters into it.
    """
    if is_uid(value):
        return value  # type: ignore[return-value]
    shown = repr(value if not isinstance(value, str) else value[:70])
    raise InvalidUid(f"{name} {shown} is not a DICOM UID: digits and single dots only, no leading zeros, "
                     f"at most {UID_MAX} characters.")


def is_job_id(value: object) -> bool:
    """Whether ``value`` has the form of a job id (32 lowercase hex digits).

    >>> is_job_id("0" * 32), is_job_id("../etc/passwd")
    (True, False)
    """
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


def check_header_uids(header: object) -> None:
    """Check the Study, Series and SOP Instance UIDs of a parsed header; raises :class:`InvalidUid` naming the
    first one missing or bad. All three are Type 1 in a CT image: without its Study Instance UID an upload's
    object was filed under ``""`` (no study URL, no SR) and escaped the mixed-studies check; without its SOP
    Instance UID the result named it by its file name (often the patient's), as STOW-RS and C-STORE never did.

    >>> from types import SimpleNamespace as H
    >>> check_header_uids(H(study_instance_uid="1.2", series_instance_uid="1.3", sop_instance_uid="1.4"))
    >>> check_header_uids(H(study_instance_uid="", series_instance_uid="1.3", sop_instance_uid="1.4"))
    Traceback (most recent call last):
    gateway.errors.InvalidUid: StudyInstanceUID is missing: a CT image needs its Study, Series and SOP Instance UIDs.
    """
    for name, attr in (("StudyInstanceUID", "study_instance_uid"), ("SeriesInstanceUID", "series_instance_uid"),
                       ("SOPInstanceUID", "sop_instance_uid")):
        value = getattr(header, attr, "") or ""
        if not value or value.endswith("#nouid"):  # '#nouid': the decoder's stand-in for a missing SOP UID
            raise InvalidUid(f"{name} is missing: a CT image needs its Study, Series and SOP Instance UIDs.")
        check_uid(value, name)
