"""One study streamed through the screener against the whole-study path, on the same Triton (issue 17, item 3).

Times :meth:`gateway.screening.Screener.prepare` + :meth:`~gateway.screening.Screener.screen` (what a
job costs once its files are in hand: parse, decode, Triton, the case rule) for one phantom study, the
two paths alternated ``--repeat`` times: ``whole`` decodes every slice before the first request
(:func:`gateway.ingest.load_study`), ``streamed`` sends each batch as soon as it is decoded. Prints and
writes wall seconds, when the first batch came back, and each run's per-slice stages
(``timings.stages_ms_per_slice``); the gateway's settings (batch, requests in flight, decode threads)
are its defaults unless given. Starts the embedded Triton (cpu profile) unless ``--triton-url``.
The JSON goes to ``--out`` (default ``out/bench-stream.json``, not a published figure: the 300-slice
study of ``ctscreen bench ratios`` and the report's per-stage table are those).

    python -m benchmarks.bench_stream --slices 300 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, machine_info, write_json


async def _one(url: str, files: list[tuple[str, bytes]], whole: bool, batch: int, inflight: int,
               workers: int) -> dict[str, Any]:
    from gateway.ingest import load_study
    from gateway.metrics import Metrics
    from gateway.screening import Screener
    from gateway.triton_pool import TritonPool

    pool = TritonPool([url], batch_size=batch, max_inflight=inflight)
    loader = (lambda sources: load_study(sources, workers=workers)) if whole else None
    screener = Screener(pool, Metrics(), decode_workers=workers, loader=loader)
    first: list[float] = []
    try:
        t0 = time.perf_counter()
        prepared = await screener.prepare(files)
        t1 = time.perf_counter()
        result = await screener.screen(prepared, job_id="bench", started=time.time(),
                                       on_batch=lambda n: first.append(time.perf_counter()) if not first else None)
        t2 = time.perf_counter()
    finally:
        screener.close()
        await pool.close()
    return {"path": "whole" if whole else "streamed", "wall_s": round(t2 - t0, 3), "prepare_s": round(t1 - t0, 3),
            "first_answer_s": round(first[0] - t0, 3) if first else None, "n_slices": result.n_slices,
            "verdict": result.verdict, "stages_ms_per_slice": result.timings.stages_ms_per_slice}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctscreen bench stream", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--encoding", default="explicit")
    parser.add_argument("--batch", type=int, default=None, help="slices per request (default: the gateway's)")
    parser.add_argument("--inflight", type=int, default=None, help="requests in flight (default: the gateway's)")
    parser.add_argument("--workers", type=int, default=None, help="decode threads (default: the gateway's)")
    parser.add_argument("--triton-url", default=None, help="gRPC host:port (default: start the embedded Triton)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench-stream.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    if args.slices < 8 or args.repeat < 1:
        parser.exit(2, "ctscreen bench stream: error: --slices must be >= 8 and --repeat >= 1\n")
    from benchmarks.studies import ensure_study
    from gateway.settings import Settings

    defaults = Settings()
    batch = args.batch or defaults.triton_batch_size
    inflight = args.inflight or defaults.triton_max_inflight
    workers = args.workers or defaults.decode_workers
    study = ensure_study("covid", args.slices, seed=7, encoding=args.encoding)
    server = None
    url = args.triton_url
    if url is None:
        from ctscreen.embedded import EmbeddedTriton

        server = EmbeddedTriton()
        server.start(timeout=300)
        url = server.grpc_url
    runs = []
    try:
        for i in range(args.repeat):
            for whole in ((False, True) if i % 2 else (True, False)):
                load = os.getloadavg()[0]
                run = asyncio.run(_one(url, study.files, whole, batch, inflight, workers))
                run["loadavg_1m_before"] = round(load, 2)
                runs.append(run)
                print(f"{run['path']:>8}: {run['wall_s']:.2f} s wall, first answer after {run['first_answer_s']} s, "
                      f"load {load:.2f}; ms/slice {run['stages_ms_per_slice']}", flush=True)
    finally:
        if server is not None:
            server.stop()
    summary = {}
    for kind in ("whole", "streamed"):
        walls = sorted(r["wall_s"] for r in runs if r["path"] == kind)
        firsts = sorted(r["first_answer_s"] for r in runs if r["path"] == kind and r["first_answer_s"] is not None)
        summary[kind] = {"median_wall_s": walls[len(walls) // 2], "median_first_answer_s": firsts[len(firsts) // 2]
                         if firsts else None}
    out = {"machine": machine_info(), "config": {"slices": study.n_slices, "encoding": args.encoding, "batch": batch,
                                                   "inflight": inflight, "decode_workers": workers,
                                                   "repeat": args.repeat},
           "summary": summary, "runs": runs}
    path = write_json(args.out, out)
    print(f"whole {summary['whole']}, streamed {summary['streamed']}; written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
