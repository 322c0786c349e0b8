"""Deliveries in the state store: one durable task per (job, destination) (revision 0003).

A delivery goes::

    pending -> sending -> done
       ^          |   \\-> skipped  (the destination's rule does not take this result)
       +----------+-----> failed   (attempts exhausted, or a permanent refusal; payload kept)
       (back-off)          |
                           +--> pending again on POST /v1/jobs/{id}/deliveries/{dest}/resend

Order. A delivery of a later version of a study is not claimed while a delivery of an earlier version to the
same destination has not ended (pending, in back-off or sending): its build reads what the destination
acknowledged of the earlier readings (the Rejection Note, the FHIR report it replaces), and that is only known
once they end. The earlier one, claimed, is skipped as superseded (at once: one waiting in back-off is due as
soon as a later version has a delivery to that destination) or, already being sent, ends done; ended deliveries
(done, failed, skipped) block nothing, so neither waits for the other. Deliveries to a destination named
``serial`` in :meth:`Deliveries.claim` (FHIR servers) are sent one at a time across the replicas.

``sending`` is held under a lease like a job: a replica that dies mid-send leaves a lease that expires,
and any replica takes the task over. ``payload`` lists the objects built once for the destination
(blob keys of the SR, key images or FHIR bundle, with their SOP Instance UIDs / identifiers); ``sent``
lists those the destination acknowledged in this round, so a retry sends only the rest and nothing is sent twice
for the same result version (the UIDs are derived from the job). A forced re-send starts a round that sends every
object again; what the destination acknowledged before it stays in ``held`` (revision 0013), since the destination
still holds it whether or not the new round gets through: a later reading's Rejection Note and FHIR replaces read
both (:meth:`Deliveries.acknowledged`). ``history`` is the task's event list.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    and_,
    delete,
    exists,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, aliased, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from aggregator.schema import counted
from gateway.errors import JobNotFound
from gateway.jobs import JobState
from gateway.store.models import Base, Instance, Job, Result, Study
from gateway.store.store import Store

logger = logging.getLogger(__name__)

PENDING, SENDING, DONE, FAILED, SKIPPED = "pending", "sending", "done", "failed", "skipped"
FINAL = (DONE, FAILED, SKIPPED)
_HISTORY_MAX = 50


class Delivery(Base):
    """One result to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_id", "destination"), Index("ix_deliveries_claim", "state", "next_attempt_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    sent: Mapped[list[str]] = mapped_column(JSON)
    held: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # revision 0013
    """What the destination acknowledged in the rounds before a forced re-send (None: nothing, or written by an
    earlier release, which cleared ``sent`` on a force)."""
    error: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)


@dataclass(frozen=True, slots=True)
class Task:
    """A delivery as the deliverer and the API see it."""

    id: int
    job_id: str
    destination: str
    kind: str
    state: str
    attempts: int
    next_attempt_at: float
    payload: dict[str, Any] | None
    sent: tuple[str, ...]
    """What the destination acknowledged in this round (a forced re-send starts a round)."""
    error: str | None
    history: tuple[dict[str, Any], ...]
    created_at: float
    updated_at: float
    delivered_at: float | None
    held: tuple[str, ...] = ()
    """What the destination acknowledged in this round and the earlier ones: what it is recorded as holding."""


def _other_version(other: Any, *, newer: bool) -> ColumnElement[bool]:
    """``other`` (an alias of :class:`Delivery`) is a delivery to the same destination as :class:`Delivery`'s
    row, of a ``newer`` (else an earlier) version of the same study."""
    mine_job, mine_study, other_job, other_study = aliased(Job), aliased(Study), aliased(Job), aliased(Study)
    return and_(mine_job.id == Delivery.job_id, mine_study.id == mine_job.study_id,
                other.destination == Delivery.destination,
                other_job.id == other.job_id, other_study.id == other_job.study_id,
                other_study.study_instance_uid == mine_study.study_instance_uid,
                other_study.version > mine_study.version if newer else other_study.version < mine_study.version)


def _task(row: Delivery) -> Task:
    return Task(row.id, row.job_id, row.destination, row.kind, row.state, row.attempts, row.next_attempt_at,
                row.payload, tuple(row.sent or ()), row.error, tuple(row.history or ()), row.created_at,
                row.updated_at, row.delivered_at, tuple(_held(row.held, row.sent)))


def _held(held: list[str] | None, sent: list[str] | None) -> list[str]:
    """What a destination is recorded as holding: acknowledged in the rounds before a forced re-send or in this one."""
    return sorted({*(held or ()), *(sent or ())})


def _requeue(row: Delivery, now: float, detail: str) -> None:
    """Make a delivery pending now, its tries counted afresh (a skipped one's rule is checked again)."""
    if row.state == SKIPPED:
        row.payload = None  # the rule is checked again when it is built
    row.state, row.attempts, row.next_attempt_at, row.error = PENDING, 0, now, None
    row.delivered_at = None  # of this round: a forced re-send that fails showed the earlier delivery's time (its
    # event stays in the history)
    row.updated_at = now
    _event(row, now, PENDING, detail)


def _event(row: Delivery, now: float, state: str, detail: str | None = None) -> None:
    entry: dict[str, Any] = {"at": round(now, 3), "state": state, "attempt": row.attempts}
    if detail:
        entry["detail"] = detail[:300]
    row.history = [*(row.history or []), entry][-_HISTORY_MAX:]


class Deliveries:
    """Delivery tasks on a :class:`~gateway.store.Store` (same engine, same transactions)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def enqueue_missing(self, destinations: dict[str, str], backfill_s: float) -> int:
        """Create the pending deliveries of done jobs finished in the last ``backfill_s`` s that lack one.

        ``destinations`` maps name -> kind. Safe from every replica at once: the pair (job, destination)
        is unique, and a lost race is ignored. Returns how many were created.
        """
        if not destinations:
            return 0
        now = await self.store.now()
        created = 0
        missing: list[tuple[str, str, str]] = []
        async with self.store.read() as s:
            for name, kind in destinations.items():  # one anti-join each: no list of ids sent back as parameters
                has_one = exists().where(Delivery.job_id == Job.id, Delivery.destination == name)
                ids = (await s.execute(select(Job.id).where(
                    Job.state == JobState.done.value, Job.finished_at >= now - backfill_s, ~has_one))).scalars().all()
                missing += [(job_id, name, kind) for job_id in ids]
        for job_id, name, kind in missing:
            try:
                async with self.store.tx() as s:
                    row = Delivery(job_id=job_id, destination=name, kind=kind, state=PENDING, attempts=0,
                                   next_attempt_at=now, sent=[], history=[], created_at=now, updated_at=now)
                    _event(row, now, PENDING, "queued")
                    s.add(row)
                created += 1
            except IntegrityError:  # another replica made it first
                continue
        return created

    async def claim(self, lease_s: float, names: list[str], max_attempts: int | None = None,
                    serial: Collection[str] = ()) -> Task | None:
        """Take the next due delivery to one of ``names`` (or one whose lease expired), under a lease.

        A task whose lease expired after ``max_attempts`` tries is failed instead (its sender was lost on
        every try: a crash while building or sending it would otherwise take each replica down in turn).

        A later version's delivery waits for the earlier versions' deliveries to the same destination to end
        (see the module docstring); to a destination in ``serial`` (a FHIR server, whose conditional creates two
        transactions at once would duplicate) none is taken while another is being sent under a live lease, by
        any replica: the claims to those destinations take a lock of the destination (PostgreSQL: an advisory
        lock for the transaction; SQLite: its writes are one at a time) so two replicas cannot both see it free."""
        if not names:
            return None
        now = await self.store.now()
        serial = sorted(set(serial) & set(names))
        other = aliased(Delivery)
        earlier_open = exists().where(_other_version(other, newer=False), other.state.not_in(FINAL))
        superseded = exists().where(_other_version(other, newer=True))  # claimed, it is skipped at once: no back-off
        busy = exists().where(other.destination == Delivery.destination, other.state == SENDING,
                              other.lease_expires_at >= now)
        due = [Delivery.destination.in_(names), or_(
            and_(Delivery.state == PENDING, or_(Delivery.next_attempt_at <= now, superseded)),
            and_(Delivery.state == SENDING, Delivery.lease_expires_at < now),
        ), ~earlier_open]
        if serial:
            due.append(or_(Delivery.destination.not_in(serial), ~busy))
        for _ in range(16):  # past the tasks failed here
            async with self.store.tx() as s:
                await self._lock_destinations(s, serial)
                row = (await s.execute(select(Delivery).where(*due)
                                       .order_by(Delivery.next_attempt_at).limit(1).with_for_update(skip_locked=True))).scalar_one_or_none()
                if row is None:
                    return None
                row.updated_at = now
                if max_attempts is not None and row.state == SENDING and row.attempts >= max_attempts:
                    detail = (f"its sender was lost during each of its {row.attempts} tries (a crash while building or "
                              "sending it?); POST /v1/jobs/{id}/deliveries/{destination}/resend tries again")
                    row.state, row.lease_owner, row.lease_expires_at = FAILED, None, None
                    row.error = detail
                    _event(row, now, FAILED, detail)
                    logger.warning("delivery %d of job %s to %s failed: its sender was lost during each of %d tries",
                                   row.id, row.job_id, row.destination, row.attempts)
                    continue
                row.state, row.lease_owner, row.lease_expires_at = SENDING, self.store.owner, now + lease_s
                row.attempts += 1
                _event(row, now, SENDING)
                return _task(row)
        return None

    async def _lock_destinations(self, s: AsyncSession, names: Sequence[str]) -> None:
        """Hold the claim lock of each of ``names`` (sorted: no two claims wait on each other) until the transaction
        ends. PostgreSQL: an advisory transaction lock keyed by the name; SQLite writes one transaction at a time."""
        if self.store.dialect != "postgresql":
            return
        for name in names:
            key = int.from_bytes(hashlib.blake2b(f"ctscreen-delivery:{name}".encode(), digest_size=8).digest(),
                                 "big", signed=True)
            await s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    async def _update(self, task_id: int, change: Any, *, leased: bool = True) -> Task | None:
        now = await self.store.now()
        async with self.store.tx() as s:
            row = (await s.execute(select(Delivery).where(Delivery.id == task_id).with_for_update())
                   ).scalar_one_or_none()
            if row is None or (leased and (row.state != SENDING or row.lease_owner != self.store.owner)):
                return None
            change(row, now)
            row.updated_at = now
            return _task(row)

    async def save_payload(self, task_id: int, payload: dict[str, Any]) -> bool:
        """Record the objects built for the task (under its lease)."""
        def change(row: Delivery, now: float) -> None:
            row.payload = payload
            _event(row, now, SENDING, f"built {counted(len(payload.get('objects', [])), 'object')}")
        return await self._update(task_id, change) is not None

    async def mark_sent(self, task_id: int, uids: list[str]) -> bool:
        """Record objects the destination acknowledged (under the lease)."""
        def change(row: Delivery, now: float) -> None:
            row.sent = sorted({*(row.sent or []), *uids})
        return await self._update(task_id, change) is not None

    async def finish(self, task_id: int, state: str, detail: str | None = None) -> bool:
        """End the task: ``done``, ``skipped`` (with the reason) or ``failed`` (with the error)."""
        def change(row: Delivery, now: float) -> None:
            row.state, row.lease_owner, row.lease_expires_at = state, None, None
            row.error = detail[:1024] if state == FAILED and detail else None
            if state == DONE:
                row.delivered_at = now
            _event(row, now, state, detail)
        return await self._update(task_id, change) is not None

    async def retry_later(self, task_id: int, delay_s: float, error: str) -> bool:
        """Back to ``pending`` in ``delay_s`` seconds, keeping the error of this attempt."""
        def change(row: Delivery, now: float) -> None:
            row.state, row.lease_owner, row.lease_expires_at = PENDING, None, None
            row.next_attempt_at, row.error = now + delay_s, error[:1024]
            _event(row, now, PENDING, f"retry in {delay_s:g} s: {error}")
        return await self._update(task_id, change) is not None

    async def release_held(self) -> int:
        """Give back every task this replica is sending (it shuts down): ``pending`` and due at once for any
        replica, the try not counted (a shut-down is no failure of the destination). Without it each
        rolling restart cost every delivery in flight a try and a wait for its lease to lapse."""
        now = await self.store.now()
        async with self.store.tx() as s:
            rows = (await s.execute(select(Delivery).where(
                Delivery.state == SENDING, Delivery.lease_owner == self.store.owner).with_for_update())).scalars().all()
            for row in rows:
                row.state, row.lease_owner, row.lease_expires_at, row.next_attempt_at = PENDING, None, None, now
                row.attempts = max(0, row.attempts - 1)
                row.updated_at = now
                _event(row, now, PENDING, "released: its sender shut down")
        if rows:
            self.store.wake()
        return len(rows)

    async def renew(self, task_id: int, lease_s: float) -> bool:
        """Renew the lease of a task being sent."""
        def change(row: Delivery, now: float) -> None:
            row.lease_expires_at = now + lease_s
        return await self._update(task_id, change) is not None

    async def resend(self, job_id: str, destination: str, kind: str, *, force: bool = False) -> Task:
        """Queue a delivery again now (``failed`` or ``skipped``; ``done`` only with ``force``).

        A done job without a delivery to ``destination`` (finished before the destination was added)
        gets one.

        ``force`` starts a new round: every object goes again (same UIDs: the destination replaces, it does not
        duplicate). What the destination acknowledged before stays recorded as held there (``held``), whatever the
        new round does: cleared, a forced re-send that failed left a later reading nothing to retract.

        Raises
        ------
        JobNotFound
            Unknown job.
        ValueError
            The job is not done, or the delivery is pending or being sent, or done without ``force``.
        """
        now = await self.store.now()
        async with self.store.tx() as s:
            row = (await s.execute(select(Delivery).where(Delivery.job_id == job_id,
                                                          Delivery.destination == destination)
                                   .with_for_update())).scalar_one_or_none()
            if row is None:
                state = (await s.execute(select(Job.state).where(Job.id == job_id))).scalar()
                if state is None:
                    raise JobNotFound(f"No job {job_id!r}.")
                if state != JobState.done.value:
                    raise ValueError(f"Job {job_id} is {state}; only a done job's result can be sent.")
                row = Delivery(job_id=job_id, destination=destination, kind=kind, state=FAILED, attempts=0,
                               next_attempt_at=now, sent=[], history=[], created_at=now, updated_at=now)
                s.add(row)
            if row.state in (PENDING, SENDING):
                raise ValueError(f"The delivery of job {job_id} to {destination} is {row.state} already.")
            if row.state == DONE and not force:
                raise ValueError(f"Job {job_id} was delivered to {destination} already; force=true sends it again.")
            if force:
                row.held, row.sent = _held(row.held, row.sent), []
            _requeue(row, now, "re-send requested" + (" (forced)" if force else ""))
            task = _task(row)
        self.store.wake()
        return task

    async def resend_failed(self, destination: str, limit: int = 1000) -> int:
        """Queue again now the failed deliveries to ``destination`` (the oldest ``limit`` first), as
        :meth:`resend` does one: after an outage longer than the tries, each one's job had to be named by hand.
        Returns how many were queued."""
        now = await self.store.now()
        async with self.store.tx() as s:
            rows = (await s.execute(select(Delivery).where(Delivery.state == FAILED, Delivery.destination == destination)
                                    .order_by(Delivery.updated_at).limit(limit).with_for_update())).scalars().all()
            for row in rows:
                _requeue(row, now, "re-send of every failed delivery requested")
        if rows:
            self.store.wake()
        return len(rows)

    async def in_state(self, state: str, destination: str | None = None, limit: int = 100) -> list[Task]:
        """The deliveries in ``state`` (to ``destination``, or to any), the latest changed first."""
        query = select(Delivery).where(Delivery.state == state)
        if destination is not None:
            query = query.where(Delivery.destination == destination)
        async with self.store.read() as s:
            rows = (await s.execute(query.order_by(Delivery.updated_at.desc(), Delivery.id.desc()).limit(limit))
                    ).scalars().all()
            return [_task(r) for r in rows]

    async def of_job(self, job_id: str) -> list[Task]:
        """The deliveries of a job."""
        async with self.store.read() as s:
            rows = (await s.execute(select(Delivery).where(Delivery.job_id == job_id)
                                    .order_by(Delivery.destination))).scalars().all()
            return [_task(r) for r in rows]

    async def held_behind(self, job_id: str) -> dict[str, str]:
        """``{destination: job}`` of the job's pending deliveries that wait for an earlier version's delivery
        to the same destination to end (:meth:`claim` takes none before), each with the earliest such job."""
        other = aliased(Delivery)
        async with self.store.read() as s:
            rows = (await s.execute(
                select(Delivery.destination, other.job_id).where(
                    Delivery.job_id == job_id, Delivery.state == PENDING, _other_version(other, newer=False),
                    other.state.not_in(FINAL))
                .order_by(other.created_at.desc()))).all()  # the earliest last: it is the one kept
        return {destination: earlier for destination, earlier in rows}

    async def acknowledged(self, job_ids: Sequence[str], destination: str) -> list[dict[str, str]]:
        """The payload objects (kind, uid, sop_class_uid, blob_key) of ``job_ids``' deliveries to ``destination``
        that it acknowledged, in any round (a forced re-send that failed leaves them there), whatever the task's state
        (a failed one may have sent some), in ``job_ids``' order."""
        if not job_ids:
            return []
        async with self.store.read() as s:
            rows = (await s.execute(select(Delivery.job_id, Delivery.payload, Delivery.sent, Delivery.held).where(
                Delivery.job_id.in_(list(job_ids)), Delivery.destination == destination))).all()
        by_job = {r[0]: (r[1], set(_held(r[3], r[2]))) for r in rows}
        out = []
        for job_id in job_ids:
            payload, sent = by_job.get(job_id, (None, set()))
            out += [o for o in (payload or {}).get("objects", []) if o.get("uid") in sent]
        return out

    async def counts(self) -> dict[tuple[str, str], int]:
        """``{(destination, state): n}`` of the tasks not final (for the gauge)."""
        async with self.store.read() as s:
            rows = (await s.execute(select(Delivery.destination, Delivery.state, func.count())
                                    .where(Delivery.state.not_in(FINAL))
                                    .group_by(Delivery.destination, Delivery.state))).all()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def job_sources(self, job_id: str) -> tuple[list[tuple[str, str]], dict[str, Any] | None]:
        """``(filename, blob_key)`` of the job's instances and its SR headers (empty once expired).

        Raises
        ------
        JobNotFound
            Unknown job.
        """
        async with self.store.read() as s:
            study_id = (await s.execute(select(Job.study_id).where(Job.id == job_id))).scalar()
            if study_id is None:
                raise JobNotFound(f"No job {job_id!r}.")
            files = (await s.execute(select(Instance.filename, Instance.blob_key)
                                     .where(Instance.study_id == study_id).order_by(Instance.id))).all()
            context = (await s.execute(select(Result.sr_context).where(Result.job_id == job_id))).scalar()
        return [(f, k) for f, k in files], context

    async def payload_blobs(self) -> set[str]:
        """Every blob key a delivery's payload names (the orphan sweep keeps them), read 500 rows at a time."""
        keys: set[str] = set()
        async with self.store.read() as s:
            rows = await s.stream_scalars(select(Delivery.payload).where(Delivery.payload.is_not(None))
                                          .execution_options(yield_per=500))
            async for chunk in rows.partitions():
                keys |= _payload_keys(chunk)
        return keys

    async def expire(self, results_s: float) -> list[str]:
        """Delete the deliveries of jobs retention is about to remove; returns their payload blob keys.

        Runs before :meth:`Store.expire` (which would cascade the rows away and leave their blobs).
        """
        now = await self.store.now()
        async with self.store.tx() as s:
            old = select(Job.id).where(Job.finished_at < now - results_s)
            payloads = (await s.execute(delete(Delivery).where(Delivery.job_id.in_(old))
                                        .returning(Delivery.payload))).scalars().all()
        return sorted(_payload_keys(payloads))


def _payload_keys(payloads: Sequence[dict[str, Any] | None]) -> set[str]:
    return {o["blob_key"] for p in payloads if p for o in p.get("objects", []) if o.get("blob_key")}
