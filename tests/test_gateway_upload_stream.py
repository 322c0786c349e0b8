"""A multipart upload is split and screened as it arrives (issue 17): Triton sees the study's first slices
while the rest of the body is still on the wire, and a body cut half-way leaves nothing behind.

Real uvicorn on a free port, real httpx client streaming the body from a generator, the real
``tritonserver`` of the session fixture over gRPC, phantom DICOM. The generator holds the second half
of the study back until Triton has answered a request of this study (its statistics, read over HTTP),
so what is checked is an order of events, never a timing.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from aggregator.schema import CaseResult
from ctscreen.embedded import EmbeddedTriton, free_port
from gateway.main import create_app
from gateway.settings import Settings
from tests.screen_helpers import comparable, phantom_files

pytestmark = [pytest.mark.timeout(600)]

N_SLICES = 24
BOUNDARY = "stream-b0undary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


@pytest.fixture(scope="module")
def study_files(tmp_path_factory) -> list[tuple[str, bytes]]:
    return phantom_files(tmp_path_factory.mktemp("stream"), N_SLICES)


@pytest.fixture(scope="module")
def live(triton: EmbeddedTriton, tmp_path_factory) -> Iterator[tuple[str, Any]]:
    """``(base URL, app)`` of a gateway under uvicorn on the session's Triton."""
    settings = Settings(triton_urls=triton.grpc_url, data_dir=tmp_path_factory.mktemp("gw"), triton_batch_size=2)
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # ready: the worker has seen Triton ready, so an upload is screened ahead
        assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not become ready"
        try:
            if server.started and httpx.get(f"{url}/readyz/triton", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    yield url, app
    server.should_exit = True
    thread.join(30)


def _answered(triton: EmbeddedTriton, model: str = "ct_screen") -> int:
    """Requests Triton has answered for ``model`` (its statistics, over HTTP)."""
    with urllib.request.urlopen(f"http://{triton.http_url}/v2/models/{model}/stats", timeout=10) as r:
        return int(json.load(r)["model_stats"][0]["inference_stats"]["success"]["count"])


def _part(name: str, data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n"
            f'Content-Disposition: attachment; filename="{name}"\r\n\r\n').encode() + data + b"\r\n"


def _wait_result(url: str, job: str, timeout: float = 300) -> CaseResult:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = httpx.get(f"{url}/v1/jobs/{job}", timeout=30).json()
        if doc["state"] in ("done", "failed"):
            assert doc["state"] == "done", doc
            return CaseResult.model_validate(doc["result"])
        time.sleep(0.2)
    raise AssertionError(f"job {job} not done in {timeout} s")


def _eventually(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_triton_answers_the_first_slices_before_the_body_ends(live, triton, study_files) -> None:
    url, _ = live
    half = N_SLICES // 2
    before = _answered(triton)
    seen: list[bool] = []

    def body() -> Iterator[bytes]:
        for name, data in study_files[:half]:
            yield _part(name, data)
        # the rest waits until Triton has answered a request of this study
        deadline = time.monotonic() + 120
        while _answered(triton) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append(_answered(triton) > before)
        for name, data in study_files[half:]:
            yield _part(name, data)
        yield f"--{BOUNDARY}--\r\n".encode()

    r = httpx.post(f"{url}/v1/studies", content=body(), headers={"Content-Type": CONTENT_TYPE}, timeout=300)
    assert r.status_code == 202, r.text
    assert seen == [True], "Triton answered nothing of the study before its upload ended"
    streamed = _wait_result(url, r.json()["job_id"])
    # the same study sent in one piece (a plain multipart form) gives the same result
    whole = httpx.post(f"{url}/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in study_files],
                       timeout=300)
    assert whole.status_code == 202, whole.text
    assert comparable(streamed) == {**comparable(_wait_result(url, whole.json()["job_id"])),
                                    "job_id": streamed.job_id}
    assert streamed.n_slices == N_SLICES


def _studies(url: str) -> int:
    """Study versions the gateway holds (the worklist's total)."""
    return int(httpx.get(f"{url}/v1/worklist", timeout=30).json()["total"])


def _leaves_nothing(app: Any) -> None:
    """What a refused streamed upload must not leave: a guess at work, a parse thread, spooled files, a job."""
    screener, settings = app.state.screener, app.state.settings
    _eventually(lambda: not screener.ahead, "the upload's speculation was not dropped")
    _eventually(lambda: not [t for t in threading.enumerate() if t.name == "ctscreen-parse"],
                "the upload's parse thread is still waiting")
    spool = Path(settings.spool_dir())
    _eventually(lambda: not list(spool.glob("upload-*")), "the upload's spooled files were left")


def test_a_body_cut_half_way_is_refused_and_leaves_nothing(live, study_files) -> None:
    url, app = live
    jobs_before = _studies(url)
    body = b"".join(_part(n, d) for n, d in study_files[: N_SLICES // 2])  # no closing delimiter
    r = httpx.post(f"{url}/v1/studies", content=iter([body]), headers={"Content-Type": CONTENT_TYPE}, timeout=300)
    assert r.status_code == 400, r.text
    assert "closing boundary" in r.json()["message"]
    _leaves_nothing(app)
    assert _studies(url) == jobs_before


def test_a_client_that_leaves_half_way_leaves_nothing(live, study_files) -> None:
    url, app = live
    jobs_before = _studies(url)

    class Gone(Exception):
        pass

    def body() -> Iterator[bytes]:
        for name, data in study_files[: N_SLICES // 2]:
            yield _part(name, data)
        time.sleep(0.5)  # let the gateway parse (and screen) what came
        raise Gone

    with pytest.raises((Gone, httpx.HTTPError)):
        httpx.post(f"{url}/v1/studies", content=body(), headers={"Content-Type": CONTENT_TYPE}, timeout=300)
    _leaves_nothing(app)
    assert _studies(url) == jobs_before


def test_a_study_prepared_as_its_request_is_cancelled_is_released(tmp_path) -> None:
    """The request is cancelled (a shut-down, a client gone) in the loop tick in which its study came out of
    the parse: what the study holds (its guess, its decoded slices) is released, not dropped. The screener
    is a stand-in: the order of two events in one loop tick cannot be arranged through a real one."""
    import asyncio

    from gateway.api.studies import prepare_streamed
    from gateway.uploads import UploadLimits

    released: list[bool] = []

    class Study:
        def release(self) -> None:
            released.append(True)

    class Screener:
        request: asyncio.Task[Any]

        async def prepare(self, sources, *, speculate: bool, streamed: bool, priority: int = 0) -> Study:
            await asyncio.to_thread(lambda: list(sources))
            asyncio.get_running_loop().call_soon(self.request.cancel)  # lands before the route resumes
            return Study()

    async def chunks():
        yield f'--{BOUNDARY}\r\nContent-Disposition: attachment; filename="a"\r\n\r\nxx\r\n--{BOUNDARY}--\r\n'.encode()

    async def go() -> None:
        screener = Screener()
        screener.request = asyncio.ensure_future(
            prepare_streamed(chunks(), CONTENT_TYPE, UploadLimits(), tmp_path, screener, False))  # type: ignore[arg-type]
        with pytest.raises(asyncio.CancelledError):
            await screener.request

    asyncio.run(go())
    assert released == [True]
