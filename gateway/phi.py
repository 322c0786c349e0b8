"""No patient data in the gateway's logs, from the libraries it calls either.

pydicom reports a header value it cannot accept with the value itself, through its ``pydicom`` logger and
again as a ``UserWarning`` (``Invalid value for VR DA: '03/02/1901'.``). A malformed birth date or name
from a scanner would then reach the log each time such a value is set on a data set (the SR's patient
and study attributes, for every instance of the study). highdicom warns with the name itself when a
Patient's Name has a single component, as anonymised and some real studies do. :func:`protect_logs`
keeps pydicom's message and withholds the value (every quoted string in a ``pydicom`` record becomes
``<withheld>``), and shows neither pydicom's duplicate warnings nor highdicom's warnings.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings

__all__ = ["ValueRedactor", "WithheldError", "file_ref", "protect_logs", "withheld"]

_QUOTED = re.compile(r"""b?'(?:\\.|[^'\\])*'|b?"(?:\\.|[^"\\])*\"""")


class ValueRedactor(logging.Filter):
    """A filter that replaces every quoted string of a record's message by ``<withheld>``.

    >>> r = logging.LogRecord("pydicom", logging.WARNING, "", 0, "Invalid value for VR %s: %r.", ("DA", "1/2/01"), None)
    >>> ValueRedactor().filter(r), r.getMessage()
    (True, 'Invalid value for VR DA: <withheld>.')

    A malformed call is left to the handler to report, as it is without the filter:

    >>> ValueRedactor().filter(logging.LogRecord("pydicom", logging.WARNING, "", 0, "%s %s", ("x",), None))
    True
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call: the handler reports it, as without this filter
            return True
        redacted = _QUOTED.sub("<withheld>", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def protect_logs() -> None:
    """Withhold header values from pydicom's log records and drop its duplicate warnings, and keep httpx's
    request lines (whole URLs) out of the log (idempotent; process-wide: call it in every process that parses
    DICOM, decode workers included)."""
    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, ValueRedactor) for f in logger.filters):
        logger.addFilter(ValueRedactor())
    # the same text as the (redacted) log record, with the value: not shown
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning)
    # highdicom warns with the name itself when a Patient's Name has one component ("GOUDURIX")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"highdicom(\.|$)")
    warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name", category=UserWarning)
    # httpx logs every request's whole URL at INFO: a webhook's secret in its query string (ctscreen's own lines
    # name a destination by its URL without the query); its warnings and errors still come through
    for name in ("httpx", "httpcore"):
        if logging.getLogger(name).getEffectiveLevel() < logging.WARNING:
            logging.getLogger(name).setLevel(logging.WARNING)


def file_ref(name: str) -> str:
    """How a log line names an uploaded file: a digest of its name, never the name, since export folders
    and files are often named after the patient (the uploader gets the names back in its own answer).

    >>> file_ref("DOE_JANE_123/IM0001.dcm")
    'file#889c8e93a4'
    """
    return "file#" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]


class WithheldError(Exception):
    """Stands in a log record for an exception whose message is withheld (:func:`withheld`)."""


def withheld(exc: BaseException) -> WithheldError:
    """``exc`` for a log record's ``exc_info`` with its message (and its causes') withheld: the traceback's
    frames and the exception's type are kept. An unexpected error's message may quote what it choked on: a
    header value (a patient's name, a birth date), a file name named after the patient, or the parameters of
    an SQL statement; the last-resort handlers log this instead of ``logger.exception``.

    >>> try:
    ...     raise ValueError("Invalid value for PatientName: 'DOE^JANE'")
    ... except ValueError as e:
    ...     w, tb = withheld(e), e.__traceback__
    >>> str(w), w.__traceback__ is tb
    ('ValueError (its message is withheld: it may quote patient data)', True)
    """
    out = WithheldError(f"{type(exc).__qualname__} (its message is withheld: it may quote patient data)")
    out.__traceback__ = exc.__traceback__
    if exc.__cause__ is not None:
        out.__cause__ = withheld(exc.__cause__)
    elif exc.__context__ is not None and not exc.__suppress_context__:
        out.__context__ = withheld(exc.__context__)
    out.__suppress_context__ = exc.__suppress_context__
    return out
