"""Overhead ratios, each measured in one run on one machine.

1. in-process ONNX Runtime (``OrtPipeline``) - the reference;
2. the Triton ensemble through ``tritonclient.grpc.aio`` (binary INT16, batched, concurrent);
3. the gateway end to end (DICOM upload -> decode -> fan-out -> verdict), whole studies;
4. a client in the style of MONAI Deploy's ``TritonRemoteModel`` on the same Triton;
5. one 300-slice study through the gateway on the cpu profile.

The MONAI-style client mirrors ``monai/deploy/core/models/triton_model.py`` (monai-deploy-app-sdk):
a synchronous ``tritonclient.http.InferenceServerClient``, one request per call, the input sent as
JSON (``set_data_from_numpy(..., binary_data=False)``), outputs requested binary, a per-model
``{model}_count`` query parameter, called once per slice (``DICOMSeriesToVolumeOperator``-style
pydicom decoding in front of it). It asks for the three ensemble outputs instead of only the first,
because the verdict needs them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import promstats
from benchmarks.common import check_target, goal_line, machine_info
from benchmarks.dicom_volume import decode_series
from benchmarks.inprocess import best_ort, cores
from benchmarks.studies import PoolStudy
from ctscreen.contracts import BOX_COUNT, ENSEMBLE_MODEL, HU_SLICES, LESION_BOXES, VALID_AREA_BOX

logger = logging.getLogger(__name__)

GOALS = {
    "ensemble_over_ort": 0.95,
    "gateway_over_ort": 0.85,
    "ctscreen_over_monai_style": 3.0,
    "study_300_seconds": 30.0,
}


# --- Triton ensemble, the way the gateway calls it -----------------------------------------------


async def ensemble_throughput_async(
    grpc_url: str,
    slices: np.ndarray,
    *,
    batch: int = 4,
    concurrency: int = 2,
    min_slices: int = 64,
    max_seconds: float = 60.0,
) -> dict[str, Any]:
    """Slices/s of ``ct_screen`` over gRPC: ``concurrency`` requests of ``batch`` slices in flight."""
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.grpc import InferInput, InferRequestedOutput

    batches = [slices[i : i + batch] for i in range(0, len(slices) - batch + 1, batch)] or [slices[:batch]]
    outputs = [InferRequestedOutput(n) for n in (LESION_BOXES, BOX_COUNT, VALID_AREA_BOX)]
    client = grpcaio.InferenceServerClient(grpc_url)
    try:

        async def infer(hu: np.ndarray) -> None:
            inp = InferInput(HU_SLICES, list(hu.shape), "INT16")
            inp.set_data_from_numpy(hu)
            await client.infer(ENSEMBLE_MODEL, [inp], outputs=outputs, client_timeout=120)

        await infer(batches[0])  # warm connection
        done = 0
        t0 = time.monotonic()
        deadline = t0 + max_seconds

        async def worker(k: int) -> int:
            n, j = 0, k
            nonlocal done
            while done < min_slices and time.monotonic() < deadline:
                b = batches[j % len(batches)]
                await infer(b)
                n += len(b)
                done += len(b)
                j += concurrency
            return n

        total = sum(await asyncio.gather(*(worker(k) for k in range(concurrency))))
        wall = time.monotonic() - t0
    finally:
        await client.close()
    return {"batch": batch, "concurrency": concurrency, "slices": total, "wall_s": round(wall, 3),
            "slices_per_s": round(total / wall, 3)}


def ensemble_throughput(grpc_url: str, slices: np.ndarray, **kw: Any) -> dict[str, Any]:
    return asyncio.run(ensemble_throughput_async(grpc_url, slices, **kw))


# --- MONAI Deploy style -----------------------------------------------------------------------------


class MonaiStyleRemoteModel:
    """A faithful stand-in for MONAI Deploy's ``TritonRemoteModel.__call__`` (see module docstring)."""

    def __init__(self, http_url: str, model: str = ENSEMBLE_MODEL) -> None:
        import tritonclient.http as httpclient

        self._http = httpclient
        netloc = http_url.split("://", 1)[-1].rstrip("/")
        self._client = httpclient.InferenceServerClient(url=netloc, network_timeout=300)
        self._model = model
        self._count = 0

    def __call__(self, data: np.ndarray) -> dict[str, np.ndarray]:
        self._count += 1
        inp = self._http.InferInput(HU_SLICES, list(data.shape), "INT16")
        inp.set_data_from_numpy(data, binary_data=False)
        outs = [self._http.InferRequestedOutput(n, binary_data=True) for n in (LESION_BOXES, BOX_COUNT, VALID_AREA_BOX)]
        res = self._client.infer(self._model, [inp], outputs=outs, query_params={f"{self._model}_count": self._count})
        return {n: res.as_numpy(n) for n in (LESION_BOXES, BOX_COUNT, VALID_AREA_BOX)}

    def close(self) -> None:
        self._client.close()


def monai_style_study(model: MonaiStyleRemoteModel, study: PoolStudy) -> dict[str, Any]:
    """Screen one study the MONAI-style way: decode, one synchronous JSON request per slice, case rule."""
    t0 = time.monotonic()
    hu, meta = decode_series(study.files)
    t_decode = time.monotonic() - t0
    per_slice = [model(hu[i][None, None]) for i in range(len(hu))]
    t_infer = time.monotonic() - t0 - t_decode
    verdict = None
    try:
        from aggregator.case import CaseRule, SliceInput, decide

        inputs = [
            SliceInput(uid, pos, r[LESION_BOXES][0][: int(r[BOX_COUNT].reshape(-1)[0])], r[VALID_AREA_BOX].reshape(-1)[:4])
            for (uid, pos), r in zip(meta, per_slice, strict=True)
        ]
        verdict = decide(inputs, CaseRule()).verdict
    except ImportError:
        pass
    wall = time.monotonic() - t0
    return {"slices": len(hu), "wall_s": round(wall, 3), "decode_s": round(t_decode, 3),
            "infer_s": round(t_infer, 3), "verdict": verdict}


def monai_style_run(http_url: str, studies: Sequence[PoolStudy], max_seconds: float = 600.0) -> dict[str, Any]:
    """Studies one after another (the way one MONAI Deploy app instance runs); studies/hour."""
    model = MonaiStyleRemoteModel(http_url)
    runs = []
    t0 = time.monotonic()
    try:
        for s in studies:
            runs.append(monai_style_study(model, s))
            if time.monotonic() - t0 > max_seconds:
                break
    finally:
        model.close()
    wall = time.monotonic() - t0
    slices = sum(r["slices"] for r in runs)
    return {"studies": len(runs), "slices": slices, "wall_s": round(wall, 3),
            "studies_per_hour": round(len(runs) / wall * 3600, 2), "slices_per_s": round(slices / wall, 3),
            "runs": runs}


# --- the whole comparison ------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run_ratios(
    triton: Any,
    gateway_url: str | None,
    *,
    study_slices: int = 60,
    studies: int = 4,
    big_study: int = 300,
    gateway_concurrency: int = 2,
    ort_min_slices: int = 64,
    rounds: int = 2,
    allow_remote: bool = False,
    skip: Sequence[str] = (),
) -> dict[str, Any]:
    """Measure every ratio in one run; returns the report section (goals, figures, breakdown)."""
    from benchmarks.load import LoadConfig, run_load
    from benchmarks.perf import sample_slices
    from benchmarks.studies import build_pool

    check_target(triton.grpc_url, allow_remote=allow_remote)
    out: dict[str, Any] = {"machine": machine_info(), "cores_used": cores()}
    slices = sample_slices(16)

    # ORT and the ensemble alternate (rounds), so that drift in the machine's load hits both alike;
    # each side keeps its best run.
    ort_runs: list[dict[str, Any]] = []
    ens_runs: list[dict[str, Any]] = []
    before = promstats.scrape(triton.metrics_url, allow_remote=allow_remote) if triton.metrics_url else None
    for r in range(rounds):
        logger.info("round %d: in-process ORT ...", r + 1)
        ort_runs += best_ort(slices, min_slices=ort_min_slices)["runs"]
        logger.info("round %d: Triton ensemble ...", r + 1)
        ens_runs += [ensemble_throughput(triton.grpc_url, slices, batch=b, concurrency=c, min_slices=ort_min_slices)
                     for b, c in ((4, 2), (4, 3), (8, 2))]
    out["ort"] = {"best": max(ort_runs, key=lambda r: r["slices_per_s"]), "runs": ort_runs}
    out["ensemble"] = {"best": max(ens_runs, key=lambda r: r["slices_per_s"]), "runs": ens_runs}
    if before is not None:
        after = promstats.scrape(triton.metrics_url, allow_remote=allow_remote)
        out["ensemble"]["triton"] = promstats.triton_summary(promstats.delta(before, after))
    ort_sps = out["ort"]["best"]["slices_per_s"]
    ens_sps = out["ensemble"]["best"]["slices_per_s"]

    gw_sps = monai_sph = ct_sph = big_s = None
    if gateway_url and "gateway" not in skip:
        pool = build_pool([study_slices] * studies)
        plan = list(pool.values())
        logger.info("gateway end to end ...")
        cfg = LoadConfig(url=gateway_url, mode="closed", concurrency=gateway_concurrency, duration=600,
                         max_studies=studies, sizes=f"fixed:{study_slices}", study_timeout=600,
                         triton_metrics_url=triton.metrics_url, allow_remote=allow_remote)
        out["gateway"] = run_load(cfg, pool)
        gw_sps = out["gateway"]["slices_per_s"] if out["gateway"]["completed"] else None
        ct_sph = out["gateway"]["studies_per_hour"] if out["gateway"]["completed"] else None
        if "monai" not in skip:
            logger.info("MONAI-style client ...")
            out["monai_style"] = monai_style_run(triton.http_url, [plan[i % len(plan)] for i in range(studies)])
            monai_sph = out["monai_style"]["studies_per_hour"]
        if big_study and "big" not in skip:
            logger.info("one %d-slice study ...", big_study)
            cfg = LoadConfig(url=gateway_url, mode="closed", concurrency=1, duration=600, max_studies=1,
                             sizes=f"fixed:{big_study}", kinds=("covid",), study_timeout=600,
                             triton_metrics_url=triton.metrics_url, allow_remote=allow_remote)
            out["study_300"] = run_load(cfg)
            big_s = out["study_300"]["latency_s"]["max"]

    r_ens, r_gw, r_monai = _ratio(ens_sps, ort_sps), _ratio(gw_sps, ort_sps), _ratio(ct_sph, monai_sph)
    out["goals"] = [
        goal_line("Triton ensemble / in-process ORT (slices/s)", ">= 0.95", r_ens,
                  None if r_ens is None else r_ens >= GOALS["ensemble_over_ort"]),
        goal_line("gateway end-to-end / in-process ORT (slices/s)", ">= 0.85", r_gw,
                  None if r_gw is None else r_gw >= GOALS["gateway_over_ort"]),
        goal_line("ctscreen / MONAI-style client (studies/hour)", ">= 3", r_monai,
                  None if r_monai is None else r_monai >= GOALS["ctscreen_over_monai_style"]),
        goal_line(f"{big_study}-slice cpu-profile study, end to end", "<= 30 s", big_s,
                  None if big_s is None else big_s <= GOALS["study_300_seconds"], "s",
                  _why_not(out.get("study_300"), big_s)),
    ]
    out["goals"][1]["note"] = _why_not(out.get("gateway"), gw_sps)
    out["goals"][2]["note"] = _why_not(out.get("gateway"), ct_sph)
    out["figures"] = {"ort_slices_per_s": ort_sps, "ensemble_slices_per_s": ens_sps,
                      "gateway_slices_per_s": gw_sps, "ctscreen_studies_per_hour": ct_sph,
                      "monai_style_studies_per_hour": monai_sph, "study_300_s": big_s}
    out["where_the_time_goes"] = explain(out)
    return out


def _why_not(run: dict[str, Any] | None, value: float | None) -> str | None:
    """Why a figure is missing: the load run's errors and the gateway's messages."""
    if value is not None or not run:
        return None
    msgs = sorted({s["message"] for s in run.get("studies", []) if s.get("message")})
    return f"failed: {run.get('errors')}" + (f" ({msgs[0]})" if msgs else "")


def explain(out: dict[str, Any]) -> list[str]:
    """Plain sentences on where the time goes, from the measured breakdowns."""
    lines: list[str] = []
    ort = out.get("ort", {}).get("best")
    if ort:
        how = ("valid-area and lesion sessions at once, 1 thread each, post-processing overlapped"
               if ort["workers"] == "pipelined" else f"{ort['workers']} worker(s) x {ort['threads_per_worker']} thread(s)")
        lines.append(f"In-process ORT (best of {len(out['ort']['runs'])} runs): {1000 / ort['slices_per_s']:.1f} ms per "
                     f"slice (batch {ort['batch']}, {how}).")
    fig = out.get("figures") or {}
    ms = {k: 1000 / v for k in ("ort_slices_per_s", "ensemble_slices_per_s", "gateway_slices_per_s")
          if (v := fig.get(k))}
    if "ort_slices_per_s" in ms and "ensemble_slices_per_s" in ms:
        lines.append(f"Triton ensemble: {ms['ensemble_slices_per_s']:.1f} ms per slice, "
                     f"{ms['ensemble_slices_per_s'] - ms['ort_slices_per_s']:+.1f} ms against in-process "
                     "(serialisation, gRPC, shared memory to the python-backend stubs, dynamic-batching delay).")
    if "ensemble_slices_per_s" in ms and "gateway_slices_per_s" in ms:
        lines.append(f"Gateway end to end: {ms['gateway_slices_per_s']:.1f} ms per slice, "
                     f"{ms['gateway_slices_per_s'] - ms['ensemble_slices_per_s']:+.1f} ms against the bare ensemble "
                     "(upload, DICOM decoding and the case rule share the same 2 cores as Triton).")
    tri = out.get("ensemble", {}).get("triton") or {}
    for model, m in tri.items():
        if m.get("inferences"):
            per_slice = (m["compute_infer_us"] or 0) * m["requests"] / m["inferences"] / 1000
            name = f"{model} (the whole ensemble; its steps overlap)" if model == ENSEMBLE_MODEL else model
            lines.append(f"Triton {name}: {m['requests']} requests, avg batch {m['avg_batch']}, queue "
                         f"{(m['queue_us'] or 0) / 1000:.1f} ms/request, compute {per_slice:.1f} ms/slice.")
    gw = out.get("gateway") or {}
    stages = gw.get("gateway_stages") or {}
    for key, h in stages.items():
        lines.append(f"gateway {key}: mean {h['mean'] * 1000:.1f} ms over {h['count']}")
    if gw.get("errors"):
        lines.append(f"gateway errors: {gw['errors']}")
    mon = out.get("monai_style") or {}
    if mon.get("runs"):
        dec = sum(r["decode_s"] for r in mon["runs"])
        inf = sum(r["infer_s"] for r in mon["runs"])
        lines.append(f"MONAI-style: {dec:.1f} s decoding, {inf:.1f} s in one-at-a-time JSON requests "
                     f"({1000 * inf / max(1, mon['slices']):.1f} ms per slice).")
    return lines
