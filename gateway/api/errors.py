"""Every error the gateway raises, mapped to an HTTP answer in this one place.

The body is always JSON ``{"reason": <code>, "message": <sentence>, ...}``; clients switch on
``reason``. One handler answers every :class:`gateway.errors.GatewayError` with its status, body and
headers (``Retry-After``, ``WWW-Authenticate``); the others only translate what the framework raises
itself (a request that does not match the API, an unknown route). An unexpected exception is logged
and answered 503 ``internal_error`` as a last resort.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.errors import REASONS, GatewayError, NoUsableSeries

logger = logging.getLogger(__name__)

_HTTP_REASONS = {
    400: "bad_request", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
    413: "too_large", 415: "unsupported_media_type", 429: "busy",
}


def error_response(status: int, reason: str, message: str, *, headers: dict[str, str] | None = None,
                   **extra: object) -> JSONResponse:
    """The JSON error answer every handler uses."""
    return JSONResponse({"reason": reason, "message": message, **extra}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""
    metrics = lambda request: getattr(request.app.state, "metrics", None)  # noqa: E731

    def count(request: Request, reason: str) -> None:
        m = metrics(request)
        if m is not None:
            m.error(reason)

    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, exc: GatewayError) -> JSONResponse:
        body, status = exc.to_dict(), exc.http_status
        if isinstance(exc, NoUsableSeries):
            # every file refused for the same reason (e.g. not_dicom): answer with that reason
            reasons = {r[1] for r in exc.rejected}
            if len(reasons) == 1 and next(iter(reasons)) in REASONS:
                only = REASONS[next(iter(reasons))]
                body = {**body, "reason": only.reason, "message": f"{exc.message} {exc.rejected[0][2]}"}
                status = only.http_status
        count(request, body["reason"])
        return JSONResponse(body, status_code=status, headers=exc.headers() or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        count(request, "bad_request")
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return error_response(422, "bad_request", "The request does not match the API.", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        reason = detail.get("reason") or _HTTP_REASONS.get(exc.status_code, "http_error")
        body = {"reason": reason, **{k: v for k, v in detail.items() if k != "reason"}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _last_resort(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        count(request, "internal_error")
        return error_response(
            503, "internal_error",
            f"The gateway failed unexpectedly ({type(exc).__name__}); the error is logged. Retry later.",
            headers={"Retry-After": "5"},
        )
