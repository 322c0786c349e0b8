"""The work loops every gateway replica runs: the worker (claims and screens jobs) and the sweeper.

**Worker.** Up to ``max_concurrent_studies`` jobs at once, each claimed from the state store under a
lease of ``lease_s`` seconds, and up to ``urgent_slots`` urgent ones more while those slots are all taken: an
urgent study starts at once, and its batches overtake the routine studies' in the gateway and in Triton
(:func:`gateway.jobs.triton_priority`). While a job runs, a heartbeat records progress every
``progress_interval_s`` (when there is some) and renews the lease at least every ``lease_s / 3``; a replica that loses its lease (it stalled and another took the job over)
stops working on it, and only the lease holder can write the result. When no Triton endpoint is ready
the worker claims nothing; when Triton goes away during a study, the job goes back to ``queued`` with
back-off (``retry_backoff_s`` doubling up to ``retry_backoff_max_s``) until its deadline
(``job_deadline_s`` after acceptance), then ``failed`` with its instances kept. On shut-down the worker
stops claiming, gives running jobs ``shutdown_grace_s`` and releases the rest (due at once, for any
replica).

**Sweeper.** Every ``sweep_interval_s``: closes the STOW / C-STORE study versions quiet for
``stow_quiet_period_s`` (one job per version, decided atomically in the store), fails queued jobs past
their deadline, refreshes the job gauges (this replica's share: the jobs it holds and the queued jobs
it accepted, re-queued or adopted from a replica that shut down or was not seen alive for
``max(lease_s, 4 * sweep_interval_s)``, so that the sum over replicas is the cluster's backlog: ``ctscreen_backlog_slices`` summed over gateways, which the chart's fleet signal
``ctscreen:backlog_seconds:fleet`` divides by Triton's rate) and, every minute, enforces
retention (results and instances, with their blobs). Every ``orphan_sweep_interval_s`` it removes the
blobs older than ``orphan_grace_s`` that nothing names (:meth:`Sweeper.sweep_orphans`).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import random
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import PYDICOM_ROOT_UID

from aggregator.schema import CaseResult
from gateway.errors import GatewayError, InferenceUnavailable
from gateway.jobs import URGENT, JobError, JobState, priority_name, triton_priority
from gateway.logs import JOB_ID
from gateway.metrics import Metrics
from gateway.phi import withheld
from gateway.screening import Prepared, Screener
from gateway.settings import Settings
from gateway.store import (
    BlobStore,
    Claimed,
    FolderBlobs,
    Store,
    StoreError,
    instance_sources,
)
from gateway.store.blobs import delete_each
from gateway.store.deliveries import Deliveries
from gateway.store.store import StoreOutage
from gateway.store.waits import study_waits
from gateway.uploads import in_thread, new_spool, sweep_spools

logger = logging.getLogger(__name__)


_READY_FOR_AHEAD_S = 5.0
"""An upload is screened ahead only if a probe found Triton ready this recently (or within two of the
worker's polls, if longer: the idle worker probes about every second, or every poll)."""


class LeaseLost(RuntimeError):
    """Another replica holds the job now; this one stops working on it."""


@dataclass
class _Progress:
    """A running job's progress, written with the lease renewals."""

    done: int = 0
    state: JobState = JobState.decoding
    dirty: bool = False


def transfer_interrupted(result: CaseResult, note: str) -> CaseResult:
    """The result of a study whose C-STORE transfer ended without a release: it says so (a warning), and a
    negative verdict is ``indeterminate`` (``transfer_interrupted``): the slices screened may be only part of
    the study, and the run may lie in the rest. A positive one stands (its run was found)."""
    warnings = [*result.warnings, note]
    if result.verdict != "negative":
        return result.model_copy(update={"warnings": warnings})
    return result.model_copy(update={
        "verdict": "indeterminate", "reason": "transfer_interrupted", "warnings": warnings,
        "message": f"Indeterminate: {note} No run was found on the {result.n_slices} slices received; send the "
                   "whole study again."})


class _Slots:
    """The worker's room: ``slots`` for any job, and ``urgent`` more that only an urgent job takes, the one kind
    only while the others are all taken."""

    def __init__(self, slots: int, urgent: int) -> None:
        self._free = {False: slots, True: urgent}  # by "urgent only"
        self._freed = asyncio.Event()

    async def take(self) -> bool:
        """Wait for a free slot and take it; True when it is one kept for urgent jobs."""
        while True:
            for urgent_only in (False, True):
                if self._free[urgent_only] > 0:
                    self._free[urgent_only] -= 1
                    return urgent_only
            self._freed.clear()
            await self._freed.wait()

    def give(self, urgent_only: bool) -> None:
        """Give back a slot :meth:`take` took."""
        self._free[urgent_only] += 1
        self._freed.set()


class Worker:
    """Claims jobs from the store and screens them (see the module docstring).

    Parameters
    ----------
    store, blobs, screener
        The state store, the blob store and the screening function.
    settings
        :class:`~gateway.settings.Settings` (concurrency, lease, back-off, deadline).
    """

    def __init__(self, store: Store, blobs: BlobStore, screener: Screener, settings: Settings) -> None:
        self.store, self.blobs, self.screener, self.settings = store, blobs, screener, settings
        self._slots = _Slots(settings.max_concurrent_studies, settings.urgent_slots)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._outage = StoreOutage("claiming a job")
        self._prepared: OrderedDict[str, tuple[Prepared, float]] = OrderedDict()  # with when (monotonic)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ready_at = 0.0
        self._seen_ready = 0.0  # when a probe last found Triton ready (0: not since one failed)

    async def remember(self, job_id: str, prepared: Prepared) -> None:
        """Keep an upload decoded by this replica, so that its worker need not decode it again.

        A cache, never the only copy: at most ``max_concurrent_studies`` entries, the oldest dropped.
        Releasing one removes its spooled files: in a thread, never on the event loop (a large upload's
        spool, on a network volume, would stall every request and lease renewal meanwhile).
        """
        self._prepared[job_id] = (prepared, time.monotonic())
        while len(self._prepared) > self.settings.max_concurrent_studies:
            await asyncio.to_thread(self._prepared.popitem(last=False)[1][0].release)

    async def forget(self, job_id: str) -> None:
        """Drop (and release, in a thread) what :meth:`remember` kept for ``job_id``, if anything."""
        kept = self._prepared.pop(job_id, None)
        if kept is not None:
            await asyncio.to_thread(kept[0].release)

    async def _recall(self, job_id: str) -> Prepared | None:
        """What :meth:`remember` kept for ``job_id``, if its spooled files are surely still there: the spool
        sweep removes folders older than twice the job deadline, so an entry older than one deadline (a job
        that waited out an outage, failed and was retried) is dropped, and the job reads the blob store."""
        kept = self._prepared.pop(job_id, None)
        if kept is None:
            return None
        prepared, when = kept
        if time.monotonic() - when > self.settings.job_deadline_s:
            await asyncio.to_thread(prepared.release)
            return None
        return prepared

    def has_room(self, urgent: bool = False) -> bool:
        """Whether an upload may be screened ahead now: Triton was ready at the last look (no probe here:
        an upload never waits on Triton) and a slot is free that no running job and no other upload still
        being screened ahead takes (one whose guess has settled holds memory, bounded by :meth:`remember`,
        but asks nothing more of Triton or the cores: an accepted upload that another replica claims
        must not hold a slot here). An ``urgent`` upload may also take the slots kept for urgent studies."""
        working = sum(1 for s in list(self.screener.ahead) if s.busy())  # list(): a release may run in a thread
        slots = self.settings.max_concurrent_studies + (self.settings.urgent_slots if urgent else 0)
        free = slots - len(self._running) - working
        recent = max(_READY_FOR_AHEAD_S, 2 * self.settings.worker_poll_s)  # an idle worker probes every poll
        return not self._stopping and free > 0 and time.monotonic() - self._seen_ready < recent

    def start(self) -> None:
        """Start claiming."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ctscreen-worker")

    async def _triton_ready(self) -> bool:
        now = time.monotonic()
        if now < self._ready_at:
            return True
        ready = await self.screener.pool.is_ready()
        if ready:
            self._ready_at = now + 1.0
        self._seen_ready = now if ready else 0.0
        return ready

    async def _loop(self) -> None:
        poll = self.settings.worker_poll_s
        while not self._stopping:
            urgent_only = await self._slots.take()
            if self._stopping:  # stopped claiming while it waited for a slot
                self._slots.give(urgent_only)
                break
            job = None
            seen = self.store.work.generation  # a job queued while the claim runs wakes the wait below at once
            try:
                if await self._triton_ready():
                    job = await self.store.claim(self.settings.lease_s, exclude=list(self._running),
                                                 min_priority=URGENT if urgent_only else None,
                                                 ageing_s=self.settings.priority_ageing_s)
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not stop the worker
                self._outage.failed(exc)
            else:
                self._outage.ok()
            lost = self.store.take_lost_failed()  # set aside by the claim (worker_lost): failed studies, counted
            if lost:
                self.screener.metrics.failed("worker_lost", lost)
            if job is None:
                self._slots.give(urgent_only)
                await self.store.work.wait(poll, seen)
                continue
            task = asyncio.get_running_loop().create_task(self._work(job), name=f"job-{job.id}")
            self._running[job.id] = task
            task.add_done_callback(functools.partial(self._done, job.id, urgent_only))

    def _done(self, job_id: str, urgent_only: bool, _task: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        self._slots.give(urgent_only)
        # the loop may be waiting for work, not for a slot: it polled the slot kept for urgent jobs (the others all
        # taken) and found none; the slot freed here is for the next job queued, now, not a poll later
        self.store.work.notify()

    async def _work(self, job: Claimed) -> None:
        JOB_ID.set(job.id)  # this task's own context (and its threads'): every record of the job carries its id
        s = self.settings
        progress = _Progress()
        me = asyncio.current_task()
        assert me is not None

        # one write at a time, each with the state as it is when the write starts: a heartbeat issued
        # before a state change must not land after it (the job read "inferring" while aggregating)
        writing = asyncio.Lock()

        async def heartbeat() -> None:
            renewed = time.monotonic()  # the last renewal that reached the store
            while True:
                await asyncio.sleep(s.progress_interval_s)
                if not progress.dirty and time.monotonic() - renewed < s.lease_s / 3:
                    continue  # nothing to record, and the lease is young: no write
                dirty, progress.dirty = progress.dirty, False
                try:
                    async with writing:
                        if dirty:
                            held = await self.store.heartbeat(job.id, s.lease_s, state=progress.state,
                                                              slices_done=progress.done)
                        else:
                            held = await self.store.heartbeat(job.id, s.lease_s)
                except Exception as exc:  # noqa: BLE001 - a database blip: try again while the lease lasts
                    progress.dirty = progress.dirty or dirty
                    if time.monotonic() - renewed >= s.lease_s:  # lapsed: any replica (this one too) may resume it
                        logger.warning("job %s: lease not renewed for %g s (%s); left to be resumed",
                                       job.id, s.lease_s, type(exc).__name__)
                        me.cancel(msg="lease lapsed")
                        return
                    logger.warning("job %s: renewing the lease failed (%s); trying again", job.id, type(exc).__name__)
                    continue
                renewed = time.monotonic()
                if not held:
                    logger.warning("job %s: lease lost; another replica holds it now", job.id)
                    me.cancel(msg="lease lost")
                    return

        async def set_state(state: JobState, **kw: Any) -> None:
            async with writing:
                progress.state = state
                if not await self.store.heartbeat(job.id, s.lease_s, state=state, slices_done=progress.done, **kw):
                    raise LeaseLost(job.id)

        def on_batch(n: int) -> None:
            progress.done += n
            progress.dirty = True

        beat = asyncio.get_running_loop().create_task(heartbeat(), name=f"lease-{job.id}")
        remembered = await self._recall(job.id)
        spool: Path | None = None  # where a bucket's instances were downloaded to
        try:
            waits = await study_waits(self.store, job.id)  # claimed: its waits in the queue are over
            prepared = remembered
            if prepared is None:
                prepared, spool = await self._prepare(job)
            await set_state(JobState.inferring, slices_total=prepared.n_slices,
                            series_instance_uid=prepared.series_instance_uid)
            accepted = time.time() - (await self.store.now() - job.created_at)  # created_at is the store's clock
            result = await self.screener.screen(
                prepared, job_id=job.id, started=accepted, on_batch=on_batch,
                on_aggregate=lambda: set_state(JobState.aggregating),
                waited=None if waits is None else waits.timings(), priority=triton_priority(job.priority))
            interrupted = await self.store.interrupted(job.study_id)
            if interrupted is not None:
                result = transfer_interrupted(result, interrupted)
            # the headers its SR reads: the geometry of the images it references, not the whole series'
            context = prepared.sr_context.for_result(result).to_json() if prepared.sr_context is not None else None
            del prepared
            # the root its SR's UIDs are made under, for good (pydicom's named too: null means a result made
            # before ctscreen recorded it, when no site root could be set)
            result = result.model_copy(update={"uid_root": self.settings.uid_root or PYDICOM_ROOT_UID})
            if not await self.store.finish(job.id, result, context):
                raise LeaseLost(job.id)
            if waits is not None:  # the verdict is recorded: the study's turnaround, from its last instance
                self.screener.metrics.turnaround.labels(job.origin, priority_name(job.priority)).observe(
                    max(0.0, await self.store.now() - waits.last_received_at))
            logger.info("job %s done: %s (%d slices)", job.id, result.verdict, result.n_slices)
        except asyncio.CancelledError:
            raise  # shut-down (released by stop) or lease lost (another replica has it)
        except LeaseLost:
            logger.warning("job %s: lease lost before the result was written; left to its new holder", job.id)
        except InferenceUnavailable as exc:
            self._ready_at = self._seen_ready = 0.0
            await self._release(job, f"no Triton could take it ({exc})",
                                JobError(reason=exc.reason, message=str(exc)))
        except StoreError as exc:  # the state store blinked (a fail-over, a lock): the study is not at fault
            await self._release(job, f"state store error ({type(exc).__name__})", JobError(
                reason="store_unavailable", message=f"State store error: {type(exc).__name__}."))
        except OSError as exc:  # the blob volume failed a read (EIO, a stale NFS handle): the study is not at fault
            code = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            await self._release(job, f"blob store read error ({type(exc).__name__})", JobError(
                reason="unavailable", message=f"The blob store could not be read ({code}); the study is tried again."))
        except GatewayError as exc:  # a bad study, or Triton refused it (InferenceFailed)
            await self._fail(job, JobError(reason=exc.reason, message=exc.message, detail=exc.to_dict()))
        except Exception as exc:  # noqa: BLE001 - last resort: a job never dies silently
            logger.error("job %s failed", job.id, exc_info=withheld(exc))
            await self._fail(job, JobError(reason="internal",  # the text of exc may name paths or addresses: the log has it
                                           message=f"Internal error while screening ({type(exc).__name__}); "
                                                   "the gateway's log has the details."))
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            if remembered is not None:  # its spooled files: the blob store holds the instances
                await asyncio.to_thread(remembered.release)
            if spool is not None:
                await asyncio.to_thread(shutil.rmtree, spool, True)

    async def _release(self, job: Claimed, cause: str, error: JobError) -> None:
        """Give ``job`` back after a try that failed for want of something else than the study (Triton, the state
        store, the blob store): queued again with back-off, or failed past its deadline (counted). One log line,
        ``cause`` (no patient data) and what became of the job. The state store may be away then too (a
        PostgreSQL restart): the release is not written, the job keeps its lease and is resumed when it lapses;
        nothing escapes the job's task."""
        delay = self._backoff(job)
        try:
            state = await self.store.release(job.id, delay, error)
        except Exception as exc:  # noqa: BLE001 - the store is down (too): its lease lapses, any replica resumes it
            logger.warning("job %s: %s; could not release it (%s): it is resumed when its lease lapses", job.id,
                           cause, type(exc).__name__)
            return
        self._count_if_failed(state, error.reason)
        logger.warning("job %s: %s; %s", job.id, cause, f"next try in {delay:g} s" if state == "queued" else state)

    def _backoff(self, job: Claimed) -> float:
        """Seconds before a released job is tried again: doubling from ``retry_backoff_s`` with its attempts,
        up to ``retry_backoff_max_s``."""
        s = self.settings
        return min(s.retry_backoff_max_s, s.retry_backoff_s * 2 ** max(0, job.attempts - 1))

    async def _prepare(self, job: Claimed) -> tuple[Prepared, Path | None]:
        """The study of ``job`` read back from the blob store, and the spool folder its instances were downloaded
        to (an S3 bucket's; None for a folder's), which the caller removes once the study is screened."""
        files = await self.store.instance_files(job.study_id)
        if not files:
            from gateway.errors import Unavailable

            raise Unavailable("The study's instances are no longer kept (retention); send it again.")
        # instances in a bucket are downloaded to files of a spool folder (removed when the study is released),
        # not held in memory whole; a folder's are read where they are
        spool = None if isinstance(self.blobs, FolderBlobs) else await asyncio.to_thread(new_spool, self.settings.spool_dir())
        stop = threading.Event()
        try:
            try:  # cancelled (a lost lease, a shut-down): the downloads stop, and end before the spool goes
                sources = await in_thread(instance_sources, self.blobs, files, spool, stop, on_cancel=stop.set)
            except FileNotFoundError as exc:
                from gateway.errors import Unavailable

                raise Unavailable(f"An instance of the study is missing from the blob store: {exc.filename}") from None
            prepared = await self.screener.prepare(sources)
        except BaseException:
            if spool is not None:
                await asyncio.to_thread(shutil.rmtree, spool, True)
            raise
        return prepared, spool

    def _count_if_failed(self, state: str | None, reason: str) -> None:
        """A release past the job's deadline fails it: a failed study, counted as every other (the verdict SLO's
        alert reads it)."""
        if state == "failed":
            self.screener.metrics.failed(reason)

    async def _fail(self, job: Claimed, error: JobError) -> None:
        """Record ``job`` failed (a bad study, Triton's refusal, a bug), counted once it is written. The state store
        may be away then (a PostgreSQL restart): nothing is written or counted, one line says so and the job keeps
        its lease, resumed when it lapses (its next try fails it again, and is counted then); nothing escapes the
        job's task. Counted first, a failure the store did not take was counted again by the try that recorded it."""
        try:
            failed = await self.store.fail(job.id, error)
        except Exception as exc:  # noqa: BLE001 - the store is down: its lease lapses, any replica resumes it
            logger.warning("job %s: %s; could not record its failure (%s): it is resumed when its lease lapses",
                           job.id, error.reason, type(exc).__name__)
            return
        if failed:
            self.screener.metrics.failed(error.reason)
            logger.info("job %s failed: %s", job.id, error.reason)

    def stop_claiming(self) -> None:
        """Claim no more jobs (the process is going: SIGTERM); those running go on until :meth:`stop`."""
        self._stopping = True
        self.store.work.notify()  # a loop waiting for work looks again, and stops

    async def stop(self, grace_s: float) -> None:
        """Stop claiming, give running jobs ``grace_s`` seconds, release the others to any replica."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        tasks = list(self._running.values())
        if tasks and grace_s > 0:
            logger.info("draining %d running jobs (up to %g s)", len(tasks), grace_s)
            await asyncio.wait(tasks, timeout=grace_s)
        for task in self._running.values():
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job_id in list(self._prepared):
            await self.forget(job_id)
        try:
            released = await self.store.release_all()
        except Exception as exc:  # noqa: BLE001 - shutting down: say it and go on (leases expire anyway)
            logger.warning("could not release unfinished jobs (their leases expire in %g s): %s: %s",
                           self.settings.lease_s, type(exc).__name__, exc)
        else:
            if released:
                logger.warning("released %d unfinished jobs for other replicas (or the next start)", released)


ORPHANS_HELD = 100_000
"""The most orphans one sweep sets aside (and holds the keys of); more wait for the next sweep."""
ORPHAN_BRAKE = 0.1
"""The orphan sweep removes nothing when more than this share of the old blobs would go (see
:meth:`Sweeper.sweep_orphans`)."""


class Sweeper:
    """Study completion, deadlines, gauges and retention (see the module docstring)."""

    retention_every_s = 60.0
    orphans_first_after_s = 600.0  # the first orphan sweep, after start (then every orphan_sweep_interval_s)

    def __init__(self, store: Store, blobs: BlobStore, settings: Settings,
                 before_expire: Callable[[], Awaitable[None]] | None = None, metrics: Metrics | None = None) -> None:
        self.store, self.blobs, self.settings, self.metrics = store, blobs, settings, metrics
        self.before_expire = before_expire  # e.g. the deliveries' own retention, before rows cascade away
        self.counts: tuple[int, int, int] = (0, 0, 0)
        self.alive_s = settings.replica_alive_s
        """A replica whose sweeper has not run for this long is taken for gone (its waiting jobs adopted)."""
        self._task: asyncio.Task[None] | None = None
        self._retention_at = 0.0
        # replicas started together do not all walk the shared folder at once
        self._orphans_at = time.monotonic() + self.orphans_first_after_s * random.uniform(0.5, 1.5)
        self._orphans: asyncio.Task[int] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ctscreen-sweeper")

    async def sweep(self) -> None:
        """One pass."""
        s = self.settings
        swept = await self.store.sweep(s.stow_quiet_period_s, s.job_deadline_s, self.alive_s)  # one transaction
        overdue = await self.store.fail_overdue(swept.overdue)
        if overdue:  # after a long Triton outage: studies that need someone's retry, not silence
            logger.warning("%d studies failed at their deadline (no Triton took them in time); their instances are "
                           "kept: POST /v1/jobs/{id}/retry queues one again", overdue)
            if self.metrics is not None:
                self.metrics.failed("deadline", overdue)
        # with the queued jobs a replica left at shut-down, adopted by this pass; read again when it failed some
        # (rare): the backlog holds DICOM senders back (Watermark), and failed jobs are no backlog
        self.counts = await self.store.counts(mine=True) if overdue else swept.counts
        if time.monotonic() >= self._retention_at:
            self._retention_at = time.monotonic() + self.retention_every_s
            if self.before_expire is not None:
                await self.before_expire()
            keys = await self.store.expire(s.result_retention_s, s.instance_retention_s)
            stop = threading.Event()  # a shut-down ends the deletes between two keys (the rest: the orphan sweep's)
            failed = await in_thread(self._delete_each, keys, stop, on_cancel=stop.set)
            if failed:  # nothing names them now: the orphan sweep takes them, and says so (not the brake's alarm)
                logger.warning("retention: %d of %d expired blobs could not be deleted now (%s); the orphan sweep "
                               "removes them later", failed[0], len(keys), failed[1])
            # uploads spooled by a process that died before removing them, or kept past a long outage
            if await asyncio.to_thread(sweep_spools, s.spool_dir(), 2 * s.job_deadline_s):
                logger.warning("removed upload spool folders older than twice the job deadline")
        if s.orphan_sweep_interval_s and time.monotonic() >= self._orphans_at and self._orphans is None:
            # its own task: walking a large shared folder must not hold up study completion and deadlines
            self._orphans = asyncio.get_running_loop().create_task(self.sweep_orphans(), name="ctscreen-orphans")
            self._orphans.add_done_callback(self._orphans_done)

    def _delete_each(self, keys: list[str], stop: threading.Event | None = None) -> tuple[int, str] | None:
        """:func:`gateway.store.blobs.delete_each` on this sweeper's blob store (one failed delete ends neither the
        pass nor the spool sweep after it)."""
        return delete_each(self.blobs, keys, stop)

    def _orphans_done(self, task: asyncio.Task[int]) -> None:
        self._orphans = None
        failed = not task.cancelled() and task.exception() is not None
        if failed:
            logger.error("orphan sweep failed (trying again in %g s): %s", self.retention_every_s, task.exception())
        self._orphans_at = time.monotonic() + (self.retention_every_s if failed else self.settings.orphan_sweep_interval_s)

    async def sweep_orphans(self, later_s: float = 0.0) -> int:
        """Set aside the blobs older than ``orphan_grace_s`` that no instance row and no delivery payload names
        (in the blob folder's ``orphans/``, deleted ``orphan_keep_s`` later), and delete what was set aside
        that long ago; returns how many were set aside (``later_s``: judged as if that many seconds had
        passed, for tests). Set aside, not deleted: a database restored to an earlier point than the blob
        folder names fewer blobs than it holds, and the instances received since are the only copy (the
        sender was told they were stored).

        They are left by a crash or a cancellation between a write and the commit that names it, by a store
        failure after the write (the commit may have landed: the writer does not delete, this checks), by a
        payload built twice (a lost lease) or rebuilt (a resend). Nothing can name them later: only new keys
        are ever written and named, within seconds of the write. A blob folder belongs to one state store:
        when more than ``ORPHAN_BRAKE`` of the old blobs (and over 10) would go, which is what a wrong or
        recreated database, or a folder shared by two stores, looks like, nothing is removed and the error
        says so.
        """
        purged = await asyncio.to_thread(self.blobs.purge_set_aside, self.settings.orphan_keep_s, later_s)
        if purged:
            logger.info("deleted %d blobs set aside more than %g s ago", purged, self.settings.orphan_keep_s)
        payloads = await Deliveries(self.store).payload_blobs()
        old = found = 0
        orphans: list[str] = []  # at most ORPHANS_HELD: the rest wait for the next sweep
        for shard in await asyncio.to_thread(self.blobs.shards):  # one shard's keys in memory at a time
            keys = await asyncio.to_thread(self.blobs.older_than, self.settings.orphan_grace_s, later_s, shard)
            if not keys:
                continue
            named = await self.store.named_blobs(keys)
            unnamed = [k for k in keys if k not in named and k not in payloads]
            old, found = old + len(keys), found + len(unnamed)
            orphans += unnamed[: max(0, ORPHANS_HELD - len(orphans))]
        if found > max(10, ORPHAN_BRAKE * old):
            logger.error("orphan sweep: %d of the %d blobs older than %g s are named by no instance or delivery "
                         "of this state store; removing none. Is CTSCREEN_DATABASE_URL the store this blob folder "
                         "belongs to?", found, old, self.settings.orphan_grace_s)
            return 0
        for key in orphans:
            await asyncio.to_thread(self.blobs.set_aside, key)
        if orphans:
            logger.warning("set aside %d blobs that nothing names (older than %g s) in the blob folder's orphans/, "
                           "deleted after %g s", len(orphans), self.settings.orphan_grace_s,
                           self.settings.orphan_keep_s)
        return len(orphans)

    async def _loop(self) -> None:
        outage = StoreOutage("sweep")
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # noqa: BLE001 - the sweeper must survive a database hiccup
                outage.failed(exc)
            else:
                outage.ok()
            await asyncio.sleep(self.settings.sweep_interval_s)

    async def stop(self) -> None:
        for task in (self._task, self._orphans):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
