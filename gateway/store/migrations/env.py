"""Alembic environment of the state store: the URL comes from ``config.attributes["url"]``.

Runs on the async engine the gateway uses (aiosqlite or asyncpg). On PostgreSQL the migration holds
a transaction-level advisory lock, so replicas (or the Helm hook and a replica) that upgrade at the
same moment run one after the other. Once it holds that lock, each statement waits at most
``config.attributes["lock_timeout_s"]`` for a table lock: an ALTER TABLE queued behind a long
transaction would otherwise hold every query of the service behind it, for as long as it waits. The
migration fails instead (its transaction rolls back whole) and is run again (the Helm hook's retries,
the next gateway start).

On SQLite the whole upgrade is one transaction too (``BEGIN IMMEDIATE``, the driver's own transaction
handling off, as the state store does): pysqlite commits DDL statement by statement, so a migration
that failed half-way left tables it had made behind, and every later try failed on them.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.store.models import Base

MIGRATION_LOCK = 0x63747363  # "ctsc": the advisory lock key of migrations
LOCK_TIMEOUT_S = 10.0  # the longest a migration statement waits for a table lock

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=sqlite,
                      transactional_ddl=True)  # one transaction for the whole upgrade, SQLite too
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            timeout_ms = int(1000 * context.config.attributes.get("lock_timeout_s", LOCK_TIMEOUT_S))
            connection.execute(text(f"SET LOCAL lock_timeout = {timeout_ms}"))
        context.run_migrations()


def _no_driver_transactions(dbapi_connection: object, _record: object) -> None:
    dbapi_connection.isolation_level = None  # type: ignore[attr-defined]  # the "begin" event emits BEGIN


async def _online(url: str) -> None:
    engine = create_async_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _no_driver_transactions)
        event.listen(engine.sync_engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


url = context.config.attributes["url"]
if context.is_offline_mode():
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_online(url))
