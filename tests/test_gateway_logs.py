"""Request ids and job ids (``gateway.logs``): one id ties a client's request, its audit record and the log lines
written while it was answered; a job's id is on the lines of its screening.

These run the app in process (``TestClient``, Triton the fake of ``tests/gateway_app_fakes.py``); the log
records are pytest's, with :class:`gateway.logs.ContextFilter` on its handler as ``gateway.logs.configure`` puts it
on the process's.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re

import pytest
from fastapi.testclient import TestClient

from gateway import keys as keys_cli
from gateway.logs import JOB_ID, ContextFilter
from gateway.main import create_app
from gateway.screening import ContextExecutor
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet, ct_series, wait_job

NEW_ID = re.compile(r"[0-9a-f]{32}")
GOOD = "9f1c6a2e-55b1-4c1e-9a6e-0c1d2e3f4a5b"


@pytest.fixture()
def ids(caplog):
    """pytest's records, each with the request and job ids of where it was written."""
    context = ContextFilter()
    caplog.handler.addFilter(context)
    caplog.set_level(logging.INFO)
    yield caplog
    caplog.handler.removeFilter(context)


def _app(tmp_path, **settings):
    return create_app(Settings(triton_urls="fake:1", data_dir=tmp_path / "data", audit_log_file=tmp_path / "audit.jsonl",
                               shutdown_grace_s=1, **settings), client_factory=FakeFleet())


def _audit(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def test_a_well_formed_request_id_is_echoed_and_a_missing_or_malformed_one_replaced(tmp_path):
    with TestClient(_app(tmp_path)) as client:
        for sent in (GOOD, GOOD.upper(), "0123456789abcdef", "ab" * 32):
            assert client.get("/healthz", headers={"X-Request-ID": sent}).headers["x-request-id"] == sent
        made = [client.get("/healthz").headers["x-request-id"] for _ in range(3)]
        assert all(NEW_ID.fullmatch(m) for m in made) and len(set(made)) == 3
        # a client's own scheme could spell a patient's name; too long, too short, other characters: a new id
        for sent in ("DOE^JOHN", "DOE-JOHN-19700101", "0123456789abcde", "ab" * 32 + "a", f"{GOOD} x",
                     f"{GOOD}\r\nX: y".replace("\r\n", "%0D%0A"), "zzzzzzzzzzzzzzzzzzzz"):
            got = client.get("/healthz", headers={"X-Request-ID": sent}).headers["x-request-id"]
            assert NEW_ID.fullmatch(got) and got != sent, (sent, got)


def test_every_answer_has_its_request_id_and_its_audit_record_the_same(tmp_path):
    """Refusals and errors too: 401, 403, 404, 413, 422 and the last resort's 503, each audited with the id."""
    keyfile = tmp_path / "keys.json"
    keys = {}
    for name, scopes in (("reader", ["results:read"]), ("writer", ["studies:write", "results:read"])):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            keys_cli.main(["--file", str(keyfile), "add", name, "--scopes", *scopes])
        keys[name] = {"X-API-Key": out.getvalue().strip()}
    reader, writer = keys["reader"], keys["writer"]
    app = _app(tmp_path, auth_api_keys_file=keyfile, max_upload_bytes=1024)

    async def boom() -> None:
        raise RuntimeError("Invalid value for PatientName: 'ZZQDOE^JANE'")

    app.add_api_route("/v1/boom", boom)
    calls = {
        401: ("GET", "/v1/worklist", {}),
        403: ("POST", f"/v1/jobs/{'0' * 32}/retry", reader),
        404: ("GET", f"/v1/jobs/{'0' * 32}", reader),
        413: ("POST", "/v1/studies", {**writer, "content-type": "application/zip"}),
        422: ("GET", "/v1/worklist?limit=0", reader),
        503: ("GET", "/v1/boom", reader),
        200: ("GET", "/v1/worklist", reader),
    }
    sent = {}
    with TestClient(app, raise_server_exceptions=False) as client:
        for status, (method, path, headers) in calls.items():
            rid = f"{status:032x}"
            r = client.request(method, path, headers={**headers, "X-Request-ID": rid},
                               content=b"x" * 5000 if status == 413 else None)
            assert r.status_code == status, (status, r.status_code, r.text)
            assert r.headers["x-request-id"] == rid, (status, r.headers)
            sent[rid] = status
        malformed = client.get("/v1/worklist", headers={**reader, "X-Request-ID": "ZZQDOE-JOHN"})
    audited = {r["request_id"]: r["status"] for r in _audit(tmp_path)}
    assert sent.items() <= audited.items(), audited
    assert audited[malformed.headers["x-request-id"]] == 200
    assert "ZZQDOE" not in (tmp_path / "audit.jsonl").read_text()


def test_a_log_line_written_while_a_request_is_answered_carries_its_id(tmp_path, ids):
    """The upload's refusal is logged by the parse, in a thread of its own: the id goes with it."""
    with TestClient(_app(tmp_path), raise_server_exceptions=False) as client:
        r = client.post("/v1/studies", files=[("files", ("x.dcm", b"not dicom", "application/dicom"))],
                        headers={"X-Request-ID": GOOD})
        assert r.status_code == 415, r.text
        other = client.get("/healthz")
    refused = [rec for rec in ids.records if rec.getMessage().startswith("refused file#")]
    assert refused and all(rec.request_id == GOOD for rec in refused), [(rec.getMessage(), rec.request_id)
                                                                         for rec in ids.records]
    assert other.headers["x-request-id"] != GOOD
    # written outside any request (the start, the worker): no request id
    assert all(rec.request_id is None for rec in ids.records if rec.getMessage().startswith("gateway up"))


def test_the_worker_s_log_lines_carry_the_job_id(tmp_path, ids):
    """A study is screened after its upload's answer, by the worker: its lines carry its job's id (and no
    request's), so one search for the id finds the upload's audit record and the screening's lines."""
    _, files = ct_series(6, size=64)
    with TestClient(_app(tmp_path)) as client:
        r = client.post("/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in files],
                        headers={"X-Request-ID": GOOD})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert wait_job(client, job_id)["state"] == "done"
    done = [rec for rec in ids.records if rec.getMessage().startswith(f"job {job_id} done")]
    assert len(done) == 1 and done[0].job_id == job_id and done[0].request_id is None, \
        [(rec.getMessage(), rec.job_id) for rec in ids.records]
    upload = [r for r in _audit(tmp_path) if r["action"] == "POST /v1/studies"]
    assert upload[0]["request_id"] == GOOD and upload[0]["job_id"] == job_id


def test_the_decode_threads_work_in_their_submitter_s_context():
    """``loop.run_in_executor`` copies no context: a decode thread's records would have lost the job's id."""
    token = JOB_ID.set("0" * 32)
    try:
        with ContextExecutor(max_workers=1) as pool:
            assert pool.submit(JOB_ID.get).result(5) == "0" * 32
    finally:
        JOB_ID.reset(token)
    with ContextExecutor(max_workers=1) as pool:
        assert pool.submit(JOB_ID.get).result(5) is None
