"""STOW-RS durability: an instance answered 200 is never lost (``gateway/stow.py``).

With ``CTSCREEN_RESULTS_DIR`` set, accepted instances are on disk before the answer, a study still
waiting out its quiet period at shut-down is screened by the next app on the same folder (with every
instance), a submission that fails unexpectedly is retried rather than dropped, and the files are
removed once the study's job has finished. Without it, the loss at shut-down is logged at WARNING.

One-layer tests: Triton is the fake client of ``tests/gateway_app_fakes.py`` (a mock; these tests are
about the gateway's buffering, the real inference path is ``tests/test_e2e_gateway.py``). DICOM parsing,
the job store, its spool and the case rule are the real ones.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fastapi.testclient import TestClient

from gateway.main import create_app
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet, ct_series
from tests.test_gateway_app_api import _related, _wait

STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'


def _app(quiet_s: float, results_dir: Path | None):
    settings = Settings(triton_urls="fake:1", stow_quiet_period_s=quiet_s, results_dir=results_dir)
    return create_app(settings, client_factory=FakeFleet())


def _stow(client: TestClient, files) -> None:
    r = client.post("/dicomweb/studies", content=_related([d for _, d in files]), headers={"content-type": STOW_TYPE})
    assert r.status_code == 200, r.text


def _screened(client: TestClient, uid: str, timeout: float = 15.0) -> dict:
    """The finished job of study ``uid`` (waits for the quiet period and the screening)."""
    deadline = time.monotonic() + timeout
    while (view := client.get(f"/v1/studies/{uid}").json()).get("state") not in ("done", "failed"):
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    return _wait(client, view["job_id"])


def _gone(folder: Path, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not folder.exists()


def test_accepted_instances_survive_a_restart_and_are_screened(tmp_path):
    uid, files = ct_series(8, lesion=(2, 3, 4))
    with TestClient(_app(60.0, tmp_path)) as client:
        _stow(client, files[:5])
        _stow(client, files[5:])
        assert client.get(f"/v1/studies/{uid}").json()["state"] == "receiving"
        assert len(list((tmp_path / "stow").glob("*/*.dcm"))) == 8  # on disk before the 200
    # stopped inside the quiet period: not screened (it might have been incomplete), kept on disk
    assert len(list((tmp_path / "stow").glob("*/*.dcm"))) == 8
    with TestClient(_app(0.2, tmp_path)) as client:
        job = _screened(client, uid)
        assert job["state"] == "done", job
        assert job["files"] == 8 and job["slices_total"] == 8
        assert job["origin"] == "stow"
        assert job["result"]["verdict"] == "positive"
        assert _gone(next(iter((tmp_path / "stow").iterdir()), tmp_path / "stow" / "none"))
    assert list((tmp_path / "stow").iterdir()) == []


def test_failing_submission_is_retried_not_dropped(tmp_path, caplog):
    uid, files = ct_series(6, lesion=(1, 2, 3), size=128)
    with TestClient(_app(0.1, tmp_path)) as client:
        store = client.app.state.store
        real, calls = store.submit, []

        def flaky(*args, **kwargs):
            calls.append(1)
            if len(calls) <= 2:
                raise RuntimeError("disk hiccup")
            return real(*args, **kwargs)

        store.submit = flaky
        with caplog.at_level(logging.ERROR, logger="gateway.stow"):
            _stow(client, files)
            job = _screened(client, uid)
        assert len(calls) == 3
        assert job["state"] == "done" and job["files"] == 6, job
        assert sum("could not be submitted" in r.getMessage() for r in caplog.records) == 2
        assert _gone(tmp_path / "stow" / uid)


def test_without_results_dir_the_loss_is_logged(caplog):
    uid, files = ct_series(3, size=128)
    with caplog.at_level(logging.WARNING, logger="gateway.stow"):
        with TestClient(_app(60.0, None)) as client:
            _stow(client, files)
    lost = [r for r in caplog.records if r.levelno == logging.WARNING and "LOST" in r.getMessage()]
    assert len(lost) == 1
    assert "3 accepted" in lost[0].getMessage() and "1 studies" in lost[0].getMessage()
    assert uid in lost[0].getMessage()
