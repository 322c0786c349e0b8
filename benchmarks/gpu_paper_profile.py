"""The paper profile on a GPU: UNet++ ResNet-50 at 512, gpu profile (TensorRT), slices/s and s/500-slice study.

Run where a GPU and a GPU Triton (``model_repository/triton.Dockerfile``: NGC tritonserver 24.10 = Triton
2.51, plus numpy<2 and scipy for ``postprocess``) are; there is no GPU on the development machines, so this has never run here (``--dry-run`` prints the
plan, and is what the smoke test runs)::

    # 1. build: paper-profile ONNX (trained checkpoints, or --untrained for speed only), gpu repository, engines
    python benchmarks/gpu_paper_profile.py build --out /srv/ctscreen-paper [--valid-ckpt A.ckpt --lesion-ckpt B.ckpt]
    # 2. serve it with a GPU tritonserver (the command is printed by step 1), then measure:
    python benchmarks/gpu_paper_profile.py measure --triton-url 127.0.0.1:8001 [--url http://127.0.0.1:8080]

``measure`` sends phantom slices to ``ct_screen`` over gRPC (binary INT16, batched, concurrent) for a
sweep of (batch, concurrency), prints slices/s and the seconds one 500-slice study takes at the best
setting (500 / slices/s, plus, with ``--url``, one real 500-slice study through the gateway), and writes
``benchmarks/results/gpu-latest.json``. Also ``ctscreen bench gpu ...``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    ROOT,
    BenchError,
    UnsafeTarget,
    check_target,
    machine_info,
    results_dir,
    write_json,
)

STUDY = 500
SWEEP = ((8, 2), (16, 4), (32, 4), (32, 8))


def _run(cmd: list[str], dry: bool) -> None:
    print("+ " + " ".join(cmd), flush=True)
    if not dry:
        subprocess.run(cmd, check=True)


def gpu_present() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    return subprocess.run([smi, "-L"], capture_output=True, timeout=30).returncode == 0


def build(args: argparse.Namespace) -> int:
    out: Path = args.out
    onnx = out / "onnx"
    ctscreen = [sys.executable, "-m", "ctscreen.cli"]
    for task, model, ckpt in (("valid-area", "valid_area", args.valid_ckpt), ("lesion", "lesion", args.lesion_ckpt)):
        weights = ["--checkpoint", str(ckpt)] if ckpt else ["--untrained", "--profile", "paper"]
        _run([*ctscreen, "export", task, *weights, "--out", str(onnx / model / "1" / "model.onnx")], args.dry_run)
    src, repo = out / "src", out / "repo"
    _run([*ctscreen, "repo", "build", "--profile", "gpu", "--onnx-dir", str(onnx), "--out", str(src),
          "--max-batch-size", "32", "--preferred-batch-sizes", "8,16,32"], args.dry_run)
    engines = ROOT / "scripts" / "build_trt_engines.sh"
    if not engines.is_file():
        raise BenchError(f"{engines} is missing: it builds the TensorRT plans (trtexec, FP16)")
    _run(["bash", str(engines), "--repo", str(src), "--out", str(repo), "--max-batch", "32", "--opt-batch", "16",
          "--precision", "fp16"], args.dry_run)
    print("\nthen serve it with the gpu-profile image (NGC tritonserver 24.10 + numpy<2 + scipy), e.g.:\n"
          "  docker build -f model_repository/triton.Dockerfile -t ctscreen-triton:24.10 .\n"
          "  docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 "
          f"-v {repo}:/models ctscreen-triton:24.10 tritonserver --model-repository=/models")
    return 0


def measure(args: argparse.Namespace) -> int:
    from benchmarks.perf import sample_slices
    from benchmarks.ratios import ensemble_throughput

    check_target(args.triton_url, allow_remote=args.allow_remote)
    if args.dry_run:
        for b, c in SWEEP:
            print(f"+ ct_screen over gRPC at {args.triton_url}: batch {b}, concurrency {c}, {args.slices} slices")
        return 0
    if not gpu_present() and not args.allow_remote:
        print("gpu_paper_profile: no GPU on this machine (nvidia-smi -L failed); run it on a GPU node, or "
              "pass --allow-remote with the URL of a GPU Triton you own", file=sys.stderr)
        return 2
    slices = sample_slices(32)
    runs = []
    for b, c in SWEEP:
        r = ensemble_throughput(args.triton_url, slices, batch=b, concurrency=c, min_slices=args.slices)
        runs.append(r)
        print(f"batch {b:>2} concurrency {c}: {r['slices_per_s']:8.1f} slices/s")
    best = max(runs, key=lambda r: r["slices_per_s"])
    doc = {"machine": machine_info(), "profile": "paper (UNet++ ResNet-50, 512, gpu/TensorRT)", "runs": runs,
           "best": best, "seconds_per_500_slice_study_model_only": round(STUDY / best["slices_per_s"], 2)}
    print(f"best: {best['slices_per_s']:.1f} slices/s -> {doc['seconds_per_500_slice_study_model_only']} s per "
          f"{STUDY}-slice study (models + post-processing; paper: 41.34 s per patient)")
    if args.url:
        from benchmarks.load import LoadConfig, run_load

        r = run_load(LoadConfig(url=args.url, mode="closed", concurrency=1, max_studies=1, sizes=f"fixed:{STUDY}",
                                kinds=("covid",), duration=600, study_timeout=600, allow_remote=args.allow_remote))
        doc["study_500_end_to_end"] = r
        print(f"one {STUDY}-slice study through the gateway: {r['latency_s']['max']} s")
    print(f"gpu: {write_json(results_dir() / 'gpu-latest.json', doc)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_paper_profile", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="export paper ONNX, render the gpu repository, build TensorRT engines")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--valid-ckpt", type=Path)
    b.add_argument("--lesion-ckpt", type=Path)
    b.add_argument("--dry-run", action="store_true", help="print the commands only")
    m = sub.add_parser("measure", help="slices/s and seconds per 500-slice study against a GPU Triton")
    m.add_argument("--triton-url", required=True, help="gRPC host:port")
    m.add_argument("--url", help="gateway base URL for one real 500-slice study")
    m.add_argument("--slices", type=int, default=512, help="slices per measurement")
    m.add_argument("--allow-remote", action="store_true")
    m.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    try:
        return build(args) if args.cmd == "build" else measure(args)
    except (BenchError, UnsafeTarget) as exc:
        print(f"gpu_paper_profile: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"gpu_paper_profile: step failed (exit {exc.returncode}): {' '.join(map(str, exc.cmd))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
