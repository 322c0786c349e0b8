"""Model-level CPU cost: ONNX Runtime ms per slice for the shipped lite models and the paper profile.

::

    python -m benchmarks.bench_models                 # shipped lite valid_area + lesion, 2 threads
    python -m benchmarks.bench_models --paper         # + the paper profile (needs torch: exports an
                                                      #   untrained ResNet-50 UNet++ at 512 to a temp dir)
    python -m benchmarks.bench_models --candidates    # + the lite candidates the choice was made from
    ctscreen bench models ...                         # the same

Budgets (issues #3, #11): lite lesion <= 60 ms/slice (40 ms until real CT allowed the net to grow),
lite valid_area <= 15 ms/slice, ORT on 2 threads.
Figures are the median of ``--reps`` timed runs after a warm-up, on random HU; the machine's load
average is recorded because these machines are shared, and so is the CPU time per slice (all threads),
which on an idle machine is about ``threads`` x the wall time and moves less with the load. Writes
``benchmarks/results/models-latest.json``. This is a benchmark, not a test: nothing fails on a slow run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import ROOT, TMP_DIR, machine_info, results_dir, write_json  # noqa: E402
from ctscreen.contracts import HU_SLICES, LESION_MODEL, PROB, SLICE_SIZE, VALID_AREA_MODEL  # noqa: E402

BUDGET_MS = {VALID_AREA_MODEL: 15.0, LESION_MODEL: 60.0}

# The lite candidates measured before choosing (encoder, depth, decoder widths, input size).
CANDIDATES = {
    "valid_area/mobilenet_v2-d3-(32,16,8)@128 [shipped]": ("mobilenet_v2", 3, (32, 16, 8), 128),
    "valid_area/resnet18-d3-(32,16,8)@128": ("resnet18", 3, (32, 16, 8), 128),
    "lesion/mobilenet_v2-d4-(48,32,16,16)@256 [shipped]": ("mobilenet_v2", 4, (48, 32, 16, 16), 256),
    "lesion/resnet18-d4-(64,32,16,16)@256": ("resnet18", 4, (64, 32, 16, 16), 256),
    "lesion/efficientnet-b0-d4-(48,32,16,16)@256": ("efficientnet-b0", 4, (48, 32, 16, 16), 256),
    "lesion/mobilenet_v2-d5-(64,48,32,16,8)@256": ("mobilenet_v2", 5, (64, 48, 32, 16, 8), 256),
    "lesion/mobilenetv3_small-d4-(32,24,16,16)@256": ("tu-mobilenetv3_small_100", 4, (32, 24, 16, 16), 256),
}


def time_onnx(path: Path, *, threads: int, batch: int, reps: int, spinning: bool = False) -> dict:
    """Median and spread of ms per slice of one ONNX file at one batch size."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not spinning:  # as the cpu-profile Triton config runs it (allow_spinning 0)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 400, size=(batch, 1, SLICE_SIZE, SLICE_SIZE)).astype(np.int16)
    sess.run([PROB], {HU_SLICES: hu})  # warm-up
    per_slice, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        sess.run([PROB], {HU_SLICES: hu})
        per_slice.append((time.perf_counter() - t0) * 1000 / batch)
        cpu.append((time.process_time() - c0) * 1000 / batch)
    return {
        "batch": batch,
        "ms_per_slice_median": statistics.median(per_slice),
        "ms_per_slice_min": min(per_slice),
        "ms_per_slice_max": max(per_slice),
        "cpu_ms_per_slice_median": statistics.median(cpu),
        "reps": reps,
        "size_mb": round(path.stat().st_size / 1e6, 2),
    }


def _export(spec_args: tuple, out: Path) -> Path:
    from training.export import export_onnx
    from training.nets import HUSegmenter, NetSpec

    enc, depth, dec, size = spec_args
    return export_onnx(HUSegmenter(NetSpec(enc, depth, tuple(dec), size)), out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctscreen bench models", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    p.add_argument("--batches", default="1,4", help="batch sizes, comma separated (default 1,4)")
    p.add_argument("--reps", type=int, default=10, help="timed runs per figure (default 10)")
    p.add_argument("--spinning", action="store_true", help="let ORT threads spin (default off, as in Triton)")
    p.add_argument("--paper", action="store_true", help="also time the paper profile (needs torch)")
    p.add_argument("--candidates", action="store_true", help="also time the lite candidates (needs torch)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON to write (default benchmarks/results/models-latest.json, the report's figure)")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches must be integers, got {args.batches!r}")
    if not batches or min(batches) < 1 or args.reps < 1 or args.threads < 1:
        p.error("--batches, --reps and --threads must be positive")

    rows: list[dict] = []

    def measure(name: str, path: Path, budget: float | None, batches_here: list[int]) -> None:
        for b in batches_here:
            r = {"model": name, **time_onnx(path, threads=args.threads, batch=b, reps=args.reps, spinning=args.spinning)}
            r["budget_ms"] = budget
            r["within_budget"] = None if budget is None else r["ms_per_slice_median"] <= budget
            rows.append(r)
            print(f"{name:<58} batch {b:>2}: {r['ms_per_slice_median']:8.1f} ms/slice "
                  f"(min {r['ms_per_slice_min']:.1f}, max {r['ms_per_slice_max']:.1f}; "
                  f"CPU {r['cpu_ms_per_slice_median']:.1f} ms; {r['size_mb']} MB)"
                  + ("" if budget is None else f"  budget {budget:g}: {'ok' if r['within_budget'] else 'OVER'}"),
                  flush=True)

    for model in (VALID_AREA_MODEL, LESION_MODEL):
        measure(f"lite {model} (shipped)", ROOT / "model_repository" / model / "1" / "model.onnx",
                BUDGET_MS[model], batches)
    if args.candidates or args.paper:
        try:
            import torch  # noqa: F401
        except ImportError:
            p.error("--paper/--candidates need torch (pip install '.[train]')")
        TMP_DIR.mkdir(parents=True, exist_ok=True)
    if args.candidates:
        for i, (name, spec) in enumerate(CANDIDATES.items()):
            path = _export(spec, TMP_DIR / f"candidate{i}.onnx")
            measure(f"candidate {name}", path, None, batches)
    if args.paper:
        from training.nets import spec_for

        s = spec_for(LESION_MODEL, "paper")
        path = _export((s.encoder, s.encoder_depth, s.decoder_channels, s.input_size), TMP_DIR / "paper.onnx")
        measure("paper (ResNet-50 UNet++ @512, either model)", path, None, [1])
        path.unlink()
    doc = {"benchmark": "models", "threads": args.threads, "spinning": args.spinning, "machine": machine_info(), "rows": rows}
    out = write_json(args.out or results_dir() / "models-latest.json", doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
