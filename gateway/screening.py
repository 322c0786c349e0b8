"""One screening function: a study's files in, a :class:`~aggregator.schema.CaseResult` out.

:meth:`Screener.prepare` has ingest read the files once (parse each file, choose the series, sort
along the slice normal: :func:`gateway.ingest.plan_study`) and decode the first batch of slices (CPU
work in a thread pool); :meth:`Screener.screen` streams the study through: it decodes the next batches
in slice order while the batches already decoded are screened by Triton through the
:class:`~gateway.triton_pool.TritonPool`, and lets :func:`aggregator.case.case_result` turn the
prepared study and Triton's outputs into the result. The result is the one the whole-study path
(:func:`gateway.ingest.load_study`, then every slice to Triton) gives: when a frame of the chosen
series does not decode, the stream is dropped and the study goes that path (which falls back to the
next series and leaves out what does not decode). Nothing here knows about jobs, leases or the store:
:mod:`gateway.worker` calls it for a claimed job, and the upload route calls :meth:`Screener.prepare`
to refuse a study that cannot be screened with its specific 4xx before accepting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.case import CaseRule, case_result
from aggregator.schema import CaseResult, ModelInfo, Timings
from ctscreen.contracts import POSTPROCESS_MODEL, SLICE_SIZE
from gateway.dicom import GridMapping
from gateway.ingest import PreparedStudy, StudyPlan, load_study, plan_study
from gateway.logs import ContextExecutor
from gateway.metrics import Metrics
from gateway.phi import withheld
from gateway.report import SrContext
from gateway.speculation import Speculation
from gateway.triton_pool import InferStats, SliceOutput, TritonPool

logger = logging.getLogger(__name__)

Loader = Callable[[Sequence[tuple[str, bytes | Path]]], PreparedStudy]
"""``sources -> PreparedStudy`` (default :func:`gateway.ingest.load_study`)."""


def _ingest_loader(workers: int) -> Loader:
    def load(sources: Sequence[tuple[str, bytes | Path]]) -> PreparedStudy:
        return load_study(sources, workers=workers)

    return load


def in_own_thread(fn: Callable[[], Any], name: str) -> asyncio.Future[Any]:
    """``fn()`` run in a new thread; its result (or exception) in the returned future of the running loop.

    For work that mostly waits (a parse that waits on an upload's next file) and must not hold a pooled
    thread meanwhile. A cancelled future does not stop ``fn``: make it return (the upload route ends its
    sources)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():  # cancelled while fn ran
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def run() -> None:
        error: BaseException | None
        try:
            value, error = fn(), None
        except StopIteration as exc:  # a future cannot carry it
            value, error = None, RuntimeError(f"{fn!r} raised StopIteration")
            error.__cause__ = exc
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            value, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shut-down): nobody awaits it
            loop.call_soon_threadsafe(settle, value, error)

    # in the caller's context, as asyncio.to_thread: its records carry the request's or the job's id (gateway.logs)
    threading.Thread(target=contextvars.copy_context().run, args=(run,), name=name, daemon=True).start()
    return future


class _Undecoded(Exception):
    """A frame of the streamed series did not decode: the study goes the whole-study path."""


@dataclass
class Prepared:
    """A study ready for Triton: decoded (``study``), or planned from its headers and decoded while
    it is screened (``plan``, with the objects decoded so far in ``decoded``, and what was screened
    while the upload was parsed in ``speculation``)."""

    study: PreparedStudy | None
    ingest_s: float
    plan: StudyPlan | None = None
    decoded: dict[str, tuple[list[tuple[tuple[str, int], np.ndarray, GridMapping]], dict[str, float]]] = field(
        default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    speculation: Speculation | None = None
    _release: list[Callable[[], object]] = field(default_factory=list)

    def on_release(self, fn: Callable[[], object]) -> None:
        """Call ``fn`` once this study is done with (screened, or dropped): e.g. remove the files it reads."""
        self._release.append(fn)

    def release(self) -> None:
        """Run the :meth:`on_release` callbacks (once; a failing one is logged, the others still run)."""
        while self._release:
            fn = self._release.pop()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a clean-up never fails the job
                logger.error("releasing a prepared study failed", exc_info=withheld(exc))

    @property
    def study_instance_uid(self) -> str:
        return self.study.study_instance_uid if self.study is not None else self._plan.study_instance_uid

    @property
    def series_instance_uid(self) -> str:
        return self.study.series_instance_uid if self.study is not None else self._plan.series_instance_uid

    @property
    def patient_key(self) -> str | None:
        """The patient the study names (:func:`gateway.phi.patient_key`), for the store to compare."""
        return self.study.patient_key if self.study is not None else self._plan.patient_key

    @property
    def n_slices(self) -> int:
        return self.study.n_slices if self.study is not None else self._plan.n_slices

    @property
    def sr_context(self) -> SrContext | None:
        """The SR headers of the screened slices (known once the study is decoded: after :meth:`Screener.screen`)."""
        return self.study.sr_context if self.study is not None else None

    @property
    def _plan(self) -> StudyPlan:
        assert self.plan is not None, "a Prepared holds a study or a plan"
        return self.plan


class Screener:
    """Decodes studies and screens them.

    Parameters
    ----------
    pool : TritonPool
        Where slices are screened.
    metrics : Metrics
        Stage latencies, slices and verdicts are counted here.
    decode_workers : int
        Threads decoding DICOM.
    rule : CaseRule | None
        The case rule (paper defaults).
    loader : Loader | None
        ``sources -> PreparedStudy``; defaults to :func:`gateway.ingest.load_study`.
    """

    def __init__(self, pool: TritonPool, metrics: Metrics, *, decode_workers: int = 2,
                 rule: CaseRule | None = None, loader: Loader | None = None) -> None:
        self.pool = pool
        self.metrics = metrics
        self.rule = rule or CaseRule()
        self._loader = loader or _ingest_loader(decode_workers)
        self._stream = loader is None  # a custom loader decodes whole studies: nothing to stream
        self.decode_workers = decode_workers
        self.executor = ContextExecutor(max_workers=decode_workers, thread_name_prefix="ctscreen-decode")
        self._models: tuple[float, list[ModelInfo]] | None = None  # (when read, monotonic; what)
        self.ahead: set[Speculation] = set()
        """Speculations of uploads from the start of their parse until released or screened (the upload route
        counts those still at work against free slots)."""

    def close(self) -> None:
        """Stop the decode threads."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def prepare(self, sources: Iterable[tuple[str, bytes | Path]], *, speculate: bool = False,
                      streamed: bool = False, priority: int = 0) -> Prepared:
        """Read a study's files and decide its series and slice order from the headers; decode its
        first batch of slices (the rest is decoded while it is screened, :meth:`screen`).

        A study whose first batch does not all decode is decoded whole here (today's path, which
        tries the next series), so that a study nothing of which decodes is refused before it is
        accepted, as always.

        ``speculate``: decode and screen each CT object as soon as its header is parsed, before the
        series is chosen (:class:`gateway.speculation.Speculation`; the upload route asks for it while
        the worker has room). The result is the same; Triton starts a second or so sooner on a
        300-slice upload. Releasing the prepared study cancels what is still pending.

        ``streamed``: ``sources`` yields the files as an upload arrives (it blocks until the next one is
        read): they are parsed in a thread of their own, not a decode thread, which a slow client would
        hold for the whole upload; ``ingest_s`` then counts from the start of the upload.

        Raises
        ------
        gateway.errors.GatewayError
            The study cannot be screened (not DICOM, not CT, no usable series, ...), with its reason.
        """
        loop = asyncio.get_running_loop()
        t = time.monotonic()

        async def parse(fn: Callable[[], Any]) -> Any:
            return await (in_own_thread(fn, "ctscreen-parse") if streamed else loop.run_in_executor(self.executor, fn))

        if not self._stream:
            study = await parse(lambda: self._loader(list(sources)))
            return self._prepared(study, time.monotonic() - t)
        speculation = Speculation(self.pool, priority=priority) if speculate else None
        if speculation is not None:
            self.ahead.add(speculation)  # at once: the upload route's room check (has_room) counts it from here
        try:
            plan = await parse(functools.partial(
                plan_study, sources, on_object=speculation.offer if speculation is not None else None))
        except BaseException:
            if speculation is not None:
                self._drop_ahead(speculation)
            raise
        prepared = Prepared(None, 0.0, plan=plan, speculation=speculation)
        if speculation is not None:
            speculation.close()
            prepared.on_release(functools.partial(self._drop_ahead, speculation))
        try:
            await self._decode_step(prepared, plan.batches(self.pool.batch_size)[0][1])
        except _Undecoded:
            prepared.release()
            study = await loop.run_in_executor(self.executor, self._whole, plan)
            return self._prepared(study, time.monotonic() - t)
        except BaseException:  # cancelled (the client left), or a decode raised: nothing it started goes on
            prepared.release()
            raise
        prepared.ingest_s = time.monotonic() - t
        self.metrics.stage.labels("decode").observe(prepared.ingest_s)
        for r in (*plan.rejected, *plan.excluded):
            self.metrics.error(str(r.reason))
        return prepared

    def _drop_ahead(self, speculation: Speculation) -> None:
        """Cancel a speculation and forget it (any thread: release may run in one)."""
        speculation.cancel()
        self.ahead.discard(speculation)

    def _prepared(self, study: PreparedStudy, ingest_s: float) -> Prepared:
        self.metrics.stage.labels("decode").observe(ingest_s)
        for r in (*study.rejected, *study.excluded):
            self.metrics.error(str(r.reason))
        return Prepared(study, ingest_s)

    def _whole(self, plan: StudyPlan) -> PreparedStudy:
        return plan.finish(workers=self.decode_workers)

    async def _decode_step(self, prepared: Prepared, uids: list[str]) -> None:
        """Decode these objects of a planned study in the decode threads (in parallel), into ``prepared.decoded``.

        Raises
        ------
        _Undecoded
            One of them did not decode (the study must go the whole-study path).
        """
        plan = prepared._plan
        loop = asyncio.get_running_loop()
        todo = [uid for uid in uids if uid not in prepared.decoded]
        # taken from the speculation (popped: the study holds its frames once, in prepared.decoded and then hu)
        ahead = prepared.speculation.decodes if prepared.speculation is not None else {}
        results = await asyncio.gather(*(ahead.pop(uid) if uid in ahead else
                                         loop.run_in_executor(self.executor, plan.decode_object, uid)
                                         for uid in todo))
        for uid, (frames, rejection, spent) in zip(todo, results, strict=True):
            if rejection is not None:
                raise _Undecoded(uid)
            prepared.decoded[uid] = (frames, spent)

    async def _screen_stream(self, prepared: Prepared, progress: Callable[[int], None],
                             calls: InferStats, priority: int) -> tuple[PreparedStudy, list[SliceOutput]]:
        """Decode the rest of a planned study batch by batch while Triton screens the batches decoded; or,
        when the upload's speculation took on every object of the chosen series, take its answers and
        ask Triton only for the slices it has no answer for (:meth:`_screen_ahead`)."""
        plan = prepared._plan
        row = {h.key: i for i, h in enumerate(plan.ordered.slices)}
        grids: dict[tuple[str, int], GridMapping] = {}
        work: Counter[str] = Counter()
        steps = plan.batches(self.pool.batch_size)
        ahead = prepared.speculation
        if ahead is not None and not ahead.covers([uid for _, uids in steps for uid in uids]):
            ahead.stop()  # it guessed another series, or stopped: its batches would only be in the way
            ahead = None
        # screened ahead, the slices are kept by key as decoded and only those without an answer are
        # stacked: no study-sized array (a 300-slice study's 157 MB of new pages took ~0.26 s to fill
        # cold, on the event loop, measured alone); streamed, they are gathered in slice order for Triton
        hu = np.empty((0 if ahead is not None else plan.n_slices, SLICE_SIZE, SLICE_SIZE), dtype=np.int16)
        pixels: dict[tuple[str, int], np.ndarray] = {}

        async def fill() -> AsyncIterator[int]:
            for filled, uids in steps:
                await self._decode_step(prepared, uids)
                for uid in uids:
                    frames, spent = prepared.decoded.pop(uid)
                    work.update(spent)
                    for key, arr, grid in frames:
                        grids[key] = grid
                        if key not in row:
                            continue
                        if ahead is not None:
                            pixels[key] = arr
                        else:
                            hu[row[key]] = arr
                yield filled

        answered = 0

        def streamed(n: int) -> None:
            nonlocal answered
            answered += n
            progress(n)

        def again(n: int) -> None:  # slices answered by the dropped stream are not counted twice
            nonlocal answered
            skip = min(n, answered)
            answered -= skip
            if n > skip:
                progress(n - skip)

        try:
            if ahead is not None:
                outputs = await self._screen_ahead(ahead, pixels, [h.key for h in plan.ordered.slices], fill(),
                                                   streamed, calls, priority)
            else:
                outputs = await self.pool.infer(hu, on_batch=streamed, ready=fill(), stats=calls, priority=priority)
        except _Undecoded:
            logger.info("a frame of the series did not decode; screening the study whole")
            if prepared.speculation is not None:
                prepared.speculation.cancel()  # its answers are not used on that path
            prepared.decoded.clear()
            study = await asyncio.get_running_loop().run_in_executor(self.executor, self._whole, plan)
            return study, await self.pool.infer(study.hu, on_batch=again, stats=calls, priority=priority)
        # in a decode thread: it measures the lung field of up to 12 slices (~8 ms), too long for the event loop
        assemble = functools.partial(plan.assemble, hu, grids, dict(work), pixels=pixels if ahead is not None else None)
        return await asyncio.get_running_loop().run_in_executor(self.executor, assemble), outputs

    async def _screen_ahead(self, ahead: Speculation, pixels: dict[tuple[str, int], np.ndarray],
                            keys: list[tuple[str, int]], filled: AsyncIterator[int],
                            on_batch: Callable[[int], None], calls: InferStats, priority: int) -> list[SliceOutput]:
        """The outputs of the slices ``keys`` (their pixels put in ``pixels`` by ``filled``): the
        speculation's answers, and Triton's for the slices it has none for (a batch of it failed, ...)."""
        async for _ in filled:  # every object decoded (by the speculation): pixels holds every key
            pass
        answers = await ahead.settle()
        calls.add(ahead.stats)
        outputs: list[SliceOutput | None] = [answers.get(key) for key in keys]
        missing = [i for i, out in enumerate(outputs) if out is None]
        if len(keys) > len(missing):
            on_batch(len(keys) - len(missing))
        if missing:
            rest = np.stack([pixels[keys[i]] for i in missing])
            for i, out in zip(missing, await self.pool.infer(rest, on_batch=on_batch, stats=calls,
                                                                     priority=priority), strict=True):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    async def screen(self, prepared: Prepared, *, job_id: str, started: float,
                     on_batch: Callable[[int], None] | None = None,
                     on_aggregate: Callable[[], Any] | None = None,
                     waited: dict[str, float] | None = None, priority: int = 0) -> CaseResult:
        """Screen a prepared study; ``started`` (epoch seconds) is when its job was accepted, ``waited`` the
        timings of the waits before the screening (:meth:`gateway.store.waits.Waits.timings`), ``priority`` the
        Triton priority level of its batches (:func:`gateway.jobs.triton_priority`; 0, the default).

        Raises
        ------
        gateway.errors.InferenceUnavailable
            No Triton could answer (the caller retries later).
        gateway.errors.InferenceFailed
            Triton refused the request.
        """
        if prepared.speculation is not None:
            self.ahead.discard(prepared.speculation)  # a job now: it counts as running, no longer as ahead
        timings: dict[str, Any] = {**(waited or {}), "ingest_s": prepared.ingest_s}
        before = await self.pool.inference_statistics()
        calls = InferStats()
        t = time.monotonic()

        def progress(n: int) -> None:
            self.metrics.slices.inc(n)
            if on_batch is not None:
                on_batch(n)

        if prepared.study is None:
            study, outputs = await self._screen_stream(prepared, progress, calls, priority)
            prepared.study, prepared.plan = study, None
        else:
            study = prepared.study
            outputs = await self.pool.infer(study.hu, on_batch=progress, stats=calls, priority=priority)
        timings["inference_s"] = time.monotonic() - t
        after = await self.pool.inference_statistics()
        self.metrics.stage.labels("infer").observe(timings["inference_s"])
        if on_aggregate is not None:
            await on_aggregate()
        t = time.monotonic()
        models = await self.model_info()
        t_rule = time.perf_counter()
        result = case_result(study, outputs, self.rule, models=models, job_id=job_id, created_at=datetime.now(UTC))
        rule_s = time.perf_counter() - t_rule
        timings["aggregate_s"] = time.monotonic() - t
        timings["total_s"] = max(time.time() - started, timings["inference_s"] + timings["aggregate_s"])
        self.metrics.stage.labels("aggregate").observe(timings["aggregate_s"])
        self.metrics.stage.labels("total").observe(timings["total_s"])
        timings["stages_ms_per_slice"] = stage_ms_per_slice(
            study.n_slices, study.work_s, calls, before, after, self.pool.model_name, rule_s,
            steps=models[0].platform == "ensemble")
        result = result.model_copy(update={"timings": Timings(**timings)})
        self.metrics.studies.labels(result.verdict).inc()
        return result

    model_info_ttl_s = 60.0
    """How long :meth:`model_info` keeps what Triton said: a model rolled out on the Triton fleet is named in
    results from at most this long after (it was kept for the process's life: every result of a gateway
    that outlived a rollout named the models it first saw)."""

    async def model_info(self) -> list[ModelInfo]:
        """The models that screen, as Triton describes them (the called model, then its ONNX graphs' versions
        and sha256), read at most every :attr:`model_info_ttl_s`; ``unknown`` (and read again at the next
        study) while no endpoint answers."""
        now = time.monotonic()
        if self._models is not None and now - self._models[0] < self.model_info_ttl_s:
            return self._models[1]
        version = await self.pool.model_version()
        if version is None:
            return [ModelInfo(name=self.pool.model_name, version="unknown")]
        platform, parts = await self.pool.model_description()
        models = [ModelInfo(name=self.pool.model_name, version=version, platform=platform)]
        for name, info in sorted(parts.items()):
            models.append(ModelInfo(name=name, version=info.get("version", "unknown"), sha256=info.get("sha256")))
        self._models = (now, models)
        return models


def stage_ms_per_slice(n_slices: int, work_s: dict[str, float], calls: InferStats,
                       before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
                       ensemble: str, aggregate_s: float, *, steps: bool = True) -> dict[str, float]:
    """Milliseconds per slice of each stage of one study (see :attr:`aggregator.schema.Timings.stages_ms_per_slice`).

    ``work_s`` is the study's decode and resample seconds (:attr:`gateway.ingest.PreparedStudy.work_s`),
    ``calls`` its requests (:class:`~gateway.triton_pool.InferStats`), ``before`` and ``after`` Triton's
    statistics read around them (:meth:`~gateway.triton_pool.TritonPool.inference_statistics`),
    ``ensemble`` the model called, ``aggregate_s`` the case rule's seconds. ``steps``: the model is an
    ensemble, whose steps' statistics tell its queue and compute; else (the cpu profile's fused model)
    its own do, its post-processing inside its compute, whatever else the server ran meanwhile.

    Examples
    --------
    >>> calls = InferStats(requests=2, slices=8, roundtrip_s=0.8, unpack_s=0.008)
    >>> row = {"inferences": 8, "queue_ns": 0, "compute_ns": 0, "success_ns": 0, "exec_slices": 0, "exec_compute_ns": 0}
    >>> after = {"ct_screen": {**row, "success_ns": 600_000_000},
    ...          "lesion": {**row, "queue_ns": 80_000_000, "exec_slices": 8, "exec_compute_ns": 400_000_000},
    ...          "postprocess": {**row, "compute_ns": 40_000_000}}
    >>> stage_ms_per_slice(8, {"decode": 0.08, "resample": 0.04}, calls, {}, after, "ct_screen", 0.016)
    {'decode': 10.0, 'resample': 5.0, 'grpc': 25.0, 'queue': 10.0, 'compute': 50.0, 'postprocess': 6.0, 'aggregate': 2.0}
    >>> fused = {"ct_screen_fused": {**row, "success_ns": 600_000_000, "queue_ns": 80_000_000,
    ...                              "exec_slices": 8, "exec_compute_ns": 440_000_000}}
    >>> other = {"lesion": {**row, "queue_ns": 999_000_000, "exec_slices": 8, "exec_compute_ns": 999_000_000}}
    >>> stage_ms_per_slice(8, {"decode": 0.08, "resample": 0.04}, calls, {}, {**fused, **other}, "ct_screen_fused",
    ...                    0.016, steps=False)
    {'decode': 10.0, 'resample': 5.0, 'grpc': 25.0, 'queue': 10.0, 'compute': 55.0, 'postprocess': 1.0, 'aggregate': 2.0}
    """
    if n_slices <= 0:
        return {}
    per_slice = 1000.0 / n_slices
    delta = {m: {k: v - before.get(m, {}).get(k, 0) for k, v in row.items()} for m, row in after.items()}

    def ms(model: str, key: str, count: str = "inferences") -> float:
        d = delta.get(model)
        return d[key] / 1e6 / d[count] if d and d[count] > 0 else 0.0

    roundtrip = calls.roundtrip_s * 1000.0 / calls.slices if calls.slices else 0.0
    stages = {"decode": work_s.get("decode", 0.0) * per_slice, "resample": work_s.get("resample", 0.0) * per_slice,
              "grpc": roundtrip}
    post = calls.unpack_s * 1000.0 / calls.slices if calls.slices else 0.0
    server = ms(ensemble, "success_ns")
    if server > 0:
        parts = [m for m, d in delta.items() if m != ensemble and d["inferences"] > 0] if steps else [ensemble]
        queue = sum(ms(m, "queue_ns") for m in parts)
        compute = {m: ms(m, "exec_compute_ns", "exec_slices") or ms(m, "compute_ns") for m in parts}
        post_model = compute.pop(POSTPROCESS_MODEL, 0.0)
        segment = sum(compute.values())
        stages.update(grpc=roundtrip - server, queue=queue, compute=segment, postprocess=post + post_model)
    else:
        stages["postprocess"] = post
    stages["aggregate"] = aggregate_s * per_slice
    return {k: round(max(0.0, v), 3) for k, v in stages.items()}
