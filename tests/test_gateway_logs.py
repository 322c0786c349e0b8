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
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from gateway import keys as keys_cli
from gateway.logs import JOB_ID, ContextExecutor, ContextFilter
from gateway.main import create_app
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


# --- the log's format (CTSCREEN_LOG_FORMAT): real gateway processes, as the chart and `ctscreen serve` start them ---
FACTORY = ["-m", "uvicorn", "--http", "gateway.httpserver:BoundedHttpToolsProtocol", "--factory",
           "gateway.main:app_from_env", "--log-level", "info"]
SERVE = ["-c", "from ctscreen.cli import main; raise SystemExit(main())", "serve", "--log-level", "info"]
UPLOAD_ID = "0123456789abcdef0123456789abcdef"
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _gateway_lines(tmp_path, argv: list[str], log_format: str | None) -> tuple[str, str]:
    """Start the gateway (``argv``, Triton on a port nobody listens on), send it a worklist call with a patient's
    name in its query, an upload of a file that is not DICOM and a call with a malformed request id, stop it
    (SIGTERM); its standard output and error."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "CTSCREEN_DATA_DIR": str(tmp_path / "data"), "CTSCREEN_TRITON_URLS": f"127.0.0.1:{free_port()}",
           "PYTHONUNBUFFERED": "1"}
    env.pop("CTSCREEN_LOG_FORMAT", None)
    if log_format is not None:
        env["CTSCREEN_LOG_FORMAT"] = log_format
    if argv is SERVE:
        argv = [*argv, "--port", str(port), "--triton-url", env.pop("CTSCREEN_TRITON_URLS")]
    else:
        argv = [*argv, "--port", str(port)]
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen([sys.executable, *argv], stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            with httpx.Client(base_url=url, timeout=10) as client:
                assert client.get("/v1/worklist?patient=ZZQDOE^JOHN&limit=5",
                                  headers={"X-Request-ID": GOOD}).headers["x-request-id"] == GOOD
                r = client.post("/v1/studies", files=[("files", ("ZZQDOE_JOHN.dcm", b"not dicom", "application/dicom"))],
                                headers={"X-Request-ID": UPLOAD_ID})
                assert r.status_code == 415 and r.headers["x-request-id"] == UPLOAD_ID, r.text
                client.get("/v1/studies/ZZQDOE.JOHN", headers={"X-Request-ID": "ZZQDOE-JOHN-1"})
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    return out.read_text(), err.read_text()


def _json_lines(text: str) -> list[dict]:
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line, or this fails
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys() and TIME.fullmatch(line["time"]), line
        assert set(line) <= {"time", "level", "logger", "message", "request_id", "job_id", "exception", "stack"}, line
    return lines


@pytest.mark.parametrize("argv", [FACTORY, SERVE], ids=["uvicorn --factory", "ctscreen serve"])
def test_json_logs_are_one_object_a_line_with_the_request_s_id(tmp_path, argv):
    """CTSCREEN_LOG_FORMAT=json: the gateway's records and uvicorn's error and access logs are JSON lines on
    standard error (the access log was on standard output, beside the audit trail); the access line and a line
    the upload's parse wrote carry their request's id; no patient's name, from a query, a path, a file name or a
    request id, is in any line."""
    out, err = _gateway_lines(tmp_path, argv, "json")
    lines = _json_lines(err)
    by = {(line["logger"], line.get("request_id")): line for line in lines}
    access = by[("uvicorn.access", GOOD)]
    assert access["level"] == "INFO" and '"GET /v1/worklist? HTTP/1.1" 200' in access["message"], access
    assert by[("gateway.ingest", UPLOAD_ID)]["message"].startswith("refused file#"), lines
    assert '"POST /v1/studies HTTP/1.1" 415' in by[("uvicorn.access", UPLOAD_ID)]["message"]
    assert any(line["logger"] == "uvicorn.error" and "Application startup complete" in line["message"]
               for line in lines), lines
    assert any(line["logger"] == "gateway.main" and line["message"].startswith("gateway up") for line in lines)
    refused = [line for line in lines if "/v1/studies/{study_instance_uid}" in line["message"]]
    assert len(refused) == 1 and NEW_ID.fullmatch(refused[0]["request_id"]), refused
    audit = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {r["request_id"] for r in audit} >= {GOOD, UPLOAD_ID}, audit
    assert "uvicorn" not in out  # standard output: the audit trail (and serve's banner) only
    assert "ZZQ" not in out + err


@pytest.mark.parametrize("argv", [FACTORY, SERVE], ids=["uvicorn --factory", "ctscreen serve"])
def test_text_logs_are_as_they_were_and_end_with_the_request_s_id(tmp_path, argv):
    """The default (``text``): uvicorn's own lines on standard error, its access log on standard output, the
    gateway's lines as uvicorn's defaults (or ``ctscreen serve``'s) leave them; no JSON. A line written while a
    request was answered ends with the last 8 characters of its id (``[req=2e3f4a5b]``: an operator reading a
    replica's text log could not follow one request); the other lines end as they did."""
    out, err = _gateway_lines(tmp_path, argv, None)
    assert "INFO:     Application startup complete.\n" in err, err
    assert "authentication is off" in err and not any(line.startswith("{") for line in err.splitlines())
    assert re.search(r'INFO: +127\.0\.0\.1:\d+ - "GET /v1/worklist\? HTTP/1\.1" 200 OK \[req=2e3f4a5b\]\n', out), out
    assert re.search(r'"POST /v1/studies HTTP/1\.1" 415 Unsupported Media Type \[req=89abcdef\]\n', out), out
    refused = re.search(r'"GET /v1/studies/\{study_instance_uid\} HTTP/1\.1" 400 Bad Request \[req=([0-9a-f]{8})\]\n',
                        out)
    assert refused, out
    audit = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(r["request_id"] == GOOD for r in audit)
    assert any(r["request_id"].endswith(refused[1]) and r["status"] == 400 for r in audit), audit  # a new id's
    assert not any("[req=" in line for line in err.splitlines() if "authentication is off" in line or "startup" in line)
    if argv is SERVE:  # the gateway's info lines are written (not under uvicorn --factory, in text)
        assert re.search(r"INFO gateway\.ingest: refused file#[0-9a-f]+: not_dicom \[req=89abcdef\]\n", err), err
    assert GOOD not in err and "ZZQ" not in out + err


@contextlib.contextmanager
def _text_log() -> Iterator[io.StringIO]:
    """``configure("text")`` on this process's handlers with a console handler on the root logger as ``ctscreen
    serve``'s ``logging.basicConfig`` makes it, standard error a buffer (yielded) meanwhile; every handler it touched
    is put back afterwards. Entered in the test's body: pytest sets its own standard error back between phases."""
    import sys

    from gateway.logs import configure

    stderr, sys.stderr = sys.stderr, io.StringIO()
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    touched = [h for name in (None, "uvicorn", "uvicorn.access") for h in logging.getLogger(name).handlers]
    saved = [(h, list(h.filters), h.formatter) for h in [*touched, logging.lastResort] if h is not None]
    try:
        configure("text")
        configure("text")  # ctscreen serve calls it twice: one suffix, not two
        yield sys.stderr
    finally:
        sys.stderr = stderr
        root.removeHandler(console)
        for handler, filters, formatter in saved:
            handler.filters[:] = filters
            handler.setFormatter(formatter)


def test_a_text_line_ends_with_the_ids_that_are_set_and_a_traceback_follows():
    """In process, through ``configure("text")``: a record of a job's screening ends with ``[job=...]``, one of a
    request with both ids; none set, the line is as it was; with a traceback, the ids end the message's line. The
    gateway's warnings under ``uvicorn --factory`` (no handler on the root logger) go through Python's handler of
    last resort: it shows them too."""
    from gateway.logs import REQUEST_ID

    worker = logging.getLogger("gateway.worker")
    bare = logging.getLogger("tests.no_handler")  # no handler anywhere: the last resort writes its records
    bare.propagate = False
    with _text_log() as err:
        worker.warning("job %s late", "j1")
        job = JOB_ID.set("0123456789abcdef0123456789abcdef")
        worker.warning("job %s done", "j1")
        request = REQUEST_ID.set(GOOD)  # a job retried by its request (a retry's records carry both)
        try:
            worker.warning("job %s queued again", "j1")
            try:
                raise ValueError("the withheld one")
            except ValueError:
                worker.exception("unexpected error")
            bare.warning("held for a while")
        finally:
            JOB_ID.reset(job)
            REQUEST_ID.reset(request)
            bare.propagate = True
    lines = err.getvalue().splitlines()
    assert lines[:4] == ["WARNING gateway.worker: job j1 late", "WARNING gateway.worker: job j1 done [job=89abcdef]",
                         "WARNING gateway.worker: job j1 queued again [req=2e3f4a5b job=89abcdef]",
                         "ERROR gateway.worker: unexpected error [req=2e3f4a5b job=89abcdef]"], lines
    assert lines[4] == "Traceback (most recent call last):" and "ValueError: the withheld one" in lines
    assert lines[-1] == "held for a while [req=2e3f4a5b job=89abcdef]", lines


def test_a_json_line_s_exception_is_the_withheld_one():
    """The last-resort handlers log :func:`gateway.phi.withheld` of an unexpected error: its JSON line has the
    traceback and the exception's type, not its message."""
    from gateway.logs import JsonLines
    from gateway.phi import withheld

    name = "ZZQ" + "DOE^JANE"  # not in the traceback's quoted source line
    try:
        raise ValueError(f"Invalid value for PatientName: {name!r}")
    except ValueError as exc:
        record = logging.LogRecord("gateway.api.errors", logging.ERROR, __file__, 1, "unexpected error on %s %s",
                                   ("GET", "/v1/boom"), (WithheldError := type(withheld(exc)), withheld(exc),
                                                         exc.__traceback__))
    line = json.loads(JsonLines().format(record))
    assert WithheldError.__name__ in line["exception"] and "Traceback" in line["exception"], line
    assert "ValueError (its message is withheld" in line["exception"] and "ZZQ" not in json.dumps(line)
    assert line["message"] == "unexpected error on GET /v1/boom" and line["level"] == "ERROR"


def test_a_start_refused_under_json_logs_says_why_in_a_json_line(tmp_path):
    """A start the app refuses (here: every address, no authentication) ended with a bare text line on standard
    error; under JSON logs it is one JSON line, CRITICAL, and the process still exits non-zero."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    env = {**os.environ, "CTSCREEN_LOG_FORMAT": "json", "CTSCREEN_HOST": "0.0.0.0", "CTSCREEN_DATA_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, *FACTORY, "--port", str(free_port())], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL, env=env)
    assert run.returncode != 0
    lines = _json_lines(run.stderr)
    assert lines[-1]["level"] == "CRITICAL" and lines[-1]["message"].startswith("ctscreen gateway: "), lines
    assert "CTSCREEN_AUTH" in lines[-1]["message"] and "Traceback" not in run.stderr
