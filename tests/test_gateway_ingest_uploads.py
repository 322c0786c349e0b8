"""Upload expansion: zip limits, zip bombs, unsafe names, nested archives, multipart splitting."""

from __future__ import annotations

import asyncio
import functools
import io
import os
import stat
import tempfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import REASONS, BadArchive, GatewayError, TooLarge, UnsafePath, UploadError, ZipBomb
from gateway.uploads import (
    FilePart,
    MultipartSplitter,
    UploadLimits,
    is_zip,
    iter_upload,
    spool_multipart,
)

KiB = 1024
MiB = 1024 * KiB


def _zip(members: dict[str, bytes], *, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_single_file_passes_through() -> None:
    assert list(iter_upload("a.dcm", b"DICMDATA")) == [("a.dcm", b"DICMDATA")]


def test_zip_members_are_expanded_and_junk_skipped() -> None:
    data = _zip(
        {
            "study/a.dcm": b"A" * 100,
            "study/b.dcm": b"B",
            "__MACOSX/._a.dcm": b"x",
            ".DS_Store": b"y",
            "DICOMDIR": b"z",
        }
    )
    assert is_zip(data)
    assert list(iter_upload("up.zip", data)) == [
        ("up.zip/study/a.dcm", b"A" * 100),
        ("up.zip/study/b.dcm", b"B"),
    ]


@pytest.mark.parametrize(
    "name", ["../evil.dcm", "a/../../evil.dcm", "/etc/passwd", "C:/x.dcm", "..\\x.dcm", "a\\..\\..\\x"]
)
def test_path_traversal_and_absolute_names_are_refused(name: str) -> None:
    data = _zip({"ok.dcm": b"1", name: b"2"})
    with pytest.raises(UnsafePath) as info:
        list(iter_upload("up.zip", data))
    assert info.value.reason == "unsafe_path" and info.value.http_status == 400
    assert info.value.filename == "up.zip"


def test_symlink_member_is_refused() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link.dcm")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafePath, match="symbolic link"):
        list(iter_upload("up.zip", buf.getvalue()))


def test_zip_bomb_by_ratio_is_refused_before_expansion() -> None:
    data = _zip({"zeros.dcm": bytes(8 * MiB)})  # deflates ~1000x
    assert len(data) < 64 * KiB
    with pytest.raises(ZipBomb) as info:
        next(iter_upload("bomb.zip", data))
    assert info.value.reason == "zip_bomb" and info.value.http_status == 413


def test_zip_bomb_by_total_size_is_refused() -> None:
    limits = UploadLimits(max_total_bytes=2 * MiB, max_ratio=10_000)
    data = _zip({f"f{i}.dcm": bytes(MiB) for i in range(3)})
    with pytest.raises(ZipBomb, match="expands to"):
        list(iter_upload("big.zip", data, limits))


def test_lying_declared_size_is_caught_while_expanding() -> None:
    """A member whose header declares a small size but inflates to more is stopped at the limit."""
    limits = UploadLimits(max_file_bytes=2 * MiB, ratio_floor_bytes=100 * MiB)
    payload = bytes(3 * MiB)
    data = bytearray(_zip({"x.dcm": payload}))
    # patch the declared uncompressed size (local header offset 22, central directory +24) to 1 KiB
    real = len(payload).to_bytes(4, "little")
    fake = (1 * KiB).to_bytes(4, "little")
    assert data.count(real) == 2
    data = bytearray(bytes(data).replace(real, fake))
    with pytest.raises((ZipBomb, BadArchive)) as info:
        list(iter_upload("liar.zip", bytes(data), limits))
    assert info.value.reason in {"zip_bomb", "bad_archive"}


def test_a_member_claiming_compressed_bytes_of_the_next_one_is_refused() -> None:
    """The ratio divides by the central directory's compressed size, which the sender writes: a member of
    8 MiB of zeros (a few KiB deflated) claiming the 1 MiB of random bytes stored after it passed as 8x."""
    import struct

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", bytes(8 * MiB))
        zf.writestr("pad.bin", os.urandom(MiB), compress_type=zipfile.ZIP_STORED)
    raw = bytearray(buf.getvalue())
    with pytest.raises(ZipBomb, match="expands"):  # told the truth: the ratio catches it
        list(iter_upload("honest.zip", bytes(raw)))
    entry = raw.find(b"PK\x01\x02")  # a.dcm's central directory entry; its compressed size at +20
    struct.pack_into("<I", raw, entry + 20, MiB)
    with pytest.raises(ZipBomb, match="overlapping"):
        list(iter_upload("liar.zip", bytes(raw)))


def test_a_zip_listing_millions_of_skipped_entries_is_refused_before_it_is_parsed() -> None:
    """``max_files`` counted only the members kept: a central directory of folders and ``__MACOSX/`` names,
    every one parsed into memory by zipfile first, went through whatever its length."""
    limits = UploadLimits(max_files=10)
    with pytest.raises(TooLarge, match="lists 1031 entries"):
        list(iter_upload("listing.zip", _zip({f"__MACOSX/{i}": b"" for i in range(1031)}), limits))
    kept = _zip({**{f"__MACOSX/{i}": b"" for i in range(1029)}, "a.dcm": b"x"})  # at the limit: fine
    assert [n for n, _ in iter_upload("mac.zip", kept, limits)] == ["mac.zip/a.dcm"]


def test_too_many_files_and_too_large() -> None:
    limits = UploadLimits(max_files=3, max_file_bytes=100, max_upload_bytes=10 * KiB)
    with pytest.raises(TooLarge, match="4 files"):
        list(iter_upload("many.zip", _zip({f"{i}.dcm": b"x" for i in range(4)}), limits))
    with pytest.raises(TooLarge, match="expands to 101"):
        list(iter_upload("one.zip", _zip({"a.dcm": b"x" * 101}, method=zipfile.ZIP_STORED), limits))
    with pytest.raises(TooLarge):
        list(iter_upload("plain.dcm", b"x" * 101, limits))
    with pytest.raises(TooLarge, match="Upload is"):
        list(iter_upload("huge.dcm", b"x" * (11 * KiB), limits))


def test_nested_zip_is_refused() -> None:
    inner = _zip({"a.dcm": b"1"})
    with pytest.raises(BadArchive, match="nested"):
        list(iter_upload("outer.zip", _zip({"inner.zip": inner})))


def test_corrupt_zip() -> None:
    data = _zip({"a.dcm": b"hello" * 1000})
    with pytest.raises(BadArchive):
        list(iter_upload("trunc.zip", data[: len(data) // 2]))
    # flip a byte of the compressed stream: CRC or inflate error, never a crash
    broken = bytearray(data)
    broken[40] ^= 0xFF
    with pytest.raises(BadArchive):
        list(iter_upload("crc.zip", bytes(broken)))


def test_limits_validate_their_arguments() -> None:
    with pytest.raises(ValueError, match='"max_files"'):
        UploadLimits(max_files=0)
    with pytest.raises(ValueError, match='"max_ratio"'):
        UploadLimits(max_ratio=1)


def test_error_classes_have_distinct_reasons_and_statuses() -> None:
    assert {
        "not_dicom",
        "not_ct",
        "no_pixel_data",
        "undecodable",
        "zip_bomb",
        "unsafe_path",
        "too_large",
        "no_usable_series",
        "bad_archive",
    } <= set(REASONS)
    for reason, cls in REASONS.items():
        assert cls.reason == reason
        assert 400 <= cls.http_status < 600
        if issubclass(cls, UploadError):
            assert issubclass(cls, ValueError) and cls.http_status < 500
    err = ZipBomb("too big", filename="x.zip")
    assert isinstance(err, GatewayError | ValueError)
    assert err.to_dict() == {"reason": "zip_bomb", "message": "too big", "filename": "x.zip"}


# ---------------------------------------------------------------------------------- multipart
def _multipart(parts: list[tuple[dict[str, str], bytes]], boundary: str = "b0undary") -> bytes:
    out = b"preamble to ignore\r\n"
    for headers, body in parts:
        out += f"--{boundary}\r\n".encode()
        out += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        out += b"\r\n" + body + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_multipart_related_split() -> None:
    body1 = b"\x00\x01--b0undar\r\nnot a boundary\r\n" * 3  # binary, near-boundary bytes inside
    body2 = b"DICM" * 10
    body = _multipart(
        [
            ({"Content-Type": "application/dicom"}, body1),
            ({"Content-Type": "application/dicom", "Content-ID": "<2>"}, body2),
        ]
    )
    ct = 'multipart/related; type="application/dicom"; boundary="b0undary"'
    parts = _split(body, ct)
    assert [p[1] for p in parts] == [body1, body2]
    assert parts[1][0] == {"content-type": "application/dicom", "content-id": "<2>"}
    # unquoted boundary parameter, and no preamble
    parts = _split(
        body[len(b"preamble to ignore\r\n") :], "multipart/related; boundary=b0undary"
    )
    assert len(parts) == 2


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 11, 64])
def test_multipart_split_across_feed_chunks(tmp_path, chunk: int) -> None:
    """The body arrives in chunks: a delimiter or header cut anywhere still splits the same."""

    parts = [({"Content-Type": "application/dicom"}, b"\r\n--b0undar" + bytes(range(40))), ({}, b""),
             ({"Content-ID": "<3>"}, b"x" * 33)]
    body = _multipart(parts) + b"epilogue"
    expected = [({k.lower(): v for k, v in h.items()}, c) for h, c in parts]
    assert _split(body, "multipart/related; boundary=b0undary", chunk=chunk) == expected
    # the same parts written to files as they arrive (the upload route: nothing held in memory)
    (tmp_path / "spool").mkdir()
    splitter = MultipartSplitter("multipart/related; boundary=b0undary", functools.partial(FilePart, tmp_path / "spool"))
    spooled = [part for pos in range(0, len(body), chunk) for part in splitter.feed(body[pos : pos + chunk])]
    splitter.close()
    assert [(h, p.read_bytes()) for h, p in spooled] == expected
    assert {p.parent for _, p in spooled} == {tmp_path / "spool"}


def test_a_spooled_file_is_stored_as_a_blob_and_stays_the_callers(tmp_path) -> None:
    from gateway.store import FolderBlobs

    src = tmp_path / "part"
    src.write_bytes(b"DICM" * 1000)
    blobs = FolderBlobs(tmp_path / "blobs")
    blobs.put_many([("ab/abcd", src), ("cd/cdef", b"bytes too")])
    assert blobs.get("ab/abcd") == b"DICM" * 1000 and blobs.get("cd/cdef") == b"bytes too"
    src.unlink()  # the spool goes; the blob stays
    assert blobs.get("ab/abcd") == b"DICM" * 1000
    assert list(iter_upload("a.dcm", blobs.root / "ab" / "abcd")) == [("a.dcm", blobs.root / "ab" / "abcd")]


def test_blobs_are_all_stored_or_none_is(tmp_path) -> None:
    """``put_many`` flushes in threads: every blob lands (content intact, no temporary file left), and when
    one cannot be written none is put in place and no temporary file stays."""
    from gateway.store import FolderBlobs, new_key

    blobs = FolderBlobs(tmp_path / "blobs")
    items = [(new_key(), bytes([i]) * (1000 + i)) for i in range(40)]
    blobs.put_many(items)
    assert all(blobs.get(k) == data for k, data in items)
    files = [p for p in blobs.root.rglob("*") if p.is_file()]
    assert len(files) == 40 and not [p for p in files if p.name.endswith(".tmp")]

    fresh = FolderBlobs(tmp_path / "fresh")
    bad = [(new_key(), b"ok") for _ in range(20)] + [(new_key(), tmp_path / "gone.dcm")]  # no such file
    with pytest.raises(FileNotFoundError):
        fresh.put_many(bad)
    assert [p for p in fresh.root.rglob("*") if p.is_file()] == []
    fresh.put_many([])  # nothing to store: no error


def test_blobs_renamed_before_a_failing_rename_are_taken_back(tmp_path, monkeypatch) -> None:
    import itertools

    from gateway.store import FolderBlobs, new_key
    from gateway.store import blobs as blobs_module

    blobs = FolderBlobs(tmp_path / "blobs")
    replace, calls = os.replace, itertools.count()

    def failing(src, dst):  # the third rename fails (the disk went read-only)
        if next(calls) == 2:
            raise OSError(30, "Read-only file system")
        replace(src, dst)

    monkeypatch.setattr(blobs_module.os, "replace", failing)
    with pytest.raises(OSError, match="Read-only"):
        blobs.put_many([(new_key(), b"x" * 100) for _ in range(6)])
    assert [p for p in blobs.root.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    ("body", "ctype", "match"),
    [
        (b"--x\r\n\r\nabc", "multipart/related; boundary=x", "closing boundary"),
        (b"abc", "multipart/related; boundary=x", "does not contain"),
        (b"--x\r\nno-separator\r\n--x--", "multipart/related; boundary=x", "separator"),
        (b"", "multipart/related", "no boundary"),
        (b"", "application/dicom", "must be multipart"),
    ],
)
def test_multipart_errors(body: bytes, ctype: str, match: str) -> None:
    with pytest.raises(UploadError, match=match):
        _split(body, ctype)


def test_multipart_part_limit() -> None:
    body = _multipart([({}, b"a")] * 5)
    with pytest.raises(TooLarge):
        _split(body, "multipart/related; boundary=b0undary", max_parts=4)


def test_the_splitter_hands_out_each_part_as_soon_as_it_ends() -> None:
    """``MultipartSplitter.feed`` returns a part once the delimiter after it has arrived (the upload route
    parses it while the rest of the body is still on the wire); the epilogue is ignored."""
    body = _multipart([({"Content-ID": f"<{i}>"}, bytes([i]) * 1000) for i in range(3)]) + b"epilogue"
    splitter = MultipartSplitter("multipart/related; boundary=b0undary", _Bytes)
    delimiters = [i for i in range(len(body)) if body.startswith(b"\r\n--b0undary", i)][1:]  # (0: after the preamble)
    assert len(delimiters) == 3  # after parts 0, 1 and 2 (the last is the closing one)
    got: list[list[bytes]] = []
    pos = 0
    for end in [*(d + len(b"\r\n--b0undary") + 2 for d in delimiters), len(body)]:
        got.append([content for _, content in splitter.feed(body[pos:end])])
        pos = end
    assert got == [[bytes([0]) * 1000], [bytes([1]) * 1000], [bytes([2]) * 1000], []]
    assert splitter.ended and splitter.parts == 3
    splitter.close()


@pytest.mark.parametrize(("body", "match"), [(b"", "does not contain"), (b"prea", "does not contain"),
                                             (b"--b0undary\r\n\r\nabc", "closing boundary")])
def test_the_splitter_refuses_a_body_that_ends_early(body: bytes, match: str) -> None:
    splitter = MultipartSplitter("multipart/related; boundary=b0undary", _Bytes)
    assert splitter.feed(body) == []
    with pytest.raises(UploadError, match=match):
        splitter.close()


def test_an_abandoned_body_closes_the_part_being_written(tmp_path) -> None:
    opened: list[FilePart] = []

    def new_part() -> FilePart:
        opened.append(FilePart(tmp_path))
        return opened[-1]

    splitter = MultipartSplitter("multipart/related; boundary=b0undary", new_part)
    done = splitter.feed(b"--b0undary\r\n\r\nfirst\r\n--b0undary\r\n\r\nhalf of the sec")
    assert [p.read_bytes() for _, p in done] == [b"first"] and not opened[1].fh.closed
    splitter.abort()
    assert opened[1].fh.closed and opened[1].path.read_bytes().startswith(b"half")


@pytest.mark.parametrize(("body", "part"), [(b"--b0undary\r\nno-separator\r\n--b0undary--", 1),
                                            (b"--b0undary\r\n\r\nok\r\n--b0undary\r\nbad\r\n--b0undary--", 2)])
def test_a_malformed_part_is_named_by_its_number(body: bytes, part: int) -> None:
    with pytest.raises(UploadError, match=f"part {part} is malformed"):
        _split(body, "multipart/related; boundary=b0undary")


def _split(body: bytes, content_type: str, *, max_parts: int = 10000, chunk: int = 1 << 20,
           ) -> list[tuple[dict[str, str], bytes]]:
    """:func:`spool_multipart` of ``body`` arriving, and parsed, ``chunk`` bytes at a time; its parts' files
    read back."""
    async def chunks() -> AsyncIterator[bytes]:
        for pos in range(0, len(body), chunk):
            yield body[pos : pos + chunk]

    with tempfile.TemporaryDirectory() as spool:
        parts = asyncio.run(spool_multipart(chunks(), content_type, Path(spool), max_parts=max_parts, feed_bytes=chunk))
        assert all(p.parent == Path(spool) for _, p in parts)
        return [(h, p.read_bytes()) for h, p in parts]


class _Bytes:
    """A part's content kept in memory."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: memoryview) -> None:
        self.buf += data

    def finish(self) -> bytes:
        return bytes(self.buf)


def test_mutated_zips_raise_only_upload_errors() -> None:
    """200 random corruptions of a zip: every one expands or raises an UploadError, nothing else."""
    import numpy as np

    base = _zip({f"d/{i}.dcm": bytes(range(256)) * 20 for i in range(4)})
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(200):
        data = bytearray(base)
        for pos in rng.integers(0, len(data), size=rng.integers(1, 6)):
            data[pos] = int(rng.integers(256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(4, len(data)))]
        try:
            for _name, content in iter_upload("m.zip", bytes(data)):
                assert isinstance(content, bytes)
            seen.add("ok")
        except UploadError as exc:
            seen.add(exc.reason)
    assert "bad_archive" in seen


def test_spool_folders_left_by_a_dead_process_are_swept_and_live_ones_kept(tmp_path) -> None:
    import os
    import time

    from gateway.uploads import new_spool, sweep_spools

    root = tmp_path / "spool"
    old, live = new_spool(root), new_spool(root)
    (old / "part-1").write_bytes(b"x")
    (live / "part-1").write_bytes(b"y")
    day_ago = time.time() - 86400
    os.utime(old, (day_ago, day_ago))
    (root / "not-a-spool").mkdir()
    os.utime(root / "not-a-spool", (day_ago, day_ago))
    assert sweep_spools(root, 3600) == 1
    assert not old.exists() and (live / "part-1").read_bytes() == b"y" and (root / "not-a-spool").is_dir()
    assert sweep_spools(tmp_path / "absent", 3600) == 0



def test_spool_ages_go_by_the_folders_clock_not_a_replicas(tmp_path, monkeypatch) -> None:
    """A replica whose clock runs two days ahead of the (shared) spool folder's file server must not take a
    live upload's folder for one a dead process left."""
    import time

    from gateway.uploads import new_spool, sweep_spools

    root = tmp_path / "spool"
    live = new_spool(root)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 2 * 86400)
    assert sweep_spools(root, 3600) == 0 and live.is_dir()
