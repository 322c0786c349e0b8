"""Where instance bytes live: a small interface, and a folder implementation.

:class:`FolderBlobs` writes each blob to a temporary file, fsyncs it, renames it into place and fsyncs
the folder, so a blob is durable when :meth:`~FolderBlobs.put` returns (the gateway acknowledges an
instance only after that). On Kubernetes the folder is a ReadWriteMany volume shared by every gateway
replica. :class:`S3Blobs` keeps them in an S3 bucket instead (AWS, MinIO, Ceph), for clusters without one.

Keys are relative paths made by :func:`new_key` or :func:`new_keys` (``ab/`` and 32 hex digits: one of 256 folders,
an upload's files in one); a key never comes from a client.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

_T = TypeVar("_T")
_IO_THREADS = 4

logger = logging.getLogger(__name__)


def filesystem_now(folder: Path) -> float:
    """The time by the clock that stamps files in ``folder``: the mtime of a probe file touched there.

    Ages of files are mtimes compared with "now"; on a folder shared by several replicas (an NFS or CSI
    volume) the file server's clock sets the mtimes, so a replica whose own clock runs ahead of it must
    not see a file written a moment ago as old."""
    probe = folder / ".ctscreen-clock"
    probe.touch()  # sets its mtime to now when it exists
    return probe.stat().st_mtime


def sweep_stale(root: Path, pattern: str, max_age_s: float, now: float | None = None) -> int:
    """Remove the entries of ``root`` matching ``pattern`` (files, or folders with what they hold) last changed
    more than ``max_age_s`` ago; return how many. Ages are by the clock that stamps the folder's files
    (:func:`filesystem_now`; ``now`` overrides it), not this process's: ``root`` may be shared."""
    if not root.is_dir():
        return 0
    cutoff = (filesystem_now(root) if now is None else now) - max_age_s
    removed = 0
    for path in root.glob(pattern):
        try:
            if path.stat().st_mtime < cutoff:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink()
                removed += 1
        except OSError:  # removed meanwhile (another replica, or its owner)
            continue
    return removed


class BlobStore(Protocol):
    """Durable bytes under a key (blocking calls: run them off the event loop)."""

    @property
    def root(self) -> Path | str:
        """Where the blobs are, as messages name it: the folder, or ``s3://bucket/prefix``."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``; durable when this returns."""

    def put_many(self, items: Sequence[tuple[str, bytes | Path]]) -> None:
        """Store several blobs, each given as bytes or as a file whose content is stored (the file stays the
        caller's); all durable when this returns, none stored when it raises."""

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; :class:`FileNotFoundError` when there are none."""

    def delete(self, key: str) -> None:
        """Remove ``key`` (no error when it is absent)."""

    def set_aside(self, key: str) -> None:
        """Move ``key`` out of the live blobs, where it stays, restorable by hand, until
        :meth:`purge_set_aside` ages it out (no error when it is absent)."""

    def purge_set_aside(self, age_s: float, later_s: float = 0.0) -> int:
        """Delete what was set aside more than ``age_s`` seconds ago (``later_s``: as for :meth:`older_than`);
        returns how many."""

    def writable(self) -> bool:
        """Whether new blobs can be stored now (the readiness probe asks)."""

    def exists(self, key: str) -> bool:
        """Whether a blob is stored under ``key``."""

    def empty(self) -> bool:
        """Whether no blob is stored at all (what was set aside aside)."""

    def shards(self) -> list[str]:
        """The parts the keys are spread over (:meth:`older_than` lists one at a time, so that the orphan
        sweep holds one part's keys, not a million)."""

    def older_than(self, age_s: float, later_s: float = 0.0, shard: str | None = None) -> list[str]:
        """Keys of the blobs (of ``shard``, else of all) last written more than ``age_s`` seconds before now
        (by the store's own clock: on a shared volume, the file server's), or ``later_s`` seconds from now (a
        test's way to let time pass): what the orphan sweep checks. Leftovers of writes that never finished
        (a process died mid-write) that old go."""


_NEW_KEY = re.compile(r"[0-9a-f]{2}/[0-9a-f]{32}")
_STAGED = re.compile(r"\.[0-9a-f]{32}\.\d+\.\d+\.tmp")  # FolderBlobs._stage's temporary files


SET_ASIDE = "orphans"
"""The folder (in the blob folder) where the orphan sweep moves the blobs nothing names."""


def delete_each(blobs: BlobStore, keys: Sequence[str], stop: threading.Event | None = None) -> tuple[int, str] | None:
    """Delete these blobs, each one tried whatever the others did; ``(how many failed, the first error)``, or None
    when none did. ``stop`` set: no more deletes (a shut-down; what is left, named by nothing now, goes to the
    orphan sweep)."""
    failed, first = 0, ""
    for key in keys:
        if stop is not None and stop.is_set():
            break
        try:
            blobs.delete(key)
        except OSError as exc:
            failed, first = failed + 1, first or (exc.strerror or type(exc).__name__)
    return (failed, first) if failed else None


def new_key() -> str:
    """A fresh key, spread over 256 sub-folders."""
    return new_keys(1)[0]


def new_keys(n: int) -> list[str]:
    """``n`` fresh keys in one of the 256 sub-folders (chosen at random): an upload's files stored together
    sync one folder, not one each (a 60-file upload touched ~50 folders: 21 -> 10 ms of CPU to store it,
    measured here; a 300-file one ~200). Uploads still spread over the folders."""
    folder = uuid.uuid4().hex[:2]
    return [f"{folder}/{uuid.uuid4().hex}" for _ in range(n)]


class FolderBlobs:
    """Blobs as files under ``root`` (created when missing).

    Parameters
    ----------
    root : Path
        The folder; every gateway replica of a cluster must see the same one.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = self.root.resolve()

    def _path(self, key: str) -> Path:
        if _NEW_KEY.fullmatch(key):  # the keys new_key makes cannot leave the folder: no resolve() (two stat per part)
            return self._root / key
        path = (self.root / key).resolve()
        if self._root not in path.parents:
            raise ValueError(f'Argument "key" must stay inside the blob folder, got {key!r}.')
        return path

    def put(self, key: str, data: bytes) -> None:
        self.put_many([(key, data)])

    def put_many(self, items: Sequence[tuple[str, bytes | Path]]) -> None:
        # all or none: each blob is staged (a temporary file, fsynced) before any is renamed into place, and
        # a failure removes the staged files. The flushes run in 4 threads, as do the folders' (a 300-file
        # upload touches ~200 of the 256 folders): the disk takes concurrent flushes together (300 files of
        # 0.5 MiB: 0.33 -> 0.22 s wall for the same CPU, measured here; 8 threads: no faster, more CPU)
        if not items:
            return
        staged: list[tuple[Path, Path]] = []
        placed: list[Path] = []
        try:
            if len(items) == 1:
                staged.append(self._stage(*items[0]))
            else:
                futures = _each(self._stage, items, "blob")
                staged = [f.result() for f in futures if f.exception() is None]
                failed = next((f.exception() for f in futures if f.exception() is not None), None)
                if failed is not None:  # nothing is renamed into place
                    raise failed
            for tmp, path in staged:
                os.replace(tmp, path)
                placed.append(path)
            folders = {path.parent for _, path in staged}
            if len(folders) == 1:
                _fsync_dir(folders.pop())
            else:  # the renames are durable once their folders are synced
                for done in _each(_fsync_dir, [(f,) for f in folders], "folder"):
                    done.result()
        except BaseException:  # take back what was put in place and the staged files
            for path in placed:
                path.unlink(missing_ok=True)
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise

    def _stage(self, key: str, data: bytes | Path) -> tuple[Path, Path]:
        """``key``'s content in a fsynced temporary file beside its place: ``(temporary, final)``."""
        path = self._path(key)
        folder = path.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            if isinstance(data, Path):
                # a spooled upload: a second name for the same file when it is on this file system (the
                # caller never writes it again), else a streamed copy; never read into memory
                try:
                    os.link(data, tmp)  # the spool file's mtime, a fresh ctime (see older_than)
                except OSError:
                    shutil.copyfile(data, tmp)
                os.chmod(tmp, 0o640)  # as a blob written from bytes
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return tmp, path
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, path

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def path(self, key: str) -> Path:
        """The file that holds ``key`` (it may not exist): readers that take a file need not load the bytes."""
        return self._path(key)

    def writable(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK | os.X_OK)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def empty(self) -> bool:
        for name in self.shards():
            with os.scandir(self._root / name) as entries:
                if any(entry.is_file(follow_symlinks=False) for entry in entries):
                    return False
        return True

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def set_aside(self, key: str) -> None:
        # orphans/<key>: the same file system, so a rename; an operator restores with a rename back
        src = self._path(key)
        dst = self._root / SET_ASIDE / src.relative_to(self._root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            return
        os.utime(dst)  # its time in orphans/ counts from now

    def purge_set_aside(self, age_s: float, later_s: float = 0.0) -> int:
        folder = self._root / SET_ASIDE
        if not folder.is_dir():
            return 0
        when = filesystem_now(self._root) + later_s - age_s
        gone = 0
        for path in folder.glob("*/*"):
            try:
                if path.is_file() and path.stat().st_mtime < when:
                    path.unlink()
                    gone += 1
            except FileNotFoundError:  # another replica purged it
                continue
        return gone

    def shards(self) -> list[str]:
        """The two-hex-digit folders :func:`new_key` spreads keys over (those that exist)."""
        return sorted(f.name for f in self._root.iterdir() if len(f.name) == 2 and f.is_dir())

    def older_than(self, age_s: float, later_s: float = 0.0, shard: str | None = None) -> list[str]:
        when = filesystem_now(self._root) + later_s - age_s
        # only the layout new_key makes: a file of another shape is not ours to judge
        keys = []
        for name in self.shards() if shard is None else [shard]:
            folder = self._root / name
            try:
                entries = os.scandir(folder)
            except FileNotFoundError:  # removed meanwhile (or never made)
                continue
            with entries:
                for entry in entries:
                    try:
                        # a blob linked from a spooled upload keeps the spool file's mtime, but the link and
                        # the rename into place set its ctime, which nothing can set back
                        st = entry.stat(follow_symlinks=False) if entry.is_file(follow_symlinks=False) else None
                        old = st is not None and max(st.st_mtime, st.st_ctime) < when
                    except FileNotFoundError:  # deleted meanwhile
                        continue
                    if not old:
                        continue
                    if _NEW_KEY.fullmatch(key := f"{name}/{entry.name}"):
                        keys.append(key)
                    elif _STAGED.fullmatch(entry.name):  # a staged file whose writer died
                        Path(entry.path).unlink(missing_ok=True)
        return sorted(keys)


class S3Blobs:
    """Blobs as objects of an S3 bucket (AWS S3, MinIO, Ceph RGW, any S3 API): no ReadWriteMany volume.

    A PUT is durable when S3 answers it, so :meth:`put_many` returns once every object is answered (4 at a time)
    and deletes the ones stored when any fails (all or none, as :class:`FolderBlobs`). Keys are ``prefix`` +
    the key; what the orphan sweep sets aside goes to ``prefix + "orphans/"`` (a copy, then a delete: S3 has
    no rename). Objects' ages are their Last-Modified (the S3 server's clock) against this machine's clock:
    the orphan sweep's hour of grace dwarfs any skew. The client is MinIO's (``minio``: S3's whole API for any
    S3 store, and no pin on ``python-dateutil``, which botocore's would fight the Kubernetes client over).
    Credentials, first found: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``), MinIO's
    ``MINIO_ACCESS_KEY`` / ``MINIO_SECRET_KEY``, ``~/.aws/credentials``, then a web identity (IRSA:
    ``AWS_WEB_IDENTITY_TOKEN_FILE`` and ``AWS_ROLE_ARN``) or the instance's or task's role.

    Parameters
    ----------
    bucket : str
        The bucket (it must exist: ctscreen never creates one).
    prefix : str
        Where the keys start in it (``""``, or a folder such as ``ctscreen/prod``).
    endpoint_url : str | None
        A non-AWS endpoint (MinIO, Ceph: ``https://minio.example:9000``); None for AWS (``region``'s endpoint).
    region : str | None
        The bucket's region (None: asked of the server once).
    client : Any
        A ``minio.Minio`` client to use instead of making one (tests).
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None,
                 client: Any = None) -> None:
        if not bucket:
            raise ValueError('Argument "bucket" must not be empty.')
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.root = f"s3://{bucket}/{self.prefix}"
        """Where the blobs are, as a URL (logs, the CLI's summary)."""
        self.client = client if client is not None else s3_client(endpoint_url, region)

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None, region: str | None = None) -> S3Blobs:
        """The store of ``s3://bucket[/prefix]`` (ValueError for another URL, :func:`split_blob_url`)."""
        return cls(*split_blob_url(url), endpoint_url=endpoint_url, region=region)

    def _key(self, key: str) -> str:
        if not _NEW_KEY.fullmatch(key):  # keys are ours (new_keys): never a client's path
            raise ValueError(f"Not a blob key: {key!r}.")
        return self.prefix + key

    @staticmethod
    def _missing(exc: Exception) -> bool:
        return getattr(exc, "code", None) in ("NoSuchKey", "NoSuchObject")

    @contextlib.contextmanager
    def _answered(self, key: str = "") -> Iterator[None]:
        """S3's refusals and silences as the folder's errors: a missing object is :class:`FileNotFoundError`, anything
        else (unreachable, 5xx, throttled, refused credentials) an :class:`OSError` (EIO), which the callers already
        meet as a blob volume that failed (an upload's 503, a job tried again later): never an internal error."""
        try:
            yield
        except OSError:
            raise
        except Exception as exc:
            if key and self._missing(exc):
                raise FileNotFoundError(errno.ENOENT, "No such blob", key) from exc
            raise OSError(errno.EIO, f"The S3 store did not do it ({s3_reason(exc)})") from exc

    def put(self, key: str, data: bytes) -> None:
        self.put_many([(key, data)])

    def _put(self, key: str, data: bytes | Path) -> str:
        name = self._key(key)
        if isinstance(data, Path):  # a spooled upload: streamed from its file, never read into memory whole
            size = data.stat().st_size  # a file gone is the folder's FileNotFoundError, raised here
            with open(data, "rb") as fh, self._answered():
                self.client.put_object(self.bucket, name, fh, size, content_type="application/dicom")
        else:
            import io

            with self._answered():
                self.client.put_object(self.bucket, name, io.BytesIO(data), len(data),
                                       content_type="application/octet-stream")
        return key

    def put_many(self, items: Sequence[tuple[str, bytes | Path]]) -> None:
        if not items:
            return
        if len(items) == 1:
            self._put(*items[0])  # nothing else to take back when it fails
            return
        futures = _each(self._put, items, "s3")
        failed = next((f.exception() for f in futures if f.exception() is not None), None)
        if failed is None:
            return
        for done in futures:  # all or none: what was stored goes again
            if done.exception() is None:
                try:
                    self.delete(done.result())
                except Exception:  # noqa: BLE001 - left for the orphan sweep (nothing names it)
                    logger.warning("could not take back a blob of a failed write; the orphan sweep will")
        raise failed

    def get(self, key: str) -> bytes:
        name = self._key(key)
        with self._answered(key):
            response = self.client.get_object(self.bucket, name)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

    def download(self, key: str, path: Path) -> None:
        """``key``'s bytes written to the file ``path`` (a study read back for screening: its instances as files,
        a few slices' pixels at a time in memory, not the whole study); one GET, streamed."""
        name = self._key(key)
        with self._answered(key):
            response = self.client.get_object(self.bucket, name)
            try:
                with open(path, "xb") as fh:  # x: never into a folder removed and made again meanwhile
                    for chunk in response.stream(1 << 20):
                        fh.write(chunk)
            finally:
                response.close()
                response.release_conn()

    def writable(self) -> bool:
        try:
            there = bool(self.client.bucket_exists(self.bucket))
        except Exception as exc:  # noqa: BLE001 - unreachable, refused credentials: not ready
            logger.warning("blob bucket %s not usable: %s", self.bucket, s3_reason(exc))
            return False
        if not there:
            logger.warning("blob bucket %s does not exist (ctscreen never creates one)", self.bucket)
        return there

    def exists(self, key: str) -> bool:
        name = self._key(key)
        try:
            with self._answered(key):
                self.client.stat_object(self.bucket, name)
        except FileNotFoundError:
            return False
        return True

    def empty(self) -> bool:
        return not self.shards()  # a prefix is listed only while an object is under it

    def delete(self, key: str) -> None:
        name = self._key(key)
        with self._answered():
            self.client.remove_object(self.bucket, name)  # absent: S3 answers 204 all the same

    def set_aside(self, key: str) -> None:
        from minio.commonconfig import CopySource

        source = self._key(key)
        try:
            with self._answered(key):
                self.client.copy_object(self.bucket, f"{self.prefix}{SET_ASIDE}/{key}", CopySource(self.bucket, source))
        except FileNotFoundError:
            return
        with self._answered():
            self.client.remove_object(self.bucket, source)

    def _listed(self, prefix: str, before: float) -> list[str]:
        """The names of the objects under ``prefix`` last written before ``before`` (a Unix time)."""
        with self._answered():
            return [str(item.object_name) for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
                    if item.last_modified is not None and item.last_modified.timestamp() < before]

    def purge_set_aside(self, age_s: float, later_s: float = 0.0) -> int:
        gone = 0
        for name in self._listed(f"{self.prefix}{SET_ASIDE}/", time.time() + later_s - age_s):
            with self._answered():
                self.client.remove_object(self.bucket, name)
            gone += 1
        return gone

    def shards(self) -> list[str]:
        """The two-hex-digit folders :func:`new_key` spreads keys over (those that hold an object)."""
        with self._answered():
            names = [str(item.object_name)[len(self.prefix):].rstrip("/") for item in
                     self.client.list_objects(self.bucket, prefix=self.prefix, recursive=False) if item.is_dir]
        return sorted(name for name in names if re.fullmatch(r"[0-9a-f]{2}", name))

    def older_than(self, age_s: float, later_s: float = 0.0, shard: str | None = None) -> list[str]:
        before = time.time() + later_s - age_s
        keys = []
        for name in self.shards() if shard is None else [shard]:
            for full in self._listed(f"{self.prefix}{name}/", before):
                key = full[len(self.prefix):]
                if _NEW_KEY.fullmatch(key):  # only the layout new_key makes: another object is not ours to judge
                    keys.append(key)
        return sorted(keys)


def s3_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A ``minio.Minio`` client of ``endpoint_url`` (default AWS), with the credential chain of :class:`S3Blobs`."""
    from urllib.parse import urlsplit

    import certifi
    import urllib3
    from minio import Minio
    from minio.credentials import (
        AWSConfigProvider,
        ChainedProvider,
        EnvAWSProvider,
        EnvMinioProvider,
        IamAwsProvider,
    )

    if endpoint_url:
        parts = urlsplit(endpoint_url)
        endpoint, secure = parts.netloc, parts.scheme == "https"
    else:
        endpoint, secure = "s3.amazonaws.com", True
    # minio's own pool waits 300 s to connect and to read and tries 5 times: a bucket that takes connections and
    # never answers held a call (a readiness probe, an upload) for half an hour. Here: 5 s to connect (3 tries),
    # 30 s between bytes (a read that timed out is not sent again: the store may be doing it), 2 tries more on a
    # 5xx without waiting the Retry-After a busy MinIO asks (120 s), the last answer then read for S3's own error
    # code, and a connection for each of the threads that store at once. The credentials' fetches (IRSA's STS,
    # the instance's metadata) go through the same pool: an endpoint that hangs there held every call too.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=S3_CONNECT_TIMEOUT_S, read=S3_READ_TIMEOUT_S), maxsize=4 * _IO_THREADS,
        cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=3, connect=3, read=0, status=2, backoff_factor=0.2,
                              status_forcelist=[500, 502, 503, 504], respect_retry_after_header=False,
                              raise_on_status=False))
    chain = ChainedProvider([EnvAWSProvider(), EnvMinioProvider(), AWSConfigProvider(), IamAwsProvider(http_client=http)])
    return Minio(endpoint, secure=secure, region=region, credentials=chain, http_client=http)


S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 30.0


def s3_reason(exc: BaseException) -> str:
    """What an S3 call's error says, for a log line or a message: S3's error code (``NoSuchBucket``,
    ``AccessDenied``, ``SignatureDoesNotMatch``), else the error's type and text (no credential is in either)."""
    code = getattr(exc, "code", None)
    if code:
        return str(code)
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def split_blob_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket[/prefix]``; ValueError, saying why, for another URL or a bucket name S3
    refuses.

    >>> split_blob_url("s3://site-ct/ctscreen/prod")
    ('site-ct', '/ctscreen/prod')
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"must be s3://bucket[/prefix], got {url!r}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", parts.netloc):
        raise ValueError(f"names the bucket {parts.netloc!r}, which S3 refuses (3-63 lower-case letters, digits, "
                         "dots and hyphens)")
    return parts.netloc, parts.path


def open_blobs(folder: Path, url: str | None = None, *, endpoint_url: str | None = None,
               region: str | None = None) -> FolderBlobs | S3Blobs:
    """The blob store of the settings: an S3 bucket when ``url`` (``s3://bucket[/prefix]``) is given, else the
    folder."""
    if url:
        return S3Blobs.from_url(url, endpoint_url=endpoint_url, region=region)
    return FolderBlobs(folder)


def instance_sources(blobs: BlobStore, files: Sequence[tuple[str, str]], spool: Path | None = None,
                     stop: threading.Event | None = None) -> list[tuple[str, bytes | Path]]:
    """``(filename, content)`` of a study's instances (``(filename, blob key)`` each): their files when the
    blob store keeps files (a reader then reads what it needs: headers, the pixels of a few slices), the files
    they are downloaded to in ``spool`` from an S3 bucket, else their bytes.

    Raises
    ------
    FileNotFoundError
        An instance's blob is missing (its name is the missing file's).
    OSError
        The store failed a read (:class:`InterruptedError` once ``stop`` is set: no file is written after).
    """
    if isinstance(blobs, FolderBlobs):
        paths = [(name, blobs.path(key)) for name, key in files]
        for _, path in paths:
            if not path.is_file():
                raise FileNotFoundError(2, "No such blob", path.name)
        return list(paths)
    if spool is not None and isinstance(blobs, S3Blobs):  # each instance to a file of the spool (its caller's to remove)
        halt = threading.Event()  # one read failed: the study cannot be read now, fetch no more of it

        def fetch(i: int, key: str) -> None:
            if (stop is not None and stop.is_set()) or halt.is_set():  # the caller gave up (a lost lease, a
                raise InterruptedError(errno.EINTR, "The read of the study was stopped")  # shut-down), or one failed
            try:
                blobs.download(key, spool / f"{i:06d}.dcm")
            except BaseException:
                halt.set()
                raise

        done = _each(fetch, [(i, key) for i, (_, key) in enumerate(files)], "s3-read") if files else []
        errors = [f.exception() for f in done if f.exception() is not None]  # the first real one, not a halt's
        failed = next((e for e in errors if not isinstance(e, InterruptedError)), errors[0] if errors else None)
        if failed is not None:
            raise failed
        return [(name, spool / f"{i:06d}.dcm") for i, (name, _) in enumerate(files)]
    return [(name, blobs.get(key)) for name, key in files]


def _each(fn: Callable[..., _T], args: Sequence[tuple[Any, ...]], what: str) -> list[Future[_T]]:
    """``fn(*a)`` for each ``a`` in up to ``_IO_THREADS`` threads (blocking I/O); returns once every call ended."""
    with ThreadPoolExecutor(min(_IO_THREADS, len(args)), thread_name_prefix=f"ctscreen-{what}") as pool:
        return [pool.submit(fn, *a) for a in args]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
