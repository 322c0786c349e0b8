"""The paper profile on a GPU: UNet++ ResNet-50 at 512, per-slice and per-500-slice-study figures.

One command, under 8 minutes on one GPU, everything included (export, engines, server start, measuring)::

    python benchmarks/gpu_paper_profile.py run [--valid-ckpt A.ckpt --lesion-ckpt B.ckpt] [--budget-s 480]

``run`` picks the strongest path this node has and says which:

1. ``triton-tensorrt``: a tritonserver with the TensorRT backend and ``trtexec`` (the NGC image,
   ``model_repository/triton.Dockerfile``): gpu repository, FP16 plans (``scripts/build_trt_engines.sh``,
   cached), the ensemble over gRPC;
2. ``triton-ort``: a tritonserver with the onnxruntime backend but no ``trtexec``: the gpu-ort repository
   (ONNX Runtime with the TensorRT execution provider inside Triton);
3. ``ort-cuda``: no GPU tritonserver at all (a bare GPU node with pip): ONNX Runtime's CUDA execution
   provider in process, the same models and ``postprocess_batch``; labelled so, never as a Triton figure.
4. ``torch-cuda``: neither, but PyTorch sees a GPU (a training node): the same networks
   (``training.nets``) in PyTorch on the GPU, FP16 autocast like the TensorRT plans, then
   ``postprocess_batch`` on the CPU; labelled so, never as a Triton figure.

It measures one 500-slice study first (the headline: seconds per study, ms per slice), then a sweep of
batch x concurrency while the budget lasts; every phase gets only the time left (``--budget-s``, 480 s
by default, less a reserve for writing the results), and a phase that would not fit is skipped and named
in ``"stopped"``. Results: ``benchmarks/results/gpu-latest.json`` (stamped; ``ctscreen bench report``
prints its summary). ``--dry-run`` prints the plan; ``--cpu-smoke`` runs path 3 on the CPU with the
shipped lite models and a few slices (what the tests run; written to ``results/tmp/gpu-smoke.json``).

The steps one by one, as before::

    python benchmarks/gpu_paper_profile.py build --out /srv/ctscreen-paper [--valid-ckpt A.ckpt --lesion-ckpt B.ckpt]
    python benchmarks/gpu_paper_profile.py measure --triton-url 127.0.0.1:8001 [--url http://127.0.0.1:8080]

Also ``ctscreen bench gpu ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    ROOT,
    TMP_DIR,
    BenchError,
    UnsafeTarget,
    check_target,
    machine_info,
    results_dir,
    write_json,
)

STUDY = 500
SWEEP = ((8, 2), (16, 4), (32, 4), (32, 8))
BUDGET_S = 480.0  # the whole run, on one GPU: under 8 minutes
RESERVE_S = 20.0  # kept back for stopping the server and writing the results
PATHS = ("triton-tensorrt", "triton-ort", "ort-cuda", "torch-cuda")
TORCH_SWEEP = (("fp16", 8), ("fp16", 4), ("fp16", 32), ("fp16", 64), ("fp32", 8), ("fp32", 16))  # after fp16 x 16
TRITON_HOME = Path(os.environ.get("CTSCREEN_TRITON_HOME", "/opt/tritonserver"))


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


# --- run: everything in one budget ---------------------------------------------------------------


class Budget:
    """The time a run may take: ``left()`` seconds remain; ``fits(estimate)`` keeps ``reserve`` back."""

    def __init__(self, seconds: float = BUDGET_S, reserve: float = RESERVE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.reserve, self._clock = seconds, reserve, clock
        self._t0 = clock()

    def elapsed(self) -> float:
        return self._clock() - self._t0

    def left(self) -> float:
        return self.seconds - self.reserve - self.elapsed()

    def fits(self, estimate: float) -> bool:
        return estimate <= self.left()

    def timeout(self) -> float:
        """A subprocess limit: what is left, at least one second."""
        return max(1.0, self.left())


@dataclass
class Outcome:
    runs: list[dict[str, Any]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)


def within(budget: Budget, items: Sequence[Any], measure: Callable[[Any], dict[str, Any]], *,
           first_estimate: float = 10.0, label: Callable[[Any], str] = str) -> Outcome:
    """``measure`` each item while the budget lasts; an item is skipped (and named in ``stopped``) when
    the longest measurement so far would not fit in what is left."""
    out = Outcome()
    estimate = first_estimate
    for item in items:
        if not budget.fits(estimate):
            out.stopped.append(f"{label(item)}: skipped, {budget.left():.0f} s left, ~{estimate:.0f} s needed")
            continue
        t0 = budget.elapsed()
        out.runs.append(measure(item))
        estimate = max(estimate if out.runs[:-1] else 0.0, budget.elapsed() - t0)
    return out


def detect() -> dict[str, Any]:
    """What this node has: a GPU, a tritonserver and its backends, trtexec, ONNX Runtime's providers."""
    server = shutil.which("tritonserver") or str(TRITON_HOME / "bin" / "tritonserver")
    backends = TRITON_HOME / "backends"
    trtexec = shutil.which("trtexec") or next((str(p) for p in (Path("/usr/src/tensorrt/bin/trtexec"),) if p.is_file()),
                                              None)
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except ImportError:
        providers = []
    gpu = gpu_present()
    return {
        "gpu": gpu,
        "tritonserver": server if Path(server).is_file() else None,
        "backends": sorted(p.name for p in backends.iterdir()) if backends.is_dir() else [],
        "trtexec": trtexec,
        "ort_providers": providers,
        "torch_cuda": _torch_cuda() if gpu else None,  # importing torch takes seconds: only where it could see one
    }


def _torch_cuda() -> str | None:
    """``torch X, GPU name`` when PyTorch and segmentation-models-pytorch are here and see a GPU, else None."""
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("torch", "segmentation_models_pytorch")):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}"


def choose_path(env: dict[str, Any]) -> str | None:
    """The strongest path :func:`detect` allows, or None (no GPU)."""
    if not env["gpu"]:
        return None
    if env["tritonserver"] and "tensorrt" in env["backends"] and env["trtexec"]:
        return "triton-tensorrt"
    if env["tritonserver"] and "onnxruntime" in env["backends"]:
        return "triton-ort"
    if "CUDAExecutionProvider" in env["ort_providers"]:
        return "ort-cuda"
    if env.get("torch_cuda"):
        return "torch-cuda"
    return None


def _step(cmd: list[str], budget: Budget, dry: bool, env: dict[str, str] | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    if dry:
        return
    if budget.left() <= 0:
        raise BenchError(f"no time left for: {' '.join(cmd[:4])} ...")
    subprocess.run(cmd, check=True, timeout=budget.timeout(), env={**os.environ, **(env or {})})


def _export(args: argparse.Namespace, onnx: Path, budget: Budget) -> None:
    ctscreen = [sys.executable, "-m", "ctscreen.cli"]
    for task, model, ckpt in (("valid-area", "valid_area", args.valid_ckpt), ("lesion", "lesion", args.lesion_ckpt)):
        target = onnx / model / "1" / "model.onnx"
        if target.is_file() and not args.dry_run:
            print(f"= {target} (exported before)")
            continue
        src = ["--checkpoint", str(ckpt)] if ckpt else ["--untrained", "--profile", "paper"]
        _step([*ctscreen, "export", task, *src, "--out", str(target)], budget, args.dry_run)


def _repository(args: argparse.Namespace, path: str, onnx: Path, budget: Budget) -> Path:
    """The repository Triton serves on ``path``: gpu + TensorRT plans, or gpu-ort."""
    ctscreen = [sys.executable, "-m", "ctscreen.cli"]
    profile = "gpu" if path == "triton-tensorrt" else "gpu-ort"
    src = args.out / f"src-{profile}"
    _step([*ctscreen, "repo", "build", "--profile", profile, "--onnx-dir", str(onnx), "--out", str(src),
           "--max-batch-size", "32", "--preferred-batch-sizes", "8,16,32"], budget, args.dry_run)
    if profile == "gpu-ort":
        return src
    repo = args.out / "repo-gpu"
    # the engines get what is left but the measuring's share; a cached plan makes this step seconds
    build_timeout = max(1, int(budget.left() - 120))
    _step(["bash", str(ROOT / "scripts" / "build_trt_engines.sh"), "--repo", str(src), "--out", str(repo),
           "--max-batch", "32", "--opt-batch", "16", "--precision", "fp16"], budget, args.dry_run,
          env={"BUILD_TIMEOUT": str(build_timeout)})
    return repo


@contextlib.contextmanager
def _triton(repo: Path, budget: Budget) -> Iterator[Any]:
    """The node's tritonserver (not the wheel's: it has the GPU backends) on loopback ports."""
    from benchmarks import stack

    os.environ.setdefault("CTSCREEN_TRITONSERVER", str(TRITON_HOME / "bin" / "tritonserver"))
    os.environ.setdefault("CTSCREEN_TRITON_BACKENDS", str(TRITON_HOME / "backends"))
    with stack.embedded_triton(repo, timeout=budget.timeout()) as triton:
        yield triton


def _slices(n: int) -> Any:
    from benchmarks.perf import sample_slices
    from benchmarks.sweep_inprocess import tile

    return tile(sample_slices(min(32, n)), n)


def _study_figures(run: dict[str, Any], slices: int) -> dict[str, Any]:
    return {"ms_per_slice": round(1000 * run["wall_s"] / run["slices"], 2),
            f"seconds_per_{slices}_slice_study": round(run["wall_s"] * slices / run["slices"], 2)}


def _measure_triton(args: argparse.Namespace, triton: Any, budget: Budget) -> dict[str, Any]:
    from benchmarks.ratios import ensemble_throughput

    hu = _slices(args.slices)
    ensemble_throughput(triton.grpc_url, hu[:32], batch=16, concurrency=2, min_slices=32)  # warm-up
    study = ensemble_throughput(triton.grpc_url, hu, batch=16, concurrency=4, min_slices=args.slices,
                                max_seconds=max(1.0, budget.left()))
    sweep = within(budget, SWEEP, lambda bc: ensemble_throughput(
        triton.grpc_url, hu, batch=bc[0], concurrency=bc[1], min_slices=args.slices, max_seconds=max(1.0, budget.left())),
        first_estimate=study["wall_s"], label=lambda bc: f"batch {bc[0]} concurrency {bc[1]}")
    return {"study": study, "runs": sweep.runs, "stopped": sweep.stopped}


def _ort_sessions(onnx: Path, providers: list[Any]) -> dict[str, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return {m: ort.InferenceSession(str(onnx / m / "1" / "model.onnx"), opts, providers=providers)
            for m in ("valid_area", "lesion")}


def ort_study(sessions: dict[str, Any], hu: Any, batch: int) -> dict[str, Any]:
    """One study (``hu`` ``[N, 1, 512, 512]`` INT16) in process: both models, then ``postprocess_batch``,
    batch after batch, post-processing overlapped with the next batch's models."""
    from concurrent.futures import ThreadPoolExecutor

    from ctscreen.contracts import HU_SLICES, PROB
    from ctscreen.postprocess import postprocess_batch

    t0 = time.monotonic()
    with ThreadPoolExecutor(1) as post:
        pending = []
        for i in range(0, len(hu), batch):
            b = hu[i : i + batch]
            valid, lesion = (sessions[m].run([PROB], {HU_SLICES: b})[0] for m in ("valid_area", "lesion"))
            pending.append(post.submit(postprocess_batch, valid, lesion, b))
        for f in pending:
            f.result()
    wall = time.monotonic() - t0
    return {"batch": batch, "slices": len(hu), "wall_s": round(wall, 3), "slices_per_s": round(len(hu) / wall, 3)}


def _measure_ort(args: argparse.Namespace, onnx: Path, budget: Budget, providers: list[Any]) -> dict[str, Any]:
    sessions = _ort_sessions(onnx, providers)
    hu = _slices(args.slices)
    ort_study(sessions, hu[: min(16, len(hu))], batch=min(16, len(hu)))  # warm-up: CUDA, cuDNN autotuning
    study = ort_study(sessions, hu, batch=16)
    sweep = within(budget, sorted({b for b, _ in SWEEP if b != 16} | {64}), lambda b: ort_study(sessions, hu, batch=b),
                   first_estimate=study["wall_s"], label=lambda b: f"batch {b}")
    return {"study": study, "runs": sweep.runs, "stopped": sweep.stopped,
            "providers": sessions["lesion"].get_providers()}


def torch_models(args: argparse.Namespace, device: str) -> tuple[dict[str, Any], bool]:
    """The two paper-profile networks in PyTorch on ``device`` (channels-last), from the checkpoints
    when given, else untrained; and whether they are trained (both)."""
    import torch

    from training.nets import HUSegmenter, NetSpec, build

    nets: dict[str, Any] = {}
    for model, ckpt_path in (("valid_area", args.valid_ckpt), ("lesion", args.lesion_ckpt)):
        if ckpt_path:
            from training.export import load_checkpoint

            ckpt = load_checkpoint(ckpt_path)
            net = HUSegmenter(NetSpec.from_dict(ckpt["spec"]))
            net.load_state_dict(ckpt["model"])
        else:
            torch.manual_seed(0)
            net = build(model, "paper")
        nets[model] = net.eval().to(device).to(memory_format=torch.channels_last)
    return nets, bool(args.valid_ckpt and args.lesion_ckpt)


def torch_study(nets: dict[str, Any], hu: Any, batch: int, *, precision: str = "fp16",
                post_maps: tuple[Any, Any] | None = None, workers: int = 4) -> dict[str, Any]:
    """One study (``hu`` ``[N, 1, 512, 512]`` INT16) in process with PyTorch: each batch goes to the
    device, through both networks, back as FP32 maps (the ensemble's contract), and on to
    ``postprocess_batch`` in ``workers`` CPU threads while the next batch runs.

    ``post_maps`` (valid, lesion ``[M, 1, 512, 512]``, slice ``i`` post-processes map ``i % M``): maps to
    post-process in place of the networks' own, for untrained networks, whose noise maps would make
    post-processing cost what no real map costs. Times per stage are summed over the study: ``h2d``,
    ``models`` (synchronised wall time), ``d2h`` and ``post`` (CPU seconds of the workers, overlapped with
    the rest); ``boxes`` counts the lesion boxes found."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from ctscreen.postprocess import postprocess_batch

    if precision not in ("fp16", "fp32"):
        raise ValueError(f'Argument "precision" must be fp16 or fp32, got {precision!r}.')
    device = next(nets["lesion"].parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    stages = {"h2d_s": 0.0, "models_s": 0.0, "d2h_s": 0.0, "post_s": 0.0}
    lock = threading.Lock()

    def post(i: int, v: Any, les: Any, b: Any) -> Any:
        t = time.thread_time()
        if post_maps is not None:
            idx = np.arange(i, i + len(b)) % len(post_maps[0])
            v, les = post_maps[0][idx], post_maps[1][idx]
        out = postprocess_batch(v, les, b)
        with lock:
            stages["post_s"] += time.thread_time() - t
        return out

    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=cuda and precision == "fp16")
    t0 = time.monotonic()
    with torch.inference_mode(), autocast, ThreadPoolExecutor(workers) as pool:
        pending = []
        for i in range(0, len(hu), batch):
            b = np.ascontiguousarray(hu[i : i + batch])
            t = time.monotonic()
            x = torch.from_numpy(b).to(device).contiguous(memory_format=torch.channels_last)
            if cuda:
                torch.cuda.synchronize()
            t1 = time.monotonic()
            maps = [nets[m](x).float() for m in ("valid_area", "lesion")]
            if cuda:
                torch.cuda.synchronize()
            t2 = time.monotonic()
            v, les = (m.cpu().numpy() for m in maps)
            t3 = time.monotonic()
            stages["h2d_s"] += t1 - t
            stages["models_s"] += t2 - t1
            stages["d2h_s"] += t3 - t2
            pending.append(pool.submit(post, i, v, les, b))
        boxes = sum(int(f.result()[1].sum()) for f in pending)
    wall = time.monotonic() - t0
    n = len(hu)
    return {"batch": batch, "precision": precision, "slices": n, "wall_s": round(wall, 3),
            "slices_per_s": round(n / wall, 3), "boxes": boxes,
            "ms_per_slice_by_stage": {k[:-2]: round(1000 * v / n, 3) for k, v in stages.items()}}


def _measure_torch(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    import torch

    from benchmarks.inprocess import OrtPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    nets, trained = torch_models(args, device)
    hu = _slices(args.slices)
    post_maps = None
    if not trained:  # untrained networks give noise maps: post-process the shipped models' maps instead
        try:
            post_maps = OrtPipeline(threads=2).maps(hu[:32])
        except BenchError as exc:
            print(f"gpu_paper_profile: {exc}; post-processing the untrained networks' own maps", file=sys.stderr)
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    for precision, batch in (("fp16", 16), *TORCH_SWEEP):  # warm-up: cuDNN picks its kernels per shape
        torch_study(nets, hu[: min(batch, len(hu))], batch, precision=precision, post_maps=post_maps, workers=workers)
    study = torch_study(nets, hu, 16, precision="fp16", post_maps=post_maps, workers=workers)
    sweep = within(budget, TORCH_SWEEP, lambda pb: torch_study(nets, hu, pb[1], precision=pb[0], post_maps=post_maps,
                                                              workers=workers),
                   first_estimate=study["wall_s"], label=lambda pb: f"{pb[0]} batch {pb[1]}")
    return {"study": study, "runs": sweep.runs, "stopped": sweep.stopped, "device": device,
            "torch": torch.__version__, "trained_weights": trained, "post_workers": workers,
            "post_maps": "the networks' own" if post_maps is None else
            "the shipped lite models' maps of the same slices (the paper networks are untrained)"}


def run(args: argparse.Namespace) -> int:
    budget = Budget(args.budget_s)
    env = detect()
    path: str | None = "ort-cpu-smoke" if args.cpu_smoke else args.path or choose_path(env)
    print(f"node: gpu {env['gpu']}, tritonserver {env['tritonserver']}, backends {env['backends'] or 'none'}, "
          f"trtexec {env['trtexec']}, onnxruntime {env['ort_providers'] or 'missing'}")
    print(f"path: {path or 'none'}; budget {args.budget_s:.0f} s ({RESERVE_S:.0f} s kept for the results)")
    if path is None and not args.dry_run:
        print("gpu_paper_profile: no GPU path on this node (no GPU, or neither a GPU tritonserver nor ONNX "
              "Runtime's CUDA provider); --dry-run prints the plan, --cpu-smoke checks the code on the CPU",
              file=sys.stderr)
        return 2
    onnx = ROOT / "model_repository" if path == "ort-cpu-smoke" else args.out / "onnx"
    if args.dry_run:
        paths = [path] if path else list(PATHS)
        for p in paths:
            print(f"\n# {p}")
            if p not in ("ort-cpu-smoke", "torch-cuda"):
                _export(args, onnx, budget)
            if p.startswith("triton"):
                repo = _repository(args, p, onnx, budget)
                print(f"+ tritonserver --model-repository={repo} (loopback, free ports), then ct_screen over gRPC: "
                      f"one {args.slices}-slice study at batch 16 x 4 in flight, then {list(SWEEP)} while time lasts")
            elif p == "torch-cuda":
                print(f"+ PyTorch CUDA in process (training.nets, paper profile, FP16 autocast): one {args.slices}-slice "
                      f"study at batch 16, then {list(TORCH_SWEEP)} while time lasts")
            else:
                print(f"+ ONNX Runtime {'CPU' if p == 'ort-cpu-smoke' else 'CUDA'} in process: one {args.slices}-slice "
                      "study at batch 16, then other batches while time lasts")
        return 0
    assert path is not None  # refused above unless --dry-run
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        if path.startswith("triton"):
            _export(args, onnx, budget)
            try:
                repo = _repository(args, path, onnx, budget)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                if path != "triton-tensorrt" or "onnxruntime" not in env["backends"]:
                    raise
                print(f"gpu_paper_profile: the TensorRT plans did not build ({type(exc).__name__}); "
                      "falling back to the gpu-ort profile", file=sys.stderr)
                path = "triton-ort"
                repo = _repository(args, path, onnx, budget)
            with _triton(repo, budget) as triton:
                res = _measure_triton(args, triton, budget)
        elif path == "torch-cuda":
            res = _measure_torch(args, budget)
        else:
            if path == "ort-cuda":
                _export(args, onnx, budget)
                providers: list[Any] = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}),
                                        "CPUExecutionProvider"]
            else:
                providers = ["CPUExecutionProvider"]
            res = _measure_ort(args, onnx, budget, providers)
    except subprocess.TimeoutExpired as exc:
        print(f"gpu_paper_profile: out of time in: {' '.join(map(str, exc.cmd))[:200]}", file=sys.stderr)
        return 1
    best = max([res["study"], *res["runs"]], key=lambda r: r["slices_per_s"])
    doc = {
        "benchmark": "gpu", "path": path, "smoke": path == "ort-cpu-smoke", "started": started,
        "profile": "lite models on the CPU (smoke)" if path == "ort-cpu-smoke" else "paper (UNet++ ResNet-50, 512)",
        "node": env, "budget_s": args.budget_s, "elapsed_s": round(budget.elapsed(), 1), **res, "best": best,
        "summary": {"path": path, "study_slices": args.slices, **_study_figures(res["study"], STUDY),
                    "best_slices_per_s": best["slices_per_s"], "elapsed_s": round(budget.elapsed(), 1),
                    "paper_s_per_patient": 41.34},
    }
    doc["machine"] = machine_info()
    doc["machine"]["gpu"] = _gpu_name()
    out = args.results or (TMP_DIR / "gpu-smoke.json" if doc["smoke"] else results_dir() / "gpu-latest.json")
    print(f"{path}: {doc['summary']['ms_per_slice']} ms per slice, {doc['summary'][f'seconds_per_{STUDY}_slice_study']} s "
          f"per {STUDY}-slice study (one {args.slices}-slice study measured), best {best['slices_per_s']} slices/s; "
          f"{doc['elapsed_s']} s of {args.budget_s:.0f}" + (f"; stopped: {'; '.join(res['stopped'])}" if res["stopped"] else ""))
    print(f"gpu: {write_json(Path(out), doc)}")
    return 0


def _gpu_name() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    r = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctscreen bench gpu", description=__doc__.split("\n\n")[0])
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
    r = sub.add_parser("run", help="everything on this node within the budget (default 480 s): export, serve, measure")
    r.add_argument("--out", type=Path, default=TMP_DIR / "gpu-paper", help="work folder (ONNX, repositories)")
    r.add_argument("--valid-ckpt", type=Path)
    r.add_argument("--lesion-ckpt", type=Path)
    r.add_argument("--path", choices=PATHS, help="force a path (default: the strongest this node has)")
    r.add_argument("--slices", type=int, default=STUDY, help=f"slices of the measured study (default {STUDY})")
    r.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for the whole run (default 480)")
    r.add_argument("--results", type=Path, help="result file (default results/gpu-latest.json)")
    r.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    r.add_argument("--cpu-smoke", action="store_true", help="the in-process path on the CPU with the lite models")
    args = p.parse_args(argv)
    if args.cmd == "run" and (args.slices < 1 or args.budget_s <= RESERVE_S):
        p.error(f"--slices must be >= 1 and --budget-s > {RESERVE_S:.0f}")
    try:
        if args.cmd == "run":
            return run(args)
        return build(args) if args.cmd == "build" else measure(args)
    except (BenchError, UnsafeTarget) as exc:
        print(f"gpu_paper_profile: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"gpu_paper_profile: step failed (exit {exc.returncode}): {' '.join(map(str, exc.cmd))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
