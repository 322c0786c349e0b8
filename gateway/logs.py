"""The gateway's application log: request and job ids on every record.

**Request ids.** :class:`RequestIds` (the outermost ASGI middleware) gives each HTTP request an id: the client's
``X-Request-ID`` when it is well formed (:func:`request_id_of`: a UUID or 16 to 64 hexadecimal digits, what
ingress-nginx, Envoy and most proxies send), else a new one (32 hexadecimal digits). A malformed one is dropped,
never quoted: a header is free text, and a client's own scheme (``DOE-JOHN-1``) could carry a patient's name
into the log and the audit trail. The id goes back in the ``X-Request-ID`` answer header (on every answer the
app gives, errors included), into the request's audit record (``request_id``) and, through :data:`REQUEST_ID`,
into every log record written while the request is handled, in awaited code too.

**Job ids.** The worker sets :data:`JOB_ID` while it screens a job (``gateway.worker.Worker``), so the records of
a study's screening carry its job's id (the messages that named the job already still do).

:class:`ContextFilter` copies both onto each record (attributes ``request_id`` and ``job_id``, None when unset).
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any

__all__ = ["JOB_ID", "REQUEST_ID", "ContextFilter", "RequestIds", "new_request_id", "request_id_of"]

REQUEST_ID: ContextVar[str | None] = ContextVar("ctscreen_request_id", default=None)
"""The id of the HTTP request being answered (:class:`RequestIds`)."""

JOB_ID: ContextVar[str | None] = ContextVar("ctscreen_job_id", default=None)
"""The id of the job being screened (``gateway.worker.Worker``)."""

HEADER = "x-request-id"

_WELL_FORMED = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|[0-9A-Fa-f]{16,64}")


def new_request_id() -> str:
    """A fresh request id: 32 hexadecimal digits (a random UUID's).

    >>> rid = new_request_id(); len(rid), request_id_of(rid) == rid
    (32, True)
    """
    return uuid.uuid4().hex


def request_id_of(value: str | bytes | None) -> str | None:
    """``value`` if it is a well-formed request id, else None: a UUID (with its hyphens), or 16 to 64 hexadecimal
    digits (ingress-nginx's ``$request_id``, a W3C trace id). Nothing else: no letter beyond ``f`` can spell a name.

    >>> request_id_of("9f1c6a2e-55b1-4c1e-9a6e-0c1d2e3f4a5b"), request_id_of(b"0123456789abcdef0123456789abcdef")
    ('9f1c6a2e-55b1-4c1e-9a6e-0c1d2e3f4a5b', '0123456789abcdef0123456789abcdef')
    >>> [request_id_of(v) for v in ("DOE-JOHN-1", "abc", "a" * 65, "0123456789abcdef\\n", None)]
    [None, None, None, None, None]
    """
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str) and _WELL_FORMED.fullmatch(value):
        return value
    return None


class RequestIds:
    """ASGI middleware, the outermost: the request's id (:func:`request_id_of` of its ``X-Request-ID``, else
    :func:`new_request_id`) in :data:`REQUEST_ID` and ``scope["state"]["request_id"]`` while the app answers, and
    in the answer's ``X-Request-ID`` header (the app's own, if it set one, is replaced)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope.get("headers") or () if k.lower() == HEADER.encode()), None)
        rid = request_id_of(sent) or new_request_id()
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers") or () if k.lower() != HEADER.encode()]
                message = {**message, "headers": [*headers, (HEADER.encode(), rid.encode())]}
            await send(message)

        token = REQUEST_ID.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class ContextFilter(logging.Filter):
    """Puts :data:`REQUEST_ID` and :data:`JOB_ID` on each record it sees (``request_id``, ``job_id``; None when
    unset); a record that already has them keeps its own. Never drops a record.

    >>> token = JOB_ID.set("0123456789abcdef0123456789abcdef")
    >>> r = logging.LogRecord("gateway.worker", logging.INFO, "", 0, "done", (), None)
    >>> ContextFilter().filter(r), r.job_id, r.request_id
    (True, '0123456789abcdef0123456789abcdef', None)
    >>> JOB_ID.reset(token)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = JOB_ID.get()
        return True
