"""Memory-safe admission (``gateway.admission``): concurrent bodies over the in-flight budget get 429 with
Retry-After before a byte of them is read; admitted ones stream to disk; no 5xx.

The gateway runs under a real uvicorn on a free port and the clients are raw sockets, so the test controls
exactly when each body is sent: every request first sends only its head; those over the budget are
answered at once (429), the admitted ones then send their bodies. This is issue 14's "forty concurrent
200 MB uploads against a 1 GiB budget" at 1/50 of the bytes (forty 4 MiB bodies against 20 MiB in flight),
with the same semantics; ``benchmarks/bench_admission.py`` runs the full size and records the RSS.
Triton is the fake client of ``tests/gateway_app_fakes.py`` (the bodies are not DICOM anyway: admitted
ones end 415, which is the point: a 4xx, never a 5xx).
"""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc
import uuid

import pytest
import uvicorn

from ctscreen.embedded import free_port
from gateway.main import create_app
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet
from tests.gateway_dicom_factory import make_series

MiB = 1024 * 1024


class Live:
    """A gateway under uvicorn in a thread; ``app.state.admission`` is inspectable."""

    def __init__(self, fleet: FakeFleet | None = None, **settings) -> None:
        self.app = create_app(Settings(triton_urls="fake:1", max_concurrent_studies=8, max_queued_studies=256,
                                       **settings), client_factory=fleet or FakeFleet())
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Live:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


async def _response(reader: asyncio.StreamReader, timeout: float) -> tuple[int, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    return int(lines[0].split()[1]), headers


async def burst(port: int, n: int, size: int, path: str = "/v1/studies", content_type: str = "application/octet-stream",
                 chunked: bool = False) -> list[tuple[int, dict[str, str], bool]]:
    """``n`` requests send their heads at once; returns ``(status, headers, answered_before_body)`` each."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    for _, writer in conns:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{length}\r\n\r\n".encode())
        await writer.drain()
    await asyncio.sleep(1.0)  # every head has been seen: over-budget answers are out now

    async def finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, dict[str, str], bool]:
        try:
            return (*await _response(reader, 0.2), True)  # answered before the body
        except TimeoutError:
            pass
        chunk = b"x" * (256 * 1024)  # not DICOM, and refused fast (4 MiB of zeros parse for seconds)
        for _ in range(size // len(chunk)):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return (*await _response(reader, 60), False)

    try:
        return list(await asyncio.gather(*(finish(r, w) for r, w in conns)))
    finally:
        for _, writer in conns:
            writer.close()


def test_concurrent_uploads_over_the_budget_get_429_before_their_body(tmp_path):
    spool = tmp_path / "bodies"
    spool.mkdir()
    with Live(upload_budget_bytes=20 * MiB, max_upload_bytes=8 * MiB, max_uploads_per_client=100,
              upload_client_bytes=20 * MiB, upload_tmp_dir=spool) as live:  # one address: the budget, not its share
        results = asyncio.run(burst(live.port, 40, 4 * MiB))
        admission = live.app.state.admission
        assert admission.in_flight == 0 and admission.peak <= 20 * MiB
    statuses = sorted(s for s, _, _ in results)
    assert all(s < 500 for s in statuses), statuses
    early = [(s, h) for s, h, before in results if before]
    assert len(early) == 35 and all(s == 429 and h.get("retry-after") for s, h in early), early  # 5 x 4 MiB fit
    assert sorted(s for s, _, before in results if not before) == [415] * 5  # admitted, read, not DICOM
    assert list(spool.iterdir()) == []  # every spooled body removed


def test_per_client_limit_and_declared_size(tmp_path):
    with Live(upload_budget_bytes=64 * MiB, max_upload_bytes=8 * MiB, max_uploads_per_client=2) as live:
        results = asyncio.run(burst(live.port, 5, 1 * MiB))
        too_big = asyncio.run(burst(live.port, 1, 9 * MiB))
    assert sorted((s, before) for s, _, before in results) == [(415, False)] * 2 + [(429, True)] * 3
    assert too_big[0][0] == 413 and too_big[0][2]  # refused from its Content-Length, unread


def test_chunked_and_stow_bodies_are_budgeted(tmp_path):
    with Live(upload_budget_bytes=3 * MiB, max_upload_bytes=3 * MiB, max_uploads_per_client=100) as live:
        chunked = asyncio.run(burst(live.port, 4, 2 * MiB, chunked=True))
        stow = asyncio.run(burst(live.port, 4, 2 * MiB, path="/dicomweb/studies",
                                  content_type='multipart/related; type="application/dicom"; boundary=b0undary'))
        assert live.app.state.admission.in_flight == 0
    for results in (chunked, stow):
        statuses = [s for s, _, _ in results]
        assert all(s < 500 for s in statuses) and 429 in statuses, statuses


def test_budget_must_hold_the_largest_upload():
    with pytest.raises(ValueError, match="CTSCREEN_UPLOAD_BUDGET_BYTES"):
        Settings(upload_budget_bytes=1 * MiB, max_upload_bytes=2 * MiB)


@pytest.mark.parametrize("route", ["upload", "stow"])
def test_an_upload_is_spooled_to_disk_not_held_in_memory(tmp_path, route):
    """A 64 MiB multipart upload of 128 uncompressed slices (sent from a file, 256 KiB at a time): the
    gateway's allocations (tracemalloc, every thread of this process) stay far below its size while it
    is received, expanded, read and accepted, and after (its worker keeps the study's headers and the
    first batch, the pixels stay in the spooled files). Triton is not ready, so nothing is screened.
    The same instances by STOW-RS: its parts are spooled to files as they arrive and stored from there
    (the body was split into parts in memory: its whole size at the peak)."""
    series = make_series(128, rows=512, cols=512)
    boundary = uuid.uuid4().hex
    body = tmp_path / "body"
    with open(body, "wb") as fh:
        for name, data, _, _ in series:
            disposition = f'Content-Disposition: form-data; name="files"; filename="{name}"\r\n' if route == "upload" else ""
            fh.write(f"--{boundary}\r\n{disposition}Content-Type: application/dicom\r\n\r\n".encode())
            fh.write(data + b"\r\n")
        fh.write(f"--{boundary}--\r\n".encode())
    del series, data
    size = body.stat().st_size
    assert size > 64 * MiB
    path, media = (("/v1/studies", f"multipart/form-data; boundary={boundary}") if route == "upload" else
                   ("/dicomweb/studies", f'multipart/related; type="application/dicom"; boundary={boundary}'))

    async def send(port: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {media}"
                     f"\r\nContent-Length: {size}\r\n\r\n".encode())
        with open(body, "rb") as fh:
            while chunk := fh.read(256 * 1024):
                writer.write(chunk)
                await writer.drain()
        status, _ = await _response(reader, 120)
        writer.close()
        return status

    with Live(FakeFleet(**{"fake:1": {"ready": False}}), max_upload_bytes=256 * MiB,
              upload_budget_bytes=512 * MiB, stow_max_pending_bytes=512 * MiB) as live:
        spool = live.app.state.settings.data_dir / "spool"
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            status = asyncio.run(send(live.port))
            held, peak = (m - base for m in tracemalloc.get_traced_memory())
        finally:
            tracemalloc.stop()
        assert status == (202 if route == "upload" else 200)
        assert peak < size / 2, f"{peak / MiB:.1f} MiB allocated at the peak for a {size / MiB:.1f} MiB upload"
        assert held < size / 4, f"{held / MiB:.1f} MiB still held for a {size / MiB:.1f} MiB upload"
        spooled = sum(1 for _ in spool.rglob("file-*")) + sum(1 for _ in spool.rglob("part-*"))
        assert spooled == (128 if route == "upload" else 0)  # STOW-RS: stored, its spool removed at once
        if route == "stow":
            assert sum(1 for p in (live.app.state.settings.blobs()).rglob("*") if p.is_file()) >= 128
    assert not any(spool.iterdir())  # released at shut-down


class StallingFile:
    """A file whose writes sleep first (a stalled volume: no NFS server can run here); ``on_write`` is called
    as each write starts, and what a write meets is kept in ``failures``."""

    def __init__(self, fh, stall_s: float, on_write=None, failures: list | None = None) -> None:
        self.fh, self.stall_s, self.on_write, self.failures = fh, stall_s, on_write, failures

    def write(self, data):
        if self.on_write is not None:
            self.on_write()
        time.sleep(self.stall_s)
        try:
            return self.fh.write(data)
        except BaseException as exc:
            if self.failures is not None:
                self.failures.append(exc)
            raise

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.fh.__exit__(*exc)


class BodyRequest:
    """What Admission reads of a Starlette request: the headers and the body in 64 KiB chunks."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.headers = {"content-length": str(len(body))}

    async def stream(self):
        for i in range(0, len(self.body), 64 * 1024):
            await asyncio.sleep(0)
            yield self.body[i:i + 64 * 1024]


def test_a_body_is_written_off_the_event_loop(tmp_path, monkeypatch):
    """A stalled volume (an NFS server that hangs for a while) stalled every request and the health probes:
    the body's chunks were written on the event loop. The stall is simulated (a file whose writes sleep:
    no NFS server can run here); the loop's longest pause while the body is written is measured."""
    import os

    from gateway import admission as adm

    real_fdopen = os.fdopen

    monkeypatch.setattr(adm.os, "fdopen", lambda fd, mode: StallingFile(real_fdopen(fd, mode), 0.2))
    body = os.urandom(3 * MiB)

    async def go() -> tuple[bytes, float]:
        admission = adm.Admission(16 * MiB, tmp_dir=tmp_path)
        longest, done = 0.0, False

        async def ticker():
            nonlocal longest
            last = time.monotonic()
            while not done:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                longest, last = max(longest, now - last), now

        tick = asyncio.create_task(ticker())
        async with admission.body(BodyRequest(body), 8 * MiB, "addr:test") as view:
            kept = bytes(view)
        done = True
        await tick
        return kept, longest

    kept, longest = asyncio.run(go())
    assert kept == body
    assert longest < 0.15, f"the event loop stood still {longest:.2f} s while the body was written"


def test_a_streamed_upload_is_parsed_and_written_off_the_event_loop(tmp_path, monkeypatch):
    """The multipart upload route split each 64 KiB read and wrote its parts on the event loop: with a
    stalled volume (simulated: each write of a part sleeps 50 ms; no NFS server can run here) the health
    probe of every pod waited behind it. Real uvicorn, a raw socket sending the body, /healthz asked
    meanwhile.

    Which thread wrote is the check: it holds at any load. The probes' wait is no check (never a timed
    test): it read 0.3-0.4 s a probe with the writes on the loop and under 0.05 s off it on a quiet machine,
    but 0.22 s off it at load 5-6 (CI beside other work), over its wait just before the upload plus 0.1 s;
    the probes are kept to show the service answering while the writes go on."""
    import httpx

    from gateway import uploads

    real_write = uploads.FilePart.write
    on_loop: list[bool] = []

    def stalling(self, data):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop running in this thread: a worker thread
            on_loop.append(False)
        time.sleep(0.05)
        return real_write(self, data)

    monkeypatch.setattr(uploads.FilePart, "write", stalling)
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                    f"Content-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                    for name, data, _, _ in make_series(8, rows=256, cols=256)) + f"--{boundary}--\r\n".encode()

    async def upload(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST /v1/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}"
                     f"\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        for i in range(0, len(body), 64 * 1024):
            writer.write(body[i:i + 64 * 1024])
            await writer.drain()
            await asyncio.sleep(0.005)
        await _response(reader, 120)
        writer.close()

    def probe(port: int) -> float:
        t0 = time.monotonic()
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        return time.monotonic() - t0

    with Live(FakeFleet(**{"fake:1": {"ready": False}})) as live:
        sender = threading.Thread(target=lambda: asyncio.run(upload(live.port)))
        sender.start()
        waits = []
        while sender.is_alive():
            waits.append(probe(live.port))
            time.sleep(0.02)
        sender.join()
    assert on_loop and not any(on_loop), f"{sum(on_loop)} of {len(on_loop)} part writes ran on the event loop"
    assert len(waits) >= 5, waits  # asked while the writes went on (they take over a second)


def test_a_body_cancelled_mid_write_is_closed_after_the_write_ends(tmp_path, monkeypatch):
    """A cancelled await does not stop the thread writing: the file was closed under the write (the thread
    died on "write to closed file"), and with a stalled volume the close itself waited on the write on the
    event loop. The write now ends before the file is closed. The stall is simulated (writes sleep)."""
    import os

    from gateway import admission as adm

    real_fdopen = os.fdopen
    failures: list[BaseException] = []
    writing = asyncio.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    def slow(fd, mode):
        return StallingFile(real_fdopen(fd, mode), 0.3, lambda: loops[0].call_soon_threadsafe(writing.set), failures)

    monkeypatch.setattr(adm.os, "fdopen", slow)
    body = os.urandom(3 * MiB)

    async def go() -> None:
        loops.append(asyncio.get_running_loop())
        admission = adm.Admission(16 * MiB, tmp_dir=tmp_path)

        async def receive():
            async with admission.body(BodyRequest(body), 8 * MiB, "addr:test"):
                pass

        task = asyncio.create_task(receive())
        await writing.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # a write left running would fail by now
        assert admission.in_flight == 0

    asyncio.run(go())
    assert failures == []
    assert list(tmp_path.iterdir()) == []  # the spooled body is gone
