"""Schema migrations of the state store (Alembic; the scripts ship inside the package).

``ctscreen serve`` and the gateway upgrade the schema at start (``CTSCREEN_DB_MIGRATE``, on by
default); ``ctscreen db upgrade`` does it alone (the Helm chart's pre-install / pre-upgrade Job).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from gateway.store.store import async_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = async_url(url)
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (blocking: it runs its own event loop)."""
    if url.startswith("sqlite"):
        path = async_url(url).split(":///", 1)[1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(_config(url), revision)


def head() -> str:
    """The newest revision shipped."""
    return ScriptDirectory.from_config(_config("sqlite://")).get_current_head() or ""


async def current(engine: object) -> str | None:
    """The revision of the database behind an async ``engine`` (None: never migrated)."""
    async with engine.connect() as connection:  # type: ignore[attr-defined]
        return await connection.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
