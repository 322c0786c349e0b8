"""End to end: phantom DICOM studies -> live gateway (uvicorn) -> real embedded Triton -> CaseResult.

Nothing is faked: the studies are real DICOM files written by ``phantom.write_study``, the gateway runs
under uvicorn on a free port, it talks gRPC to the real ``tritonserver`` of the session fixture
``triton``, and STOW-RS uploads go through the real ``dicomweb-client``.

The verdict tests (COVID positive with its run and quadrant, normal negative) need trained weights; they
are skipped while ``model_repository/*/1/model_card.json`` says ``"trained": false``. Every other test
holds for any weights: they compare answers across paths (JPEG 2000 vs plain, STOW vs upload, two
Tritons vs one), which must agree slice for slice.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

import phantom
from aggregator.case import replay
from aggregator.schema import CaseResult
from ctscreen.embedded import EmbeddedTriton, free_port
from gateway.cli import demo_main, run_stack
from gateway.client import Outcome, screen_paths
from tests.fhir_receiver import FhirReceiver
from tests.gateway_dicom_factory import FACE_SLICE, face_series
from tests.test_gateway_admission import burst

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
N_SLICES = 40


def models_trained() -> bool:
    cards = [ROOT / "model_repository" / m / "1" / "model_card.json" for m in ("valid_area", "lesion")]
    try:
        return all(json.loads(c.read_text()).get("trained", False) for c in cards)
    except (OSError, ValueError):
        return False


needs_trained = pytest.mark.skipif(not models_trained(), reason="shipped ONNX weights are untrained placeholders")


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """A COVID study, and the same study as shuffled JPEG 2000 files."""
    out = tmp_path_factory.mktemp("e2e-studies")
    covid = phantom.make_study(seed=11, kind="covid", n_slices=N_SLICES)
    paths = {
        "covid": Path(phantom.write_study(covid, out / "covid")),
        "covid_j2k": Path(phantom.write_study(covid, out / "covid-j2k", encoding="jpeg2000", shuffle=True)),
    }
    paths["covid_decubitus"] = turned_a_quarter(paths["covid"], out / "covid-decubitus")
    paths["_covid_study"] = covid  # type: ignore[assignment]
    return paths


def turned_a_quarter(src: Path, dst: Path) -> Path:
    """The study in ``src`` as a scanner stores a patient lying on the right side (decubitus): each image turned
    by 90 degrees (rows and columns swapped, then mirrored top-bottom, a rotation: the slice normal and the
    slices' positions stay), with the Image Orientation (Patient) and Image Position (Patient) that place every
    stored pixel where it was in the patient, and the Pixel Spacing's two values swapped."""
    dst.mkdir(parents=True)
    for f in sorted(src.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        upright = ds.pixel_array
        row, col = np.array([float(v) for v in ds.ImageOrientationPatient[:3]]), np.array(
            [float(v) for v in ds.ImageOrientationPatient[3:]])
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        stored = np.ascontiguousarray(upright.T[::-1])  # stored[r, c] = upright[c, R - 1 - r], R = upright's columns
        # stored pixel (0, 0) is upright pixel (row 0, column R - 1); +column: upright's +row; +row: upright's -column
        origin = np.array([float(v) for v in ds.ImagePositionPatient]) + (upright.shape[1] - 1) * col_mm * row
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*col, *(-row))]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin]
        ds.PixelSpacing = [f"{col_mm:g}", f"{row_mm:g}"]
        ds.Rows, ds.Columns = stored.shape
        ds.PixelData = stored.astype(upright.dtype).tobytes()
        ds.save_as(dst / f.relative_to(src).as_posix().replace("/", "_"), enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def gateway(triton):
    """A live gateway (uvicorn, free port) on the session's Triton."""
    overrides = {"stow_quiet_period_s": 3600.0, "max_upload_bytes": 40 * 1024 * 1024}
    with run_stack(port=0, triton_url=triton.grpc_url, settings_overrides=overrides) as stack:
        yield stack


@pytest.fixture(scope="module")
def screened(gateway, studies) -> dict[str, Outcome]:
    """Each study screened once through ``ctscreen screen``'s code path."""
    names = ["covid", "covid_j2k", "covid_decubitus"]
    outcomes = screen_paths(gateway.url, [studies[n] for n in names], quiet=True)
    return dict(zip(names, outcomes, strict=True))


def _result(outcome: Outcome) -> CaseResult:
    assert outcome.error is None, outcome.error
    return CaseResult.model_validate(outcome.result)


def _boxes(result: CaseResult) -> list[tuple]:
    return [(s.sop_instance_uid, s.valid_area, [(b.grid, round(b.score, 4)) for b in s.boxes]) for s in result.slices]


def test_every_slice_screened_by_real_triton(gateway, screened):
    result = _result(screened["covid"])
    assert result.n_slices == N_SLICES and len(result.slices) == N_SLICES
    assert [s.index for s in result.slices] == list(range(N_SLICES))
    positions = [s.position_mm for s in result.slices]
    assert positions == sorted(positions)
    assert result.models and result.models[0].name == "ct_screen" and result.models[0].version != "unknown"
    # the component models' provenance comes from the rendered ensemble config: the shipped cards' sha256
    repo = Path(__file__).resolve().parents[1] / "model_repository"
    served = {m.name: m for m in result.models[1:]}
    for name in ("valid_area", "lesion"):
        card = json.loads((repo / name / "1" / "model_card.json").read_text())
        assert served[name].sha256 == card["sha256"] and served[name].version == card["version"]
    assert result.timings.inference_s is not None and result.timings.total_s >= result.timings.inference_s
    again = replay(result)  # the verdict is the case rule's on the slices served, whatever the weights
    assert (result.verdict, result.reason) == (again.verdict, again.reason)
    run = [(e.quadrant, [s.index for s in e.slices]) for e in (result.evidence, again.evidence) if e is not None]
    assert len(run) != 1 and run[:1] == run[1:]
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert "ctscreen_triton_slices_total" in metrics and "ctscreen_backlog_slices" in metrics
    assert "ctscreen_backlog_seconds" not in metrics  # issue 18: the fleet signal is recorded in Prometheus


def test_shuffled_jpeg2000_twin_gives_the_same_answer(screened):
    plain, j2k = _result(screened["covid"]), _result(screened["covid_j2k"])
    assert (j2k.verdict, j2k.reason, j2k.n_slices) == (plain.verdict, plain.reason, plain.n_slices)
    # a chest's lung field, measured alike on both paths (phantom chests: 164-279 cm2)
    assert plain.lung_field_cm2 is not None and plain.lung_field_cm2 > 150
    assert plain.body_cm2 is not None and plain.body_cm2 > 500
    assert (j2k.lung_field_cm2, j2k.body_cm2) == pytest.approx((plain.lung_field_cm2, plain.body_cm2), rel=0.05)
    assert [s.position_mm for s in j2k.slices] == [s.position_mm for s in plain.slices]
    assert [(s.valid_area, [(b.grid, round(b.score, 4)) for b in s.boxes]) for s in j2k.slices] == [
        (s.valid_area, [(b.grid, round(b.score, 4)) for b in s.boxes]) for s in plain.slices]


def test_a_decubitus_study_is_screened_upright_and_its_boxes_point_at_the_stored_pixels(studies, screened):
    """The same study stored as a patient lying on a side (every image turned by 90 degrees, its orientation
    saying so) reaches the models upright: the same slices, boxes and valid areas on the grid, the same
    verdict, evidence and quadrant; every box on the stored image is the upright one's turned. Seen failing
    with the swap taken out of ``gateway.dicom.to_grid`` (the models then saw the chest on its side)."""
    plain, turned = _result(screened["covid"]), _result(screened["covid_decubitus"])
    assert (turned.verdict, turned.reason, turned.n_slices) == (plain.verdict, plain.reason, plain.n_slices)
    assert [s.position_mm for s in turned.slices] == pytest.approx([s.position_mm for s in plain.slices])
    assert [(s.valid_area, [(b.grid, round(b.score, 4), b.quadrants) for b in s.boxes]) for s in turned.slices] == [
        (s.valid_area, [(b.grid, round(b.score, 4), b.quadrants) for b in s.boxes]) for s in plain.slices]
    assert sum(len(s.boxes) for s in plain.slices) > 0, "the phantom study should have lesion boxes"
    assert (turned.evidence is None) == (plain.evidence is None)
    if plain.evidence is not None:
        assert turned.evidence is not None and turned.evidence.quadrant == plain.evidence.quadrant
        assert [s.index for s in turned.evidence.slices] == [s.index for s in plain.evidence.slices]
    rows = int(pydicom.dcmread(next(studies["covid"].rglob("*.dcm")), stop_before_pixels=True).Columns)  # turned: rows
    for p, q in zip(plain.slices, turned.slices, strict=True):
        for a, b in zip(p.boxes, q.boxes, strict=True):
            assert a.original is not None and b.original is not None
            # stored[r, c] = upright[c, rows - 1 - r]: an upright box (x0..x1, y0..y1) is stored at
            # columns y0..y1 and rows (rows - 1 - x1)..(rows - 1 - x0)
            assert (b.original.x0, b.original.x1) == (a.original.y0, a.original.y1)
            assert (b.original.y0, b.original.y1) == (rows - 1 - a.original.x1, rows - 1 - a.original.x0)


@needs_trained
def test_covid_study_is_positive_with_its_run_and_quadrant(studies, screened):
    result = _result(screened["covid"])
    assert result.verdict == "positive" and result.reason == "run_found"
    ev = result.evidence
    assert ev is not None and ev.qualifies and ev.n_slices >= 3
    study = studies["_covid_study"]
    z = np.asarray(study.positions)[:, 2]
    for s in ev.slices:
        k = int(np.argmin(np.abs(z - s.position_mm)))
        finding = result.slices[s.index]
        va = finding.valid_area
        assert va is not None
        cx, cy = (va.x0 + va.x1) / 2, (va.y0 + va.y1) / 2
        rows, cols = np.nonzero(study.lesion_mask[k])
        top, left = ev.quadrant.startswith("top"), ev.quadrant.endswith("left")
        in_quadrant = ((rows <= cy) if top else (rows >= cy)) & ((cols <= cx) if left else (cols >= cx))
        assert in_quadrant.any(), f"no phantom lesion in {ev.quadrant} on slice {s.index}"


@needs_trained
def test_normal_study_is_negative(gateway, tmp_path):
    normal = phantom.make_study(seed=11, kind="normal", n_slices=N_SLICES)  # the COVID patient, healthy
    path = Path(phantom.write_study(normal, tmp_path / "normal"))
    result = _result(screen_paths(gateway.url, [path], quiet=True)[0])
    assert result.verdict == "negative", (result.reason, result.message)


@needs_trained
@pytest.mark.skipif(not FACE_SLICE.is_file(), reason=f"real face CT slice not present at {FACE_SLICE} (shared data not mounted)")
def test_a_head_ct_is_no_chest_and_never_positive(gateway, tmp_path):
    """A real CT slice of a face (the oral airway, metal streaks) as a series of 6: the models, which learnt
    only chests, box it on every slice, a run in one quadrant. Its lung field and body section, both a head's,
    make the study indeterminate (not_chest) instead of positive."""
    from aggregator.case import CaseRule

    folder = face_series(tmp_path / "face")
    result = _result(screen_paths(gateway.url, [folder], quiet=True)[0])
    assert (result.verdict, result.reason) == ("indeterminate", "not_chest"), result.message
    assert result.lung_field_cm2 is not None and result.lung_field_cm2 < 50 and result.rule.min_lung_field_cm2 == 50
    assert result.body_cm2 is not None and result.body_cm2 < 300 and result.rule.min_body_cm2 == 300
    assert replay(result).reason == "not_chest" and not result.shows_lesions
    # what the check stands between: without it, the boxes make this head CT positive
    assert replay(result, CaseRule(min_lung_field_cm2=None)).verdict == "positive"


def test_stow_rs_upload_by_dicomweb_client_is_screened(gateway, studies, screened):
    from dicomweb_client.api import DICOMwebClient

    files = sorted(p for p in studies["covid"].rglob("*.dcm"))
    assert len(files) == N_SLICES
    datasets = [pydicom.dcmread(p) for p in files]
    uid = datasets[0].StudyInstanceUID
    client = DICOMwebClient(url=f"{gateway.url}/dicomweb")
    response = client.store_instances(datasets=datasets[:25])
    first_sent = time.monotonic()  # the first 25 instances are in (the second request starts after)
    assert len(response.ReferencedSOPSequence) == 25 and "FailedSOPSequence" not in response
    time.sleep(0.5)
    response = client.store_instances(datasets=datasets[25:], study_instance_uid=uid)
    assert len(response.ReferencedSOPSequence) == N_SLICES - 25
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        assert http.get(f"/v1/studies/{uid}").json()["state"] == "receiving"
        arrived_s = time.monotonic() - first_sent  # at most the time its instances took to arrive
        job = http.post(f"/v1/studies/{uid}/complete")
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            view = http.get(f"/v1/studies/{uid}").json()
            if view["state"] in ("done", "failed"):
                break
            time.sleep(0.2)
    assert view["state"] == "done", view
    stow = CaseResult.model_validate(view["result"])
    plain = _result(screened["covid"])
    assert stow.n_slices == N_SLICES and stow.verdict == plain.verdict
    assert _boxes(stow) == _boxes(plain)
    # the time the study took to arrive is in its timings (total_s starts at the job); an upload has none
    t = stow.timings
    assert t.receive_s is not None and t.quiet_s is not None and t.queued_s is not None
    assert 0.5 <= t.receive_s and t.quiet_s < t.receive_s <= arrived_s + 5  # completed at once: little quiet
    assert plain.timings.receive_s == plain.timings.quiet_s == 0 and plain.timings.queued_s is not None
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'ctscreen_study_turnaround_seconds_count{origin="stow",priority="routine"} 1.0' in metrics


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make_body", "status", "reason"),
    [
        (lambda: b"%PDF-1.4 not a DICOM file" * 20, 415, "not_dicom"),
        (lambda: _zip({"../evil.dcm": b"x" * 200}), 400, "unsafe_path"),
        (lambda: _zip({"bomb.dcm": b"\0" * (16 * 1024 * 1024)}), 413, "zip_bomb"),
    ],
    ids=["not-dicom", "path-traversal", "zip-bomb"],
)
def test_bad_inputs_get_their_specific_4xx(gateway, make_body, status, reason):
    body = make_body()
    r = httpx.post(f"{gateway.url}/v1/studies", files=[("files", ("upload.bin", body))], timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["reason"] == reason


def test_oversize_upload_gets_413_before_its_body_is_sent(gateway):
    """A raw client sends only the head of a 41 MiB upload (the limit is 40 MiB): the answer comes
    before the body (an httpx upload may see the connection closed under it instead of the 413)."""
    port = httpx.URL(gateway.url).port
    ((status, _, before_body),) = asyncio.run(
        burst(port, 1, 41 * 1024 * 1024, content_type="multipart/form-data; boundary=x"))
    assert (status, before_body) == (413, True)


def test_two_tritons_one_stopped_mid_study(triton, studies, screened, tmp_path):
    """The study completes with every slice answered exactly once although one Triton goes away."""
    from fastapi.testclient import TestClient

    from gateway.main import create_app
    from gateway.settings import Settings

    plain = _result(screened["covid"])
    second = EmbeddedTriton(log_file=tmp_path / "second.log")
    second.start(timeout=300)
    try:
        settings = Settings(triton_urls=[triton.grpc_url, second.grpc_url], triton_batch_size=2,
                            triton_max_inflight=2, triton_timeout_s=30,
                            screen_ahead=False)  # the stop must hit the job while it screens
        files = [("files", (p.name, p.read_bytes())) for p in sorted(studies["covid"].rglob("*.dcm"))]
        with TestClient(create_app(settings)) as client:
            r = client.post("/v1/studies", files=files)
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            stopped = threading.Event()
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                view = client.get(f"/v1/jobs/{job_id}").json()
                answered_by_second = client.app.state.pool.slice_counts.get(second.grpc_url, 0)
                if not stopped.is_set() and view["slices_done"] >= 6 and answered_by_second > 0:
                    done_before = view["slices_done"]
                    second.stop()
                    stopped.set()
                if view["state"] in ("done", "failed"):
                    break
                time.sleep(0.05)
            counts = client.app.state.pool.slice_counts
            retries = client.app.state.pool.retries
        assert stopped.is_set() and done_before < N_SLICES, "the study ended before the Triton was stopped"
        assert retries >= 1, "no batch failed over: the stopped Triton got no request after it stopped"
        assert view["state"] == "done", view
        result = CaseResult.model_validate(view["result"])
        assert result.n_slices == N_SLICES and view["slices_done"] == N_SLICES
        assert sum(counts.values()) == N_SLICES, counts  # each slice answered exactly once
        assert counts[second.grpc_url] > 0 and counts[triton.grpc_url] > 0
        assert _boxes(result) == _boxes(plain)
    finally:
        second.stop()


def test_demo_exits_after_printing_verdicts(triton, capsys, tmp_path):
    rc = demo_main(["--exit", "--port", "0", "--slices", "32", "--triton-url", triton.grpc_url,
                    "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    # loopback: no credential needed (make demo stays one command); the audit trail is kept beside the
    # samples instead of interleaving with the verdict table
    assert '"action"' not in out and f"audit log: {tmp_path / 'audit.jsonl'}" in out
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {(r["action"], r["status"], r["who"]) for r in audit} >= {("POST /v1/studies", 202, "anonymous")}
    rows = {line.split()[1]: line.split()[2] for line in out.splitlines() if "/covid-" in line or "/normal-" in line}
    assert set(rows) == {"covid", "normal"}, out
    if models_trained():
        assert rows == {"covid": "POSITIVE", "normal": "negative"}, out
    assert "ctscreen is running at http://127.0.0.1:" in out


def test_the_embedded_stack_calls_the_fused_model_unless_told_otherwise(triton, studies, screened, monkeypatch):
    """``ctscreen serve`` / ``make demo`` start their own cpu Triton and call its fused model (the
    ensemble's three steps in one stub a slice): the same verdict and boxes as through the ensemble,
    with the called model named in the result. ``CTSCREEN_TRITON_MODEL`` still picks the ensemble."""
    from ctscreen.contracts import ENSEMBLE_MODEL, FUSED_MODEL

    with run_stack(port=0, repo=triton.repo_dir) as stack:
        assert stack.settings.triton_model == FUSED_MODEL
        (outcome,) = screen_paths(stack.url, [studies["covid"]], quiet=True)
    fused, ens = _result(outcome), _result(screened["covid"])
    assert (fused.models[0].name, fused.models[0].platform) == (FUSED_MODEL, "python")
    assert ens.models[0].name == ENSEMBLE_MODEL
    assert (fused.verdict, fused.reason, _boxes(fused)) == (ens.verdict, ens.reason, _boxes(ens))
    monkeypatch.setenv("CTSCREEN_TRITON_MODEL", ENSEMBLE_MODEL)
    with run_stack(port=0, repo=triton.repo_dir) as stack:
        assert stack.settings.triton_model == ENSEMBLE_MODEL
        server = stack._triton._proc
    # its Triton is killed once the gateway, its only client, has stopped: the server's own stop (SIGTERM) unloaded
    # every model first, 3-4 s more (the python backend's fixed 1 s check of each instance's stub, one after another)
    assert server.returncode == -signal.SIGKILL, f"tritonserver ended with {server.returncode}, not killed"


def test_serve_starts_and_stops_cleanly(triton):
    """SIGINT sent the moment /readyz first answers stops the gateway cleanly (exit 0, not 130).

    The readiness probe polls every 10 ms so the signal lands as early as a supervisor's would:
    before the fix, the handlers came after the banner and such a signal raised KeyboardInterrupt.
    """
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctscreen.cli", "serve", "--port", str(port), "--triton-url", triton.grpc_url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.01)
        assert ready is not None and ready.status_code == 200
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert f"http://127.0.0.1:{port}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_done_study_screened_again_is_version_2_and_outlives_the_retention_of_version_1(triton, tmp_path):
    """A screened study screened again from the instances the gateway keeps (POST /v1/studies/{uid}/rescreen, the
    models updated): version 2 is done by the real Triton with the same reading, version 1 reads superseded by it.
    Retention of version 1 (its instances, as the sweeper's pass: Store.expire, then the blobs it returns deleted)
    deletes none of version 2's pixels: its slices still render, version 1's are gone (410). Once retention removed
    the latest version's instances too, the study cannot be screened again (409, send it again)."""
    from sqlalchemy import update

    from gateway.settings import Settings
    from gateway.store import Store
    from gateway.store.blobs import delete_each
    from gateway.store.models import Job
    from tests.screen_helpers import comparable

    url = f"sqlite:///{tmp_path / 'ctscreen.db'}"
    ris = FhirReceiver()  # every reading, whatever its verdict
    (tmp_path / "destinations.json").write_text(json.dumps({"destinations": [
        {"name": "ris", "kind": "fhir", "url": ris.url}]}))
    overrides = {"data_dir": tmp_path, "database_url": url, "stow_quiet_period_s": 3600.0,
                 "destinations_file": tmp_path / "destinations.json", "delivery_poll_s": 0.2}
    study = Path(phantom.write_study(phantom.make_study(seed=43, kind="covid", n_slices=12), tmp_path / "study"))

    def done(client: httpx.Client, job_id: str) -> dict:
        end = time.monotonic() + 180
        while (view := client.get(f"/v1/jobs/{job_id}").json())["state"] not in ("done", "failed"):
            assert time.monotonic() < end, view
            time.sleep(0.2)
        assert view["state"] == "done", view
        return view

    async def retention(*old: str) -> list[str]:
        """Version(s) ``old`` finished long ago; retention's pass over the instances; the keys it deleted."""
        store = Store(url)
        try:
            async with store.tx() as s:
                await s.execute(update(Job).where(Job.id.in_(old)).values(finished_at=time.time() - 100))
            keys = await store.expire(results_s=10_000, instances_s=50)
        finally:
            await store.close()
        assert delete_each(Settings(data_dir=tmp_path, database_url=url).blob_store(), keys) is None
        return keys

    with contextlib.closing(ris), run_stack(port=0, triton_url=triton.grpc_url, settings_overrides=overrides) as stack, \
            httpx.Client(base_url=stack.url, timeout=60) as client:
        (first,) = screen_paths(stack.url, [study], quiet=True)
        assert first.error is None, first.error
        uid = first.result["study_instance_uid"]
        r = client.post(f"/v1/studies/{uid}/rescreen")
        assert r.status_code == 202, r.text
        second = r.json()
        assert (second["version"], second["files"]) == (2, 12) and r.headers["location"] == f"/v1/jobs/{second['job_id']}"
        view = done(client, second["job_id"])
        same = {k: v for k, v in comparable(CaseResult.model_validate(first.result)).items() if k != "job_id"}
        assert {k: v for k, v in comparable(CaseResult.model_validate(view["result"])).items() if k != "job_id"} == same
        assert client.get(f"/v1/jobs/{first.job_id}").json()["superseded_by"] == 2
        latest = client.get(f"/v1/studies/{uid}").json()
        assert (latest["version"], latest["job_id"], latest["state"]) == (2, second["job_id"], "done")
        # the RIS holds both reports, version 2's replacing version 1's (as for a study sent again: nothing new)
        end = time.monotonic() + 60
        while len(ris.of_type("DiagnosticReport")) < 2:
            assert time.monotonic() < end, client.get(f"/v1/jobs/{second['job_id']}/deliveries").json()
            time.sleep(0.2)
        assert ris.current_reports() == [second["job_id"]]

        assert asyncio.run(retention(first.job_id)) == []  # every blob still named by version 2
        assert client.get(f"/v1/jobs/{second['job_id']}/slices/5.png").status_code == 200
        assert client.get(f"/v1/jobs/{first.job_id}/slices/5.png").status_code == 410
        assert len(asyncio.run(retention(first.job_id, second["job_id"]))) == 12
        r = client.post(f"/v1/studies/{uid}/rescreen")
        assert r.status_code == 409 and r.json() == {"reason": "not_rescreenable", "message": (
            f"Version 2 of study {uid} cannot be screened again: its instances are no longer kept (retention); "
            "send the study again.")}
