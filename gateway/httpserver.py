"""uvicorn's httptools protocol with a bound on a request's head (request line and headers).

httptools (llhttp) has no limit on a header or a URL: it grows each one by concatenation on the event
loop, so one unauthenticated connection sending a 64 MiB header held every other request (``/healthz``
too) for seconds, and a 256 MiB one for minutes (pen test rev1, 27); only uvicorn's h11 parser has a limit,
and it is slower. :class:`BoundedHttpToolsProtocol` counts the bytes a request's head takes (from the
connection's start, or the end of the previous request on a kept-alive connection, to the end of its
headers) and, past ``CTSCREEN_MAX_REQUEST_HEAD_BYTES`` (64 KiB by default), answers 431 Request Header
Fields Too Large and closes the connection before feeding the parser any more of it. The app never sees that
request, so :class:`gateway.logs.RequestIds` gives it no id: the 431 carries its own ``X-Request-ID``, the
client's when its header was read before the limit and is well formed, else a new one, and so does its log line.

``ctscreen serve`` runs it; under plain uvicorn (the Helm chart) name it:
``uvicorn --http gateway.httpserver:BoundedHttpToolsProtocol --factory gateway.main:app_from_env``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.logs import HEADER, new_request_id, request_id_of

logger = logging.getLogger("ctscreen.gateway")

__all__ = ["BoundedHttpToolsProtocol", "bounded_protocol", "head_too_large"]


def head_too_large(limit: int, request_id: str) -> bytes:
    """The whole 431 answer (it closes the connection) to a request whose head passed ``limit`` bytes, with its
    ``X-Request-ID`` (a well-formed id: :func:`gateway.logs.request_id_of`).

    >>> head_too_large(65536, "0" * 32).split(b"\\r\\n")[0]
    b'HTTP/1.1 431 Request Header Fields Too Large'
    >>> b"connection: close" in head_too_large(65536, "0" * 32), b"x-request-id: " + b"0" * 32 in head_too_large(1, "0" * 32)
    (True, True)
    """
    body = json.dumps({"reason": "request_header_fields_too_large",
                       "message": f"The request line and headers are over the limit of {limit} bytes."}).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\ncache-control: no-store\r\nx-request-id: %s\r\n\r\n%s"
            % (len(body), request_id.encode(), body))


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """:class:`~uvicorn.protocols.http.httptools_impl.HttpToolsProtocol` refusing a request head over
    ``max_head_bytes`` (431, connection closed).

    ``max_head_bytes`` None (this class, as ``uvicorn --http`` names it) is read once from the settings
    (``CTSCREEN_MAX_REQUEST_HEAD_BYTES``); :func:`bounded_protocol` makes a class with the value given.
    The bytes are counted as they arrive, before the parser sees them: a chunk that ends a head and
    carries the start of the body is fed up to the limit first, and the rest only once the parser says
    the headers ended. Each request of a kept-alive connection is counted afresh from the end of the
    previous one.
    """

    max_head_bytes: ClassVar[int | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limit = self.limit()
        self._in_head = True  # reading a request's head (the connection's first, or after the last request)
        self._head_bytes = 0
        self._heads = 0  # heads parsed on this connection

    @classmethod
    def limit(cls) -> int:
        """The limit in bytes (from the settings when the class names none)."""
        if cls.max_head_bytes is None:
            from gateway.settings import Settings

            cls.max_head_bytes = Settings().max_request_head_bytes  # the process's app read the same variables
        return cls.max_head_bytes

    def data_received(self, data: bytes) -> None:
        if self.parser is None:  # refused (or lost): nothing more is parsed
            return
        if not self._in_head:
            super().data_received(data)
            return
        room = self._limit - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        heads = self._heads  # the head may end in what fits: fed that far, the parser says
        if room > 0:
            self._head_bytes += room
            super().data_received(data[:room])
        if self._heads == heads:
            self._refuse()
        elif self.parser is not None and not self.transport.is_closing():
            self.data_received(data[room:])  # a body, or the next request's head, counted afresh

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0

    def _refuse(self) -> None:
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        # the headers parsed so far (uvicorn's on_header, names lowercased): the client's id if it came before the
        # limit; a malformed one is replaced, as RequestIds does
        sent = next((v for k, v in self.headers or () if k == HEADER.encode()), None)
        rid = request_id_of(sent) or new_request_id()
        logger.warning("a request head from %s passed %d bytes: 431, connection closed", client, self._limit,
                       extra={"request_id": rid})
        self.transport.write(head_too_large(self._limit, rid))
        self.transport.close()
        self.parser = None  # type: ignore[assignment]  # nothing more of this connection is parsed


def bounded_protocol(max_head_bytes: int) -> type[BoundedHttpToolsProtocol]:
    """A :class:`BoundedHttpToolsProtocol` class refusing heads over ``max_head_bytes`` (for ``uvicorn.Config(http=)``).

    >>> bounded_protocol(8192).limit()
    8192
    """
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"max_head_bytes": max_head_bytes})
