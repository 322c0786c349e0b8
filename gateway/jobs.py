"""Jobs: one accepted study, from decoded slices to a :class:`~aggregator.schema.CaseResult`.

A job goes ``queued -> decoding -> waiting -> inferring -> aggregating -> done`` (or ``failed``):

* **admission**: at most ``max_concurrent_studies + max_queued_studies`` jobs are active at once;
  beyond that :meth:`JobStore.submit` raises :class:`Busy` (HTTP 429 with ``Retry-After``), so the
  memory the gateway holds stays bounded (each active job holds one upload or one decoded study);
* **decoding** runs in a thread pool (``decode_workers`` threads), so decoding one study overlaps the
  inference of others; the HTTP request that submitted the job waits for it (:meth:`Job.decoded`),
  so a study that cannot be screened is refused with its specific 4xx, never accepted then dropped;
* **inference** holds one of ``max_concurrent_studies`` slots and fans the slices out through
  :class:`~gateway.triton_pool.TritonPool`; each answered batch advances the job's progress;
* **verdict** comes from :func:`aggregator.case.decide`; the gateway holds no case logic.

Nothing accepted is lost: a finished job stays in memory until it has been read and ``job_ttl_s`` has
passed (unread jobs are kept until ``max_finished_jobs`` forces the oldest out). With ``results_dir``
set, every state change and result is written to ``<results_dir>/jobs/<id>.json`` (a job and the latest
result per study survive eviction and restarts), and an accepted study's files are spooled to
``<results_dir>/spool/<id>/`` until it finishes, so a job cut short by a stop is screened again, under
the same id, when the gateway starts again (:meth:`JobStore.recover`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from aggregator.case import CaseRule, SliceInput, decide
from aggregator.schema import CaseResult, ModelInfo, RejectedFile, Timings
from gateway.errors import GatewayError, InvalidInput
from gateway.metrics import Metrics
from gateway.report import SrContext, sr_context
from gateway.triton_pool import InferenceFailed, InferenceUnavailable, TritonPool

logger = logging.getLogger(__name__)


class Busy(RuntimeError):
    """Too many studies are active; the client should retry after ``retry_after_s`` seconds."""

    reason = "busy"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobNotFound(KeyError):
    """No job (or no result for a study) under that identifier."""

    reason = "not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class JobState(StrEnum):
    """Where a job is."""

    queued = "queued"
    decoding = "decoding"
    waiting = "waiting"
    inferring = "inferring"
    aggregating = "aggregating"
    done = "done"
    failed = "failed"


TERMINAL = frozenset({JobState.done, JobState.failed})


class JobError(BaseModel):
    """Why a job failed: a machine-readable reason and a sentence."""

    reason: str
    message: str
    detail: dict[str, Any] | None = None


class JobView(BaseModel):
    """A job as the API shows it."""

    job_id: str
    state: JobState
    origin: str = Field(description="upload or stow")
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    files: int = Field(description="files received")
    slices_total: int | None = Field(None, description="slices to screen, known once decoded")
    slices_done: int = 0
    created_at: datetime
    finished_at: datetime | None = None
    error: JobError | None = None
    result: CaseResult | None = None


class Job:
    """One study being screened (internal; the API shows :class:`JobView`)."""

    def __init__(self, job_id: str, origin: str, sources: list[tuple[str, bytes]] | None, files: int) -> None:
        self.id = job_id
        self.origin = origin
        self.state = JobState.queued
        self.files = files
        self.sources = sources
        self.total: int | None = None
        self.done = 0
        self.study_instance_uid: str | None = None
        self.series_instance_uid: str | None = None
        self.created_at = datetime.now(UTC)
        self.t0 = time.monotonic()
        self.finished_at: datetime | None = None
        self.finished_mono: float | None = None
        self.read = False
        self.error: JobError | None = None
        self.result: CaseResult | None = None
        self.sr_context: SrContext | None = None  # headers for GET /v1/jobs/{id}/sr
        self.version = 0
        self._changed = asyncio.Event()
        self.decoded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def view(self) -> JobView:
        return JobView(
            job_id=self.id, state=self.state, origin=self.origin,
            study_instance_uid=self.study_instance_uid, series_instance_uid=self.series_instance_uid,
            files=self.files, slices_total=self.total, slices_done=self.done,
            created_at=self.created_at, finished_at=self.finished_at, error=self.error, result=self.result,
        )

    def touch(self) -> None:
        """Wake everyone waiting for a change of this job."""
        self.version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_change(self, version: int, timeout: float) -> bool:
        """Wait until the job's version passes ``version``; False on timeout."""
        if self.version != version:
            return True
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True


Loader = Callable[[Sequence[tuple[str, bytes]]], Any]


def _ingest_loader(workers: int) -> Loader:
    from gateway.ingest import load_study

    def load(sources: Sequence[tuple[str, bytes]]) -> Any:
        return load_study(sources, workers=workers)

    return load


class JobStore:
    """Holds the jobs and runs them.

    Parameters
    ----------
    pool : TritonPool
        Where slices are screened.
    metrics : Metrics
        Counters and histograms to update.
    max_concurrent_studies, max_queued_studies : int
        Studies screened at once, and accepted studies allowed to wait for a slot.
    retry_after_s : int
        The ``Retry-After`` of :class:`Busy`.
    decode_workers : int
        Threads decoding DICOM.
    max_finished_jobs : int
        Finished jobs kept in memory (read ones are dropped first).
    job_ttl_s : float
        A finished job that has been read is dropped after this long.
    results_dir : Path | None
        Where job states and results are also written.
    rule : CaseRule | None
        The case rule (paper defaults).
    loader : Callable | None
        ``sources -> PreparedStudy``; defaults to :func:`gateway.ingest.load_study`.
    """

    def __init__(
        self,
        pool: TritonPool,
        metrics: Metrics,
        *,
        max_concurrent_studies: int = 2,
        max_queued_studies: int = 4,
        retry_after_s: int = 10,
        decode_workers: int = 2,
        max_finished_jobs: int = 1000,
        job_ttl_s: float = 86400.0,
        results_dir: Path | None = None,
        rule: CaseRule | None = None,
        loader: Loader | None = None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.max_active = max_concurrent_studies + max_queued_studies
        self.retry_after_s = retry_after_s
        self.max_finished_jobs = max_finished_jobs
        self.job_ttl_s = job_ttl_s
        self.rule = rule or CaseRule()
        self._loader = loader or _ingest_loader(decode_workers)
        self._slots = asyncio.Semaphore(max_concurrent_studies)
        self._executor = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="ctscreen-decode")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._by_study: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._models: list[ModelInfo] | None = None
        self.results_dir = results_dir
        if results_dir is not None:
            (results_dir / "jobs").mkdir(parents=True, exist_ok=True)

    # --- admission ---------------------------------------------------------------------------
    def active(self) -> list[Job]:
        """Jobs not yet finished."""
        return [j for j in self._jobs.values() if j.state not in TERMINAL]

    def state(self) -> tuple[int, int, int]:
        """``(queued, running, backlog_slices)`` for the metrics."""
        queued = running = backlog = 0
        for job in self.active():
            if job.state in (JobState.queued, JobState.decoding, JobState.waiting):
                queued += 1
            else:
                running += 1
            backlog += (job.total if job.total is not None else job.files) - job.done
        return queued, running, backlog

    def check_capacity(self) -> None:
        """Raise :class:`Busy` when no further study can be accepted now."""
        if len(self.active()) >= self.max_active:
            raise Busy(
                f"{self.max_active} studies are being screened or waiting; retry later.", self.retry_after_s
            )

    def submit(self, sources: list[tuple[str, bytes]], *, origin: str = "upload",
               study_instance_uid: str | None = None) -> Job:
        """Accept a study and start screening it; the caller may await ``job.decoded``.

        Raises
        ------
        Busy
            When ``max_concurrent_studies + max_queued_studies`` jobs are active.
        ValueError
            When ``sources`` is empty.
        """
        if not sources:
            raise InvalidInput("The upload holds no file.")
        self.check_capacity()
        return self._start(Job(uuid.uuid4().hex, origin, sources, len(sources)), study_instance_uid)

    def _start(self, job: Job, study_instance_uid: str | None) -> Job:
        self._jobs[job.id] = job
        if study_instance_uid is not None:  # known up front (STOW): findable before decoding
            job.study_instance_uid = study_instance_uid
            self._by_study[study_instance_uid] = job.id
        self._persist(job)
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"job-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._evict()
        return job

    # --- lookup ------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobView:
        """The job ``job_id`` (from memory, else from ``results_dir``); marks a finished job read."""
        job = self._jobs.get(job_id)
        if job is not None:
            if job.state in TERMINAL:
                job.read = True
            return job.view()
        stored = self._load(job_id)
        if stored is None:
            raise JobNotFound(f"No job {job_id!r}.")
        return stored

    def job(self, job_id: str) -> Job:
        """The live job object (for progress events)."""
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"No job {job_id!r} in memory.")
        return job

    def latest_for_study(self, study_instance_uid: str) -> JobView:
        """The most recent job of a study (its result once done)."""
        job_id = self._by_study.get(study_instance_uid)
        if job_id is None and self.results_dir is not None:
            path = self.results_dir / "studies" / f"{_safe(study_instance_uid)}.json"
            if path.is_file():
                job_id = json.loads(path.read_text())["job_id"]
        if job_id is None:
            raise JobNotFound(f"No study {study_instance_uid!r} has been received.")
        return self.get(job_id)

    async def events(self, job_id: str, keepalive_s: float = 15.0) -> AsyncIterator[JobView | None]:
        """Yield the job's view at each change until it finishes (``None``: nothing new, keep-alive)."""
        job = self._jobs.get(job_id)
        if job is None:
            yield self.get(job_id)
            return
        version = -1
        while True:
            if job.version != version:
                version = job.version
                view = job.view()
                yield view
                if job.state in TERMINAL:
                    job.read = True
                    return
            elif not await job.wait_change(version, keepalive_s):
                yield None

    # --- running -----------------------------------------------------------------------------
    def _set(self, job: Job, state: JobState) -> None:
        job.state = state
        job.touch()
        self._persist(job)

    async def _run(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        timings: dict[str, float] = {}
        try:
            if self.results_dir is not None and job.sources:
                await loop.run_in_executor(self._executor, self._spool, job.id, job.sources)
            self._set(job, JobState.decoding)
            t = time.monotonic()
            sources, job.sources = job.sources or [], None
            try:
                study = await loop.run_in_executor(self._executor, self._loader, sources)
                job.sr_context = await loop.run_in_executor(self._executor, sr_context, sources, study)
            finally:
                del sources
            timings["ingest_s"] = time.monotonic() - t
            self.metrics.stage.labels("decode").observe(timings["ingest_s"])
            job.study_instance_uid = str(study.study_instance_uid)
            job.series_instance_uid = str(study.series_instance_uid)
            job.total = len(study.slices)
            self._by_study[job.study_instance_uid] = job.id
            rejected = [_rejected(r) for r in getattr(study, "rejected", ()) or ()]
            rejected += [_rejected(r) for r in getattr(study, "excluded", ()) or ()]
            for r in rejected:
                self.metrics.error(r.reason)
            if not job.decoded.done():
                job.decoded.set_result(None)
            self._set(job, JobState.waiting)
            t = time.monotonic()
            async with self._slots:
                timings["queued_s"] = time.monotonic() - t
                self._set(job, JobState.inferring)
                t = time.monotonic()

                def progress(n: int) -> None:
                    job.done += n
                    self.metrics.slices.inc(n)
                    job.touch()

                outputs = await self.pool.infer(study.hu, on_batch=progress)
                timings["inference_s"] = time.monotonic() - t
                self.metrics.stage.labels("infer").observe(timings["inference_s"])
            del study.hu
            self._set(job, JobState.aggregating)
            t = time.monotonic()
            models = await self._model_info()
            inputs = [
                SliceInput(
                    sop_instance_uid=str(meta.sop_instance_uid),
                    position_mm=float(meta.position_mm),
                    boxes=out.boxes,
                    valid_area=out.valid_area,
                    rows=_int_or_none(getattr(meta, "rows", None)),
                    cols=_int_or_none(getattr(meta, "cols", getattr(meta, "columns", None))),
                    to_original=_grid_mapper(meta),
                )
                for meta, out in zip(study.slices, outputs, strict=True)
            ]
            decision = decide(inputs, self.rule, spacing_mm=_spacing(study))
            timings["aggregate_s"] = time.monotonic() - t
            timings["total_s"] = time.monotonic() - job.t0
            self.metrics.stage.labels("aggregate").observe(timings["aggregate_s"])
            self.metrics.stage.labels("total").observe(timings["total_s"])
            job.result = decision.to_result(
                study_instance_uid=job.study_instance_uid,
                series_instance_uid=job.series_instance_uid,
                models=models,
                timings=Timings(**timings),
                rejected=rejected,
                warnings=[str(w) for w in getattr(study, "warnings", ()) or ()],
                job_id=job.id,
                created_at=datetime.now(UTC),
            )
            self.metrics.studies.labels(job.result.verdict).inc()
            self._finish(job, JobState.done)
        except asyncio.CancelledError:
            if self._spooled(job.id):  # resumed by the next start (see recover)
                job.state = JobState.queued
                self._persist(job)
                if not job.decoded.done():
                    job.decoded.cancel()
            else:
                self._fail(job, "shutdown", "The gateway stopped before the study was screened.")
            raise
        except GatewayError as exc:
            self._fail(job, exc.reason, exc.message, exc.to_dict(), exc)
        except (InferenceUnavailable, InferenceFailed) as exc:
            self._fail(job, exc.reason, str(exc), None, exc)
        except Exception as exc:  # last resort: a job never dies silently
            logger.exception("job %s failed", job.id)
            self._fail(job, "internal", f"Internal error while screening: {type(exc).__name__}: {exc}", None, exc)

    def _fail(
        self, job: Job, reason: str, message: str, detail: dict[str, Any] | None = None,
        exc: BaseException | None = None,
    ) -> None:
        job.error = JobError(reason=reason, message=message, detail=detail)
        self.metrics.error(reason)
        self.metrics.studies.labels("failed").inc()
        if not job.decoded.done():
            if exc is not None:
                job.decoded.set_exception(exc)
                job.decoded.exception()  # retrieved: nobody may be awaiting (STOW jobs)
            else:
                job.decoded.set_result(None)
        self._finish(job, JobState.failed)

    def _finish(self, job: Job, state: JobState) -> None:
        job.sources = None
        self._unspool(job.id)
        job.finished_at = datetime.now(UTC)
        job.finished_mono = time.monotonic()
        self._set(job, state)
        if self.results_dir is not None and job.study_instance_uid and state == JobState.done:
            _write(self.results_dir / "studies" / f"{_safe(job.study_instance_uid)}.json",
                   {"job_id": job.id, "study_instance_uid": job.study_instance_uid})
        self._evict()

    async def _model_info(self) -> list[ModelInfo]:
        if self._models is None:
            version = await self.pool.model_version()
            if version is None:
                return [ModelInfo(name=self.pool.model_name, version="unknown")]
            models = [ModelInfo(name=self.pool.model_name, version=version, platform="ensemble")]
            for name, info in sorted((await self.pool.component_models()).items()):
                models.append(ModelInfo(name=name, version=info.get("version", "unknown"),
                                        sha256=info.get("sha256")))
            self._models = models
        return self._models

    # --- memory bound and persistence --------------------------------------------------------
    def _evict(self) -> None:
        now = time.monotonic()
        finished = [j for j in self._jobs.values() if j.state in TERMINAL]
        for job in finished:
            if job.read and job.finished_mono is not None and now - job.finished_mono > self.job_ttl_s:
                self._drop(job)
        finished = [j for j in self._jobs.values() if j.state in TERMINAL]
        excess = len(finished) - self.max_finished_jobs
        if excess > 0:
            order = sorted(finished, key=lambda j: (not j.read, j.finished_mono or 0.0))
            for job in order[:excess]:
                if not job.read and self.results_dir is None:
                    logger.warning("dropping unread job %s: more than %d finished jobs", job.id,
                                   self.max_finished_jobs)
                self._drop(job)

    def _drop(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        if job.study_instance_uid and self._by_study.get(job.study_instance_uid) == job.id:
            if self.results_dir is None:
                self._by_study.pop(job.study_instance_uid, None)

    def _persist(self, job: Job) -> None:
        if self.results_dir is None:
            return
        _write(self.results_dir / "jobs" / f"{job.id}.json", job.view().model_dump(mode="json"))

    def _load(self, job_id: str) -> JobView | None:
        if self.results_dir is None or not job_id.isalnum():
            return None
        path = self.results_dir / "jobs" / f"{job_id}.json"
        if not path.is_file():
            return None
        return JobView.model_validate_json(path.read_text())

    def _spool_dir(self, job_id: str) -> Path:
        assert self.results_dir is not None
        return self.results_dir / "spool" / job_id

    def _spool(self, job_id: str, sources: Sequence[tuple[str, bytes]]) -> None:
        """Write an accepted study's files to ``results_dir/spool/<id>`` (``names.json`` last)."""
        folder = self._spool_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        for i, (_, data) in enumerate(sources):
            (folder / f"{i:06d}.bin").write_bytes(data)
        _write(folder / "names.json", {"names": [name for name, _ in sources]})

    def _spooled(self, job_id: str) -> bool:
        return self.results_dir is not None and (self._spool_dir(job_id) / "names.json").is_file()

    def _unspool(self, job_id: str) -> None:
        if self.results_dir is None:
            return
        folder = self._spool_dir(job_id)
        if folder.is_dir():
            for f in folder.iterdir():
                f.unlink(missing_ok=True)
            folder.rmdir()

    def recover(self) -> int:
        """Resume the jobs a previous process left unfinished; returns how many.

        A job whose files were spooled is screened again under its own id; one that was not (the
        process stopped while receiving it) is marked failed with reason ``interrupted``.
        """
        if self.results_dir is None:
            return 0
        n = 0
        for path in (self.results_dir / "jobs").glob("*.json"):
            try:
                view = JobView.model_validate_json(path.read_text())
            except ValueError:
                continue
            if view.state not in TERMINAL and self._spooled(view.job_id):
                names = json.loads((self._spool_dir(view.job_id) / "names.json").read_text())["names"]
                sources = [(name, (self._spool_dir(view.job_id) / f"{i:06d}.bin").read_bytes())
                           for i, name in enumerate(names)]
                job = Job(view.job_id, view.origin, sources, len(sources))
                job.created_at = view.created_at
                self._start(job, view.study_instance_uid)
                logger.info("resuming job %s (%d files) left by a previous run", job.id, len(sources))
                n += 1
            elif view.state not in TERMINAL:
                view.state = JobState.failed
                view.error = JobError(reason="interrupted",
                                      message="The gateway stopped before this study was screened; upload it again.")
                _write(path, view.model_dump(mode="json"))
                n += 1
        return n

    async def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the active jobs to finish (graceful shut-down)."""
        tasks = [t for t in self._tasks if not t.done()]
        if tasks and timeout_s > 0:
            logger.info("draining %d active jobs (up to %g s)", len(tasks), timeout_s)
            await asyncio.wait(tasks, timeout=timeout_s)

    async def close(self) -> None:
        """Cancel running jobs (they end ``failed``, reason ``shutdown``) and stop the decoders."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _rejected(row: Any) -> RejectedFile:
    if isinstance(row, RejectedFile):
        return row
    if isinstance(row, tuple | list):
        filename, reason, message = row[:3]
    else:
        filename, reason, message = row.filename, row.reason, row.message
    return RejectedFile(filename=str(filename), reason=str(reason), message=str(message))


def _grid_mapper(meta: Any) -> Callable[[Any], Any] | None:
    grid = getattr(meta, "grid", None)
    return getattr(grid, "to_original", None)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _spacing(study: Any) -> float | None:
    for name in ("spacing_mm", "slice_spacing_mm", "nominal_spacing_mm"):
        value = getattr(study, name, None)
        if value:
            return float(value)
    return None


def _safe(uid: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in uid)


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
