"""STOW-RS durability and study versions: an instance answered 200 is never lost (``gateway/stow.py``).

Accepted instances are in the blob store and the state store before the answer; a study still in its
quiet period when the gateway stops is screened by the next app on the same data folder (with every
instance); an instance arriving after completion opens a new version of the study, screened again with
every instance; a blob that cannot be written is answered as a failure and recorded nowhere.

One-layer tests: Triton is the fake client of ``tests/gateway_app_fakes.py`` (these tests are about
the gateway's intake and store; the real inference path is ``tests/test_e2e_gateway.py`` and the
process-kill tests are ``tests/test_gateway_cluster.py``). DICOM parsing, SQLite and the case rule are
the real ones.
"""

from __future__ import annotations

import errno
import io
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

from aggregator.schema import CaseResult
from aggregator.sr import sr_uids
from gateway.dimse_scu import steady_reactor
from gateway.main import create_app
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet, ct_series
from tests.test_gateway_app_api import related_body, wait_job

STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'


def _app(quiet_s: float, data_dir: Path, **settings):
    settings = Settings(triton_urls="fake:1", stow_quiet_period_s=quiet_s, data_dir=data_dir, **settings)
    return create_app(settings, client_factory=FakeFleet())


def _stow(client: TestClient, files) -> dict:
    r = client.post("/dicomweb/studies", content=related_body([d for _, d in files]), headers={"content-type": STOW_TYPE})
    assert r.status_code == 200, r.text
    return r.json()


def _screened(client: TestClient, uid: str, timeout: float = 15.0, not_job: str | None = None) -> dict:
    """The finished job of study ``uid`` (waits for the quiet period and the screening)."""
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"/v1/studies/{uid}").json()
        if view.get("state") in ("done", "failed") and view.get("job_id") != not_job:
            return wait_job(client, view["job_id"])
        assert time.monotonic() < deadline, view
        time.sleep(0.05)


def _completed(client: TestClient, uid: str, not_job: str | None = None) -> dict:
    """Close the study's receiving version now (``POST /v1/studies/{uid}/complete``) and wait for its job. The tests
    of versions close them so, under a quiet period no test reaches: with a 0.3 s one, a loaded machine (CI once)
    closed a version between two instances of one STOW request, and the study had a version too many."""
    r = client.post(f"/v1/studies/{uid}/complete")
    assert r.status_code == 202, r.text
    return _screened(client, uid, not_job=not_job)


def _unchanged(client: TestClient, uid: str, job_id: str) -> None:
    """No version opened: the study is done with ``job_id`` (one opened would read 'receiving' at once)."""
    view = client.get(f"/v1/studies/{uid}").json()
    assert (view["state"], view["job_id"]) == ("done", job_id), view


def _blobs(folder: Path) -> int:
    return sum(1 for p in (folder / "blobs").rglob("*") if p.is_file())


class _AtAnswer:
    """ASGI wrapper that looks at the data folder the moment a STOW answer starts, before its client gets
    it: ``seen`` holds ``(status, blob files, instance rows committed)`` per answer."""

    def __init__(self, app, data_dir: Path) -> None:
        self.app, self.data_dir, self.seen = app, data_dir, []

    def _rows(self) -> int:
        with closing(sqlite3.connect(f"file:{self.data_dir / 'ctscreen.db'}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM instances").fetchone()[0]

    async def __call__(self, scope, receive, send):
        async def answer(message):
            if message["type"] == "http.response.start" and scope["path"] == "/dicomweb/studies":
                self.seen.append((message["status"], _blobs(self.data_dir), self._rows()))
            await send(message)

        await self.app(scope, receive, answer)


def test_accepted_instances_survive_a_restart_and_are_screened(tmp_path):
    uid, files = ct_series(8, lesion=(2, 3, 4))
    app = _AtAnswer(_app(60.0, tmp_path), tmp_path)
    with TestClient(app) as client:
        _stow(client, files[:5])
        _stow(client, files[5:])
        assert client.get(f"/v1/studies/{uid}").json()["state"] == "receiving"
    assert app.seen == [(200, 5, 5), (200, 8, 8)]  # blobs on disk and rows committed before each 200
    # stopped inside the quiet period: not screened (it might have been incomplete), kept
    with TestClient(_app(0.2, tmp_path)) as client:
        job = _screened(client, uid)
        assert job["state"] == "done", job
        assert job["files"] == 8 and job["slices_total"] == 8
        assert job["origin"] == "stow"
        assert job["result"]["verdict"] == "positive"


def test_late_instance_opens_a_new_version_screened_with_every_instance(tmp_path):
    uid, files = ct_series(6, lesion=(1, 2, 3), size=128)
    with TestClient(_app(3600.0, tmp_path)) as client:
        _stow(client, files[:5])
        first = _completed(client, uid)
        assert first["state"] == "done" and first["files"] == 5
        _stow(client, files[5:])  # after completion
        second = _completed(client, uid, not_job=first["job_id"])
        assert second["files"] == 6 and second["result"]["n_slices"] == 6
        # the SR of version 2 names version 1's as its predecessor (the API's SR is the delivered one)
        sr = pydicom.dcmread(io.BytesIO(client.get(f"/v1/jobs/{second['job_id']}/sr").content))
        named = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert named.ReferencedSOPInstanceUID == sr_uids(CaseResult.model_validate(first["result"]))[1]
        first_sr = pydicom.dcmread(io.BytesIO(client.get(f"/v1/jobs/{first['job_id']}/sr").content))
        assert "PredecessorDocumentsSequence" not in first_sr and first_sr.SOPInstanceUID == named.ReferencedSOPInstanceUID
        again = _stow(client, files[:1])  # an instance it was screened with, again (a PACS replaying its route)
        assert len(again["00081199"]["Value"]) == 1  # acknowledged
        _unchanged(client, uid, second["job_id"])  # no version opens, no second screening, no second SR
        assert client.get(f"/v1/jobs/{first['job_id']}").json()["state"] == "done"  # history kept


def test_an_instance_sent_again_after_retention_screens_nothing(tmp_path):
    """The reviewer's case: a study screened positive, then retention deleted its instances and blobs, then
    ``storescu`` sent one of them again. It opened a version of that one slice, screened indeterminate, whose
    delivery retracted the positive SR at the PACS and replaced the report at the RIS. The UIDs stay known: it is
    acknowledged and kept nowhere. A new instance still opens the next version: of the instances received since."""
    uid, files = ct_series(8, lesion=(2, 3, 4))
    app = _app(3600.0, tmp_path)
    with TestClient(app) as client:
        _stow(client, files[:7])
        first = _completed(client, uid)
        assert first["result"]["verdict"] == "positive"
        # retention, as the sweeper runs it (instances_s -1: a job finished within the second is past it)
        for key in client.portal.call(app.state.store.expire, 86400.0, -1.0):
            app.state.blobs.delete(key)
        assert _blobs(tmp_path) == 0
        again = _stow(client, files[:1])
        assert len(again["00081199"]["Value"]) == 1  # acknowledged
        study = client.get(f"/v1/studies/{uid}").json()
        assert (study["state"], study["job_id"]) == ("done", first["job_id"])  # no version opened
        assert _blobs(tmp_path) == 0  # and not kept
        _stow(client, files[7:])  # a new instance
        second = _completed(client, uid, not_job=first["job_id"])
        assert second["version"] == 2 and second["files"] == 1


def test_a_changed_instance_of_the_same_size_opens_a_new_version(tmp_path):
    """An instance sent again with its pixels corrected, of the same size, was acknowledged and dropped as 'an
    instance it was screened with' (compared by UID and size only): the study kept its old verdict. Its data set is
    compared now; the same bytes again (a route replayed) still open nothing."""
    uid, files = ct_series(4, lesion=(1, 2), size=128)
    with TestClient(_app(3600.0, tmp_path)) as client:
        _stow(client, files)
        first = _completed(client, uid)
        assert first["state"] == "done"
        _stow(client, files[:1])  # the same bytes: kept once
        _unchanged(client, uid, first["job_id"])
        ds = pydicom.dcmread(io.BytesIO(files[0][1]))
        pixels = ds.pixel_array.copy()
        pixels[10:30, 10:30] = 900  # a correction: same size, other pixels
        ds.PixelData = pixels.tobytes()
        fixed = io.BytesIO()
        ds.save_as(fixed, enforce_file_format=True)
        assert len(fixed.getvalue()) == len(files[0][1])
        _stow(client, [(files[0][0], fixed.getvalue())])
        second = _completed(client, uid, not_job=first["job_id"])
        assert second["state"] == "done" and second["files"] == 4


def _reencoded(data: bytes, syntax, **kw) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    if syntax is None:  # implicit VR little endian, native pixels
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    else:
        ds.compress(syntax, generate_instance_uid=False, **kw)  # a route keeps the UID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert out.getvalue() != data
    return out.getvalue()


def test_same_instance_is_the_same_data_set_whatever_the_transfer_syntax_and_not_a_lossy_or_corrected_one():
    """A PACS forwarding a study again may re-encode it; lossless, it is the same instance (each element and
    each stored pixel value the same); lossy, a pixel or an element changed, it is not."""
    from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless, RLELossless

    from gateway.dicom import same_instance

    _, files = ct_series(1, lesion=(0,), size=128)
    data = files[0][1]
    for syntax in (None, RLELossless, JPEGLSLossless, JPEG2000Lossless):
        again = _reencoded(data, syntax)
        assert same_instance(again, data) and same_instance(data, again), syntax
    assert not same_instance(_reencoded(data, JPEG2000, j2k_cr=[40], use_mct=False), data)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SeriesDescription = "corrected"
    fixed = io.BytesIO()
    ds.save_as(fixed, enforce_file_format=True)
    assert not same_instance(fixed.getvalue(), data)
    assert not same_instance(_reencoded(fixed.getvalue(), RLELossless), data)  # an element changed, then RLE
    assert not same_instance(b"not DICOM at all", data)


def test_a_study_forwarded_again_in_another_transfer_syntax_is_not_screened_again(tmp_path):
    """The same instances again, decompressed or re-encoded losslessly by a PACS route (another size): the
    size alone opened a new version, screened again with a second SR. Kept once now; a lossy re-encoding of
    one instance (other pixels) opens the next version."""
    from pydicom.uid import JPEG2000, RLELossless

    uid, files = ct_series(4, lesion=(1, 2), size=128)
    with TestClient(_app(3600.0, tmp_path)) as client:
        _stow(client, files)
        first = _completed(client, uid)
        assert first["state"] == "done"
        again = _stow(client, [(name, _reencoded(data, RLELossless)) for name, data in files])
        assert len(again["00081199"]["Value"]) == 4  # acknowledged
        _unchanged(client, uid, first["job_id"])
        _stow(client, [(files[0][0], _reencoded(files[0][1], JPEG2000, j2k_cr=[40], use_mct=False))])
        second = _completed(client, uid, not_job=first["job_id"])
        assert second["state"] == "done" and second["files"] == 4


def test_while_a_later_version_arrives_the_study_shows_the_previous_result(tmp_path):
    """A late instance opened version 2: while it was received, GET /v1/studies/{uid} said 'receiving' with
    version 1's job id and no result (a review: a consumer could not tell the study had a verdict). It keeps
    version 1's job and result until version 2 is screened."""
    uid, files = ct_series(5, lesion=(1, 2, 3), size=128)
    with TestClient(_app(1.5, tmp_path)) as client:
        _stow(client, files[:4])
        first = _screened(client, uid)
        _stow(client, files[4:])  # the late one
        view = client.get(f"/v1/studies/{uid}").json()
        assert view["state"] == "receiving" and view["instances_received"] == 5, view
        assert view["job_id"] == first["job_id"] and view["result"] == first["result"]
        second = _screened(client, uid, not_job=first["job_id"])
        assert client.get(f"/v1/studies/{uid}").json()["result"]["job_id"] == second["job_id"]


def test_explicit_complete_is_once_per_version(tmp_path):
    uid, files = ct_series(4, size=128)
    with TestClient(_app(3600.0, tmp_path)) as client:
        _stow(client, files)
        a = client.post(f"/v1/studies/{uid}/complete").json()
        b = client.post(f"/v1/studies/{uid}/complete").json()
        assert a["job_id"] == b["job_id"]  # the second call answers the version's job
        assert wait_job(client, a["job_id"])["state"] == "done"


@pytest.mark.parametrize(("error", "status", "reason"), [
    (OSError(errno.EIO, "Input/output error"), 409, 0x0110),
    # a full volume is for now: 0xA700 and a 503 with Retry-After, so the sender keeps the instances and
    # sends them again (a review: 0x0110, which senders may not retry, and the instances were lost there)
    (OSError(errno.ENOSPC, "No space left on device"), 503, 0xA700),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 503, 0xA700),
])
def test_an_instance_that_cannot_be_written_is_refused_and_not_recorded(tmp_path, error, status, reason):
    uid, files = ct_series(2, size=128)
    with TestClient(_app(3600.0, tmp_path)) as client:
        blobs = client.app.state.blobs

        def broken(items):
            raise error

        blobs.put_many = broken
        r = client.post("/dicomweb/studies", content=related_body([d for _, d in files]),
                        headers={"content-type": STOW_TYPE})
        assert r.status_code == status, r.text
        assert {i["00081197"]["Value"][0] for i in r.json()["00081198"]["Value"]} == {reason}
        assert client.get(f"/v1/studies/{uid}").status_code == 404


# --- the Store Instances Response when the gateway cannot keep more (PS3.18 10.5.3, Annex I) -----------
def _failure_reasons(answer: dict) -> set[int]:
    return {i["00081197"]["Value"][0] for i in answer["00081198"]["Value"]}


def test_a_full_volume_refuses_every_instance_as_busy_and_keeps_none(tmp_path):
    """Below the disk watermark (the same setting C-STORE obeys) STOW-RS keeps nothing: each instance fails
    0xA700 and the answer is 503 with Retry-After, so the sender keeps them and sends them later."""
    uid, files = ct_series(2, size=128)
    with TestClient(_app(3600.0, tmp_path, dicom_min_free_bytes=2**62, retry_after_s=7)) as client:
        r = client.post("/dicomweb/studies", content=related_body([d for _, d in files]),
                        headers={"content-type": STOW_TYPE})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "7" and r.headers["content-type"] == "application/dicom+json"
        assert _failure_reasons(r.json()) == {0xA700} and "00081199" not in r.json()
        assert client.get(f"/v1/studies/{uid}").status_code == 404
        assert 'reason="out_of_resources_disk_full"' in client.get("/metrics").text
    assert _blobs(tmp_path) == 0


def test_a_study_being_received_may_finish_past_the_backlog_watermark_never_past_the_disk_one(tmp_path):
    """Above the backlog watermark a new study is refused and the one being received is let finish; below
    the disk watermark even that one is refused (the disk check was skipped for it, so a nearly full
    volume kept filling); an upload obeys both too (503 out_of_resources, Retry-After)."""
    from gateway.stow import Watermark

    uid, files = ct_series(3, size=128)
    other_uid, others = ct_series(1, size=128)
    with TestClient(_app(3600.0, tmp_path, retry_after_s=7)) as client:
        intake = client.app.state.stow
        _stow(client, files[:1])
        intake.watermark = Watermark(backlog=lambda: 100, max_backlog_slices=10)
        _stow(client, files[1:2])  # the study being received
        r = client.post("/dicomweb/studies", content=related_body([d for _, d in others]),
                        headers={"content-type": STOW_TYPE})
        assert r.status_code == 503 and _failure_reasons(r.json()) == {0xA700}  # a new study
        up = client.post("/v1/studies", files=[("files", ("a.dcm", others[0][1], "application/dicom"))])
        assert up.status_code == 503 and up.json()["reason"] == "out_of_resources", up.text
        assert up.headers["retry-after"] == "7" and "waiting to be screened" in up.json()["message"]
        intake.watermark = Watermark(disk=tmp_path, min_free_bytes=2**62)
        r = client.post("/dicomweb/studies", content=related_body([d for _, d in files[2:]]),
                        headers={"content-type": STOW_TYPE})
        assert r.status_code == 503 and _failure_reasons(r.json()) == {0xA700}, r.text  # even the study being received
        up = client.post("/v1/studies", files=[("files", ("a.dcm", others[0][1], "application/dicom"))])
        assert up.status_code == 503 and "nearly full" in up.json()["message"]
        metrics = client.get("/metrics").text
        assert 'reason="out_of_resources_backlog"' in metrics and 'reason="out_of_resources_disk_full"' in metrics
        assert client.get(f"/v1/studies/{uid}").json()["instances_received"] == 2
        assert client.get(f"/v1/studies/{other_uid}").status_code == 404


def test_a_state_store_that_cannot_answer_is_busy_not_an_internal_error(tmp_path, caplog):
    """The state store away (a fail-over) while instances arrive: 503 and 0xA700 per instance, counted;
    it was an unexpected error (a traceback, 503 internal_error, no Store Instances Response)."""
    from gateway.store.store import StoreUnreachable

    uid, files = ct_series(2, size=128)
    with TestClient(_app(3600.0, tmp_path)) as client:
        async def away(*_args):
            raise StoreUnreachable("The state store cannot be reached (ConnectionRefusedError).")

        client.app.state.stow.room_for = away
        r = client.post("/dicomweb/studies", content=related_body([d for _, d in files]),
                        headers={"content-type": STOW_TYPE})
        assert r.status_code == 503, r.text
        assert _failure_reasons(r.json()) == {0xA700}
        assert 'reason="store_unavailable"' in client.get("/metrics").text
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"


def _c_store(port: int, files, *, abort: bool = False, ae_title: str = "CT3", priority: int = 2) -> None:
    """Send ``files`` on one association (pynetdicom, a real DIMSE peer over TCP), then release or abort it.
    ``priority``: the C-STORE requests' Priority (0 MEDIUM, 1 HIGH, 2 LOW, as PS3.7 numbers them)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTSCREEN")
    assert assoc.is_established
    steady_reactor(assoc)
    for _, data in files:
        assert int(assoc.send_c_store(pydicom.dcmread(io.BytesIO(data)), priority=priority).Status) == 0
    assoc.abort() if abort else assoc.release()


def test_a_studys_priority_comes_from_c_store_its_ae_title_stow_and_the_upload(tmp_path):
    """An emergency study has to be screened before the routine ones waiting: its rank comes from the C-STORE
    requests' Priority (pynetdicom over TCP), from an AE title the site names urgent, from STOW-RS's and the
    upload's ``?priority=``; a rank that is no rank is a 422 naming the field."""
    from ctscreen.embedded import free_port

    port = free_port()
    with TestClient(_app(0.3, tmp_path, dicom_port=port, dicom_host="127.0.0.1",
                         dicom_urgent_ae_titles="ER_CT")) as client:
        cases = []
        for send, expected in ((lambda f: _c_store(port, f, priority=1), "urgent"),
                               (lambda f: _c_store(port, f, priority=0), "routine"),
                               (lambda f: _c_store(port, f), "low"),
                               (lambda f: _c_store(port, f, ae_title="ER_CT"), "urgent"),
                               (lambda f: client.post("/dicomweb/studies?priority=urgent", content=related_body(
                                   [d for _, d in f]), headers={"content-type": STOW_TYPE}), "urgent")):
            uid, files = ct_series(2, size=64)
            send(files)
            cases.append((uid, expected))
        for uid, expected in cases:
            assert _screened(client, uid)["priority"] == expected, (uid, expected)
        _, files = ct_series(2, size=64)
        up = client.post("/v1/studies?priority=urgent", files=[("files", (n, d, "application/dicom")) for n, d in files])
        assert up.status_code == 202 and up.json()["priority"] == "urgent", up.text
        bad = client.post("/v1/studies?priority=asap", files=[("files", (n, d, "application/dicom")) for n, d in files])
        assert bad.status_code == 422 and "priority" in bad.text, bad.text


def test_a_study_whose_c_store_association_aborted_is_not_a_plain_negative(tmp_path):
    """A scanner's association aborted after 3 of 6 slices: the version closed on its quiet period and the 3
    slices were screened as the whole study, negative, no warning (a review's run: 9 of 60 slices of a
    COVID study, negative; the study sent again, positive). Now its result says the transfer ended without
    a release, and a negative one is indeterminate (transfer_interrupted). The study sent again whole, on an
    association released, within the quiet period: a plain result; a released association that adds only a few
    instances leaves the warning."""
    from ctscreen.embedded import free_port

    port = free_port()
    with TestClient(_app(1.0, tmp_path, dicom_port=port, dicom_host="127.0.0.1")) as client:
        cut, files = ct_series(6, size=128)
        _c_store(port, files[:3], abort=True)
        cut_off = _screened(client, cut)
        assert cut_off["result"]["verdict"] == "indeterminate", cut_off["result"]
        assert cut_off["result"]["reason"] == "transfer_interrupted" and cut_off["result"]["n_slices"] == 3
        assert any("CT3 ended without a release" in w for w in cut_off["result"]["warnings"])
        again, files = ct_series(6, size=128)
        _c_store(port, files[:3], abort=True)
        _c_store(port, files, abort=False)  # the sender retries the whole study at once
        whole = _screened(client, again)
        assert whole["result"]["verdict"] == "negative" and whole["result"]["n_slices"] == 6
        assert not any("without a release" in w for w in whole["result"]["warnings"])
        added, files = ct_series(6, size=128)  # a review's run: any released association cleared the note, and
        _c_store(port, files[:3], abort=True)  # 4 of 6 slices read as a plain negative
        _c_store(port, files[3:4], ae_title="CT4")  # a second sender adds one instance; released
        partial = _screened(client, added)
        assert partial["result"]["reason"] == "transfer_interrupted" and partial["result"]["n_slices"] == 4, partial
        positive, files = ct_series(8, lesion=(1, 2, 3), shuffle_seed=None)
        _c_store(port, files[:5], abort=True)  # the run was in what came: positive stands, with the warning
        found = _screened(client, positive)
        assert found["result"]["verdict"] == "positive", found["result"]["reason"]
        assert any("without a release" in w for w in found["result"]["warnings"])


def _sql(url: str, *statements: str) -> None:
    import asyncio

    import asyncpg

    async def go():  # from the server's own database: the test's may be read-only
        conn = await asyncpg.connect(url.replace("postgresql://", "postgres://").rsplit("/", 1)[0] + "/postgres")
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(go())


def test_a_read_only_state_store_is_retry_later_and_not_ready_and_says_so_once(pg_url, tmp_path, caplog):
    """A fail-over left the gateway on the old primary, now read-only (real PostgreSQL, the database set
    ``default_transaction_read_only``). STOW answered 409 with 0x0110 (a failure routers do not retry), an
    upload 503 internal_error, /readyz 200 (only SELECT 1), the start-up sweep a traceback of 160 lines and
    the loops one traceback every pass. Now: the start goes on, /readyz is 503, STOW 503 with 0xA700 and
    Retry-After, an upload 503 store_unavailable, no traceback; writable again, the same instances are kept."""
    import logging

    from gateway.store.migrate import upgrade

    upgrade(pg_url)
    database = pg_url.rsplit("/", 1)[1]
    _sql(pg_url, f"ALTER DATABASE {database} SET default_transaction_read_only = on")
    caplog.set_level(logging.INFO)
    uid, files = ct_series(2, size=128)
    app = create_app(Settings(triton_urls="fake:1", stow_quiet_period_s=3600.0, data_dir=tmp_path,
                              database_url=pg_url, sweep_interval_s=0.2), client_factory=FakeFleet())
    with TestClient(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["store"] is False, ready.text
        r = client.post("/dicomweb/studies", content=related_body([d for _, d in files]),
                        headers={"content-type": STOW_TYPE})
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert _failure_reasons(r.json()) == {0xA700}
        up = client.post("/v1/studies", files=[("files", (n, d, "application/dicom")) for n, d in files])
        assert up.status_code == 503 and up.json()["reason"] == "store_unavailable", up.text
        time.sleep(1.0)  # five sweeps and claims against the read-only store
        assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"
        sweeps = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("sweep:")]
        assert len(sweeps) <= 2 and "ReadOnlySQLTransactionError 25006" in sweeps[-1], sweeps  # the start-up's and the loop's first
        _sql(pg_url, f"ALTER DATABASE {database} SET default_transaction_read_only = off",
             f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}' "
             "AND pid <> pg_backend_pid()")  # the fail-over ends: the gateway's connections are new ones
        deadline = time.monotonic() + 20
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/readyz").status_code == 200
        r = client.post("/dicomweb/studies", content=related_body([d for _, d in files]),
                        headers={"content-type": STOW_TYPE})
        assert r.status_code == 200, r.text
        assert client.get(f"/v1/studies/{uid}").json()["instances_received"] == 2
        deadline = time.monotonic() + 20  # the loops' next pass says it (the sweeper every 0.2 s)
        while not any("the state store answers again" in rec.getMessage() for rec in caplog.records):
            assert time.monotonic() < deadline, "no loop said the state store answers again"
            time.sleep(0.1)


def test_a_stow_instance_larger_than_the_worker_reads_fails_alone_not_the_study_after_a_200(tmp_path):
    """STOW-RS kept an instance over the per-file limit (1 GiB) that C-STORE refuses: the request was answered
    200, then the whole study failed (too_large) and its other slices were never screened (a review's run, the
    limit scaled down). Now that instance fails alone (0xA700) and the study is screened without it."""
    from pydicom.tag import Tag

    uid, files = ct_series(5, size=64)
    big = pydicom.dcmread(io.BytesIO(files[2][1]))
    big.add_new(Tag(0x0009, 0x0010), "LO", "CTSCREEN TEST")
    big.add_new(Tag(0x0009, 0x1001), "OB", bytes(64 * 1024))
    out = io.BytesIO()
    big.save_as(out, enforce_file_format=True)
    files[2] = (files[2][0], out.getvalue())
    assert all(len(d) < 40 * 1024 for i, (_, d) in enumerate(files) if i != 2) and len(files[2][1]) > 40 * 1024
    with TestClient(_app(0.5, tmp_path)) as client:
        client.app.state.stow.max_instance_bytes = 40 * 1024  # a stand-in for 1 GiB
        r = client.post("/dicomweb/studies", content=related_body([d for _, d in files]),
                        headers={"content-type": STOW_TYPE})
        assert r.status_code == 202, r.text
        [failure] = r.json()["00081198"]["Value"]
        assert failure["00081197"]["Value"] == [0xA700] and failure["00081155"]["Value"] == [big.SOPInstanceUID]
        job = _screened(client, uid)
    assert job["state"] == "done" and job["result"]["n_slices"] == 4, job


def test_stored_instances_carry_an_empty_retrieve_url(tmp_path):
    """Retrieve URL (0008,1190) is Type 2 at the top and in each stored item: present, empty (no WADO-RS);
    a failed item has none. A study of some stored and some refused is 202."""
    uid, files = ct_series(2, size=128)
    _, others = ct_series(1, size=128)  # another study: 0xA900 on this study's URL
    with TestClient(_app(3600.0, tmp_path)) as client:
        r = client.post(f"/dicomweb/studies/{uid}", content=related_body([d for _, d in files + others]),
                        headers={"content-type": STOW_TYPE})
        assert r.status_code == 202, r.text
        answer = r.json()
        assert answer["00081190"] == {"vr": "UR"}
        assert [i["00081190"] for i in answer["00081199"]["Value"]] == [{"vr": "UR"}] * 2
        assert [sorted(i) for i in answer["00081198"]["Value"]] == [["00081150", "00081155", "00081197"]]
        assert _failure_reasons(answer) == {0xA900}
        assert "RetrieveURL" in pydicom.Dataset.from_json(answer)  # valid DICOM JSON, the element empty
