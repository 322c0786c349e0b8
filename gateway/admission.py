"""Memory-safe admission of request bodies (uploads and STOW-RS): a budget of bytes in flight.

Before a byte of a body is read, :meth:`Admission.body` reserves its declared ``Content-Length`` against
a global budget (``CTSCREEN_UPLOAD_BUDGET_BYTES``) and counts the client's bodies in flight
(``CTSCREEN_MAX_UPLOADS_PER_CLIENT``; a client is its authenticated subject, else its address). Over
either limit the request gets 429 with ``Retry-After`` and its body is never read. A body without a
declared length (chunked) grows its reservation as it arrives and gets the same 429 when it would pass
the budget. One client holds at most half the budget (or one largest upload, if that is more), so a client whose
bodies stall cannot shut every other client out; and a body from which no byte arrives for
``CTSCREEN_BODY_IDLE_TIMEOUT_S`` is dropped (408, :class:`~gateway.errors.BodyStalled`) and its reservation freed.
Admitted bodies either stream to a temporary file in chunks (``CTSCREEN_UPLOAD_TMP_DIR``) and
are handed to the route memory-mapped (:meth:`Admission.body`), or reach the route chunk by chunk as
they arrive (:meth:`Admission.stream`: a multipart upload is split into its files as it is read), so the
bytes held in the process are bounded by the budget, not by the number of clients. The reservation is
kept until the route returns (for an upload: until the study is decoded), then the file is removed.

A body larger than the whole budget could never be admitted, so :class:`gateway.settings.Settings`
refuses ``max_upload_bytes > upload_budget_bytes`` at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Request

from gateway.errors import BodyStalled, OverBudget, TooLarge
from gateway.uploads import gathered, in_thread

logger = logging.getLogger(__name__)

__all__ = ["Admission", "OverBudget", "client_key", "drop_pages"]


class _Body(mmap.mmap):
    """A read-only mapped body that :mod:`zipfile` can read in place (it asks ``seekable()``)."""

    path: str = ""

    def seekable(self) -> bool:
        return True

    def tobytes(self) -> bytes:
        """The whole body as bytes, read through the file (no mapped page becomes resident)."""
        with open(self.path, "rb") as fh:
            return fh.read()


def drop_pages(body: object) -> None:
    """Once a body has been parsed into files, let the kernel drop its mapped pages from this process's
    resident memory (the file stays until the route returns); a no-op for ``bytes``."""
    if isinstance(body, mmap.mmap) and not body.closed and hasattr(mmap, "MADV_DONTNEED"):
        body.madvise(mmap.MADV_DONTNEED)


class Admission:
    """The in-flight byte budget and the per-client limit, shared by every body-reading route.

    Parameters
    ----------
    budget_bytes : int
        Bytes of request bodies held at once.
    per_client : int
        Bodies one client may send at once.
    retry_after_s : int
        ``Retry-After`` of the 429 answers.
    tmp_dir : Path | None
        Where bodies are spooled (the system temp dir when None).
    client_bytes : int | None
        Bytes one client may hold reserved at once (default: half the budget).
    idle_timeout_s : float
        A body from which no byte arrives for this long is dropped (408).
    """

    chunk_reserve = 8 * 1024 * 1024
    """Reservation step of a body without Content-Length."""

    def __init__(self, budget_bytes: int, per_client: int = 4, retry_after_s: int = 10,
                 tmp_dir: Path | None = None, client_bytes: int | None = None, idle_timeout_s: float = 60.0) -> None:
        self.budget_bytes, self.per_client, self.retry_after_s = budget_bytes, per_client, retry_after_s
        self.tmp_dir = tmp_dir
        self.client_bytes = budget_bytes // 2 if client_bytes is None else client_bytes
        self.idle_timeout_s = idle_timeout_s
        self.in_flight = 0
        self.peak = 0
        self._clients: Counter[str] = Counter()
        self._held: Counter[str] = Counter()  # bytes reserved per client

    def _reserve(self, nbytes: int, what: str, client: str) -> None:
        if self.in_flight + nbytes > self.budget_bytes:
            raise OverBudget(f"{self.in_flight} of {self.budget_bytes} bytes of request bodies are in flight; "
                             f"{what} does not fit now. Retry later.", self.retry_after_s)
        if self._held[client] and self._held[client] + nbytes > self.client_bytes:
            raise OverBudget(f"This client's bodies in flight hold {self._held[client]} bytes; with {what} they would "
                             f"pass its share of {self.client_bytes}. Retry when one is done.", self.retry_after_s)
        self.in_flight += nbytes
        self._held[client] += nbytes
        self.peak = max(self.peak, self.in_flight)

    @asynccontextmanager
    async def stream(self, request: Request, limit: int, client: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """The admitted body of ``request`` as it arrives: an async iterator of its chunks, under the budget.

        The checks and the reservation are :meth:`body`'s; the reservation is kept until the context ends.

        Raises
        ------
        OverBudget
            Before reading (429), or while reading a body that grows past its reservation when the budget
            has no room for the rest.
        gateway.errors.TooLarge
            When the body is (or declares itself) over ``limit`` bytes (413).
        gateway.errors.BodyStalled
            When no byte of the body arrives for :attr:`idle_timeout_s` (408).
        """
        declared_text = request.headers.get("content-length")
        declared = int(declared_text) if declared_text is not None and declared_text.isdigit() else None
        if declared is not None and declared > limit:
            raise TooLarge(f"Request body is {declared} bytes; the limit is {limit}.")
        if self._clients[client] >= self.per_client:
            raise OverBudget(f"This client already sends {self._clients[client]} bodies at once (the limit); "
                             "retry when one is done.", self.retry_after_s)
        reserved = declared if declared is not None else min(self.chunk_reserve, limit, self.budget_bytes)
        self._reserve(reserved, f"a body of {declared} bytes" if declared is not None else "a chunked body", client)
        self._clients[client] += 1

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal reserved
            size = 0
            arriving = request.stream()
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout_s):  # not wait_for: it can swallow a cancel on 3.11
                        chunk = await anext(arriving)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise BodyStalled(f"No byte of the request body arrived for {self.idle_timeout_s:g} s after "
                                      f"{size} bytes: the body was dropped and nothing of it kept. Send it again."
                                      ) from None
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"Request body is over the limit of {limit} bytes.")
                if size > reserved:  # chunked, or longer than declared
                    step = max(min(self.chunk_reserve, limit - reserved), size - reserved)
                    self._reserve(step, "the rest of this body", client)
                    reserved += step
                if chunk:
                    yield chunk

        try:
            yield chunks()
        finally:
            self.in_flight -= reserved
            self._held[client] -= reserved
            if self._held[client] <= 0:
                del self._held[client]
            self._clients[client] -= 1
            if self._clients[client] <= 0:
                del self._clients[client]

    @asynccontextmanager
    async def body(self, request: Request, limit: int, client: str) -> AsyncIterator[Any]:
        """The admitted body of ``request``: a read-only ``mmap`` of its spooled file (``b""`` if empty).

        Raises
        ------
        OverBudget
            Before reading, when the budget or the client's limit is reached (429).
        gateway.errors.TooLarge
            When the body is (or declares itself) over ``limit`` bytes (413).
        """
        async with self.stream(request, limit, client) as chunks:
            fd, name = tempfile.mkstemp(prefix="ctscreen-body-", dir=self.tmp_dir)
            view: Any = b""
            try:
                with os.fdopen(fd, "wb") as fh:
                    async for piece in gathered(chunks):  # off the event loop (a stalled volume)
                        await in_thread(fh.write, piece)  # ended before the file is closed
                    size = fh.tell()
                if size:
                    with open(name, "rb") as fh:
                        view = _Body(fh.fileno(), 0, access=mmap.ACCESS_READ)
                        view.path = name
                yield view
            finally:
                if isinstance(view, mmap.mmap):
                    try:
                        view.close()
                    except BufferError:  # a slice still exported: the mapping goes with the last reference
                        logger.debug("body mapping still referenced; left to the garbage collector")
                os.unlink(name)


def client_key(request: Request) -> str:
    """Who a body is counted against: the authenticated subject, else the peer address."""
    principal = getattr(request.state, "principal", None)
    if principal is not None and principal.kind != "anonymous":
        return f"{principal.kind}:{principal.subject}"
    return f"addr:{request.client.host if request.client else 'unknown'}"
