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
import hmac
import logging
import re
import secrets
import warnings
from contextvars import ContextVar
from typing import Any

__all__ = ["QueryStripper", "RequestScope", "ValueRedactor", "WithheldError", "file_ref", "patient_key", "patient_key_of",
           "protect_logs", "withheld"]

REQUEST_SCOPE: ContextVar[dict[str, Any] | None] = ContextVar("ctscreen_request_scope", default=None)
"""The ASGI scope of the request being answered (:class:`RequestScope`): the access log reads its route."""

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


class PluginFailures(logging.Filter):
    """A filter of pydicom's decoders' logger that turns the record of a decoding plugin that failed on a frame (at
    ERROR, with its traceback: ``LOGGER.exception``) into a DEBUG line without it.

    A corrupt frame in an upload put an ERROR record with a traceback for each plugin in the gateway's log, as if the
    gateway had failed; the file is refused (undecodable) with every plugin's words, and a plugin that fails where
    the next one succeeds is no fault at all.

    >>> failed = (ValueError, ValueError("bad marker"), None)
    >>> r = logging.LogRecord("pydicom.pixels.decoders.base", logging.ERROR, "", 0, "bad marker", (), failed)
    >>> PluginFailures().filter(r), r.levelname, r.exc_info
    (True, 'DEBUG', None)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
            record.exc_info, record.exc_text = None, None
        return True


class QueryStripper(logging.Filter):
    """A filter of uvicorn's access log that leaves each request's query string out of its line, and the path of a
    request the gateway refused: no route of the gateway takes patient data in a query, but a client may send it
    one (``?patient=DOE``), or a path (``/v1/studies/DOE.JOHN``, refused 400), and the access log wrote both as
    sent. ``?`` marks that a query was left out; a refused or redirected request's path (status 300 and above) is its
    route's template (from :data:`REQUEST_SCOPE`), or ``(path withheld)`` where no route took it (a slash redirect,
    an error answered after the app). An answered request keeps its path: a route took its parameters (a job, a
    UID, a destination that exists).

    >>> r = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
    ...                       ("127.0.0.1:5", "GET", "/v1/worklist?patient=DOE&limit=5", "1.1", 200), None)
    >>> QueryStripper().filter(r), r.getMessage()
    (True, '127.0.0.1:5 - "GET /v1/worklist? HTTP/1.1" 200')
    >>> r.args = ("127.0.0.1:5", "GET", "/nowhere/DOE.JOHN", "1.1", 404); QueryStripper().filter(r), r.getMessage()
    (True, '127.0.0.1:5 - "GET (path withheld) HTTP/1.1" 404')
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str)):
            return True
        path, mark, _ = args[2].partition("?")  # mark: "?" when a query was sent, left out here
        # refused, or sent elsewhere (a slash redirect answers a path no route took, before any route refuses it)
        refused = len(args) >= 5 and isinstance(args[4], int) and args[4] >= 300
        if refused:
            scope = REQUEST_SCOPE.get()
            template = getattr((scope or {}).get("route"), "path", None)
            path = template if isinstance(template, str) and template.startswith("/") else "(path withheld)"
        if mark or refused:
            record.args = (*args[:2], path + mark, *args[3:])
        return True


class RequestScope:
    """ASGI middleware keeping the scope of the request being answered in :data:`REQUEST_SCOPE` while the app
    answers it (uvicorn writes its access line as the answer starts, from within the app's call): the routing
    puts the matched route in that same scope."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        token = REQUEST_SCOPE.set(scope if scope["type"] == "http" else None)
        try:
            await self.app(scope, receive, send)
        finally:
            REQUEST_SCOPE.reset(token)


def protect_logs() -> None:
    """Withhold header values from pydicom's log records and drop its duplicate warnings, log its decoding plugins'
    failures without their tracebacks (:class:`PluginFailures`), keep httpx's
    request lines (whole URLs) out of the log and query strings out of uvicorn's access log (idempotent; process-wide: call it in every process that parses
    DICOM, decode workers included)."""
    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, ValueRedactor) for f in logger.filters):
        logger.addFilter(ValueRedactor())
    decoders = logging.getLogger("pydicom.pixels.decoders.base")  # its own logger: the filters above do not see it
    if not any(isinstance(f, PluginFailures) for f in decoders.filters):
        decoders.addFilter(PluginFailures())
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QueryStripper) for f in access.filters):
        access.addFilter(QueryStripper())
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


_FILE_REF_KEY = secrets.token_bytes(32)
"""The key of :func:`file_ref`'s digests: this process's own, never stored or logged."""


def file_ref(name: str) -> str:
    """How a log line names an uploaded file: a keyed digest of its name, never the name, since export
    folders and files are often named after the patient (the uploader gets the names back in its own answer).

    Keyed (HMAC-SHA256 with a random key of this process): a plain digest of a name was reversed in seconds by
    trying every name of a known form (an export folder named by a 7-digit record number: 17 s on two cores).
    One name reads the same in every line of one process, so the lines of one upload still go together.

    >>> ref = file_ref("DOE_JANE_123/IM0001.dcm")
    >>> ref.startswith("file#") and len(ref) == 15 and ref == file_ref("DOE_JANE_123/IM0001.dcm")
    True
    """
    digest = hmac.new(_FILE_REF_KEY, name.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return "file#" + digest.hexdigest()[:10]


_PATIENT_KEY_DOMAIN = b"ctscreen/patient-key/v1\x00"
"""Prefixed to what :func:`patient_key` digests: its digests are of no use as another system's digest of an ID."""


def patient_key(patient_id: object, issuer: object = None) -> str:
    """The patient a study names, as the state store keeps it (``studies.patient_key``): a SHA-256 digest, never
    the ID, of Patient ID (0010,0020) with Issuer of Patient ID (0010,0021), each stripped of DICOM's padding.

    One study names one patient: an instance, a version or an upload whose key is not the one the study's
    earlier instances gave is refused (``patient_mismatch``; ``mixed_patients`` within one upload). An empty or
    absent Patient ID is a value like any other, not a wildcard: an anonymised study (every instance without an
    ID) still goes together, and a slice stripped of its ID cannot slip into a study that has one. The issuer
    takes part: the same ID from another issuer is another patient.

    Not keyed with a secret (the deployment has none to give; a per-process key, as :func:`file_ref`'s, would not
    survive a restart nor match between replicas), so a 7-digit record number could be found from its digest by
    trying them all; the prefix keeps the digests apart from any other system's. The same database already holds
    the Patient ID of each screened study in clear (``results.sr_context``, the SR's headers), so the digest
    exposes nothing more; it keeps the ID out of a new column, its indexes and its log lines.

    >>> key = patient_key("PH00000000")
    >>> len(key), key == patient_key(" PH00000000 ", ""), key == patient_key("PH00000000", "HOSP")
    (64, True, False)
    >>> patient_key(None) == patient_key("") != patient_key("PH00000007")
    True
    """
    parts = ("" if v is None else str(v).strip() for v in (issuer, patient_id))
    digest = hashlib.sha256(_PATIENT_KEY_DOMAIN)
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass") + b"\x00")
    return digest.hexdigest()


def patient_key_of(ds: Any) -> str:
    """:func:`patient_key` of a data set's Patient ID and Issuer of Patient ID (absent ones empty).

    >>> patient_key_of({"PatientID": "PH00000000"}) == patient_key("PH00000000")
    True
    """
    try:
        return patient_key(ds.get("PatientID", None), ds.get("IssuerOfPatientID", None))
    except Exception:  # noqa: BLE001 - a malformed value surfaces lazily in pydicom: an empty one
        return patient_key(None)


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
