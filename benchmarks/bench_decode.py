"""Decode speed of gateway ingest: ms per 512 x 512 slice, by transfer syntax and thread count.

Not a test: prints figures (wall ms per slice, the 300-slice extrapolation, and CPU ms per slice,
which is what a loaded machine cannot inflate). Builds ``--slices`` synthetic CT slices with pydicom in each
transfer syntax, then times ``gateway.ingest.load_study`` (parse, series choice, decode to HU,
sort) over them.

    .venv/bin/python benchmarks/bench_decode.py --slices 100 --workers 1 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.ingest import load_study, make_decode_pool  # noqa: E402
from tests.gateway_dicom_factory import make_series  # noqa: E402

SYNTAXES = {
    "explicit_le": ExplicitVRLittleEndian,
    "j2k_lossless": JPEG2000Lossless,
    "j2k": JPEG2000,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctscreen bench decode", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--syntax", nargs="+", choices=sorted(SYNTAXES), default=["explicit_le", "j2k_lossless"]
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--pool", choices=["thread", "process"], default="thread")
    args = parser.parse_args(argv)
    if args.slices < 1:
        parser.error("--slices must be >= 1")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")  # was: UnboundLocalError traceback
    if min(args.workers) < 1:
        parser.error(f"--workers must be >= 1, got {min(args.workers)}")
    print(f"pool: {args.pool}")
    print(f"{'syntax':14s} {'workers':>7s} {'ms/slice':>9s} {'300-slice study s':>18s} {'cpu ms/sl':>10s}")
    for name in args.syntax:
        series = make_series(args.slices, rows=512, cols=512, transfer_syntax=SYNTAXES[name])
        files = [(n, b) for n, b, _, _ in series]
        for w in args.workers:
            best = best_cpu = float("inf")
            pool = make_decode_pool(w) if args.pool == "process" else None
            if pool is not None:
                load_study(files[:8], executor=pool)  # start the workers outside the timing
            for _ in range(args.repeat):
                t0, c0 = time.perf_counter(), time.process_time()
                study = load_study(files, workers=w, executor=pool)
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            if pool is not None:
                pool.shutdown()
            assert study.n_slices == args.slices
            ms = 1000 * best / args.slices
            cpu = 1000 * best_cpu / args.slices
            cpu_note = "" if pool is None else " (parent only)"
            print(f"{name:14s} {w:7d} {ms:9.2f} {ms * 300 / 1000:18.2f} {cpu:10.2f}{cpu_note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
