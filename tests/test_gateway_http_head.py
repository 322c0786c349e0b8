"""A request's head (request line and headers) is bounded (``gateway.httpserver``): uvicorn's httptools parser
has none, and one unauthenticated connection sending a 64 MiB header held ``/healthz`` for seconds (pen test
rev1, 27). The gateway runs as ``ctscreen serve`` runs it (:func:`gateway.cli.run_stack`: real uvicorn, a
free port; Triton unreachable, which the liveness path does not ask); the client is a raw socket."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import urllib.request

import pytest

from gateway.cli import run_stack

LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def port():
    with run_stack(port=0, triton_url="127.0.0.1:9", settings_overrides={"max_request_head_bytes": LIMIT}) as stack:
        yield int(stack.url.rsplit(":", 1)[1])


_PENDING: dict[int, bytes] = {}  # bytes of a socket read past the answer returned (the next one's)


def _answer(sock: socket.socket) -> bytes:
    """One whole answer (its head and a Content-Length body) read from ``sock``; b"" when it closed first."""
    data = _PENDING.pop(sock.fileno(), b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += sock.recv(65536)
    _PENDING[sock.fileno()] = body[length:]
    return head + b"\r\n\r\n" + body[:length]


def _health(port: int) -> float:
    t = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        assert r.status == 200
    return time.monotonic() - t


def test_a_huge_header_is_refused_with_431_while_healthz_answers(port):
    """A 1 MiB header value gets 431 and a closed connection once the head passes the limit (not after the
    parser has grown the value); /healthz answers meanwhile."""
    waits: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            waits.append(_health(port))
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            t = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            try:
                for _ in range(16):
                    sock.sendall(b"a" * 65536)
                sock.sendall(b"\r\n\r\n")
            except OSError:  # the gateway closed the connection while the rest was on its way
                pass
            answer = _answer(sock)
            took = time.monotonic() - t
    finally:
        time.sleep(0.2)
        done.set()
        prober.join(10)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"request_header_fields_too_large" in answer and b"connection: close" in answer.lower()
    assert took < 5, took
    assert waits and max(waits) < 2, waits


def _refused_head(port: int, head: bytes) -> bytes:
    """The answer to ``head`` followed by a header value four times the limit."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(head + b"X-Big: " + b"a" * (4 * LIMIT) + b"\r\n\r\n")
        except OSError:
            pass
        return _answer(sock)


def test_a_431_carries_a_request_id_as_every_answer_does(port, caplog):
    """The app never sees a refused head, so its middleware gave the 431 no ``X-Request-ID``: the client's, when
    it came before the limit and is well formed, or a new one is on the answer and on its warning's record (a
    malformed one is replaced, never quoted)."""
    caplog.set_level(logging.WARNING, logger="ctscreen.gateway")
    good = "9f1c6a2e-55b1-4c1e-9a6e-0c1d2e3f4a5b"
    answers = {sent: _refused_head(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + (
        b"" if sent is None else b"X-Request-ID: " + sent.encode() + b"\r\n")) for sent in (good, None, "DOE-JOHN-1")}
    ids = {}
    for sent, answer in answers.items():
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        ids[sent] = re.search(rb"\r\nx-request-id: ([^\r]*)\r\n", answer)[1].decode()
    assert ids[good] == good and all(re.fullmatch("[0-9a-f]{32}", ids[s]) for s in (None, "DOE-JOHN-1")), ids
    logged = [r.request_id for r in caplog.records if "431, connection closed" in r.getMessage()]
    assert set(ids.values()) <= set(logged), (ids, logged)
    assert "DOE" not in caplog.text


def test_a_huge_url_is_refused_too(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(b"GET /healthz?" + b"q" * (4 * LIMIT) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        except OSError:
            pass
        assert _answer(sock).startswith(b"HTTP/1.1 431 ")


def test_heads_under_the_limit_pass_and_each_request_of_a_connection_is_counted_afresh(port):
    """Three requests of ~12 KiB of headers each on one kept-alive connection (36 KiB in all, over the
    16 KiB limit): each is answered; the first two and part of the third sent in one write (a chunk that
    ends one head and starts the next)."""
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(12))
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        assert _answer(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(request + request + request[:5000])
        assert _answer(sock).startswith(b"HTTP/1.1 200 ")
        assert _answer(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(request[5000:])
        assert _answer(sock).startswith(b"HTTP/1.1 200 ")
        # a body over the limit after a small head is a body, not a head
        body = b"x" * (3 * LIMIT)
        sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert _answer(sock).split(b"\r\n")[0] in (b"HTTP/1.1 405 Method Not Allowed",), "a body counted as head"

