"""Sending built objects to one destination: DICOM C-STORE (pynetdicom), STOW-RS and FHIR (httpx), HL7 v2 over
MLLP (asyncio, the ``hl7`` library's MLLP streams).

Each sender takes ``[(uid, sop_class_uid, bytes)]`` and returns the UIDs the destination acknowledged;
it raises :class:`SendError` for the rest, ``permanent`` when trying again cannot help (a 4xx answer
other than 408/429 and than a STOW-RS 409 for want of resources, a permanent redirect (never followed), a refused
association, a C-STORE failure other
than out of resources: :func:`store_status`). A FHIR server's refusal of a reference it cannot resolve yet
(412; a 404 with an OperationOutcome, as HAPI FHIR answers a conditional reference that matches nothing,
HAPI-1091, issue code ``processing``; or any issue code ``not-found``: the RIS has no such patient or order
yet, as when the images reach screening before the order or the registration does) is tried again with the
others' back-off; a 412 that says more than one resource matches (duplicates at the server) is permanent. A
FHIR server's 409 (a version conflict) is tried again, a 401 (an expired token) after the longest back-off
(``SendError.longest``); a 429's or 503's ``Retry-After`` is the least wait (``SendError.wait_s``); a read
timeout says the server may have stored what was sent. An HL7 message is delivered on the RIS's application
accept (MSA-1 ``AA``, or ``CA``) of that message (MSA-2 our MSH-10); an application error (``AE``/``CE``), no
ACK, an ACK of another message, one that is no HL7 ACK, a connection refused or lost are tried again; a reject
(``AR``/``CR``) is permanent (:func:`ack_outcome`).
Blocking (pynetdicom) or async (httpx, asyncio); messages never hold a header value or patient data of ours (an HL7
ACK's text, MSA-3 and ERR, is the RIS's own words, quoted on one line).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import io
import logging
import os
import re
import socket
import ssl
import uuid
from collections.abc import Collection, Sequence
from typing import Any

import httpx

from aggregator.schema import counted
from gateway.delivery.config import DicomDestination, FhirDestination, Hl7Destination, StowDestination
from gateway.dimse_scu import steady_reactor

logger = logging.getLogger(__name__)

Item = tuple[str, str, bytes]
"""(SOP Instance UID or identifier, SOP Class UID or "", bytes)."""


class SendError(RuntimeError):
    """A send that did not (fully) succeed; ``sent`` holds what did. ``wait_s``: the least wait before the next try
    that the destination asked for (``Retry-After``); ``longest``: the next try after the longest back-off (a
    refusal that a quick retry cannot help, an expired token)."""

    def __init__(self, message: str, *, permanent: bool = False, sent: Sequence[str] = (), wait_s: float | None = None,
                 longest: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.sent = list(sent)
        self.wait_s = wait_s
        self.longest = longest


DUPLICATE = 0x0111
"""Status of a C-STORE, or failure reason of a STOW-RS object, that the peer holds that SOP instance already."""

TRANSIENT_STATUSES = (0x0210, 0x0213)
"""The failures besides 0xA7xx ("Refused: Out of Resources") that another try can help (PS3.7 C.5): 0x0213
"Resource Limitation", and 0x0210 "Duplicate Invocation" (a Message ID in use on that association; the next try
opens a new one). Every other failure (0x01xx, 0x0211 "Unrecognised Operation", 0xA9xx, 0xCxxx, any status PS3.7
does not define) refuses that object for good."""


def store_status(code: int) -> tuple[str, str]:
    """How a C-STORE status, or a STOW-RS failure or warning reason (the same codes, PS3.18 10.5.3), reads:
    ``("stored" | "transient" | "permanent", meaning)``. Success and the warnings (0x0001, 0x0107, 0x0116,
    0xBxxx, PS3.7 C and PS3.4 B.2.3) are stored; out of resources (0xA7xx) and :data:`TRANSIENT_STATUSES`
    transient; any other status is a permanent failure. ``meaning``: the standard's words (pynetdicom's table).

    >>> store_status(0x0116)
    ('stored', 'Attribute Value Out of Range')
    >>> store_status(0x0122)
    ('permanent', 'Refused: SOP Class Not Supported')
    """
    from pynetdicom.status import (
        STATUS_SUCCESS,
        STATUS_UNKNOWN,
        STATUS_WARNING,
        STORAGE_SERVICE_CLASS_STATUS,
        code_to_category,
    )

    category = code_to_category(code)
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (category, ""))[1] or (
        category if category != STATUS_UNKNOWN else "a status DICOM does not define")
    if category in (STATUS_SUCCESS, STATUS_WARNING):
        return "stored", meaning
    if 0xA700 <= code <= 0xA7FF or code in TRANSIENT_STATUSES:
        return "transient", meaning
    return "permanent", meaning


DUPLICATE_REJECTION_NOTE = 0xA770
"""dcm4chee-arc's status (C-STORE, or STOW-RS failure reason) for a Rejection Note whose SOP instance it received
already ("Rejection Note [uid=...] already received"); in the 0xA7xx range that DICOM gives to "out of
resources". A note's UID derives from its content, so for a note (the payload says which objects are notes:
``notes``) it means held already: delivered. For any other object it keeps its standard meaning."""


def send_dicom(dest: DicomDestination, items: Sequence[Item], calling_ae_title: str,
               notes: Collection[str] = ()) -> list[str]:
    """C-STORE every item over one association (blocking); ``notes``: the UIDs of the Rejection Notes among them."""
    import pydicom
    from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=dest.calling_ae_title or calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    for sop_class in sorted({c for _, c, _ in items}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls = None
    if dest.tls is not None:
        context = _tls_context(dest)
        tls = (context, dest.tls.server_hostname or dest.host)
        handshakes = _handshake_failures(context)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    except OSError as exc:
        raise SendError(f"cannot reach {dest.where}: {exc.strerror or exc}") from None
    if tls is not None and handshakes and not assoc.is_established:  # pynetdicom logs it and says no more
        raise SendError(f"TLS handshake with {dest.where} failed: {_tls_words(handshakes[0], tls[1])}")
    if assoc.is_rejected:
        # A-ASSOCIATE-RJ result 1 is permanent; 2 (transient: the PACS is busy, at its association limit) is
        # tried again with back-off, as the gateway's own SCP asks its senders to
        rejection = getattr(assoc.acceptor, "primitive", None)
        result, source, reason = (getattr(rejection, a, None) for a in ("result", "result_source", "diagnostic"))
        transient = result == 0x02
        raise SendError(f"association rejected by {dest.where} "
                        + ("for now (transient" if transient else "for good (permanent")
                        + f"): {rejection_words(source, reason, ae.ae_title, dest.ae_title)}", permanent=not transient)
    if not assoc.is_established:
        raise SendError(f"no association with {dest.where} (refused, aborted or timed out)")
    steady_reactor(assoc)  # else a reactor run late may take a C-STORE's answer: a DIMSE timeout, then a resend
    sent: list[str] = []
    try:
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        refused = sorted({c for _, c, _ in items} - accepted)
        if refused:  # pynetdicom would raise ValueError at the first such object; trying again cannot help
            names = ", ".join(getattr(UID(c), "name", c) for c in refused)
            raise SendError(f"{dest.where} accepts no presentation context for {names}; set the destination's "
                            "objects to those it takes (e.g. [key_images])", permanent=True)
        for uid, sop_class, data in items:
            ds = pydicom.dcmread(io.BytesIO(data))
            try:
                status = assoc.send_c_store(ds) if assoc.is_established else None
            except RuntimeError:  # pynetdicom's "must be established": it ended between the check and the send
                if assoc.is_established:
                    raise
                status = None
            if status is None:  # the peer aborted or closed the association after its last answer
                raise SendError(f"{dest.where} ended the association after {len(sent)} of "
                                f"{counted(len(items), 'object')} (an A-ABORT or the connection closed); the rest "
                                "go at the next try", sent=sent)
            code = getattr(status, "Status", None)
            if code is None:
                raise SendError(f"{dest.where} did not answer a C-STORE (connection lost)", sent=sent)
            outcome, meaning = store_status(code)
            name = getattr(UID(sop_class), "name", sop_class)
            if code == DUPLICATE or (code == DUPLICATE_REJECTION_NOTE and uid in notes):
                # held already: our UIDs are stable per result, so a PACS that refuses overwrites has this very
                # object (a resend, a lost answer)
                sent.append(uid)
            elif outcome == "stored":  # success, or a warning (coercion, elements discarded, value out of range)
                if code:
                    logger.warning("%s stored a %s object with a warning (C-STORE status 0x%04X: %s)", dest.where,
                                   name, code, meaning)
                sent.append(uid)
            elif outcome == "transient":
                raise SendError(f"{dest.where} is out of resources or busy for now (C-STORE status 0x{code:04X}: "
                                f"{meaning}) storing a {name} object", sent=sent)
            else:
                raise SendError(f"{dest.where} refused a {name} object for good (C-STORE status 0x{code:04X}: "
                                f"{meaning})", sent=sent, permanent=True)
    finally:
        if assoc.is_established:
            assoc.release()
    return sent


def _tls_context(dest: DicomDestination | Hl7Destination) -> ssl.SSLContext:
    """The TLS context of a destination that has ``tls``.

    Raises
    ------
    SendError
        Permanent: its files make no TLS context (checked when the file was loaded; a file changed since fails
        here, for good).
    """
    assert dest.tls is not None
    try:
        return dest.tls.context()
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise SendError(f"the TLS files of {dest.where} do not make a TLS context ({type(exc).__name__})",
                        permanent=True) from None


def _handshake_failures(context: Any) -> list[OSError]:
    """The errors of the TLS handshakes of the sockets ``context`` (an :class:`ssl.SSLContext`) makes, as they
    happen: pynetdicom catches a failed one, logs it and reports only an association not established. Its
    documented hook ``sslsocket_class`` makes the sockets record them."""
    import ssl

    failures: list[OSError] = []

    class Recording(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            try:
                super().do_handshake(block)
            except OSError as exc:
                failures.append(exc)
                raise

    context.sslsocket_class = Recording
    return failures


def _tls_words(exc: OSError, server_hostname: str) -> str:
    """A failed TLS handshake in words: a certificate that does not verify (and why: OpenSSL's words), another TLS
    error (OpenSSL's reason), or the connection lost (a peer that does not speak TLS there)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"certificate verify failed: {str(exc.verify_message).rstrip('.')} (the name checked: "
                f"{server_hostname}, tls.server_hostname or else host; the CAs trusted: tls.ca_file)")
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or type(exc).__name__)
    return f"{exc.strerror or type(exc).__name__} (does the peer speak TLS on that port?)"


REJECTION_REASONS = {
    1: ("the DICOM UL service-user", {1: "no reason given", 2: "application context name not supported",
                                     3: "calling AE title {calling} not recognised",
                                     7: "called AE title {called} not recognised"}),
    2: ("the DICOM UL service-provider (ACSE)", {1: "no reason given", 2: "protocol version not supported"}),
    3: ("the DICOM UL service-provider (presentation)", {1: "temporary congestion", 2: "local limit exceeded"}),
}
"""A-ASSOCIATE-RJ's Source and Reason/Diag. in words (PS3.8 9.3.4), by source, then reason."""


def rejection_words(source: int | None, reason: int | None, calling: str, called: str) -> str:
    """An A-ASSOCIATE-RJ's reason and source in words, the AE titles named where the reason is one of them.

    >>> rejection_words(1, 3, "CTSCREEN", "PACS")
    'calling AE title CTSCREEN not recognised, said the DICOM UL service-user'
    >>> rejection_words(3, 2, "CTSCREEN", "PACS")
    'local limit exceeded, said the DICOM UL service-provider (presentation)'
    """
    who, reasons = REJECTION_REASONS.get(source or 0, (f"source {source}", {}))
    words = reasons.get(reason or 0, f"reason {reason}").format(calling=calling.strip(), called=called.strip())
    return f"{words}, said {who}"


def _http_error(where: str, response: httpx.Response, sent: Sequence[str] = ()) -> SendError:
    """A refusal: permanent for a 4xx but 401 (an expired token: tried again after the longest back-off), 408, 425 and
    429, and for a permanent redirect (:data:`PERMANENT_REDIRECTS`, never followed); a 429's or 503's ``Retry-After``
    is the least wait before the next try."""
    status = response.status_code
    message = f"{where} answered HTTP {status}{outcome_codes(response)}"
    wait_s = retry_after(response) if status in (429, 503) else None
    if wait_s is not None:
        message += f" (asks to wait {wait_s:g} s)"
    if status == 401:
        message += " (unauthorized: its token may have expired or been revoked; tried again after the longest back-off)"
    if 300 <= status < 400:  # its Location is not quoted: a URL may carry a token
        message += (" (a redirect, which is not followed: set the destination's url to where it points"
                    + (")" if status in PERMANENT_REDIRECTS else "; tried again)"))
    return SendError(message, permanent=(400 <= status < 500 and status not in (401, 408, 425, 429))
                     or status in PERMANENT_REDIRECTS, sent=sent, wait_s=wait_s, longest=status == 401)


PERMANENT_REDIRECTS = (301, 308)
"""Moved Permanently and Permanent Redirect (RFC 9110 15.4): the destination's URL is to change; tried again, each
was sent again for a day of back-off (the others, a temporary redirect, may end: tried again)."""


def retry_after(response: httpx.Response) -> float | None:
    """The seconds a ``Retry-After`` header asks for (delay-seconds or an HTTP-date, RFC 9110 10.2.3); None without
    one or for one that is neither.

    >>> retry_after(httpx.Response(503, headers={"Retry-After": "120"})), retry_after(httpx.Response(503))
    (120.0, None)
    >>> retry_after(httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    0.0
    >>> retry_after(httpx.Response(503, headers={"Retry-After": "²".encode()}))  # a digit to str.isdigit, not to float
    """
    value = response.headers.get("Retry-After", "").strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _unanswered(where: str, exc: httpx.HTTPError, sent: Sequence[str] = ()) -> SendError:
    """A request without an answer: a read timeout came after the request was sent, so the server may have stored
    it (the next try sends the same identifiers: replaced, not duplicated); any other error, no connection."""
    if isinstance(exc, httpx.ReadTimeout):
        return SendError(f"timed out waiting for the answer of {where} (the server may have stored it)", sent=sent)
    return SendError(f"cannot reach {where}: {type(exc).__name__}", sent=sent)


def outcome_codes(response: httpx.Response) -> str:
    """The issue codes (severity and code: FHIR's fixed vocabulary) of a FHIR OperationOutcome answer, as
    ``" (OperationOutcome: error not-found)"``; "" for any other answer. Never its diagnostics or expressions,
    which may quote the identifiers it could not resolve (a patient's ID)."""
    codes = [" ".join(w for w in issue if w) for issue in _issues(response)]
    return f" (OperationOutcome: {', '.join(c for c in codes if c)})" if any(codes) else ""


def _issues(response: httpx.Response) -> list[tuple[str, str]]:
    """``(severity, code)`` of a FHIR OperationOutcome answer's first five issues ("" where not a plain word)."""
    try:
        body = response.json()
    except ValueError:
        return []
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return []
    out = []
    issues = body.get("issue")
    for issue in issues[:5] if isinstance(issues, list) else []:
        if isinstance(issue, dict):
            severity, code = (str(issue.get(k, "")) for k in ("severity", "code"))
            out.append((_word(severity), _word(code)))
    return out


def _multiple_matches(response: httpx.Response) -> bool:
    """Whether a FHIR OperationOutcome answer says a search matched more than one resource (HAPI FHIR:
    "HAPI-0958: Failed to CREATE resource with match URL ... because this search matched 2 resources",
    "HAPI-2207: Invalid match URL ... - Multiple resources match this search"). Its diagnostics are read here,
    never quoted (they name the identifiers)."""
    try:
        body = response.json()
    except ValueError:
        return False
    issues = body.get("issue") if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else None
    texts = [f"{i.get('diagnostics', '')} {d.get('text', '') if isinstance(d := i.get('details'), dict) else ''}"
             for i in (issues if isinstance(issues, list) else []) if isinstance(i, dict)]
    return any(MULTIPLE_MATCHES.search(t) for t in texts)


MULTIPLE_MATCHES = re.compile(r"multiple (resources )?match|matched \d+ resources|more than one", re.IGNORECASE)


def _word(text: str) -> str:
    """``text`` if it is one of FHIR's code words (lower-case letters and hyphens), else "": never free text."""
    return text if re.fullmatch(r"[a-z-]{1,32}", text) else ""



async def send_stow(dest: StowDestination, items: Sequence[Item], client: httpx.AsyncClient,
                    notes: Collection[str] = ()) -> list[str]:
    """STOW-RS every item in one multipart/related request to ``{url}/studies``; ``notes``: the UIDs of the
    Rejection Notes among them."""
    boundary = uuid.uuid4().hex
    parts = [b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
             for _, _, data in items]
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    headers = {**dest.header_values(), "Accept": "application/dicom+json",
               "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    url = dest.url.rstrip("/") + "/studies"
    try:
        response = await client.post(url, content=body, headers=headers, timeout=dest.timeout_s)
    except httpx.HTTPError as exc:
        raise _unanswered(dest.where, exc) from None
    uids = [uid for uid, _, _ in items]
    if response.status_code not in (200, 202, 409):  # 409: every object failed (the answer says why)
        raise _http_error(dest.where, response)
    answer = _stow_answer(response)
    failures = _items(answer, "00081198")
    def held(failure: dict[str, Any]) -> bool:  # held already: delivered
        reason, uid = (_first(failure, tag) for tag in ("00081197", "00081155"))
        return reason == DUPLICATE or (reason == DUPLICATE_REJECTION_NOTE and uid in notes)

    failed = {str(_first(i, "00081155") or "") for i in failures if not held(i)}
    done = [u for u in uids if u not in failed]
    if "" in failed:  # a failure that names no instance: only those the answer names as stored (or held) are done
        named = {str(_first(i, "00081155") or "") for i in [*_items(answer, "00081199"), *filter(held, failures)]}
        done = [u for u in uids if u in named]
    reasons = [_first(failure, "00081197") for failure in failures if not held(failure)]
    codes = sorted({r for r in reasons if isinstance(r, int)})
    said = (" (failure reason " + ", ".join(f"0x{r:04X} {store_status(r)[1]}" for r in codes) + ")") if codes else ""
    if response.status_code == 409 and (failed or not failures):  # refused for good, unless all were held already
        if reasons and all(isinstance(r, int) and store_status(r)[0] == "transient" for r in reasons):
            # out of resources (0xA7xx) for every object, as C-STORE's 0xA7xx: tried again
            raise SendError(f"{dest.where} answered HTTP 409{said}: out of resources for now", sent=done)
        error = _http_error(dest.where, response, sent=done)
        raise SendError(f"{error}{said}", permanent=error.permanent, sent=done)
    if failed:
        raise SendError(f"{dest.where} refused {len(failed)} of {counted(len(uids), 'object')}{said}", sent=done)
    stored = _items(answer, "00081199")
    if response.status_code == 202 and not failures:
        # accepted, none failed: stored with warnings (PS3.18 10.5.3), each object it names in the Referenced SOP
        # Sequence; one it does not name is sent again
        listed = {str(_first(i, "00081155") or "") for i in stored}
        done = [u for u in uids if u in listed]
        if len(done) < len(uids):
            raise SendError(f"{dest.where} answered HTTP 202 naming {len(done)} of {counted(len(uids), 'object')} stored and "
                            "none failed", sent=done)
    warned = sorted({w for i in stored if isinstance(w := _first(i, "00081196"), int)})
    if warned:
        logger.warning("%s stored the objects with a warning (warning reason %s)", dest.where,
                       ", ".join(f"0x{w:04X} {store_status(w)[1]}" for w in warned))
    return done


def _stow_answer(response: httpx.Response) -> dict[str, Any]:
    """The Store Instances Response of a STOW-RS answer, a DICOM JSON data set; ``{}`` for a body that is none (no
    JSON, another JSON value), so that its status code alone decides (200: all stored). A one-item array, the DICOM
    JSON model's list of data sets, is read as its item.

    >>> _stow_answer(httpx.Response(200, json=[{"00081199": {"vr": "SQ"}}])), _stow_answer(httpx.Response(200, text="OK"))
    ({'00081199': {'vr': 'SQ'}}, {})
    """
    try:
        answer = response.json()
    except ValueError:
        return {}
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    return answer if isinstance(answer, dict) else {}


def _items(data_set: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    """The items of sequence ``tag`` of a DICOM JSON data set (none where it is absent, empty or not a sequence)."""
    element = data_set.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [i for i in values if isinstance(i, dict)] if isinstance(values, list) else []


def _first(data_set: dict[str, Any], tag: str) -> Any:
    """The first value of ``tag`` of a DICOM JSON data set; None where it has none.

    >>> _first({"00081155": {"vr": "UI", "Value": ["1.2.3"]}}, "00081155"), _first({"00081155": {"vr": "UI", "Value": []}}, "00081155")
    ('1.2.3', None)
    """
    element = data_set.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


async def send_fhir(dest: FhirDestination, items: Sequence[Item], client: httpx.AsyncClient) -> list[str]:
    """POST each FHIR Bundle to the destination URL (a FHIR base: a transaction; or a webhook)."""
    sent: list[str] = []
    for ident, _, data in items:
        headers = {**dest.header_values(), "Content-Type": "application/fhir+json",
                   "Accept": "application/fhir+json"}
        try:
            response = await client.post(dest.url, content=data, headers=headers, timeout=dest.timeout_s)
        except httpx.HTTPError as exc:
            raise _unanswered(dest.where, exc, sent) from None
        if not 200 <= response.status_code < 300:
            error = _http_error(dest.where, response, sent)
            issues = _issues(response)
            if response.status_code == 412 and _multiple_matches(response):
                # duplicates at the server (two conditional creates of one resource at once, hapi-fhir#3141): every
                # later conditional create or reference to it fails the same way until someone merges them there
                error = SendError(f"{error}: more than one resource matches a conditional create or reference (the "
                                  "server holds duplicates, e.g. two Devices with one identifier); trying again cannot "
                                  "help until they are merged there", permanent=True, sent=sent)
            elif response.status_code == 409:  # a version conflict (another writer's update at the same moment)
                error = SendError(f"{error} (a version conflict: tried again)", sent=sent)
            elif error.permanent and (response.status_code == 412 or (response.status_code == 404 and issues)
                                      or any(code == "not-found" for _, code in issues)):
                # the conditional references to the patient and the order: a RIS that does not know them yet
                # (registration or order still on its way) may know them at the next try
                error = SendError(f"{error}; the RIS may not know the patient or the order yet", sent=sent)
            raise error
        sent.append(ident)
    return sent


ACCEPTED, ERRORS, REJECTED = ("AA", "CA"), ("AE", "CE"), ("AR", "CR")
"""HL7 acknowledgment codes (table 0008), original mode and enhanced mode's commit: accepted (delivered), an error
(tried again), a reject (tried again, unless its ERR-3 is one of :data:`UNSUPPORTED`)."""

ERROR_CODES = {"0": "message accepted", "100": "segment sequence error", "101": "required field missing",
               "102": "data type error", "103": "table value not found", "104": "value too long",
               "200": "unsupported message type", "201": "unsupported event code",
               "202": "unsupported processing id", "203": "unsupported version id", "204": "unknown key identifier",
               "205": "duplicate key identifier", "206": "application record locked",
               "207": "application internal error"}
"""HL7 table 0357 (ERR-3's codes) in words: what an error says of an ACK is these words, never the RIS's own texts
(MSA-3, ERR-3's text, ERR-8), which may name the patient or the record number."""

UNSUPPORTED = frozenset({"200", "201", "202", "203"})
"""ERR-3 codes of a reject that the same message sent again meets again: this RIS does not take its message type,
event, processing id or version. Any other reject (v2.5 2.9.2: "for reasons unrelated to content or format", a
system down, an internal error) is tried again."""

ACK_LIMIT = 1024 * 1024
"""The longest ACK read (bytes): an ACK is a few hundred; a peer that streams more is no HL7 peer."""


async def send_hl7(dest: Hl7Destination, items: Sequence[Item]) -> list[str]:
    """Send each HL7 message (UTF-8 bytes) over one MLLP connection (``0x0B`` ... ``0x1C 0x0D``), each acknowledged
    before the next goes (:func:`ack_outcome`)."""
    from hl7.mllp import InvalidBlockError, open_hl7_connection

    context = _tls_context(dest) if dest.tls is not None else None
    server_hostname = (dest.tls.server_hostname or dest.host) if dest.tls is not None else None
    try:
        reader, writer = await asyncio.wait_for(
            open_hl7_connection(dest.host, dest.port, limit=ACK_LIMIT, ssl=context, server_hostname=server_hostname),
            dest.connect_timeout_s)
    except TimeoutError:  # before OSError: TimeoutError is one
        raise SendError(f"cannot reach {dest.where}: no connection within {dest.connect_timeout_s:g} s") from None
    except ssl.SSLError as exc:
        raise SendError(f"TLS handshake with {dest.where} failed: {_tls_words(exc, server_hostname or dest.host)}") \
            from None
    except OSError as exc:  # asyncio's strerror is "Connect call failed (address)": the errno's words
        raise SendError(f"cannot reach {dest.where}: {_connect_words(exc)}") from None
    sent: list[str] = []
    try:
        for ident, _, data in items:
            ours = message_control_id(data)
            try:  # a RIS that takes the connection and reads nothing held the delivery (and its slot) for good
                writer.writeblock(data)
                await asyncio.wait_for(writer.drain(), dest.timeout_s)
            except TimeoutError:
                raise SendError(f"{dest.where} read none of the message within {dest.timeout_s:g} s", sent=sent) \
                    from None
            except OSError as exc:
                raise SendError(f"connection to {dest.where} lost while sending ({exc.strerror or type(exc).__name__})",
                                sent=sent) from None
            try:
                block = await asyncio.wait_for(reader.readblock(), dest.timeout_s)
            except TimeoutError:
                raise SendError(f"no ACK from {dest.where} within {dest.timeout_s:g} s (it may have filed the "
                                "message: the same one goes again, with the same control id)", sent=sent) from None
            except asyncio.IncompleteReadError:
                raise SendError(f"{dest.where} closed the connection without an ACK", sent=sent) from None
            except (InvalidBlockError, ValueError):  # no start block, or longer than ACK_LIMIT
                raise SendError(f"{dest.where} answered no MLLP block (no 0x0B start, or over {ACK_LIMIT} bytes)",
                                sent=sent) from None
            except OSError as exc:
                raise SendError(f"connection to {dest.where} lost before its ACK ({exc.strerror or type(exc).__name__})",
                                sent=sent) from None
            ack_outcome(dest.where, block, ours, sent)
            sent.append(ident)
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    return sent


def _connect_words(exc: OSError) -> str:
    """What a failed connect says: a name lookup's own words (its errno is negative: ``os.strerror(-2)`` read
    "Unknown error -2" for "Name or service not known"), else the errno's (asyncio's strerror names the address).

    >>> _connect_words(socket.gaierror(-2, "Name or service not known")), _connect_words(ConnectionRefusedError(111, "x"))
    ('Name or service not known', 'Connection refused')
    """
    if isinstance(exc, socket.gaierror):
        return exc.strerror or "the name does not resolve"
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


def message_control_id(data: bytes) -> str:
    r"""MSH-10 of an HL7 message (its bytes).

    >>> message_control_id(b"MSH|^~\\&|CTSCREEN||||20261207||ORU^R01^ORU_R01|4F2A|P|2.5.1\r")
    '4F2A'
    """
    import hl7

    return str(hl7.parse(data.decode("utf-8")).segment("MSH")(10))


def ack_outcome(where: str, block: bytes, control_id: str, sent: Sequence[str] = ()) -> None:
    """Read an HL7 ACK of the message whose MSH-10 is ``control_id``: return if the RIS accepted it (MSA-1 ``AA`` or
    ``CA``), else raise.

    Raises
    ------
    SendError
        An application error (``AE``/``CE``), an ACK of another message (MSA-2), an unknown code, or one that is no
        HL7 ACK (no MSH, no MSA): tried again. A reject (``AR``/``CR``): permanent. The RIS's text (MSA-3, ERR-3's
        code and text, ERR-8) is quoted on one line.
    """
    import hl7

    try:  # a RIS that ends its segments in CR LF or LF, not the standard's CR
        text = block.decode("utf-8", errors="replace").replace("\r\n", "\r").replace("\n", "\r")
        ack = hl7.parse(text)
        code, answered = (str(ack[f"MSA.F{n}"]).strip() for n in (1, 2))
    except Exception:  # noqa: BLE001 - hl7's ParseException, KeyError (no MSA), IndexError: not an ACK
        raise SendError(f"{where} answered no HL7 ACK ({len(block)} bytes, no MSH and MSA segments)",
                        sent=sent) from None
    if answered != control_id:
        raise SendError(f"{where} acknowledged another message (MSA-2 {_one_line(answered, 40)!r}, ours "
                        f"{control_id})", sent=sent)
    code = code.upper()
    if code in ACCEPTED:
        return
    codes, said = _ack_codes(ack)
    if code in REJECTED and codes & UNSUPPORTED:
        raise SendError(f"{where} rejected the message (MSA-1 {code}{said}); trying again cannot help", permanent=True,
                        sent=sent)
    if code in REJECTED:
        raise SendError(f"{where} rejected the message (MSA-1 {code}{said}), not for what it holds; tried again",
                        sent=sent)
    if code in ERRORS:
        raise SendError(f"{where} answered an application error (MSA-1 {code}{said}); tried again", sent=sent)
    raise SendError(f"{where} answered an unknown acknowledgment code (MSA-1 {_one_line(code, 8)!r})", sent=sent)


def _ack_codes(ack: Any) -> tuple[set[str], str]:
    r"""The ERR-3 codes of an ACK (table 0357) and what to say of them: ``": ERR-3 204 unknown key identifier"`` ("" for
    none). Only codes and this module's words for them: the RIS's texts are withheld (:data:`ERROR_CODES`).

    >>> import hl7
    >>> _ack_codes(hl7.parse("MSH|^~\\&|RIS\rMSA|AR|1|DOE^JANE\rERR||PID^1^3|207^Internal^HL70357|E||||DOE\r"))
    ({'207'}, ': ERR-3 207 application internal error; its text withheld')
    """
    codes: list[str] = []
    try:
        errs = ack.segments("ERR")
    except KeyError:  # none
        errs = []
    for err in errs:
        try:
            code = str(err(3)(1)(1)).strip()
        except (KeyError, IndexError):
            continue
        if re.fullmatch(r"\d{1,5}", code):
            codes.append(code)
    words = [f"ERR-3 {c} {ERROR_CODES[c]}" if c in ERROR_CODES else f"ERR-3 {c}" for c in dict.fromkeys(codes)]
    try:
        texted = bool(str(ack["MSA.F3"]).strip())
    except (KeyError, IndexError):
        texted = False
    if texted or codes:
        words.append("its text withheld")
    return set(codes), f": {'; '.join(words)}" if words else ""


def _one_line(text: str, most: int) -> str:
    """``text`` with its control characters as spaces, cut to ``most`` characters."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()[:most]
