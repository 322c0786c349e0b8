"""Expand uploads into ``(filename, bytes)`` pairs, safely.

An upload is either one file (a DICOM instance) or one zip archive holding many. Zip archives are
checked before anything is expanded and again while expanding, because the sizes a zip declares
can lie:

* member names: absolute paths, drive letters, ``..`` components, NUL bytes and symbolic links are
  refused as :class:`~gateway.errors.UnsafePath` (we never write members to disk, but a name is
  echoed back to clients and logs, and an archive that tries this is hostile);
* sizes: the upload, each member, the sum of members and the member count have limits
  (:class:`~gateway.errors.TooLarge`);
* zip bombs: a member whose expansion ratio is far above what DICOM reaches (lossless CT compresses
  about 2-4x; a run of zeros 1000x), or an archive whose expanded total passes the limit, is
  refused as :class:`~gateway.errors.ZipBomb`; expansion stops at the limit even when the
  declared sizes lie;
* archives inside archives are refused (:class:`~gateway.errors.BadArchive`).

:class:`MultipartSplitter` splits a ``multipart/*`` body into parts as it arrives, into files
(:class:`FilePart`), so that an upload's parts are never held in memory; :func:`spool_multipart` does it
for a whole ``multipart/related`` body (DICOMweb STOW-RS).
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from email.utils import collapse_rfc2231_value
from pathlib import Path
from typing import IO, Any, TypeVar, overload

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser

from gateway.errors import BadArchive, TooLarge, Unavailable, UnsafePath, UploadError, ZipBomb

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

__all__ = ["UploadLimits", "gathered", "in_thread", "is_zip", "iter_upload", "new_spool", "spool_multipart",
           "spooling_failed", "sweep_spools"]

MiB = 1024 * 1024
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # local file header; empty archive
_SKIPPED_NAMES = re.compile(
    r"(^|/)(__MACOSX/|\.DS_Store$|Thumbs\.db$|desktop\.ini$|DICOMDIR$)", re.IGNORECASE
)
"""Zip members skipped silently: desktop junk and DICOMDIR (a CD index, not an image)."""
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 * MiB


@dataclass(frozen=True)
class UploadLimits:
    """Limits applied to one upload.

    Attributes
    ----------
    max_upload_bytes : int
        Largest upload body (a single file, or the zip as sent).
    max_file_bytes : int
        Largest single file after expansion (a 512x512x2 CT slice is ~0.5 MiB; an enhanced
        multi-frame CT of 1000 frames ~0.5 GiB).
    max_total_bytes : int
        Largest sum of expanded members of one zip.
    max_files : int
        Most members in one zip (directories not counted).
    max_ratio : float
        Largest expansion ratio (uncompressed / compressed) of a member above ``ratio_floor_bytes``.
    ratio_floor_bytes : int
        Members smaller than this are not ratio-checked (tiny files compress oddly).
    """

    max_upload_bytes: int = 2048 * MiB
    max_file_bytes: int = 1024 * MiB
    max_total_bytes: int = 4096 * MiB
    max_files: int = 5000
    max_ratio: float = 100.0
    ratio_floor_bytes: int = 1 * MiB

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_file_bytes", "max_total_bytes", "max_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f'Argument "{name}" must be positive, got {getattr(self, name)}.')
        if self.max_ratio <= 1:
            raise ValueError(f'Argument "max_ratio" must be > 1, got {self.max_ratio}.')


def is_zip(data: bytes | Path) -> bool:
    """Return whether ``data`` (bytes, or a file) starts like a zip archive."""
    if isinstance(data, Path):
        with open(data, "rb") as fh:
            return fh.read(4) in _ZIP_MAGIC
    return data[:4] in _ZIP_MAGIC


@overload
def iter_upload(
    filename: str, data: bytes, limits: UploadLimits | None = None
) -> Iterator[tuple[str, bytes]]: ...


@overload
def iter_upload(
    filename: str, data: Path, limits: UploadLimits | None = None
) -> Iterator[tuple[str, bytes | Path]]: ...


def iter_upload(
    filename: str, data: bytes | Path, limits: UploadLimits | None = None
) -> Iterator[tuple[str, bytes]] | Iterator[tuple[str, bytes | Path]]:
    """Yield the files in one upload: the file itself, or every member of a zip archive.

    Parameters
    ----------
    filename : str
        Name the client gave the upload (used in messages and as the prefix of member names).
    data : bytes | pathlib.Path
        The upload body, or the file it was spooled to (an admitted body, a ``mmap``, is spooled first:
        ``gateway.api.studies``).
    limits : UploadLimits | None
        Limits to enforce; defaults to :class:`UploadLimits()`.

    Yields
    ------
    tuple[str, bytes | pathlib.Path]
        ``(name, content)``; members are named ``"<filename>/<member name>"``. A spooled file that is
        not a zip is yielded as its path (not read); zip members are yielded as bytes, one at a time.

    Raises
    ------
    gateway.errors.TooLarge, gateway.errors.ZipBomb, gateway.errors.UnsafePath,
    gateway.errors.BadArchive
        The upload breaks a limit or is not a safe archive. Raised before any member is yielded
        for everything the central directory declares, and during expansion when it lied.
    """
    limits = limits or UploadLimits()
    size = data.stat().st_size if isinstance(data, Path) else len(data)
    if size > limits.max_upload_bytes:
        raise TooLarge(
            f"Upload is {size} bytes; the limit is {limits.max_upload_bytes}.", filename=filename
        )
    if not is_zip(data):
        if size > limits.max_file_bytes:
            raise TooLarge(
                f"File is {size} bytes; the limit is {limits.max_file_bytes}.", filename=filename
            )
        if isinstance(data, Path):
            yield filename, data
            return
        yield filename, bytes(data)
        return
    if isinstance(data, Path):
        with open(data, "rb") as fh:  # read in place, a member at a time
            yield from _iter_zip(filename, fh, limits)
        return
    yield from _iter_zip(filename, data, limits)


def _check_member_name(archive: str, info: zipfile.ZipInfo) -> None:
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if "\x00" in name or name.startswith(("/", "\\")) or _DRIVE.match(name) or any(p == ".." for p in parts):
        raise UnsafePath(f"Zip member name {name!r} is absolute or leaves the archive.", filename=archive)
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_ISLNK(mode):  # 3: Unix
        raise UnsafePath(f"Zip member {name!r} is a symbolic link.", filename=archive)


MAX_ENTRIES_PER_FILE = 3
"""Entries a zip may list per member counted by ``max_files`` (plus 1000): its folders and the
``__MACOSX/`` twins of its files, which are not counted, may not make the listing itself the load."""


def declared_entries(fh: IO[bytes]) -> int | None:
    """How many entries the zip's end-of-central-directory record (zip64's when there is one) says its
    central directory lists, read before :class:`zipfile.ZipFile` parses every one; None when there is
    no such record (``ZipFile`` then says what is wrong)."""
    import struct

    size = fh.seek(0, io.SEEK_END)
    tail_len = min(size, 22 + 65535)  # the record, then a comment of up to 64 KiB
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    entries = struct.unpack_from("<H", tail, at + 10)[0]
    if entries == 0xFFFF and at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":  # zip64: its locator, then its record
        record_at = struct.unpack_from("<Q", tail, at - 20 + 8)[0]
        fh.seek(record_at)
        record = fh.read(56)
        if len(record) == 56 and record[:4] == b"PK\x06\x06":
            entries = struct.unpack_from("<Q", record, 32)[0]
    return int(entries)


def _check_no_overlap(archive: str, infos: list[zipfile.ZipInfo], directory_at: int) -> None:
    """Refuse a member whose declared compressed size runs into the next member's local header (or the
    central directory): a zip bomb's way to pass the expansion ratio, which divides by that size
    (Python 3.12's zipfile refuses such overlaps; 3.11's does not)."""
    ordered = sorted(infos, key=lambda i: i.header_offset)
    for info, after in zip(ordered, [*(i.header_offset for i in ordered[1:]), directory_at][: len(ordered)], strict=True):
        room = after - info.header_offset - 30  # its local header is 30 bytes and its name
        if info.compress_size > room:
            raise ZipBomb(f"Zip member {info.filename!r} declares {info.compress_size} compressed bytes, past the "
                          f"start of the next entry ({max(room, 0)} bytes on): overlapping entries are refused.",
                          filename=archive)


def _iter_zip(filename: str, data: bytes | IO[bytes], limits: UploadLimits) -> Iterator[tuple[str, bytes]]:
    # an open file is read in place
    fh = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        entries = declared_entries(fh)
        fh.seek(0)
    except (OSError, ValueError) as exc:
        raise BadArchive(f"Zip archive cannot be read: {exc}.", filename=filename) from exc
    most = MAX_ENTRIES_PER_FILE * limits.max_files + 1000
    if entries is not None and entries > most:
        raise TooLarge(f"Zip lists {entries} entries (folders and skipped names included); the limit is {most}.",
                       filename=filename)
    try:
        zf = zipfile.ZipFile(fh)
        infos = zf.infolist()
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        ValueError,
        OSError,
        EOFError,
    ) as exc:
        raise BadArchive(f"Zip archive cannot be read: {exc}.", filename=filename) from exc

    members = [i for i in infos if not i.is_dir() and not _SKIPPED_NAMES.search(i.filename)]
    for info in infos:
        _check_member_name(filename, info)
    _check_no_overlap(filename, infos, zf.start_dir)
    if len(members) > limits.max_files:
        raise TooLarge(f"Zip holds {len(members)} files; the limit is {limits.max_files}.", filename=filename)
    declared_total = 0
    for info in members:
        if info.flag_bits & 0x1:
            raise BadArchive(f"Zip member {info.filename!r} is encrypted.", filename=filename)
        if info.file_size > limits.max_file_bytes:
            raise TooLarge(
                f"Zip member {info.filename!r} expands to {info.file_size} bytes; "
                f"the limit is {limits.max_file_bytes}.",
                filename=filename,
            )
        _check_ratio(filename, info.filename, info.file_size, info.compress_size, limits)
        declared_total += info.file_size
    if declared_total > limits.max_total_bytes:
        raise ZipBomb(
            f"Zip expands to {declared_total} bytes; the limit is {limits.max_total_bytes}.",
            filename=filename,
        )

    total = 0
    for info in members:
        content = _read_member(zf, filename, info, limits, budget=limits.max_total_bytes - total)
        total += len(content)
        if is_zip(content):
            raise BadArchive(
                f"Zip member {info.filename!r} is itself an archive; nested archives are refused.",
                filename=filename,
            )
        yield f"{filename}/{info.filename}", content


def _check_ratio(archive: str, name: str, size: int, compressed: int, limits: UploadLimits) -> None:
    if size >= limits.ratio_floor_bytes and size > limits.max_ratio * max(compressed, 1):
        raise ZipBomb(
            f"Zip member {name!r} expands {size / max(compressed, 1):.0f}x "
            f"({compressed} -> {size} bytes); the limit is {limits.max_ratio:.0f}x.",
            filename=archive,
        )


def _read_member(
    zf: zipfile.ZipFile, archive: str, info: zipfile.ZipInfo, limits: UploadLimits, budget: int
) -> bytes:
    """Read one member in chunks, never past the limits, whatever its header declares. A member of one chunk
    (a slice) is that chunk: not copied again."""
    cap = min(limits.max_file_bytes, budget)
    chunks: list[bytes] = []
    size = 0
    try:
        with zf.open(info) as fh:
            while True:
                chunk = fh.read(_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > cap:
                    raise ZipBomb(
                        f"Zip member {info.filename!r} expands past {cap} bytes "
                        f"(it declared {info.file_size}).",
                        filename=archive,
                    )
                _check_ratio(archive, info.filename, size, info.compress_size, limits)
    except UploadError:
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile archive makes zipfile raise anything
        # BadZipFile: CRC mismatch or truncated data; zlib.error: corrupt deflate stream;
        # RuntimeError: encrypted; NotImplementedError: unknown method; ValueError: bad offsets.
        raise BadArchive(f"Zip member {info.filename!r} cannot be read: {exc}.", filename=archive) from exc
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def media_parameters(value: str, header: str = "content-type") -> dict[str, str]:
    """The parameters of a Content-Type (or ``header``: Content-Disposition) value, by lower-case name (the first
    of a name; any case, quoted or not, RFC 2231 too): parsed once as the ``email`` package parses it, not
    searched for (``boundary="type=x"`` named a STOW-RS body's type, and ``start-type=...`` too).

    >>> media_parameters('multipart/related; boundary="type=x"; type="application/dicom"').get("type")
    'application/dicom'
    >>> media_parameters('multipart/related; start-type=foo; boundary=abc').get("type") is None
    True
    >>> media_parameters('multipart/form-data; BOUNDARY=----x7MA4').get("boundary")
    '----x7MA4'
    >>> found = media_parameters("form-data; name=files; filename*=UTF-8''r%C3%A9sum%C3%A9.dcm", "content-disposition")
    >>> found["filename"], found["name"]
    ('résumé.dcm', 'files')
    """
    message = Message()
    message[header] = value
    found: dict[str, str] = {}
    for name, param in message.get_params(header=header) or ():
        found.setdefault(name, str(collapse_rfc2231_value(param)))
    return found


async def in_thread(fn: Callable[..., _T], *args: Any, on_cancel: Callable[[], object] | None = None) -> _T:
    """``fn(*args)`` in a worker thread, awaited to its end even when the awaiting task is cancelled meanwhile
    (the cancellation is raised once the thread is done): a cancelled await does not stop the thread, and
    what a caller does on cancellation (close the files the thread writes, abort a parse) must not run
    beside it. ``on_cancel()`` runs first on a cancellation (e.g. sets the flag that makes ``fn`` return soon)."""
    done = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        await asyncio.wait({done})
        raise


async def gathered(chunks: AsyncIterator[bytes], size: int = _CHUNK) -> AsyncIterator[bytes]:
    """``chunks`` joined into pieces of at least ``size`` bytes (the last one may be shorter).

    For bodies written to disk in a worker thread: a slow or stalled volume (an NFS server that hangs) must
    never stop the event loop, and a thread hop per megabyte costs nothing where one per 64 KiB read would.
    """
    # kept as a list and joined once: each byte is copied once (a bytearray grown by += and copied out by
    # bytes() copied each byte two or more times, and faulted in fresh pages: 8 % of the gateway's CPU a study)
    pending: list[bytes] = []
    held = 0
    async for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        if held >= size:
            yield b"".join(pending)
            pending, held = [], 0
    if pending:
        yield b"".join(pending)


async def spool_multipart(chunks: AsyncIterator[bytes], content_type: str, spool: Path, *,
                          max_parts: int = 10000, feed_bytes: int = _CHUNK) -> list[tuple[dict[str, str], Path]]:
    """Split a ``multipart/related`` (or any ``multipart/*``) body into its parts as it arrives, each written
    to a new file in ``spool`` (:class:`FilePart`): no part, and not the body, is ever held in memory.

    The framing (RFC 2046 5.1) is parsed by python-multipart's streaming :class:`MultipartParser`
    (:class:`MultipartSplitter`), which is generic over ``multipart/*`` (it does not require form-data's
    Content-Disposition). The stdlib :mod:`email` parser is not used: it needs the whole body as one
    ``str`` (twice its size for binary data) and reports a truncated body as a defect instead of failing.

    Parameters
    ----------
    chunks : AsyncIterator[bytes]
        The request body as it arrives.
    content_type : str
        The request's Content-Type header, which carries the boundary.
    spool : Path
        Where the parts' files go (the caller removes it; a part being written when the body fails stays).
    max_parts : int
        Most parts accepted.
    feed_bytes : int
        The body is parsed (and its parts written) in a worker thread, once this much has arrived.

    Returns
    -------
    list[tuple[dict[str, str], Path]]
        ``(headers, file)`` per part; header names are lower case.

    Raises
    ------
    gateway.errors.UploadError
        No boundary, no closing delimiter, or a malformed part.
    gateway.errors.TooLarge
        More than ``max_parts`` parts.
    OSError
        A part could not be written to ``spool``.
    """
    splitter = MultipartSplitter(content_type, functools.partial(FilePart, spool), max_parts=max_parts)
    parts: list[tuple[dict[str, str], Path]] = []
    try:
        async for piece in gathered(chunks, feed_bytes):  # the parts' files are written in a worker thread
            parts += await in_thread(splitter.feed, piece)
            if splitter.ended:
                break
        splitter.close()
    except BaseException:
        splitter.abort()
        raise
    return parts


def new_spool(root: Path) -> Path:
    """A new folder under ``root`` for one upload's spooled files (its owner removes it when done)."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="upload-", dir=root))


def spooling_failed(exc: OSError, what: str = "The upload") -> Unavailable:
    """The 503 of a body (``what``) whose files could not be written to the spool (a full or failing volume)."""
    return Unavailable(f"{what} could not be spooled to disk: {exc.strerror or exc}.")


def sweep_spools(root: Path, max_age_s: float, now: float | None = None) -> int:
    """Remove the spool folders under ``root`` last changed more than ``max_age_s`` ago (left by a process
    that died before removing them); return how many. ``root`` may be shared by several replicas: give an
    age no live upload's folder reaches (the gateway uses twice the job deadline). Ages are by the clock
    that stamps the folder's files (:func:`gateway.store.blobs.sweep_stale`), not this process's."""
    from gateway.store.blobs import sweep_stale

    return sweep_stale(root, "upload-*", max_age_s, now)


class FilePart:
    """One part's content, written to a new file in ``folder`` as it is parsed (``finish()``: its path)."""

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(prefix="part-", dir=folder)
        self.fh = os.fdopen(fd, "wb")
        self.path = Path(name)

    def write(self, data: memoryview) -> None:
        self.fh.write(data)

    def finish(self) -> Path:
        self.fh.close()
        return self.path


class MultipartSplitter:
    """A ``multipart/*`` body split into its parts as it arrives: :meth:`feed` takes the next bytes and
    returns the parts that ended in them, :meth:`close` checks the body ended (RFC 2046 5.1).

    The framing is parsed by python-multipart's streaming :class:`MultipartParser`; a preamble before the
    first delimiter is skipped (python-multipart does not skip one) and an epilogue after the closing
    delimiter is ignored. Each part's content goes to ``new_part()`` (``write(memoryview)``, then
    ``finish()``, whose value is handed out with the part's lower-case headers).

    Raises
    ------
    gateway.errors.UploadError
        No boundary parameter (at construction), no delimiter, a malformed part, no closing delimiter.
    gateway.errors.TooLarge
        More than ``max_parts`` parts.
    """

    def __init__(self, content_type: str, new_part: Callable[[], Any], *, max_parts: int = 10000) -> None:
        if not content_type.lower().lstrip().startswith("multipart/"):
            raise UploadError(f'Argument "content_type" must be multipart/*, got {content_type!r}.')
        found = media_parameters(content_type).get("boundary")
        if not found:
            raise UploadError(f"Content-Type {content_type!r} has no boundary parameter.")
        try:
            boundary = found.encode("latin-1")
        except UnicodeEncodeError:
            raise UploadError(f"Content-Type {content_type!r} has a boundary that is not Latin-1.") from None
        self._delimiter = b"--" + boundary
        self._preamble: bytearray | None = bytearray()  # None once the first delimiter is found
        self.new_part, self.max_parts = new_part, max_parts
        self.parts = 0
        """Parts begun so far."""
        self.ended = False
        """The closing delimiter was read."""
        self._headers: dict[str, str] = {}
        self._field, self._value = bytearray(), bytearray()
        self._content: Any = None  # the part being written, until it ends
        self._done: list[tuple[dict[str, str], Any]] = []
        callbacks: Any = {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, lo, hi: self._field.extend(data[lo:hi]),
            "on_header_value": lambda data, lo, hi: self._value.extend(data[lo:hi]),
            "on_header_end": self._header_end,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)
        except FormParserError as exc:  # e.g. a boundary over python-multipart's 256 characters (RFC 2046: 70)
            raise UploadError(f"Multipart boundary of {len(boundary)} characters refused: {exc}.") from exc

    def _part_data(self, data: bytes, lo: int, hi: int) -> None:
        self._content.write(memoryview(data)[lo:hi])

    def _part_begin(self) -> None:
        if self.parts >= self.max_parts:
            raise TooLarge(f"Multipart body has more than {self.max_parts} parts.")
        self.parts += 1
        self._headers, self._content = {}, self.new_part()

    def _part_end(self) -> None:
        self._done.append((self._headers, self._content.finish()))
        self._content = None

    def abort(self) -> None:
        """The body will not be read to its end: the part being written is closed (its file stays, for the
        caller's spool clean-up)."""
        if self._content is not None:
            self._content.finish()
            self._content = None

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _end(self) -> None:
        self.ended = True

    def feed(self, data: bytes) -> list[tuple[dict[str, str], Any]]:
        """Parse the next bytes of the body; returns the parts that ended in them, in order."""
        if self.ended or not len(data):
            return []
        if self._preamble is not None:
            self._preamble += data
            start = self._preamble.find(self._delimiter)
            if start < 0:  # keep only what may be the beginning of the delimiter
                del self._preamble[: max(0, len(self._preamble) - len(self._delimiter) + 1)]
                return []
            data, self._preamble = bytes(self._preamble[start:]), None
        try:
            self._parser.write(data)
        except FormParserError as exc:  # MultipartParseError, or another of the parser's refusals
            number = self.parts + (self._content is None)  # the part being read, or the next one between parts
            raise UploadError(
                f"Multipart part {number} is malformed (a bad header line, or no header/body "
                f"separator): {exc}."
            ) from exc
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        """The body is over: raises :class:`~gateway.errors.UploadError` unless it held its closing delimiter."""
        if self._preamble is not None:
            raise UploadError("Multipart body does not contain its boundary.")
        if not self.ended:
            raise UploadError("Multipart body has no closing boundary (truncated upload?).")
