"""Clients whose request bodies stall or stop half-way, against a real uvicorn over real sockets (Triton is the
fake client of ``tests/gateway_app_fakes.py``: none of these bodies reaches it).

A review found that one client with a valid key could declare two 2 GiB bodies, send a byte of each and hold
the whole upload budget for as long as it kept the sockets open (every other client: 429), and that a client
leaving mid-body was logged as the gateway's own failure, with a traceback and an internal error counted.
"""

from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import pytest

from gateway.keys import KeyStore
from gateway.settings import Settings
from tests.gateway_app_fakes import served

KIB = 1024


CONTENT_TYPES = {"/v1/studies": "application/dicom",
                 "/dicomweb/studies": 'multipart/related; type="application/dicom"; boundary=XyZ'}


def _open_body(port: int, key: str, declared: int, path: str = "/v1/studies") -> socket.socket:
    """A POST that declares ``declared`` bytes of body, sends its first, and stalls."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    first = b"--XyZ\r\nContent-Type: application/dicom\r\n\r\nD" if path == "/dicomweb/studies" else b"D"
    s.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\n"
               f"Content-Type: {CONTENT_TYPES[path]}\r\nContent-Length: {declared}\r\n\r\n").encode() + first)
    return s


def _answer(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        piece = s.recv(65536)
        if not piece:
            break
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body[body.index(b"{"):]) if b"{" in body else {}


@pytest.fixture
def keys(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    return (tmp_path / "keys.json", store.add("a", ["studies:write"])[0], store.add("b", ["studies:write"])[0],
            store.add("ops", ["admin"])[0])


def test_a_stalled_body_is_dropped_and_one_client_cannot_hold_the_whole_budget(tmp_path, keys):
    keyfile, a, b, _ = keys
    settings = Settings(triton_urls="fake:1", data_dir=tmp_path / "data", auth_api_keys_file=keyfile,
                        upload_budget_bytes=1024 * KIB, max_upload_bytes=512 * KIB, body_idle_timeout_s=3,
                        audit_log_file=tmp_path / "audit.jsonl", shutdown_grace_s=1)
    with served(settings, "127.0.0.1") as port:
        first = _open_body(port, a, 512 * KIB)
        time.sleep(0.3)  # admitted: it holds its share
        second = _open_body(port, a, 512 * KIB)
        status, body = _answer(second)  # the rest of the budget is not this client's to take
        assert status == 429 and body["reason"] == "over_budget" and "share" in body["message"], body
        second.close()
        other = httpx.post(f"http://127.0.0.1:{port}/v1/studies", content=b"not DICOM" * 100, timeout=30,
                           headers={"X-API-Key": b, "Content-Type": "application/dicom"})
        assert other.status_code == 415 and other.json()["reason"] == "not_dicom", other.text  # admitted, read
        started = time.monotonic()
        status, body = _answer(first)  # no further byte: dropped after the idle timeout
        assert status == 408 and body["reason"] == "body_stalled", body
        assert 2 < time.monotonic() - started + 0.3 < 20
        assert first.recv(1) == b""  # and the connection closed
        first.close()
        # its reservation is free again: the same client may send a body of the whole share
        again = httpx.post(f"http://127.0.0.1:{port}/v1/studies", content=b"not DICOM" * 50_000, timeout=30,
                           headers={"X-API-Key": a, "Content-Type": "application/dicom"})
        assert again.status_code == 415, again.text


@pytest.mark.parametrize("path", ["/v1/studies", "/dicomweb/studies"])
def test_a_client_leaving_mid_body_is_no_error_of_ours(tmp_path, keys, caplog, path):
    keyfile, a, _, ops = keys
    settings = Settings(triton_urls="fake:1", data_dir=tmp_path / "data", auth_api_keys_file=keyfile,
                        audit_log_file=tmp_path / "audit.jsonl", shutdown_grace_s=1)
    caplog.set_level(logging.INFO)
    with served(settings, "127.0.0.1") as port:
        s = _open_body(port, a, 100 * KIB, path)
        time.sleep(0.3)
        s.close()  # gone, 100 KiB short
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "client_disconnected" not in (tmp_path / "audit.jsonl").read_text():
            time.sleep(0.1)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"X-API-Key": ops}, timeout=10)
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    (post,) = [r for r in records if r["action"].startswith("POST")]
    assert post["outcome"] == "aborted" and post["reason"] == "client_disconnected" and post["status"] == 499, post
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert metrics.status_code == 200 and "ctscreen_errors_total" in metrics.text, metrics.text[:200]
    assert 'reason="internal_error"' not in metrics.text
