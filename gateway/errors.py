"""Every error the gateway reports to a client: one tree, each class with an HTTP status and a reason.

The hierarchy is small and subclasses builtins, so callers that only know ``ValueError`` still
catch bad input. The HTTP layer maps every :class:`GatewayError` to a response in one place
(:mod:`gateway.api.errors`) using :attr:`GatewayError.http_status`, :meth:`GatewayError.to_dict` and
:meth:`GatewayError.headers`; nothing here imports FastAPI. Clients switch on ``reason``, never on
the message.

::

    GatewayError(Exception)                        internal            500
     +-- InvalidInput(GatewayError, ValueError)    bad_request         400
     |    +-- UploadError                          bad_upload          400
     |    |    +-- UnsafePath                      unsafe_path         400
     |    |    +-- BadArchive                      bad_archive         400   (corrupt or nested zip)
     |    |    +-- BodyStalled                     body_stalled        408   (no byte for a while; closed)
     |    |    +-- TooLarge                        too_large           413
     |    |    +-- ZipBomb                         zip_bomb            413
     |    +-- NotDicom                             not_dicom           415
     |    +-- NotCT                                not_ct              422
     |    +-- NoPixelData                          no_pixel_data       422
     |    +-- Undecodable                          undecodable         422
     |    +-- NoUsableSeries                       no_usable_series    422
     |    +-- MixedStudies                         mixed_studies       422
     |    +-- MixedPatients                        mixed_patients      422
     |    +-- InvalidUid                           invalid_uid         400   (a UID breaking the DICOM grammar)
     +-- Unauthorized(GatewayError)                unauthorized        401   (WWW-Authenticate)
     +-- InsufficientScope(GatewayError)           insufficient_scope  403   (WWW-Authenticate)
     +-- AuthNotConfigured(GatewayError)           auth_not_configured 403   (no auth, called off loopback)
     +-- NotFound(GatewayError, KeyError)          not_found           404
     |    +-- JobNotFound                          not_found           404   (no such job or study)
     |    +-- NoSuchSlice                          no_such_slice       404
     +-- Conflict(GatewayError)                    conflict            409
     |    +-- NotDone                              not_done            409
     |    +-- NotRetryable                         not_retryable       409
     |    |    +-- Superseded                      superseded          409   (a later version of the study exists)
     |    +-- NotRescreenable                      not_rescreenable    409   (a version being screened, or expired)
     |    +-- NotResendable                        not_resendable      409
     |    +-- SrUnavailable                        sr_unavailable      409
     |    +-- PatientMismatch                      patient_mismatch    409   (the study names another patient)
     +-- InstancesExpired(GatewayError)            instances_expired   410
     +-- RetryLater(GatewayError)                  (a base: Retry-After; Busy and OutOfResources)
     +-- Busy(RetryLater, RuntimeError)            busy                429   (Retry-After)
     |    +-- OverBudget                           over_budget         429   (Retry-After; bodies in flight full)
     |    +-- AuthBusy                             auth_busy           429   (Retry-After; API key checks full)
     |    +-- TooManyStreams                       too_many_streams    429   (Retry-After; event streams open)
     +-- AuthThrottled(RetryLater)                 auth_throttled      429   (Retry-After; an id failed too often)
     +-- InferenceFailed(GatewayError, …)          inference_failed    502   (Triton refused the request)
     +-- Unavailable(GatewayError, RuntimeError)   unavailable         503
          +-- AuthUnavailable                      auth_unavailable    503   (Retry-After)
          +-- StoreUnavailable                     store_unavailable   503   (Retry-After; the database away)
          +-- OutOfResources(RetryLater, …)        out_of_resources    503   (Retry-After)
          +-- InferenceUnavailable                 triton_unavailable  503   (Retry-After; no Triton answered)

Per-file problems inside a study (a file that is not CT, a frame that cannot be decoded) are not
raised to the client: ingest records them as :class:`gateway.ingest.Rejection` rows with the same
reason codes, and only :class:`NoUsableSeries` (carrying those rows) fails the study.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = [
    "REASONS",
    "AuthBusy",
    "AuthThrottled",
    "AuthUnavailable",
    "BadArchive",
    "BodyStalled",
    "Busy",
    "Conflict",
    "GatewayError",
    "InferenceFailed",
    "InferenceUnavailable",
    "InstancesExpired",
    "InsufficientScope",
    "InvalidInput",
    "InvalidUid",
    "JobNotFound",
    "MixedPatients",
    "MixedStudies",
    "NoPixelData",
    "NoSuchSlice",
    "NoUsableSeries",
    "NotCT",
    "NotDicom",
    "NotDone",
    "NotFound",
    "NotRescreenable",
    "NotResendable",
    "OutOfResources",
    "OverBudget",
    "PatientMismatch",
    "RetryLater",
    "NotRetryable",
    "SrUnavailable",
    "StoreUnavailable",
    "Superseded",
    "TooLarge",
    "TooManyStreams",
    "Unauthorized",
    "Unavailable",
    "Undecodable",
    "UnsafePath",
    "UploadError",
    "ZipBomb",
    "error_classes",
]


class GatewayError(Exception):
    """Base class of every error the gateway reports to a client.

    Parameters
    ----------
    message : str
        Human-readable sentence naming what was wrong and, where it helps, the rule broken.
    filename : str | None
        The uploaded file (or zip member) the error is about, when there is one.
    """

    reason: ClassVar[str] = "internal"
    """Stable, machine-readable code; clients switch on this, never on the message."""
    http_status: ClassVar[int] = 500
    """HTTP status the API answers with when this error fails a whole request."""
    retry_after_s: int | None = None
    """Seconds the client should wait before trying again (``Retry-After``), when trying again may help."""

    def __init__(self, message: str, *, filename: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.filename = filename

    def __str__(self) -> str:  # KeyError subclasses would quote it
        return self.message

    def narrowed(self) -> tuple[str, str, int]:
        """``(reason, message, HTTP status)`` to answer with: this error's own (a subclass may name a more
        specific one, :meth:`NoUsableSeries.narrowed`)."""
        return self.reason, self.message, self.http_status

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON body of an error response: ``reason``, ``message`` and ``filename``."""
        body: dict[str, Any] = {"reason": self.reason, "message": self.message}
        if self.filename is not None:
            body["filename"] = self.filename
        return body

    def headers(self) -> dict[str, str]:
        """HTTP headers of the error response (``Retry-After`` when :attr:`retry_after_s` is set)."""
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class InvalidInput(GatewayError, ValueError):
    """The client sent something we cannot screen."""

    reason = "bad_request"
    http_status = 400


class UploadError(InvalidInput):
    """The upload container itself (zip, multipart body) is unacceptable."""

    reason = "bad_upload"
    http_status = 400


class UnsafePath(UploadError):
    """A zip member has an absolute name, a ``..`` component, or is a symbolic link."""

    reason = "unsafe_path"
    http_status = 400


class BadArchive(UploadError):
    """A zip archive is corrupt, encrypted, or holds another archive."""

    reason = "bad_archive"
    http_status = 400


class TooLarge(UploadError):
    """An upload, a member or the number of members is over a configured limit."""

    reason = "too_large"
    http_status = 413


class BodyStalled(UploadError):
    """No byte of a request body arrived for ``CTSCREEN_BODY_IDLE_TIMEOUT_S``: the body is dropped (408) and the
    connection closed, so that a stalled client holds no share of the upload budget."""

    reason = "body_stalled"
    http_status = 408

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class ZipBomb(UploadError):
    """A zip member expands far more than real DICOM does, or past the total size limit."""

    reason = "zip_bomb"
    http_status = 413


class NotDicom(InvalidInput):
    """The bytes are not a DICOM Part 10 file or a parseable DICOM data set."""

    reason = "not_dicom"
    http_status = 415


class NotCT(InvalidInput):
    """A DICOM object that is not a CT image (MR, SR, 8-bit secondary capture, ...)."""

    reason = "not_ct"
    http_status = 422


class NoPixelData(InvalidInput):
    """A CT object without Pixel Data."""

    reason = "no_pixel_data"
    http_status = 422


class Undecodable(InvalidInput):
    """Pixel Data present but cannot be decoded, or decodes to implausible values."""

    reason = "undecodable"
    http_status = 422


class NoUsableSeries(InvalidInput):
    """No series in the upload passes the series rules.

    Parameters
    ----------
    message : str
        What was found instead.
    rejected : Sequence[tuple[str, str, str]]
        ``(filename, reason, message)`` for every file that was refused, so the client learns why.
    """

    reason = "no_usable_series"
    http_status = 422

    def __init__(self, message: str, *, rejected: Sequence[tuple[str, str, str]] = ()) -> None:
        super().__init__(message)
        self.rejected = [tuple(r) for r in rejected]

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["rejected"] = [{"filename": f, "reason": r, "message": m} for f, r, m in self.rejected]
        return body

    def narrowed(self) -> tuple[str, str, int]:
        """``(reason, message, HTTP status)`` to answer with: every file refused for the same reason (e.g.
        ``not_ct``: an MR series) answers with that reason and its message, anything else with this one's."""
        reasons = {r[1] for r in self.rejected}
        only = REASONS.get(next(iter(reasons))) if len(reasons) == 1 else None
        if only is None:
            return self.reason, self.message, self.http_status
        return only.reason, f"{self.message} {self.rejected[0][2]}", only.http_status


class MixedStudies(InvalidInput):
    """One upload holds CT images of more than one study: only one could be screened."""

    reason = "mixed_studies"
    http_status = 422


class MixedPatients(InvalidInput):
    """One upload's CT images name more than one patient (Patient ID with its issuer,
    :func:`gateway.phi.patient_key`): a study names one."""

    reason = "mixed_patients"
    http_status = 422


class InvalidUid(InvalidInput):
    """A UID (from a URL or a DICOM header) breaks the DICOM UID grammar (:mod:`gateway.uids` checks them)."""

    reason = "invalid_uid"
    http_status = 400


class Unauthorized(GatewayError):
    """No credential, or one that is refused (unknown key, bad or expired token).

    Parameters
    ----------
    message : str
        Why the credential is refused (safe to show the client).
    error : str | None
        The RFC 6750 ``error`` of the ``WWW-Authenticate`` challenge; None when no credential was sent.
    """

    reason = "unauthorized"
    http_status = 401

    def __init__(self, message: str, *, error: str | None = "invalid_token") -> None:
        super().__init__(message)
        self.error = error

    def headers(self) -> dict[str, str]:
        challenge = 'Bearer realm="ctscreen"' + (f', error="{self.error}"' if self.error else "")
        return {"WWW-Authenticate": challenge}


class InsufficientScope(GatewayError):
    """A valid credential without the scope the route needs.

    Parameters
    ----------
    message : str
        Which scope is needed and which the credential has.
    scope : str
        The scope the route needs (named in the ``WWW-Authenticate`` challenge).
    """

    reason = "insufficient_scope"
    http_status = 403

    def __init__(self, message: str, *, scope: str) -> None:
        super().__init__(message)
        self.scope = scope

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{self.scope}"'}


class AuthNotConfigured(GatewayError):
    """A call that reached a gateway without authentication on a non-loopback address: such a gateway
    answers anonymous calls on loopback only (unless started ``--insecure``), whatever address it was
    told to bind (``uvicorn --host`` is not a setting the app sees)."""

    reason = "auth_not_configured"
    http_status = 403


class NotFound(GatewayError, KeyError):
    """Nothing under that name (a job, a study, a destination, a route)."""

    reason = "not_found"
    http_status = 404


class JobNotFound(NotFound):
    """No job (or no result for a study) under that identifier."""


class NoSuchSlice(NotFound):
    """The job has no slice under that index."""

    reason = "no_such_slice"


class Conflict(GatewayError):
    """The request does not fit the current state of what it names."""

    reason = "conflict"
    http_status = 409


class NotDone(Conflict):
    """The job is not done yet: what was asked exists only once it is."""

    reason = "not_done"


class NotRetryable(Conflict):
    """Only a failed job whose instances are still kept can be queued again."""

    reason = "not_retryable"


class Superseded(NotRetryable):
    """A failed job of a study version that is not the study's latest: a later version (a late instance, a re-screen,
    the study sent again) holds its instances and is the one whose reading the study gets, so this one is not queued
    again (its deliveries would be skipped as superseded). The message names the later version and its job, and what
    to do with it; the answer names them too (``superseded_by``: its version, ``superseded_by_job``: its job, null
    while it is being received).

    Parameters
    ----------
    message : str
        Which version supersedes the job, and what to do instead.
    version : int | None
        The study's latest version.
    job_id : str | None
        Its job (None while it is being received).
    """

    reason = "superseded"

    def __init__(self, message: str, *, version: int | None = None, job_id: str | None = None) -> None:
        super().__init__(message)
        self.version = version
        self.job_id = job_id

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        if self.version is not None:
            body["superseded_by"] = self.version
            body["superseded_by_job"] = self.job_id
        return body


class NotRescreenable(Conflict):
    """A study is screened again only from its latest version, once that is done or failed and its instances are
    still kept (``POST /v1/studies/{uid}/rescreen``): the message says which version holds it, or that retention
    removed them."""

    reason = "not_rescreenable"


class NotResendable(Conflict):
    """The delivery is being sent, or was delivered already (without ``force``)."""

    reason = "not_resendable"


class SrUnavailable(Conflict):
    """No DICOM SR can be made for the job (its image headers are missing or unusable)."""

    reason = "sr_unavailable"


class PatientMismatch(Conflict):
    """The study's earlier instances or versions name another patient than these (Patient ID with its issuer,
    :func:`gateway.phi.patient_key`): a study names one patient, and nothing of another replaces its reading."""

    reason = "patient_mismatch"


class InstancesExpired(GatewayError):
    """The job's images are no longer kept (retention); its result is."""

    reason = "instances_expired"
    http_status = 410


class RetryLater(GatewayError):
    """A refusal the client should retry after ``retry_after_s`` seconds (a base: its subclasses name why).

    Parameters
    ----------
    message : str
        What is full.
    retry_after_s : int
        The ``Retry-After`` of the answer.
    """

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Busy(RetryLater, RuntimeError):
    """Too many studies are active; the client should retry after ``retry_after_s`` seconds."""

    reason = "busy"
    http_status = 429


class OverBudget(Busy):
    """The bytes in flight, or this client's bodies in flight, are at their limit (429, Retry-After;
    :class:`gateway.admission.Admission`)."""

    reason = "over_budget"


class AuthBusy(Busy):
    """As many API key checks (scrypt) as the gateway runs at once are running or waiting; refused unhashed."""

    reason = "auth_busy"


class TooManyStreams(Busy):
    """The caller (or the gateway, all callers together) holds as many event streams open as it may."""

    reason = "too_many_streams"


class AuthThrottled(RetryLater):
    """An API key id failed its check too often lately: its keys are refused unhashed for a while."""

    reason = "auth_throttled"
    http_status = 429


class InferenceFailed(GatewayError, RuntimeError):
    """Triton answered a request with an error that another endpoint would answer the same way
    (:mod:`gateway.triton_pool`)."""

    reason = "inference_failed"
    http_status = 502


class Unavailable(GatewayError, RuntimeError):
    """A dependency (Triton, the state or blob store) cannot serve now; the client may retry later."""

    reason = "unavailable"
    http_status = 503


class OutOfResources(RetryLater, Unavailable):
    """The gateway keeps no more now (the blob volume's free space or the backlog is past its watermark);
    the client should retry after ``retry_after_s`` seconds."""

    reason = "out_of_resources"


class StoreUnavailable(Unavailable):
    """The state store (the database) cannot be reached now: a fail-over, a restart. Nothing of the request
    was kept; the client sends it again after ``Retry-After``."""

    reason = "store_unavailable"
    retry_after_s = 5


class AuthUnavailable(Unavailable):
    """Credentials cannot be checked now (identity provider unreachable, API key file unreadable)."""

    reason = "auth_unavailable"
    retry_after_s = 5


class InferenceUnavailable(Unavailable):
    """No Triton endpoint could serve a request in time (every try failed or none is configured;
    :mod:`gateway.triton_pool`)."""

    reason = "triton_unavailable"
    retry_after_s = 5


def error_classes(cls: type[GatewayError] = GatewayError) -> list[type[GatewayError]]:
    """``cls`` and every subclass defined so far, depth first (a base before its subclasses)."""
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(error_classes(sub))
    return out


REASONS: dict[str, type[GatewayError]] = {c.reason: c for c in reversed(error_classes())}
"""Every reason code of the tree, mapped to its class (for docs and the HTTP mapping); a code two classes share
(``not_found``) maps to the more general one. Every GatewayError subclass is defined in this module, so that this
holds them all whatever was imported (tests/test_gateway_errors.py checks every gateway module)."""
