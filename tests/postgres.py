"""A real PostgreSQL server for the tests: Debian's ``postgresql`` (installed by ``scripts/setup.sh --test``).

:class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` in a temporary folder (as the ``postgres`` user
when the tests run as root, as PostgreSQL refuses root), on a free loopback port with trust
authentication, and stops and removes it at the end. :meth:`PostgresServer.new_database` gives each
test a database of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

from ctscreen.embedded import free_port


def pg_bin() -> Path | None:
    """The folder of ``initdb`` / ``pg_ctl`` (newest Debian version), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder (see the module docstring)."""

    def __init__(self) -> None:
        bindir = pg_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (scripts/setup.sh --test installs Debian's postgresql)")
        self.bin = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ctscreen-pg-"))
        self.data = self.root / "data"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=200 -c shared_buffers=32MB")
        self._options = options
        self._start()

    def _start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", self._options, "-w",
                  "-t", "60", "start")

    def restart(self, away_s: float) -> None:
        """Stop the server (``fast``: its connections are cut, as in a restart or a fail-over), leave it down for
        ``away_s`` seconds (connections refused), and start it again on the same port with the same data."""
        self._halt()
        time.sleep(away_s)
        self._start()

    def down_for(self, away_s: float) -> threading.Thread:
        """:meth:`restart` that returns once the server is stopped: it is started again ``away_s`` seconds later on
        the thread returned (join it)."""
        self._halt()

        def back() -> None:
            time.sleep(away_s)
            self._start()

        thread = threading.Thread(target=back, name="postgres-back", daemon=True)
        thread.start()
        return thread

    def _halt(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
