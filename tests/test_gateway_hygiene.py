"""Input hygiene (``gateway.uids``): every UID is checked against the DICOM UID grammar before it can name a
file, and a fuzz over the API with invalid UIDs, traversal attempts and oversized headers never gets a 5xx
nor writes outside the data folder (state store and blobs).

Triton is the fake client of ``tests/gateway_app_fakes.py`` (these tests are about the HTTP edge). The
oversized-header test runs the app under a real uvicorn (h11 enforces the header limits, not TestClient).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctscreen.embedded import free_port
from gateway.main import create_app
from gateway.settings import Settings
from gateway.uids import check_uid, is_uid
from tests.gateway_app_fakes import FakeFleet, ct_series
from tests.test_gateway_app_api import STOW_TYPE, related_body

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

TRAVERSALS = ["..", ".", "%2e%2e", "%2E%2E%2F%2E%2E", "..%2F..%2Fetc", "1.2.3%2F..%2F..", "%00", "1.2.3%00",
              "1..2", "01.2", "1.2.", ".1.2", "1.2.3a", "1" * 65, "1.2\\..\\..", "~root", "1.2.3%20", "%C0%AE%C0%AE"]


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """A client on an app whose data folder (state store, blobs) sits inside an otherwise empty ``box``."""
    box = tmp_path_factory.mktemp("box")
    app = create_app(Settings(triton_urls="fake:1", data_dir=box / "results", stow_quiet_period_s=3600),
                     client_factory=FakeFleet())
    with TestClient(app, raise_server_exceptions=False) as client:
        yield box, client


def _outside(box: Path) -> list[Path]:
    return [p for p in box.rglob("*") if not p.is_relative_to(box / "results")]


@pytest.mark.parametrize("uid", TRAVERSALS)
@pytest.mark.parametrize(("method", "template"), [("GET", "/v1/studies/{}"), ("POST", "/v1/studies/{}/complete"),
                                                  ("POST", "/dicomweb/studies/{}")])
def test_bad_uids_in_urls_are_400_and_touch_nothing(box, uid, method, template):
    folder, client = box
    r = client.request(method, template.format(uid), content=related_body([b"x"]), headers={"content-type": STOW_TYPE})
    # 404/405: the path no longer routes; 409: '.' was normalised away and STOW refused the bogus body
    assert r.status_code in (400, 404, 405, 409), (uid, r.status_code, r.text)
    if r.status_code == 400:
        assert r.json()["reason"] == "invalid_uid" and "not a DICOM UID" in r.json()["message"], r.text
    assert _outside(folder) == []


@pytest.mark.parametrize("bad", ["..", "1.2.3/../../../escape", "1.2.840.10008.001"])
def test_stow_instance_with_a_bad_study_uid_is_refused_not_spooled(box, bad):
    folder, client = box
    _, files = ct_series(1, size=32, study_uid=bad)
    r = client.post("/dicomweb/studies", content=related_body([files[0][1]]), headers={"content-type": STOW_TYPE})
    assert r.status_code == 409, r.text
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert _outside(folder) == [] and not list((folder / "results").rglob("escape*"))


def test_upload_with_a_bad_study_uid_is_400(box):
    folder, client = box
    _, files = ct_series(3, size=32, study_uid="../../outside")
    r = client.post("/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in files])
    assert r.status_code == 400 and r.json()["reason"] == "invalid_uid", r.text
    assert _outside(folder) == []


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.one_of(st.text(max_size=80), st.from_regex(r"[0-9.]{1,70}", fullmatch=True)))
def test_uid_grammar_agrees_with_check_uid(value):
    if is_uid(value):
        assert check_uid(value) == value and len(value) <= 64 and ".." not in value and "/" not in value
    else:
        with pytest.raises(ValueError, match="not a DICOM UID"):
            check_uid(value)


def test_fuzzed_path_parameters_never_5xx(box):
    folder, client = box

    @settings(max_examples=40, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=120))
    def check(value: str) -> None:
        r = client.get("/v1/studies/" + quote(value, safe=""))
        assert r.status_code < 500, (value, r.text)
        if not is_uid(value):
            assert r.status_code in (400, 404, 405), (value, r.status_code)

    check()
    assert _outside(folder) == []


# --- oversized headers, under a real uvicorn ---------------------------------------------------------
@pytest.fixture(scope="module")
def live():
    app = create_app(Settings(triton_urls="fake:1"), client_factory=FakeFleet())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize(("name", "size"), [("X-Filename", 200_000), ("Authorization", 200_000),
                                            ("Content-Type", 100_000), ("X-Junk", 1_000_000)])
def test_oversized_headers_are_refused_without_5xx(live, name, size):
    value = "Bearer " + "A" * size if name == "Authorization" else "a" * size
    try:
        r = httpx.post(f"{live}/v1/studies", content=b"x", headers={name: value}, timeout=30)
    except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
        # the server answered 400 and closed the connection on the oversized head; a client still
        # writing that head (a loaded machine) sees the close as a reset or broken pipe instead
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])


def test_long_but_legal_headers_get_a_clear_answer(live):
    _, files = ct_series(3, size=32)
    r = httpx.post(f"{live}/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in files],
                   headers={"X-Filename": "f" * 8000}, timeout=30)
    assert r.status_code == 202, r.text


def test_a_file_named_after_a_patient_cannot_be_recovered_from_its_log_reference():
    """Log lines named a refused file by a plain SHA-256 of its name: a review recovered '8241937/IM0001.dcm'
    (a record number) from it in 17 s by trying every 7-digit number. The digest is keyed now, with a key of the
    process: stable within it (one upload's lines go together), unknown outside it."""
    import hashlib
    import subprocess
    import sys

    from gateway.phi import file_ref

    name = "8241937/IM0001.dcm"
    ref = file_ref(name)
    assert ref == file_ref(name) and ref[5:] != hashlib.sha256(name.encode()).hexdigest()[:10]
    other = subprocess.run([sys.executable, "-c", f"from gateway.phi import file_ref; print(file_ref({name!r}))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert other.startswith("file#") and other != ref


def test_the_access_log_leaves_query_strings_out(tmp_path, capfd):
    """uvicorn's access log wrote each request line as sent: a client's ``?patient=...`` reached the log, on a 401
    or 404 too, and a name a client put in a path the gateway refused (``/v1/studies/DOE.JOHN``). A refused
    request's path is its route's template now. A real uvicorn with its default logging (what ``uvicorn --factory`` and the Helm chart run)."""
    from gateway.main import create_app
    from gateway.settings import Settings
    from tests.conftest import free_port
    from tests.gateway_app_fakes import FakeFleet

    port = free_port()
    app = create_app(Settings(triton_urls="fake:1", data_dir=tmp_path, shutdown_grace_s=1), client_factory=FakeFleet())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        for path in ("/v1/worklist?patient=ZZQDOE&limit=5", "/nowhere?name=ZZQDOE", "/healthz?mrn=ZZQ8241937",
                     # a path the gateway refuses (a privacy review's client put the name in a study UID)
                     "/v1/studies/ZZQDOE.JOHN", "/nowhere/ZZQDOE", "/v1/jobs/ZZQDOE-JOHN/deliveries",
                     "/v1/studies/ZZQDOE.JOHN/"):  # a slash redirect (307) answers before any route refuses it
            httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    finally:
        server.should_exit = True
        thread.join(30)
    out = capfd.readouterr()
    logged = out.out + out.err
    assert "GET /v1/worklist? HTTP/1.1" in logged and "GET /healthz? HTTP/1.1" in logged, logged[-2000:]
    assert '"GET /v1/studies/{study_instance_uid} HTTP/1.1" 400' in logged, logged[-2000:]
    assert '"GET /v1/jobs/{job_id}/deliveries HTTP/1.1" 4' in logged and '"GET (path withheld) HTTP/1.1" 404' in logged
    assert "ZZQ" not in logged
