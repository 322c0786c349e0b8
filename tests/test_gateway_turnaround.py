"""Time to verdict: the waits before a study's screening are in its result, its metric and its worklist row.

A result's ``timings`` carry ``receive_s`` (first instance -> job created), ``quiet_s`` (last instance
-> job created) and ``queued_s`` (job queued -> claimed, summed over tries); ``total_s`` runs from the job
created. ``ctscreen_study_turnaround_seconds{origin}`` runs from the last instance (an upload: accepted)
to the verdict, and the worklist's Turnaround from its Received column. The app tests use the real
intake, store, worker and sweeper with the fake Triton of ``tests/gateway_app_fakes.py``; the store test
runs on real SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from gateway.main import create_app
from gateway.settings import Settings
from gateway.store import Store
from gateway.store.migrate import upgrade
from gateway.store.waits import study_waits
from tests.gateway_app_fakes import FakeFleet, ct_series, wait_job

STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'


def _related(parts: list[bytes]) -> bytes:
    return b"".join(b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts) \
        + b"--b0undary--\r\n"


def _histogram(metrics: str, origin: str) -> tuple[float, float]:
    """``(count, sum)`` of ``ctscreen_study_turnaround_seconds{origin}`` (routine studies)."""
    def value(kind: str) -> float:
        found = re.search(rf'^ctscreen_study_turnaround_seconds_{kind}{{origin="{origin}",priority="routine"}} (\S+)$',
                          metrics, re.M)
        assert found, metrics[:2000]
        return float(found.group(1))
    return value("count"), value("sum")


def _row(client: TestClient, job_id: str) -> dict:
    (row,) = [r for r in client.get("/v1/worklist").json()["rows"] if r["job_id"] == job_id]
    return row


def test_a_stow_study_counts_its_arrival_and_quiet_period():
    """Two STOW-RS requests 0.6 s apart, a quiet period of 1 s: the result says how long the study arrived
    and went quiet before its job; the turnaround metric and the worklist count that time, which the
    total (from the job created) leaves out."""
    uid, files = ct_series(6, lesion=[0, 1, 2])
    with TestClient(create_app(Settings(triton_urls="fake:1", stow_quiet_period_s=1.0, sweep_interval_s=0.1),
                               client_factory=FakeFleet())) as client:
        for chunk in (files[:3], files[3:]):
            r = client.post(f"/dicomweb/studies/{uid}", content=_related([d for _, d in chunk]),
                            headers={"Content-Type": STOW_TYPE})
            assert r.status_code == 200
            time.sleep(0.6)
        deadline = time.monotonic() + 20
        while (study := client.get(f"/v1/studies/{uid}").json())["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline, study
            time.sleep(0.05)
        view = wait_job(client, study["job_id"])
        t = view["result"]["timings"]
        assert view["result"]["schema_version"] == "1.4.0"
        assert 1.0 <= t["quiet_s"] < 3.0  # the quiet period (the sweeper looks every 0.1 s)
        assert t["receive_s"] >= t["quiet_s"] + 0.5  # the second request came 0.6 s after the first
        assert t["queued_s"] is not None and 0 <= t["queued_s"] <= t["total_s"]
        count, total = _histogram(client.get("/metrics").text, "stow")
        assert count == 1 and total >= t["quiet_s"] + t["total_s"] - 0.05
        row = _row(client, view["job_id"])
        received, finished = (datetime.fromisoformat(row[k]).timestamp() for k in ("received_at", "finished_at"))
        assert row["time_s"] == pytest.approx(finished - received, abs=0.02)  # Turnaround runs from Received
        assert row["time_s"] >= t["receive_s"] + t["total_s"] - 0.05


def test_an_upload_waiting_for_the_slot_says_how_long_it_was_queued():
    """One slot, two uploads: the second waits while the first is screened (about 0.8 s of fake inference);
    its queued_s says so and is part of its total_s. An upload neither arrives over time nor goes quiet."""
    fleet = FakeFleet(**{"fake:1": {"delay": 0.2}})
    settings = Settings(triton_urls="fake:1", max_concurrent_studies=1, max_queued_studies=2, screen_ahead=False,
                        triton_batch_size=2, triton_max_inflight=1)
    with TestClient(create_app(settings, client_factory=fleet)) as client:
        _, files = ct_series(8)
        upload = [("files", (name, data, "application/dicom")) for name, data in files]
        first, second = (client.post("/v1/studies", files=upload) for _ in range(2))
        assert first.status_code == second.status_code == 202
        views = [wait_job(client, r.json()["job_id"]) for r in (first, second)]
        for view in views:
            t = view["result"]["timings"]
            assert t["receive_s"] == 0 and t["quiet_s"] == 0
            assert t["queued_s"] is not None and t["queued_s"] <= t["total_s"]
        waited = views[1]["result"]["timings"]["queued_s"]
        assert waited >= 0.5, views[1]["result"]["timings"]  # behind the first study's 4 batches of 0.2 s
        count, total = _histogram(client.get("/metrics").text, "upload")
        assert count == 2 and total >= sum(v["result"]["timings"]["total_s"] for v in views) - 0.1
        assert _histogram(client.get("/metrics").text, "stow") == (0, 0)
        row = _row(client, views[1]["job_id"])
        assert row["time_s"] == pytest.approx(views[1]["result"]["timings"]["total_s"], abs=0.3)


def test_queued_time_sums_the_waits_of_every_try_and_not_the_tries(db_url):
    """Queued 0.4 s, run 0.4 s and released for want of Triton, queued 0.4 s again, claimed: 0.8 s queued."""
    upgrade(db_url)

    async def go():
        store = Store(db_url, owner="a")
        try:
            job = await store.accept_upload("1.2.826.0.1.7", [("a.dcm", "key-a", 10)], 3600)
            await asyncio.sleep(0.4)
            assert await store.claim(30) is not None
            first = await study_waits(store, job.job_id)
            await asyncio.sleep(0.4)
            assert await store.release(job.job_id, 0) == "queued"
            await asyncio.sleep(0.4)
            assert await store.claim(30) is not None
            again = await study_waits(store, job.job_id)
        finally:
            await store.close()
        assert first is not None and again is not None
        assert 0.4 <= first.queued_s < 0.7
        assert 0.8 <= again.queued_s < 1.2  # the 0.4 s of the first try are no wait
        assert again.receive_s == again.quiet_s == 0  # an upload

    asyncio.run(go())


def test_the_wait_after_a_replica_shut_down_counts_as_queued(db_url):
    """A replica shutting down gives its jobs back (release_all) without an event: the wait until another
    replica claimed one was in no result's queued_s. It writes the job's 'queued' event now."""
    upgrade(db_url)

    async def go():
        a, b = Store(db_url, owner="a"), Store(db_url, owner="b")
        try:
            job = await a.accept_upload("1.2.826.0.1.8", [("a.dcm", "key-b", 10)], 3600)
            assert await a.claim(30) is not None
            await asyncio.sleep(0.3)
            assert await a.release_all() == 1  # a shuts down
            await asyncio.sleep(0.5)
            assert await b.claim(30) is not None
            waits = await study_waits(b, job.job_id)
        finally:
            await a.close()
            await b.close()
        assert waits is not None and 0.5 <= waits.queued_s < 0.8  # the wait after the shut-down, not the try

    asyncio.run(go())
