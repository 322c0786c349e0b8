"""Unit tests of the gateway app (routes, jobs, STOW-RS, limits, metrics) with ``TestClient(app)``.

DICOM decoding, series selection and the case rule are the real ones; only Triton is replaced, by the
fake client of ``tests/gateway_app_fakes.py`` (a one-layer unit test: it "finds" a lesion on slices
carrying a marker patch). The real Triton path is ``tests/test_e2e_gateway.py``.
"""

from __future__ import annotations

import io
import json
import time
import zipfile

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from gateway.main import create_app
from gateway.settings import Settings
from tests.gateway_app_fakes import FakeFleet, ct_series, wait_job


def _app(fleet: FakeFleet | None = None, **settings):
    settings.setdefault("triton_urls", "fake:1")
    return create_app(Settings(**settings), client_factory=fleet or FakeFleet())


def upload_files(files):
    return [("files", (name, data, "application/dicom")) for name, data in files]


def related_body(parts: list[bytes], boundary: str = "b0undary", part_type: str = "application/dicom") -> bytes:
    out = b""
    for p in parts:
        out += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'


def test_a_priority_sent_as_a_form_field_is_refused_not_ignored():
    """``curl -F priority=urgent`` (a form field, not ``?priority=``) was taken for a file named part-N, refused
    as not DICOM, and the study screened as routine without a word: an emergency study queued behind the day's
    work. Other form fields stay what they were (a file each, refused as not DICOM in the result)."""
    _, files = ct_series(6, size=64)
    with TestClient(_app()) as client:
        r = client.post("/v1/studies", files=upload_files(files), data={"priority": "urgent"})
        assert r.status_code == 400 and r.json()["reason"] == "bad_upload", r.text
        assert "'priority' is not read: priority is a query parameter (POST /v1/studies?priority=...)" in r.text
        r = client.post("/v1/studies", files=upload_files(files), data={"note": "hello"}, params={"priority": "urgent"})
        assert r.status_code == 202 and r.json()["priority"] == "urgent", r.text


def test_a_parts_filename_is_read_as_rfc_2231_says():
    """Content-Disposition parameters are parsed (``gateway.uploads.media_parameters``), not searched for: a
    ``filename*=UTF-8''...`` part was named ``UTF-8''r%C3%A9sum%C3%A9.txt`` in the result's refused files."""
    _, files = ct_series(6, size=64)
    body, boundary = b"", "b0undary"
    parts = [(f'form-data; name="files"; filename="{n}"', d) for n, d in files]
    parts.append(("form-data; name=\"files\"; filename*=UTF-8''r%C3%A9sum%C3%A9.txt", b"not dicom"))
    for disposition, data in parts:
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    with TestClient(_app()) as client:
        r = client.post("/v1/studies", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"])
    assert job["state"] == "done" and "résumé.txt" in json.dumps(job, ensure_ascii=False), job
    assert "UTF-8''" not in json.dumps(job), job


# --- settings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [("triton_urls", "http://a:8001"), ("triton_urls", "a"), ("triton_urls", "a:99999"),
     ("triton_urls", "a:1,a:1"), ("triton_timeout_s", 0), ("triton_timeout_s", -1)],
)
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ValidationError):
        Settings(**{field: value})


def test_the_lease_must_outlast_three_renewal_periods():
    with pytest.raises(ValidationError, match="at most a third of CTSCREEN_LEASE_S"):
        Settings(lease_s=10, progress_interval_s=20)
    assert Settings(lease_s=1.5, progress_interval_s=0.5).lease_s == 1.5


def test_a_lease_renewal_that_fails_once_is_tried_again_and_the_job_is_not_resumed_twice(monkeypatch):
    """One failed renewal ended the renewals for good: the lease lapsed mid-study and this replica's own
    loop claimed the job a second time (attempts 2, two tasks). Now the next tick renews it."""
    from sqlalchemy.exc import OperationalError

    from gateway.jobs import JobState
    from gateway.store import Store

    real = Store.heartbeat
    failed, seen = [], []

    async def flaky(self, job_id, lease_s, **kw):
        seen.append(sorted(kw))
        if kw.get("state") in (None, JobState.inferring) and "slices_total" not in kw and not failed:
            failed.append(job_id)  # the renewal loop's first write
            raise OperationalError("UPDATE jobs", {}, Exception("database is locked"))
        return await real(self, job_id, lease_s, **kw)

    monkeypatch.setattr(Store, "heartbeat", flaky)
    fleet = FakeFleet(**{"fake:1": {"delay": 0.5}})  # the study takes several leases' time
    with TestClient(_app(fleet, lease_s=1.2, progress_interval_s=0.1, triton_batch_size=2, triton_max_inflight=1,
                         screen_ahead=False)) as client:  # every slice screened by the worker, under its lease
        _, files = ct_series(12, lesion=(3, 4, 5), size=64)
        r = client.post("/v1/studies", files=upload_files(files))
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"], timeout=60)
    assert failed, f"the renewal loop never wrote progress: {seen}"
    assert (job["state"], job["attempts"]) == ("done", 1), job


def test_a_job_retried_after_its_spool_was_swept_reads_the_blob_store(tmp_path):
    """The worker kept the decoded upload (its pixels still in the spooled files) and preferred it at the
    retry; after an outage longer than the spool sweep's age the files were gone and the job failed as
    'internal' (Deferred read ... missing). An entry older than the job deadline is no longer used."""
    import shutil

    fleet = FakeFleet(**{"fake:1": {"ready": False}})  # Triton away: the job waits, queued
    with TestClient(_app(fleet, data_dir=tmp_path, job_deadline_s=1.0, retry_backoff_s=0.2, retry_backoff_max_s=0.2,
                         screen_ahead=False)) as client:
        _, files = ct_series(6, lesion=(2, 3, 4))  # 512 x 512: pixel data large enough to be read when decoded
        r = client.post("/v1/studies", files=upload_files(files))
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert wait_job(client, job_id)["error"]["reason"] == "triton_unavailable"  # failed at its deadline
        for folder in (tmp_path / "spool").glob("upload-*"):  # what the sweep does to folders past its age
            shutil.rmtree(folder)
        time.sleep(1.1)  # the kept entry is older than the deadline now
        fleet.clients["fake:1"].ready = True  # Triton is back
        assert client.post(f"/v1/jobs/{job_id}/retry").status_code == 202
        job = wait_job(client, job_id)
    assert job["state"] == "done", job


def test_an_empty_variable_is_an_unset_one(monkeypatch):
    """CTSCREEN_DATA_DIR= put the state store in the working folder; CTSCREEN_AUTH_API_KEYS_FILE= named "."."""
    monkeypatch.setenv("CTSCREEN_DATA_DIR", "")
    monkeypatch.setenv("CTSCREEN_AUTH_API_KEYS_FILE", "")
    s = Settings()
    assert s.data_dir == Settings.model_fields["data_dir"].get_default(call_default_factory=True)
    assert s.auth_api_keys_file is None


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("CTSCREEN_TRITON_URLS", "t0:8001,t1:8001")
    monkeypatch.setenv("CTSCREEN_TRITON_TIMEOUT_S", "7.5")
    s = Settings()
    assert s.triton_urls == ["t0:8001", "t1:8001"] and s.triton_timeout_s == 7.5


# --- uploads ----------------------------------------------------------------------------------------
def test_upload_positive_study_with_progress_events_and_metrics():
    fleet = FakeFleet()
    uid, files = ct_series(10, lesion=[4, 5, 6])
    with TestClient(_app(fleet)) as client:
        r = client.post("/v1/studies", files=upload_files(files))
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["slices_total"] == 10 and r.headers["location"] == f"/v1/jobs/{job['job_id']}"
        with client.stream("GET", f"/v1/jobs/{job['job_id']}/events") as stream:
            text = stream.read().decode()
        assert text.rstrip().split("\n\n")[-1].startswith("event: done")
        view = wait_job(client, job["job_id"])
        result = view["result"]
        assert result["verdict"] == "positive" and result["reason"] == "run_found"
        assert result["evidence"]["quadrant"] == "top_left"
        assert [s["index"] for s in result["evidence"]["slices"]] == [4, 5, 6]
        assert result["study_instance_uid"] == uid and result["n_slices"] == 10
        assert view["slices_done"] == 10
        study = client.get(f"/v1/studies/{uid}").json()
        assert study["state"] == "done" and study["result"]["verdict"] == "positive"
        metrics = client.get("/metrics").text
        for name in ("ctscreen_backlog_slices", "ctscreen_stage_seconds_bucket",
                     "ctscreen_triton_slices_total", "ctscreen_errors_total"):
            assert name in metrics
        assert "ctscreen_backlog_seconds" not in metrics  # the fleet signal is computed once, in Prometheus
        assert 'ctscreen_studies_total{verdict="positive"} 1.0' in metrics
        assert "ctscreen_slices_total 10.0" in metrics
    assert fleet.clients["fake:1"].closed  # the lifespan closed the client


def test_every_job_event_carries_the_job_as_get_gives_it():
    """``GET /v1/jobs/{id}/events`` read the job without its study's version: each event said ``"version": null``
    (and no ``newest_version``) while ``GET /v1/jobs/{id}`` gave 1. Every event's job is the same document as
    GET's: the same fields, the same version; a ``progress`` event's without its result, ``done``'s all of it."""
    uid, files = ct_series(10, lesion=[4, 5, 6])
    with TestClient(_app(FakeFleet(**{"fake:1": {"delay": 0.05}}))) as client:
        r = client.post("/dicomweb/studies", content=related_body([f for _, f in files]),
                        headers={"Content-Type": STOW_TYPE})
        assert r.status_code == 200, r.text
        job_id = client.post(f"/v1/studies/{uid}/complete").json()["job_id"]
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            text = stream.read().decode()
        view = wait_job(client, job_id)
    assert view["version"] == 1 and view["newest_version"] == 1, view
    events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\ndata: ", 1)[1]))
              for block in text.strip().split("\n\n") if block.startswith("event: ")]
    assert [kind for kind, _ in events][-1] == "done" and "progress" in dict(events), text
    for kind, data in events:
        assert data["version"] == 1 and data["newest_version"] == 1 and data["superseded_by"] is None, (kind, data)
        assert set(data) == set(view) - ({"result"} if kind == "progress" else set()), (kind, data)
    assert events[-1][1] == view


def test_an_upload_is_decoded_once():
    """The route decodes the upload (to answer 4xx) and hands it to its own worker: no second decode."""
    from gateway.ingest import load_study

    calls = []

    def loader(sources):
        calls.append(len(sources))
        return load_study(sources)

    _, files = ct_series(6, lesion=[1, 2, 3])
    app = create_app(Settings(triton_urls="fake:1"), client_factory=FakeFleet(), loader=loader)
    with TestClient(app) as client:
        r = client.post("/v1/studies", files=upload_files(files))
        assert wait_job(client, r.json()["job_id"])["result"]["verdict"] == "positive"
    assert calls == [6]


def test_zip_upload_negative_study():
    _, files = ct_series(8, lesion=[2, 3])  # two in a row: not enough
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files:
            zf.writestr(f"study/{name}", data)
    with TestClient(_app()) as client:
        r = client.post("/v1/studies", content=buf.getvalue(), headers={"Content-Type": "application/zip"})
        assert r.status_code == 202, r.text
        assert wait_job(client, r.json()["job_id"])["result"]["verdict"] == "negative"


def test_too_few_slices_is_indeterminate_not_negative():
    _, files = ct_series(2, lesion=[0, 1])
    with TestClient(_app()) as client:
        r = client.post("/v1/studies", files=upload_files(files))
        assert r.status_code == 202, r.text
        result = wait_job(client, r.json()["job_id"])["result"]
        assert result["verdict"] == "indeterminate" and result["reason"] == "too_few_slices"
        assert result["n_slices"] == 2


def test_refused_file_does_not_sink_the_study():
    _, files = ct_series(6, lesion=[1, 2, 3])
    with TestClient(_app()) as client:
        r = client.post("/v1/studies", files=upload_files([*files, ("notes.txt", b"hello, not dicom")]))
        assert r.status_code == 202, r.text
        result = wait_job(client, r.json()["job_id"])["result"]
        assert result["verdict"] == "positive"
        assert [(x["filename"], x["reason"]) for x in result["rejected"]] == [("notes.txt", "not_dicom")]


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"this is not a DICOM file at all" * 10, 415, "not_dicom"),
        (_zip({"../../etc/passwd": b"x"}), 400, "unsafe_path"),
        (_zip({"bomb.dcm": b"\0" * (8 * 1024 * 1024)}), 413, "zip_bomb"),
    ],
    ids=["not-dicom", "path-traversal", "zip-bomb"],
)
def test_bad_inputs_get_specific_4xx(body, status, reason):
    with TestClient(_app()) as client:
        r = client.post("/v1/studies", files=[("files", ("upload.bin", body, "application/octet-stream"))])
        assert r.status_code == status, r.text
        assert r.json()["reason"] == reason
        assert f'ctscreen_errors_total{{reason="{reason}"}} 1.0' in client.get("/metrics").text


def test_oversize_upload_is_413():
    with TestClient(_app(max_upload_bytes=4096)) as client:
        r = client.post("/v1/studies", content=b"\0" * 5000, headers={"Content-Type": "application/dicom"})
        assert r.status_code == 413 and r.json()["reason"] == "too_large"


def test_empty_upload_is_400():
    with TestClient(_app()) as client:
        r = client.post("/v1/studies", content=b"", headers={"Content-Type": "application/dicom"})
        assert 400 <= r.status_code < 500 and "reason" in r.json()


def test_full_gateway_answers_429_with_retry_after():
    fleet = FakeFleet(**{"fake:1": {"delay": 0.3}})
    with TestClient(_app(fleet, max_concurrent_studies=1, max_queued_studies=0, urgent_slots=0,
                         retry_after_s=7)) as client:
        _, files = ct_series(8)
        first = client.post("/v1/studies", files=upload_files(files))
        assert first.status_code == 202
        second = client.post("/v1/studies", files=upload_files(files))
        assert second.status_code == 429 and second.headers["retry-after"] == "7"
        assert second.json()["reason"] == "busy"
        # routine work does not turn away an urgent study: it counts urgent jobs only (and goes first)
        urgent = client.post("/v1/studies?priority=urgent", files=upload_files(files))
        assert urgent.status_code == 202 and urgent.json()["priority"] == "urgent"
        assert client.post("/v1/studies?priority=urgent", files=upload_files(files)).status_code == 429
        assert wait_job(client, urgent.json()["job_id"])["state"] == "done"
        assert wait_job(client, first.json()["job_id"])["state"] == "done"
        assert client.post("/v1/studies", files=upload_files(files)).status_code == 202


def test_an_upload_sent_again_under_its_idempotency_key_gets_its_first_job_not_a_second_version():
    """A client that lost an upload's 202 (a connection cut once the job was committed, a proxy's timeout) could
    only send it again: a second version, screened again, a second report to the RIS. Under the same
    ``Idempotency-Key`` the first job is the answer (202, Idempotent-Replayed), even while the gateway is full
    (it was accepted once); another key is another upload; a key that is no header value is 400."""
    fleet = FakeFleet(**{"fake:1": {"delay": 0.3}})
    _, files = ct_series(8)
    with TestClient(_app(fleet, max_concurrent_studies=1, max_queued_studies=0, urgent_slots=0)) as client:
        first = client.post("/v1/studies", files=upload_files(files), headers={"Idempotency-Key": "study-1"})
        assert first.status_code == 202 and "idempotent-replayed" not in first.headers, first.text
        again = client.post("/v1/studies", files=upload_files(files), headers={"Idempotency-Key": "study-1"})
        assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true", again.text
        assert again.json()["job_id"] == first.json()["job_id"]
        assert again.headers["location"] == f"/v1/jobs/{first.json()['job_id']}"
        other = client.post("/v1/studies", files=upload_files(files), headers={"Idempotency-Key": "study-1b"})
        assert other.status_code == 429, other.text  # a new upload: the full gateway turns it away
        bad = client.post("/v1/studies", files=upload_files(files), headers={"Idempotency-Key": ""})
        assert bad.status_code == 400 and bad.json()["reason"] == "bad_request", bad.text
        uid = first.json()["study_instance_uid"]
        assert wait_job(client, first.json()["job_id"])["state"] == "done"
        assert client.get(f"/v1/studies/{uid}").json()["version"] == 1  # no second version
        later = client.post("/v1/studies", files=upload_files(files), headers={"Idempotency-Key": "study-1"})
        assert later.json()["job_id"] == first.json()["job_id"] and later.json()["state"] == "done"
        fresh = client.post("/v1/studies", files=upload_files(files))  # no key: a new version, as before
        assert fresh.status_code == 202 and fresh.json()["job_id"] != first.json()["job_id"]


def test_an_idempotency_key_answers_only_the_request_it_was_first_sent_with():
    """A key names one request: a rescreen of study B under the key that named the upload of study A, or the
    rescreen of study A, is a request of its own (B screened again), not answered with A's job as "replayed"
    (the caller was told B was being screened again, and the audit record named B with A's job). The same
    rescreen sent again under its key is still answered with its job."""
    a_uid, a_files = ct_series(8, study_uid="1.2.826.0.1.3680043.8.498.71")
    b_uid, b_files = ct_series(8, study_uid="1.2.826.0.1.3680043.8.498.72")
    with TestClient(_app()) as client:
        a = client.post("/v1/studies", files=upload_files(a_files), headers={"Idempotency-Key": "k-1"}).json()
        b = client.post("/v1/studies", files=upload_files(b_files)).json()
        assert wait_job(client, a["job_id"])["state"] == wait_job(client, b["job_id"])["state"] == "done"
        again = client.post(f"/v1/studies/{b_uid}/rescreen", headers={"Idempotency-Key": "k-1"})
        assert again.status_code == 202 and "idempotent-replayed" not in again.headers, again.text
        assert (again.json()["study_instance_uid"], again.json()["version"]) == (b_uid, 2)
        assert wait_job(client, again.json()["job_id"])["state"] == "done"
        a_again = client.post(f"/v1/studies/{a_uid}/rescreen", headers={"Idempotency-Key": "k-2"})
        assert a_again.status_code == 202 and a_again.json()["version"] == 2, a_again.text
        replayed = client.post(f"/v1/studies/{a_uid}/rescreen", headers={"Idempotency-Key": "k-2"})
        assert replayed.headers["idempotent-replayed"] == "true" and replayed.json()["job_id"] == a_again.json()["job_id"]
        assert wait_job(client, a_again.json()["job_id"])["state"] == "done"
        other = client.post(f"/v1/studies/{b_uid}/rescreen", headers={"Idempotency-Key": "k-2"})
        assert other.status_code == 202 and "idempotent-replayed" not in other.headers, other.text
        assert (other.json()["study_instance_uid"], other.json()["version"]) == (b_uid, 3)


def test_an_urgent_study_screened_again_is_admitted_as_urgent_and_an_unknown_one_is_404_when_full():
    """A rescreen without ?priority= takes the screened version's priority: an urgent study's is urgent, and routine
    work does not turn it away (it counts urgent jobs only, as an urgent upload); it was checked as routine (429).
    A study never received is 404 whatever the load (there is nothing to queue), as for a study not screenable."""
    fleet = FakeFleet(**{"fake:1": {"delay": 0.3}})
    a_uid, a_files = ct_series(8, study_uid="1.2.826.0.1.3680043.8.498.81")
    _, b_files = ct_series(8, study_uid="1.2.826.0.1.3680043.8.498.82")
    with TestClient(_app(fleet, max_concurrent_studies=1, max_queued_studies=0, urgent_slots=0)) as client:
        a = client.post("/v1/studies?priority=urgent", files=upload_files(a_files)).json()
        assert wait_job(client, a["job_id"])["state"] == "done"
        b = client.post("/v1/studies", files=upload_files(b_files))
        assert b.status_code == 202, b.text  # routine work fills the gateway
        missing = client.post("/v1/studies/1.2.3.404/rescreen")
        assert (missing.status_code, missing.json()["reason"]) == (404, "not_found"), missing.text
        again = client.post(f"/v1/studies/{a_uid}/rescreen")
        assert again.status_code == 202 and again.json()["priority"] == "urgent", again.text
        assert wait_job(client, again.json()["job_id"])["state"] == "done"
        assert wait_job(client, b.json()["job_id"])["state"] == "done"


def test_triton_down_past_the_deadline_fails_the_job_with_its_instances_kept():
    fleet = FakeFleet(**{"fake:1": {"fail_with": "StatusCode.UNAVAILABLE"}})
    # the retried job has the same 4 s to be screened once Triton is back (1.5 s ran out in a CI run at load 4)
    with TestClient(_app(fleet, triton_max_attempts=1, triton_timeout_s=1, job_deadline_s=4,
                         retry_backoff_s=0.2)) as client:
        assert client.get("/readyz").status_code == 200
        _, files = ct_series(4)
        r = client.post("/v1/studies", files=upload_files(files))
        view = wait_job(client, r.json()["job_id"])
        assert view["state"] == "failed" and view["error"]["reason"] == "triton_unavailable"
        assert view["attempts"] >= 2  # it waited and tried again before the deadline
        # a failed study, counted as every other (the verdict SLO's alert reads it): a release past the deadline
        # failed it uncounted
        metrics = client.get("/metrics").text
        assert 'ctscreen_studies_total{verdict="failed"} 1.0' in metrics, metrics[:3000]
        assert "retry" in view["error"]["message"]
        assert fleet.clients["fake:1"].calls >= 2
        fleet.clients["fake:1"].fail_with = None  # Triton is back: a retry screens the kept instances
        again = client.post(f"/v1/jobs/{view['job_id']}/retry")
        assert again.status_code == 202 and again.json()["state"] == "queued"
        assert wait_job(client, view["job_id"])["state"] == "done"
        assert client.post(f"/v1/jobs/{view['job_id']}/retry").status_code == 409  # done: nothing to retry
        assert client.post("/v1/jobs/nope/retry").status_code == 404


def test_triton_down_for_a_while_the_job_waits_and_ends_done():
    fleet = FakeFleet(**{"fake:1": {"fail_first": 3}})
    # not screened ahead: each failure must reach the job (test_gateway_speculation covers failures ahead)
    with TestClient(_app(fleet, triton_max_attempts=1, retry_backoff_s=0.2, screen_ahead=False)) as client:
        _, files = ct_series(4, lesion=[0, 1, 2])
        r = client.post("/v1/studies", files=upload_files(files))
        view = wait_job(client, r.json()["job_id"])
        assert view["state"] == "done" and view["attempts"] == 4, view
        assert view["result"]["verdict"] == "positive"


def test_unknown_job_and_study_are_404():
    with TestClient(_app()) as client:
        assert client.get("/v1/jobs/nope").json()["reason"] == "not_found"
        assert client.get("/v1/jobs/nope").status_code == 404
        assert client.get("/v1/studies/1.2.3").status_code == 404
        assert client.get("/v1/jobs/nope/events").status_code == 404


def test_readyz_and_healthz():
    """/readyz: the gateway takes studies, with Triton away too (they wait in the store); /readyz/triton: it
    can screen now. Neither names an address (both are open, like the probes)."""
    with TestClient(_app(FakeFleet(**{"fake:1": {"ready": False}}))) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json() == {
            "ready": True, "store": True, "blobs": True, "triton": {"ready_endpoints": 0, "endpoints": 1}}
        r = client.get("/readyz/triton")
        assert r.status_code == 503 and r.json() == {"ready": False, "ready_endpoints": 0, "endpoints": 1}
    with TestClient(_app()) as client:
        assert client.get("/readyz").json()["triton"] == {"ready_endpoints": 1, "endpoints": 1}
        assert client.get("/readyz/triton").json() == {"ready": True, "ready_endpoints": 1, "endpoints": 1}


def test_readyz_answers_within_the_kubelets_timeout_while_triton_hangs(tmp_path):
    """A paused tritonserver (SIGSTOP; or a node cut off) answers no probe: the kernel still takes the TCP
    connection, the gRPC call waits out ``CTSCREEN_TRITON_READY_TIMEOUT_S`` (2 s). /readyz waited for that
    probe, which it does not depend on, and answered in 2 s: past the kubelet's probe timeout (1 s, the chart's
    readiness probe sets none), so every gateway left its Service and no study was taken while Triton hung. The
    hung Triton here is a loopback socket that is never read (what a stopped process is to its clients), with
    the real gRPC client; /readyz/triton still waits for the probe and says 503."""
    import socket

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        settings = Settings(triton_urls=f"127.0.0.1:{hung.getsockname()[1]}", data_dir=tmp_path / "data")
        with TestClient(create_app(settings)) as client:
            for _ in range(3):  # the first probe, one under way, and one after the last answer's second
                t = time.monotonic()
                r = client.get("/readyz")
                assert time.monotonic() - t < 1.0 and r.status_code == 200, (time.monotonic() - t, r.text)
                assert r.json()["triton"] == {"ready_endpoints": 0, "endpoints": 1}, r.text
                time.sleep(1.1)
            t = time.monotonic()
            assert client.get("/readyz/triton").status_code == 503
            assert time.monotonic() - t < 4.0


def test_readyz_says_not_ready_while_the_store_or_the_blob_folder_fails(tmp_path):
    data = tmp_path / "data"
    with TestClient(_app(data_dir=data)) as client:
        assert client.get("/readyz").status_code == 200
        store = client.app.state.store

        async def down() -> None:
            raise ConnectionRefusedError("the database is away")

        store.ping, real = down, store.ping
        time.sleep(1.1)  # past the probe's one-second cache
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["store"] is False
        store.ping = real
        time.sleep(1.1)
        assert client.get("/readyz").status_code == 200
        root = client.app.state.blobs.root  # the blob volume is gone (an unmounted share)
        root.rename(tmp_path / "elsewhere")
        try:
            time.sleep(1.1)  # past the blob check's one-second cache too
            r = client.get("/readyz")
            assert r.status_code == 503 and r.json()["blobs"] is False and r.json()["store"] is True
        finally:
            (tmp_path / "elsewhere").rename(root)
        time.sleep(1.1)
        assert client.get("/readyz").status_code == 200


def test_readyz_asks_the_state_store_and_the_blob_store_at_once(tmp_path):
    """/readyz asked the state store (up to 3 s), then the blob store (up to 3 s): a slow but working database
    and a slow blob volume took the sum, past the readiness probe's timeout, and every gateway left its Service
    at once. The two are asked at once now: both have started before either ends. Each check here is the real
    one after a 1 s wait (a stub around it: a slow database or volume on cue)."""
    import asyncio

    spans: dict[str, list[float]] = {}
    with TestClient(_app(data_dir=tmp_path / "data")) as client:
        store, blobs = client.app.state.store, client.app.state.blobs
        real_ping, real_writable = store.ping, blobs.writable

        async def slow_ping() -> None:
            spans["store"] = [time.monotonic()]
            await asyncio.sleep(1.0)
            await real_ping()
            spans["store"].append(time.monotonic())

        def slow_writable() -> bool:
            spans["blobs"] = [time.monotonic()]
            time.sleep(1.0)
            ok = real_writable()
            spans["blobs"].append(time.monotonic())
            return ok

        store.ping, blobs.writable = slow_ping, slow_writable
        time.sleep(1.1)  # past both checks' one-second caches
        r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["store"] and r.json()["blobs"], r.text
    (store_start, store_end), (blobs_start, blobs_end) = spans["store"], spans["blobs"]
    assert max(store_start, blobs_start) < min(store_end, blobs_end), spans


def test_simultaneous_readyz_probes_share_one_state_store_query(tmp_path):
    """The state store's check kept its answer for a second but was not single-flight: simultaneous /readyz
    probes (the kubelet's, a load balancer's, monitoring's) arriving before the first one's answer each queried
    the database, piling up on it while it was slow. Now they share the query under way; once its answer is
    more than a second old, the next probe queries again. The ping is the real one after 0.5 s (a stub around
    it: a slow database on cue), counted."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    calls = 0
    with TestClient(_app(data_dir=tmp_path / "data")) as client:
        store = client.app.state.store
        real_ping = store.ping

        async def slow_ping() -> None:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.5)
            await real_ping()

        store.ping = slow_ping
        time.sleep(1.1)  # past the check's one-second cache
        with ThreadPoolExecutor(8) as threads:
            answers = list(threads.map(lambda _: client.get("/readyz"), range(8)))
        assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
        assert all(r.json()["store"] for r in answers)
        assert calls == 1, calls
        time.sleep(1.1)  # the answer has lapsed
        assert client.get("/readyz").json()["store"] is True
        assert calls == 2, calls


def test_openapi_lists_the_routes():
    with TestClient(_app()) as client:
        paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/studies", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/studies/{study_instance_uid}",
                 "/dicomweb/studies", "/dicomweb/studies/{study_instance_uid}", "/healthz", "/readyz", "/readyz/triton",
                 "/metrics", "/v1/studies/{study_instance_uid}/rescreen"):
        assert path in paths
    # a retry's two refusals: not failed (or its instances gone), and a later version of its study
    refused = paths["/v1/jobs/{job_id}/retry"]["post"]["responses"]["409"]["description"]
    assert "not_retryable" in refused and "superseded:" in refused and "superseded_by_job" in refused


def test_results_and_sr_survive_a_restart(tmp_path):
    """Results and SRs outlive the process. The SR is made under the site's UID root when one is set, and a
    result keeps the root it was made under: once the root changed, an earlier SR sent again came under new
    UIDs (a second copy in the PACS), and a later reading named its predecessor by UIDs never sent."""
    with TestClient(_app(data_dir=tmp_path)) as client:
        ids = []
        for lesion in ([1, 2, 3], []):
            uid, files = ct_series(5, lesion=lesion)
            if not ids:
                first_files = files
            r = client.post("/v1/studies", files=upload_files(files))
            ids.append(r.json()["job_id"])
            wait_job(client, ids[-1])
    with TestClient(_app(data_dir=tmp_path)) as client:  # a new process on the same data folder
        first = client.get(f"/v1/jobs/{ids[0]}").json()
        assert first["state"] == "done" and first["result"]["verdict"] == "positive"
        assert first["result"]["uid_root"] == "1.2.826.0.1.3680043.8.498."  # pydicom's, recorded as any other
        assert client.get(f"/v1/studies/{uid}").json()["job_id"] == ids[1]
        sr = client.get(f"/v1/jobs/{ids[0]}/sr")
        assert sr.status_code == 200 and sr.headers["content-type"] == "application/dicom"
        plain = pydicom.dcmread(io.BytesIO(sr.content))
        assert plain.SOPInstanceUID.startswith("1.2.826.0.1.3680043.8.498.")
    with TestClient(_app(data_dir=tmp_path, uid_root="1.2.840.99999.7")) as client:
        again = pydicom.dcmread(io.BytesIO(client.get(f"/v1/jobs/{ids[0]}/sr").content))
        assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (plain.SOPInstanceUID, plain.SeriesInstanceUID)
        r = client.post("/v1/studies", files=upload_files(first_files))  # the first study, read again
        assert wait_job(client, r.json()["job_id"])["result"]["uid_root"] == "1.2.840.99999.7."
        ours = pydicom.dcmread(io.BytesIO(client.get(f"/v1/jobs/{r.json()['job_id']}/sr").content))
        assert ours.SOPInstanceUID.startswith("1.2.840.99999.7.") and ours.SeriesInstanceUID.startswith("1.2.840.99999.7.")
        assert ours.StudyInstanceUID == plain.StudyInstanceUID  # the study's own UID is the scanner's
        named = ours.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert (named.SeriesInstanceUID, named.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) \
            == (plain.SeriesInstanceUID, plain.SOPInstanceUID)  # the SR the PACS holds, by its own UIDs


# --- DICOMweb STOW-RS -------------------------------------------------------------------------------
def test_stow_then_explicit_complete():
    uid, files = ct_series(6, lesion=[2, 3, 4])
    with TestClient(_app(stow_quiet_period_s=3600)) as client:
        r = client.post("/dicomweb/studies", content=related_body([d for _, d in files]),
                        headers={"Content-Type": STOW_TYPE})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/dicom+json"
        body = r.json()
        assert len(body["00081199"]["Value"]) == 6 and "00081198" not in body
        assert client.get(f"/v1/studies/{uid}").json() == {
            "study_instance_uid": uid, "state": "receiving", "instances_received": 6, "job_id": None,
            "error": None, "result": None, "version": None, "reading": None}
        job = client.post(f"/v1/studies/{uid}/complete")
        assert job.status_code == 202
        assert wait_job(client, job.json()["job_id"])["result"]["verdict"] == "positive"
        assert client.get(f"/v1/studies/{uid}").json()["result"]["verdict"] == "positive"
        assert client.post("/v1/studies/1.2.3.4/complete").status_code == 404


def test_a_failed_later_version_leaves_the_studys_reading_visible_and_not_superseded():
    """A late instance opens version 2; its screening fails (an inference error). The study view showed the
    failure only, with no result: version 1's reading, the one RIS and PACS hold (a version without a reading
    skips no delivery), was gone from it, and version 1's job and worklist row said "superseded by v2", a
    version that replaced nothing. Now the failure is the study's state and version 1's reading is beside it,
    not superseded; a version 3 that is screened supersedes both."""
    uid, files = ct_series(5, lesion=[1, 2, 3])
    fleet = FakeFleet()
    with TestClient(_app(fleet, stow_quiet_period_s=3600, triton_max_attempts=1)) as client:
        def stow(part: list[tuple[str, bytes]]) -> str:
            r = client.post(f"/dicomweb/studies/{uid}", content=related_body([d for _, d in part]),
                            headers={"Content-Type": STOW_TYPE})
            assert r.status_code == 200, r.text
            return wait_job(client, client.post(f"/v1/studies/{uid}/complete").json()["job_id"])["job_id"]

        first = stow(files[:3])
        fleet.clients["fake:1"].fail_with = "StatusCode.INVALID_ARGUMENT"  # not retried: the job fails
        second = stow(files[3:4])
        assert client.get(f"/v1/jobs/{second}").json()["error"]["reason"] == "inference_failed"
        read = client.get(f"/v1/jobs/{first}").json()
        assert read["result"]["verdict"] and (read["version"], read["superseded_by"]) == (1, None), read
        rows = {r["version"]: r for r in client.get("/v1/worklist").json()["rows"] if r["study_instance_uid"] == uid}
        assert (rows[1]["state"], rows[1]["superseded_by"]) == ("done", None), rows
        assert (rows[2]["state"], rows[2]["superseded_by"]) == ("failed", None), rows
        study = client.get(f"/v1/studies/{uid}").json()
        assert (study["state"], study["job_id"], study["version"]) == ("failed", second, 2), study
        assert study["error"]["reason"] == "inference_failed" and study["result"] is None
        reading = study["reading"]
        assert (reading["job_id"], reading["version"], reading["superseded_by"]) == (first, 1, None), study
        assert reading["result"] == read["result"], study
        fleet.clients["fake:1"].fail_with = None
        third = stow(files[4:])  # screened: the study's reading now, superseding both
        study = client.get(f"/v1/studies/{uid}").json()
        assert (study["state"], study["job_id"], study["version"], study["reading"]) == ("done", third, 3, None), study
        assert [client.get(f"/v1/jobs/{j}").json()["superseded_by"] for j in (first, second, third)] == [3, 3, None]


def test_stow_quiet_period_triggers_screening():
    uid, files = ct_series(5, lesion=[0, 1, 2])
    with TestClient(_app(stow_quiet_period_s=0.2)) as client:
        half = len(files) // 2
        for chunk in (files[:half], files[half:]):
            r = client.post(f"/dicomweb/studies/{uid}", content=related_body([d for _, d in chunk]),
                            headers={"Content-Type": STOW_TYPE})
            assert r.status_code == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            study = client.get(f"/v1/studies/{uid}").json()
            if study["state"] in ("done", "failed"):
                break
            time.sleep(0.1)
        assert study["state"] == "done" and study["result"]["n_slices"] == 5


def test_a_stow_failure_names_the_instance_as_it_came_not_an_invented_one():
    """A CT whose SOP Instance UID breaks the grammar was refused (0xC000) as a Secondary Capture of instance "0":
    a STOW client matches the failure items to its instances by these UIDs. They are the part's own now, and the
    invented ones only where nothing could be read (both are Type 1)."""
    _, files = ct_series(1)
    ds = pydicom.dcmread(io.BytesIO(files[0][1]))
    ds.SOPInstanceUID = "3f9a0c1d2e"  # a hex digest, as one real file has
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    bad = io.BytesIO()
    ds.save_as(bad, enforce_file_format=True)
    with TestClient(_app(stow_quiet_period_s=3600)) as client:
        r = client.post("/dicomweb/studies", content=related_body([bad.getvalue(), b"garbage" * 50]),
                        headers={"Content-Type": STOW_TYPE})
    assert r.status_code == 409, r.text
    named, unread = r.json()["00081198"]["Value"]
    assert named["00081197"]["Value"] == [0xC000]
    assert (named["00081150"]["Value"], named["00081155"]["Value"]) == ([str(ds.SOPClassUID)], ["3f9a0c1d2e"])
    assert unread["00081155"]["Value"] == ["0"]


def test_stow_partial_and_total_failure_and_media_types():
    uid, files = ct_series(2)
    with TestClient(_app(stow_quiet_period_s=3600)) as client:
        mixed = client.post("/dicomweb/studies", content=related_body([files[0][1], b"garbage" * 50]),
                            headers={"Content-Type": STOW_TYPE})
        assert mixed.status_code == 202
        assert mixed.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
        wrong_study = client.post("/dicomweb/studies/1.2.3", content=related_body([files[1][1]]),
                                  headers={"Content-Type": STOW_TYPE})
        assert wrong_study.status_code == 409
        assert wrong_study.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
        bad_type = client.post("/dicomweb/studies", content=related_body([files[1][1]], part_type="application/dicom+json"),
                               headers={"Content-Type": 'multipart/related; type="application/dicom+json"; boundary=b0undary'})
        assert bad_type.status_code == 415
        not_related = client.post("/dicomweb/studies", content=files[1][1], headers={"Content-Type": "application/dicom"})
        assert not_related.status_code == 415 and not_related.json()["reason"] == "unsupported_media_type"
        assert "Only type=\"application/dicom\" is supported (not 'application/dicom+json')" in bad_type.json()["message"]
        # the parameters parsed, not searched for: "type=" inside another parameter is not the body's type, and
        # without one the parts are: this one is DICOM JSON (was read as type="application/dicom", a 409)
        no_type = client.post("/dicomweb/studies", content=related_body([files[1][1]], boundary="xtype=application/dicom",
                                                                        part_type="application/dicom+json"),
                              headers={"Content-Type": 'multipart/related; boundary="xtype=application/dicom"'})
        assert no_type.status_code == 415, no_type.text
        assert "without type= is read as type=\"application/dicom\" only when each part is DICOM: part 1 is " \
               "'application/dicom+json'" in no_type.json()["message"], no_type.text
        for content_type, boundary in (('multipart/related; boundary="type=x"; type="application/dicom"', "type=x"),
                                       ('multipart/related; start-type=foo; type="application/dicom"; boundary=b0', "b0")):
            r = client.post("/dicomweb/studies", content=related_body([files[1][1]], boundary=boundary),
                            headers={"Content-Type": content_type})
            assert r.status_code == 200, (content_type, r.text)  # both were 415, (not 'x') and (not 'foo')
        # a part that declares no Content-Type and is no Part 10 file, in a body without type=: 415 too
        garbage = client.post("/dicomweb/studies", content=b"--b0\r\n\r\n" + b"garbage" * 50 + b"\r\n--b0--\r\n",
                              headers={"Content-Type": "multipart/related; boundary=b0"})
        assert garbage.status_code == 415, garbage.text
        assert "part 1 declares no Content-Type and is no DICOM Part 10 file" in garbage.text, garbage.text
        blank = client.post("/dicomweb/studies", content=related_body([files[1][1]]),
                            headers={"Content-Type": 'multipart/related; type=""; boundary=b0undary'})
        assert blank.status_code == 415 and "is supported (not an empty type=);" in blank.text, blank.text  # (not 'none')
        empty = client.post("/dicomweb/studies", content=b"--b0undary--\r\n", headers={"Content-Type": STOW_TYPE})
        assert empty.status_code == 400 and empty.json()["reason"] == "bad_upload", empty.text  # was 415: the type was right
        # counted as every refused request is: these five 415s
        text = client.get("/metrics").text
        assert 'ctscreen_errors_total{reason="unsupported_media_type"} 5.0' in text, [line for line in text.splitlines() if 'errors_total' in line]


def test_a_stow_body_without_type_is_stored_when_its_parts_are_dicom():
    """``multipart/related`` without ``type=`` (RFC 2387 requires it; older modalities' STOW clients and some
    routers omit it, and Orthanc and dcm4chee take such bodies) was answered 415 however plainly its parts were
    DICOM. It is stored when each part is: declared ``application/dicom``, or declaring nothing and a Part 10 file."""
    uid, files = ct_series(2)
    declared = related_body([files[0][1]])
    undeclared = b"--b0undary\r\n\r\n" + files[1][1] + b"\r\n--b0undary--\r\n"
    with TestClient(_app(stow_quiet_period_s=3600)) as client:
        for body in (declared, undeclared):
            r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": "multipart/related; boundary=b0undary"})
            assert r.status_code == 200 and len(r.json()["00081199"]["Value"]) == 1, r.text
        assert client.get(f"/v1/studies/{uid}").json()["instances_received"] == 2


def test_an_uploads_files_are_stored_in_one_blob_folder(tmp_path):
    """Each file went to a random one of the 256 blob folders, and storing an upload synced every folder it
    touched (~50 for 60 files, half the CPU of storing them): an upload's files now share one folder."""
    _, files = ct_series(6, lesion=[1, 2, 3])
    with TestClient(_app(data_dir=tmp_path)) as client:
        for _ in range(2):
            r = client.post("/v1/studies", files=upload_files(files))
            assert wait_job(client, r.json()["job_id"])["state"] == "done"
    stored = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert len(stored) == 12
    assert len({p.parent for p in stored}) <= 2  # one folder an upload (the two may meet, 1 in 256)


def test_a_refused_or_unstorable_upload_leaves_no_blob(tmp_path, monkeypatch):
    """A study the route refuses (422), or one that cannot be stored whole (503: the third file fails to
    write), leaves nothing in the blob store; the same upload is taken once the disk is back."""
    import itertools

    from gateway.store import FolderBlobs

    _, files = ct_series(4)
    with TestClient(_app(data_dir=tmp_path)) as client:
        r = client.post("/v1/studies", files=upload_files([(n, d[:-2000]) for n, d in files]))
        assert r.status_code == 422, r.text
        assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []

        real_stage, calls = FolderBlobs._stage, itertools.count()

        def stage(self, key, data):  # the third file cannot be written (a full disk)
            if next(calls) == 2:
                raise OSError(28, "No space left on device")
            return real_stage(self, key, data)

        monkeypatch.setattr(FolderBlobs, "_stage", stage)
        r = client.post("/v1/studies", files=upload_files(files))
        assert r.status_code == 503 and "stored durably" in r.json()["message"], r.text
        assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []
        monkeypatch.undo()
        assert client.post("/v1/studies", files=upload_files(files)).status_code == 202


def test_an_upload_the_store_does_not_accept_keeps_nothing_and_its_blobs_go_with_the_orphan_sweep(
    tmp_path, monkeypatch
):
    """The job row cannot be written (the store refuses it here, as a full job store would): the upload's
    answer is that refusal and the worker keeps no prepared study for a job that does not exist (screened
    ahead, it would also have held a slot and its decoded slices). Its blobs stay, since a failed commit
    may have landed; the orphan sweep, which reads that nothing names them, removes them once they are
    past the grace."""
    from gateway.jobs import Busy
    from gateway.store import Store

    async def refuse(self, *args, **kwargs):
        raise Busy("The job store is full (refused by the test).", 1.0)

    monkeypatch.setattr(Store, "accept_upload", refuse)
    _, files = ct_series(4)
    app = _app(data_dir=tmp_path)
    with TestClient(app) as client:
        r = client.post("/v1/studies", files=upload_files(files))
        assert r.status_code == 429, r.text
        assert not app.state.worker._prepared and not app.state.screener.ahead
        left = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
        assert len(left) == 4
        assert client.portal.call(app.state.sweeper.sweep_orphans) == 0  # too young to judge
        monkeypatch.undo()
        assert client.portal.call(app.state.sweeper.sweep_orphans, 2 * 3600) == 4  # two hours on
        assert not any(p.exists() for p in left)


def test_job_cut_short_by_a_stop_is_resumed_at_the_next_start(tmp_path):
    """An accepted study survives a stop: its job is released, and screened under its id at the next start."""
    _, files = ct_series(6, lesion=[1, 2, 3])
    slow = FakeFleet(**{"fake:1": {"delay": 5.0}})
    with TestClient(_app(slow, data_dir=tmp_path, shutdown_grace_s=0)) as client:
        r = client.post("/v1/studies", files=upload_files(files))
        assert r.status_code == 202
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 10
        while client.get(f"/v1/jobs/{job_id}").json()["state"] != "inferring":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert len(list((tmp_path / "blobs").rglob("*"))) >= 6
    with TestClient(_app(data_dir=tmp_path)) as client:
        view = client.get(f"/v1/jobs/{job_id}").json()
        # the new worker may claim the released job before this first request is served: 1 or 2
        assert view["attempts"] in (1, 2) and view["state"] in ("queued", "decoding", "inferring", "aggregating", "done")
        view = wait_job(client, job_id)
        assert view["state"] == "done" and view["result"]["verdict"] == "positive" and view["attempts"] == 2


def test_a_job_read_back_from_the_blob_store_is_screened_and_a_missing_blob_fails_it(tmp_path):
    """Studies accepted while no Triton is ready are screened by the next start from the blob store's files
    (their headers read, their pixels when decoded); a study one of whose blobs has gone fails with its
    reason, not an internal error."""
    _, good = ct_series(6, lesion=[1, 2, 3])
    _, other = ct_series(6, lesion=[1, 2, 3])
    with TestClient(_app(FakeFleet(**{"fake:1": {"ready": False}}), data_dir=tmp_path)) as client:
        ok = client.post("/v1/studies", files=upload_files(good)).json()["job_id"]
        broken = client.post("/v1/studies", files=upload_files(other)).json()["job_id"]
    blobs = sorted((p for p in (tmp_path / "blobs").rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    assert len(blobs) == 12
    blobs[-1].unlink()  # one of the second study's instances (written after all of the first's)
    with TestClient(_app(data_dir=tmp_path)) as client:
        done = wait_job(client, ok)
        assert done["state"] == "done" and done["result"]["verdict"] == "positive"
        assert done["attempts"] == 1
        failed = wait_job(client, broken)
        assert failed["state"] == "failed" and failed["error"]["reason"] == "unavailable", failed
        assert "missing from the blob store" in failed["error"]["message"]


@pytest.mark.parametrize(("run_mm", "verdict"), [(None, "positive"), (10.0, "negative"), (3.0, "positive")])
def test_the_case_rule_takes_a_run_in_millimetres_from_the_settings(run_mm, verdict):
    """Three lesion slices 1 mm apart cover 3 mm: positive under the paper's rule (3 slices), and under
    CTSCREEN_CASE_RUN_MM=3; not under CTSCREEN_CASE_RUN_MM=10 (a site that screens thin reconstructions).
    The rule screened was fixed in code before; the result names the one it used."""
    with TestClient(_app(case_run_mm=run_mm)) as client:
        _, files = ct_series(14, lesion=(3, 4, 5), spacing=1.0)
        r = client.post("/v1/studies", files=upload_files(files))
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"])
    assert job["state"] == "done" and job["result"]["verdict"] == verdict, job["result"]["reason"]
    assert job["result"]["rule"]["run_mm"] == run_mm and job["result"]["rule"]["run_slices"] == 3


def test_a_replica_shutting_down_leaves_its_released_jobs_to_the_others(tmp_path, monkeypatch):
    """Its sweeper ran on while the deliverer stopped (a send in flight) and adopted back the queued jobs the
    worker had just released, for a replica about to go: no live replica counted them any more."""
    import asyncio

    from sqlalchemy import select

    from gateway.delivery.deliverer import Deliverer
    from gateway.store import Store
    from gateway.store.models import Job

    async def slow_stop(self, grace_s: float = 0.0) -> None:  # a delivery still being sent when the replica stops
        await asyncio.sleep(0.5)

    monkeypatch.setattr(Deliverer, "stop", slow_stop)
    settings = dict(data_dir=tmp_path, sweep_interval_s=0.05, shutdown_grace_s=0)
    with TestClient(_app(FakeFleet(**{"fake:1": {"ready": False}}), **settings)) as client:  # no Triton: it waits
        _, files = ct_series(4, size=64)
        assert client.post("/v1/studies", files=upload_files(files)).status_code == 202

    async def holders() -> list:
        store = Store(Settings(**settings).database())
        try:
            async with store.read() as s:
                return list((await s.execute(select(Job.state, Job.accepted_by))).all())
        finally:
            await store.close()

    assert asyncio.run(holders()) == [("queued", None)]  # for the next replica to adopt


def test_a_blob_store_read_error_releases_the_job_for_a_retry_instead_of_failing_it(tmp_path, monkeypatch):
    """EIO or a stale NFS handle on the shared blob volume is no fault of the study: the job was failed
    for good as 'internal'. It is released with back-off, and screened once the volume reads again."""
    import asyncio
    import errno

    from gateway.worker import Worker

    real = Worker._prepare
    failures = []

    async def flaky(self, job):
        if not failures:
            failures.append(job.id)
            raise OSError(errno.EIO, "Input/output error")
        return await real(self, job)

    async def keep_nothing(self, job_id, prepared):  # as on a replica that did not take the upload
        await asyncio.to_thread(prepared.release)

    monkeypatch.setattr(Worker, "_prepare", flaky)
    monkeypatch.setattr(Worker, "remember", keep_nothing)
    with TestClient(_app(data_dir=tmp_path, screen_ahead=False, retry_backoff_s=0.2, retry_backoff_max_s=0.2)) as client:
        _, files = ct_series(6, lesion=(2, 3, 4), size=64)
        r = client.post("/v1/studies", files=upload_files(files))
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"], timeout=60)
    assert failures, "the worker never read the blob store"
    assert (job["state"], job["attempts"]) == ("done", 2), job


@pytest.mark.parametrize("outage", ["triton", "blobs", "refused"])
def test_a_release_the_state_store_cannot_take_leaves_the_job_to_its_lease(tmp_path, postgres, pg_url, outage,
                                                                          monkeypatch, caplog):
    """A try that ends for want of Triton (no endpoint could take it) or of the blob store (EIO) releases the job
    with back-off. PostgreSQL away at that moment too (a restart; the same outage may be behind both) made the
    release raise out of the job's task, unhandled ('Task exception was never retrieved', a traceback), where a
    state store error released with one line. Now the same: one line, the job keeps its lease and is resumed
    when it lapses. The real PostgreSQL, stopped the moment the try fails and back 2 s later; the try's failure
    is a stub (the fake Triton's screen, or the blob read, raises once). ``refused``: a try that fails the job (Triton
    refused the request) with the database away: the failure was counted, then raised out of the task unrecorded;
    now it is neither recorded nor counted (one line), and the job is resumed when its lease lapses."""
    import asyncio
    import errno
    import logging

    from gateway.errors import InferenceFailed, InferenceUnavailable
    from gateway.screening import Screener
    from gateway.worker import Worker

    ended: list[BaseException | None] = []  # each job task's outcome: an exception there is one nobody handles
    real_done = Worker._done

    def done(self, job_id, urgent_only, task):
        ended.append(None if task.cancelled() else task.exception())
        real_done(self, job_id, urgent_only, task)

    back = []

    def failing_once(owner, name, error):
        real = getattr(owner, name)

        async def fails(self, *args, **kwargs):
            if not back:  # the first try: the database goes away, then the try fails
                back.append(await asyncio.to_thread(postgres.down_for, 2.0))
                raise error
            return await real(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, fails)

    async def keep_nothing(self, job_id, prepared):  # as on a replica that did not take the upload
        await asyncio.to_thread(prepared.release)

    if outage == "triton":
        failing_once(Screener, "screen", InferenceUnavailable("No Triton endpoint could take the request."))
    elif outage == "refused":
        failing_once(Screener, "screen", InferenceFailed("Triton refused the request."))
    else:
        failing_once(Worker, "_prepare", OSError(errno.EIO, "Input/output error"))
    monkeypatch.setattr(Worker, "_done", done)
    monkeypatch.setattr(Worker, "remember", keep_nothing)
    caplog.set_level(logging.INFO)
    try:
        with TestClient(_app(data_dir=tmp_path, database_url=pg_url, screen_ahead=False, lease_s=3,
                             retry_backoff_s=0.2, retry_backoff_max_s=0.2)) as client:
            _, files = ct_series(6, lesion=(2, 3, 4), size=64)
            r = client.post("/v1/studies", files=upload_files(files))
            assert r.status_code == 202, r.text
            deadline = time.monotonic() + 30
            while not back:  # the job's view is a 503 while the database is away: asked once it is back
                assert time.monotonic() < deadline, "the try never failed"
                time.sleep(0.05)
            back[0].join(60)
            job = wait_job(client, r.json()["job_id"], timeout=60)
            counted = [line for line in client.get("/metrics").text.splitlines()
                       if line.startswith('ctscreen_studies_total{verdict="failed"}')]
    finally:
        for thread in back:
            thread.join(60)
    assert (job["state"], job["attempts"]) == ("done", 2), job  # resumed once its lease lapsed
    assert ended and all(e is None for e in ended), ended
    released = [m for m in caplog.messages if "could not release it" in m or "could not record its failure" in m]
    assert len(released) == 1 and "it is resumed when its lease lapses" in released[0], caplog.messages
    assert counted in ([], ['ctscreen_studies_total{verdict="failed"} 0.0']), counted  # done: no failure counted
    assert not [rec for rec in caplog.records if rec.exc_info], [rec.getMessage() for rec in caplog.records if rec.exc_info]


def test_a_worker_releases_its_kept_uploads_off_the_event_loop():
    """Releasing a kept upload removes its spool folder (rmtree): on the event loop it stalled every
    request and lease renewal meanwhile."""
    import asyncio

    from gateway.worker import Worker

    on_loop: list[bool] = []

    class Kept:
        def release(self) -> None:
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:  # no loop runs in this thread
                on_loop.append(False)

    async def go() -> None:
        worker = Worker(None, None, None, Settings(max_concurrent_studies=1))  # type: ignore[arg-type]
        await worker.remember("a", Kept())  # type: ignore[arg-type]
        await worker.remember("b", Kept())  # type: ignore[arg-type]  # evicts a
        await worker.forget("b")

    asyncio.run(go())
    assert on_loop == [False, False]


def test_results_name_the_models_triton_serves_now_not_the_first_it_saw(monkeypatch):
    """A gateway that outlived a model rollout on the Triton fleet named the models it first saw in every
    result for the rest of its life (wrong provenance); what Triton says is read again after a minute."""
    import asyncio

    from gateway.metrics import Metrics
    from gateway.screening import Screener
    from gateway.triton_pool import TritonPool

    served = ["1"]

    async def version(self):
        return served[0]

    monkeypatch.setattr(TritonPool, "model_version", version)

    async def go() -> list[str]:
        pool = TritonPool(["fake:1"], client_factory=FakeFleet())
        screener = Screener(pool, Metrics())
        try:
            seen = [(await screener.model_info())[0].version]
            served[0] = "2"  # rolled out
            seen.append((await screener.model_info())[0].version)  # within the minute: as read
            screener.model_info_ttl_s = 0.0  # a minute later
            seen.append((await screener.model_info())[0].version)
            return seen
        finally:
            screener.close()
            await pool.close()

    assert asyncio.run(go()) == ["1", "1", "2"]


def test_an_enhanced_ct_is_screened_frame_by_frame(tmp_path):
    """Every frame of an Enhanced CT carries its object's SOP Instance UID: the case rule refused the
    series as 'a SOP Instance UID more than once' and every such job failed as internal."""
    import numpy as np

    from tests.gateway_dicom_factory import enhanced_ct

    frames = []
    for i in range(5):
        hu = np.full((512, 512), -1000.0)
        hu[64:448, 64:448] = -800.0  # "lung"
        if i in (1, 2, 3):
            hu[100:140, 100:140] = 40.0  # what the fake Triton boxes (top left)
        frames.append(hu)
    data = enhanced_ct(frames, [(1.0, -1024.0)] * 5, [0.0, 5.0, 10.0, 15.0, 20.0])
    with TestClient(_app(data_dir=tmp_path)) as client:
        r = client.post("/v1/studies", files=upload_files([("enhanced.dcm", data)]))
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"])
    assert job["state"] == "done", job
    result = job["result"]
    assert (result["verdict"], result["n_slices"]) == ("positive", 5), result
    assert len({s["sop_instance_uid"] for s in result["slices"]}) == 1  # five frames of one object


def test_a_heartbeat_issued_before_a_state_change_never_lands_after_it(tmp_path, monkeypatch):
    """The lease heartbeat writes the job's state with its progress; one that started during inference and
    was slow to commit landed after the switch to aggregating, and the job read "inferring" again while it
    aggregated. Each write now waits for the one before. The slow commit is simulated: the heartbeat's
    first progress write waits (up to 2 s) until the switch to aggregating is being written; the store is
    the real SQLite one."""
    import asyncio

    from gateway.store import Store

    committed: list[str] = []
    real = Store.heartbeat
    switching: list[asyncio.Event] = []
    slowed: list[bool] = []

    async def slow_beat(self, job_id, lease_s, *, state=None, **kw):
        if not switching:
            switching.append(asyncio.Event())
        task = asyncio.current_task()
        if state == "aggregating":
            switching[0].set()
        elif state is not None and not slowed and task is not None and task.get_name().startswith("lease-"):
            slowed.append(True)  # the heartbeat's first progress write, slow to commit
            try:
                await asyncio.wait_for(switching[0].wait(), 2.0)
            except TimeoutError:
                pass
        held = await real(self, job_id, lease_s, state=state, **kw)
        if state is not None:
            committed.append(str(state))
        return held

    monkeypatch.setattr(Store, "heartbeat", slow_beat)
    fleet = FakeFleet(**{"fake:1": {"delay": 0.08}})
    settings = dict(data_dir=tmp_path, progress_interval_s=0.05, triton_batch_size=2, triton_max_inflight=1,
                    screen_ahead=False)  # inference in the job, not during the upload
    with TestClient(_app(fleet, **settings)) as client:
        _, files = ct_series(12, size=64)
        r = client.post("/v1/studies", files=upload_files(files))
        assert r.status_code == 202, r.text
        assert wait_job(client, r.json()["job_id"])["state"] == "done"
    assert slowed and "aggregating" in committed, committed  # a heartbeat was in flight at the switch
    assert "inferring" not in committed[committed.index("aggregating"):], committed
