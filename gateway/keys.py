"""API keys for machines: stored hashed, shown once, revocable; and ``ctscreen keys add|list|revoke``.

A key reads ``cts_<id>_<secret>``: ``id`` (12 hex digits) names the record, ``secret`` is 32 random
bytes (base64url). Only ``scrypt(secret, salt)`` is stored, in a JSON file (``CTSCREEN_AUTH_API_KEYS_FILE``,
mode 0600, written by temp file + rename). The file is re-read when its modification time changes, so a
key revoked with ``ctscreen keys revoke`` stops working at the next request of a running gateway.
A verified key is remembered in memory (by a SHA-256 of the whole key) until the file changes, so scrypt
runs once per key and file version, not once per request. An unknown or revoked id costs the same scrypt as
a wrong secret (a hash with a dummy salt), so timing does not tell which ids exist; the gateway runs these
checks on threads of their own, a few at a time, and stops hashing for an id that failed too often
(:class:`gateway.auth.KeyChecks`).

When the database state store of issue 13 is merged, the records move into it (a ``api_keys`` table
with the same fields); the file stays as the import/export format of the command.

::

    ctscreen keys add pacs-router --scopes studies:write results:read   # prints the key once
    ctscreen keys list
    ctscreen keys revoke <id>
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["SCOPES", "ApiKey", "KeyStore", "main"]

SCOPES = ("studies:write", "results:read", "admin")
"""Every scope a key or token may carry; ``admin`` implies the other two."""
PREFIX = "cts_"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
_DUMMY_SALT = secrets.token_bytes(16)  # an unknown id is hashed with it: as slow as a known id's wrong secret


@dataclass(frozen=True)
class ApiKey:
    """One stored key (never the key itself)."""

    id: str
    name: str
    scopes: tuple[str, ...]
    salt: str
    hash: str
    created_at: float
    revoked_at: float | None = None


def _hash(secret: str, salt: bytes) -> str:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT).hex()


def parse_key(key: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a key of the ``cts_<id>_<secret>`` form, else None.

    >>> parse_key("cts_0123456789ab_c2VjcmV0"), parse_key("eyJhbGciOi...")
    (('0123456789ab', 'c2VjcmV0'), None)
    """
    if not key.startswith(PREFIX):
        return None
    key_id, sep, secret = key[len(PREFIX):].partition("_")
    if not sep or len(key_id) != 12 or not all(c in "0123456789abcdef" for c in key_id) or not secret:
        return None
    return key_id, secret


class KeyStore:
    """The API keys in ``path`` (a JSON file; created on the first :meth:`add`).

    Parameters
    ----------
    path : Path
        The key file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: int | None = None
        self._keys: dict[str, ApiKey] = {}
        self._verified: dict[bytes, str] = {}  # sha256(key) -> id, for the current file version

    # --- reading -----------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        except OSError as exc:  # a folder the process may not search, a file where a folder should be
            raise ValueError(f"API key file {self.path} cannot be read: {exc.strerror or exc}") from exc
        if mtime == self._mtime and (mtime is not None or not self._keys):
            return
        keys: dict[str, ApiKey] = {}
        if mtime is not None:
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
                    raise ValueError('it must hold a JSON object {"keys": [...]}, as "ctscreen keys add" writes')
                for row in data.get("keys", []):
                    scopes = row["scopes"]
                    # a hand-edited "scopes": "admin" was split into letters: a key of no scope, 403 everywhere
                    if not isinstance(scopes, list) or not scopes or any(x not in SCOPES for x in scopes):
                        raise ValueError(f'the scopes of key {str(row.get("id"))[:12]!r} must be a list of some of '
                                         f'{", ".join(SCOPES)}, got {str(scopes)[:60]!r}')
                    row["scopes"] = tuple(scopes)
                    keys[row["id"]] = ApiKey(**row)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"API key file {self.path} cannot be read: {exc}") from exc
        self._keys, self._mtime, self._verified = keys, mtime, {}

    def keys(self) -> list[ApiKey]:
        """Every key record, revoked ones included."""
        with self._lock:
            self._load()
            return list(self._keys.values())

    def _active(self, key_id: str, digest: bytes) -> tuple[ApiKey | None, bool]:
        """``(the id's active record or None, whether the key of this digest was verified)`` under the key file's
        current version."""
        with self._lock:
            self._load()
            record = self._keys.get(key_id)
            if record is None or record.revoked_at is not None:
                return None, False
            return record, self._verified.get(digest) == key_id

    def cached(self, key: str) -> ApiKey | None:
        """The active record of ``key`` when this very key was verified under the file's current version
        (no scrypt), else None (it may still verify: ask :meth:`verify`)."""
        parsed = parse_key(key)
        if parsed is None:
            return None
        record, verified = self._active(parsed[0], hashlib.sha256(key.encode()).digest())
        return record if verified else None

    def verify(self, key: str) -> ApiKey | None:
        """The active record of ``key``, or None (unknown, malformed, wrong secret or revoked).

        An unknown or revoked id is hashed all the same (with a dummy salt): it takes as long as a wrong
        secret of a known id.
        """
        parsed = parse_key(key)
        if parsed is None:
            return None
        key_id, secret = parsed
        digest = hashlib.sha256(key.encode()).digest()
        record, verified = self._active(key_id, digest)
        if verified:
            return record
        if record is None:  # unknown or revoked
            _hash(secret, _DUMMY_SALT)  # outside the lock, like a real check
            return None
        expected = _hash(secret, bytes.fromhex(record.salt))  # scrypt outside the lock
        if not hmac.compare_digest(expected, record.hash):
            return None
        with self._lock:
            self._verified[digest] = key_id
        return record

    # --- writing (the command) ---------------------------------------------------------------
    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Hold this process's lock and an exclusive lock on ``<file>.lock`` (every writer's, across processes)
        and read the file afresh: two ``ctscreen keys revoke`` at once each rewrote the file they had read, so a
        revocation reported done could be lost, and both wrote one temporary file (a reader saw half of it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._mtime = None  # another process may have changed it within this mtime's granularity
                self._load()
                yield
            finally:
                os.close(fd)  # and the lock with it

    def _save(self) -> None:
        """Write the keys to a temporary file of its own beside the file, sync it, and rename it into place."""
        rows = [{**asdict(k), "scopes": list(k.scopes)} for k in self._keys.values()]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": 1, "keys": rows}, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename too: a revocation reported done survives a crash
        finally:
            os.close(dir_fd)
        self._mtime = None  # re-read at the next use

    def add(self, name: str, scopes: list[str]) -> tuple[str, ApiKey]:
        """Make a key; returns ``(the key, its record)``. The key itself is not stored anywhere."""
        if not name.strip() or len(name) > 64:
            raise ValueError(f'Argument "name" must be 1 to 64 characters, got {name!r}.')
        bad = [s for s in scopes if s not in SCOPES]
        if bad or not scopes:
            raise ValueError(f'Argument "scopes" must be some of {", ".join(SCOPES)}, got {scopes}.')
        key_id, secret = secrets.token_hex(6), base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        salt = secrets.token_bytes(16)
        record = ApiKey(key_id, name.strip(), tuple(dict.fromkeys(scopes)), salt.hex(), _hash(secret, salt),
                        time.time())
        with self._changing():
            self._keys[key_id] = record
            self._save()
        return f"{PREFIX}{key_id}_{secret}", record

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key by id (or by name when one active key has it); returns its record."""
        with self._changing():
            record = self._keys.get(key_id)
            if record is None:
                named = [k for k in self._keys.values() if k.name == key_id and k.revoked_at is None]
                if len(named) != 1:
                    raise KeyError(f"No API key with id {key_id!r}" + (" (several have that name)" if named else ""))
                record = named[0]
            if record.revoked_at is None:
                record = ApiKey(**{**asdict(record), "revoked_at": time.time()})
                self._keys[record.id] = record
                self._save()
            return record


# --- ctscreen keys -----------------------------------------------------------------------------
def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def main(argv: list[str]) -> int:
    """``ctscreen keys add NAME --scopes ...|list|revoke ID``."""
    file_help = "the key file (default $CTSCREEN_AUTH_API_KEYS_FILE); the gateway reads the same file"
    p = argparse.ArgumentParser(prog="ctscreen keys", description="API keys of the gateway (stored hashed).")
    p.add_argument("--file", type=Path, default=os.environ.get("CTSCREEN_AUTH_API_KEYS_FILE"), help=file_help)
    # --file after the command too (ctscreen keys add NAME --scopes ... --file PATH); unset there, the one
    # before the command (or the environment's) stands
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--file", type=Path, default=argparse.SUPPRESS, help=file_help)
    sub = p.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", parents=[after], help="make a key and print it once")
    add.add_argument("name", help="who uses the key (a machine: pacs-router, ris-bridge)")
    add.add_argument("--scopes", nargs="+", required=True, choices=SCOPES, help="what the key may do")
    sub.add_parser("list", parents=[after], help="list keys (never the keys themselves)")
    rev = sub.add_parser("revoke", parents=[after], help="revoke a key by id (or by name)")
    rev.add_argument("id", help="the key's id (as list shows it), or its name")
    args = p.parse_args(argv)
    if args.file is None:
        p.error("no key file: pass --file PATH or set CTSCREEN_AUTH_API_KEYS_FILE")
    store = KeyStore(args.file)
    try:
        if args.cmd == "add":
            key, record = store.add(args.name, args.scopes)
            try:
                _out(key)
                sys.stdout.flush()  # a pipe is buffered: a reader that left shows here
            except BaseException:  # never shown (ctscreen.cli.ReaderLeft, an interrupt): a key nobody holds goes
                store.revoke(record.id)
                sys.stderr.write(f"ctscreen keys: key {record.id} ({record.name}) could not be shown and is revoked; "
                                 "add it again\n")
                raise
            sys.stderr.write(f"key {record.id} ({record.name}: {' '.join(record.scopes)}) added to {args.file}; "
                             "it is shown only this once\n")
        elif args.cmd == "list":
            if not args.file.exists():  # a mistyped --file listed an empty table, exit 0
                raise ValueError(f"no API key file at {args.file} ('ctscreen keys add' creates it)")
            _out(f"{'id':<12}  {'name':<24}  {'scopes':<40}  {'created (UTC)':<19}  state")
            for k in store.keys():
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k.created_at))
                state = "active" if k.revoked_at is None else "revoked " + time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.gmtime(k.revoked_at))
                _out(f"{k.id:<12}  {k.name:<24}  {' '.join(k.scopes):<40}  {created:<19}  {state}")
        else:
            record = store.revoke(args.id)
            sys.stderr.write(f"key {record.id} ({record.name}) revoked\n")
    except (ValueError, KeyError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) else str(exc)
        sys.stderr.write(f"ctscreen keys: {msg}\n")
        return 1
    return 0
