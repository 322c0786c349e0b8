"""Every error the gateway raises, mapped to an HTTP answer in this one place.

The body is always JSON ``{"reason": <code>, "message": <sentence>, ...}``; clients switch on
``reason``. One handler answers every :class:`gateway.errors.GatewayError` with its status, body and
headers (``Retry-After``, ``WWW-Authenticate``); the others only translate what the framework raises
itself (a request that does not match the API, an unknown route). An unexpected exception is logged
and answered 503 ``internal_error`` as a last resort.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gateway.audit import CLIENT_CLOSED, note_reason
from gateway.errors import GatewayError, StoreUnavailable
from gateway.phi import withheld
from gateway.store.store import StoreUnreachable, transient

logger = logging.getLogger(__name__)

_HTTP_REASONS = {
    400: "bad_request", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
    413: "too_large", 415: "unsupported_media_type", 429: "busy",
}


def error_response(status: int, reason: str, message: str, *, headers: dict[str, str] | None = None,
                   **extra: object) -> JSONResponse:
    """The JSON error answer every handler uses."""
    return JSONResponse({"reason": reason, "message": message, **extra}, status_code=status, headers=headers)


def mismatch_message(errors: list[dict[str, Any]]) -> str:
    """The message of a request the framework refuses: what does not match, first (a page shows only the
    message: "The request does not match the API." left a hand-edited date filter unexplained).

    >>> mismatch_message([{"loc": ["query", "received_from"], "msg": "Input should be a valid date"}])
    'The request does not match the API: query parameter received_from: Input should be a valid date.'
    >>> mismatch_message([{"loc": ["body"], "msg": "Field required"}, {"loc": ["query", "x"], "msg": "bad"}])
    'The request does not match the API: body: Field required (and 1 more).'
    >>> mismatch_message([])
    'The request does not match the API.'
    """
    if not errors:
        return "The request does not match the API."
    loc = [str(part) for part in errors[0].get("loc", [])]
    where = f"{loc[0]} parameter {'.'.join(loc[1:])}" if len(loc) > 1 and loc[0] in ("query", "path", "header") \
        else ".".join(loc) or "request"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"The request does not match the API: {where}: {str(errors[0].get('msg', '')).rstrip('.')}{more}."


def _note(scope: MutableMapping[str, Any], reason: str, *, count: bool = True) -> None:
    """Hand ``reason`` to the audit record of the request (``gateway.audit``) and, with ``count``, count
    it as an error."""
    note_reason(scope, reason)
    metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
    if count and metrics is not None:
        metrics.error(reason)


def _internal_error(exc: BaseException) -> JSONResponse:
    return error_response(
        503, "internal_error",
        f"The gateway failed unexpectedly ({type(exc).__name__}); the error is logged. Retry later.",
        headers={"Retry-After": "5"},
    )


class LastResort:
    """ASGI middleware: an exception that no handler answered is logged once and answered 503
    ``internal_error``, inside the audit middleware (whose record then says 503 and why). A client that left
    mid-body (starlette's ``ClientDisconnect``) is no error of ours: logged in one line, answered 499
    ``client_disconnected`` (nobody reads it; the audit record says ``aborted``).

    Starlette's own last resort (an ``Exception`` handler) answers from the outermost middleware and then
    raises the exception again, so the server logged a second traceback and the audit record, which the
    exception passed on its way out, said 500. A response already begun (an event stream) cannot be
    answered again: its exception goes on.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            if started:
                raise
            # the client left mid-body (a cancelled upload, a dropped network): nothing was kept, and no fault
            # of ours: no traceback, no internal error counted
            logger.info("%s %s: the client left before its request was read whole", scope.get("method"),
                        scope.get("path"))
            _note(scope, "client_disconnected", count=False)
            await error_response(CLIENT_CLOSED, "client_disconnected",
                                 "The client closed the connection before its request was read whole; nothing "
                                 "of it was kept.")(scope, receive, send)
        except Exception as exc:
            if started:
                raise
            logger.error("unexpected error on %s %s", scope.get("method"), scope.get("path"), exc_info=withheld(exc))
            _note(scope, "internal_error")
            await _internal_error(exc)(scope, receive, send)


def install(app: FastAPI) -> None:
    """Register the exception handlers and the last-resort middleware on ``app`` (before the audit
    middleware is added, so that the audit record sees the answer)."""
    app.add_middleware(LastResort)

    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, exc: GatewayError) -> JSONResponse:
        reason, message, status = exc.narrowed()  # e.g. every file refused for the same reason: that reason
        body = {**exc.to_dict(), "reason": reason, "message": message}
        _note(request.scope, body["reason"])
        return JSONResponse(body, status_code=status, headers=exc.headers() or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        _note(request.scope, "bad_request")
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return error_response(422, "bad_request", mismatch_message(errors), errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        reason = detail.get("reason") or _HTTP_REASONS.get(exc.status_code, "http_error")
        _note(request.scope, reason, count=False)  # not counted as an error (e.g. 404)
        body = {"reason": reason, **{k: v for k, v in detail.items() if k != "reason"}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def _store_away(request: Request, exc: Exception) -> JSONResponse:
        """The database away (refused, reset, timed out; or a pooled connection it dropped mid-query): the
        client retries, as after any 503, and the log says it in one line. Any other database error is a bug:
        the last resort's (logged with its traceback)."""
        if isinstance(exc, DBAPIError) and not transient(exc):
            logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=withheld(exc))
            _note(request.scope, "internal_error")
            return _internal_error(exc)
        logger.warning("%s %s: the state store cannot be reached (%s)", request.method, request.url.path,
                       type(exc).__name__)
        error = StoreUnavailable("The state store cannot be reached now; nothing of this request was kept. "
                                 "Retry later.")
        _note(request.scope, error.reason)
        return JSONResponse(error.to_dict(), status_code=error.http_status, headers=error.headers())

    app.add_exception_handler(StoreUnreachable, _store_away)
    app.add_exception_handler(DBAPIError, _store_away)

    @app.exception_handler(Exception)
    async def _outside(request: Request, exc: Exception) -> JSONResponse:  # raised outside LastResort
        logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=withheld(exc))
        _note(request.scope, "internal_error")
        return _internal_error(exc)
