"""``ctscreen screen``'s client (``gateway.client``) when the job cannot be read, or the gateway goes away.

The gateway is the real app in ``TestClient`` (an ``httpx.Client``), with API keys on; Triton is the fake
client of ``tests/gateway_app_fakes.py``. The restart case wraps that client in one whose first calls
fail as a gateway being restarted does (connection refused): no real process is restarted here.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from gateway import client as screen_client
from gateway import keys as keys_cli
from gateway.main import create_app
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet, ct_series


def _key(keyfile: Path, name: str, scopes: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        keys_cli.main(["--file", str(keyfile), "add", name, "--scopes", *scopes])
    return out.getvalue().strip()


@pytest.fixture
def study(tmp_path) -> Path:
    folder = tmp_path / "study"
    folder.mkdir()
    for name, data in ct_series(6, lesion=(1, 2, 3), size=64)[1]:
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def gateway(tmp_path):
    keyfile = tmp_path / "keys.json"
    settings = Settings(triton_urls="fake:1", data_dir=tmp_path / "data", auth_api_keys_file=keyfile)
    keys = {"write": _key(keyfile, "uploader", ["studies:write"]), "admin": _key(keyfile, "robot", ["admin"])}
    with TestClient(create_app(settings, client_factory=FakeFleet())) as client:
        yield client, keys


def test_a_key_that_may_upload_but_not_read_ends_at_once_naming_the_job(gateway, study):
    """It polled a 403 twice a second for an hour."""
    client, keys = gateway
    client.headers["X-API-Key"] = keys["write"]
    out = screen_client.screen_path(client, study, quiet=True, max_wait_s=60)
    assert out.job_id and out.result is None
    assert out.error["reason"] == "insufficient_scope", out.error
    assert out.job_id in out.error["message"] and "results:read" in out.error["message"]


class _Restarting:
    """The app's client, refusing connections for its first ``down`` calls (a gateway being restarted)."""

    def __init__(self, inner: TestClient, down: int) -> None:
        self.inner, self.down = inner, down

    def _maybe_down(self) -> None:
        if self.down > 0:
            self.down -= 1
            raise httpx.ConnectError("connection refused")

    def get(self, url: str, **kw):
        self._maybe_down()
        return self.inner.get(url, **kw)

    def stream(self, method: str, url: str, **kw):
        self._maybe_down()
        return self.inner.stream(method, url, **kw)

    def post(self, url: str, **kw):
        return self.inner.post(url, **kw)


class _Revoked(_Restarting):
    """The app's client whose key is refused once the upload is accepted (revoked, or a token expired)."""

    def _maybe_down(self) -> None:
        self.inner.headers["X-API-Key"] = "cts_000000000000_revoked"


def test_a_credential_refused_after_the_upload_ends_at_once_naming_the_job(gateway, study):
    client, keys = gateway
    client.headers["X-API-Key"] = keys["admin"]
    out = screen_client.screen_path(_Revoked(client, down=0), study, quiet=True, max_wait_s=60)
    assert out.error["reason"] == "unauthorized", out.error
    assert out.job_id in out.error["message"] and "refused" in out.error["message"]


def test_an_upload_without_a_credential_names_ctscreen_token(gateway, study, monkeypatch, capsys):
    """``ctscreen screen`` (and ``ctscreen send``) against a gateway with authentication, $CTSCREEN_TOKEN unset,
    said only the gateway's words, "send 'Authorization: Bearer <token or API key>'": a header the command's
    user never writes. A credential sent and refused keeps the gateway's words alone (it is set, and wrong)."""
    from gateway import cli
    from gateway.cli import screen_main, send_main

    client, keys = gateway
    for module in (screen_client, cli):  # the app keeps running for the last upload below
        monkeypatch.setattr(module, "http_client", lambda url, timeout: contextlib.nullcontext(client))
    out = screen_client.screen_path(client, study, quiet=True, max_wait_s=60)
    assert out.error["reason"] == "unauthorized", out.error
    assert out.error["message"].startswith("Authentication required: send 'Authorization: Bearer")
    assert out.error["message"].endswith("The ctscreen commands send $CTSCREEN_TOKEN, which is not set: set it to "
                                         "an API key (ctscreen keys add) or an access token.")
    assert screen_main([str(study), "--quiet", "--url", "http://testserver"]) == 1
    assert "$CTSCREEN_TOKEN, which is not set" in capsys.readouterr().out
    assert send_main(["0" * 32, "--to", "pacs", "--url", "http://testserver"]) == 1
    assert "$CTSCREEN_TOKEN, which is not set" in capsys.readouterr().err
    client.headers["X-API-Key"] = "cts_000000000000_unknown"
    out = screen_client.screen_path(client, study, quiet=True, max_wait_s=60)
    assert out.error == {"reason": "unauthorized", "message": "The API key is unknown or revoked."}


def test_a_gateway_restarting_while_a_job_runs_is_asked_again(gateway, study, monkeypatch):
    """It ended in a ConnectError traceback, without the job id."""
    client, keys = gateway
    client.headers["X-API-Key"] = keys["admin"]
    monkeypatch.setattr(screen_client.time, "sleep", lambda s: None)
    out = screen_client.screen_path(_Restarting(client, down=4), study, quiet=True, max_wait_s=60)
    assert out.error is None and out.result is not None and out.result["job_id"] == out.job_id


def test_a_gateway_that_stays_away_ends_the_wait_with_the_job_id(gateway, study, monkeypatch):
    client, keys = gateway
    client.headers["X-API-Key"] = keys["admin"]
    clock = [0.0]
    monkeypatch.setattr(screen_client.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(screen_client.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    out = screen_client.screen_path(_Restarting(client, down=10**6), study, quiet=True, max_wait_s=3600)
    assert out.error["reason"] == "unreachable" and out.job_id in out.error["message"]


class _AnswerLost(_Restarting):
    """The app's client whose first upload reaches the gateway, is accepted, and its answer is lost (a connection
    reset after the commit, a proxy's timeout)."""

    def __init__(self, inner: TestClient) -> None:
        super().__init__(inner, down=0)
        self.accepted: list[str] = []

    def post(self, url: str, **kw):
        answer = self.inner.post(url, **kw)
        if not self.accepted:
            self.accepted.append(answer.json()["job_id"])
            raise httpx.ReadError("connection reset by peer")
        return answer


def test_an_upload_whose_answer_was_lost_is_sent_again_under_its_key_and_screened_once(gateway, study, monkeypatch):
    """``ctscreen screen`` said "upload not accepted" when the connection broke, though the gateway may have
    accepted the study (and sent again by hand, it was a second version, screened and reported twice). It now
    sends it again under the same Idempotency-Key, and the gateway answers the job it made."""
    client, keys = gateway
    client.headers["X-API-Key"] = keys["admin"]
    monkeypatch.setattr(screen_client.time, "sleep", lambda s: None)
    lossy = _AnswerLost(client)
    out = screen_client.screen_path(lossy, study, quiet=True, max_wait_s=60)
    assert out.error is None and out.job_id == lossy.accepted[0], out.error
    uid = client.get(f"/v1/jobs/{out.job_id}").json()["study_instance_uid"]
    assert client.get(f"/v1/studies/{uid}").json()["version"] == 1


def test_an_empty_folder_among_several_studies_is_one_error_row(gateway, study, tmp_path, monkeypatch):
    """An empty folder aborted the whole run, after the studies before it had been screened."""
    client, keys = gateway
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(screen_client, "http_client", lambda url, timeout: client)
    client.headers["X-API-Key"] = keys["admin"]
    outcomes = screen_client.screen_paths("http://testserver", [study, empty], quiet=True)
    assert outcomes[0].error is None and outcomes[0].result is not None
    assert outcomes[1].error == {"reason": "no_files", "message": f"{empty}: no file to upload"}


def test_ctscreen_screen_priority_reaches_the_job(gateway, study, monkeypatch, capsys):
    """``ctscreen screen --priority urgent`` uploads with ``?priority=urgent``: the job is taken before routine ones."""
    from gateway.cli import screen_main

    client, keys = gateway
    monkeypatch.setattr(screen_client, "http_client", lambda url, timeout: client)
    client.headers["X-API-Key"] = keys["admin"]
    assert screen_main([str(study), "--priority", "urgent", "--json", "--url", "http://testserver"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert client.get(f"/v1/jobs/{result['job_id']}").json()["priority"] == "urgent"


def test_a_path_that_is_neither_file_nor_folder_is_named_as_such():
    with pytest.raises(screen_client.CliError, match="not a file or a folder"):
        screen_client.collect_files(Path("/dev/null"))


def test_an_upload_answered_503_with_retry_after_goes_again(gateway, study, monkeypatch):
    """The database restarting (503 store_unavailable, Retry-After) ended ``ctscreen screen``'s study with an
    error although the gateway had said when to come back; only 429 was tried again. The outage is the store's
    accept_upload refusing twice (as it does while PostgreSQL is away), in the real app."""
    from gateway.store.store import Store, StoreUnreachable

    client, keys = gateway
    client.headers["X-API-Key"] = keys["admin"]
    real, refusals, waits = Store.accept_upload, [2], []

    async def away_then_back(self, *args, **kwargs):
        if refusals[0]:
            refusals[0] -= 1
            raise StoreUnreachable("The state store cannot be reached (ConnectionRefusedError).")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "accept_upload", away_then_back)
    monkeypatch.setattr(screen_client.time, "sleep", waits.append)
    out = screen_client.screen_path(client, study, quiet=True, max_wait_s=60)
    assert out.error is None and out.result is not None, out.error
    assert refusals == [0] and waits[:2] == [5.0, 5.0]


@pytest.fixture
def healthz_server():
    """A real HTTP server on a free port answering ``GET /healthz``; yields its URL and the Authorization
    headers it was sent (the newline case fails in h11, on the wire, not in ``TestClient``)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_a_token_read_from_a_file_with_its_newline_is_sent_without_it(healthz_server, monkeypatch):
    """The chart's README wrote the helm-test key with ``> helm-test.key``; the Secret kept the newline and
    ``ctscreen screen`` said no gateway answered (h11's LocalProtocolError)."""
    url, seen = healthz_server
    monkeypatch.setenv("CTSCREEN_TOKEN", "ctk_abc.def\n")
    with screen_client.http_client(url, 5.0) as client:
        assert client.get("/healthz").status_code == 200
    assert seen == ["Bearer ctk_abc.def"]


def test_a_token_no_header_can_carry_is_named_not_taken_for_an_absent_gateway(healthz_server, study, monkeypatch,
                                                                              capsys):
    from gateway.cli import screen_main

    url, seen = healthz_server
    monkeypatch.setenv("CTSCREEN_TOKEN", "ctk_abc\n.def")
    assert screen_main([str(study), "--quiet", "--url", url]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "ctscreen screen: $CTSCREEN_TOKEN holds a character an HTTP header cannot carry ('\\n'); "
        "set it to the token or API key alone"]
    assert seen == []
