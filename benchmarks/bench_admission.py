"""Upload admission under pressure: N concurrent large uploads against an in-flight byte budget (issue 14).

``ctscreen bench admission [--uploads 40] [--size-mb 200] [--budget-mb 1024]`` starts a gateway process
(``uvicorn --http gateway.httpserver:BoundedHttpToolsProtocol --factory gateway.main:app_from_env``, as the
chart runs it, on a loopback port; no Triton is needed, the bodies are
not DICOM and are refused after they are read), opens N connections that each send a request head with
``Content-Length`` at once, and then sends the bodies of those that were not answered straight away. It
records how many got 429 before their body, how many were read, whether any got a 5xx, and the gateway
process's resident memory: sampled every 50 ms (``VmRSS``) and its peak (``VmHWM``), against the budget.
Results: ``benchmarks/results/admission-latest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, results_dir, stamp, write_json

MiB = 1024 * 1024


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def _one(port: int, size: int, gate: asyncio.Event) -> tuple[int, bool]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST /v1/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        await writer.drain()
        await gate.wait()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
            return int(head.split()[1]), True
        except TimeoutError:
            pass
        chunk = b"x" * MiB
        sent = 0
        while sent < size:
            n = min(len(chunk), size - sent)
            writer.write(chunk[:n])
            await writer.drain()
            sent += n
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 600)
        return int(head.split()[1]), False
    finally:
        writer.close()


async def _run(port: int, uploads: int, size: int) -> list[tuple[int, bool]]:
    gate = asyncio.Event()
    tasks = [asyncio.create_task(_one(port, size, gate)) for _ in range(uploads)]
    await asyncio.sleep(2.0)  # every head is in
    gate.set()
    return list(await asyncio.gather(*tasks))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctscreen bench admission", description=__doc__.splitlines()[0])
    p.add_argument("--uploads", type=int, default=40, help="concurrent uploads (default 40)")
    p.add_argument("--size-mb", type=int, default=200, help="size of each upload in MiB (default 200)")
    p.add_argument("--budget-mb", type=int, default=1024, help="CTSCREEN_UPLOAD_BUDGET_BYTES in MiB (default 1024)")
    args = p.parse_args(argv)
    if args.uploads < 1 or args.size_mb < 1 or args.budget_mb < args.size_mb:
        p.error("--uploads and --size-mb must be >= 1 and --budget-mb >= --size-mb")
    from ctscreen.embedded import free_port

    port = free_port()
    spool = tempfile.mkdtemp(prefix="ctscreen-bench-admission-")
    env = {**os.environ, "CTSCREEN_TRITON_URLS": "127.0.0.1:1", "CTSCREEN_UPLOAD_BUDGET_BYTES": str(args.budget_mb * MiB),
           "CTSCREEN_MAX_UPLOAD_BYTES": str(args.size_mb * MiB), "CTSCREEN_MAX_UPLOADS_PER_CLIENT": "1000",
           "CTSCREEN_UPLOAD_CLIENT_BYTES": str(args.budget_mb * MiB),  # every upload comes from this one client
           "CTSCREEN_MAX_QUEUED_STUDIES": "1024", "CTSCREEN_UPLOAD_TMP_DIR": spool,
           "CTSCREEN_DATA_DIR": os.path.join(spool, "data")}  # a fresh state store, not the user's
    cmd = [sys.executable, "-m", "uvicorn", "--http", "gateway.httpserver:BoundedHttpToolsProtocol",  # as the chart
           "--factory", "gateway.main:app_from_env", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.stderr.write(f"ctscreen bench admission: the gateway did not start\n{proc.stderr.read() if proc.stderr else ''}")
                return 1
            time.sleep(0.2)
        idle_kib = _proc_kib(proc.pid, "VmRSS")
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.wait(0.05):
                samples.append((time.monotonic() - t0, _proc_kib(proc.pid, "VmRSS")))

        threading.Thread(target=sample, daemon=True).start()
        results = asyncio.run(_run(port, args.uploads, args.size_mb * MiB))
        seconds = time.monotonic() - t0
        peak_kib = _proc_kib(proc.pid, "VmHWM")
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(spool, ignore_errors=True)
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    doc: dict[str, Any] = {
        "benchmark": "admission", "when": stamp(), "machine": machine_info(),
        "uploads": args.uploads, "upload_mib": args.size_mb, "budget_mib": args.budget_mb,
        "statuses": statuses,
        "answered_before_body": sum(1 for _, early in results if early),
        "read": sum(1 for _, early in results if not early),
        "server_errors": sum(1 for s, _ in results if s >= 500),
        "rss_idle_mib": round(idle_kib / 1024, 1),
        "rss_peak_mib": round(peak_kib / 1024, 1),
        "rss_peak_over_idle_mib": round((peak_kib - idle_kib) / 1024, 1),
        "rss_samples_mib": [[round(t, 2), round(k / 1024, 1)] for t, k in samples[:: max(1, len(samples) // 200)]],
        "seconds": round(seconds, 1),
    }
    out = write_json(results_dir() / "admission-latest.json", doc)
    sys.stdout.write(f"{args.uploads} x {args.size_mb} MiB against {args.budget_mb} MiB: {statuses}; "
                     f"RSS idle {doc['rss_idle_mib']} MiB, peak {doc['rss_peak_mib']} MiB; -> {out}\n")
    return 1 if doc["server_errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
