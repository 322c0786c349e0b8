"""Model-level benchmarks: perf_analyzer concurrency sweeps over each model and the ensemble.

perf_analyzer comes from the ``tritonclient==2.51.0`` wheel (``.venv/bin/perf_analyzer``); it needs
Debian ``libb64-0d`` and ``libcudart.so.12`` from PyPI ``nvidia-cuda-runtime-cu12`` on
``LD_LIBRARY_PATH`` (``scripts/install_perf_analyzer.sh`` installs both). Inputs are real data: HU
slices of a phantom study (INT16 ``[1, 512, 512]``) for ``valid_area``, ``lesion`` and ``ct_screen``,
and for ``postprocess`` the FP32 probability maps that the shipped ONNX models make of those slices
(random maps when the ONNX files are not there yet). Each sweep writes perf_analyzer's CSV under
``benchmarks/results/perf/`` (perf_analyzer's own log under ``results/tmp/perf_logs``).
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, TMP_DIR, BenchError, check_target, results_dir
from ctscreen.contracts import (
    ENSEMBLE_MODEL,
    HU_SLICES,
    LESION_MODEL,
    LESION_PROB,
    POSTPROCESS_MODEL,
    SLICE_SIZE,
    VALID_AREA_MODEL,
    VALID_PROB,
)

logger = logging.getLogger(__name__)

MODELS = (VALID_AREA_MODEL, LESION_MODEL, POSTPROCESS_MODEL, ENSEMBLE_MODEL)
SLICE_SHAPE = (1, SLICE_SIZE, SLICE_SIZE)


def find_perf_analyzer() -> Path:
    """The perf_analyzer binary of the tritonclient wheel (or on PATH)."""
    venv_bin = Path(sys.executable).parent
    site = Path(np.__file__).resolve().parent.parent
    for cand in (
        venv_bin / "perf_analyzer",
        ROOT / ".venv" / "bin" / "perf_analyzer",
        site / "tritonclient" / "bin" / "perf_analyzer",
    ):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("perf_analyzer")
    if found:
        return Path(found)
    raise BenchError("perf_analyzer not found: run scripts/install_perf_analyzer.sh (tritonclient==2.51.0 ships it)")


def perf_env() -> dict[str, str]:
    """The environment perf_analyzer needs: libcudart.so.12 (nvidia-cuda-runtime-cu12) on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    site = Path(np.__file__).resolve().parent.parent
    libdirs = [str(p.parent) for p in site.glob("nvidia/cuda_runtime/lib/libcudart.so.12*")]
    if not libdirs:
        raise BenchError(
            "libcudart.so.12 not found in the venv: run scripts/install_perf_analyzer.sh "
            "(pip install nvidia-cuda-runtime-cu12)"
        )
    env["LD_LIBRARY_PATH"] = os.pathsep.join([libdirs[0], *filter(None, [env.get("LD_LIBRARY_PATH")])])
    return env


def check_perf_analyzer() -> str:
    """Run ``perf_analyzer --version``; return its output or raise :class:`BenchError` naming what is missing."""
    exe = find_perf_analyzer()
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=perf_env(), timeout=30)
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or "error while loading shared libraries" in text:
        raise BenchError(f"{exe} does not start: {text.splitlines()[-1] if text else proc.returncode}"
                         " (Debian libb64-0d missing? run scripts/install_perf_analyzer.sh)")
    return text


def sample_slices(n: int = 4, seed: int = 7) -> np.ndarray:
    """``n`` INT16 HU slices ``[n, 1, 512, 512]`` through the lungs of a phantom COVID study."""
    from benchmarks.studies import load_phantom

    try:
        study = load_phantom(writer=False).make_study(seed, kind="covid", n_slices=max(8, 2 * n))
        hu = np.asarray(study.hu, dtype=np.int16)
    except BenchError as exc:
        logger.warning("%s; using plain ellipse slices", exc)
        hu = _ellipse_slices(max(8, 2 * n))
    z = hu.shape[0]
    idx = np.linspace(z // 4, 3 * z // 4, n).round().astype(int)
    return hu[idx][:, None].copy()


def _ellipse_slices(z: int) -> np.ndarray:
    """Air, a soft-tissue body and two lungs with a dense blob: a stand-in while ``phantom`` is missing."""
    yy, xx = np.mgrid[:SLICE_SIZE, :SLICE_SIZE]
    hu = np.full((z, SLICE_SIZE, SLICE_SIZE), -1000, np.int16)
    body = ((xx - 256) / 220) ** 2 + ((yy - 256) / 160) ** 2 <= 1
    hu[:, body] = 40
    for cx in (170, 342):
        hu[:, ((xx - cx) / 70) ** 2 + ((yy - 250) / 110) ** 2 <= 1] = -850
    hu[z // 3 : 2 * z // 3, 230:250, 150:175] = -300
    return hu


def _model_maps(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Valid-area and lesion maps of ``slices`` from the shipped ONNX models, or None if absent."""
    from benchmarks.inprocess import OrtPipeline

    try:
        pipe = OrtPipeline(threads=1)
    except BenchError as exc:
        logger.warning("postprocess input: %s; using random maps", exc)
        return None
    return pipe.maps(slices)


def input_data_file(model: str, input_names: Sequence[str], out_dir: Path, n: int = 4) -> Path:
    """Write perf_analyzer ``--input-data`` JSON with ``n`` realistic requests for ``model``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slices = sample_slices(n)
    streams: list[dict[str, Any]] = []
    if model == POSTPROCESS_MODEL:
        maps = _model_maps(slices)
        if maps is None:
            rng = np.random.default_rng(0)
            maps = (rng.random(slices.shape, dtype=np.float32), rng.random(slices.shape, dtype=np.float32))
        expected = {VALID_PROB, LESION_PROB, HU_SLICES}
        if set(input_names) != expected:
            raise BenchError(f"model {model!r} has inputs {list(input_names)}, expected {sorted(expected)}")
        arrays = {VALID_PROB: maps[0], LESION_PROB: maps[1], HU_SLICES: slices}
        for i in range(n):
            streams.append({
                name: {"b64": base64.b64encode(a[i].tobytes()).decode(), "shape": list(SLICE_SHAPE)}
                for name, a in arrays.items()
            })
    else:
        for i in range(n):
            streams.append({HU_SLICES: {"b64": base64.b64encode(slices[i].tobytes()).decode(), "shape": list(SLICE_SHAPE)}})
    path = out_dir / f"input_{model}.json"
    path.write_text(json.dumps({"data": streams}))
    return path


def model_inputs(http_url: str, model: str) -> list[str]:
    """Input names of ``model`` from the server's metadata (HTTP)."""
    import tritonclient.http as httpclient

    try:
        cli = httpclient.InferenceServerClient(http_url.split("://", 1)[-1].rstrip("/"), connection_timeout=10,
                                               network_timeout=30)
        meta = cli.get_model_metadata(model)
        cli.close()
    except Exception as exc:  # tritonclient raises its own and socket errors
        raise BenchError(f"cannot read metadata of model {model!r} at {http_url}: {exc}") from exc
    return [i["name"] for i in meta["inputs"]]


def read_csv(path: Path) -> list[dict[str, Any]]:
    """perf_analyzer's CSV as rows of floats (column names kept)."""
    rows = []
    with path.open() as fh:
        for row in csv.DictReader(fh):
            rows.append({k.strip(): _num(v) for k, v in row.items() if k})
    return rows


def _num(v: str | None) -> Any:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return v


def run_scenario(
    model: str,
    grpc_url: str,
    *,
    input_data: Path | str = "random",
    input_names: Sequence[str] = (HU_SLICES,),
    batch: int = 1,
    concurrency: tuple[int, int, int] = (1, 4, 1),
    request_count: int = 20,
    max_trials: int = 6,
    stability: int = 50,
    timeout: float = 600.0,
    out_dir: Path | None = None,
    allow_remote: bool = False,
) -> dict[str, Any]:
    """One perf_analyzer sweep of ``model``; returns the command, CSV path and rows."""
    check_target(grpc_url, allow_remote=allow_remote)
    if model not in MODELS:
        raise ValueError(f'Argument "model" must be one of {", ".join(MODELS)}, got {model!r}.')
    if batch < 1:
        raise ValueError(f'Argument "batch" must be >= 1, got {batch}.')
    lo, hi, step = concurrency
    if not 1 <= lo <= hi or step < 1:
        raise ValueError(f'Argument "concurrency" must be start:end:step with 1 <= start <= end, got {concurrency}.')
    out_dir = out_dir or results_dir() / "perf"
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{model}_b{batch}_c{lo}-{hi}.csv"
    cmd = [
        str(find_perf_analyzer()), "-m", model, "-u", grpc_url, "-i", "grpc", "-b", str(batch),
        "--concurrency-range", f"{lo}:{hi}:{step}",
        "--measurement-mode", "count_windows", "--measurement-request-count", str(request_count),
        "--max-trials", str(max_trials), "--stability-percentage", str(stability),
        "--input-data", str(input_data), "-f", str(csv_path),
    ]
    for name in input_names:
        cmd += ["--shape", f"{name}:{','.join(map(str, SLICE_SHAPE))}"]
    logger.info("running %s", " ".join(cmd))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=perf_env(), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"perf_analyzer on {model!r} ran past {timeout:.0f} s") from exc
    (TMP_DIR / "perf_logs").mkdir(parents=True, exist_ok=True)
    (TMP_DIR / "perf_logs" / f"{model}_b{batch}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not csv_path.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise BenchError(f"perf_analyzer on {model!r} failed (exit {proc.returncode}): {' | '.join(tail)}")
    rows = sorted(read_csv(csv_path), key=lambda r: r.get("Concurrency") or 0)
    for r in rows:
        if r.get("Inferences/Second") is not None:
            r["slices_per_s"] = r["Inferences/Second"]  # one inference = one slice (batch counted by PA)
    return {
        "model": model,
        "batch": batch,
        "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
        "csv": str(csv_path.relative_to(ROOT)) if csv_path.is_relative_to(ROOT) else str(csv_path),
        "seconds": round(time.monotonic() - t0, 1),
        "rows": rows,
    }


def sweep(
    grpc_url: str,
    http_url: str,
    *,
    models: Sequence[str] = MODELS,
    batches: Sequence[int] = (1,),
    concurrency: tuple[int, int, int] = (1, 4, 1),
    request_count: int = 20,
    stability: int = 50,
    timeout: float = 600.0,
    allow_remote: bool = False,
) -> dict[str, Any]:
    """Sweep concurrency over each model and the ensemble; failures are recorded, not raised."""
    check_target(http_url, allow_remote=allow_remote)
    version = check_perf_analyzer()
    data_dir = TMP_DIR / "perf_input"
    results: list[dict[str, Any]] = []
    for model in models:
        try:
            names = model_inputs(http_url, model)
            data = input_data_file(model, names, data_dir)
        except BenchError as exc:
            results.append({"model": model, "error": str(exc)})
            continue
        for b in batches:
            try:
                results.append(run_scenario(
                    model, grpc_url, input_data=data, input_names=names, batch=b, concurrency=concurrency,
                    request_count=request_count, stability=stability, timeout=timeout, allow_remote=allow_remote,
                ))
            except BenchError as exc:
                logger.error("%s", exc)
                results.append({"model": model, "batch": b, "error": str(exc)})
    return {"perf_analyzer": version.splitlines()[0] if version else "", "scenarios": results}
