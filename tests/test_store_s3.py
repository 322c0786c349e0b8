"""The blob store in an S3 bucket (``CTSCREEN_BLOB_URL=s3://bucket/prefix``): the contract :class:`FolderBlobs` keeps,
kept by :class:`S3Blobs` against a real S3 REST server on loopback, and a gateway that keeps its instances there.

The server is moto's (``.venv-s3/bin/moto_server``, set up by ``scripts/setup.sh --test`` in a venv of its own):
MinIO installs neither from Debian nor from PyPI here. It speaks S3's HTTP API (signed requests, XML listings,
copy, errors), which is all the gateway's client (MinIO's ``minio``) sees; it is not AWS's durability, which
no test here could show.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from gateway.store import FolderBlobs, S3Blobs, instance_sources, new_keys
from tests.conftest import free_port
from tests.orthanc import OrthancServer, orthanc_bin
from tests.test_e2e_gateway import needs_trained

ROOT = Path(__file__).resolve().parents[1]
MOTO = ROOT / ".venv-s3" / "bin" / "moto_server"


@contextlib.contextmanager
def _moto_server():
    """moto's S3 server on a free loopback port, its URL; stopped on exit."""
    if not MOTO.exists():
        pytest.skip(f"no S3 server for the tests at {MOTO} (bash scripts/setup.sh --test installs moto's there)")
    port = free_port()
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto's S3 server did not start on {url}")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def s3_server():
    with _moto_server() as url:
        yield url


@pytest.fixture
def bucket(s3_server, monkeypatch):
    """A new bucket, and the credentials the gateway finds in its environment (as on a cluster: AWS_*)."""
    from gateway.store.blobs import s3_client

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ctscreen-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ctscreen-test-secret")
    name = f"ct-{uuid.uuid4().hex[:12]}"
    s3_client(s3_server, "us-east-1").make_bucket(name)
    return name


@pytest.fixture(params=["folder", "s3"])
def blobs(request, tmp_path):
    if request.param == "folder":
        return FolderBlobs(tmp_path / "blobs")
    bucket = request.getfixturevalue("bucket")
    return S3Blobs(bucket, "site-a/ctscreen", endpoint_url=request.getfixturevalue("s3_server"), region="us-east-1")


def test_bytes_and_files_stored_read_and_deleted(blobs, tmp_path):
    a, b, c = new_keys(3)
    spooled = tmp_path / "spooled.dcm"
    spooled.write_bytes(b"DICM" * 1000)
    assert blobs.empty() and not blobs.exists(a)
    blobs.put_many([(a, b"first"), (b, spooled)])
    blobs.put(c, b"")
    assert blobs.get(a) == b"first" and blobs.get(b) == spooled.read_bytes() and blobs.get(c) == b""
    assert spooled.is_file()  # the caller's file stays
    assert blobs.exists(a) and not blobs.empty()
    blobs.delete(a)
    blobs.delete(a)  # absent: no error
    with pytest.raises(FileNotFoundError):
        blobs.get(a)
    assert not blobs.exists(a)
    for key in (b, c):
        blobs.delete(key)
    assert blobs.empty()  # what the pairing check at start reads (gateway.store.pairing)
    assert blobs.writable()


def test_put_many_stores_all_or_none(blobs, tmp_path):
    """A file of an upload that cannot be read (here: gone) fails the write, and nothing of it is kept: the
    upload is refused, not acknowledged half stored."""
    keys = new_keys(4)
    files = []
    for i, key in enumerate(keys[:3]):
        files.append((key, tmp_path / f"f{i}"))
        files[-1][1].write_bytes(bytes([i]) * 5000)
    files.append((keys[3], tmp_path / "gone"))
    with pytest.raises(OSError):
        blobs.put_many(files)
    for key in keys:
        with pytest.raises(FileNotFoundError):
            blobs.get(key)


def test_the_orphan_sweeps_view_ages_sets_aside_and_purges(blobs):
    first, second = new_keys(1)[0], new_keys(1)[0]
    blobs.put(first, b"one")
    blobs.put(second, b"two")
    shards = blobs.shards()
    assert {first[:2], second[:2]} <= set(shards) and all(len(s) == 2 for s in shards)
    assert blobs.older_than(3600) == []  # written just now
    assert blobs.older_than(0, later_s=10) == sorted([first, second])
    assert blobs.older_than(0, later_s=10, shard=first[:2]) == sorted(k for k in (first, second) if k[:2] == first[:2])
    blobs.set_aside(first)
    blobs.set_aside(first)  # absent now: no error
    with pytest.raises(FileNotFoundError):
        blobs.get(first)
    assert blobs.older_than(0, later_s=10) == [second]  # what is set aside is no live blob
    assert blobs.purge_set_aside(3600) == 0  # set aside just now: kept, restorable
    assert blobs.purge_set_aside(0, later_s=10) == 1
    assert blobs.get(second) == b"two"


def test_an_s3_store_hands_a_study_over_as_bytes_and_refuses_a_foreign_key(bucket, s3_server):
    blobs = S3Blobs(bucket, endpoint_url=s3_server, region="us-east-1")
    key = new_keys(1)[0]
    blobs.put(key, b"DICM")
    assert instance_sources(blobs, [("IM1", key)]) == [("IM1", b"DICM")]
    with pytest.raises(FileNotFoundError):
        instance_sources(blobs, [("IM2", new_keys(1)[0])])
    with pytest.raises(ValueError, match="Not a blob key"):
        blobs.get("../../etc/passwd")
    assert not S3Blobs("no-such-bucket", endpoint_url=s3_server, region="us-east-1").writable()


def test_a_blob_url_is_checked_when_the_gateway_starts(tmp_path):
    from gateway.settings import Settings

    settings = Settings(data_dir=tmp_path, blob_url=" s3://scans/ctscreen/prod ", s3_endpoint_url="https://minio:9000")
    store = settings.blob_store()
    assert isinstance(store, S3Blobs) and store.root == "s3://scans/ctscreen/prod/" and store.bucket == "scans"
    assert isinstance(Settings(data_dir=tmp_path).blob_store(), FolderBlobs)
    for bad, message in (({"blob_url": "/var/blobs"}, "must be s3://bucket"), ({"blob_url": "s3:///prefix"}, "must be s3://"),
                         ({"s3_endpoint_url": "minio:9000"}, "http:// or https:// URL"),
                         ({"s3_endpoint_url": "https://key:secret@minio:9000"}, "must not hold credentials"),
                         ({"s3_endpoint_url": "https://gw.site/s3/"}, "a scheme, a host and a port only"),
                         ({"s3_endpoint_url": "https://minio:99999"}, "bad port"),
                         ({"blob_url": "s3://Site_CT/x"}, "names the bucket 'Site_CT', which S3 refuses")):
        with pytest.raises(ValueError, match=message):
            Settings(data_dir=tmp_path, **bad)


@pytest.mark.triton
def test_a_gateway_with_its_blobs_in_s3_screens_uploads_and_stow(triton, bucket, s3_server, tmp_path):
    """A gateway whose instances live in the bucket, not in its data folder: an upload and a STOW-RS study are
    screened from what S3 holds (the worker reads the instances back from it), and nothing lands in a blob folder."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient
    from pydicom.uid import generate_uid

    import phantom
    from gateway.cli import run_stack
    from gateway.client import screen_paths
    from gateway.store.blobs import s3_client

    study = phantom.make_study(seed=5, kind="covid", n_slices=12)
    folder = Path(phantom.write_study(study, tmp_path / "covid", montage=False))
    overrides = {"blob_url": f"s3://{bucket}/ctscreen", "s3_endpoint_url": s3_server, "s3_region": "us-east-1",
                 "data_dir": tmp_path / "data", "stow_quiet_period_s": 3600.0, "screen_ahead": False}
    with run_stack(port=0, triton_url=triton.grpc_url, settings_overrides=overrides) as stack:
        (outcome,) = screen_paths(stack.url, [folder], quiet=True)
        assert outcome.error is None and outcome.result["verdict"] in ("positive", "negative", "indeterminate")
        assert len(outcome.result["slices"]) == 12
        files = sorted((folder / "dicom").iterdir())
        datasets = [pydicom.dcmread(f) for f in files]
        for ds in datasets:  # the same slices as another study, sent by STOW-RS
            ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
            ds.SOPInstanceUID = generate_uid()
        DICOMwebClient(url=f"{stack.url}/dicomweb").store_instances(datasets=datasets)
        with httpx.Client(base_url=stack.url, timeout=60) as http:
            assert http.post("/v1/studies/1.2.826.0.1.3680043.8.498.1/complete").status_code == 202
            deadline = time.monotonic() + 120
            while (view := http.get("/v1/studies/1.2.826.0.1.3680043.8.498.1").json())["state"] not in ("done", "failed"):
                assert time.monotonic() < deadline, view
                time.sleep(0.2)
            assert view["state"] == "done", view
            assert httpx.get(f"{stack.url}/readyz").status_code == 200
        assert view["result"]["verdict"] == outcome.result["verdict"]
        spool = tmp_path / "data" / "spool"  # where the STOW study's instances were downloaded to: removed
        assert not spool.exists() or not any(spool.iterdir()), list(spool.iterdir())
    objects = [o.object_name for o in s3_client(s3_server, "us-east-1").list_objects(bucket, prefix="ctscreen/",
                                                                                    recursive=True)]
    assert len([o for o in objects if o.count("/") == 2]) >= 24  # both studies' instances, under the prefix
    assert not (tmp_path / "data" / "blobs").exists() or not any((tmp_path / "data" / "blobs").rglob("*"))


def test_a_store_that_fails_is_the_folders_oserror_never_an_internal_error(bucket, s3_server, tmp_path):
    """S3 refusing (no such bucket) or not answering (nothing listens) is an OSError, as a failing volume is: the
    upload route answers 503 and the worker tries the job again later, where anything else would be a 500 and a
    failed job. A missing object stays FileNotFoundError (the study's instances are gone: no retry helps)."""
    import errno

    gone = S3Blobs("no-such-bucket", endpoint_url=s3_server, region="us-east-1")
    key = new_keys(1)[0]
    spooled = tmp_path / "f"
    spooled.write_bytes(b"DICM")
    for call in (lambda: gone.put(key, b"x"), lambda: gone.put_many([(key, spooled), (new_keys(1)[0], b"y")]),
                 lambda: gone.get(key), gone.shards, lambda: gone.older_than(0), lambda: gone.delete(key)):
        with pytest.raises(OSError) as raised:
            call()
        assert raised.value.errno == errno.EIO and not isinstance(raised.value, FileNotFoundError), raised.value
    live = S3Blobs(bucket, endpoint_url=s3_server, region="us-east-1")
    with pytest.raises(FileNotFoundError):
        live.get(key)
    dead = S3Blobs(bucket, endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1")
    with pytest.raises(OSError) as raised:
        dead.get(key)
    assert raised.value.errno == errno.EIO and not dead.writable()


@pytest.mark.triton
def test_a_gateway_whose_bucket_is_gone_refuses_uploads_with_503(triton, s3_server, bucket, tmp_path, monkeypatch):
    import gateway.store.blobs
    import phantom

    monkeypatch.setattr(gateway.store.blobs, "S3_READ_TIMEOUT_S", 12.0)  # the silent endpoint's probes end sooner
    from gateway.cli import run_stack

    folder = Path(phantom.write_study(phantom.make_study(seed=6, kind="normal", n_slices=4), tmp_path / "s",
                                      montage=False))
    files = [("files", (f.name, f.read_bytes(), "application/dicom")) for f in sorted((folder / "dicom").iterdir())]
    overrides = {"blob_url": "s3://no-such-bucket/ctscreen", "s3_endpoint_url": s3_server, "s3_region": "us-east-1",
                 "data_dir": tmp_path / "data"}
    with run_stack(port=0, triton_url=triton.grpc_url, settings_overrides=overrides) as stack:
        assert httpx.get(f"{stack.url}/readyz", timeout=30).status_code == 503
        answer = httpx.post(f"{stack.url}/v1/studies", files=files, timeout=60)
        assert answer.status_code == 503 and "could not be stored durably" in answer.text, answer.text
    # a bucket's endpoint that takes connections and never answers (it went silent once the gateway was up; silent
    # from the start, the start's pairing check waited out a read timeout first): the probe says not ready within
    # its 3 s, and the gateway stops at once, not once the hung probe's read times out (asyncio's default pool held
    # the shut-down until then: 9 s here, 27 s with the default 30 s)
    with _silent_server(listening=False) as silent, run_stack(port=0, triton_url=triton.grpc_url, settings_overrides={
            **overrides, "s3_endpoint_url": silent.url, "data_dir": tmp_path / "data2"}) as stack:
        silent.listen()
        t0 = time.monotonic()
        probe = httpx.get(f"{stack.url}/readyz", timeout=30)
        assert probe.status_code == 503 and probe.json()["blobs"] is False and time.monotonic() - t0 < 7
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 4, f"the gateway took {time.monotonic() - t0:.1f} s to stop"


@pytest.mark.triton
def test_the_viewer_answers_503_while_the_bucket_does_not_answer(triton, tmp_path, monkeypatch):
    """A slice image whose bytes the bucket cannot give now is a 503 (retry), as is the study's series map; it was
    a 500 (an internal error) for what is a dependency's outage."""
    import phantom
    from gateway.cli import run_stack
    from gateway.client import screen_paths
    from gateway.store.blobs import s3_client

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ctscreen-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ctscreen-test-secret")
    folder = Path(phantom.write_study(phantom.make_study(seed=7, kind="covid", n_slices=6), tmp_path / "s",
                                      montage=False))
    with _moto_server() as server:
        s3_client(server, "us-east-1").make_bucket("viewer")
        overrides = {"blob_url": "s3://viewer", "s3_endpoint_url": server, "s3_region": "us-east-1",
                     "data_dir": tmp_path / "data"}
        stack = run_stack(port=0, triton_url=triton.grpc_url, settings_overrides=overrides)
        running = stack.__enter__()
        try:
            (outcome,) = screen_paths(running.url, [folder], quiet=True)
            job = outcome.job_id
            assert httpx.get(f"{running.url}/v1/jobs/{job}/slices/0.png", timeout=30).status_code == 200
        except BaseException:
            stack.__exit__(None, None, None)
            raise
    try:  # the server is gone now
        answer = httpx.get(f"{running.url}/v1/jobs/{job}/slices/1.png", timeout=60)
        assert answer.status_code == 503 and answer.json()["reason"] == "unavailable", answer.text
    finally:
        stack.__exit__(None, None, None)


@contextlib.contextmanager
def _silent_server(*, listening: bool = True):
    """A TCP server that takes connections and never answers (a bucket's load balancer with nothing behind it): its
    URL, or with ``listening=False`` a namespace of its ``url``, which refuses connections until ``listen()``."""
    import socket
    from types import SimpleNamespace

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        if listening:
            listener.listen(16)
            yield url
        else:
            yield SimpleNamespace(url=url, listen=lambda: listener.listen(16))
    finally:
        listener.close()


def test_a_store_that_takes_connections_and_never_answers_fails_within_its_timeouts(monkeypatch):
    """minio's own client waits 300 s to read and tries 5 times: an upload or a probe hung for half an hour. The
    gateway's client gives up after its read timeout (30 s; 1 s here), once, as the folder's EIO."""
    import errno

    import gateway.store.blobs as module

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ctscreen-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ctscreen-test-secret")
    monkeypatch.setattr(module, "S3_READ_TIMEOUT_S", 1.0)
    with _silent_server() as url:
        silent = S3Blobs("ctscreen", endpoint_url=url, region="us-east-1")
        t0 = time.monotonic()
        with pytest.raises(OSError) as raised:
            silent.put(new_keys(1)[0], b"x")
        assert raised.value.errno == errno.EIO and time.monotonic() - t0 < 10
        t0 = time.monotonic()
        assert not silent.writable() and time.monotonic() - t0 < 10


def test_a_stopped_read_of_a_study_writes_nothing_more(bucket, s3_server, tmp_path):
    """A job given up while its study is read back (a lost lease, a shut-down) stopped waiting, removed its spool
    folder, and the download thread went on writing every file back into it; a stop flag ends it."""
    import threading

    blobs = S3Blobs(bucket, endpoint_url=s3_server, region="us-east-1")
    keys = new_keys(40)
    blobs.put_many([(k, b"DICM" * 100) for k in keys])
    spool = tmp_path / "spool"
    spool.mkdir()
    files = [(f"IM{i}", k) for i, k in enumerate(keys)]
    got = instance_sources(blobs, files, spool)
    assert [p.read_bytes() for _, p in got] == [b"DICM" * 100] * 40 and [n for n, _ in got] == [n for n, _ in files]
    again = tmp_path / "again"
    again.mkdir()
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedError):
        instance_sources(blobs, files, again, stop)
    assert list(again.iterdir()) == []


def test_retention_deletes_every_blob_it_can_when_one_delete_fails(tmp_path, caplog):
    """One failed delete ended the retention pass: the spool sweep after it was skipped and every later expired
    blob stayed, named by nothing, until the orphan sweep's brake took them for a wrong database."""
    from gateway.settings import Settings
    from gateway.store import Store
    from gateway.worker import Sweeper

    class Flaky(FolderBlobs):
        def delete(self, key: str) -> None:
            if key == keys[2]:
                raise OSError(5, "Input/output error")
            super().delete(key)

    blobs = Flaky(tmp_path / "blobs")
    keys = new_keys(6)
    blobs.put_many([(k, b"x") for k in keys])
    sweeper = Sweeper(Store(f"sqlite:///{tmp_path / 'db.sqlite'}"), blobs, Settings(data_dir=tmp_path))
    assert sweeper._delete_each(keys) == (1, "Input/output error")
    assert [k for k in keys if (tmp_path / "blobs" / k).exists()] == [keys[2]]


@pytest.mark.timeout(600)
@pytest.mark.triton
@needs_trained
@pytest.mark.skipif(orthanc_bin() is None, reason="Orthanc not installed: scripts/setup.sh --test")
def test_a_positive_study_kept_in_the_bucket_is_delivered_to_the_pacs(triton, bucket, s3_server, tmp_path):
    """The payload of a delivery (the SR and its key images) is built from the study's instances, which the
    deliverer reads from the bucket into spool files (removed after), and lands in a real PACS (Orthanc, C-STORE)."""
    import json

    import phantom
    from gateway.cli import run_stack
    from gateway.client import screen_paths

    study = phantom.make_study(seed=11, kind="covid", n_slices=40, matrix=512)
    folder = Path(phantom.write_study(study, tmp_path / "covid", montage=False, salt="s3-deliv"))
    pacs = OrthancServer("PACS")
    try:
        destinations = tmp_path / "destinations.json"
        destinations.write_text(json.dumps({"destinations": [
            {"name": "pacs", "kind": "dicom", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}]}))
        overrides = {"blob_url": f"s3://{bucket}/site", "s3_endpoint_url": s3_server, "s3_region": "us-east-1",
                     "data_dir": tmp_path / "data", "destinations_file": destinations, "delivery_backoff_s": 0.5,
                     "delivery_backoff_max_s": 1.0, "delivery_poll_s": 0.2}
        with run_stack(port=0, triton_url=triton.grpc_url, settings_overrides=overrides) as stack:
            (outcome,) = screen_paths(stack.url, [folder], quiet=True)
            assert outcome.error is None and outcome.result["verdict"] == "positive", outcome.result.get("reason")
            deadline = time.monotonic() + 120
            while True:
                (d,) = httpx.get(f"{stack.url}/v1/jobs/{outcome.job_id}/deliveries", timeout=30).json()
                if d["state"] in ("done", "failed", "skipped") or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert d["state"] == "done", d
        kinds = [o["kind"] for o in d["objects"]]
        assert kinds[0] == "sr" and "key_image" in kinds
        held = pacs.instances_of_study(outcome.result["study_instance_uid"])
        assert {o["uid"] for o in d["objects"]} <= {i["MainDicomTags"]["SOPInstanceUID"] for i in held}
        spool = tmp_path / "data" / "spool"
        assert not spool.exists() or not any(spool.iterdir()), list(spool.iterdir())
    finally:
        pacs.close()


def test_a_busy_store_or_a_hung_credentials_endpoint_holds_no_call(monkeypatch, tmp_path):
    """A busy MinIO answers 503 SlowDown with Retry-After: 120, which urllib3 obeyed (2 x 120 s a call) and then
    said "too many 503" instead of S3's code; the credentials' fetch (IRSA's STS, the instance's metadata) went
    through minio's own pool, without a timeout. Both now end within the client's own limits."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import gateway.store.blobs as module

    class Busy(BaseHTTPRequestHandler):
        def _busy(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b'<?xml version="1.0"?><Error><Code>SlowDown</Code><Message>busy</Message></Error>'
            self.send_response(503)
            self.send_header("Retry-After", "30")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_GET = do_HEAD = _busy

        def log_message(self, *args: object) -> None:
            pass

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ctscreen-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ctscreen-test-secret")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        busy = S3Blobs("ctscreen", endpoint_url=f"http://127.0.0.1:{server.server_port}", region="us-east-1")
        t0 = time.monotonic()
        with pytest.raises(OSError, match="SlowDown"):
            busy.put(new_keys(1)[0], b"x" * 100)
        assert time.monotonic() - t0 < 5
    finally:
        server.shutdown()
    monkeypatch.setattr(module, "S3_READ_TIMEOUT_S", 1.0)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/credentials
    with _silent_server() as silent:
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{silent}/credentials")
        blobs = S3Blobs("ctscreen", endpoint_url="http://127.0.0.1:9", region="us-east-1")
        t0 = time.monotonic()
        assert not blobs.writable() and time.monotonic() - t0 < 10


def test_one_failed_read_stops_the_rest_of_the_study(tmp_path):
    """A study whose first instance cannot be read went on fetching the other 499 before its error came back (each
    against a bucket that drops connections: 21 s). Here the store's reads themselves are stood in for (a missing
    object at once, the others slow), so the count does not hang on the machine's speed."""
    keys = new_keys(41)

    class Slow(S3Blobs):
        def download(self, key: str, path: Path) -> None:
            if key == keys[0]:
                raise FileNotFoundError(2, "No such blob", key)
            time.sleep(0.05)
            path.write_bytes(b"DICM")

    spool = tmp_path / "spool"
    spool.mkdir()
    with pytest.raises(FileNotFoundError):
        instance_sources(Slow("ctscreen", client=object()), [(f"IM{i}", k) for i, k in enumerate(keys)], spool)
    assert len(list(spool.iterdir())) <= 3  # at most those already under way in the other threads


def test_readiness_keeps_one_probe_of_a_hung_store(monkeypatch):
    """Each probe started a thread that the 3 s limit left hung: after ten probes the shared threads were all held
    and an upload's file work waited. A probe still under way is waited on again instead."""
    import asyncio
    import threading
    from types import SimpleNamespace

    import gateway.api.ops as ops

    monkeypatch.setattr(ops, "BLOBS_PROBE_S", 0.1)
    release, calls = threading.Event(), []

    class Hung:
        def writable(self) -> bool:
            calls.append(1)
            release.wait(10)
            return True

    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace()))

    async def probes() -> list[bool]:
        answers = []
        for _ in range(4):
            request.app.state.blobs_cache = None  # past the one-second cache each time
            answers.append(await ops._blobs_writable(request, Hung()))
        answers.append(len(calls))  # one thread for the four probes of the hang
        release.set()
        await asyncio.sleep(0.2)
        request.app.state.blobs_cache = None
        answers.append(await ops._blobs_writable(request, Hung()))
        return answers

    assert asyncio.run(probes()) == [False] * 4 + [1, True]


def test_a_probe_hung_on_the_store_does_not_hold_the_event_loops_end(monkeypatch):
    """The probe's thread was one of the loop's default pool, which ``asyncio.run`` joins at its end: a gateway stopped
    while a probe hung on the bucket waited for the S3 read timeout (30 s) before it exited."""
    import asyncio
    import threading
    from types import SimpleNamespace

    import gateway.api.ops as ops

    monkeypatch.setattr(ops, "BLOBS_PROBE_S", 0.1)
    release = threading.Event()

    class Hung:
        def writable(self) -> bool:
            release.wait(30)
            return True

    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace()))
    t0 = time.monotonic()
    try:
        assert asyncio.run(ops._blobs_writable(request, Hung())) is False
        took = time.monotonic() - t0
    finally:
        release.set()
    assert took < 5, f"the event loop's end waited {took:.1f} s for the hung probe"


def test_a_shutdown_ends_the_retention_deletes_between_two_keys(tmp_path):
    """Cancelling the sweeper did not stop its thread of deletes, and the process waited for all of them at exit
    (100,000 expired blobs: about 40 minutes, past any grace period)."""
    import threading

    from gateway.settings import Settings
    from gateway.store import Store
    from gateway.worker import Sweeper

    blobs = FolderBlobs(tmp_path / "blobs")
    keys = new_keys(5)
    blobs.put_many([(k, b"x") for k in keys])
    sweeper = Sweeper(Store(f"sqlite:///{tmp_path / 'db.sqlite'}"), blobs, Settings(data_dir=tmp_path))
    stop = threading.Event()
    stop.set()
    assert sweeper._delete_each(keys, stop) is None
    assert all((tmp_path / "blobs" / k).exists() for k in keys)
