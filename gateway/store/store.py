"""The state store: every fact about studies, instances, jobs and results, on SQLite or PostgreSQL.

One :class:`Store` per process, on SQLAlchemy's async engine (``aiosqlite`` / ``asyncpg``). Each
method is one transaction; the decisions that must happen once in a cluster are atomic there:

* **claim** (:meth:`Store.claim`): ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so replicas
  never wait for each other nor take the same job; on SQLite (one process) write transactions are
  serialised by a process lock, which makes the same select-then-update atomic;
* **study completion** (:meth:`Store.complete_due`): the ``receiving -> complete`` transition of a study
  version and the creation of its job are one transaction over rows locked the same way, and
  ``jobs.study_id`` is unique: a version is screened once however many sweepers run;
* **results** are written only by the holder of the job's lease (:meth:`Store.finish`), so a replica
  that lost its lease cannot write a second result.

Every transaction that records a job event (new job, claim, progress, done, failed, queued again)
wakes the waiters of this process at once (:attr:`Store.changed`: event streams, those following that job
when there is one); one that may give a worker or a deliverer work (not a running job's progress)
wakes those too (:attr:`Store.work`). On PostgreSQL it also sends ``NOTIFY ctscreen`` (payload ``progress``
or ``work``, and the job when there is one, :func:`notice`) with its commit, and
:meth:`Store.listen` turns that into the same wake-up on every other replica (workers claim at once, SSE
streams move at once). Waiters also poll, so a lost notification only costs a poll interval.

SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple, overload

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    CursorResult,
    Float,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    delete,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import Result as SqlResult
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.selectable import ScalarSelect, TypedReturnsRows

from aggregator.schema import CaseResult, stored_result
from gateway.errors import JobNotFound, PatientMismatch, Superseded
from gateway.jobs import ROUTINE, RUNNING, TERMINAL, JobError, JobState, JobView, priority_name
from gateway.phi import withheld
from gateway.store.models import (
    FILENAME_LENGTH,
    Event,
    ExpiredInstance,
    Instance,
    Job,
    Replica,
    Result,
    Study,
)

logger = logging.getLogger(__name__)
# aiosqlite logs every operation with its parameters at DEBUG, and rows hold what an SR needs (patient
# name, ID, birth date): never let a DEBUG root logger print them (the PHI scan of issue 14)
logging.getLogger("aiosqlite").setLevel(logging.INFO)

RECEIVING, COMPLETE = "receiving", "complete"
CHANNEL = "ctscreen"
"""The PostgreSQL notification channel of job events."""
PROGRESS, WORK = "progress", "work"
"""The payloads of a NOTIFY: only running jobs' progress, or a change that may be work (:attr:`Store.work`)."""
CLOCK_REFRESH_S = 60.0
"""How often a replica reads the database server's clock (PostgreSQL)."""
CLOCK_MAX_ROUND_TRIP_S = 0.5
"""A reading of the server's clock that took longer than this is not trusted (its error is up to half)."""
MAX_TAKEOVERS = 3
"""Times in a row a job's holder may be lost with it (its lease lapsed) before the job is failed."""
TAKEOVER_BACKOFF_S = 30.0
"""Wait before the second take-over in a row, doubling after (the first is at once: a node was lost)."""
CLOCK_WARN_S = 2.0
"""A machine clock further off the server's than this is logged (the store is right either way)."""
_Ts = TypeVarTuple("_Ts")
_T = TypeVar("_T")
_RUNNING = [s.value for s in RUNNING]
_TERMINAL = [s.value for s in TERMINAL]

REPLICA_ALIVE_S = 30.0
"""A replica whose sweeper has not run for this long is taken for gone, and its waiting jobs are adopted
(:meth:`Store.adopt`): the default; the gateway passes :attr:`gateway.settings.Settings.replica_alive_s`."""
REPLICA_FORGOTTEN_S = 86_400.0
"""The row of a replica not seen for this long is removed (pods come and go under new names)."""


def _waiting(now: float | BindParameter[float]) -> ColumnElement[bool]:
    """The open jobs no lease holds: queued, or their holder's lease lapsed (any replica may take them)."""
    return or_(Job.state == JobState.queued.value, and_(Job.state.in_(_RUNNING), Job.lease_expires_at < now))


# The sweeper's statements, built once with their times as parameters (``now``, ``quiet_before``): built at each
# pass, twice a second on every replica, their expressions cost about a quarter of the pass's CPU
_NOW: BindParameter[float] = bindparam("now", type_=Float())
STRICT_PRIORITY_S = 10 * 365 * 86400.0
"""The claim's ageing that never lifts a job above a higher rank: longer than any job waits (its deadline)."""
_DUE = (select(Study.id).where(Study.state == RECEIVING, Study.last_rx_at <= bindparam("quiet_before", type_=Float()))
        .order_by(Study.last_rx_at).limit(100).with_for_update(skip_locked=True))
_OVERDUE = select(Job.id, Job.error).where(_waiting(_NOW), Job.deadline_at < _NOW)
# the worker's claim (every poll of an idle slot, twice a second): the next job due (queued) or abandoned (lease
# expired), the first by its due time less ``ageing`` seconds a rank (the highest priority first, the oldest first
# within one, and none passed over for longer than that a rank); _PICK_EXCLUDING leaves out ``exclude`` (an
# expanding parameter, as ``not_in`` of a list makes one). Built at each claim, its expressions and cache key cost
# about a quarter of an idle claim's CPU
_RANK = func.coalesce(Job.priority, ROUTINE)
_PICK = select(Job.id).where(or_(
    and_(Job.state == JobState.queued.value, Job.next_attempt_at <= _NOW),
    and_(Job.state.in_(_RUNNING), Job.lease_expires_at < _NOW),
)).order_by(Job.next_attempt_at - _RANK * bindparam("ageing", type_=Float()), _RANK.desc(),
            Job.next_attempt_at).limit(1).with_for_update(skip_locked=True)
_PICK_EXCLUDING = _PICK.where(Job.id.not_in(bindparam("exclude", expanding=True)))
# the same for a worker whose slots are all taken but one kept for urgent studies: those of ``min_priority`` and above
_AT_LEAST = Job.priority >= bindparam("min_priority", type_=Integer())
_PICKS = {(False, False): _PICK, (True, False): _PICK_EXCLUDING,
          (False, True): _PICK.where(_AT_LEAST), (True, True): _PICK_EXCLUDING.where(_AT_LEAST)}
# an event stream's step (at every progress write of its job, twice a second while it runs): built at each step,
# its expressions and cache key cost about a fifth of the step's query
_EVENTS_AFTER = (select(Event.id, Event.state).where(Event.job_id == bindparam("job_id", type_=String()),
                                                     Event.id > bindparam("after", type_=Integer()))
                 .order_by(Event.id))
# gone: a replica whose row says it was last seen too long ago. One without a row is left alone (a release
# before revision 0008 records none), and so the UPDATE is race-free: a job another replica adopted a moment
# ago names a replica seen now. No session object is synchronised (the ORM's "auto" strategy evaluated the
# criteria against the session's objects before each pass, a third of the pass's CPU): a pass's session
# holds no job it could change (the jobs it queued name this replica already), and its objects are not read
# after it for ``accepted_by``
_ADOPT = update(Job).where(
    _waiting(_NOW), or_(Job.accepted_by.is_(None), Job.accepted_by.in_(
        select(Replica.owner).where(Replica.seen_at < bindparam("gone_before", type_=Float()))))
).values(accepted_by=bindparam("adopter")).execution_options(synchronize_session=False)


def _refuse_patient(uid: str, what: str, version: int) -> None:
    """Raise :class:`~gateway.errors.PatientMismatch`: ``what`` names another patient than the study's ``version``
    (every version of a study that names one names the same: each was checked against those before it)."""
    logger.warning("study %s: %s naming another patient than its version %d refused", uid, what, version)
    raise PatientMismatch(f"Study {uid} names another patient: its earlier instances name another Patient ID "
                          "(or Issuer of Patient ID) than these; a study names one patient. Nothing was kept.")


def async_url(url: str) -> str:
    """``url`` with the async driver the store uses (``postgresql://`` -> ``postgresql+asyncpg://``).

    >>> async_url("postgresql://u@db/ctscreen")
    'postgresql+asyncpg://u@db/ctscreen'
    >>> async_url("sqlite:////var/lib/ctscreen/ctscreen.db")
    'sqlite+aiosqlite:////var/lib/ctscreen/ctscreen.db'

    Raises
    ------
    ValueError
        When the URL is neither PostgreSQL nor SQLite.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"Database URL {redact(url)!r} must look like postgresql://user@host/db or sqlite:///path.")
    base = scheme.split("+", 1)[0].lower()
    if base in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    if base == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    raise ValueError(f"Database URL scheme {scheme!r} is not supported; use postgresql:// or sqlite:///.")


class KeyTaken(Exception):
    """An upload's idempotency key is held by the job of an earlier upload: ``view`` (:meth:`Store.accept_upload`)."""

    def __init__(self, view: JobView) -> None:
        super().__init__(view.job_id)
        self.view = view


class StoreUnreachable(ConnectionError):
    """The database could not be reached: its connection was refused, reset or timed out (a fail-over, a
    restart; the driver raises these as OSError, not as a DBAPIError), or no pooled connection came free
    in time (SQLAlchemy's pool timeout)."""


_TRANSIENT_SQLSTATES = ("08", "53", "57P01", "57P02", "57P03", "25006", "55P03", "40001", "40P01")
"""PostgreSQL errors that say "not now", not "wrong": a connection exception, insufficient resources (disk
full, out of memory, too many connections), the server shutting down or starting, a read-only transaction
(a fail-over left this replica on the old primary, now a standby), a lock not available, a serialization
failure or a deadlock."""
_TRANSIENT_SQLITE = {5, 6, 8, 10, 13, 14}
"""SQLite's BUSY, LOCKED, READONLY, IOERR, FULL and CANTOPEN."""


def transient(exc: DBAPIError) -> bool:
    """Whether a database error is the store unavailable for now (retry later), not a fault of the statement.

    >>> from sqlalchemy.exc import OperationalError
    >>> class Orig(Exception):
    ...     sqlstate = "25006"
    >>> transient(OperationalError("UPDATE jobs", {}, Orig())), transient(OperationalError("x", {}, Exception()))
    (True, False)
    """
    if exc.connection_invalidated:
        return True
    code = getattr(exc.orig, "sqlstate", None)
    if isinstance(code, str):
        return code.startswith(_TRANSIENT_SQLSTATES)
    return getattr(exc.orig, "sqlite_errorcode", None) in _TRANSIENT_SQLITE


def error_code(exc: DBAPIError) -> str:
    """The error's class name and code (never its message, which may quote values)."""
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "sqlite_errorcode", None)
    cause = exc.orig.__cause__ or exc.orig if exc.orig is not None else exc  # asyncpg's own, under the adapter's
    name = type(cause).__name__
    return f"{name} {code}" if code is not None else name


def unreachable(exc: BaseException, doing: str = "answer now") -> StoreUnreachable | None:
    """``exc`` as the store unreachable or unavailable for now (refused, reset, timed out, not resolved, no pooled
    connection free, a transient database error: :func:`transient`), or None when it is another failure."""
    if isinstance(exc, (OSError, TimeoutError, PoolTimeout)):  # from the driver, or the pool past its timeout
        return StoreUnreachable(f"The state store cannot be reached ({type(exc).__name__}).")
    if isinstance(exc, DBAPIError) and transient(exc):  # a read-only standby, a shut-down, a full disk
        return StoreUnreachable(f"The state store cannot {doing} ({error_code(exc)}).")
    return None


StoreError = (DBAPIError, StoreUnreachable)
"""What the state store raises when the database fails a statement (a fail-over, a lock, a full disk) or
cannot be reached (``except StoreError``)."""


class StoreOutage:
    """The log of a loop that calls the state store every second or so: while the store cannot answer (a
    fail-over, a read-only standby, a restart) one line when it goes, one a minute while it stays away and
    one when it answers again, instead of a traceback every pass; any other failure is logged each time,
    with its traceback (a bug)."""

    every_s = 60.0

    def __init__(self, what: str) -> None:
        self.what = what
        self._since: float | None = None
        self._logged = 0.0
        self._tries = 0

    def failed(self, exc: BaseException) -> None:
        if not isinstance(exc, StoreUnreachable):
            logger.error("%s failed; trying again", self.what, exc_info=withheld(exc))
            return
        now, self._tries = time.monotonic(), self._tries + 1
        if self._since is None:
            self._since = self._logged = now
            logger.warning("%s: %s Trying again.", self.what, exc)
        elif now - self._logged >= self.every_s:
            self._logged = now
            logger.warning("%s: the state store still cannot answer after %.0f s (%d tries): %s", self.what,
                           now - self._since, self._tries, exc)

    def ok(self) -> None:
        if self._since is not None:
            logger.warning("%s: the state store answers again after %.0f s", self.what, time.monotonic() - self._since)
            self._since, self._tries = None, 0

    async def ride(self, read: Awaitable[_T], instead: _T) -> _T:
        """``await read``, or ``instead`` while the state store cannot answer (logged as :meth:`failed` says): what a
        loop that must outlive an outage (an event stream) reads."""
        try:
            value = await read
        except StoreUnreachable as exc:
            self.failed(exc)
            return instead
        self.ok()
        return value


SECRET_QUERY_KEYS = ("password", "passwd", "sslpassword", "secret", "token", "key")
"""Query parameters of a database URL whose values :func:`redact` hides (libpq takes ``?password=``)."""


def redact(url: str) -> str:
    """``url`` without its secrets (for logs and start-up lines): the password of the user part and of the
    query (``?password=``, ``?sslpassword=``).

    >>> redact("postgresql://ctscreen:s3cret@db:5432/ctscreen?password=x&sslmode=require")
    'postgresql://ctscreen:***@db:5432/ctscreen?password=***&sslmode=require'
    >>> redact("sqlite:////var/lib/ctscreen/state.db")
    'sqlite:////var/lib/ctscreen/state.db'
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy reads: show its scheme only
        scheme, sep, _ = url.partition("://")
        return f"{scheme}://***" if sep else "***"
    from urllib.parse import urlencode

    hidden = {k: ("***" if any(s in k.lower() for s in SECRET_QUERY_KEYS) else v) for k, v in parsed.query.items()}
    base = parsed.set(query={}).render_as_string(hide_password=True)
    return f"{base}?{urlencode(hidden, doseq=True, safe='*')}" if hidden else base


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""C0 and C1 control characters and DEL: never stored as text (PostgreSQL's text refuses a NUL, SQLite takes it)."""


def latest_version() -> ScalarSelect[Any]:
    """The newest version of the study a query's ``Study`` row is a version of whose job has not failed (a
    correlated subquery; None when every version's has): above the row's own version, its reading is
    superseded. A version being received, queued or screened counts (its reading is to replace this one); a
    failed one replaces nothing (no reading, and no destination is sent one), until it is retried."""
    newer, job = aliased(Study), aliased(Job)
    return (select(func.max(newer.version)).outerjoin(job, job.study_id == newer.id)
            .where(newer.study_instance_uid == Study.study_instance_uid,
                   or_(job.state.is_(None), job.state != JobState.failed.value))
            .scalar_subquery())


def newest_version() -> ScalarSelect[Any]:
    """The newest version of the study a query's ``Study`` row is a version of, whatever its state (being received,
    queued, screened, done or failed; a correlated subquery): above the row's own version, the row's job is not
    retried (:meth:`Store.retry`), the newer version is the one to screen."""
    newer = aliased(Study)
    return (select(func.max(newer.version)).where(newer.study_instance_uid == Study.study_instance_uid)
            .scalar_subquery())


def fit_filename(name: str, limit: int = FILENAME_LENGTH) -> str:
    r"""``name`` cut to ``limit`` characters: its head and its tail (a zip member's own name), with ``...``
    between, so an upload's long ``Content-Disposition`` or zip path is kept, not refused by the database;
    control characters become ``?`` (PostgreSQL's text refuses a NUL: a part named ``a\x00b.dcm`` was answered
    503 there, and accepted by SQLite).

    >>> fit_filename("a" * 10 + "/slice1.dcm", 16), fit_filename("a\x00b\n.dcm")
    ('a...a/slice1.dcm', 'a?b?.dcm')
    """
    name = CONTROL_CHARACTERS.sub("?", name)
    if len(name) <= limit:
        return name
    tail = limit * 3 // 4
    return f"{name[: limit - tail - 3]}...{name[-tail:]}"


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job this replica now holds under a lease."""

    id: str
    study_id: int
    study_instance_uid: str
    origin: str
    attempts: int
    created_at: float
    deadline_at: float
    priority: int = ROUTINE
    """Its rank (:data:`gateway.jobs.PRIORITIES`)."""


@dataclass(frozen=True, slots=True)
class Swept:
    """What one pass of the sweeper's checks found (:meth:`Store.sweep`)."""

    completed: list[str]
    """The jobs queued for the study versions that went quiet."""
    overdue: list[tuple[str, Any]]
    """``(job id, its last error)`` of the jobs past their deadline, still to be failed (:meth:`Store.fail_overdue`)."""
    adopted: int
    """Queued jobs no replica counted, counted as this one's from now on (:meth:`Store.adopt`)."""
    counts: tuple[int, int, int]
    """This replica's ``(queued, running, backlog slices)`` (:meth:`Store.counts`)."""


@dataclass(frozen=True, slots=True)
class StudyState:
    """The latest version of a study."""

    study_instance_uid: str
    state: str  # receiving, or complete
    instances: int
    job: JobView | None
    reading: JobView | None = None
    """While ``job`` has no result (a later version queued, screening or failed): the done job of the newest
    version that has one, the study's reading (the one its destinations were sent) until a later one is done."""


class Store:
    """The state store of one process.

    Parameters
    ----------
    url : str
        ``postgresql://...`` or ``sqlite:///path`` (async drivers are chosen here).
    owner : str | None
        This replica's lease owner name (default: host, pid and a random suffix).
    clock : Callable[[], float]
        This machine's wall clock: every time the store writes or compares is :meth:`now`, which on
        PostgreSQL is the database server's clock instead.
    """

    def __init__(self, url: str, owner: str | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.url = async_url(url)
        self._clock = clock  # this machine's wall clock (a test gives a replica a skewed one)
        self._server: tuple[float, float] | None = None  # PostgreSQL: (server clock, our monotonic clock then)
        self._read_after = 0.0  # monotonic: when the server's clock is read next
        self._reading_clock = asyncio.Lock()
        self._clock_off = 0.0  # this machine's clock minus the server's, as last logged about
        self.dialect = "sqlite" if self.url.startswith("sqlite") else "postgresql"
        if self.dialect == "sqlite":
            private_sqlite_file(self.url)
            # writes begin IMMEDIATE (the database's write lock at once, so a read-then-write transaction
            # never meets another writer half-way, even in another process); reads begin deferred
            self.engine: AsyncEngine = create_async_engine(self.url, connect_args={"timeout": 30})
            reader = create_async_engine(self.url, connect_args={"timeout": 30})
            for engine, begin in ((self.engine, "BEGIN IMMEDIATE"), (reader, "BEGIN")):
                event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
                event.listen(engine.sync_engine, "invalidate", _sqlite_rollback_before_close)
                event.listen(engine.sync_engine, "begin", lambda conn, sql=begin: conn.exec_driver_sql(sql))
        else:
            self.engine = create_async_engine(self.url, pool_size=5, max_overflow=10, pool_pre_ping=True)
            reader = self.engine
        self._engines = {self.engine, reader}
        for engine in self._engines:
            _quiet_cancelled_resets(engine)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, sync_session_class=(
            _NotifyingSession if self.dialect == "postgresql" else Session))
        self._readers = async_sessionmaker(reader, expire_on_commit=False)
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None
        import os
        import socket

        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._seen_at: float | None = None  # when this replica last recorded itself alive (Store.seen)
        self._mine: Select[str, int, int] | None = None  # the sweeper's counts statement (_counts)
        self.lost_failed = 0
        """Jobs this process's claims failed because their holder was lost with them once too often
        (``worker_lost``): the worker counts them in the metrics (:meth:`take_lost_failed`)."""
        self.changed = Changes()
        """Every job event, progress too (what event streams wait for)."""
        self.streams = StoreOutage("event streams")
        """The log of the event streams' reads (:meth:`StoreOutage.ride`): they wait out an outage, one line for all."""
        self.work = Changes()
        """Events that may give a worker or a deliverer something to do: a job queued (new, released, retried),
        done or failed; not the progress of running jobs, which on PostgreSQL would otherwise wake every
        replica's claim and delivery passes a few times a second per running job."""
        self._listener: asyncio.Task[None] | None = None

    def wake(self, job_id: str | None = None) -> None:
        """Wake this process's waiters after a change that may be work (:attr:`changed` and :attr:`work`): of
        the job ``job_id`` (its event streams, :meth:`Changes.watching`), or of jobs unknown (every stream)."""
        self.changed.notify(job_id)
        self.work.notify()

    def heard(self, payload: str) -> None:
        """Another replica's NOTIFY (:func:`notice`): progress wakes the event streams only, those of its job
        when it names one."""
        kind, _, job_id = payload.partition(" ")
        if kind == PROGRESS:
            self.changed.notify(job_id or None)
        else:
            self.wake(job_id or None)

    async def close(self) -> None:
        """Stop listening and close the connections."""
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        for engine in self._engines:
            await engine.dispose()

    def listen(self) -> None:
        """On PostgreSQL, wake this process's waiters on every other replica's job events (LISTEN)."""
        if self.dialect == "postgresql" and self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen(), name="ctscreen-listen")

    async def _listen(self) -> None:
        import asyncpg

        dsn = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(dsn)
                await connection.add_listener(CHANNEL, lambda _c, _pid, _ch, payload: self.heard(payload))
                self.wake()  # anything missed while not listening
                while not connection.is_closed():
                    await asyncio.sleep(5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database may be away; polling covers the gap
                logger.warning("LISTEN %s failed (%s); retrying in 5 s", CHANNEL, type(exc).__name__)
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(5):
                            await connection.close()
            await asyncio.sleep(5)

    # --- time -----------------------------------------------------------------------------------
    async def now(self) -> float:
        """The time every replica agrees on (epoch seconds): on PostgreSQL the database server's clock,
        read at most every :data:`CLOCK_REFRESH_S` and carried forward on this process's monotonic clock.

        Leases, deadlines, back-offs and the quiet period are times one replica writes and another
        compares; with each replica's own clock, a replica running ahead by more than a lease took over
        live jobs, and one running behind held a dead replica's jobs for longer. The monotonic clock also
        rides over a step of this machine's clock (NTP). SQLite is one machine's file: its clock is
        everyone's.
        """
        if self.dialect != "postgresql":
            return self._clock()
        if self._server is None or time.monotonic() >= self._read_after:
            if self._server is None:
                async with self._reading_clock:
                    if self._server is None:  # the first caller reads it; the others wait for that reading
                        await self._read_server_clock(first=True)
            elif not self._reading_clock.locked():  # stale: one caller reads it again, the others go on
                async with self._reading_clock:
                    await self._read_server_clock(first=False)
        assert self._server is not None
        server, at = self._server
        return server + (time.monotonic() - at)

    async def _read_server_clock(self, *, first: bool) -> None:
        """Read the server's clock; a reading that failed or took too long keeps the previous one, carried on
        the monotonic clock, until the next try a refresh period later (the first reading is taken as it
        comes, or raises)."""
        self._read_after = time.monotonic() + CLOCK_REFRESH_S
        try:
            async with self.read() as s:
                await s.connection()  # check-out, pre-ping and connect are not part of the reading
                for _ in range(3):
                    sent = time.monotonic()
                    server = float((await s.execute(text("SELECT extract(epoch FROM clock_timestamp())")))
                                   .scalar_one())
                    back = time.monotonic()
                    if back - sent <= CLOCK_MAX_ROUND_TRIP_S:
                        break
        except Exception as exc:
            if first:
                raise
            logger.warning("reading the database server's clock failed (%s); going on from the last reading",
                           type(exc).__name__)
            return
        if back - sent > CLOCK_MAX_ROUND_TRIP_S and not first:
            logger.info("the database server's clock answered in %.1f s; going on from the last reading", back - sent)
            return
        at = (sent + back) / 2
        off = self._clock() - (time.monotonic() - at) - server  # this machine's clock minus the server's
        if abs(off) > CLOCK_WARN_S and abs(off - self._clock_off) > CLOCK_WARN_S / 2:
            logger.warning("this machine's clock is %+.1f s off the database server's; the store goes by the "
                           "server's (check NTP on this node)", off)
        self._clock_off = off
        self._server = (server, at)

    async def ping(self) -> None:
        """One trivial query (the readiness probe): raises when the database does not answer, and
        :class:`StoreUnreachable` when it cannot take writes (PostgreSQL: a read-only transaction, as on a
        standby a fail-over left this replica on, or under ``default_transaction_read_only``)."""
        async with self.read() as s:
            if self.dialect != "postgresql":
                await s.execute(text("SELECT 1"))
                return
            if (await s.execute(text("SELECT current_setting('transaction_read_only')"))).scalar() == "on":
                raise StoreUnreachable("The state store takes no writes (a read-only transaction: a standby, or "
                                       "default_transaction_read_only).")

    # --- sessions -------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[AsyncSession]:
        """One write transaction (committed on exit)."""
        lock = self._write_lock or contextlib.nullcontext()
        try:
            async with lock, self._sessions() as session, session.begin():
                yield session
        except (OSError, TimeoutError, PoolTimeout, DBAPIError) as exc:  # the body is the store's own code
            if (gone := unreachable(exc, "take this now")) is not None:
                raise gone from exc
            raise

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """One read-only session."""
        try:
            async with self._readers() as session:
                yield session
        except (OSError, TimeoutError, PoolTimeout, DBAPIError) as exc:
            if (gone := unreachable(exc)) is not None:
                raise gone from exc
            raise

    # --- instances and studies -------------------------------------------------------------------
    async def add_instance(self, study_instance_uid: str, sop_instance_uid: str, filename: str, blob_key: str,
                           nbytes: int, *, changed: bool = False, same_as: str | None = None,
                           priority: int = ROUTINE, patient_key: str | None = None) -> str | None:
        """Record a STOW-RS / C-STORE instance in the study's receiving version (opened if needed).

        An instance already in that version (same SOP Instance UID) is replaced. One already in the
        study's latest screened (or screening) version is not recorded again: the same size, unless the caller
        found it ``changed`` (its data set is not the screened copy's: :meth:`screened_copy`), or another size
        when the caller found it the same as the copy whose blob is ``same_as`` (another transfer syntax); one whose
        instance retention removed from a done version is not recorded again whatever its copy (its SOP Instance UID
        is kept, its bytes are not: :meth:`expire`).
        The version's ``priority`` (:data:`gateway.jobs.PRIORITIES`) is the highest of its instances'.
        ``patient_key`` (:func:`gateway.phi.patient_key`): the patient the instance names; one that is not the
        patient the study's earlier instances and versions name raises :class:`~gateway.errors.PatientMismatch`
        and records nothing (None: not compared, as a version an earlier release wrote).
        Returns the blob key nothing needs now (the replaced instance's, or ``blob_key`` itself when the
        instance was not recorded): the caller deletes it. Else None.
        """
        for attempt in range(5):
            try:
                return await self._add_instance(study_instance_uid, sop_instance_uid, filename, blob_key, nbytes,
                                                changed, same_as, priority, patient_key)
            except IntegrityError:  # another replica opened the same version at the same moment
                if attempt == 4:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        return None

    async def screened_copy(self, study_instance_uid: str, sop_instance_uid: str) -> str | None:
        """The blob key of this instance (same SOP Instance UID) in the study's latest version, when that
        version is screened or being screened and none is receiving: the caller compares the data sets, and a
        changed one opens the next version (:meth:`add_instance` with ``changed``, or without ``same_as``)."""
        async with self.read() as s:
            receiving = (await s.execute(select(Study.id).where(
                Study.study_instance_uid == study_instance_uid, Study.state == RECEIVING).limit(1))).first()
            if receiving is not None:
                return None
            latest = await self._latest_screened(s, study_instance_uid)
            if latest is None:
                return None
            return (await s.execute(select(Instance.blob_key).where(
                Instance.study_id == latest, Instance.sop_instance_uid == sop_instance_uid).limit(1))).scalar()

    @staticmethod
    async def _latest_version(s: AsyncSession, uid: str) -> tuple[int, str | None] | None:
        """``(id, its job's state or None)`` of the study's latest version, or None for a study never received."""
        row = (await s.execute(
            select(Study.id, Job.state).outerjoin(Job, Job.study_id == Study.id)
            .where(Study.study_instance_uid == uid).order_by(Study.version.desc()).limit(1)
        )).first()
        return None if row is None else (int(row[0]), row[1])

    async def _latest_screened(self, s: AsyncSession, uid: str) -> int | None:
        """The study's latest version, when it is screened or being screened (its job not failed)."""
        latest = await self._latest_version(s, uid)
        if latest is None or latest[1] is None or latest[1] == JobState.failed.value:
            return None
        return latest[0]

    async def _add_instance(self, uid: str, sop: str, filename: str, key: str, nbytes: int,
                            changed: bool = False, same_as: str | None = None, priority: int = ROUTINE,
                            patient_key: str | None = None) -> str | None:
        now = await self.now()
        async with self.tx() as s:
            study = (await s.execute(
                select(Study).where(Study.study_instance_uid == uid, Study.state == RECEIVING).with_for_update()
            )).scalar_one_or_none()
            if study is None or study.patient_key is None:
                await self._check_patient(s, uid, patient_key, "an instance")
            elif patient_key is not None and study.patient_key != patient_key:  # checked when it was set: no query
                _refuse_patient(uid, "an instance", study.version)
            if study is None:
                if not changed and await self._screened_already(s, uid, sop, nbytes, same_as):
                    return key  # nothing recorded: the caller deletes the blob just written
                study = await self._open_version(s, uid, now)
                study.priority = priority
            else:
                study.priority = max(study.priority, priority)
            if study.patient_key is None:
                study.patient_key = patient_key
            old = (await s.execute(
                select(Instance).where(Instance.study_id == study.id, Instance.sop_instance_uid == sop)
            )).scalar_one_or_none()
            replaced = None
            if old is None:
                s.add(Instance(study_id=study.id, sop_instance_uid=sop, filename=fit_filename(filename), blob_key=key,
                               nbytes=nbytes, received_at=now))
            else:
                replaced, old.blob_key, old.nbytes, old.received_at = old.blob_key, key, nbytes, now
                old.filename = fit_filename(filename)
            study.last_rx_at = now
        if replaced is not None and await self._unreferenced(replaced):
            return replaced
        return None

    async def check_patient(self, study_instance_uid: str, patient_key: str | None) -> None:
        """Raise :class:`~gateway.errors.PatientMismatch` when the study's versions name another patient than
        ``patient_key`` now: an upload asks before it stores its files (:meth:`accept_upload` checks again)."""
        async with self.read() as s:
            await self._check_patient(s, study_instance_uid, patient_key, "an upload")

    @staticmethod
    async def _check_patient(s: AsyncSession, uid: str, patient_key: str | None, what: str) -> None:
        """Raise :class:`~gateway.errors.PatientMismatch` when the study's versions name a patient other than
        ``patient_key`` (the latest that names one: each was checked against those before it)."""
        if patient_key is None:
            return
        named = (await s.execute(
            select(Study.patient_key, Study.version).where(Study.study_instance_uid == uid, Study.patient_key.is_not(None))
            .order_by(Study.version.desc()).limit(1))).first()
        if named is not None and named[0] != patient_key:
            _refuse_patient(uid, what, named[1])

    async def _screened_already(self, s: AsyncSession, uid: str, sop: str, nbytes: int,
                                same_as: str | None = None) -> bool:
        """Whether this instance (same SOP Instance UID, and same size or the blob ``same_as``) is in the
        study's latest version, which is screened or being screened: a PACS that sends a study again (a route
        replayed, a retry after a lost acknowledgement, a forward in another transfer syntax) must not have it
        screened twice, nor get a second SR. After a failed job a study sent again is screened again.

        An instance the latest version does not hold any more, whose SOP Instance UID a done version of the study
        was screened with before retention removed it (``expired_instances``), is screened already too, whatever
        its copy (the bytes are gone to compare): sent again a week later (a re-route, a prefetch), it opened a
        version of itself alone, whose reading replaced the study's at its destinations."""
        latest = await self._latest_version(s, uid)
        if latest is None:
            return False
        held = (await s.execute(select(Instance.nbytes, Instance.blob_key).where(
            Instance.study_id == latest[0], Instance.sop_instance_uid == sop))).all()
        if held:
            if latest[1] is None or latest[1] == JobState.failed.value:
                return False
            same = any(n == nbytes or (same_as is not None and k == same_as) for n, k in held)
            if same:
                logger.info("study %s: an instance it was screened with received again; kept once", uid)
            return same
        expired = (await s.execute(select(ExpiredInstance.study_id).join(Job, Job.study_id == ExpiredInstance.study_id)
                                   .join(Study, Study.id == ExpiredInstance.study_id).where(
            Study.study_instance_uid == uid, ExpiredInstance.sop_instance_uid == sop,
            Job.state == JobState.done.value).limit(1))).first()
        if expired is not None:
            logger.info("study %s: an instance it was screened with received again after retention removed it; "
                        "recognised by its SOP Instance UID, not kept", uid)
        return expired is not None

    async def _open_version(self, s: AsyncSession, uid: str, now: float) -> Study:
        # the study's versions locked first, in id order (as expire locks them), before version n + 1 is recorded:
        # a re-screen (rescreen) holds the latest version's lock while it records n + 1 too; recording first and
        # locking after, each waited for the other (PostgreSQL: deadlock detected)
        await s.execute(select(Study.id).where(Study.study_instance_uid == uid).order_by(Study.id).with_for_update())
        latest = (await s.execute(select(func.max(Study.version)).where(Study.study_instance_uid == uid))).scalar()
        study = Study(study_instance_uid=uid, version=(latest or 0) + 1, origin="stow", state=RECEIVING,
                      created_at=now, last_rx_at=now)
        s.add(study)
        await s.flush()
        # locked: retention expiring that version's instances meanwhile (Store.expire locks it too) either
        # ends first, and nothing expired is copied, or waits, and sees the copies as references
        previous = (await s.execute(
            select(Study.id).where(Study.study_instance_uid == uid, Study.origin == "stow", Study.id != study.id)
            .order_by(Study.version.desc()).limit(1).with_for_update()
        )).scalar()
        if previous is not None:  # a late instance: the new version holds every instance of the study still kept
            # (after retention, none of the earlier ones: their blobs are gone)
            await _copy_instances(s, previous, study.id)
            logger.info("study %s: instance after completion, opening version %d", uid, study.version)
        return study

    async def _unreferenced(self, key: str) -> bool:
        return not await self.named_blobs([key])

    async def pending(self) -> tuple[int, int]:
        """``(studies receiving, bytes of their instances)`` across the cluster."""
        async with self.read() as s:
            n = (await s.execute(select(func.count()).where(Study.state == RECEIVING))).scalar() or 0
            nbytes = (await s.execute(
                select(func.coalesce(func.sum(Instance.nbytes), 0)).join(Study, Study.id == Instance.study_id)
                .where(Study.state == RECEIVING))).scalar() or 0
        return int(n), int(nbytes)

    async def mark_interrupted(self, sent: Mapping[str, Collection[str]], note: str | None) -> int:
        """Record (``note``) or clear (None) that a C-STORE transfer into each study's open version ended without
        a release; ``sent``: the SOP Instance UIDs the association stored, by study. The open version is the
        latest, while it is receiving or its job is not finished. A release clears the note only where the
        association sent every instance the version holds (the study sent again, whole): one that added a few
        (a second sender, a retry of one instance) leaves it, else an incomplete study would read as a plain
        result. Returns how many versions changed."""
        n = 0
        async with self.tx() as s:
            for uid in sorted(sent):
                latest = await self._latest_version(s, uid)
                if latest is None or latest[1] in _TERMINAL:
                    continue
                if note is None:  # nearly always nothing to clear: one row read, not the version's instances
                    if (await s.execute(select(Study.interrupted).where(Study.id == latest[0]))).scalar() is None:
                        continue
                    held = set((await s.execute(
                        select(Instance.sop_instance_uid).where(Instance.study_id == latest[0]))).scalars())
                    if not held <= set(sent[uid]):
                        continue
                n += _rowcount(await s.execute(update(Study).where(Study.id == latest[0]).values(
                    interrupted=None if note is None else note[:256])))
        return n

    async def interrupted(self, study_id: int) -> str | None:
        """What :meth:`mark_interrupted` recorded for this study version, or None."""
        async with self.read() as s:
            return (await s.execute(select(Study.interrupted).where(Study.id == study_id))).scalar()

    async def pairing_facts(self, sample: int = 20) -> tuple[bool, list[str]]:
        """``(whether any study or job was ever recorded, the blob keys of up to ``sample`` instances, the newest
        first)``: what :func:`gateway.store.pairing.check_pairing` checks the blob store against."""
        async with self.read() as s:
            used = (await s.execute(select(Study.id).limit(1))).first() is not None or (
                await s.execute(select(Job.id).limit(1))).first() is not None
            keys = list((await s.execute(select(Instance.blob_key).order_by(Instance.id.desc()).limit(sample))).scalars())
        return used, keys

    async def is_receiving(self, study_instance_uid: str) -> bool:
        """Whether the study has a version receiving instances now."""
        async with self.read() as s:
            return (await s.execute(select(Study.id).where(
                Study.study_instance_uid == study_instance_uid, Study.state == RECEIVING))).first() is not None

    async def accept_upload(self, study_instance_uid: str, files: Sequence[tuple[str, str, int]],
                            deadline_s: float, *, slices_total: int | None = None,
                            job_id: str | None = None, priority: int = ROUTINE,
                            patient_key: str | None = None, idempotency_key: str | None = None) -> JobView:
        """Record an uploaded study (``(filename, blob_key, nbytes)`` per file) as a complete version and queue it.

        Raises :class:`~gateway.errors.PatientMismatch`, recording nothing, when the study's earlier versions
        name another patient than ``patient_key`` (:meth:`add_instance`); :class:`KeyTaken`, recording nothing,
        when a job holds ``idempotency_key`` already (an upload sent again while its first was being accepted)."""
        for attempt in range(5):
            try:
                now = await self.now()
                async with self.tx() as s:
                    await self._check_patient(s, study_instance_uid, patient_key, "an upload")
                    latest = (await s.execute(select(func.max(Study.version)).where(
                        Study.study_instance_uid == study_instance_uid))).scalar()
                    study = Study(study_instance_uid=study_instance_uid, version=(latest or 0) + 1, origin="upload",
                                  state=COMPLETE, created_at=now, last_rx_at=now, completed_at=now, priority=priority,
                                  patient_key=patient_key)
                    s.add(study)
                    await s.flush()
                    # one multi-row INSERT, not the unit of work's object per file (200 ms of CPU for 300)
                    if files:
                        await s.execute(insert(Instance), [
                            {"study_id": study.id, "filename": fit_filename(name), "blob_key": key, "nbytes": n,
                             "received_at": now} for name, key, n in files])
                    job = await self._new_job(s, study, len(files), now, deadline_s, job_id,
                                              idempotency_key=idempotency_key)
                    job.slices_total = slices_total
                    view = await self._job_view(s, job.id)  # with its version, as GET gives it
                self.wake(job.id)
                return view
            except IntegrityError:
                if idempotency_key is not None and (first := await self.job_by_key(idempotency_key)) is not None:
                    raise KeyTaken(first) from None
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def job_by_key(self, idempotency_key: str) -> JobView | None:
        """The job of the upload recorded under ``idempotency_key`` (:meth:`accept_upload`), if any is kept."""
        async with self.read() as s:
            job_id = (await s.execute(select(Job.id).where(Job.idempotency_key == idempotency_key))).scalar()
        if job_id is None:
            return None
        try:
            return await self.job(job_id)
        except JobNotFound:  # removed by retention meanwhile
            return None

    async def _new_job(self, s: AsyncSession, study: Study, files: int, now: float, deadline_s: float,
                       job_id: str | None = None, *, idempotency_key: str | None = None) -> Job:
        job = Job(id=job_id or uuid.uuid4().hex, study_id=study.id, study_instance_uid=study.study_instance_uid,
                  origin=study.origin, state=JobState.queued.value, files=files, slices_done=0, attempts=0,
                  accepted_by=self.owner, priority=ROUTINE if study.priority is None else study.priority,
                  next_attempt_at=now, deadline_at=now + deadline_s, created_at=now, updated_at=now,
                  idempotency_key=idempotency_key)
        s.add(job)
        await s.flush()
        s.add(Event(job_id=job.id, state=job.state, slices_done=0, slices_total=None, created_at=now))
        return job

    async def _complete(self, s: AsyncSession, studies: Sequence[Study], now: float, deadline_s: float) -> list[Job]:
        jobs = []
        for study in studies:
            files = (await s.execute(select(func.count()).where(Instance.study_id == study.id))).scalar() or 0
            study.state, study.completed_at = COMPLETE, now
            await s.flush()
            jobs.append(await self._new_job(s, study, int(files), now, deadline_s))
        return jobs

    async def complete_due(self, quiet_period_s: float, deadline_s: float) -> list[str]:
        """Close every receiving version quiet for ``quiet_period_s`` and queue its job (once in a cluster)."""
        now = await self.now()
        async with self.tx() as s:
            jobs = await self._complete_due(s, now, quiet_period_s, deadline_s)
        return self._completed(jobs)

    async def _complete_due(self, s: AsyncSession, now: float, quiet_period_s: float, deadline_s: float) -> list[Job]:
        # the ids first, on the session's connection (no ORM load, nor its execute path, when none is due: nearly
        # every pass); the rows are locked by then, and the ORM loads the few that are
        due = (await _core(s, _DUE, {"quiet_before": now - quiet_period_s})).scalars().all()
        if not due:
            return []
        studies = (await s.execute(select(Study).where(Study.id.in_(due)).order_by(Study.last_rx_at))).scalars().all()
        return await self._complete(s, studies, now, deadline_s)

    def _completed(self, jobs: Sequence[Job]) -> list[str]:
        """Say which studies went quiet (after the commit that queued their jobs) and wake the workers."""
        for job in jobs:
            logger.info("study %s complete: %d instances, job %s", job.study_instance_uid, job.files, job.id)
        if jobs:
            self.wake()
        return [j.id for j in jobs]

    async def sweep(self, quiet_period_s: float, deadline_s: float, alive_s: float = REPLICA_ALIVE_S) -> Swept:
        """The sweeper's checks in one transaction: this replica seen alive (:meth:`seen`),
        :meth:`complete_due`, :meth:`adopt` (``alive_s``), the jobs past their deadline (failed by
        :meth:`fail_overdue` given them, each in its own transaction: rare) and this replica's :meth:`counts`.
        Five transactions a pass cost five sessions (about 1 ms of CPU each on SQLite; on PostgreSQL a
        pre-ping and a round trip each), every ``sweep_interval_s`` on every replica, idle or not."""
        now = await self.now()
        async with self.tx() as s:
            await self._seen(s, now, alive_s)
            jobs = await self._complete_due(s, now, quiet_period_s, deadline_s)
            adopted = await self._adopt(s, now, alive_s)
            overdue = await self._overdue(s, now)
            counts = await self._counts(s, mine=True, now=now)
        return Swept(self._completed(jobs), overdue, adopted, counts)

    async def complete_now(self, study_instance_uid: str, deadline_s: float) -> JobView:
        """Close the study's receiving version now; without one, its latest job.

        Raises
        ------
        JobNotFound
            When no instance of the study was received.
        """
        now = await self.now()
        async with self.tx() as s:
            study = (await s.execute(select(Study).where(
                Study.study_instance_uid == study_instance_uid, Study.state == RECEIVING).with_for_update()
            )).scalar_one_or_none()
            jobs = await self._complete(s, [study], now, deadline_s) if study is not None else []
            view = await self._job_view(s, jobs[0].id) if jobs else None
        if view is not None:
            self.wake()
            return view
        latest = await self.study(study_instance_uid)
        if latest is None or latest.job is None:
            raise JobNotFound(f"No instance of study {study_instance_uid!r} is waiting to be screened.")
        return latest.job

    async def instance_files(self, study_id: int) -> list[tuple[str, str]]:
        """``(filename, blob_key)`` of every file of a study version."""
        async with self.read() as s:
            rows = await s.execute(select(Instance.filename, Instance.blob_key).where(Instance.study_id == study_id)
                                   .order_by(Instance.id))
            return [(r[0], r[1]) for r in rows]

    # --- jobs: claim, lease, finish ---------------------------------------------------------------
    async def claim(self, lease_s: float, exclude: Collection[str] = (), min_priority: int | None = None,
                    ageing_s: float = STRICT_PRIORITY_S) -> Claimed | None:
        """Take the next job that is due (queued) or abandoned (lease expired), under a lease: the highest
        priority first and the oldest first within one, except that a job is passed over only by jobs of a
        higher rank that came due less than ``ageing_s`` a rank after it (a routine study, by urgent ones of
        the following ``ageing_s``; a low one, by routine ones of the following ``ageing_s`` and urgent ones
        of twice that): each waits a bounded time under a flood of more urgent work. The default,
        :data:`STRICT_PRIORITY_S`, passes over for ever. Never one of ``exclude`` (the jobs this process is
        running: a late renewal must not hand it a second task); only one of ``min_priority`` or above, when
        given."""
        now = await self.now()
        pick = _PICKS[bool(exclude), min_priority is not None]
        params: dict[str, Any] = {"now": now, "ageing": ageing_s}
        if exclude:
            params["exclude"] = list(exclude)
        if min_priority is not None:
            params["min_priority"] = min_priority
        lost: list[str] = []
        async with self.tx() as s:
            job = await _picked(s, pick, params)
            while job is not None and job.state != JobState.queued.value:
                self._lost(s, job, now)  # queued again (later) or set aside: never run here at once twice
                lost.append(job.id)
                job = await _picked(s, pick, params)
            if job is not None:
                job.state, job.lease_owner, job.lease_expires_at = JobState.decoding.value, self.owner, now + lease_s
                job.attempts += 1
                job.slices_done, job.updated_at, job.error = 0, now, None
                s.add(Event(job_id=job.id, state=job.state, slices_done=0, slices_total=job.slices_total,
                            created_at=now))
        for lost_id in lost:  # their streams (queued again, or failed): their events are in this transaction too
            self.wake(lost_id)
        if job is None:
            return None
        self.wake(job.id)
        return Claimed(job.id, job.study_id, job.study_instance_uid, job.origin, job.attempts, job.created_at,
                       job.deadline_at, ROUTINE if job.priority is None else job.priority)

    def take_lost_failed(self) -> int:
        """How many jobs this process's claims failed as ``worker_lost`` since the last call."""
        n, self.lost_failed = self.lost_failed, 0
        return n

    def _lost(self, s: AsyncSession, job: Job, now: float) -> None:
        """``job``'s holder was lost with it (its lease lapsed: the process crashed or was killed, the node
        went, or it lost the store). The first time it is due again at once; again in a row, after a
        back-off; the :data:`MAX_TAKEOVERS`-th time it is failed, so that a study whose screening kills its
        process cannot take the replicas down one after another until its deadline. A release (the
        try ended without a crash) and a retry reset the count."""
        job.takeovers = (job.takeovers or 0) + 1
        owner, job.lease_owner, job.lease_expires_at, job.updated_at = job.lease_owner, None, None, now
        if job.takeovers >= MAX_TAKEOVERS:
            self.lost_failed += 1  # committed with the claim's transaction (a rolled-back claim: counted once more)
            job.state, job.finished_at = JobState.failed.value, now
            job.error = JobError(reason="worker_lost", message=(
                f"The gateway screening this study was lost {job.takeovers} times in a row (a crash, a kill for "
                "memory, a lost node): the study is set aside so that it cannot take more gateways down. Its "
                f"instances are kept: POST /v1/jobs/{job.id}/retry queues it again.")).model_dump(mode="json")
            logger.error("job %s: its holder (%s) was lost with it %d times in a row; failed, not taken over again",
                         job.id, owner, job.takeovers)
        else:
            delay = TAKEOVER_BACKOFF_S * 2 ** (job.takeovers - 2) if job.takeovers > 1 else 0.0
            job.state, job.next_attempt_at, job.slices_done = JobState.queued.value, now + delay, 0
            logger.warning("job %s: lease of %s expired (%d time(s) in a row); due again in %g s", job.id, owner,
                           job.takeovers, delay)
        s.add(Event(job_id=job.id, state=job.state, slices_done=0, slices_total=job.slices_total, created_at=now))

    async def heartbeat(self, job_id: str, lease_s: float, *, state: JobState | None = None,
                        slices_done: int | None = None, slices_total: int | None = None,
                        series_instance_uid: str | None = None) -> bool:
        """Renew the lease (and record progress); False when this replica no longer holds the job."""
        now = await self.now()
        values: dict[str, Any] = {"lease_expires_at": now + lease_s, "updated_at": now}
        if state is not None:
            values["state"] = state.value
        if slices_done is not None:
            values["slices_done"] = slices_done
        if slices_total is not None:
            values["slices_total"] = slices_total
        if series_instance_uid is not None:
            values["series_instance_uid"] = series_instance_uid
        async with self.tx() as s:
            done = await s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == self.owner,
                                                     Job.state.in_(_RUNNING)).values(**values)
                                   .returning(Job.state, Job.slices_done, Job.slices_total))
            row = done.first()
            if row is None:
                return False
            if len(values) > 2:
                s.add(Event(job_id=job_id, state=row[0], slices_done=row[1], slices_total=row[2], created_at=now))
        if len(values) > 2:
            self.changed.notify(job_id)
        return True

    async def finish(self, job_id: str, result: CaseResult, sr_context: dict[str, Any] | None) -> bool:
        """Write the result and mark the job done; False (nothing written) when the lease was lost."""
        now = await self.now()
        async with self.tx() as s:
            row = (await s.execute(update(Job).where(
                Job.id == job_id, Job.lease_owner == self.owner, Job.state.in_(_RUNNING)).values(
                state=JobState.done.value, lease_owner=None, lease_expires_at=None, finished_at=now, updated_at=now,
                slices_done=result.n_slices, series_instance_uid=result.series_instance_uid, error=None,
            ).returning(Job.slices_total))).first()
            if row is None:
                return False
            s.add(Result(job_id=job_id, study_instance_uid=result.study_instance_uid,
                         result=result.model_dump(mode="json"), sr_context=sr_context, created_at=now))
            s.add(Event(job_id=job_id, state=JobState.done.value, slices_done=result.n_slices, slices_total=row[0],
                        created_at=now))
        self.wake(job_id)
        return True

    async def fail(self, job_id: str, error: JobError, *, leased: bool = True) -> bool:
        """Mark the job failed (its instances are kept; ``retry`` queues it again): one this replica holds,
        or (``leased=False``) one still queued (or whose holder died) past its deadline, never one another
        replica has just claimed."""
        now = await self.now()
        cond = [Job.id == job_id, Job.state.not_in(_TERMINAL)]
        if leased:
            cond.append(Job.lease_owner == self.owner)
        else:  # queued, or abandoned by a replica that died (its lease lapsed): never one being screened, and
            # only past its deadline (another replica's sweep may have failed it and a user retried it since
            # this one read it as overdue: the retry's fresh deadline keeps it)
            cond += [_waiting(now), Job.deadline_at < now]
        async with self.tx() as s:
            row = (await s.execute(update(Job).where(*cond).values(
                state=JobState.failed.value, lease_owner=None, lease_expires_at=None, finished_at=now, updated_at=now,
                error=error.model_dump(mode="json")).returning(Job.slices_done, Job.slices_total))).first()
            if row is None:
                return False
            s.add(Event(job_id=job_id, state=JobState.failed.value, slices_done=row[0], slices_total=row[1],
                        created_at=now))
        self.wake(job_id)
        return True

    async def release(self, job_id: str, delay_s: float, error: JobError | None = None) -> str:
        """Give a held job back: queued again in ``delay_s`` s, or failed when that passes its deadline.

        Returns the job's new state (``queued``/``failed``), or ``lost`` when the lease was not ours.
        """
        now = await self.now()
        async with self.read() as s:
            deadline = (await s.execute(select(Job.deadline_at).where(Job.id == job_id))).scalar()
        if deadline is not None and now + delay_s > deadline and error is not None:
            ok = await self.fail(job_id, JobError(reason=error.reason, message=_past_deadline(error, job_id),
                                                  detail=error.detail))
            return JobState.failed.value if ok else "lost"
        async with self.tx() as s:
            row = (await s.execute(update(Job).where(
                Job.id == job_id, Job.lease_owner == self.owner, Job.state.in_(_RUNNING)).values(
                state=JobState.queued.value, lease_owner=None, lease_expires_at=None, next_attempt_at=now + delay_s,
                takeovers=0,  # this try ended: its holder was not lost with it
                accepted_by=self.owner,  # this (live) replica's gauges count it while it waits
                updated_at=now, slices_done=0, error=None if error is None else error.model_dump(mode="json"),
            ).returning(Job.slices_total))).first()
            if row is None:
                return "lost"
            s.add(Event(job_id=job_id, state=JobState.queued.value, slices_done=0, slices_total=row[0],
                        created_at=now))
        self.wake(job_id)
        return JobState.queued.value

    async def release_all(self) -> int:
        """Give back every job this replica holds, due at once (shut-down); returns how many.

        The queued jobs this replica counted (and the released ones) are left to no one
        (``accepted_by`` NULL) until another replica's sweeper adopts them (:meth:`adopt`), so a replica
        that scales down does not take its share of the backlog out of the autoscaler's sum.
        """
        now = await self.now()
        async with self.tx() as s:
            held = (await s.execute(select(Job.id, Job.slices_total).where(
                Job.lease_owner == self.owner, Job.state.in_(_RUNNING)).with_for_update())).all()
            done = await s.execute(update(Job).where(Job.id.in_([r[0] for r in held])).values(
                state=JobState.queued.value, lease_owner=None, lease_expires_at=None, next_attempt_at=now,
                accepted_by=None, updated_at=now, slices_done=0, takeovers=0))
            for job_id, total in held:  # queued again: its wait from now counts (queued_s), and others wake
                s.add(Event(job_id=job_id, state=JobState.queued.value, slices_done=0, slices_total=total,
                            created_at=now))
            await s.execute(update(Job).where(Job.state == JobState.queued.value, Job.accepted_by == self.owner)
                            .values(accepted_by=None))
            await s.execute(delete(Replica).where(Replica.owner == self.owner))
            self._seen_at = None
            return _rowcount(done)

    async def seen(self, alive_s: float = REPLICA_ALIVE_S) -> None:
        """Record that this replica is alive (the sweeper, each pass; written at most every ``alive_s / 4``)."""
        now = await self.now()
        async with self.tx() as s:
            await self._seen(s, now, alive_s, force=True)

    async def _seen(self, s: AsyncSession, now: float, alive_s: float, force: bool = False) -> None:
        if not force and self._seen_at is not None and now - self._seen_at < alive_s / 4:
            return
        if not _rowcount(await s.execute(update(Replica).where(Replica.owner == self.owner).values(seen_at=now))):
            s.add(Replica(owner=self.owner, seen_at=now))
            # the rows of replicas gone long ago (pods come and go with new names); one a day is kept
            await s.execute(delete(Replica).where(Replica.seen_at < now - REPLICA_FORGOTTEN_S))
        self._seen_at = now

    async def live_replicas(self, alive_s: float = REPLICA_ALIVE_S) -> int:
        """The gateway replicas seen alive within ``alive_s`` (:meth:`seen`), this one included even before its
        first sweep recorded it (at least 1): the upload limit is the sum of theirs
        (:func:`gateway.api.studies.check_capacity`)."""
        now = await self.now()
        async with self.read() as s:
            others = (await s.execute(select(func.count()).select_from(Replica).where(
                Replica.seen_at >= now - alive_s, Replica.owner != self.owner))).scalar()
        return 1 + int(others or 0)

    async def adopt(self, alive_s: float = REPLICA_ALIVE_S) -> int:
        """Count the open jobs no live replica counts as this one's share: the queued jobs, and those whose
        holder's lease lapsed, that a replica left at shut-down (released: no one's) or that a replica not
        seen alive for ``alive_s`` accepted (it was killed: OOM, a node lost). Records this replica alive first.

        One conditional UPDATE: of racing replicas each job goes to one. Returns how many were adopted.
        """
        now = await self.now()
        async with self.tx() as s:
            await self._seen(s, now, alive_s)
            return await self._adopt(s, now, alive_s)

    async def _adopt(self, s: AsyncSession, now: float, alive_s: float) -> int:
        done = await _core(s, _ADOPT, {"now": now, "gone_before": now - alive_s, "adopter": self.owner})
        return _rowcount(done)

    async def retry(self, job_id: str, deadline_s: float) -> JobView:
        """Queue a failed job again, with a fresh deadline: a job of the study's latest version only.

        A later version (a late instance opened it, the study was screened again or sent again) holds what this
        one would screen and is the one whose reading the study gets: this one's reading, by version, would
        supersede nothing and reach no destination. The check is made under the job's study version row lock
        (:func:`_locked_job`), which every path opening a later version from this one takes first too (a late
        instance locks every version of the study, :meth:`_open_version`; a re-screen the latest,
        :meth:`rescreen`): one waits for the other, and the newest version is read after the lock (on PostgreSQL,
        read committed, a statement of its own sees what the other committed), so a re-screen or a late instance
        racing a retry never leaves both the retried version and a later one runnable. (An upload opens its
        version without reading the earlier ones: it goes after a retry as it would after any queued version.)

        Raises
        ------
        JobNotFound
            Unknown job.
        Superseded
            A later version of the study exists (the message names it and its job).
        ValueError
            The job is not failed, or its instances are no longer kept.
        """
        now = await self.now()
        async with self.tx() as s:
            study_id = (await s.execute(select(Job.study_id).where(Job.id == job_id))).scalar_one_or_none()
            if study_id is None:
                raise JobNotFound(f"No job {job_id!r}.")
            job = await _locked_job(s, study_id)
            if job is None:  # retention removed it meanwhile
                raise JobNotFound(f"No job {job_id!r}.")
            if job.state != JobState.failed.value:
                raise ValueError(f"Job {job_id} is {job.state}; only a failed job can be retried.")
            await _refuse_superseded(s, job, study_id)
            if not await _instances_kept(s, job.study_id):
                raise ValueError(f"The instances of job {job_id} are no longer kept (retention); send the study again.")
            job.state, job.attempts, job.next_attempt_at, job.deadline_at = JobState.queued.value, 0, now, now + deadline_s
            job.takeovers = 0
            job.accepted_by = self.owner  # whoever accepted it first may be gone
            job.finished_at, job.error, job.slices_done, job.updated_at = None, None, 0, now
            s.add(Event(job_id=job.id, state=job.state, slices_done=0, slices_total=job.slices_total, created_at=now))
            view = await self._job_view(s, job.id)
        self.wake(job.id)
        return view

    async def rescreen(self, study_instance_uid: str, deadline_s: float, *, priority: int | None = None,
                       idempotency_key: str | None = None) -> JobView:
        """Screen a study again, with the models served now, from the instances the gateway still keeps: a new
        version (the latest's + 1, same Study Instance UID, origin and patient) holding the latest version's
        instances, queued as a new job with a fresh deadline, at ``priority`` (default: the latest version's).

        Only the study's latest version is screened again, once its job is done or failed: its reading then
        supersedes the earlier one everywhere a study sent again does (the version's number orders them:
        :func:`latest_version`, :meth:`earlier_results`, the deliveries), and nothing new is needed downstream.

        The new version's instance rows name the same blobs as the earlier version's, as a late instance's version
        does (:meth:`_open_version`); no byte is copied (a 300-slice study is 150 MB, twice on S3). This is safe
        because a blob is deleted only when no instance row names it any more: :meth:`expire` deletes the rows of an
        expired version and returns only the keys no other row names (its check in the same transaction), the orphan
        sweep keeps every named key (:meth:`named_blobs`), and an instance replaced in a receiving version hands
        back its blob only when unreferenced (:meth:`add_instance`). The earlier version's row is locked first, as
        :meth:`retry` and :meth:`expire` lock it (study, then job): retention either ended before, and its instances
        are gone (refused), or waits and sees the copies as references.

        ``idempotency_key`` (:func:`gateway.api.studies.idempotency`): kept with the new job, so that a request sent
        again under it is answered with this job (:meth:`job_by_key`). The version is received when it is asked for
        (its ``created_at`` and ``last_rx_at``: the worklist's "Received", and where its turnaround starts, as an
        upload's at its acceptance).

        Raises
        ------
        JobNotFound
            No version of the study was received.
        ValueError
            The latest version is being received, queued or screened (the message names it and its job), or its
            instances are no longer kept (retention).
        KeyTaken
            Another request recorded a job under ``idempotency_key`` meanwhile; nothing was recorded.
        """
        for attempt in range(5):
            try:
                now = await self.now()
                async with self.tx() as s:
                    latest = (await s.execute(select(Study).where(Study.study_instance_uid == study_instance_uid)
                                              .order_by(Study.version.desc()).limit(1).with_for_update()
                                              )).scalar_one_or_none()
                    if latest is None:
                        raise JobNotFound(f"No study {study_instance_uid!r} has been received.")
                    job = await _locked_job(s, latest.id)
                    what = f"Version {latest.version} of study {study_instance_uid}"
                    if latest.state == RECEIVING or job is None:
                        raise ValueError(f"{what} is still being received; it is screened once complete "
                                         f"(POST /v1/studies/{study_instance_uid}/complete screens it now).")
                    if job.state not in (JobState.done.value, JobState.failed.value):
                        raise ValueError(f"{what} is {job.state} (job {job.id}); a study is screened again once "
                                         "its latest version is done or failed.")
                    if not await _instances_kept(s, latest.id):
                        raise ValueError(f"{what} cannot be screened again: its instances are no longer kept "
                                         "(retention); send the study again.")
                    study = Study(study_instance_uid=study_instance_uid, version=latest.version + 1,
                                  origin=latest.origin, state=COMPLETE, created_at=now, last_rx_at=now,
                                  completed_at=now, priority=latest.priority if priority is None else priority,
                                  interrupted=latest.interrupted, patient_key=latest.patient_key)
                    s.add(study)
                    await s.flush()
                    files = await _copy_instances(s, latest.id, study.id)
                    new = await self._new_job(s, study, files, now, deadline_s, idempotency_key=idempotency_key)
                    new.series_instance_uid = job.series_instance_uid
                    view = await self._job_view(s, new.id)
                self.wake(new.id)
                logger.info("study %s: version %d screened again as version %d, job %s", study_instance_uid,
                            latest.version, study.version, new.id)
                return view
            except IntegrityError:  # another version of the study recorded at the same moment: decided again
                if idempotency_key is not None and (first := await self.job_by_key(idempotency_key)) is not None:
                    raise KeyTaken(first) from None
                if attempt == 4:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    async def fail_overdue(self, overdue: Sequence[tuple[str, Any]] | None = None) -> int:
        """Fail the jobs whose deadline passed while queued (no Triton took them in time), or while held by
        a replica that died (its lease lapsed, and no Triton was ready for another to take it over); those
        of ``overdue`` (``(job id, last error)``, as :meth:`sweep` read them) when given. Returns how many."""
        if overdue is None:
            now = await self.now()
            async with self.read() as s:
                overdue = await self._overdue(s, now)
        n = 0
        for job_id, error in overdue:
            last = JobError.model_validate(error) if error else JobError(reason="triton_unavailable",
                                                                         message="No Triton was ready.")
            n += await self.fail(job_id, JobError(reason=last.reason, message=_past_deadline(last, job_id)), leased=False)
        return n

    @staticmethod
    async def _overdue(s: AsyncSession, now: float) -> list[tuple[str, Any]]:
        rows = (await _core(s, _OVERDUE, {"now": now})).all()
        return [(r[0], r[1]) for r in rows]

    # --- reading ---------------------------------------------------------------------------------
    async def job(self, job_id: str) -> JobView:
        """The job with its result once done, the version of its study and the newer version superseding it.

        Raises
        ------
        JobNotFound
            Unknown (or expired) job.
        """
        async with self.read() as s:
            return await self._job_view(s, job_id)

    @staticmethod
    async def _job_view(s: AsyncSession, job_id: str) -> JobView:
        """The job as :meth:`job` shows it, read in ``s`` (the event stream's steps read it so too)."""
        job = await s.get(Job, job_id)
        if job is None:
            raise JobNotFound(f"No job {job_id!r}.")
        result = await s.get(Result, job_id) if job.state == JobState.done.value else None
        view = _view(job, result)
        row = (await s.execute(select(Study.version, latest_version(), newest_version())
                               .join(Job, Job.study_id == Study.id).where(Job.id == job_id))).first()
        if row is None:
            return view
        superseded = row[1] is not None and row[1] > row[0]
        return view.model_copy(update={"version": row[0], "superseded_by": row[1] if superseded else None,
                                       "newest_version": row[2]})

    async def earlier_results(self, job_id: str, limit: int = 10) -> list[CaseResult]:
        """The results of earlier versions of the same study (still kept), newest version first: the readings
        this one supersedes (the SR's Predecessor Documents, the FHIR reports it replaces).

        By version, not by when a result was written: an earlier version whose result is written after a later one's
        (version 1 still being screened while version 2 was received and screened) is no successor of it."""
        async with self.read() as s:
            mine = (await s.execute(self._version_of(job_id))).first()
            if mine is None:
                return []
            rows = (await s.execute(select(Result.result).join(Job, Job.id == Result.job_id)
                                    .join(Study, Study.id == Job.study_id)
                                    .where(Study.study_instance_uid == mine[0], Study.version < mine[1])
                                    .order_by(Study.version.desc()).limit(limit))).scalars().all()
        return [stored_result(r) for r in rows]

    async def later_reading(self, job_id: str) -> tuple[int, str] | None:
        """``(version, job id)`` of the newest result of a later version of the same study, or None: a reading
        that supersedes this job's (which must then reach no destination, whenever it was screened)."""
        async with self.read() as s:
            mine = (await s.execute(self._version_of(job_id))).first()
            if mine is None:
                return None
            row = (await s.execute(select(Study.version, Job.id).join(Job, Job.study_id == Study.id)
                                   .join(Result, Result.job_id == Job.id)
                                   .where(Study.study_instance_uid == mine[0], Study.version > mine[1])
                                   .order_by(Study.version.desc()).limit(1))).first()
        return None if row is None else (int(row[0]), str(row[1]))

    @staticmethod
    def _version_of(job_id: str) -> Select[str, int]:
        """``(Study Instance UID, version)`` of the study version a job screens."""
        return select(Study.study_instance_uid, Study.version).join(Job, Job.study_id == Study.id).where(Job.id == job_id)

    async def sr_context(self, job_id: str) -> dict[str, Any] | None:
        """The SR headers kept with a done job's result."""
        async with self.read() as s:
            return (await s.execute(select(Result.sr_context).where(Result.job_id == job_id))).scalar()

    async def study(self, study_instance_uid: str) -> StudyState | None:
        """The latest version of a study (and the job of the latest complete one)."""
        async with self.read() as s:
            latest = (await s.execute(select(Study).where(Study.study_instance_uid == study_instance_uid)
                                      .order_by(Study.version.desc()).limit(1))).scalar_one_or_none()
            if latest is None:
                return None
            job = (await s.execute(select(Job).where(Job.study_instance_uid == study_instance_uid)
                                   .order_by(Job.created_at.desc()).limit(1))).scalar_one_or_none()
            n = (await s.execute(select(func.count()).where(Instance.study_id == latest.id))).scalar() or 0
            read = None if job is None or job.state == JobState.done.value else (await s.execute(
                select(Job.id).join(Study, Study.id == Job.study_id)
                .where(Job.study_instance_uid == study_instance_uid, Job.state == JobState.done.value)
                .order_by(Study.version.desc()).limit(1))).scalar()
        view = None if job is None else await self.job(job.id)
        return StudyState(study_instance_uid, latest.state, int(n), view, None if read is None else await self.job(read))

    async def latest_priority(self, study_instance_uid: str) -> int | None:
        """The priority of the study's latest version (what :meth:`rescreen` gives the next by default), or None for
        a study never received."""
        async with self.read() as s:
            return (await s.execute(select(Study.priority).where(Study.study_instance_uid == study_instance_uid)
                                    .order_by(Study.version.desc()).limit(1))).scalar()

    async def events_after(self, job_id: str, after: int) -> list[tuple[int, str]]:
        """``(event id, state)`` of the job's events after ``after``."""
        async with self.read() as s:
            return await self._events_after(s, job_id, after)

    @staticmethod
    async def _events_after(s: AsyncSession, job_id: str, after: int) -> list[tuple[int, str]]:
        rows = await _core(s, _EVENTS_AFTER, {"job_id": job_id, "after": after})
        return [(r[0], r[1]) for r in rows]

    async def job_step(self, job_id: str, after: int, *, view: bool = False
                       ) -> tuple[list[tuple[int, str]], JobView | None]:
        """An event stream's step, in one session (it took two, at every change of any job): the job's events
        after ``after`` (:meth:`events_after`) and, when there are any or ``view`` asks, its view (:meth:`job`).

        Raises
        ------
        JobNotFound
            The view was read and the job is unknown (or expired).
        """
        async with self.read() as s:
            events = await self._events_after(s, job_id, after)
            return events, (await self._job_view(s, job_id) if events or view else None)

    async def counts(self, mine: bool = False, *, priority: int | None = None) -> tuple[int, int, int]:
        """``(queued, running, backlog slices)`` across the cluster, or (``mine``) of this replica; of the jobs
        of ``priority`` (:data:`gateway.jobs.PRIORITIES`) and above only, when given.

        A replica's share is the jobs it holds under a lease that runs, and the jobs waiting (queued, or
        their holder's lease lapsed) that it accepted or adopted (:meth:`adopt`), so the sum over live
        replicas (what the autoscaler adds up) is the cluster's backlog.
        """
        now = await self.now()
        async with self.read() as s:
            return await self._counts(s, mine, now, priority)

    def _counts_query(self, mine: bool, now: float | BindParameter[float],
                      priority: int | None = None) -> Select[str, int, int]:
        where: list[ColumnElement[bool]] = [Job.state.not_in(_TERMINAL)]
        if priority is not None:
            where.append(Job.priority >= priority)
        if mine:  # one replica a job: its lease holder while the lease runs, else the one that counts it waiting
            where.append(or_(and_(Job.state.in_(_RUNNING), Job.lease_owner == self.owner, Job.lease_expires_at >= now),
                             and_(_waiting(now), Job.accepted_by == self.owner)))
        return select(Job.state, func.count(), func.coalesce(
            func.sum(func.coalesce(Job.slices_total, Job.files) - Job.slices_done), 0)).where(*where).group_by(Job.state)

    async def _counts(self, s: AsyncSession, mine: bool, now: float,
                      priority: int | None = None) -> tuple[int, int, int]:
        if mine and priority is None:  # the sweeper's, each pass: built once (as _DUE and _OVERDUE)
            if self._mine is None:
                self._mine = self._counts_query(True, _NOW)
            rows = (await _core(s, self._mine, {"now": now})).all()
        else:
            rows = (await s.execute(self._counts_query(mine, now, priority))).all()
        queued = sum(int(r[1]) for r in rows if r[0] == JobState.queued.value)
        running = sum(int(r[1]) for r in rows if r[0] != JobState.queued.value)
        return queued, running, max(0, sum(int(r[2]) for r in rows))

    # --- retention ---------------------------------------------------------------------------------
    async def named_blobs(self, keys: Sequence[str]) -> set[str]:
        """Those of ``keys`` that an instance row names (the orphan sweep keeps them)."""
        async with self.read() as s:
            return await _named(s, keys)

    async def expire(self, results_s: float, instances_s: float) -> list[str]:
        """Delete what retention allows; returns the blob keys nothing refers to any more.

        Instances of a finished job go ``instances_s`` after it finished (a done job's SOP Instance UIDs stay, in
        ``expired_instances``); the job, its result and its events (and its study version, with those UIDs) go
        ``results_s`` after it finished.
        """
        now = await self.now()
        async with self.tx() as s:
            old_instances = select(Job.study_id).where(Job.state.in_(_TERMINAL), Job.finished_at < now - instances_s)
            # a late STOW instance opening a new version copies the previous version's instance rows under
            # the same lock (_open_version): without it, PostgreSQL could commit such a copy after the
            # reference check below, and the copied rows would name deleted blobs
            # (every version this call changes, so that it locks study rows before job rows, as retry does)
            touched = select(Job.study_id).where(Job.state.in_(_TERMINAL),
                                                 Job.finished_at < now - min(instances_s, results_s))
            await s.execute(select(Study.id).where(Study.id.in_(touched)).order_by(Study.id).with_for_update())
            # what a done version was screened with stays known by its SOP Instance UIDs (nothing else), as long as
            # its result: an instance sent again later screens nothing (_screened_already)
            await s.execute(insert(ExpiredInstance).from_select(
                ["study_id", "sop_instance_uid"],
                select(Instance.study_id, Instance.sop_instance_uid).join(Job, Job.study_id == Instance.study_id)
                .where(Job.state == JobState.done.value, Job.finished_at < now - instances_s,
                       Job.finished_at >= now - results_s, Instance.sop_instance_uid.is_not(None))))
            keys = set((await s.execute(delete(Instance).where(Instance.study_id.in_(old_instances))
                                        .returning(Instance.blob_key))).scalars())
            old_studies = select(Job.study_id).where(Job.state.in_(_TERMINAL), Job.finished_at < now - results_s)
            gone = list((await s.execute(select(Study.id).where(Study.id.in_(old_studies)))).scalars())
            if gone:
                keys |= set((await s.execute(delete(Instance).where(Instance.study_id.in_(gone))
                                             .returning(Instance.blob_key))).scalars())
                await s.execute(delete(ExpiredInstance).where(ExpiredInstance.study_id.in_(gone)))
                await s.execute(delete(Event).where(Event.job_id.in_(select(Job.id).where(Job.study_id.in_(gone)))))
                await s.execute(delete(Result).where(Result.job_id.in_(select(Job.id).where(Job.study_id.in_(gone)))))
                await s.execute(delete(Job).where(Job.study_id.in_(gone)))
                await s.execute(delete(Study).where(Study.id.in_(gone)))
            if not keys:
                return []
            still = await _named(s, sorted(keys))
        if gone:
            logger.info("retention: removed %d finished studies", len(gone))
        return sorted(keys - still)


async def _locked_job(s: AsyncSession, study_id: int) -> Job | None:
    """The job of a study version, locked with the version's row: retention deletes instances under that row's lock
    (:meth:`Store.expire`), taken here first, in its order (study, then job), so that what the caller reads next
    sees its deletion committed or not begun."""
    await s.execute(select(Study.id).where(Study.id == study_id).with_for_update())
    return (await s.execute(select(Job).where(Job.study_id == study_id).with_for_update())).scalar_one_or_none()


async def _refuse_superseded(s: AsyncSession, job: Job, study_id: int) -> None:
    """Raise :class:`~gateway.errors.Superseded` when a later version of ``job``'s study exists (:meth:`Store.retry`,
    under the version's lock), naming it, its job and what to do with it."""
    uid, mine = (await s.execute(select(Study.study_instance_uid, Study.version).where(Study.id == study_id))).one()
    later = (await s.execute(
        select(Study.id, Study.version, Study.state, Job.id, Job.state).outerjoin(Job, Job.study_id == Study.id)
        .where(Study.study_instance_uid == uid, Study.version > mine).order_by(Study.version.desc()).limit(1))).first()
    if later is None:
        return
    later_id, version, study_state, later_job, later_state = later
    if study_state == RECEIVING or later_job is None:
        what, then = "being received", f"POST /v1/studies/{uid}/complete screens it now"
    else:
        what = f"job {later_job}, {later_state}"
        then = {JobState.failed.value: f"POST /v1/jobs/{later_job}/retry queues that one again",
                JobState.done.value: f"its reading is the study's; POST /v1/studies/{uid}/rescreen screens the "
                                     "study again"}.get(later_state, "its reading is to be the study's")
        if later_state in _TERMINAL and not await _instances_kept(s, later_id):  # neither of those would take it
            then = "its instances are no longer kept (retention); send the study again"
    raise Superseded(f"Job {job.id} screens version {mine} of study {uid}, and version {version} ({what}) "
                     f"came after it: {then}. Only a job of a study's latest version is retried.",
                     version=int(version), job_id=later_job)


async def _instances_kept(s: AsyncSession, study_id: int) -> bool:
    """Whether retention left the instances of a study version (it deletes them all at once)."""
    return (await s.execute(select(Instance.id).where(Instance.study_id == study_id).limit(1))).first() is not None


async def _copy_instances(s: AsyncSession, source: int, target: int) -> int:
    """Copy the instance rows of study version ``source`` into version ``target``, naming the same blobs (a blob is
    deleted only once no row names it: :meth:`Store.expire`). Returns how many."""
    await s.execute(insert(Instance).from_select(
        ["study_id", "sop_instance_uid", "filename", "blob_key", "nbytes", "received_at"],
        select(literal(target), Instance.sop_instance_uid, Instance.filename, Instance.blob_key, Instance.nbytes,
               Instance.received_at).where(Instance.study_id == source)))
    # counted, not the INSERT's row count (a driver may not report one for INSERT ... SELECT)
    return int((await s.execute(select(func.count()).where(Instance.study_id == target))).scalar() or 0)


async def _picked(s: AsyncSession, pick: Select[str], params: dict[str, Any]) -> Job | None:
    """The job ``pick`` (:data:`_PICK`) chooses, locked: its id read on the connection (an idle worker's claim, twice
    a second, finds none and loads nothing), then the row by the ORM. The session is flushed first: a job set aside
    by :meth:`Store._lost` must be chosen by what it is now (the ORM's own execute flushed it before reading)."""
    await s.flush()
    job_id = (await _core(s, pick, params)).scalar()
    return None if job_id is None else await s.get(Job, job_id)


@overload
async def _core(s: AsyncSession, statement: TypedReturnsRows[*_Ts],
                params: dict[str, Any] | None = None) -> CursorResult[*_Ts]: ...


@overload
async def _core(s: AsyncSession, statement: Executable,
                params: dict[str, Any] | None = None) -> CursorResult[*tuple[Any, ...]]: ...


async def _core(s: AsyncSession, statement: Executable,
                params: dict[str, Any] | None = None) -> CursorResult[*tuple[Any, ...]]:
    """``statement`` executed on the session's connection, in its transaction: SQL as written, without the ORM's
    execute path (a Core statement through the session is taken apart for ORM options and entities first, about a
    third of a short statement's CPU). For statements that load no ORM objects and need no session synchronised."""
    return await (await s.connection()).execute(statement, params)


async def _named(s: AsyncSession, keys: Sequence[str]) -> set[str]:
    """Those of ``keys`` that an instance row names, asked 500 at a time (SQLite's bound parameters)."""
    named: set[str] = set()
    for i in range(0, len(keys), 500):
        chunk = list(keys[i : i + 500])
        named |= set((await s.execute(select(Instance.blob_key).where(Instance.blob_key.in_(chunk)))).scalars())
    return named


def _past_deadline(last: JobError, job_id: str) -> str:
    """The message of a job failed at its deadline, after ``last`` (the error of its last try): what kept it from being
    screened, in the words of that error's cause (it said "No Triton could take the study" when the blob store or the
    state store had failed the tries), and how to try again.

    >>> _past_deadline(JobError(reason="triton_unavailable", message="No Triton was ready."), "j1")
    'No Triton was ready. No Triton could take the study before its deadline; its instances are kept: POST /v1/jobs/j1/retry queues it again.'
    >>> _past_deadline(JobError(reason="store_unavailable", message="State store error."), "j1").split(" before")[0]
    'State store error. The study could not be screened'
    """
    why = ("No Triton could take the study" if last.reason == "triton_unavailable"
           else "The study could not be screened")
    return f"{last.message} {why} before its deadline; its instances are kept: POST /v1/jobs/{job_id}/retry queues it again."


def _view(job: Job, result: Result | None = None) -> JobView:
    return JobView(
        job_id=job.id, state=JobState(job.state), origin=job.origin, priority=priority_name(job.priority),
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=job.series_instance_uid, files=job.files, slices_total=job.slices_total,
        slices_done=job.slices_done, attempts=job.attempts,
        next_attempt_at=_ts(job.next_attempt_at) if job.state == JobState.queued.value and job.attempts else None,
        created_at=_ts(job.created_at), finished_at=_ts(job.finished_at),
        error=JobError.model_validate(job.error) if job.error else None,
        result=stored_result(result.result) if result is not None else None,
    )


class _NotifyingSession(Session):
    """A PostgreSQL session that sends ``NOTIFY ctscreen`` with a commit that records a job event."""


def _rowcount(result: SqlResult[Any]) -> int:
    """Rows an UPDATE or DELETE matched (an ORM session's execute returns a CursorResult for them)."""
    return int(result.rowcount or 0) if isinstance(result, CursorResult) else 0


def _mark_events(session: Session, *_flush: Any) -> None:
    """Note what the session's new job events are: only progress, or work, and of which jobs (kept over the
    session's flushes)."""
    events = [o for o in session.new if isinstance(o, Event)]
    if events:
        kind = PROGRESS if {e.state for e in events} <= set(_RUNNING) and session.info.get("notify") != WORK else WORK
        session.info["notify"] = kind
        session.info.setdefault("jobs", set()).update(e.job_id for e in events)


event.listen(_NotifyingSession, "before_flush", _mark_events)


@event.listens_for(_NotifyingSession, "before_commit")
def _notify_on_commit(session: Session) -> None:
    _mark_events(session)
    kind, jobs = session.info.pop("notify", None), session.info.pop("jobs", set())
    if kind is not None:
        session.execute(text("SELECT pg_notify(:channel, :kind)"), {"channel": CHANNEL, "kind": notice(kind, jobs)})


def notice(kind: str, jobs: Collection[str]) -> str:
    """A NOTIFY's payload: ``kind``, and the job after a space when the events are all of one job (only its
    event streams need waking on the other replicas, :meth:`Store.heard`).

    >>> notice(PROGRESS, {"4f2a"}), notice(PROGRESS, {"4f2a", "77c1"}), notice(WORK, {"4f2a"})
    ('progress 4f2a', 'progress', 'work 4f2a')
    """
    return f"{kind} {next(iter(jobs))}" if len(jobs) == 1 else kind


SQLITE_MODE = 0o640
"""Permissions of a SQLite state store and its -wal and -shm files (SQLite gives those the database's): its
results hold what an SR needs of the patient, so no other user may read it (the blobs are 0640 as well)."""


def private_sqlite_file(url: str) -> None:
    """Make the folder of ``url``'s SQLite database and the database itself (empty) readable by its owner and
    group only, before SQLite creates it under the process's umask (022: readable by every user of the host);
    a database, -wal or -shm file an earlier release left readable by others is narrowed to :data:`SQLITE_MODE`.
    Nothing for ``:memory:`` or another scheme.

    >>> import tempfile, stat; db = Path(tempfile.mkdtemp()) / "state" / "ctscreen.db"
    >>> private_sqlite_file(f"sqlite:///{db}?timeout=30"); oct(stat.S_IMODE(db.stat().st_mode))
    '0o640'
    >>> sorted(p.name for p in db.parent.iterdir())  # the query names no file
    ['ctscreen.db']
    """
    from sqlalchemy.engine import make_url

    if not url.startswith("sqlite"):
        return
    parsed = make_url(url)  # the file SQLAlchemy opens: a query (?timeout=30) is no part of its name
    path = parsed.database or ""
    if not path or path == ":memory:" or path.startswith("file:") or parsed.query.get("mode") == "memory":
        return
    db = Path(path)
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SQLITE_MODE))
    except FileExistsError:
        pass
    except OSError as exc:  # a read-only volume: SQLite says what it cannot do when it opens the file
        logger.warning("state store %s: cannot create it with mode 0640 (%s)", db, exc.strerror or exc)
    for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        try:
            mode = f.stat().st_mode & 0o777
            if mode & ~SQLITE_MODE:
                f.chmod(mode & SQLITE_MODE)
        except FileNotFoundError:
            continue
        except OSError as exc:  # another user's file, a read-only volume: it starts as before, and says so
            logger.warning("state store file %s is readable by others (mode %o) and cannot be narrowed (%s)",
                           f, mode, exc.strerror or exc)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver's own BEGIN off: the "begin" event emits ours
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=30000"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _sqlite_rollback_before_close(dbapi_connection: Any, _record: Any, _exc: BaseException | None) -> None:
    """End the transaction of a connection SQLAlchemy is about to close after an error or a cancellation.

    A task cancelled inside a transaction (a job at shut-down, a lost lease, the worker's claim loop)
    gets its connection invalidated and closed. If a SELECT on it still had rows to give, SQLite cannot
    close it (``sqlite3_close_v2`` leaves a zombie until the cancelled task's cursor is freed) and the
    zombie keeps the transaction, write lock included: every other writer then waited ``busy_timeout``
    (30 s) and failed, shut-down's ``release_all`` among them. A ROLLBACK first releases the lock, pending
    statements or not; it runs in the connection's thread before the close queued after it.
    """
    if dbapi_connection is None:
        return
    try:
        dbapi_connection.rollback()
    except asyncio.CancelledError:
        # cancelled again while waiting: the ROLLBACK is queued in the connection's thread all the same;
        # keep the cancellation for the close that follows (which then terminates) and for the caller
        task = asyncio.current_task()
        if task is not None:
            task.cancel()
    except Exception:  # noqa: BLE001 - broken connection, or no greenlet (garbage collection): nothing held
        logger.debug("rollback before closing an invalidated SQLite connection failed", exc_info=True)


class _CancelledReset(logging.Filter):
    """Turn SQLAlchemy's ERROR for a cancellation during a connection's reset into one DEBUG line of ours.

    The worker, the deliverer and shut-down cancel tasks on purpose; one cancelled just after its commit
    is cancelled in the pool's ROLLBACK on check-in, and SQLAlchemy logs that as "Exception during reset
    or similar" with a traceback, then closes the connection (on SQLite after
    :func:`_sqlite_rollback_before_close`) and goes on. Other errors during a reset stay as they are.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError) and record.msg == "Exception during reset or similar":
            logger.debug("a task was cancelled while its connection was reset; that connection is closed")
            return False
        return True


def _quiet_cancelled_resets(engine: AsyncEngine) -> None:
    pool_logger = engine.pool.logger  # the pool class's logger (an adapter with echo_pool, unused here)
    target = pool_logger if isinstance(pool_logger, logging.Logger) else pool_logger.logger
    if not any(isinstance(f, _CancelledReset) for f in target.filters):
        target.addFilter(_CancelledReset())


class Changes:
    """In-process wake-up of whoever waits for a change in the store (workers, SSE streams).

    A waiter reads the store, then waits; a change notified while it was reading would be lost to a plain
    event (it is set for the waiters of the moment), and the waiter would sleep its whole timeout with work
    in the store: a job accepted while the worker's claim was in flight waited a poll to be claimed, a job
    finished while its event stream read the previous event was told up to a poll late. So a waiter takes
    :attr:`generation` before it reads and hands it to :meth:`wait`, which returns at once when a change came
    since.

    A waiter that follows one job (its event stream) waits on :meth:`watching`'s changes of that job instead:
    woken by every change, each of the replica's streams read the store at every progress of every running
    job, a read per stream and change (64 streams open and 8 jobs running, each recording its progress every
    0.5 s: 1,024 reads a second, of progress that nobody following those streams was shown).
    """

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None
        self.generation = 0
        """How many changes were notified so far (take it before reading the store, see :meth:`wait`)."""
        self._watched: dict[str, tuple[Changes, int]] = {}  # key -> (its changes, how many watch it)

    def notify(self, key: str | None = None) -> None:
        """A change: it wakes this object's waiters, and those :meth:`watching` ``key``; all of them when
        there is no key (a change of several jobs, or of one not known here)."""
        self._wake()
        if key is None:
            for changes, _ in self._watched.values():
                changes._wake()
        elif (watched := self._watched.get(key)) is not None:
            watched[0]._wake()

    def _wake(self) -> None:
        self.generation += 1
        if self._event is not None:
            self._event.set()
            self._event = None

    @contextlib.contextmanager
    def watching(self, key: str) -> Iterator[Changes]:
        """The changes notified for ``key`` (and those without a key) while the block runs: take its
        :attr:`generation` and :meth:`wait` on it as on this object."""
        changes, holders = self._watched.get(key, (None, 0))
        changes = changes or Changes()
        self._watched[key] = (changes, holders + 1)
        try:
            yield changes
        finally:
            holders = self._watched[key][1] - 1
            if holders:
                self._watched[key] = (changes, holders)
            else:
                del self._watched[key]

    async def wait(self, timeout: float, seen: int | None = None) -> bool:
        """Return at the next change (True), or after ``timeout`` s (False); at once (True) when a change was
        notified since :attr:`generation` read ``seen``."""
        if seen is not None and seen != self.generation:
            return True
        if self._event is None:
            self._event = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancel (CPython gh-86296, fixed in 3.12)
                await self._event.wait()
        except TimeoutError:
            return False
        return True
