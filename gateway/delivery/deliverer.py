"""The delivery loop every gateway replica runs when destinations are configured.

Every ``delivery_poll_s``: (1) each done job finished in the last ``delivery_backfill_s`` that lacks a
delivery to a configured destination gets one (``pending``; the pair is unique, so replicas never make
two); (2) due tasks are claimed under a lease (``delivery_lease_s``), up to ``delivery_concurrency`` at
once to each destination (slots per destination: a destination that hangs never delays another's
deliveries), one at a time to a FHIR or HL7 destination across the replicas; a later version's delivery is not
claimed while an earlier version's to the same destination has not ended (:meth:`Deliveries.claim`). A
claimed task:

* checks the destination's rule (verdict, calling AE of the source): ``skipped`` with the reason, unless the
  destination asks for ``rejection`` and holds objects of the study's earlier readings: then only the
  Rejection Note that retracts them goes (:mod:`gateway.delivery.iocm`);
* builds its payload once (:mod:`gateway.delivery.payloads`) into the blob store, and again if a blob
  of it has gone missing (the objects' UIDs derive from the job, so a rebuild sends the same objects);
* sends what the destination has not acknowledged yet (:mod:`gateway.delivery.senders`);
* records what the destination acknowledged, waiting out a state store that is away (:meth:`Deliverer._record`:
  the destination already holds the objects; giving up there had another replica send them all again);
* ends ``done``; or, on failure, goes back to ``pending`` after ``delivery_backoff_s`` doubling up to
  ``delivery_backoff_max_s``, and ``failed`` (payload kept) after ``delivery_max_attempts`` tries or a
  permanent refusal. ``POST /v1/jobs/{id}/deliveries/{dest}/resend`` queues it again.

Metrics (``/metrics``): ``ctscreen_deliveries_total{destination,outcome}`` (done, failed, skipped),
``ctscreen_delivery_failures_total{destination}`` (failed attempts; the Helm alert
``CtscreenDeliveriesFailing`` reads it), ``ctscreen_delivery_objects_total{destination}`` (objects
acknowledged) and the gauge ``ctscreen_deliveries_pending{destination}``. Log lines name the job, the
destination and the reason, never a patient attribute nor a header value.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import httpx
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aggregator.schema import counted
from gateway.delivery import iocm, payloads
from gateway.delivery.config import DicomDestination, FhirDestination, Hl7Destination, StowDestination
from gateway.delivery.senders import Item, SendError, send_dicom, send_fhir, send_hl7, send_stow
from gateway.logs import JOB_ID, ContextExecutor
from gateway.phi import withheld
from gateway.settings import Settings
from gateway.store import BlobStore, FolderBlobs, Store, StoreError, instance_sources, new_key
from gateway.store.deliveries import DONE, FAILED, SKIPPED, Deliveries, Task
from gateway.store.store import StoreOutage
from gateway.uploads import new_spool

logger = logging.getLogger(__name__)

Destination = DicomDestination | StowDestination | FhirDestination | Hl7Destination

REPORTS = (FhirDestination, Hl7Destination)
"""The destinations that take a report (a RIS): a later reading's report replaces the earlier one held there (FHIR's
replaces extension; at an HL7 RIS the later preliminary result of the same filler order and service), also when the
destination's rule leaves the later reading out."""


class _Pending(Collector):
    def __init__(self, deliverer: Deliverer) -> None:
        self._d = deliverer

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("ctscreen_deliveries_pending", "Deliveries pending or being sent.",
                                  labels=["destination"])
        for name in self._d.destinations:
            gauge.add_metric([name], sum(n for (d, _), n in self._d.pending.items() if d == name))
        yield gauge


class Deliverer:
    """Sends results to the configured destinations (see the module docstring).

    Parameters
    ----------
    store, blobs
        The state store and the blob store.
    destinations : Sequence[Destination]
        Validated destinations (:func:`gateway.delivery.config.load_destinations`).
    settings
        :class:`~gateway.settings.Settings` (delivery back-off, attempts, lease, poll, AE title).
    registry
        The Prometheus registry of the app's metrics (None: no metrics).
    """

    def __init__(self, store: Store, blobs: BlobStore, destinations: Sequence[Destination], settings: Settings,
                 registry: Any = None) -> None:
        self.store, self.blobs, self.settings = store, blobs, settings
        self.tasks = Deliveries(store)
        self.destinations: dict[str, Destination] = {d.name: d for d in destinations}
        self.pending: dict[tuple[str, str], int] = {}
        # slots per destination: one that hangs (accepts TCP, never answers) holds only its own, so it never
        # delays another destination's deliveries
        # a FHIR server's one at a time (by every replica: Deliveries.claim's serial): two transactions with the same
        # conditional creates (the Device's ifNoneExist) at once made two of it at HAPI FHIR, and every later one
        # then failed 412, matching both; an HL7 RIS files results in the order they come (a later reading's
        # preliminary result after the one it replaces)
        self._serial = [n for n, d in self.destinations.items() if isinstance(d, REPORTS)]
        self._slots = {name: asyncio.Semaphore(1 if name in self._serial else settings.delivery_concurrency)
                       for name in self.destinations}
        # C-STORE sends block a thread each (pynetdicom): their own threads, one a slot, so hanging peers never
        # fill the event loop's default pool (6 threads on 2 cores), which blob reads and API-key checks use
        self._senders = ContextExecutor(max(1, len(self.destinations)) * settings.delivery_concurrency,
                                           thread_name_prefix="ctscreen-delivery")
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._claiming = True  # False once the process is going (stop_claiming)
        self._http: httpx.AsyncClient | None = None
        self.outcomes = Counter("ctscreen_deliveries", "Deliveries ended, by destination and outcome.",
                                ["destination", "outcome"], registry=registry)
        self.failures = Counter("ctscreen_delivery_failures", "Failed delivery attempts, by destination.",
                                ["destination"], registry=registry)
        self.objects = Counter("ctscreen_delivery_objects", "Objects acknowledged by a destination.",
                               ["destination"], registry=registry)
        for name in self.destinations:
            self.failures.labels(name)
            self.objects.labels(name)
            for outcome in (DONE, FAILED, SKIPPED):
                self.outcomes.labels(name, outcome)
        if registry is not None:
            registry.register(_Pending(self))

    # --- the loop ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start delivering (nothing to do without destinations)."""
        if not self.destinations:
            return
        self._http = httpx.AsyncClient()
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="ctscreen-deliverer")
        logger.info("delivering results to %s", ", ".join(f"{n} ({d.kind})" for n, d in self.destinations.items()))

    async def poll(self) -> None:
        """One pass: queue missing deliveries and start the due ones (up to the concurrency)."""
        s = self.settings
        await self.tasks.enqueue_missing({n: d.kind for n, d in self.destinations.items()}, s.delivery_backfill_s)
        self.pending = await self.tasks.counts()
        while self._claiming and (free := [name for name, slots in self._slots.items() if not slots.locked()]):
            task = await self.tasks.claim(s.delivery_lease_s, free, s.delivery_max_attempts, self._serial)
            if task is None:
                return
            slots = self._slots[task.destination]
            await slots.acquire()
            run = asyncio.get_running_loop().create_task(self._run(task), name=f"delivery-{task.id}")
            self._running.add(run)
            run.add_done_callback(functools.partial(self._done, slots))

    def _done(self, slots: asyncio.Semaphore, run: asyncio.Task[None]) -> None:
        self._running.discard(run)
        slots.release()

    async def _loop(self) -> None:
        outage = StoreOutage("delivery pass")
        while True:
            seen = self.store.work.generation  # work that comes while the pass runs is not slept over
            try:
                await self.poll()
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not stop deliveries
                outage.failed(exc)
            else:
                outage.ok()
            await self.store.work.wait(self.settings.delivery_poll_s, seen)

    def stop_claiming(self) -> None:
        """Start no more deliveries (the process is going: SIGTERM); those being sent go on until :meth:`stop`."""
        self._claiming = False

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop the loop; sends under way get ``grace_s`` seconds to finish (a PACS that has received a whole
        study answers soon; cut off, it keeps what it got and another replica sends all of it again); those
        still running then are cancelled and given back to any replica at once, their try not counted (if the
        store cannot be reached, their leases lapse and any replica resumes them then)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._running and grace_s > 0:
            _, late = await asyncio.wait(set(self._running), timeout=grace_s)
            if late:
                logger.info("%d deliveries still sending after %g s of grace: cut off", len(late), grace_s)
        for run in list(self._running):
            run.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        if self.destinations:
            try:
                released = await self.tasks.release_held()
            except Exception as exc:  # noqa: BLE001 - shutting down: say it and go on (the leases lapse)
                logger.warning("could not give back the deliveries being sent (%s); their leases lapse in %g s",
                               type(exc).__name__, self.settings.delivery_lease_s)
            else:
                if released:
                    logger.info("gave back %d deliveries being sent, for any replica", released)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        self._senders.shutdown(wait=False, cancel_futures=True)  # a hung send ends at its peer's timeout

    # --- one task ---------------------------------------------------------------------------------
    async def _run(self, task: Task) -> None:
        JOB_ID.set(task.job_id)  # this task's own context: its records (and its sender threads') carry the job's id
        dest = self.destinations[task.destination]
        where = f"job {task.job_id} -> {dest.name}"
        try:
            later = await self.store.later_reading(task.job_id)
            if later is not None:
                # a later version's reading replaces this one: sent after it (a payload built before an outage and
                # sent once the peer is back, a failed earlier version screened again), it would stand at the
                # peer beside or over the current reading
                why = f"superseded: version {later[0]} of the study (job {later[1]}) has a later reading"
                await self.tasks.finish(task.id, SKIPPED, why)
                self.outcomes.labels(dest.name, SKIPPED).inc()
                logger.info("%s: skipped (%s)", where, why)
                return
            payload, items = task.payload, None
            for again in (False, True):
                if payload is None:
                    payload = await self._build(task, dest)
                    if payload is None:
                        return  # skipped by the rule
                todo = [o for o in payload["objects"] if o["uid"] not in task.sent]
                items = await self._load(todo)
                if items is not None:
                    break
                if again:
                    raise payloads.PayloadUnavailable("the payload built again is missing from the blob store")
                # a built object's blob is gone (a volume restored from an older backup, a hand clean-up):
                # build the payload again; its UIDs derive from the job, so what was acknowledged stays so
                logger.warning("%s: the built payload is missing from the blob store; building it again", where)
                payload = None
            assert payload is not None and items is not None
            if todo:
                notes = {o["uid"] for o in todo if o.get("kind") == payloads.REJECTION}
                sent = await self._send(task.id, dest, items, notes)
                await self._record(where, lambda: self.tasks.mark_sent(task.id, sent))
                self.objects.labels(dest.name).inc(len(sent))
            detail = f"{counted(len(payload['objects']), 'object')} acknowledged"
            await self._record(where, lambda: self.tasks.finish(
                task.id, DONE, f"{detail} ({payload['rule']})" if "rule" in payload else detail))
            self.outcomes.labels(dest.name, DONE).inc()
            logger.info("%s: delivered (%d object(s), attempt %d)", where, len(todo), task.attempts)
        except asyncio.CancelledError:
            raise
        except payloads.PayloadUnavailable as exc:
            await self._give_up(task, dest, str(exc))
        except SendError as exc:
            if exc.sent:
                acknowledged = exc.sent
                await self._record(where, lambda: self.tasks.mark_sent(task.id, acknowledged))
                self.objects.labels(dest.name).inc(len(acknowledged))
            self.failures.labels(dest.name).inc()
            s = self.settings
            if exc.permanent or task.attempts >= s.delivery_max_attempts:
                await self._give_up(task, dest, str(exc))
                return
            delay = s.delivery_backoff_max_s if exc.longest else min(
                s.delivery_backoff_max_s, s.delivery_backoff_s * 2 ** max(0, task.attempts - 1))
            if exc.wait_s is not None:  # the destination's Retry-After: at least that long, within the longest back-off
                delay = max(delay, min(exc.wait_s, s.delivery_backoff_max_s))
            await self.tasks.retry_later(task.id, delay, str(exc))
            logger.warning("%s: attempt %d failed (%s); next try in %g s", where, task.attempts, exc, delay)
        except Exception as exc:  # noqa: BLE001 - last resort: a delivery never dies silently
            logger.error("%s: unexpected error", where, exc_info=withheld(exc))
            self.failures.labels(dest.name).inc()
            reason = f"internal error: {type(exc).__name__}"
            if task.attempts >= self.settings.delivery_max_attempts:  # bounded like any other failure
                await self._give_up(task, dest, reason)
                return
            await self.tasks.retry_later(task.id, self.settings.delivery_backoff_max_s, reason)

    async def _record(self, where: str, write: Callable[[], Awaitable[bool]]) -> bool:
        """Write what a destination acknowledged, however long the state store is away, within reason.

        The objects are at the destination already: a write lost to a store outage left the task ``sending``
        with nothing recorded, and the replica that took it over once its lease lapsed sent every object again.
        The write is tried again (0.5 s, doubling to 5 s) for up to twice ``delivery_lease_s``; it lands while
        nobody else has taken the task (the store checks that it is still this replica's), and a task taken
        over meanwhile is the other replica's to finish. False: it was not this replica's any more."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + 2 * self.settings.delivery_lease_s
        delay = 0.5
        while True:
            try:
                return await write()
            except StoreError as exc:
                if loop.time() + delay > give_up_at:
                    raise
                logger.warning("%s: acknowledged, but the state store is away (%s); recording it again in %g s",
                               where, type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def _give_up(self, task: Task, dest: Destination, reason: str) -> None:
        await self.tasks.finish(task.id, FAILED, reason)
        self.outcomes.labels(dest.name, FAILED).inc()
        logger.error("job %s -> %s: delivery failed after %d attempt(s): %s; payload kept, "
                     "POST /v1/jobs/%s/deliveries/%s/resend sends it again",
                     task.job_id, dest.name, task.attempts, reason, task.job_id, dest.name)

    async def _build(self, task: Task, dest: Destination) -> dict[str, Any] | None:
        view = await self.store.job(task.job_id)
        result = view.result
        if result is None:
            raise payloads.PayloadUnavailable("the job has no result")
        files, context = await self.tasks.job_sources(task.job_id)
        callers = payloads.calling_ae_titles([f for f, _ in files])
        why = dest.rule.admits(result.verdict, callers, result.reason)
        report = isinstance(dest, REPORTS)
        # a reading the rule leaves out still replaces the earlier ones this destination holds: at a FHIR server
        # by its report (whose replaces chain makes it current; the positive it holds stayed current), at an HL7
        # RIS by its preliminary result of the same filler order and service, at a PACS by a Rejection Note where
        # the destination sends them
        wants_note = isinstance(dest, REPORTS) or "rejection" in dest.objects
        # the readings this one replaces (not read for a result this destination's rule leaves out, unless a
        # note may still go), and what this destination acknowledged of them
        earlier = await self.store.earlier_results(task.job_id) if why is None or wants_note else []
        held = await self.tasks.acknowledged([e.job_id for e in earlier if e.job_id], dest.name) if wants_note else []
        rejected = await asyncio.to_thread(iocm.retractable, held, self.blobs.get) if held and not report else []
        if why is not None and not (rejected or report and held):
            await self.tasks.finish(task.id, SKIPPED, why)
            self.outcomes.labels(dest.name, SKIPPED).inc()
            logger.info("job %s -> %s: skipped (%s)", task.job_id, dest.name, why)
            return None

        def put(data: bytes) -> str:
            key = new_key()
            self.blobs.put(key, data)
            return key

        def build() -> list[dict[str, str]]:
            if isinstance(dest, FhirDestination):
                return payloads.build_fhir(result, context, put, dest.systems(), earlier)
            if isinstance(dest, Hl7Destination):  # preliminary (OBR-25 P), also when it replaces a reading sent here
                return payloads.build_hl7(result, context, put, dest.parties(), earlier)
            # files, read as needed (their pixels only for the key images); a bucket's downloaded to a spool
            # folder for the build, not held in memory whole
            spool = None if isinstance(self.blobs, FolderBlobs) else new_spool(self.settings.spool_dir())
            try:
                try:
                    sources = instance_sources(self.blobs, files, spool)
                except FileNotFoundError:
                    raise payloads.PayloadUnavailable("an instance is missing from the blob store") from None
                # a reading the rule leaves out still retracts the earlier ones it sent here (a positive followed by
                # a negative at a positives-only PACS): only the Rejection Note goes
                wanted = ["rejection"] if why is not None else dest.objects
                return payloads.build_dicom(result, sources, wanted, put, earlier, rejected)
            finally:
                if spool is not None:
                    shutil.rmtree(spool, ignore_errors=True)

        objects = await asyncio.to_thread(build)
        payload: dict[str, Any] = {"verdict": result.verdict, "objects": objects}
        if why is not None:
            payload["rule"] = f"{why}; sent all the same: it replaces the earlier reading sent here" if report \
                else f"{why}; the earlier readings sent here are retracted"
        await self.tasks.save_payload(task.id, payload)
        return payload

    async def _load(self, todo: list[dict[str, str]]) -> list[Item] | None:
        """``(uid, sop_class_uid, bytes)`` of the objects to send; None when a blob is missing."""
        def load() -> list[Item] | None:
            try:
                return [(o["uid"], o.get("sop_class_uid", ""), self.blobs.get(o["blob_key"])) for o in todo]
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(load)

    async def _send(self, task_id: int, dest: Destination, items: list[Item], notes: set[str]) -> list[str]:
        beat = asyncio.get_running_loop().create_task(self._heartbeat(task_id))
        try:
            if isinstance(dest, DicomDestination):
                return await asyncio.get_running_loop().run_in_executor(
                    self._senders, send_dicom, dest, items, self.settings.dicom_ae_title, notes)
            if self._http is None:  # start() makes it; passes driven by poll() alone make it here
                self._http = httpx.AsyncClient()
            if isinstance(dest, StowDestination):
                return await send_stow(dest, items, self._http, notes)
            if isinstance(dest, Hl7Destination):
                return await send_hl7(dest, items)
            return await send_fhir(dest, items, self._http)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _heartbeat(self, task_id: int) -> None:
        """Renew the lease during a long send (losing it only lets another replica resend: same UIDs)."""
        while True:
            await asyncio.sleep(self.settings.delivery_lease_s / 3)
            with contextlib.suppress(Exception):
                await self.tasks.renew(task_id, self.settings.delivery_lease_s)

    async def expire(self) -> None:
        """Drop the deliveries (and payload blobs) of results retention removes (called by the sweeper)."""
        for key in await self.tasks.expire(self.settings.result_retention_s):
            await asyncio.to_thread(self.blobs.delete, key)
