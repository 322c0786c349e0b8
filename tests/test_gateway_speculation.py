"""Screening ahead (issue 17): an upload's slices go to Triton as they are parsed, before the plan.

Real embedded Triton over real gRPC, real DICOM files written by the phantom. The result must be the
whole-study path's (``load_study`` then every slice to Triton); inference must start before the last
file is parsed, each slice must be asked once, and whatever the speculation could not answer must be
asked again by the screening. Orders of events are observed, never timings.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from aggregator.schema import CaseResult
from gateway import screening
from gateway.errors import GatewayError
from gateway.ingest import StudyAccumulator, load_study
from gateway.metrics import Metrics
from gateway.screening import Screener
from gateway.speculation import Speculation
from gateway.triton_pool import TritonPool
from tests.gateway_dicom_factory import to_bytes
from tests.screen_helpers import comparable, phantom_files

pytestmark = [pytest.mark.timeout(600)]

N_SLICES = 24
BATCH = 4


@pytest.fixture(scope="module")
def study_files(tmp_path_factory) -> list[tuple[str, bytes]]:
    return phantom_files(tmp_path_factory.mktemp("ahead"), N_SLICES)


class _Client:
    """The gateway's real Triton client; records each ``infer`` and can refuse them while ``refuse`` is set."""

    def __init__(self, url: str, events: list[str], refuse: threading.Event) -> None:
        from gateway.triton_client import TritonClient

        self._client = TritonClient(url=url)
        self._events, self._refuse = events, refuse

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def infer(self, *args: Any, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        if self._refuse.is_set():
            self._events.append("refused")
            raise InferenceServerException("refused by the test", status="StatusCode.INVALID_ARGUMENT")
        self._events.append("infer")
        return await self._client.infer(*args, **kwargs)


class _Run:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.refuse = threading.Event()
        self.progress: list[int] = []
        self.speculations: list[Speculation] = []
        self.studies: list[Any] = []  # the PreparedStudy each screening ended with


def _screen(triton, files, *, ahead: bool, run: _Run | None = None, whole: bool = False,
            after_prepare: Any = None) -> CaseResult:
    run = run or _Run()

    async def go() -> CaseResult:
        pool = TritonPool([triton.grpc_url], batch_size=BATCH, max_inflight=2,
                          client_factory=lambda url: _Client(url, run.events, run.refuse))
        loader = (lambda sources: load_study(sources, workers=2)) if whole else None
        screener = Screener(pool, Metrics(), decode_workers=2, loader=loader)
        try:
            prepared = await screener.prepare(files, speculate=ahead)
            if prepared.speculation is not None:
                run.speculations.append(prepared.speculation)
            if after_prepare is not None:
                await after_prepare(prepared)
            try:
                return await screener.screen(prepared, job_id="j1", started=time.time(), on_batch=run.progress.append)
            finally:
                run.studies.append(prepared.study)
                prepared.release()
        finally:
            screener.close()
            await pool.close()

    return asyncio.run(go())


@pytest.mark.triton
def test_screened_ahead_the_result_is_the_whole_study_result_and_each_slice_is_asked_once(triton, study_files):
    whole = _screen(triton, study_files, ahead=False, whole=True)
    run = _Run()
    ahead = _screen(triton, study_files, ahead=True, run=run)
    assert comparable(ahead) == comparable(whole)
    assert len(run.speculations) == 1 and run.speculations[0].stats.slices == N_SLICES  # all answered ahead
    assert run.events.count("infer") == N_SLICES // BATCH  # the screening asked for nothing again
    assert sum(run.progress) == N_SLICES
    assert run.studies[0].hu.shape[0] == 0  # no study-sized array gathered: nothing would read it


@pytest.mark.triton
def test_requests_leave_before_the_last_file_is_parsed(triton, study_files, monkeypatch):
    """The parse of the last file waits until Triton was asked something: without screening ahead nothing
    is asked before the plan, and the wait runs out."""
    run = _Run()
    add = StudyAccumulator.add
    parsed = []

    def add_last_after_an_infer(self: StudyAccumulator, filename: str, data: Any) -> Any:
        if len(parsed) == len(study_files) - 1:
            deadline = time.monotonic() + 60
            while "infer" not in run.events and time.monotonic() < deadline:
                time.sleep(0.01)
            parsed.append(("infer" in run.events, filename))
        else:
            parsed.append((None, filename))
        return add(self, filename, data)

    monkeypatch.setattr(StudyAccumulator, "add", add_last_after_an_infer)
    result = _screen(triton, study_files, ahead=True, run=run)
    assert result.n_slices == N_SLICES
    assert parsed[-1][0] is True, "nothing was sent to Triton before the last file was parsed"


@pytest.mark.triton
def test_each_object_is_decoded_in_the_thread_that_parsed_it(triton, study_files, monkeypatch):
    """No hand-off to a decode thread and back for each object (issue 17: the GIL hand-offs cost the gateway
    about 1 ms of CPU a slice): the speculation decodes an object where its header was just parsed."""
    from gateway import speculation

    parsed_in: dict[str, int] = {}
    decoded_in: dict[str, int] = {}
    add, decode = StudyAccumulator.add, speculation.decode_frames

    def recording_add(self: StudyAccumulator, filename: str, data: Any) -> Any:
        parsed_in[filename] = threading.get_ident()
        return add(self, filename, data)

    def recording_decode(ds: Any, headers: Any, keys: Any) -> Any:
        decoded_in[headers[0].filename] = threading.get_ident()
        return decode(ds, headers, keys)

    monkeypatch.setattr(StudyAccumulator, "add", recording_add)
    monkeypatch.setattr(speculation, "decode_frames", recording_decode)
    run = _Run()
    result = _screen(triton, study_files, ahead=True, run=run)
    assert result.n_slices == N_SLICES and run.speculations[0].stats.slices == N_SLICES
    assert len(decoded_in) == N_SLICES
    assert {name: parsed_in[name] for name in decoded_in} == decoded_in


@pytest.mark.triton
def test_slices_the_speculation_could_not_get_answered_are_asked_again(triton, study_files):
    """Triton refuses every speculative request: the first refusal stops the speculation (at most the
    window's 4 batches were sent: 2 in flight a endpoint, twice that), each tried once; the screening asks
    for every slice itself, under its own rules, and counts each once."""
    whole = _screen(triton, study_files, ahead=False, whole=True)
    run = _Run()
    run.refuse.set()

    async def accept_again(prepared) -> None:
        await prepared.speculation.settle()
        run.refuse.clear()

    result = _screen(triton, study_files, ahead=True, run=run, after_prepare=accept_again)
    assert 1 <= run.events.count("refused") <= 4 and run.speculations[0].stats.slices == 0
    assert run.events.count("infer") == N_SLICES // BATCH
    assert sum(run.progress) == N_SLICES
    assert comparable(result) == comparable(whole)


def _second_series(files: list[tuple[str, bytes]], n: int) -> list[tuple[str, bytes]]:
    """``n`` files of the same study as a second series (new Series and SOP Instance UIDs)."""
    series = generate_uid()
    out = []
    for name, data in files[:n]:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append((f"second-{name}", to_bytes(ds)))
    return out


@pytest.mark.triton
def test_a_second_series_stops_the_speculation_and_the_result_is_unchanged(triton, study_files):
    files = study_files[:6] + _second_series(study_files, 8) + study_files[6:]
    whole = _screen(triton, files, ahead=False, whole=True)
    run = _Run()
    result = _screen(triton, files, ahead=True, run=run)
    assert comparable(result) == comparable(whole)
    spec = run.speculations[0]
    assert len(spec.taken) == 6  # nothing after the first object of the second series
    assert sum(run.progress) == result.n_slices


@pytest.mark.triton
def test_objects_of_a_second_series_are_not_decoded_ahead(triton, study_files, monkeypatch):
    """The parsing thread decodes only the series it guessed, not what the event loop will stop on (decoding in
    the parsing thread before this decoded 1 to 6 objects of the second series, the more the busier the loop)."""
    from gateway import speculation

    decoded: list[str] = []
    decode = speculation.decode_frames

    def counting(ds: Any, headers: Any, keys: Any) -> Any:
        decoded.append(headers[0].filename)
        return decode(ds, headers, keys)

    monkeypatch.setattr(speculation, "decode_frames", counting)
    files = study_files[:6] + _second_series(study_files, 8) + study_files[6:]
    result = _screen(triton, files, ahead=True)
    assert result.n_slices == N_SLICES
    assert decoded and not [n for n in decoded if n.startswith("second-")], decoded


@pytest.mark.triton
def test_a_decode_error_dropped_with_the_speculation_is_not_logged(triton, study_files, monkeypatch, caplog):
    """A decode that fails (not on the image: a library's error, whose message may quote a patient's data) for an
    upload that is then not accepted: asyncio must not log it as an exception never retrieved."""
    import gc

    from gateway import speculation

    last = study_files[-1][0]
    decode = speculation.decode_frames
    raised: list[str] = []

    def failing(ds: Any, headers: Any, keys: Any) -> Any:
        if headers[0].filename == last:
            raised.append(last)
            raise MemoryError("while decoding DOE^JANE")
        return decode(ds, headers, keys)

    monkeypatch.setattr(speculation, "decode_frames", failing)

    async def go() -> None:
        pool = TritonPool([triton.grpc_url], batch_size=BATCH, max_inflight=2)
        screener = Screener(pool, Metrics(), decode_workers=2)
        try:
            prepared = await screener.prepare(study_files, speculate=True)
            prepared.release()  # not accepted: the speculation and what it holds are dropped
            del prepared
            await asyncio.sleep(0.05)
            gc.collect()
            await asyncio.sleep(0.05)
        finally:
            screener.close()
            await pool.close()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(go())
        gc.collect()
    assert raised == [last]
    assert not [r for r in caplog.records if "DOE^JANE" in r.getMessage() or "never retrieved" in r.getMessage()]


@pytest.mark.triton
def test_a_refused_upload_cancels_what_it_screens_ahead(triton, study_files, monkeypatch):
    """Two studies in one upload are refused (422) after every file is parsed: nothing it started is left running."""
    other = []
    for name, data in study_files[:4]:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        other.append((f"other-{name}", to_bytes(ds)))
    made: list[Speculation] = []

    class Recorded(Speculation):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(screening, "Speculation", Recorded)

    async def go() -> tuple[int, int]:
        pool = TritonPool([triton.grpc_url], batch_size=BATCH, max_inflight=2)
        screener = Screener(pool, Metrics(), decode_workers=2)
        try:
            with pytest.raises(GatewayError) as err:
                await screener.prepare(study_files + other, speculate=True)
            await asyncio.sleep(0.5)  # the cancellation is delivered through the loop
            return err.value.http_status, made[0].pending()
        finally:
            screener.close()
            await pool.close()

    status, left = asyncio.run(go())
    assert status == 422 and left == 0


@pytest.mark.triton
def test_an_instance_sent_twice_makes_the_guess_unusable_and_the_later_copy_counts(triton, study_files):
    """The slice with the most boxes is sent again at the end of the upload with another slice's pixels:
    ingest keeps the later copy, so the speculation's answer for it (the earlier pixels) must not be used."""
    whole0 = _screen(triton, study_files, ahead=False, whole=True)
    boxed = max(whole0.slices, key=lambda s: len(s.boxes))
    assert boxed.boxes, "the phantom study has a slice with lesion boxes"
    quiet = min(whole0.slices, key=lambda s: len(s.boxes))
    data = {pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID: (n, d) for n, d in study_files}
    again = pydicom.dcmread(io.BytesIO(data[boxed.sop_instance_uid][1]))
    again.PixelData = pydicom.dcmread(io.BytesIO(data[quiet.sop_instance_uid][1])).PixelData
    files = [*study_files, ("again.dcm", to_bytes(again))]
    whole = _screen(triton, files, ahead=False, whole=True)
    run = _Run()
    result = _screen(triton, files, ahead=True, run=run)
    assert not run.speculations[0].usable
    assert comparable(result) == comparable(whole)
    assert comparable(whole) != comparable(whole0)  # the later copy changed the result: the test can fail


@pytest.mark.triton
def test_an_upload_takes_the_free_slot_from_its_first_parsed_file_until_its_guess_settles(triton, study_files,
                                                                                         monkeypatch):
    """``Worker.has_room`` with one slot: while an upload is parsed (and screened ahead) a second upload
    must not be screened ahead too; once its guess has settled, the upload (accepted, say, and claimed by
    another replica) no longer holds the slot, though its prepared study is still kept."""
    from gateway.settings import Settings
    from gateway.worker import Worker

    during: list[bool] = []
    plan = screening.plan_study

    async def go() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        pool = TritonPool([triton.grpc_url], batch_size=BATCH, max_inflight=2)
        screener = Screener(pool, Metrics(), decode_workers=2)
        # has_room reads neither the job store nor the blobs: none is made for it
        worker = Worker(None, None, screener, Settings(max_concurrent_studies=1))  # type: ignore[arg-type]

        async def room() -> bool:
            return worker.has_room()

        def planning(*args: Any, **kwargs: Any) -> Any:  # in the decode thread, as the upload starts parsing
            during.append(asyncio.run_coroutine_threadsafe(room(), loop).result(timeout=30))
            return plan(*args, **kwargs)

        monkeypatch.setattr(screening, "plan_study", planning)
        try:
            assert await pool.is_ready()
            await worker._triton_ready()  # as the idle worker's loop does
            before = worker.has_room()
            prepared = await screener.prepare(study_files, speculate=True)
            assert prepared.speculation is not None
            await prepared.speculation.settle()
            # a readiness look counts for 5 s (_READY_FOR_AHEAD_S): on loaded cores the parse and its settling can
            # outlast it, and has_room then says no for Triton's sake, not the slot's. Look again, as the idle
            # worker's loop does at its next poll (its look is cached for a second: _ready_at)
            worker._ready_at = 0.0
            await worker._triton_ready()
            after = worker.has_room()
            prepared.release()
            return before, after
        finally:
            screener.close()
            await pool.close()

    before, after = asyncio.run(go())
    assert before and during == [False] and after
