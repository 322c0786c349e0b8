"""Schema migrations of the state store (Alembic; the scripts ship inside the package).

``ctscreen serve`` and the gateway upgrade the schema at start (``CTSCREEN_DB_MIGRATE``, on by
default); ``ctscreen db upgrade`` does it alone (the Helm chart's pre-install / pre-upgrade Job).

Migrations only add (expand-only), so a release runs on the schema of a later one. A database at a
revision this release does not ship (a later release migrated it; then ``helm rollback``) is left as it
is, with a warning: an upgrade would fail on a revision Alembic cannot find. A database behind this
release's newest revision, or never migrated, is refused at start (:func:`check_schema`) with what to run,
instead of failing later on a missing column.

``ctscreen db downgrade REVISION`` (:func:`plan_downgrade`, then :func:`downgrade`) goes back with each
migration's own ``downgrade()``, to a revision named explicitly (``base``: no schema at all). Each step
drops what its migration made, with that data; rows the older schema holds stay. Only a release that
ships the database's revision can downgrade it: after a ``helm rollback``, run the later release's image.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ctscreen.signals import stop_on_signals
from gateway.phi import withheld
from gateway.store.store import async_url, error_code, private_sqlite_file, redact, unreachable

logger = logging.getLogger(__name__)
T = TypeVar("T")


class SchemaError(RuntimeError):
    """The database's schema is behind this release, or absent: the message says what to run."""


class RevisionError(ValueError):
    """A downgrade this release cannot make (a target it does not ship or that lies ahead, a database at a revision
    it does not ship, or without a schema): the message says why and what to run instead."""


BASE = "base"
"""The downgrade target before the first revision: no schema at all (every table dropped, with its data)."""

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _config(url: str, lock_timeout_s: float | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = async_url(url)
    if lock_timeout_s is not None:
        config.attributes["lock_timeout_s"] = lock_timeout_s
    return config


def upgrade(url: str, revision: str = "head", *, lock_timeout_s: float | None = None) -> str | None:
    """Upgrade the database at ``url`` to ``revision`` (blocking: it runs its own event loop, so call it
    where no loop runs, e.g. in a thread). On PostgreSQL each statement waits at most ``lock_timeout_s``
    (default 10 s) for a table lock, then the whole migration fails and changes nothing.

    Returns
    -------
    str | None
        The database's revision when it is one this release does not ship (left as it is, warned);
        None when the upgrade ran.

    Raises
    ------
    RevisionError
        ``revision`` is neither ``head`` nor a revision this release ships (its full id): :func:`known_revision`.
    """
    known_revision(revision, "head")
    private_sqlite_file(async_url(url))
    at = database_revision(url)
    if at is not None and not shipped(at):
        logger.warning("state store %s is at revision %s, which this release (newest %s) does not ship: a later "
                       "release migrated it. Migrations only add, so this release runs on it unchanged.",
                       redact(url), at, head())
        return at
    command.upgrade(_config(url, lock_timeout_s), revision)
    return None


def known_revision(revision: str, other: str) -> None:
    """Refuse a target that is neither a revision this release ships, by its full id, nor ``other`` (``head`` for an
    upgrade, ``base`` for a downgrade): Alembic's own answers to the rest (a prefix, ``heads``, ``-1``, a range, an
    id it cannot find) were its raw CommandError, or a prefix taken for a revision.

    Raises
    ------
    RevisionError
        One line naming the revisions this release ships.
    """
    if revision != other and not shipped(revision):
        raise RevisionError(f"unknown revision {revision!r}: name one this release ships ({', '.join(revisions())}) "
                            f"or {other}")


def head() -> str:
    """The newest revision shipped."""
    return _scripts().get_current_head() or ""


def revisions() -> list[str]:
    """The revisions shipped, oldest first (the history is one line)."""
    return [script.revision for script in reversed(list(_scripts().walk_revisions()))]


@dataclass(frozen=True)
class DowngradePlan:
    """What a downgrade does: the database at ``url`` goes from ``at`` back to ``target``, undoing ``steps``,
    newest first, each ``(revision, what its migration made)``. No steps: it is at ``target`` already."""

    url: str
    at: str
    target: str
    steps: tuple[tuple[str, str], ...]

    def lines(self) -> list[str]:
        """The plan as lines for an operator: where it stands, where it goes, and each migration undone."""
        where = f"state store {redact(self.url)}: at revision {self.at}"
        if not self.steps:
            return [f"{where}, the target: nothing to downgrade"]
        to = "base (no schema: every table is dropped)" if self.target == BASE else self.target
        return [f"{where}; downgrading to {to} undoes, newest first, each dropping what it made with its data:",
                *(f"  {revision}  {doc}" for revision, doc in self.steps)]


def plan_downgrade(url: str, revision: str) -> DowngradePlan:
    """What a downgrade of the database at ``url`` to ``revision`` would undo (blocking, like :func:`upgrade`);
    changes nothing.

    Raises
    ------
    RevisionError
        ``revision`` is neither a revision this release ships (its full id) nor ``base``; the database has no
        schema, is at a revision this release does not ship (a later release's: downgrade with that release),
        or is before ``revision`` (that is an upgrade).
    """
    known_revision(revision, BASE)
    known = revisions()
    order = [BASE, *known]
    where = f"state store {redact(url)}"
    at = database_revision(url)
    if at is None:
        raise RevisionError(f"{where} has no schema: nothing to downgrade")
    if at not in known:
        raise RevisionError(f"{where} is at revision {at}, which this release (newest {head()}) does not ship: "
                            "downgrade it with the release that migrated it")
    if order.index(revision) > order.index(at):
        raise RevisionError(f"{where} is at revision {at}, before {revision}: a downgrade only goes back "
                            f"(`ctscreen db upgrade --revision {revision}` goes forward)")
    undone = known[order.index(revision):order.index(at)]
    return DowngradePlan(url, at, revision, tuple((r, _doc(r)) for r in reversed(undone)))


def downgrade(plan: DowngradePlan, *, lock_timeout_s: float | None = None) -> None:
    """Carry out ``plan`` (:func:`plan_downgrade`) with Alembic's downgrade: one transaction, the same advisory
    lock and lock timeout as :func:`upgrade`, so one that fails half-way changes nothing. Blocking."""
    if plan.steps:
        command.downgrade(_config(plan.url, lock_timeout_s), plan.target)


def _doc(revision: str) -> str:
    script = _scripts().get_revision(revision)
    return script.doc.splitlines()[0] if script is not None and script.doc else ""


def shipped(revision: str) -> bool:
    """Whether this release ships ``revision``, by its full id (Alembic's revision map also takes a unique prefix
    and ``head``)."""
    return revision in revisions()


@functools.cache  # the scripts ship with the package: read them once
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config("sqlite://"))


async def current(engine: AsyncEngine, url: str | None = None) -> str | None:
    """The revision of the database behind an async ``engine`` at ``url`` (None: never migrated).

    Raises
    ------
    SchemaError
        Its alembic_version table records more than one revision (Alembic's own answer was a raw CommandError):
        ctscreen's history is one line, so not a database ctscreen migrated, or one edited by hand.
    """
    async with engine.connect() as connection:
        heads = await connection.run_sync(lambda c: MigrationContext.configure(c).get_current_heads())
    if len(heads) > 1:
        where = redact(url) if url is not None else engine.url.render_as_string(hide_password=True)
        raise SchemaError(f"state store {where} records {len(heads)} revisions ({', '.join(sorted(heads))}) in its "
                          "alembic_version table, where ctscreen's records one: not a database ctscreen migrated "
                          "(check CTSCREEN_DATABASE_URL), or one edited by hand")
    return heads[0] if heads else None


async def _on_engine(url: str, use: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """``use`` an engine of its own on ``url`` (disposed after)."""
    engine = create_async_engine(async_url(url))
    try:
        return await use(engine)
    finally:
        await engine.dispose()


def database_revision(url: str) -> str | None:
    """The revision of the database at ``url`` (None: never migrated); blocking, like :func:`upgrade`."""
    return asyncio.run(_on_engine(url, lambda engine: current(engine, url)))


async def check_schema(engine: AsyncEngine, url: str) -> None:
    """Refuse a schema this release cannot run on.

    Raises
    ------
    SchemaError
        When the database was never migrated, or is at an earlier revision than this release's newest.
        A revision this release does not ship is run on, with a warning.
    """
    at, newest = await current(engine, url), head()
    where = f"state store {redact(url)}"
    if at is None:
        raise SchemaError(f"{where} has no schema: run `ctscreen db upgrade` (or start with CTSCREEN_DB_MIGRATE=true).")
    known = shipped(at)
    if at != newest and known:
        raise SchemaError(f"{where} is at revision {at}; this release needs {newest}: run `ctscreen db upgrade` "
                          "(or start with CTSCREEN_DB_MIGRATE=true).")
    if not known:  # a later release's (migrations only add), or not ctscreen's database at all
        logger.warning("%s is at revision %s, which this release (newest %s) does not ship: a later release's "
                       "schema, run on as it is (migrations only add); if no later release ran, check the URL",
                       where, at, newest)


_REFUSALS = ("28", "3D000")
"""SQLSTATEs of a server that refuses the connection itself: invalid authorization (a wrong user or password,
no pg_hba.conf entry), no such database."""


def _refusal(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "sqlstate", None)
    return isinstance(code, str) and code.startswith(_REFUSALS)


def _until_stopped(run: Callable[[], None], stop: threading.Event, received: list[signal.Signals], where: str) -> None:
    """``run()`` in a daemon thread of its own until it returns (or raises: raised here) or ``stop`` is set (a
    SchemaError): a start stopped while a connection attempt hangs says so at once. (Its process may still wait at exit
    for a name lookup under way in asyncio's thread pool, up to the resolver's own timeout.)"""
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            run()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, raised there
            outcome.append(exc)
        finally:
            done.set()

    done = threading.Event()
    threading.Thread(target=attempt, name="ctscreen-schema", daemon=True).start()
    while not done.wait(0.2):
        if received or stop.is_set():  # received: noted in the handler itself; stop: set a moment later
            _stopped(where, received)
    if outcome[0] is not None:
        raise outcome[0]


def _stopped(where: str, received: list[signal.Signals]) -> None:
    said = received[0].name if received else "a signal"
    raise SchemaError(f"{where}: stopped by {said} while waiting for it to answer.")


def prepare_schema(url: str, migrate: bool, wait_s: float = 0.0, *, every_s: float = 10.0,
                   clock: Callable[[], float] = time.monotonic) -> None:
    """Upgrade the schema (when ``migrate``) and check it, before a server starts; callable from a running
    event loop (it works in a thread of its own), as uvicorn's app factory is.

    A database that cannot be reached yet (refused, not resolved, timed out, starting up, a standby:
    :func:`gateway.store.store.unreachable`) is tried again every second for up to ``wait_s``, said in one line
    at the first try and every ``every_s`` after: a gateway started before its database (the chart's
    PostgreSQL, a fail-over under way) waits for it instead of dying with a traceback into a crash loop.

    Raises
    ------
    SchemaError
        As :func:`check_schema`; and when the database still cannot be reached after ``wait_s``, refuses the
        gateway (a wrong password, a database that does not exist), fails a migration's statement (logged, its
        message withheld), or a SIGTERM or SIGINT comes while it waits: one line naming the cause.
    """
    def run() -> None:
        if migrate:
            upgrade(url)
        asyncio.run(_on_engine(url, lambda engine: check_schema(engine, url)))

    if async_url(url).startswith("sqlite"):  # a file: no server to wait for
        wait_s = 0.0
    where, start = f"state store {redact(url)}", clock()
    said = -every_s
    stop, received = threading.Event(), []
    with contextlib.ExitStack() as held:
        if wait_s > 0:
            received = held.enter_context(stop_on_signals(stop))
        while True:
            try:
                _until_stopped(run, stop, received, where)
                break
            except SchemaError:
                raise
            except (OSError, DBAPIError, PoolTimeout) as exc:
                gone, waited = unreachable(exc), clock() - start
                if gone is None and isinstance(exc, DBAPIError) and _refusal(exc):
                    raise SchemaError(f"{where} refused the gateway ({error_code(exc)}): check "
                                      "CTSCREEN_DATABASE_URL, its user, password and database name.") from None
                if gone is None:  # a migration's statement or the check failed: its error, without its message
                    logger.error("%s: the schema upgrade or check failed", where, exc_info=withheld(exc))
                    cause = error_code(exc) if isinstance(exc, DBAPIError) else type(exc).__name__
                    raise SchemaError(f"{where}: the schema upgrade or check failed ({cause}); the log above "
                                      "names the statement's error.") from None
                if waited >= wait_s:
                    raise SchemaError(f"{where} did not answer{f' in {waited:.0f} s' if wait_s else ''}: {gone} "
                                      "Check CTSCREEN_DATABASE_URL and that the database runs "
                                      "(CTSCREEN_DB_START_WAIT_S: how long a start waits for it).") from None
                if waited - said >= every_s:
                    said = waited
                    logger.warning("%s does not answer yet (%s); waiting up to %.0f s more", where, gone,
                                   wait_s - waited)
            if stop.wait(min(1.0, max(0.0, wait_s - (clock() - start)))):
                _stopped(where, received)
    if received:  # one that came as the last attempt succeeded (the handler before ours never saw it): stop still
        _stopped(where, received)
    if said >= 0:
        logger.warning("%s answers after %.0f s", where, clock() - start)
