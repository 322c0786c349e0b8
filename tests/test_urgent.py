"""Urgent studies overtake routine ones: in Triton's queues, in the gateway's pool and in the worker's slots.

Real Triton (the session fixture ``triton``, cpu profile), real gRPC through the gateway's own pool and, for the
end-to-end test, a live gateway (uvicorn) screening real phantom DICOM uploads. Nothing is faked here; the
pool's own slot order under a fake client is in ``tests/test_gateway_app_pool.py``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

import phantom
from ctscreen import contracts as c
from gateway.cli import run_stack
from gateway.client import http_client
from gateway.jobs import PRIORITIES, triton_priority
from gateway.triton_pool import TritonPool

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600)]

ROUTINE_BATCHES = 64
"""Routine requests queued ahead of the urgent one. Those it may not overtake are the lesion net's batches in
execution when it reaches that net's queue (2 instances here, up to 4 requests a batch) and the routine
requests batched with it: a dozen, measured up to 12 of 22 on a loaded CI machine. Against 64 requests queued
the urgent one comes after at most half of them; sent at the routine level it comes after all of them."""


async def _overtaken(url: str, model: str, *, drain: bool = True) -> tuple[int, int]:
    """How many routine requests, of those still unanswered when an urgent one was sent, Triton answered
    before it, and how many there were. The routine requests (``ROUTINE_BATCHES`` batches of 2 slices) are all
    in Triton's queue at once (the pool's room is larger than them); the urgent batch goes once the first
    routine answer is back (Triton is busy and its queue full). ``drain=False``: the routine requests still
    unanswered once the urgent one is back are given up, not waited for (a server stopped next)."""
    pool = TritonPool([url], model_name=model, batch_size=2, max_inflight=ROUTINE_BATCHES + 1, timeout_s=120)
    rng = np.random.default_rng(7)
    batch = rng.integers(-1000, 200, (2, c.SLICE_SIZE, c.SLICE_SIZE)).astype(np.int16)
    answered: list[str] = []
    first = asyncio.Event()

    async def one(name: str, priority: int) -> None:
        await pool.infer_batch(batch, priority=priority)
        answered.append(name)
        first.set()

    try:
        await pool.infer_batch(batch)  # warm: the client connected
        routine = [asyncio.ensure_future(one(f"r{i}", triton_priority(PRIORITIES["routine"])))
                   for i in range(ROUTINE_BATCHES)]
        await first.wait()
        pending = ROUTINE_BATCHES - len(answered)
        before = len(answered)
        await one("urgent", triton_priority(PRIORITIES["urgent"]))
        overtaking = len(answered) - 1 - before
        if not drain:
            for task in routine:
                task.cancel()
        await asyncio.gather(*routine, return_exceptions=not drain)
    finally:
        await pool.close()
    return overtaking, pending


def test_triton_answers_an_urgent_request_before_the_routine_ones_waiting(triton):
    """Sent to the ensemble behind a full queue of routine requests, an urgent one is answered after those
    Triton was already running, not after the queue: sent without its priority level (or to models without
    ``priority_levels``) it was answered last of all. (The cpu profile's ``ct_screen_fused`` has no levels:
    docs/triton.md says why.)"""
    overtaking, pending = asyncio.run(_overtaken(triton.grpc_url, c.ENSEMBLE_MODEL))
    assert pending >= ROUTINE_BATCHES - 4, f"the queue drained before the urgent request went ({pending} left)"
    # the requests in execution when it arrived (two instances, batches of up to max_batch_size) finish first
    assert overtaking <= pending // 2, f"{overtaking} of {pending} routine requests were answered before it"


_PASS_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("HU_COPY", pb_utils.get_input_tensor_by_name(
            r, "HU_SLICES").as_numpy().copy())]) for r in requests]
"""


def _with_a_first_step(repo: Path) -> None:
    """``repo``'s ensemble with a step in front of its segmentation models, as the gpu profiles' ``hu_cast``:
    a python pass-through (this machine's Triton has no onnxruntime backend), batched with priority levels."""
    (repo / "hu_pass" / "1").mkdir(parents=True)
    (repo / "hu_pass" / "1" / "model.py").write_text(_PASS_MODEL)
    (repo / "hu_pass" / "config.pbtxt").write_text(
        'name: "hu_pass"\nbackend: "python"\nmax_batch_size: 8\n'
        'input [ { name: "HU_SLICES" data_type: TYPE_INT16 dims: [ 1, 512, 512 ] } ]\n'
        'output [ { name: "HU_COPY" data_type: TYPE_INT16 dims: [ 1, 512, 512 ] } ]\n'
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        f"dynamic_batching {{ priority_levels: {c.PRIORITY_LEVELS} default_priority_level: {c.DEFAULT_PRIORITY_LEVEL} }}\n")
    ensemble = repo / c.ENSEMBLE_MODEL / "config.pbtxt"
    text = ensemble.read_text()
    step = ('    {\n      model_name: "hu_pass"\n      model_version: -1\n'
            f'      input_map {{ key: "{c.HU_SLICES}" value: "{c.HU_SLICES}" }}\n'
            '      output_map { key: "HU_COPY" value: "HU_COPY" }\n    },\n')
    text = text.replace("  step [\n", "  step [\n" + step, 1)
    for model in c.SEGMENTATION_MODELS:
        text = text.replace(f'model_name: "{model}"\n      model_version: -1\n      input_map {{ key: "{c.HU_SLICES}" '
                            f'value: "{c.HU_SLICES}" }}', f'model_name: "{model}"\n      model_version: -1\n      '
                            f'input_map {{ key: "{c.HU_SLICES}" value: "HU_COPY" }}')
    assert text.count('value: "HU_COPY" }') == 3, text
    ensemble.write_text(text)


def test_the_priority_reaches_steps_behind_the_first(tmp_path):
    """The gpu profiles put ``hu_cast`` in front of the segmentation models, where the queue builds: an ensemble
    request's priority must reach those second steps (triton-inference-server/server#6055 reported it lost behind
    a python first step). On this Triton (2.51) it does: behind 64 routine requests, the urgent one comes after
    those running; sent at the routine level it came after all of them."""
    from ctscreen.embedded import EmbeddedTriton
    from ctscreen.repo import build_repository

    repo = build_repository("cpu", tmp_path / "repo")
    _with_a_first_step(repo)
    server = EmbeddedTriton(repo, log_file=tmp_path / "triton.log")
    server.start(timeout=300)
    try:
        overtaking, pending = asyncio.run(_overtaken(server.grpc_url, c.ENSEMBLE_MODEL, drain=False))
    finally:
        # killed: its graceful stop would first screen the routine requests given up above (about 100 slices),
        # then unload each python-backend instance after a 1 s health check, one after another
        server.kill()
    assert pending >= ROUTINE_BATCHES - 4, f"the queue drained before the urgent request went ({pending} left)"
    assert overtaking <= pending // 2, f"{overtaking} of {pending} routine requests were answered before it"


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("urgent-studies")
    return {
        "routine": Path(phantom.write_study(phantom.make_study(seed=21, kind="normal", n_slices=160), out / "routine")),
        "urgent": Path(phantom.write_study(phantom.make_study(seed=22, kind="covid", n_slices=8), out / "urgent")),
    }


def _upload(client, folder: Path, priority: str) -> str:
    files = [("files", (f.name, f.read_bytes(), "application/dicom")) for f in sorted(folder.rglob("*.dcm"))]
    r = client.post("/v1/studies", files=files, params={"priority": priority})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def _until(client, job_id: str, states: tuple[str, ...], timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["state"] in states:
            return view
        assert time.monotonic() < deadline, f"job {job_id} never reached {states}: {view['state']}"
        time.sleep(0.05)


def test_an_urgent_study_is_screened_at_once_while_a_routine_one_takes_the_only_slot(triton, two_studies):
    """One slot (``max_concurrent_studies=1``), taken by a routine 160-slice study being screened: an urgent
    8-slice study sent then starts at once in the slot kept for urgent studies (``urgent_slots``) and, its
    batches going first, ends long before the routine one. Seen failing with ``urgent_slots=0``: it waited for
    the routine study to end. (Screening ahead is off: the upload's slices would otherwise be screened while it
    arrives, whatever the slots.)"""
    overrides = {"max_concurrent_studies": 1, "urgent_slots": 1, "screen_ahead": False,
                 "max_upload_bytes": 200 * 1024 * 1024}
    with run_stack(port=0, triton_url=triton.grpc_url, settings_overrides=overrides) as stack, \
            http_client(stack.url, 120) as client:
        routine = _upload(client, two_studies["routine"], "routine")
        _until(client, routine, ("inferring",))
        urgent = _upload(client, two_studies["urgent"], "urgent")
        views = {name: _until(client, job, ("done", "failed")) for name, job in (("urgent", urgent),
                                                                                  ("routine", routine))}
        metrics = client.get("/metrics").text
    for priority in ("urgent", "routine"):  # each study's turnaround under its priority (the chart's urgent p95)
        assert f'ctscreen_study_turnaround_seconds_count{{origin="upload",priority="{priority}"}} 1.0' in metrics
    for name, view in views.items():
        assert view["state"] == "done", (name, view.get("error"))
    assert views["urgent"]["priority"] == "urgent"
    assert views["routine"]["slices_done"] == 160 and views["urgent"]["slices_done"] == 8
    assert views["urgent"]["finished_at"] < views["routine"]["finished_at"], (
        f"urgent ended {views['urgent']['finished_at']}, routine {views['routine']['finished_at']}")
