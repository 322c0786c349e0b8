"""Overhead of the gateway's state store (prints and records figures; not a test).

    .venv/bin/python -m benchmarks.bench_store [--database-url postgresql://...] [--jobs 200]
                                               [--queued 1000] [--write]

Three figures, each stamped with the commit, the machine and its load (``benchmarks.common.machine_info``):

* **claim / complete round trip on PostgreSQL** (goal <= 10 ms): ``Store.claim`` then ``Store.finish``
  of one job with a small CaseResult, repeated ``--jobs`` times; median and p95.
* **store work of a 300-slice study** (goal <= 5 % of its end-to-end time): what the store adds on the
  path of one upload: 300 files of 0.5 MiB written and fsynced to the blob folder, the accepting
  transaction, the claim, a progress heartbeat every 0.5 s of screening, reading the 300 blobs back
  and the result; compared with the end-to-end time given by ``--e2e-s`` (default: the README's
  measured 23.3 s for a 300-slice study on the cpu profile).
* **memory with 1,000 queued studies** (goal: flat): a ``ctscreen serve --triton-url`` process
  pointing at no Triton (so nothing is screened) receives ``--queued`` small STOW-RS studies; its
  resident set before and after, and the number of queued jobs it reports.

Without ``--database-url`` a PostgreSQL server is started in a temporary folder (Debian's
``postgresql``, as the tests do).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, machine_info, write_json


def _result(job_id: str, n: int = 0):
    from aggregator.case import CaseRule, decide
    from aggregator.schema import Timings

    return decide([], CaseRule()).to_result(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4",
                                            models=[], timings=Timings(), job_id=job_id)


async def claim_round_trip(url: str, jobs: int) -> dict:
    from gateway.store import Store
    from gateway.store.migrate import upgrade

    await asyncio.to_thread(upgrade, url)
    store = Store(url)
    try:
        for i in range(jobs):
            await store.add_instance(f"2.25.{i}", f"2.25.{i}.1", "a.dcm", f"k{i}", 1)
            await store.complete_now(f"2.25.{i}", 3600)
        times = []
        for _ in range(jobs):
            t = time.perf_counter()
            job = await store.claim(30)
            assert job is not None
            assert await store.finish(job.id, _result(job.id), None)
            times.append((time.perf_counter() - t) * 1000)
    finally:
        await store.close()
    times.sort()
    return {"jobs": jobs, "median_ms": statistics.median(times), "p95_ms": times[int(0.95 * len(times)) - 1],
            "goal_ms": 10.0}


async def study_overhead(url: str, folder: Path, e2e_s: float, slices: int = 300) -> dict:
    from gateway.store import FolderBlobs, Store, new_key
    from gateway.store.migrate import upgrade

    await asyncio.to_thread(upgrade, url)
    store, blobs = Store(url), FolderBlobs(folder)
    data = os.urandom(512 * 1024 + 1100)
    try:
        t0 = time.perf_counter()
        keyed = [(f"{i:04d}.dcm", new_key()) for i in range(slices)]
        await asyncio.to_thread(blobs.put_many, [(k, data) for _, k in keyed])
        t_blobs = time.perf_counter() - t0
        view = await store.accept_upload("2.25.999", [(n, k, len(data)) for n, k in keyed], 3600, slices_total=slices)
        job = await store.claim(30)
        assert job is not None and job.id == view.job_id
        beats = int(e2e_s / 0.5)
        for i in range(beats):
            await store.heartbeat(job.id, 30, slices_done=i)
        t1 = time.perf_counter()
        files = await store.instance_files(job.study_id)
        await asyncio.to_thread(lambda: [blobs.get(k) for _, k in files])
        t_read = time.perf_counter() - t1
        await store.finish(job.id, _result(job.id), None)
        total = time.perf_counter() - t0
    finally:
        await store.close()
    return {"slices": slices, "blob_write_fsync_s": t_blobs, "blob_read_s": t_read, "heartbeats": beats,
            "store_total_s": total, "e2e_s": e2e_s, "fraction": total / e2e_s, "goal_fraction": 0.05,
            "note": "blob reads are from the page cache; with the upload route's cache the claiming replica "
                    "does not read them at all"}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def queued_memory(url: str, n: int, folder: Path) -> dict:
    import httpx
    import pydicom
    from pydicom.uid import generate_uid

    import phantom
    from ctscreen.embedded import free_port

    study = Path(phantom.write_study(phantom.make_study(seed=1, n_slices=2, matrix=64), folder / "src",
                                     montage=False))
    datasets = [pydicom.dcmread(p) for p in sorted(study.rglob("*.dcm"))]
    port = free_port()
    env = {**os.environ, "CTSCREEN_DATABASE_URL": url, "CTSCREEN_DATA_DIR": str(folder / "data"),
           "CTSCREEN_STOW_QUIET_PERIOD_S": "0.2", "CTSCREEN_STOW_MAX_PENDING_STUDIES": str(n + 10)}
    cmd = [sys.executable, "-m", "ctscreen.cli", "serve", "--port", str(port), "--triton-url", f"127.0.0.1:{free_port()}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def stow_one() -> None:
        uid = generate_uid()
        body = b""
        for ds in datasets:
            ds.StudyInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            body += b"--b\r\nContent-Type: application/dicom\r\n\r\n" + buf.getvalue() + b"\r\n"
        r = http.post("/dicomweb/studies", content=body + b"--b--\r\n",
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
        r.raise_for_status()

    def queued() -> int:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith('ctscreen_studies_inflight{state="queued"}'):
                return int(float(line.split()[-1]))
        return -1

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                http.get("/healthz").raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        for _ in range(20):
            stow_one()  # warm up: every code path loaded
        time.sleep(2)
        before = _rss_mb(proc.pid)
        t = time.perf_counter()
        for _ in range(n):
            stow_one()
        stow_s = time.perf_counter() - t
        time.sleep(3)
        after = _rss_mb(proc.pid)
        jobs = queued()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        http.close()
    return {"studies": n, "instances": 2 * n, "rss_before_mb": before, "rss_after_mb": after,
            "rss_growth_mb": after - before, "queued_jobs_reported": jobs, "stow_s": stow_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_store", description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", default=None, help="a PostgreSQL database to use (default: start one)")
    p.add_argument("--jobs", type=int, default=200, help="claim/complete round trips (default 200)")
    p.add_argument("--queued", type=int, default=1000, help="queued studies for the memory figure (default 1000)")
    p.add_argument("--e2e-s", type=float, default=23.3, help="end-to-end seconds of a 300-slice study (README)")
    p.add_argument("--write", action="store_true", help="record the figures in benchmarks/results/store-latest.json")
    args = p.parse_args(argv)
    if args.jobs < 20 or args.queued < 1 or args.e2e_s <= 0:
        p.error("--jobs must be >= 20, --queued >= 1 and --e2e-s > 0")
    server = None
    if args.database_url is None:
        from tests.postgres import PostgresServer

        server = PostgresServer()
    try:
        def fresh() -> str:
            return args.database_url if server is None else server.new_database()

        with tempfile.TemporaryDirectory(prefix="ctscreen-bench-store-") as tmp:
            doc = {
                "machine": machine_info(),
                "claim_complete_postgresql": asyncio.run(claim_round_trip(fresh(), args.jobs)),
                "store_work_300_slice_study": asyncio.run(study_overhead(fresh(), Path(tmp) / "blobs", args.e2e_s)),
                "memory_queued_studies": queued_memory(fresh(), args.queued, Path(tmp)),
            }
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(doc, indent=2))
    if args.write:
        print(f"written: {write_json(RESULTS_DIR / 'store-latest.json', doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
