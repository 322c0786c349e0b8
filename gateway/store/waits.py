"""How long a study waited before its screening: arriving, its quiet period, the queue (one read).

:func:`study_waits` reads, for a job a worker just claimed, when its study version received its first
and last instance and when the job was created (``studies``, ``jobs``), and sums the job's waits in the
queue from its events (:func:`queued_time`). The worker writes them into the result's timings
(``receive_s``, ``quiet_s``, ``queued_s``) and measures the study's turnaround, from its last instance
(an upload: its acceptance) to its verdict, from them (``ctscreen_study_turnaround_seconds``).

Times are the store's (:meth:`gateway.store.Store.now`): differences of two of them are durations
whichever replica wrote them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select

from gateway.jobs import JobState
from gateway.store.models import Event, Job, Study
from gateway.store.store import Store

__all__ = ["Waits", "queued_time", "study_waits"]


@dataclass(frozen=True, slots=True)
class Waits:
    """When a job's study arrived and how long the job waited in the queue (store times, epoch seconds)."""

    first_received_at: float
    """The study version's first instance received (an upload: accepted); the worklist's "Received"."""
    last_received_at: float
    """Its last instance received (an upload: accepted)."""
    created_at: float
    """Its job created: the study complete (quiet period over, or ``POST .../complete``), an upload accepted."""
    queued_s: float
    """Waiting for a worker, summed over the job's tries (:func:`queued_time`)."""

    @property
    def receive_s(self) -> float:
        """First instance received -> job created."""
        return max(0.0, self.created_at - self.first_received_at)

    @property
    def quiet_s(self) -> float:
        """Last instance received -> job created."""
        return max(0.0, self.created_at - self.last_received_at)

    def timings(self) -> dict[str, float]:
        """The fields of :class:`aggregator.schema.Timings` these fill."""
        return {"receive_s": self.receive_s, "quiet_s": self.quiet_s, "queued_s": self.queued_s}


def queued_time(events: Iterable[tuple[str, float]]) -> float:
    """Seconds spent queued in a job's events ``(state, at)``, oldest first: each stretch from an event that
    (re)queued it (created, released for want of Triton, its lapsed holder taken over, retried) to the next
    event, which is a worker's claim (or the job failed at its deadline while waiting).

    >>> queued_time([("queued", 10.0), ("decoding", 12.5), ("inferring", 13.0)])
    2.5
    >>> queued_time([("queued", 0.0), ("decoding", 1.0), ("queued", 5.0), ("queued", 6.0), ("decoding", 9.0)])
    5.0
    >>> queued_time([("queued", 0.0)])  # not claimed yet
    0.0
    """
    total, since = 0.0, None
    for state, at in events:
        if state == JobState.queued.value:
            since = at if since is None else since  # queued again while queued (a take-over): the first counts
        elif since is not None:
            total, since = total + max(0.0, at - since), None
    return total


async def study_waits(store: Store, job_id: str) -> Waits | None:
    """The :class:`Waits` of a job (None when it is unknown), in one read."""
    async with store.read() as s:
        row = (await s.execute(select(Study.created_at, Study.last_rx_at, Job.created_at)
                               .join(Job, Job.study_id == Study.id).where(Job.id == job_id))).first()
        if row is None:
            return None
        events = (await s.execute(select(Event.state, Event.created_at).where(Event.job_id == job_id)
                                  .order_by(Event.id))).all()
    return Waits(float(row[0]), float(row[1]), float(row[2]), queued_time((str(e[0]), float(e[1])) for e in events))
