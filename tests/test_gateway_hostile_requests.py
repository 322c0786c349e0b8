"""Requests a reviewer sent to a running gateway that got a 503 and a traceback instead of a specific
answer, and what the audit trail recorded about refusals.

``TestClient(app)`` with the real routes, store, uploads and audit trail; Triton is the fake client of
``tests/gateway_app_fakes.py`` (none of these requests reaches it).
"""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
from fastapi.testclient import TestClient

from gateway.main import create_app
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet

LONG_BOUNDARY = "B" * 300  # python-multipart refuses boundaries over 256 characters (RFC 2046: 70)


def _client(tmp_path, **kw) -> TestClient:
    settings = Settings(triton_urls="fake:1", data_dir=tmp_path / "data", audit_log_file=tmp_path / "audit.jsonl", **kw)
    return TestClient(create_app(settings, client_factory=FakeFleet()), raise_server_exceptions=False)


def _audit(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("path", "content_type"), [
    ("/v1/studies", f"multipart/form-data; boundary={LONG_BOUNDARY}"),
    ("/dicomweb/studies", f'multipart/related; type="application/dicom"; boundary={LONG_BOUNDARY}'),
])
def test_an_overlong_multipart_boundary_is_a_bad_upload(tmp_path, path, content_type, caplog):
    body = f"--{LONG_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nx\r\n--{LONG_BOUNDARY}--\r\n".encode()
    with _client(tmp_path) as client:
        r = client.post(path, content=body, headers={"Content-Type": content_type})
    assert r.status_code == 400, r.text
    assert r.json()["reason"] == "bad_upload" and "300 characters" in r.json()["message"]
    assert not [rec for rec in caplog.records if rec.exc_info], "no traceback for a bad request"


@pytest.mark.parametrize("query", ["received_to=9999-12-31", "received_from=0001-01-01",
                                   "received_from=0001-01-01&received_to=9999-12-31"])
def test_the_worklist_takes_the_first_and_last_days_of_the_calendar(tmp_path, query):
    with _client(tmp_path) as client:
        r = client.get(f"/v1/worklist?{query}")
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == []


def test_a_refusal_is_audited_with_its_reason(tmp_path):
    with _client(tmp_path) as client:
        assert client.post("/v1/studies", content=b"not dicom at all" * 4,
                           headers={"Content-Type": "application/dicom"}).json()["reason"] == "not_dicom"
        assert client.get("/v1/jobs/" + "0" * 32).status_code == 404
        assert client.get("/v1/worklist?limit=0").status_code == 422
    by_action = {r["action"]: r for r in _audit(tmp_path)}
    assert by_action["POST /v1/studies"]["reason"] == "not_dicom"
    assert by_action["GET /v1/jobs/{job_id}"]["reason"] == "not_found"
    assert by_action["GET /v1/worklist"]["reason"] == "bad_request"


def test_an_unexpected_error_is_answered_503_logged_once_and_audited_as_answered(tmp_path, monkeypatch, caplog):
    from gateway.store.worklist import Worklist

    async def broken(*args, **kwargs):  # a bug whose message quotes what it choked on
        name = "^".join(("DOE", "JANE"))  # not in the traceback's source line
        raise RuntimeError(f"a bug on PatientName {name!r}")

    monkeypatch.setattr(Worklist, "page", broken)
    caplog.set_level(logging.ERROR)
    with _client(tmp_path) as client:
        r = client.get("/v1/worklist")
        metrics = client.get("/metrics").text
    assert r.status_code == 503 and r.json()["reason"] == "internal_error", r.text
    assert r.headers["retry-after"] == "5" and "RuntimeError" in r.json()["message"]
    assert 'ctscreen_errors_total{reason="internal_error"} 1.0' in metrics
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1, [rec.getMessage() for rec in tracebacks]
    assert "Traceback" in caplog.text and "RuntimeError" in caplog.text and "in broken" in caplog.text
    assert "DOE^JANE" not in caplog.text and "DOE^JANE" not in r.text  # its message is withheld
    (record,) = [r for r in _audit(tmp_path) if r["action"] == "GET /v1/worklist"]
    assert (record["status"], record["reason"]) == (503, "internal_error")


@pytest.mark.parametrize(("api_docs", "pages"), [(True, False), (True, True), (False, True), (None, None)])
def test_the_api_schema_is_open_like_the_probes_or_not_served(tmp_path, api_docs, pages):
    """/openapi.json by default; /docs and /redoc (scripts from a CDN, in the origin that holds the web page's
    sign-in) only when asked for."""
    keyfile = tmp_path / "keys.json"
    keyfile.write_text('{"keys": []}')
    asked = {k: v for k, v in (("api_docs", api_docs), ("api_docs_pages", pages)) if v is not None}
    schema = api_docs is not False
    with _client(tmp_path, auth_api_keys_file=keyfile, **asked) as client:
        assert client.get("/v1/worklist").status_code == 401  # auth is on
        assert client.get("/openapi.json").status_code == (200 if schema else 404)
        for path in ("/docs", "/redoc"):
            assert client.get(path).status_code == (200 if schema and pages else 404), path
        assert client.get("/healthz").status_code == 200


def test_a_stream_that_breaks_after_its_answer_began_is_audited_as_an_error(tmp_path, monkeypatch):
    """The worklist's event stream has sent 200 and its first lines when the store fails: the audit record
    keeps the status the client got and says ``error``, ``broken_mid_answer`` (it said 200 ``ok``)."""
    from gateway.store.worklist import Worklist

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Worklist, "events_after", broken)
    with _client(tmp_path) as client, client.stream("GET", "/v1/worklist/events") as r:
        assert r.status_code == 200
        with contextlib.suppress(Exception):  # the transport's error for an answer cut short
            for _ in r.iter_bytes():
                pass
    (record,) = [r for r in _audit(tmp_path) if r["action"] == "GET /v1/worklist/events"]
    assert (record["status"], record["outcome"], record["reason"]) == (200, "error", "broken_mid_answer")


def test_a_job_failing_on_a_bug_is_logged_with_its_traceback_and_not_its_message(tmp_path, monkeypatch, caplog):
    """The worker's last resort logged the exception with its message, which may quote a header value."""
    from gateway.screening import Screener
    from tests.gateway_app_fakes import ct_series, wait_job

    async def broken(*args, **kwargs):
        name = "^".join(("DOE", "JANE"))  # not in the traceback's source line
        raise ValueError(f"Invalid value for VR PN: {name!r}")

    monkeypatch.setattr(Screener, "screen", broken)
    caplog.set_level(logging.ERROR)
    with _client(tmp_path, screen_ahead=False) as client:
        _, files = ct_series(4, size=64)
        r = client.post("/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in files])
        job = wait_job(client, r.json()["job_id"])
    assert job["state"] == "failed" and job["error"]["reason"] == "internal", job
    assert "Traceback" in caplog.text and "ValueError" in caplog.text and "in broken" in caplog.text
    assert "DOE^JANE" not in caplog.text and "DOE^JANE" not in json.dumps(job)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_nul_in_a_file_name_or_a_label_is_kept_out_of_the_database(tmp_path, request, backend):
    """PostgreSQL's text refuses a NUL, which SQLite takes: a part named ``a\\x00b.dcm`` got 503 internal_error
    there (its name is recorded with the instance), and a study whose Accession Number held a NUL was screened but
    broke every worklist page showing it (503, the labels never recorded, read again at every page) until
    retention removed it. Names keep ``?`` for control characters; labels lose them. Real PostgreSQL 15."""
    from tests.gateway_app_fakes import ct_series, edited, wait_job

    def labels(ds):
        ds.AccessionNumber, ds.SeriesDescription = "AB\x00CD", "CHEST\x00\x01 LUNG"

    kw = {"database_url": request.getfixturevalue("pg_url")} if backend == "postgresql" else {}
    labelled = edited(ct_series(6, size=64)[1], labels)
    boundary = "nulnames"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="s\x00{i}.dcm"\r\n'.encode("latin-1")
        + b"Content-Type: application/dicom\r\n\r\n" + data + b"\r\n" for i, (_, data) in enumerate(labelled))
    body += f"--{boundary}--\r\n".encode()
    with _client(tmp_path, **kw) as client:
        r = client.post("/v1/studies", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 202, r.text
        view = wait_job(client, r.json()["job_id"], timeout=30)
        assert view["state"] == "done", view
        page = client.get("/v1/worklist")
        assert page.status_code == 200, page.text
        [row] = page.json()["rows"]
        assert row["labels"]["accession_number"] == "ABCD" and row["labels"]["series_description"] == "CHEST LUNG", row
        assert client.get("/v1/worklist").status_code == 200  # the labels recorded: read from the store now


@pytest.mark.parametrize("failure", ["unreachable", "dropped", "bug"])
def test_an_upload_while_the_database_is_away_is_a_503_to_retry_not_an_internal_error(tmp_path, monkeypatch,
                                                                                      caplog, failure):
    """While PostgreSQL restarted, an upload got 503 internal_error and a traceback in the log (a review's run);
    STOW already answered such an outage 0xA700. The route's store calls now answer 503 store_unavailable with
    Retry-After, in one log line; a database error that is no outage stays the last resort's. The outage is
    simulated here (the store's call raises what SQLAlchemy and the store raise in one)."""
    from sqlalchemy.exc import OperationalError

    from gateway.store.store import Store, StoreUnreachable
    from tests.gateway_app_fakes import ct_series

    errors = {"unreachable": StoreUnreachable("The state store cannot be reached (ConnectionRefusedError)."),
              "dropped": OperationalError("COMMIT", {}, ConnectionResetError(), connection_invalidated=True),
              "bug": OperationalError("SELECT", {}, ValueError("no such column"))}

    async def away(*args, **kwargs):
        raise errors[failure]

    monkeypatch.setattr(Store, "accept_upload", away)
    caplog.set_level(logging.INFO)
    _, files = ct_series(8, size=64)
    with _client(tmp_path) as client:
        r = client.post("/v1/studies", files=[("files", (name, data, "application/dicom")) for name, data in files])
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    if failure == "bug":
        assert r.status_code == 503 and r.json()["reason"] == "internal_error" and tracebacks, r.text
        return
    assert r.status_code == 503 and r.json()["reason"] == "store_unavailable", r.text
    assert r.headers["retry-after"] and not tracebacks
    assert json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])["reason"] == "store_unavailable"


def test_open_event_streams_wait_out_a_database_restart(tmp_path, postgres, pg_url, caplog):
    """PostgreSQL stopped (a restart, a fail-over) while a job's event stream and the worklist's were open: each
    stream's next read raised, the log got "unexpected error on GET /v1/jobs/{id}/events" with a traceback, and
    the stream was cut off mid-answer (a reader had to reconnect, ``ctscreen screen`` to ask again). The streams
    now wait for the store, one log line for all of them when it goes and one when it is back, and go on: the
    job (its lease lapsed meanwhile, resumed by this replica) ends done on the same stream. The real PostgreSQL,
    down for 4 s; Triton is the fake (0.3 s a batch of 2: 40 slices take about 6 s)."""
    import threading
    import time

    from tests.gateway_app_fakes import ct_series, wait_job

    settings = Settings(triton_urls="fake:1", data_dir=tmp_path / "data", database_url=pg_url, lease_s=3,
                        triton_batch_size=2, triton_max_inflight=1, progress_interval_s=0.1, screen_ahead=False,
                        events_keepalive_s=1)
    _, files = ct_series(40, size=64)
    caplog.set_level(logging.INFO)
    seen: dict[str, list[str]] = {"job": [], "worklist": []}
    with TestClient(create_app(settings, client_factory=FakeFleet(**{"fake:1": {"delay": 0.3}}))) as client:
        r = client.post("/v1/studies", files=[("files", (name, data, "application/dicom")) for name, data in files])
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]

        def follow(name: str, path: str) -> None:
            try:
                with client.stream("GET", path) as answer:
                    for line in answer.iter_lines():
                        seen[name].append(line)
                        if line.startswith("data:") and '"state": "done"' in line:
                            return  # the worklist's stream says the job is done (the job's ends by itself)
            except Exception as exc:  # noqa: BLE001 - what the reader met is the finding
                seen[name].append(f"raised {exc!r}")

        readers = [threading.Thread(target=follow, args=("job", f"/v1/jobs/{job_id}/events"), daemon=True),
                   threading.Thread(target=follow, args=("worklist", "/v1/worklist/events"), daemon=True)]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + 30
        while not (seen["worklist"] and any(line.startswith("event: progress") for line in seen["job"])):
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
        postgres.restart(away_s=4.0)
        for reader in readers:
            reader.join(60)
            assert not reader.is_alive(), seen
        view = wait_job(client, job_id, timeout=30)
    assert view["state"] == "done" and view["attempts"] == 2, view  # the lease lapsed while the store was away
    assert seen["job"][-2] == "event: done", seen["job"][-5:]
    assert not [line for lines in seen.values() for line in lines if line.startswith("raised")], seen
    assert not [rec for rec in caplog.records if rec.exc_info], [rec.getMessage() for rec in caplog.records if rec.exc_info]
    logged = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("event streams:")]
    assert len(logged) == 2 and "answers again" in logged[1], logged
