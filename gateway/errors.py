"""Errors raised by the gateway, each with a machine-readable ``reason`` and an HTTP status.

The hierarchy is small and subclasses builtins, so callers that only know ``ValueError`` still
catch bad input. The HTTP layer maps every :class:`GatewayError` to a response in one place using
:attr:`GatewayError.http_status` and :meth:`GatewayError.to_dict`; nothing here imports FastAPI.

::

    GatewayError(Exception)                    internal          500
     +-- InvalidInput(GatewayError, ValueError) bad_request       400
     |    +-- UploadError                       bad_upload        400
     |    |    +-- UnsafePath                   unsafe_path       400
     |    |    +-- BadArchive                   bad_archive       400   (corrupt or nested zip)
     |    |    +-- TooLarge                     too_large         413
     |    |    +-- ZipBomb                      zip_bomb          413
     |    +-- NotDicom                          not_dicom         415
     |    +-- NotCT                             not_ct            422
     |    +-- NoPixelData                       no_pixel_data     422
     |    +-- Undecodable                       undecodable       422
     |    +-- NoUsableSeries                    no_usable_series  422
     |    +-- MixedStudies                      mixed_studies     422
     +-- Unavailable(GatewayError, RuntimeError) unavailable      503

Per-file problems inside a study (a file that is not CT, a frame that cannot be decoded) are not
raised to the client: ingest records them as :class:`gateway.ingest.Rejection` rows with the same
reason codes, and only :class:`NoUsableSeries` (carrying those rows) fails the study.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = [
    "REASONS",
    "BadArchive",
    "GatewayError",
    "InvalidInput",
    "MixedStudies",
    "NoPixelData",
    "NoUsableSeries",
    "NotCT",
    "NotDicom",
    "TooLarge",
    "Unavailable",
    "Undecodable",
    "UnsafePath",
    "UploadError",
    "ZipBomb",
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

    def __init__(self, message: str, *, filename: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.filename = filename

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON body of an error response: ``reason``, ``message`` and ``filename``."""
        body: dict[str, Any] = {"reason": self.reason, "message": self.message}
        if self.filename is not None:
            body["filename"] = self.filename
        return body


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


class MixedStudies(InvalidInput):
    """One upload holds CT images of more than one study: only one could be screened."""

    reason = "mixed_studies"
    http_status = 422


class Unavailable(GatewayError, RuntimeError):
    """A dependency (Triton) cannot serve now; the client may retry later."""

    reason = "unavailable"
    http_status = 503


def _all_subclasses(cls: type[GatewayError]) -> list[type[GatewayError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


REASONS: dict[str, type[GatewayError]] = {c.reason: c for c in _all_subclasses(GatewayError)}
"""Every reason code this module defines, mapped to its class (for docs and the HTTP mapping)."""
