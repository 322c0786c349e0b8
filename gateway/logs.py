"""The gateway's application log: request and job ids on every record, text or JSON lines.

**Request ids.** :class:`RequestIds` (the outermost ASGI middleware) gives each HTTP request an id: the client's
``X-Request-ID`` when it is well formed (:func:`request_id_of`: a UUID or 16 to 64 hexadecimal digits, what
ingress-nginx, Envoy and most proxies send), else a new one (32 hexadecimal digits). A malformed one is dropped,
never quoted: a header is free text, and a client's own scheme (``DOE-JOHN-1``) could carry a patient's name
into the log and the audit trail. The id goes back in the ``X-Request-ID`` answer header (on every answer the
app gives, errors included; ``gateway.httpserver``'s 431, which the app never sees, sets its own), into the
request's audit record (``request_id``) and, through :data:`REQUEST_ID`, into every log record written while the
request is handled, in awaited code too.

**Job ids.** The worker sets :data:`JOB_ID` while it screens a job (``gateway.worker.Worker``), and the deliverer
while it sends a job's result (``gateway.delivery.deliverer.Deliverer``), so the records of a study's screening
and delivery carry its job's id (the messages that named the job already still do). Their threads
(:class:`ContextExecutor`, ``asyncio.to_thread``) inherit it.

:class:`ContextFilter` copies both onto each record (attributes ``request_id`` and ``job_id``, None when unset).
:func:`configure` installs it on the process's log handlers and, for ``CTSCREEN_LOG_FORMAT=json``, turns the
gateway's records and uvicorn's error and access logs into one JSON object per line on standard error
(:class:`JsonLines`: the ids in full, as fields). ``text`` (the default) keeps each line as it was and ends its
first line with the ids that are set (:class:`TextIds`), nothing when neither is::

    INFO:     10.0.3.7:51234 - "POST /v1/studies HTTP/1.1" 202 Accepted [req=2e3f4a5b]
    2026-12-07 14:18:03,112 INFO gateway.worker: job 5b0c...6d0a91fe done: negative (300 slices) [job=6d0a91fe]

Each id is cut to its **last** 8 characters (:func:`short_id`): enough to grep for one request or job among a
replica's lines (one chance in four billion that two random ids share them). The tail, not the head: the tail is
random in the gateway's own ids, ingress-nginx's and Envoy's, and in a UUIDv7 or an AWS X-Ray trace id, whose head
is a timestamp shared by every request of that millisecond or second. The whole id is in the answer's
``X-Request-ID``, the audit trail and the JSON format.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar, copy_context
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter

__all__ = ["JOB_ID", "REQUEST_ID", "ContextExecutor", "ContextFilter", "JsonLines", "RequestIds", "TextIds", "configure",
           "new_request_id", "request_id_of", "say", "short_id"]

REQUEST_ID: ContextVar[str | None] = ContextVar("ctscreen_request_id", default=None)
"""The id of the HTTP request being answered (:class:`RequestIds`)."""

JOB_ID: ContextVar[str | None] = ContextVar("ctscreen_job_id", default=None)
"""The id of the job being screened (``gateway.worker.Worker``) or whose result is being sent
(``gateway.delivery.deliverer.Deliverer``)."""

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


class ContextExecutor(ThreadPoolExecutor):
    """A thread pool whose tasks run in the context of their submitter, as :func:`asyncio.to_thread`'s do
    (``loop.run_in_executor`` copies none): a decode or sender thread's records carry the id of the job or request
    it works for."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return super().submit(copy_context().run, fn, *args, **kwargs)


class JsonLines(JsonFormatter):
    """One JSON object per record, with these keys only: ``time`` (UTC, ISO 8601, milliseconds), ``level``,
    ``logger``, ``message``, then ``request_id`` and ``job_id`` when set, ``exception`` (the formatted traceback)
    when the record has one, and ``stack`` when it asked for one. A record's ``extra`` values are not written
    (uvicorn's ``color_message``, anything a library attaches): the line says what a text line would, no more.

    The exception is formatted as the text format does, from the record's ``exc_info``: the handlers that may
    meet patient data in an exception's message log :func:`gateway.phi.withheld` of it, and this formatter
    shows that, never the original message.

    >>> r = logging.LogRecord("gateway.worker", logging.WARNING, "", 0, "job %s: %s", ("j1", "late"), None)
    >>> r.created, r.msecs, r.job_id = 0.0, 0.0, "j1"
    >>> JsonLines().format(r)
    '{"time": "1970-01-01T00:00:00.000Z", "level": "WARNING", "logger": "gateway.worker", "message": "job j1: late", "job_id": "j1"}'
    """

    def __init__(self) -> None:
        super().__init__(json_ensure_ascii=False)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.message
        for key in ("request_id", "job_id"):
            value = getattr(record, key, None)
            if value is not None:
                log_data[key] = value
        if message_dict.get("exc_info"):
            log_data["exception"] = message_dict["exc_info"]
        if message_dict.get("stack_info"):
            log_data["stack"] = message_dict["stack_info"]


def short_id(value: str) -> str:
    """The last 8 characters of a request or job id, as a text line shows it (random in the ids the gateway meets;
    a UUIDv7's head is its time).

    >>> short_id("9f1c6a2e-55b1-4c1e-9a6e-0c1d2e3f4a5b"), short_id("0123456789abcdef0123456789abcdef")
    ('2e3f4a5b', '89abcdef')
    """
    return value[-8:]


class TextIds(logging.Formatter):
    """A handler's own text format (``inner``: uvicorn's, ``basicConfig``'s, or the bare message of a handler
    that has none), its first line ended by `` [req=<id> job=<id>]`` with the ids of the record that are set
    (:func:`short_id`), nothing when neither is. The first line, not the last: a traceback's lines follow the
    message, and ``grep`` finds the line that says what happened.

    >>> r = logging.LogRecord("gateway.worker", logging.INFO, "", 0, "job %s done", ("5b0c",), None)
    >>> TextIds(None).format(r)
    'job 5b0c done'
    >>> r.request_id, r.job_id = None, "0123456789abcdef0123456789abcdef"
    >>> TextIds(logging.Formatter("%(levelname)s %(message)s")).format(r)
    'INFO job 5b0c done [job=89abcdef]'
    """

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        ids = [f"{name}={short_id(value)}" for name, value in (("req", getattr(record, "request_id", None)),
                                                               ("job", getattr(record, "job_id", None))) if value]
        if not ids:
            return text
        first, newline, rest = text.partition("\n")
        return f"{first} [{' '.join(ids)}]{newline}{rest}"


def _console(handler: logging.Handler) -> bool:
    """A plain stream handler writing to this process's standard error or output (basicConfig's, uvicorn's):
    not a file's, not pytest's capture."""
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
        sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


def configure(log_format: str) -> None:
    """Install :class:`ContextFilter` on the handlers of the root logger and of uvicorn's loggers and, for
    ``json``, format the records of all three as :class:`JsonLines` on standard error (idempotent).

    Call it once uvicorn has configured its loggers: ``gateway.main.app_from_env`` (uvicorn calls the factory
    after its own logging set-up) and ``ctscreen serve`` (after ``uvicorn.Config``). For ``json``:

    * the handlers of uvicorn's ``uvicorn`` (error log) and ``uvicorn.access`` loggers write JSON lines to standard
      error (uvicorn's access log wrote to standard output, where the audit trail is); a logger uvicorn left without
      handlers (``--no-access-log``) stays silent;
    * the root logger's console handler (``ctscreen serve``'s, from ``logging.basicConfig``) writes JSON lines;
      under ``uvicorn --factory`` it had none (the gateway's warnings came out bare through Python's last resort,
      its info lines not at all): one on standard error is added, at uvicorn's ``--log-level``.

    For ``text`` each of those handlers keeps its format, wrapped in :class:`TextIds`, and so does Python's handler
    of last resort (:data:`logging.lastResort`), which writes the gateway's warnings under ``uvicorn --factory``,
    where the root logger has no handler: a line written while a request is answered or a job screened ends with
    their ids, any other line is as it was.
    """
    context = ContextFilter()
    json_lines = log_format == "json"
    root, server, access = logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.access")
    for logger in (root, server, access):
        handlers = logger.handlers
        if json_lines and logger is root and not any(_console(h) for h in handlers):
            root.addHandler(logging.StreamHandler(sys.stderr))  # formatted below
            level = server.getEffectiveLevel()
            if level < root.level:
                root.setLevel(level)
        for handler in logger.handlers:
            if not any(isinstance(f, ContextFilter) for f in handler.filters):
                handler.addFilter(context)
            if json_lines and _console(handler):
                assert isinstance(handler, logging.StreamHandler)
                if handler.stream is not sys.stderr:
                    handler.setStream(sys.stderr)
                handler.setFormatter(JsonLines())
            elif not json_lines and _console(handler):
                _with_ids(handler)
    last_resort = logging.lastResort
    if not json_lines and last_resort is not None:
        if not any(isinstance(f, ContextFilter) for f in last_resort.filters):
            last_resort.addFilter(context)
        _with_ids(last_resort)


def _with_ids(handler: logging.Handler) -> None:
    """Wrap ``handler``'s format in :class:`TextIds` (once)."""
    if not isinstance(handler.formatter, TextIds):
        handler.setFormatter(TextIds(handler.formatter))


def say(text: str, log_format: str, logger: str = "gateway.cli") -> None:
    """Tell the operator of ``ctscreen serve`` or ``demo`` something on standard error, whatever the log level (the
    start of the embedded Triton, the stop): the text as it was, or a :class:`JsonLines` line of level INFO for
    ``json``, so that standard error holds JSON lines only."""
    if log_format == "json":
        text = JsonLines().format(logging.LogRecord(logger, logging.INFO, "", 0, text.strip(), (), None))
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
