"""Read-side queries of the web page (issue 16): the worklist, its live progress, the service figures.

Everything here reads the state store (one read transaction per call) except :meth:`Worklist.put_labels`,
which records the labels (no patient name, ID or birth date) of a study version (study date, accession number, series
description) once its job is done; the labels are read from a stored instance of the screened series by
:mod:`gateway.web.labels`, never from a client.

The worklist is one row per study version, newest first (``studies.created_at``, indexed); its filters
run in SQL: state, verdict (an expression index on the result document, revision 0004) and the day the
study was received. Urgent first (``order="priority"``) and the priority filter read the index of revision 0015.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, ForeignKey, String, and_, func, literal_column, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from gateway.jobs import PRIORITIES, RUNNING, JobState, Priority, priority_name
from gateway.store.models import Base, Event, Instance, Job, Result, Study
from gateway.store.store import RECEIVING, Store, latest_version, newest_version

__all__ = ["ORDERS", "STATES", "VERDICTS", "StudyLabels", "Worklist", "WorklistPage", "WorklistRow", "row_state"]

STATES = ("receiving", "queued", "screening", "done", "failed")
"""The states the worklist shows (``screening`` is decoding, inferring or aggregating)."""
VERDICTS = ("positive", "negative", "indeterminate")
ORDERS = ("newest", "priority")
"""The worklist's orders: ``newest`` first (the default), or by ``priority``: urgent first (then routine, then low; newest first
within each). Either is a total order (the study version's id breaks ties), so offset paging repeats or skips no row."""
_RUNNING = [s.value for s in RUNNING]


class StudyLabels(Base):
    """Labels (no patient name, ID or birth date) of one study version (revision 0004)."""

    __tablename__ = "study_labels"

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True)
    study_date: Mapped[str | None] = mapped_column(String(8), nullable=True)
    accession_number: Mapped[str | None] = mapped_column(String(16), nullable=True)
    series_description: Mapped[str | None] = mapped_column(String(64), nullable=True)
    read_at: Mapped[float] = mapped_column(Float)


def row_state(study_state: str, job_state: str | None) -> str:
    """The worklist state of a study version from its study and job states.

    >>> row_state("receiving", None), row_state("complete", "inferring"), row_state("complete", "done")
    ('receiving', 'screening', 'done')
    """
    if study_state == RECEIVING or job_state is None:
        return "receiving"
    return "screening" if job_state in _RUNNING else job_state


@dataclass(frozen=True, slots=True)
class WorklistRow:
    """One study version as the worklist shows it."""

    study_id: int
    study_instance_uid: str
    version: int
    origin: str
    received_at: float
    state: str
    job_id: str | None
    slices_done: int
    slices_total: int | None
    instances: int | None
    finished_at: float | None
    started_at: float | None
    verdict: str | None
    reason: str | None
    message: str | None
    error: dict[str, Any] | None
    labels: dict[str, str | None] | None
    latest_version: int = 0
    """The study's newest version whose job has not failed (:func:`gateway.store.store.latest_version`): above
    ``version``, this row's verdict is superseded."""
    series_instance_uid: str | None = None
    """The series the result is about (done rows): its instances carry the row's series description."""
    priority: Priority = "routine"
    """The study version's priority (:data:`gateway.jobs.PRIORITIES`): urgent ones go first."""
    newest_version: int = 0
    """The study's newest version, whatever its state (:func:`gateway.store.store.newest_version`): above ``version``,
    this row's failed job is not retried (the page offers no Screen again on it)."""


@dataclass(frozen=True, slots=True)
class WorklistPage:
    """A page of the worklist and how many rows match the filters."""

    rows: list[WorklistRow]
    total: int


class Worklist:
    """The worklist queries over a :class:`~gateway.store.Store` (same engines, same sessions)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _json_text(self, path: tuple[str, ...]) -> ColumnElement[Any]:
        """``results.result`` at ``path`` as text, written exactly as the index of revision 0004."""
        if self.store.dialect == "postgresql":
            if len(path) == 1:
                return Result.result.op("->>")(literal_column(f"'{path[0]}'"))
            return Result.result.op("#>>")(literal_column("'{" + ",".join(path) + "}'"))
        return func.json_extract(Result.result, literal_column("'$." + ".".join(path) + "'"))

    def verdict_of(self) -> ColumnElement[Any]:
        """The verdict of a result (indexed: ``ix_results_verdict``)."""
        return self._json_text(("verdict",))

    async def page(self, *, limit: int = 50, offset: int = 0, state: str | None = None, verdict: str | None = None,
                   received_from: float | None = None, received_to: float | None = None,
                   job_id: str | None = None, priority: Priority | None = None, order: str = "newest") -> WorklistPage:
        """The study versions matching the filters, newest first (or urgent first: ``order``).

        Parameters
        ----------
        limit, offset : int
            The page.
        state : str | None
            One of :data:`STATES`.
        verdict : str | None
            One of :data:`VERDICTS` (only done studies have one).
        received_from, received_to : float | None
            Received at or after / before these epoch seconds.
        job_id : str | None
            The row of this job only (the study view names its study as the worklist does).
        priority : str | None
            Study versions of this priority only (``urgent``, ``routine``, ``low``).
        order : str
            One of :data:`ORDERS`: ``newest`` first, or by ``priority``: urgent, then routine, then low, each newest first.

        Raises
        ------
        ValueError
            An unknown state, verdict or order, or a negative page.
        """
        if order not in ORDERS:
            raise ValueError(f'Argument "order" must be one of {", ".join(ORDERS)}, got {order!r}.')
        if state is not None and state not in STATES:
            raise ValueError(f'Argument "state" must be one of {", ".join(STATES)}, got {state!r}.')
        if verdict is not None and verdict not in VERDICTS:
            raise ValueError(f'Argument "verdict" must be one of {", ".join(VERDICTS)}, got {verdict!r}.')
        if limit < 1 or offset < 0:
            raise ValueError('Arguments "limit" must be >= 1 and "offset" >= 0.')
        verdict_col = self.verdict_of()
        where: list[ColumnElement[bool]] = []
        if state == "receiving":
            where.append(Study.state == RECEIVING)
        elif state == "screening":
            where.append(Job.state.in_(_RUNNING))
        elif state is not None:
            where.append(Job.state == state)
        if verdict is not None:
            where.append(verdict_col == verdict)
        if received_from is not None:
            where.append(Study.created_at >= received_from)
        if received_to is not None:
            where.append(Study.created_at < received_to)
        if job_id is not None:
            where.append(Job.id == job_id)
        if priority is not None:
            if priority not in PRIORITIES:
                raise ValueError(f'Argument "priority" must be one of {", ".join(PRIORITIES)}, got {priority!r}.')
            where.append(Study.priority == PRIORITIES[priority])
        joined = (select(Study).outerjoin(Job, Job.study_id == Study.id)
                  .outerjoin(Result, Result.job_id == Job.id).where(and_(True, *where)))
        count = joined.with_only_columns(func.count(Study.id))
        query = (joined.outerjoin(StudyLabels, StudyLabels.study_id == Study.id).with_only_columns(
            Study.id, Study.study_instance_uid, Study.version, Study.origin, Study.created_at, Study.state,
            Job.id, Job.state, Job.slices_done, Job.slices_total, Job.files, Job.finished_at, Job.created_at,
            Job.error, verdict_col, self._json_text(("reason",)), self._json_text(("message",)),
            StudyLabels.study_date, StudyLabels.accession_number, StudyLabels.series_description,
            StudyLabels.read_at, latest_version(), self._json_text(("series_instance_uid",)), Study.priority,
            newest_version(),
        ).order_by(*self._order(order)).limit(limit).offset(offset))
        async with self.store.read() as s:
            total = int((await s.execute(count)).scalar() or 0)
            rows = (await s.execute(query)).all()
        out = []
        for r in rows:
            labels = None if r[20] is None else {"study_date": r[17], "accession_number": r[18],
                                                 "series_description": r[19]}
            out.append(WorklistRow(
                study_id=r[0], study_instance_uid=r[1], version=r[2], origin=r[3], received_at=r[4],
                state=row_state(r[5], r[7]), job_id=r[6], slices_done=int(r[8] or 0), slices_total=r[9],
                instances=r[10], finished_at=r[11], started_at=r[12], error=r[13], verdict=r[14], reason=r[15],
                message=r[16], labels=labels, latest_version=int(r[21] or r[2]), series_instance_uid=r[22],
                priority=priority_name(r[23]), newest_version=int(r[24] or r[2])))
        return WorklistPage(out, total)

    @staticmethod
    def _order(order: str) -> list[ColumnElement[Any]]:
        """The ORDER BY of :meth:`page`: newest first (``ix_studies_created_at``), the id breaking ties (two versions
        received in the same instant); ``priority``: by priority first (``ix_studies_priority_created_at``, read
        backwards). The column is NOT NULL (revision 0010 gave the rows before it routine's 1): no ``coalesce``,
        which no index serves, so a page reads its rows off the index instead of sorting the table."""
        newest: list[ColumnElement[Any]] = [Study.created_at.desc(), Study.id.desc()]
        return newest if order == "newest" else [Study.priority.desc(), *newest]

    async def instances(self, study_id: int, limit: int | None = None) -> list[tuple[str, str, str | None]]:
        """``(filename, blob key, SOP Instance UID or None)`` of the instances of a study version, as stored
        (the first ``limit`` of them)."""
        async with self.store.read() as s:
            rows = await s.execute(select(Instance.filename, Instance.blob_key, Instance.sop_instance_uid)
                                   .where(Instance.study_id == study_id).order_by(Instance.id).limit(limit))
            return [(r[0], r[1], r[2]) for r in rows]

    async def study_of_job(self, job_id: str) -> int | None:
        """The study version a job screens."""
        async with self.store.read() as s:
            return (await s.execute(select(Job.study_id).where(Job.id == job_id))).scalar()

    async def put_labels(self, study_id: int, labels: dict[str, str | None]) -> None:
        """Record the labels of a study version (a second writer's row is kept: the labels are the same)."""
        values = {"study_id": study_id, "read_at": await self.store.now(), **{k: labels.get(k) for k in
                                                                   ("study_date", "accession_number",
                                                                    "series_description")}}
        insert = pg_insert if self.store.dialect == "postgresql" else sqlite_insert
        async with self.store.tx() as s:
            await s.execute(insert(StudyLabels).values(**values).on_conflict_do_nothing())

    async def newest_study(self) -> int:
        """The id of the newest study version (0 when none): a new one (a STOW study received, a late instance
        opening version 2) makes no job event until it is screened."""
        async with self.store.read() as s:
            return int((await s.execute(select(func.max(Study.id)))).scalar() or 0)

    async def last_event(self) -> int:
        """The id of the newest job event (0 when none)."""
        async with self.store.read() as s:
            return int((await s.execute(select(func.max(Event.id)))).scalar() or 0)

    async def events_after(self, after: int, limit: int = 500) -> list[dict[str, Any]]:
        """Job events after ``after`` (oldest first): id, job, the Study Instance UID it screens (a page past the
        first learns from it that a version of one of its studies changed: that study's marks may change), state,
        slices done and total."""
        async with self.store.read() as s:
            rows = await s.execute(select(Event.id, Event.job_id, Job.study_instance_uid, Event.state, Event.slices_done,
                                          Event.slices_total)
                                   .join(Job, Job.id == Event.job_id).where(Event.id > after).order_by(Event.id)
                                   .limit(limit))
            return [{"id": r[0], "job_id": r[1], "study_instance_uid": r[2], "state": row_state("complete", r[3]),
                     "slices_done": r[4], "slices_total": r[5]} for r in rows]

    async def event_ids(self, low: int, high: int) -> set[int]:
        """Ids of the job events in ``(low, high]`` committed now."""
        async with self.store.read() as s:
            return set((await s.execute(select(Event.id).where(Event.id > low, Event.id <= high))).scalars())

    async def service(self, window_s: float = 3600.0, sample: int = 500, failures: int = 10) -> dict[str, Any]:
        """Throughput and latency over the last ``window_s`` seconds, and the latest failures.

        Returns ``studies_per_hour`` (done in the window, scaled to an hour), ``p50_s``/``p95_s`` of the
        study time (accepted to done) over the last ``sample`` done jobs, and ``failures`` (newest first).
        """
        now = await self.store.now()
        async with self.store.read() as s:
            done_recent = int((await s.execute(select(func.count(Job.id)).where(
                Job.state == JobState.done.value, Job.finished_at >= now - window_s))).scalar() or 0)
            times = [float(t) for (t,) in await s.execute(
                select(Job.finished_at - Job.created_at).where(Job.state == JobState.done.value,
                                                               Job.finished_at.is_not(None))
                .order_by(Job.finished_at.desc()).limit(sample)) if t is not None]
            failed = (await s.execute(select(Job.id, Job.finished_at, Job.error).where(
                Job.state == JobState.failed.value, Job.finished_at.is_not(None))
                .order_by(Job.finished_at.desc()).limit(failures))).all()
        return {
            "studies_per_hour": done_recent * 3600.0 / window_s,
            "p50_s": _quantile(times, 0.50), "p95_s": _quantile(times, 0.95), "sampled": len(times),
            "failures": [{"job_id": r[0], "finished_at": r[1], "reason": (r[2] or {}).get("reason", "unknown"),
                          "message": (r[2] or {}).get("message", "")} for r in failed],
        }


def _quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``; None when empty.

    >>> _quantile([4.0, 1.0, 3.0, 2.0], 0.5), _quantile([1.0] * 19 + [9.0], 0.95), _quantile([], 0.5)
    (2.0, 1.0, None)
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 1))  # ceil(n q), at least 1
    return ordered[int(rank) - 1]



REORDER_WINDOW = 256
"""How far behind the newest event id an event may still become visible on PostgreSQL: ids are handed out
at insert, and concurrent transactions commit in another order (a job's finish after a later job's
progress). :class:`EventCursor` reads this far back."""


class EventCursor:
    """The worklist's job events, each once, as their commits make them visible (the worklist's live stream).

    Reading ``id > last`` alone skipped an event whose transaction took its id before another's and
    committed after it (PostgreSQL): the page missed that job's change until reloaded. On PostgreSQL the
    cursor reads :data:`REORDER_WINDOW` ids back and skips those it has given; SQLite commits one writer at
    a time, in id order. Open it with :meth:`at_newest`.
    """

    def __init__(self, worklist: Worklist, last: int, given: set[int]) -> None:
        self.worklist, self.last, self._given = worklist, last, given
        self._back = REORDER_WINDOW if worklist.store.dialect == "postgresql" else 0

    @classmethod
    async def at_newest(cls, worklist: Worklist) -> EventCursor:
        """A cursor past every event visible now (those in the window are taken as given)."""
        last = await worklist.last_event()
        back = REORDER_WINDOW if worklist.store.dialect == "postgresql" else 0
        return cls(worklist, last, await worklist.event_ids(last - back, last) if back else set())

    async def next(self, limit: int = 500) -> list[dict[str, Any]]:
        """The events made visible since the last call, oldest id first (at most ``limit`` new ones)."""
        low = self.last - self._back
        rows = await self.worklist.events_after(low, limit + len(self._given))
        fresh = [e for e in rows if e["id"] not in self._given][:limit]
        for e in fresh:
            self._given.add(e["id"])
            self.last = max(self.last, e["id"])
        self._given = {i for i in self._given if i > self.last - self._back}
        return fresh
