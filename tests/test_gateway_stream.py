"""A study streamed through (issue 17, item 3): inference starts on the first decoded batch.

Real embedded Triton over real gRPC, real DICOM files written by the phantom. The streamed result must
be the whole-study path's result (``load_study`` then every slice to Triton), and the first request
must leave before the last object is decoded; both are observed through the order of events, never
through timing thresholds.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from aggregator.schema import CaseResult
from ctscreen.contracts import ENSEMBLE_MODEL, FUSED_MODEL, SEGMENTATION_MODELS, SLICE_SIZE
from gateway.errors import GatewayError
from gateway.ingest import StudyPlan, load_study, plan_study
from gateway.metrics import Metrics
from gateway.screening import Screener
from gateway.triton_pool import TritonPool
from tests.gateway_dicom_factory import chest_like, enhanced_ct, make_series, to_bytes
from tests.screen_helpers import comparable, phantom_files

pytestmark = [pytest.mark.timeout(600)]

N_SLICES = 24
BATCH = 4
INFLIGHT = 2
DECODE_WORKERS = 2
STAGES = {"decode", "resample", "grpc", "queue", "compute", "postprocess", "aggregate"}
ENSEMBLE_STEPS = 3  # valid_area and lesion side by side, then postprocess: each within the ensemble's time


@pytest.fixture(scope="module")
def study_files(tmp_path_factory) -> list[tuple[str, bytes]]:
    return phantom_files(tmp_path_factory.mktemp("stream"), N_SLICES)


class _Recording:
    """The gateway's real Triton client, recording each ``infer`` call as it is issued."""

    def __init__(self, url: str, events: list[tuple[str, Any]]) -> None:
        from gateway.triton_client import TritonClient

        self._client = TritonClient(url=url)
        self._events = events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def infer(self, *args: Any, **kwargs: Any) -> Any:
        self._events.append(("infer", None))
        return await self._client.infer(*args, **kwargs)


def _screen(triton, files, *, whole: bool, events: list | None = None,
            on_batch: Any = None, model: str = ENSEMBLE_MODEL) -> tuple[CaseResult, Any]:
    async def go() -> tuple[CaseResult, Any]:
        factory = (lambda url: _Recording(url, events)) if events is not None else None
        pool = TritonPool([triton.grpc_url], batch_size=BATCH, max_inflight=INFLIGHT, client_factory=factory,
                          model_name=model)
        loader = (lambda sources: load_study(sources, workers=2)) if whole else None
        screener = Screener(pool, Metrics(), decode_workers=DECODE_WORKERS, loader=loader)
        started = time.time()
        try:
            prepared = await screener.prepare(files)
            streamed = prepared.study is None
            result = await screener.screen(prepared, job_id="j1", started=started,
                                           on_batch=on_batch)
            return result, (streamed, prepared.sr_context)
        finally:
            screener.close()
            await pool.close()

    return asyncio.run(go())


@pytest.mark.triton
def test_streamed_result_is_the_whole_study_result(triton, study_files):
    whole, (whole_streamed, whole_context) = _screen(triton, study_files, whole=True)
    streamed, (was_streamed, context) = _screen(triton, study_files, whole=False)
    assert not whole_streamed and was_streamed  # the two paths were really taken
    assert streamed.n_slices == N_SLICES
    assert comparable(streamed) == comparable(whole)
    assert context == whole_context


@pytest.mark.triton
def test_first_request_leaves_before_the_last_object_is_decoded(triton, study_files, monkeypatch):
    events: list[tuple[str, Any]] = []
    decode = StudyPlan.decode_object

    def recorded(self: StudyPlan, uid: str) -> Any:
        out = decode(self, uid)
        events.append(("decoded", uid))
        return out

    monkeypatch.setattr(StudyPlan, "decode_object", recorded)
    result, (was_streamed, _) = _screen(triton, study_files, whole=False, events=events)
    assert was_streamed and result.n_slices == N_SLICES
    kinds = [k for k, _ in events]
    assert kinds.count("decoded") == N_SLICES and kinds.count("infer") == N_SLICES // BATCH
    last_decoded = len(kinds) - 1 - kinds[::-1].index("decoded")
    assert kinds.index("infer") < last_decoded, kinds


@pytest.mark.triton
def test_a_later_slice_that_does_not_decode_gives_the_whole_study_result(triton, study_files, monkeypatch):
    """The stream starts (the first batch decodes), a later file's pixels are truncated: the study goes
    the whole-study path and its result, the bad file among the rejected, is that path's result. The bad
    file is decoded only once a batch has come back, so the dropped stream has answered slices: the
    job's progress still counts each slice once."""
    whole0, _ = _screen(triton, study_files, whole=True)
    late = whole0.slices[-2].sop_instance_uid  # a slice of the last batch
    names = {name for name, data in study_files if late.encode() in data}
    assert len(names) == 1
    files = [(n, d[: len(d) // 2] if n in names else d) for n, d in study_files]
    whole, _ = _screen(triton, files, whole=True)
    progress: list[int] = []
    answered = threading.Event()
    decode = StudyPlan.decode_object

    def after_an_answer(self: StudyPlan, uid: str) -> Any:
        if uid == late:
            assert answered.wait(120), "no batch came back"
        return decode(self, uid)

    def on_batch(n: int) -> None:
        progress.append(n)
        answered.set()

    monkeypatch.setattr(StudyPlan, "decode_object", after_an_answer)
    streamed, (was_streamed, _) = _screen(triton, files, whole=False, on_batch=on_batch)
    assert was_streamed  # the first batch decoded: prepare handed over a plan, the stream broke later
    assert sum(progress) == streamed.n_slices  # the job's progress counts each slice once
    assert [r.reason for r in streamed.rejected] == ["undecodable"]
    assert streamed.n_slices == N_SLICES - 1
    assert comparable(streamed) == comparable(whole)


@pytest.mark.triton
def test_a_study_whose_first_batch_does_not_decode_is_refused_before_acceptance(triton, study_files):
    """``prepare`` (which the upload route awaits before accepting) raises what the whole-study path raises."""
    files = [(n, d[: len(d) // 2]) for n, d in study_files]
    with pytest.raises(GatewayError) as whole:
        _screen(triton, files, whole=True)
    with pytest.raises(GatewayError) as err:
        _screen(triton, files, whole=False)
    assert err.value.http_status == 422
    assert err.value.to_dict() == whole.value.to_dict()
    assert {r["reason"] for r in err.value.to_dict()["rejected"]} == {"undecodable"}


@pytest.mark.triton
@pytest.mark.parametrize("whole", [False, True], ids=["streamed", "whole"])
def test_each_stage_of_a_slice_is_timed_and_they_add_up(triton, study_files, whole):
    """Every stage is there (Triton's statistics are readable) and >= 0, the models took time, and the
    stages fit the wall clock: a stage's milliseconds are summed over its parallel workers, so each
    fits its phase's wall clock times its workers (decode threads; requests in flight times the
    ensemble's steps, each of which lies within the request), and all of them the study's wall clock
    times every worker there is."""
    result, _ = _screen(triton, study_files, whole=whole)
    t = result.timings
    stages = t.stages_ms_per_slice
    assert stages is not None and set(stages) == STAGES, stages
    assert all(v >= 0 for v in stages.values())
    assert stages["decode"] > 0 and stages["resample"] > 0 and stages["compute"] > 0
    n = result.n_slices
    assert t.ingest_s is not None and t.inference_s is not None and t.aggregate_s is not None and t.total_s
    assert (stages["decode"] + stages["resample"]) * n <= 1000 * (t.ingest_s + t.inference_s) * DECODE_WORKERS
    triton_side = sum(stages[k] for k in ("grpc", "queue", "compute", "postprocess"))
    assert triton_side * n <= 1000 * t.inference_s * INFLIGHT * ENSEMBLE_STEPS
    assert stages["aggregate"] * n <= 1000 * t.aggregate_s
    assert sum(stages.values()) * n <= 1000 * t.total_s * (DECODE_WORKERS + INFLIGHT * ENSEMBLE_STEPS + 1)


@pytest.mark.triton
def test_the_fused_model_screens_a_study_as_the_ensemble_does_and_its_time_is_told(triton, study_files):
    """The cpu profile's fused model (what ``ctscreen serve`` calls on a CPU) gives the ensemble's result;
    its own queue and compute are the study's (no ensemble steps to read them from), and the result
    names the model called, how Triton serves it, and the ONNX files behind it."""
    ens, _ = _screen(triton, study_files, whole=False)
    fused, _ = _screen(triton, study_files, whole=False, model=FUSED_MODEL)
    def same(r: CaseResult) -> dict[str, Any]:
        return {k: v for k, v in comparable(r).items() if k != "models"}  # the called model differs, below

    assert same(fused) == same(ens) and fused.verdict == "positive"
    stages = fused.timings.stages_ms_per_slice
    assert stages is not None and set(stages) == STAGES and stages["compute"] > 0, stages
    called, *parts = fused.models
    assert (called.name, called.platform) == (FUSED_MODEL, "python")
    assert {m.name for m in parts} == set(SEGMENTATION_MODELS) and all(m.sha256 for m in parts)
    assert (ens.models[0].name, ens.models[0].platform) == (ENSEMBLE_MODEL, "ensemble")
    assert [(m.name, m.sha256) for m in parts] == [(m.name, m.sha256) for m in ens.models[1:]]


def _decoded_batch_by_batch(plan: StudyPlan, size: int):
    """What :meth:`Screener.screen` does with a plan, without Triton: decode step by step, then assemble."""
    hu = np.empty((plan.n_slices, SLICE_SIZE, SLICE_SIZE), np.int16)
    row = {h.key: i for i, h in enumerate(plan.ordered.slices)}
    grids = {}
    for _, uids in plan.batches(size):
        for uid in uids:
            frames, rejection, _ = plan.decode_object(uid)
            assert rejection is None
            for key, arr, grid in frames:
                grids[key] = grid
                if key in row:
                    hu[row[key]] = arr
    return plan.assemble(hu, grids)


def _same_study(a, b) -> None:
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.slices == b.slices and a.summary() == b.summary() and a.sr_context == b.sr_context


def test_a_multi_frame_object_is_decoded_once_in_the_first_step_that_needs_it():
    frames = [chest_like(48, 48, seed=s) for s in range(5)]
    data = enhanced_ct(frames, [(1.0, -1024.0)] * 5, [4.0, 0.0, 8.0, 2.0, 6.0])
    plan = plan_study([("ect.dcm", data)])
    steps = plan.batches(2)
    assert [filled for filled, _ in steps] == [2, 4, 5]
    assert len(steps[0][1]) == 1 and steps[1][1] == [] and steps[2][1] == []
    _same_study(_decoded_batch_by_batch(plan, 2), load_study([("ect.dcm", data)]))


def test_duplicate_positions_are_decoded_last_and_left_out_as_the_whole_path_does():
    series = make_series(6, rows=32, cols=32, spacing=1.0)
    files = [(n, d) for n, d, _, _ in series]
    dup = pydicom.dcmread(io.BytesIO(series[1][1]))
    dup.SOPInstanceUID = dup.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dup.InstanceNumber = 99
    files.insert(0, ("dup.dcm", to_bytes(dup)))
    plan = plan_study(files)
    steps = plan.batches(4)
    assert [filled for filled, _ in steps] == [4, 6, 6] and steps[-1][1] == [dup.SOPInstanceUID]
    study = _decoded_batch_by_batch(plan, 4)
    assert [(r.filename, r.reason) for r in study.excluded] == [("dup.dcm", "duplicate_position")]
    _same_study(study, load_study(files))
