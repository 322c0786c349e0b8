"""The web page in a real browser: Debian's Chromium (headless) driven by Playwright, against a live
gateway (uvicorn) on the session's real embedded Triton, with phantom studies screened for real.

One gateway per module (a test that needs Triton away starts its own two); small studies (24 slices, 256
matrix). The screenshots under ``docs/ui/`` are rewritten here only with ``CTSCREEN_UI_SCREENSHOTS=1`` (a test
run leaves the tree as it was).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

import phantom
from aggregator.schema import CaseResult
from ctscreen.embedded import free_port
from gateway.cli import Stack, run_stack
from gateway.client import collect_files, screen_paths
from tests.conftest import CHROMIUM
from tests.fhir_receiver import FhirReceiver
from tests.gateway_app_fakes import edited
from tests.gateway_dicom_factory import FACE_SLICE, face_series

pytestmark = [pytest.mark.triton, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "ui"
N_SLICES = 24
# the scanner's 512 matrix: 256-matrix phantoms of healthy patients come out positive with the shipped
# weights (resampling artefacts read as lesions), which would make the "normal" study useless here

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
    pytest.skip("Debian's chromium is not installed: scripts/setup.sh --test installs it", allow_module_level=True)


@pytest.fixture(scope="module")
def ris():
    """The RIS the gateway sends positive readings to (a FHIR endpoint of the tests': no FHIR server runs here)."""
    receiver = FhirReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def stack(triton, ris, tmp_path_factory):
    """A live gateway; progress written every 0.05 s and small batches, so screening shows steps.

    Events closer together than the page's 300 ms reload delay are what once kept a new study's row
    off the worklist until it was done (a debounce restarted by every event; CI hit it at 0.2 s).
    Two destinations: the RIS takes positive readings; a DICOMweb PACS on a port nobody listens on fails
    every result at its first try. Event streams send a keep-alive every second (a silent one is dead sooner).
    """
    data = tmp_path_factory.mktemp("web-data")
    (data / "destinations.json").write_text(json.dumps({"destinations": [
        {"name": "ris", "kind": "fhir", "url": ris.url, "rule": {"verdicts": ["positive"]}},
        {"name": "pacs-web", "kind": "stowrs", "url": f"http://127.0.0.1:{free_port()}/dicom-web"}]}))
    overrides = {"data_dir": data, "stow_quiet_period_s": 3600.0,
                 "progress_interval_s": 0.05, "triton_batch_size": 2, "max_concurrent_studies": 1,
                 "destinations_file": data / "destinations.json", "delivery_max_attempts": 1, "delivery_poll_s": 0.2,
                 "events_keepalive_s": 1.0}
    with run_stack(port=0, triton_url=triton.grpc_url, settings_overrides=overrides) as s:
        yield s


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("web-studies")
    made = {"covid": phantom.make_study(seed=11, kind="covid", n_slices=N_SLICES),
            "normal": phantom.make_study(seed=11, kind="normal", n_slices=N_SLICES),
            "third": phantom.make_study(seed=12, kind="covid", n_slices=2 * N_SLICES)}
    return {name: Path(phantom.write_study(study, out / name)) for name, study in made.items()}


@pytest.fixture(scope="module")
def screened(stack, studies) -> dict[str, tuple[str, CaseResult]]:
    """The COVID and the normal study screened through the gateway: ``name -> (job id, result)``."""
    outcomes = screen_paths(stack.url, [studies["covid"], studies["normal"]], quiet=True)
    out = {}
    for name, o in zip(("covid", "normal"), outcomes, strict=True):
        assert o.error is None, o.error
        out[name] = (o.job_id, CaseResult.model_validate(o.result))
    return out


def _shot(page: Any, name: str) -> None:
    if os.environ.get("CTSCREEN_UI_SCREENSHOTS", "0") == "1":
        from PIL import Image

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / name))
        with Image.open(SCREENSHOTS / name) as shot:  # a small palette PNG for the README
            small = shot.convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT)
        small.save(SCREENSHOTS / name, optimize=True)


def _box(b: Any) -> tuple[int, int, int, int]:
    o = b.original if b.original is not None else b.grid
    return (o.x0, o.y0, o.x1, o.y1)


# --- the page in the browser ------------------------------------------------------------------------
def test_worklist_shows_both_studies_with_their_verdicts(stack, screened, page):
    page.goto(stack.url + "/")
    for name, verdict in (("covid", "positive"), ("normal", "negative")):
        job_id, result = screened[name]
        assert result.verdict == verdict
        row = page.locator(f'tr[data-job-id="{job_id}"]')
        row.wait_for()
        assert row.get_attribute("data-state") == "done"
        assert row.get_attribute("data-verdict") == verdict
        assert row.locator(".verdict").inner_text() == verdict
        assert "Acc. A00000011" in row.inner_text() and "phantom" in row.inner_text()  # labels, patient-free
    assert "Phantom^" not in page.content()  # the patient's name is never on the page
    unfiltered = page.query_selector("table.worklist")
    page.select_option("#f-verdict", "positive")
    page.click("form.filters button[type=submit]")
    # the filtered view's table starts empty, so its COVID row says its answer is in (the old view's
    # "loaded" stamp could still change after it was read here: a live reload on the wire)
    page.wait_for_function("t => !t.isConnected", arg=unfiltered)
    page.locator(f'tr[data-job-id="{screened["covid"][0]}"]').wait_for()
    assert page.locator('tr[data-verdict="negative"]').count() == 0
    page.goto(stack.url + "/")
    page.locator(f'tr[data-job-id="{screened["normal"][0]}"]').wait_for()
    _shot(page, "worklist.png")


def test_study_view_draws_the_result_boxes_on_a_slice_of_the_run(stack, screened, studies, page):
    job_id, result = screened["covid"]
    assert result.evidence is not None and result.evidence.qualifies
    run = result.evidence.slices
    target = run[len(run) // 2].index  # a slice in the middle of the qualifying run
    page.goto(f"{stack.url}/#/study/{job_id}")
    stage = page.locator("#viewer")
    page.wait_for_selector("#viewer[data-ready=true]")
    page.click(f'.strip button[data-index="{target}"]')
    page.wait_for_selector(f'#viewer[data-index="{target}"][data-ready=true]')
    drawn = page.eval_on_selector_all(
        "#viewer rect.lesion", "rs => rs.map(r => [r.dataset.x0, r.dataset.y0, r.dataset.x1, r.dataset.y1, "
        "r.classList.contains('in-run')].map(v => typeof v === 'boolean' ? v : Number(v)))")
    finding = result.slices[target]
    expected = [[*_box(b), result.evidence.quadrant in b.quadrants] for b in finding.boxes]
    assert finding.boxes and sorted(map(list, drawn)) == sorted(expected)
    assert any(e[4] for e in expected)  # the run's boxes are highlighted
    quadrant = page.locator("#viewer rect.quadrant")
    assert quadrant.get_attribute("data-quadrant") == result.evidence.quadrant
    q = run[len(run) // 2].quadrant_original  # where the rule counted the run on this stored image
    assert [float(quadrant.get_attribute(k)) for k in ("x", "y", "width", "height")] == [
        q.x0, q.y0, q.x1 - q.x0 + 1, q.y1 - q.y0 + 1]
    va = finding.valid_area_original
    rect = page.locator("#viewer rect.valid-area")
    assert [float(rect.get_attribute(k)) for k in ("x", "y", "width", "height")] == [
        va.x0, va.y0, va.x1 - va.x0 + 1, va.y1 - va.y0 + 1]
    size = page.eval_on_selector("#viewer img", "i => [i.naturalWidth, i.naturalHeight]")
    ds = pydicom.dcmread(collect_files(studies["covid"])[0], stop_before_pixels=True)
    assert size == [ds.Columns, ds.Rows]  # the stored grid: the original boxes need no scaling
    assert f"{finding.position_mm:.1f} mm" in page.inner_text("#readout")
    # the result's message and the page number the run's slices alike (from 1, as the strip): the message
    # once said "slices 4-12" beside "slices 5–13"
    summary = page.inner_text("aside.summary")
    first, last = run[0].index + 1, run[-1].index + 1
    assert f"slices {first}-{last} (" in summary and f"slices {first}-{last}." in summary, summary
    assert page.locator(f'.strip button[data-index="{run[0].index}"]').inner_text() == str(first)
    page.evaluate("window.scrollTo(0, 0)")
    _shot(page, "study.png")
    # keys and wheel step through the slices; the window presets switch
    stage.focus()
    page.keyboard.press("ArrowDown")
    page.wait_for_selector(f'#viewer[data-index="{target + 1}"][data-ready=true]')
    page.keyboard.press("Home")
    page.wait_for_selector('#viewer[data-index="0"][data-ready=true]')
    stage.hover()
    page.mouse.wheel(0, 120)
    page.wait_for_selector('#viewer[data-index="1"][data-ready=true]')
    page.keyboard.press("m")
    page.wait_for_selector('button[data-window="mediastinum"][aria-pressed="true"]')
    assert "Mediastinum window" in page.inner_text("#readout")
    assert page.locator("#viewer rect.lesion").count() == len(result.slices[1].boxes)


def test_the_study_view_lists_the_results_warnings(stack, screened, page, tmp_path):
    """What the reader must know about the input (here: a 256 matrix resampled to 512) is on the study
    view, each warning once, as the result holds them; a study without warnings has no such section."""
    study = phantom.make_study(seed=15, kind="covid", n_slices=N_SLICES, matrix=256)
    (outcome,) = screen_paths(stack.url, [Path(phantom.write_study(study, tmp_path / "small"))], quiet=True)
    assert outcome.error is None, outcome.error
    warnings = CaseResult.model_validate(outcome.result).warnings
    assert any("resampled to 512x512" in w for w in warnings), warnings
    page.goto(f"{stack.url}/#/study/{outcome.job_id}")
    page.wait_for_selector("#viewer[data-ready=true]")
    assert page.locator("section.warnings li").all_inner_texts() == warnings
    covid_id, covid = screened["covid"]
    page.goto(f"{stack.url}/#/study/{covid_id}")
    page.wait_for_selector("#viewer[data-ready=true]")
    assert page.locator("section.warnings li").all_inner_texts() == covid.warnings


@pytest.mark.skipif(not FACE_SLICE.is_file(), reason=f"real face CT slice not present at {FACE_SLICE} (shared data not mounted)")
def test_a_head_ct_shows_its_boxes_as_no_lesions(stack, screened, page, tmp_path):
    """not_chest (a real CT of a face, boxed by the models): the study view says it is no chest CT and draws
    its boxes as ignored ones, no run, no quadrant, nothing called a lesion."""
    (outcome,) = screen_paths(stack.url, [face_series(tmp_path / "face")], quiet=True)
    assert outcome.error is None, outcome.error
    result = CaseResult.model_validate(outcome.result)
    assert result.reason == "not_chest" and result.evidence is not None  # boxes on every slice, a run
    boxed = next(f.index for f in result.slices if f.boxes)
    page.goto(f"{stack.url}/#/study/{outcome.job_id}")
    page.wait_for_selector("#viewer[data-ready=true]")
    summary = page.inner_text("aside.summary")
    assert "Not a chest CT: the boxes the models drew are no lung lesions" in summary
    assert "Qualifying run" not in summary and "Longest run" not in summary
    page.click(f'.strip button[data-index="{boxed}"]')
    page.wait_for_selector(f'#viewer[data-index="{boxed}"][data-ready=true]')
    assert page.locator("#viewer rect.ignored").count() == len(result.slices[boxed].boxes) > 0
    assert page.locator("#viewer rect.lesion").count() == 0 and page.locator("#viewer rect.quadrant").count() == 0
    readout = page.inner_text("#readout")  # announced (aria-live): it said "2 lesions"
    assert "lesion" not in readout and re.search(r"\d+ box(es)?$", readout), readout
    labels = page.locator(".strip button").evaluate_all("bs => bs.map(b => b.getAttribute('aria-label'))")
    assert labels and all("lesion" not in label and "run" not in label for label in labels)
    legend = page.inner_text("p.legend")
    assert "box (no lesion)" in legend and "in the run" not in legend and "run quadrant" not in legend


def test_a_failed_study_has_a_button_that_screens_it_again(stack, screened, page):
    """A failed job's view told the reader to send "POST /v1/jobs/<id>/retry". It has a Screen again button now,
    and its message no such hint. The failed job is played by the browser's router (the real one is done): refused
    first (403, the key cannot write), then queued, the view shows the job as it is now."""
    job_id, _ = screened["covid"]
    real = httpx.get(f"{stack.url}/v1/jobs/{job_id}", timeout=30).json()
    failed = {**real, "state": "failed", "result": None, "error": {
        "reason": "triton_unavailable", "message": "No Triton was ready. No Triton could take the study before its "
        f"deadline; its instances are kept: POST /v1/jobs/{job_id}/retry queues it again."}}
    posted: list[str] = []
    answers = iter([(403, {"reason": "insufficient_scope", "message": "This needs the scope studies:write."}),
                    (202, {"job_id": job_id, "state": "queued"})])

    def job(route: Any) -> None:
        if route.request.method == "POST":
            posted.append(route.request.url)
            status, body = next(answers)
            route.fulfill(status=status, content_type="application/json", body=json.dumps(body))
        elif not posted or len(posted) < 2:
            route.fulfill(status=200, content_type="application/json", body=json.dumps(failed))
        else:
            route.continue_()

    page.route(f"**/v1/jobs/{job_id}", job)
    page.route(f"**/v1/jobs/{job_id}/retry", job)
    page.goto(f"{stack.url}/#/study/{job_id}")
    status = page.locator("main p.state-failed")
    sync_api.expect(status).to_contain_text("its instances are kept.")
    assert "POST" not in status.inner_text()
    page.get_by_role("button", name="Screen again").click()
    sync_api.expect(page.locator("#retry-refused")).to_contain_text("Not queued again: This needs the scope")
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Screen again").click()
    page.wait_for_selector("#viewer[data-ready=true]")  # asked again: the job as the gateway has it
    assert posted == [f"{stack.url}/v1/jobs/{job_id}/retry"] * 2


def test_a_study_being_screened_says_screening_as_the_worklist_does(stack, screened, page):
    """The study view showed the job's internal steps ("decoding", "inferring") where the worklist says
    "screening" (the web review). The job being screened is played by the browser's router."""
    job_id, _ = screened["covid"]
    real = httpx.get(f"{stack.url}/v1/jobs/{job_id}", timeout=30).json()
    running = {**real, "state": "inferring", "result": None, "slices_done": 3, "slices_total": 8}
    page.route(f"**/v1/jobs/{job_id}", lambda route: route.fulfill(status=200, content_type="application/json",
                                                                   body=json.dumps(running)))
    page.route(f"**/v1/jobs/{job_id}/events", lambda route: route.abort())  # no "done" replaces the view
    page.goto(f"{stack.url}/#/study/{job_id}")
    sync_api.expect(page.locator("main p.state")).to_have_text("screening: 3/8 slices")


def test_a_study_being_screened_says_its_state_not_each_slice(stack, screened, page):
    """The study view's progress line was one live region with the slice count in it: rewritten at each progress
    event (every 0.5 s by default), a screen reader read "screening: 5/24 slices", "6/24", ... without end. Now the
    state alone is said when it changes; the count is on screen and in the bar. The job and its event stream are
    played by the browser's router (the real job is done)."""
    job_id, _ = screened["covid"]
    real = httpx.get(f"{stack.url}/v1/jobs/{job_id}", timeout=30).json()
    queued = {**real, "state": "queued", "result": None, "slices_done": 0, "slices_total": 0}
    steps = [{**queued, "state": state, "slices_done": done, "slices_total": 8}
             for state, done in [("decoding", 0), *[("inferring", d) for d in range(1, 9)], ("aggregating", 8)]]
    events = "retry: 600000\n\n" + "".join(f"event: progress\ndata: {json.dumps(v)}\n\n" for v in steps)
    page.route(f"**/v1/jobs/{job_id}", lambda route: route.fulfill(status=200, content_type="application/json",
                                                                   body=json.dumps(queued)))
    page.route(f"**/v1/jobs/{job_id}/events", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", headers={"X-Keepalive-Interval": "600"}, body=events))
    page.goto(stack.url + "/web/static/style.css")
    page.add_init_script("""window.__said = [];
        new MutationObserver((changes) => {
            for (const c of changes) {
                const node = c.target.nodeType === 1 ? c.target : c.target.parentElement;
                const live = node?.closest('[aria-live]:not([aria-live="off"]), [role="status"], [role="alert"]');
                if (live && live.id !== 'announce') window.__said.push(live.textContent);
            }
        }).observe(document, {subtree: true, childList: true, characterData: true});""")
    page.goto(f"{stack.url}/#/study/{job_id}")
    sync_api.expect(page.locator("main p.state")).to_have_text("screening: 8/8 slices")
    assert page.locator("main progress").evaluate("b => [b.value, b.max]") == [8, 8]
    said = [t for t in page.evaluate("window.__said") if t]  # "queued" came with the view: no change of a region
    assert said == ["screening"], said


def test_the_viewer_marks_the_patients_sides_on_the_image(stack, screened, page):
    """The slice was drawn as stored with nothing on it to say which side is the patient's: a study stored
    mirrored (its row direction to the patient's right) showed a left-lung finding where a reader expects the
    right lung (the web review). The markers come from the PNG's X-Image-Sides; the mirrored slice is played by
    the browser's router, the rest is the real gateway."""
    job_id, _ = screened["covid"]
    page.goto(f"{stack.url}/#/study/{job_id}")
    page.wait_for_selector("#viewer[data-ready=true]")
    marks = {edge: page.locator(f"#viewer .side-{edge}") for edge in ("left", "top", "right", "bottom")}
    assert {edge: m.inner_text() for edge, m in marks.items()} == {"left": "R", "top": "A", "right": "L", "bottom": "P"}
    assert "the patient's right on the image's left" in page.locator("#viewer img").get_attribute("alt")

    def mirrored(route: Any) -> None:
        answer = route.fetch()
        route.fulfill(response=answer, headers={**answer.headers, "x-image-sides": "L A R P"})

    page.route(f"**/v1/jobs/{job_id}/slices/*.png*", mirrored)
    page.reload()
    page.wait_for_selector("#viewer[data-ready=true]")
    sync_api.expect(marks["left"]).to_have_text("L")
    sync_api.expect(marks["right"]).to_have_text("R")


def test_a_gateway_with_no_destination_says_so_in_the_delivery_panel(stack, screened, page):
    """A gateway sending to no PACS or RIS showed "Not sent yet." under every result for 90 s, polling every 2 s,
    then "No delivery recorded" (the web review). The deliveries' X-Destinations-Configured says how many there
    are (this gateway: 2); a gateway with none is played by the browser's router."""
    job_id, _ = screened["normal"]
    real = httpx.get(f"{stack.url}/v1/jobs/{job_id}/deliveries", timeout=30)
    assert real.status_code == 200 and real.headers["x-destinations-configured"] == "2", real.headers
    page.route(f"**/v1/jobs/{job_id}/deliveries", lambda route: route.fulfill(
        status=200, content_type="application/json", body="[]", headers={"X-Destinations-Configured": "0"}))
    page.goto(f"{stack.url}/#/study/{job_id}")
    sync_api.expect(page.locator("section.deliveries p.hint")).to_contain_text("No destination is configured")


def test_the_study_view_names_the_study_as_the_worklist_does(stack, screened, page):
    """The study view named its study by its UID alone: a reader could not tell which study was open (the web
    review). It reads the study's worklist row (``/v1/worklist?job_id=``) and shows its accession number, study
    date, series and when it was received."""
    job_id, _ = screened["covid"]
    one = httpx.get(f"{stack.url}/v1/worklist", params={"job_id": job_id}, timeout=30).json()
    assert one["total"] == 1 and one["rows"][0]["job_id"] == job_id, one
    bad = httpx.get(f"{stack.url}/v1/worklist", params={"job_id": "x' OR 1=1"}, timeout=30)
    assert bad.status_code == 422 and bad.json()["reason"] == "bad_request", bad.text
    page.goto(f"{stack.url}/#/study/{job_id}")
    page.wait_for_selector("#viewer[data-ready=true]")
    sync_api.expect(page.locator("#study-identity")).to_contain_text("Accession A00000011")
    assert "received " in page.locator("#study-identity").inner_text()


def test_a_slice_that_cannot_be_shown_leaves_no_other_slice_on_screen(stack, screened, page):
    """The viewer kept the previous slice's image and boxes under the new slice's readout when an image
    failed (410 once retention removed the instances, 503, the network)."""
    job_id, result = screened["covid"]
    with_boxes = next(i for i, s in enumerate(result.slices) if s.boxes)
    page.route(f"**/v1/jobs/{job_id}/slices/{with_boxes + 1}.png*", lambda route: route.fulfill(
        status=410, content_type="application/json", body='{"reason": "instances_gone", "message": "gone"}'))
    page.goto(f"{stack.url}/#/study/{job_id}")
    page.wait_for_selector("#viewer[data-ready=true]")
    page.click(f'.strip button[data-index="{with_boxes}"]')
    page.wait_for_selector(f'#viewer[data-index="{with_boxes}"][data-ready=true]')
    assert page.locator("#viewer rect.lesion").count() == len(result.slices[with_boxes].boxes)
    page.locator("#viewer").focus()
    page.keyboard.press("ArrowDown")
    page.wait_for_selector(f'#viewer[data-index="{with_boxes + 1}"][data-failed=true]')
    assert page.get_attribute("#viewer img", "src") is None
    assert page.locator("#viewer rect").count() == 0
    assert "no image" in page.inner_text("#readout")


def test_a_slice_of_another_shape_than_square_is_drawn_in_its_shape(stack, screened, page):
    """A 180 x 256 slice was stretched to the square stage (object-fit: fill, the boxes' SVG likewise): its anatomy
    1.4 times too wide, and nothing on screen said so. The image here is a white 180 x 256 PNG in place of the
    gateway's: drawn in its shape, the stage keeps black bars beside it."""
    import io

    from PIL import Image

    job_id, _ = screened["covid"]
    png = io.BytesIO()
    Image.new("L", (180, 256), 255).save(png, format="PNG")
    page.route(f"**/v1/jobs/{job_id}/slices/*.png*", lambda route: route.fulfill(
        status=200, content_type="image/png", body=png.getvalue()))
    page.goto(f"{stack.url}/#/study/{job_id}")
    page.wait_for_selector("#viewer[data-ready=true]")
    shot = Image.open(io.BytesIO(page.locator("#viewer").screenshot())).convert("L")
    w, h = shot.size
    row = [shot.getpixel((x, h // 2)) for x in range(w)]
    white = [x for x, v in enumerate(row) if v > 200]
    assert white, "the slice is not drawn"
    drawn = (white[-1] - white[0] + 1) / h
    assert abs(drawn - 180 / 256) < 0.05, f"drawn {drawn:.2f} as wide as high, the image is {180 / 256:.2f}"
    viewbox = page.get_attribute("#viewer svg", "viewBox")
    assert viewbox == "0 0 180 256" and page.get_attribute("#viewer svg", "preserveAspectRatio") == "xMidYMid meet"


def test_a_gateway_out_of_reach_is_said_so_and_the_view_can_try_again(stack, screened, page):
    """A failed request left "Loading…" up for good (no deadline) or showed "TypeError: Failed to fetch". The
    network failure is simulated by the browser (Playwright aborts the request)."""
    job_id, _ = screened["covid"]
    page.route(f"**/v1/jobs/{job_id}", lambda route: route.abort("connectionrefused"))
    page.goto(f"{stack.url}/#/study/{job_id}")
    alert = page.wait_for_selector("main [role=alert]")
    assert "Cannot reach the gateway" in alert.inner_text() and "TypeError" not in alert.inner_text()
    page.unroute(f"**/v1/jobs/{job_id}")
    page.get_by_role("button", name="Try again").click()
    page.wait_for_selector("#viewer[data-ready=true]")


def test_the_service_view_refused_asks_once_and_leaves_the_focus_alone(stack, page):
    """Refused (no results:read), it asked every 2 s, each refusal pulling the focus into the sign-in form."""
    asked = []

    def refuse(route):
        asked.append(route.request.url)
        route.fulfill(status=403, content_type="application/json",
                      body='{"reason": "insufficient_scope", "message": "This needs the scope results:read."}')

    page.route("**/v1/service", refuse)
    page.goto(f"{stack.url}/#/service")
    page.wait_for_function("() => document.body.innerText.includes('Cannot load the service figures')")
    page.locator('a[data-nav="worklist"]').focus()
    page.wait_for_timeout(4500)  # two of the old 2 s retries
    assert len(asked) == 1, asked
    assert page.evaluate("document.activeElement.dataset.nav") == "worklist"


def test_the_page_and_the_api_send_their_security_headers(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        page, script, api = c.get("/"), c.get("/web/static/main.js"), c.get("/v1/worklist")
    for r in (page, script, api):
        assert (r.headers["x-content-type-options"], r.headers["x-frame-options"], r.headers["referrer-policy"]) == (
            "nosniff", "DENY", "no-referrer")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "'sha256-" in csp and "unsafe-inline" not in csp
    assert script.headers["content-security-policy"] == csp
    assert api.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    # the modules are asked for again each time (304 by ETag): a browser guessed them fresh from their age and ran
    # an upgraded page with the old modules
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        for path in sorted(p.name for p in (ROOT / "gateway" / "web" / "static").iterdir()):
            r = c.get(f"/web/static/{path}")
            assert r.status_code == 200 and r.headers["cache-control"] == "no-cache", path
            again = c.get(f"/web/static/{path}", headers={"If-None-Match": r.headers["etag"]})
            assert again.status_code == 304, path


def test_many_worklist_tabs_share_one_event_stream(stack, screened, browser, tmp_path):
    """Each worklist tab held its own event stream open, and Chromium opens at most 6 HTTP/1.1 connections to a
    host: with six tabs open a seventh never loaded, and live updates stopped. Eight tabs of one browser follow a
    new study live, and a ninth loads."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    try:
        tabs = []
        for _ in range(8):
            tab = context.new_page()
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.goto(stack.url + "/")
            tab.wait_for_selector("main[data-loaded]", timeout=20_000)
            tabs.append(tab)
        for tab in tabs:
            tab.wait_for_selector('#live-state[data-state="live"]', timeout=20_000)
        path = Path(phantom.write_study(phantom.make_study(seed=17, kind="normal", n_slices=8), tmp_path / "tabs"))
        (outcome,) = screen_paths(stack.url, [path], quiet=True)
        assert outcome.error is None, outcome.error
        for tab in tabs:  # the tabs that read no stream of their own heard it too
            tab.wait_for_function(f"""() => document.querySelector('tr[data-job-id="{outcome.job_id}"]')
                ?.dataset.verdict""", timeout=20_000)
        ninth = context.new_page()
        ninth.goto(stack.url + "/")
        ninth.wait_for_selector(f'tr[data-job-id="{outcome.job_id}"]', timeout=20_000)
        ninth.wait_for_selector('#live-state[data-state="live"]', timeout=20_000)
        tabs[0].close()  # the tab that read the stream for all: another one takes it over
        path = Path(phantom.write_study(phantom.make_study(seed=18, kind="normal", n_slices=8), tmp_path / "more"))
        (outcome,) = screen_paths(stack.url, [path], quiet=True)
        assert outcome.error is None, outcome.error
        for tab in [*tabs[1:], ninth]:
            tab.wait_for_function(f"""() => document.querySelector('tr[data-job-id="{outcome.job_id}"]')
                ?.dataset.verdict""", timeout=20_000)
    finally:
        context.close()
    assert not errors, errors


def test_progress_streams_while_a_third_study_is_screening(stack, screened, studies, page):
    page.goto(stack.url + "/")
    page.locator(f'tr[data-job-id="{screened["covid"][0]}"]').wait_for()
    page.wait_for_selector('#live-state[data-state="live"]')
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            for (const td of document.querySelectorAll('tr[data-state] td.state')) {
                const t = td.innerText.trim();
                if (window.__seen[window.__seen.length - 1] !== t) window.__seen.push(t);
            }
        }).observe(document.querySelector('table.worklist tbody'), {subtree: true, childList: true,
                                                                     characterData: true});
    }""")
    job: dict[str, Any] = {}

    def upload() -> None:
        files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in collect_files(studies["third"])]
        job.update(httpx.post(stack.url + "/v1/studies", files=files, timeout=120).json())

    sender = threading.Thread(target=upload)
    sender.start()
    page.wait_for_selector('tr[data-state="screening"]', timeout=120_000)
    _shot(page, "worklist-screening.png")
    sender.join()
    row = page.locator(f'tr[data-job-id="{job["job_id"]}"]')
    row.wait_for()
    page.wait_for_function(f"""() => document.querySelector('tr[data-job-id="{job["job_id"]}"]')
        ?.dataset.verdict""", timeout=120_000)  # done over SSE, then the row reloads with its verdict
    seen = page.evaluate("window.__seen")
    steps = [tuple(map(int, m.groups())) for t in seen if (m := re.match(r"screening (\d+)/(\d+)", t))]
    assert len({d for d, _ in steps}) >= 2, f"too few progress updates over SSE: {seen}"
    assert [d for d, _ in steps] == sorted(d for d, _ in steps) and all(n == 2 * N_SLICES for _, n in steps)
    assert row.get_attribute("data-verdict") in ("positive", "negative", "indeterminate")
    # a screen reader hears which study finished and its verdict ("A study finished: done" said neither)
    page.wait_for_function("() => document.getElementById('announce').textContent.includes('Acc. A00000012: ')")
    assert page.inner_text("#announce").endswith(row.get_attribute("data-verdict"))


def test_a_study_finished_while_the_events_were_down_shows_once_they_return(stack, screened, page, tmp_path):
    """The worklist's event stream tells what happens from the moment it connects: a study that finished
    while it was down (a proxy cut, a gateway restart) must reach the table when it connects again."""
    blocked = {"on": True}
    page.route("**/v1/worklist/events", lambda route: route.abort() if blocked["on"] else route.continue_())
    page.goto(stack.url + "/")
    page.locator(f'tr[data-job-id="{screened["covid"][0]}"]').wait_for()
    path = Path(phantom.write_study(phantom.make_study(seed=13, kind="normal", n_slices=N_SLICES), tmp_path / "late"))
    (outcome,) = screen_paths(stack.url, [path], quiet=True)
    assert outcome.error is None and outcome.job_id
    row = f'tr[data-job-id="{outcome.job_id}"]'
    time.sleep(1.0)
    assert page.locator(row).count() == 0  # no event reached the page: it cannot know yet
    blocked["on"] = False  # the stream reconnects (every 2 s) and the table loads again
    page.wait_for_function(f"""() => document.querySelector('{row}')?.dataset.verdict""", timeout=20_000)
    assert page.get_attribute("#live-state", "data-state") == "live"


class _SilentProxy:
    """A TCP forwarder to a local port that can go silent: frozen, it keeps every connection open and passes no
    byte either way (a NAT or a proxy that lost the flow without a reset)."""

    def __init__(self, to_port: int) -> None:
        import socket

        self.to_port = to_port
        self.frozen = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.sockets: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                near, _ = self.server.accept()
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.to_port))
            self.sockets += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: Any, b: Any) -> None:
        try:
            while data := a.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.05)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self.frozen.clear()
        for sock in [self.server, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.close()


def test_a_silent_event_stream_is_taken_for_dead_and_opened_again(stack, screened, page):
    """A connection that died without a reset (a frozen proxy, a NAT that forgot the flow) kept "live" on the
    worklist for good while nothing came. This gateway sends a keep-alive every second (X-Keepalive-Interval): behind
    a proxy gone silent the page says it is reconnecting, and live again (the table loaded again) once bytes pass."""
    proxy = _SilentProxy(int(stack.url.rsplit(":", 1)[1]))
    try:
        page.goto(proxy.url + "/")
        page.locator(f'tr[data-job-id="{screened["covid"][0]}"]').wait_for()
        page.wait_for_selector('#live-state[data-state="live"]')
        proxy.frozen.set()
        page.wait_for_selector('#live-state[data-state="reconnecting"]', timeout=30_000)
        before = page.get_attribute("main", "data-loaded")
        proxy.frozen.clear()
        page.wait_for_selector('#live-state[data-state="live"]', timeout=30_000)
        page.wait_for_function(f"() => document.querySelector('main').dataset.loaded !== '{before}'", timeout=30_000)
        page.goto("about:blank")
    finally:
        proxy.close()


def test_an_event_stream_refused_for_too_many_says_why_and_backs_off(stack, screened, page):
    """A 429 too_many_streams on the worklist's stream was taken for a network drop: "reconnecting" for good, asked
    again every 2 s. The page says the server's reason and waits at least its Retry-After, longer each time."""
    message = "This credential holds 8 event streams open, as many as one caller may; close one (or reuse it) first."
    asked: list[float] = []
    refuse = {"on": True}

    def answer(route: Any) -> None:
        if not refuse["on"]:
            route.continue_()
            return
        asked.append(time.monotonic())
        route.fulfill(status=429, content_type="application/json", headers={"Retry-After": "1"},
                      body=json.dumps({"reason": "too_many_streams", "message": message}))

    page.route("**/v1/worklist/events", answer)
    page.goto(stack.url + "/")
    page.wait_for_selector('#live-state[data-state="refused"]')
    assert message in page.inner_text("#live-state")
    page.wait_for_function("() => /trying again in 4 s/.test(document.getElementById('live-state').textContent)",
                           timeout=30_000)  # refused again: the wait doubled
    assert len(asked) >= 2 and asked[1] - asked[0] >= 1.0  # no sooner than its Retry-After
    refuse["on"] = False
    page.wait_for_selector('#live-state[data-state="live"]', timeout=30_000)


def test_a_view_left_behind_never_writes_to_the_page(stack, screened, page):
    """An answer to the worklist view just left (the filter changed while its load was on the wire) must
    not mark the new view loaded: CI once saw the filtered view "loaded" with its table still empty."""
    held: list[Any] = []
    release = {"all": False}

    def hold(route: Any) -> None:
        route.continue_() if release["all"] else held.append(route)

    def worklist(url: str) -> bool:
        return "/v1/worklist?" in url

    page.route(worklist, hold)  # every worklist answer waits for the test
    page.goto(stack.url + "/")
    page.wait_for_function("() => document.querySelector('table.worklist') !== null")
    page.evaluate("() => { location.hash = '#/?verdict=positive'; }")
    page.wait_for_function("() => document.querySelector('#f-verdict').value === 'positive'")
    old = [r for r in held if "verdict=positive" not in r.request.url]
    assert old, "the first view asked for no worklist"
    for route in old:
        with page.expect_response(route.request.url) as answer:
            route.continue_()
        answer.value.finished()  # its body is in: the old view's handler is due
    for _ in range(3):  # let it run: its JSON parse, then the tasks and frames after it
        page.evaluate("() => new Promise(r => setTimeout(() => requestAnimationFrame(() => r()), 0))")
    page.wait_for_timeout(100)
    assert page.get_attribute("main", "data-loaded") is None, "the view left behind marked the page loaded"
    release["all"] = True
    for route in held:
        if route not in old:
            route.continue_()
    page.wait_for_function("() => document.querySelector('main').dataset.loaded")
    assert page.locator(f'tr[data-job-id="{screened["covid"][0]}"]').count() == 1
    assert page.locator('tr[data-verdict="negative"]').count() == 0


def test_a_study_view_left_behind_never_writes_its_error_to_the_page(stack, screened, page):
    """The study view's "no such study" (a late 404, a network error) arriving after the user went back to
    the worklist must not replace the worklist."""
    held: list[Any] = []
    page.route(lambda url: "/v1/jobs/deadbeef00" in url, lambda route: held.append(route))
    page.goto(f"{stack.url}/#/study/deadbeef00")
    deadline = time.monotonic() + 30
    while not held and time.monotonic() < deadline:  # the study view's module loads, then it asks
        page.wait_for_timeout(50)  # (route handlers run while Playwright is called)
    assert len(held) == 1
    page.evaluate("() => { location.hash = '#/'; }")
    page.wait_for_function("() => document.querySelector('main').dataset.loaded")
    with page.expect_response(lambda r: "/v1/jobs/deadbeef00" in r.url) as answer:
        held[0].fulfill(status=404, content_type="application/json", body='{"reason": "not_found", "message": "gone"}')
    answer.value.finished()
    for _ in range(3):
        page.evaluate("() => new Promise(r => setTimeout(() => requestAnimationFrame(() => r()), 0))")
    page.wait_for_timeout(100)
    assert page.locator("table.worklist").count() == 1 and page.locator("main [role=alert]").count() == 0


def test_a_live_reload_keeps_the_keyboard_focus_on_its_row(stack, screened, page, tmp_path):
    """The table is rebuilt when studies arrive or finish: a keyboard user on a study's link stays there
    (it went to the page's start). Durations round once: 119.6 s is 2 min 0 s, not 1 min 60 s."""
    page.goto(stack.url + "/")
    link = f'tr[data-job-id="{screened["covid"][0]}"] a'
    page.locator(link).wait_for()
    page.wait_for_selector('#live-state[data-state="live"]')
    page.focus(link)
    before = page.get_attribute("main", "data-loaded")
    path = Path(phantom.write_study(phantom.make_study(seed=14, kind="normal", n_slices=N_SLICES), tmp_path / "new"))
    (outcome,) = screen_paths(stack.url, [path], quiet=True)
    assert outcome.error is None
    page.wait_for_function(f"""() => document.querySelector('tr[data-job-id="{outcome.job_id}"]')?.dataset.verdict
        && document.querySelector('main').dataset.loaded !== '{before}'""", timeout=20_000)
    assert page.evaluate(f"""() => document.activeElement === document.querySelector('{link}')""")
    shown = page.evaluate("""async () => { const d = await import('/web/static/dom.js');
        return [119.6, 59.96, 61, 3.25].map(d.fmtSeconds); }""")
    assert shown == ["2 min 0 s", "1 min 0 s", "1 min 1 s", "3.3 s"]


def test_skip_link_moves_the_focus_and_keeps_the_view(stack, screened, page):
    """"Skip to content" on a study: the focus goes to the content, the study stays on screen (the link's
    #main once sent the router to the worklist); the page says it is a screening aid, not a diagnosis."""
    job_id = screened["normal"][0]
    page.goto(f"{stack.url}/#/study/{job_id}")
    page.wait_for_selector("#viewer[data-ready=true]")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.activeElement.id === 'main'")
    time.sleep(0.3)
    assert page.url.endswith(f"#/study/{job_id}") and page.locator("#viewer").count() == 1
    assert "not a diagnosis" in page.inner_text("#notice")
    if screened["normal"][1].verdict == "negative":
        assert "The model flagged no lesion on any slice." in page.inner_text("aside.summary")


def test_service_view_shows_triton_and_throughput(stack, screened, page):
    page.goto(f"{stack.url}/#/service")
    page.wait_for_selector("table.endpoints tr[data-ready=true]")
    assert stack.triton_url in page.inner_text("table.endpoints")
    page.wait_for_function("() => document.querySelector('#p50').innerText !== '—'")
    assert float(page.inner_text("#per-hour")) >= 2
    first = page.get_attribute("main", "data-loaded")
    page.wait_for_function(f"() => document.querySelector('main').dataset.loaded !== '{first}'", timeout=10_000)
    _shot(page, "service.png")


def test_the_service_view_says_what_was_never_measured(triton, page, tmp_path):
    """An endpoint never measured and not ready showed "15 slices/s" (the pool's assumed rate) under "Measured rate",
    and a backlog time divided by it. Here no Triton listens: no rate, and the backlog time is unknown."""
    away = f"127.0.0.1:{free_port()}"
    with _gateway(triton_url=away, settings_overrides={"data_dir": tmp_path / "data"}) as stack:
        d = httpx.get(stack.url + "/v1/service", timeout=30).json()
        assert d["endpoints"] == [{"name": "Triton 1", "url": away, "ready": False, "slices_per_second": None}]
        assert d["backlog_seconds"] is None
        page.goto(f"{stack.url}/#/service")
        page.wait_for_selector("table.endpoints tr[data-ready=false]")
        assert page.inner_text("table.endpoints tbody td.num") == "not measured"
        assert page.inner_text("#backlog-seconds") == "unknown (no Triton ready)"
        page.goto("about:blank")


def test_sign_in_box_puts_the_credential_on_every_request(stack, screened, page):
    seen: list[str | None] = []
    page.on("request", lambda r: seen.append(r.headers.get("authorization")) if "/v1/" in r.url else None)
    page.goto(stack.url + "/")
    page.locator(f'tr[data-job-id="{screened["covid"][0]}"]').wait_for()
    assert seen and all(h is None for h in seen)  # loopback without auth: no sign-in needed
    page.click("#signin-toggle")
    page.fill("#credential", "cts_example-key")
    page.click("#signin-form button[type=submit]")
    seen.clear()
    page.locator(f'tr[data-job-id="{screened["covid"][0]}"]').wait_for()
    page.goto(f'{stack.url}/#/study/{screened["covid"][0]}')
    page.wait_for_selector("#viewer[data-ready=true]")
    assert seen and all(h == "Bearer cts_example-key" for h in seen)  # JSON, events stream and images
    assert page.evaluate("sessionStorage.getItem('ctscreen.credential')") == "cts_example-key"


def test_a_pasted_credential_loses_its_invisible_characters_and_a_foreign_one_is_refused(stack, screened, page):
    """A credential pasted with a zero-width space broke the page with "TypeError: Failed to execute 'set' on
    'Headers'". Invisible characters and white space go; a character no key or token has is refused in the sign-in
    box; one stored before (this tab's sessionStorage) opens the sign-in box with the reason, never a TypeError."""
    seen: list[str | None] = []
    page.on("request", lambda r: seen.append(r.headers.get("authorization")) if "/v1/" in r.url else None)
    page.goto(stack.url + "/")
    page.locator(f'tr[data-job-id="{screened["covid"][0]}"]').wait_for()
    page.click("#signin-toggle")
    page.fill("#credential", " cts_example-key\u200b\ufeff ")
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-form", state="hidden")
    assert page.evaluate("sessionStorage.getItem('ctscreen.credential')") == "cts_example-key"
    seen.clear()
    page.reload()
    page.locator(f'tr[data-job-id="{screened["covid"][0]}"]').wait_for()
    assert seen and all(h == "Bearer cts_example-key" for h in seen)

    page.click("#signin-toggle")
    page.fill("#credential", "cts_example\u2013key")  # an en dash, where the issuer wrote "-"
    page.click("#signin-form button[type=submit]")
    sync_api.expect(page.locator("#signin-message")).to_contain_text("U+2013")
    assert page.is_visible("#signin-form") and "TypeError" not in page.inner_text("body")
    assert page.evaluate("sessionStorage.getItem('ctscreen.credential')") == "cts_example-key"

    page.evaluate("sessionStorage.setItem('ctscreen.credential', 'cts_example\u2013key')")
    page.reload()
    sync_api.expect(page.locator("#signin-message")).to_contain_text("The credential cannot be sent")
    assert "TypeError" not in page.inner_text("body")


# --- the routes behind it ---------------------------------------------------------------------------
def test_worklist_route_filters_and_pages_in_the_server(stack, screened):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        everything = c.get("/v1/worklist").json()
        assert everything["total"] >= 2
        received = [r["received_at"] for r in everything["rows"]]
        assert received == sorted(received, reverse=True)
        positive = c.get("/v1/worklist", params={"verdict": "positive"}).json()
        assert screened["covid"][0] in {r["job_id"] for r in positive["rows"]}
        assert screened["normal"][0] not in {r["job_id"] for r in positive["rows"]}
        one = c.get("/v1/worklist", params={"limit": 1, "offset": 1, "state": "done"}).json()
        assert len(one["rows"]) == 1 and one["total"] >= 2
        assert c.get("/v1/worklist", params={"received_from": "2999-01-01"}).json()["total"] == 0
        today = time.strftime("%Y-%m-%d", time.gmtime())
        assert c.get("/v1/worklist", params={"received_to": today}).json()["total"] == everything["total"]
        row = next(r for r in everything["rows"] if r["job_id"] == screened["covid"][0])
        assert row["labels"]["accession_number"] == "A00000011" and row["time_s"] > 0 and row["reason"] == "run_found"
        for bad in ({"verdict": "maybe"}, {"state": "lost"}, {"limit": 0}, {"received_from": "yesterday"},
                    {"received_to": "2024-02-30"},
                    {"received_to": "2020-01-01", "received_from": "2021-01-01"}):  # was 200, no rows
            r = c.get("/v1/worklist", params=bad)
            assert r.status_code == 422 and r.json()["reason"] == "bad_request", bad
            # the message names what does not match (the page shows only the message)
            assert f"query parameter {next(iter(bad))}: " in r.json()["message"], r.json()


def test_slice_png_is_cached_and_refuses_clearly(stack, screened):
    job_id, result = screened["covid"]
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        r = c.get(f"/v1/jobs/{job_id}/slices/3.png", params={"window": "mediastinum"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
        # never kept by the browser (a shared workstation's disk cache held them after sign-out); a 304 by ETag for
        # a client that keeps them, once the credential is checked
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["x-image-sides"] == "R A L P"  # the phantom is stored as scanners usually store a slice
        again = c.get(f"/v1/jobs/{job_id}/slices/3.png", params={"window": "mediastinum"},
                      headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and not again.content
        lung = c.get(f"/v1/jobs/{job_id}/slices/3.png")
        assert lung.headers["etag"] != r.headers["etag"] and lung.content != r.content
        cases = {f"/v1/jobs/{job_id}/slices/{result.n_slices}.png": (404, "no_such_slice"),
                 "/v1/jobs/0123456789abcdef/slices/0.png": (404, "not_found"),
                 f"/v1/jobs/{job_id}/slices/0.png?window=bone": (422, "bad_request"),
                 f"/v1/jobs/{job_id}/slices/x.png": (422, "bad_request")}
        for path, (status, reason) in cases.items():
            got = c.get(path)
            assert (got.status_code, got.json()["reason"]) == (status, reason), path


def test_service_route_reports_endpoints_and_latency(stack, screened):
    d = httpx.get(stack.url + "/v1/service", timeout=30).json()
    assert d["endpoints"] == [{"name": "Triton 1", "url": stack.triton_url, "ready": True,
                               "slices_per_second": d["endpoints"][0]["slices_per_second"]}]
    assert d["p50_s"] > 0 and d["p95_s"] >= d["p50_s"] and d["studies_per_hour"] >= 2
    assert d["backlog_slices"] >= 0 and isinstance(d["failures"], list)


# --- what a review against a real gateway found (every job state, a study of two series, STOW) ----------
def _files(folder: Path, edit: Any) -> list[tuple[str, bytes]]:
    return edited([(p.name, p.read_bytes()) for p in collect_files(folder)], edit)


def _stow(url: str, files: list[tuple[str, bytes]]) -> None:
    boundary = "ctscreen-web-test"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                    for _, data in files) + f"--{boundary}--\r\n".encode()
    r = httpx.post(url + "/dicomweb/studies", content=body, timeout=60,
                   headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert r.status_code == 200, r.text


def _wait_done(url: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        view = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if view["state"] in ("done", "failed"):
            return view
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish: {view}")


def test_the_series_label_is_the_screened_series_not_the_scout_sent_first(stack, studies, tmp_path):
    """Scanners send the scout first: the row named the first stored instance's series ('SCOUT'), recorded
    while the study was still arriving, beside the chest series' verdict."""
    uid, scout = generate_uid(), generate_uid()

    def study(ds: Any) -> None:  # one patient too: two phantoms' IDs would refuse the upload (mixed_patients)
        ds.StudyInstanceUID, ds.AccessionNumber, ds.PatientID = uid, "TWOSERIES", "TWOSERIES"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()

    def scout_edit(ds: Any) -> None:
        study(ds)
        ds.SeriesInstanceUID, ds.SeriesDescription, ds.SeriesNumber = scout, "SCOUT", 99

    def chest_edit(ds: Any) -> None:
        study(ds)
        ds.SeriesDescription = "CHEST 1.0"

    few = Path(phantom.write_study(phantom.make_study(seed=14, kind="normal", n_slices=3), tmp_path / "scout"))
    files = _files(few, scout_edit) + _files(studies["covid"], chest_edit)
    r = httpx.post(stack.url + "/v1/studies", timeout=120,
                   files=[("files", (name, data, "application/dicom")) for name, data in files])
    assert r.status_code == 202, r.text
    view = _wait_done(stack.url, r.json()["job_id"])
    assert view["state"] == "done" and view["series_instance_uid"] != scout and view["result"]["n_slices"] == N_SLICES
    for _ in range(2):  # read from the screened series, then as recorded
        row = next(row for row in httpx.get(stack.url + "/v1/worklist", timeout=30).json()["rows"]
                   if row["job_id"] == view["job_id"])
        assert row["labels"]["series_description"] == "CHEST 1.0", row["labels"]
        assert row["labels"]["accession_number"] == "TWOSERIES"


def test_a_study_received_while_the_page_is_open_shows_and_supersedes_live(stack, screened, studies, page, tmp_path):
    """STOW studies have no job while they arrive, so no job event told the open worklist: a new study, and a
    late instance opening version 2 of a done study (its verdict superseded), showed only on a reload. The
    superseded version's own view says it is superseded. A study without an accession number shows the end
    of its UID (the start is the organisation's root, the same for every study)."""
    uid = generate_uid()

    def no_accession(ds: Any) -> None:
        ds.StudyInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        del ds.AccessionNumber

    small = Path(phantom.write_study(phantom.make_study(seed=15, kind="normal", n_slices=6), tmp_path / "stow"))
    _stow(stack.url, _files(small, no_accession))
    first = httpx.post(f"{stack.url}/v1/studies/{uid}/complete", timeout=30)
    assert first.status_code == 202, first.text
    job1 = _wait_done(stack.url, first.json()["job_id"])["job_id"]
    page.goto(stack.url + "/")
    row1 = page.locator(f'tr[data-job-id="{job1}"]')
    row1.wait_for()
    page.wait_for_selector('#live-state[data-state="live"]')
    assert row1.get_attribute("data-superseded-by") is None
    link = row1.locator("th.uid a")
    assert link.inner_text() == "…" + uid[-18:] and link.get_attribute("title") == uid
    assert link.get_attribute("aria-label") == f"Study {uid}"

    _stow(stack.url, _files(small, no_accession)[:1])  # one late instance: version 2, receiving
    page.wait_for_function(f"""() => document.querySelector('tr[data-job-id="{job1}"]')
        ?.dataset.supersededBy === "2" """, timeout=10_000)
    receiving = page.locator('tr[data-state="receiving"]', has_text=uid[-18:])
    assert receiving.count() == 1 and "v2" in receiving.inner_text()

    page.goto(f"{stack.url}/#/study/{job1}")
    page.wait_for_selector("#verdict")
    note = page.locator("#superseded")
    assert "version 2 of this study was received after this one (version 1)" in note.inner_text()
    view = httpx.get(f"{stack.url}/v1/jobs/{job1}", timeout=30).json()
    assert (view["version"], view["superseded_by"]) == (1, 2)
    assert httpx.get(f"{stack.url}/v1/jobs/{screened['covid'][0]}", timeout=30).json()["superseded_by"] is None


@contextlib.contextmanager
def _gateway(**kw: Any) -> Iterator[Stack]:
    """``run_stack`` started in a thread of its own: its start-up calls ``asyncio.run``, which the thread where
    Playwright's loop runs refuses (a test's own gateway, started once its page is open)."""
    held = run_stack(port=0, **kw)
    with ThreadPoolExecutor(1) as pool:
        stack = pool.submit(held.__enter__).result()
    with contextlib.ExitStack() as on_exit:
        on_exit.push(held)
        yield stack


def _sent(stack: Stack, study: Path) -> str:
    """``study`` sent to ``stack`` (POST /v1/studies): its job."""
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in collect_files(study)]
    r = httpx.post(stack.url + "/v1/studies", files=files, timeout=120)
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


# what the page's live region (#announce) says from now on, in window.__said; window.__kept is gone if it reloads
HEAR_ANNOUNCE = """() => { window.__kept = true; window.__said = [];
    new MutationObserver(() => window.__said.push(document.getElementById('announce').textContent))
        .observe(document.getElementById('announce'), {subtree: true, childList: true, characterData: true}); }"""


@pytest.mark.parametrize("where", ["/", "/#/?limit=1&offset=1"], ids=["first page", "version 1 alone on page 2"])
def test_a_retried_version_supersedes_the_earlier_one_again_at_once(triton, page, tmp_path, where):
    """Version 2 of a done study failing gives version 1 its reading back, and its row loses "superseded" at
    once; retried, version 2 is to replace that reading again, yet version 1's row showed "superseded" again
    only once version 2 ended or the page was loaded again. Past the first page, with version 2's row not on it,
    version 1's row kept whichever mark it was loaded with: the page reloaded for no event of a job it did not
    show. Version 1 is screened by a gateway on the real Triton; a second gateway on the same store has no
    Triton, so version 2 and its retry wait queued until the deadline fails them."""
    uid = generate_uid()

    def one_study(ds: Any) -> None:
        ds.StudyInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()

    small = Path(phantom.write_study(phantom.make_study(seed=16, kind="normal", n_slices=6), tmp_path / "study"))
    files = _files(small, one_study)
    common = {"data_dir": tmp_path / "data", "stow_quiet_period_s": 3600.0}
    with _gateway(triton_url=triton.grpc_url, settings_overrides=common) as first:
        _stow(first.url, files)
        r = httpx.post(f"{first.url}/v1/studies/{uid}/complete", timeout=30)
        assert r.status_code == 202, r.text
        job1 = _wait_done(first.url, r.json()["job_id"])["job_id"]
        assert httpx.get(f"{first.url}/v1/jobs/{job1}", timeout=30).json()["state"] == "done"

    deadline_s = 8.0
    away = f"127.0.0.1:{free_port()}"  # nobody listens: no Triton takes a study
    with _gateway(triton_url=away, settings_overrides={**common, "job_deadline_s": deadline_s}) as stack:
        _stow(stack.url, _files(small, one_study)[:1])  # one late instance: version 2, receiving
        page.goto(stack.url + where)
        page.wait_for_selector('#live-state[data-state="live"]')
        row1 = f'tr[data-job-id="{job1}"]'
        page.locator(row1).wait_for()
        alone = where != "/"

        def in_state(job: str, state: str, timeout_s: float) -> None:
            if not alone:  # its row shows it
                page.wait_for_selector(f'tr[data-job-id="{job}"][data-state="{state}"]', timeout=timeout_s * 1000)
                return
            assert page.locator(f'tr[data-job-id="{job}"]').count() == 0  # not on this page
            end = time.monotonic() + timeout_s
            while (now := httpx.get(f"{stack.url}/v1/jobs/{job}", timeout=30).json()["state"]) != state:
                assert time.monotonic() < end, f"job {job} is {now}, not {state}, after {timeout_s} s"
                time.sleep(0.2)

        def superseded_by(by: str | None, timeout_s: float) -> None:
            page.wait_for_function(f"""() => {{ const tr = document.querySelector('{row1}');
                return tr && (tr.dataset.supersededBy ?? null) === {json.dumps(by)}; }}""", timeout=timeout_s * 1000)

        superseded_by("2", 10)
        r = httpx.post(f"{stack.url}/v1/studies/{uid}/complete", timeout=30)
        assert r.status_code == 202, r.text
        job2 = r.json()["job_id"]
        # its deadline passes queued: failed, it replaces nothing, and version 1 is the study's reading again
        in_state(job2, "failed", deadline_s + 20)
        superseded_by(None, 5)
        assert "superseded" not in page.inner_text(row1)

        r = httpx.post(f"{stack.url}/v1/jobs/{job2}/retry", timeout=30)
        assert r.status_code == 202, r.text
        # queued again on its retry's event: version 1 is superseded again, before version 2 ends
        in_state(job2, "queued", 5)
        superseded_by("2", 3)
        assert "superseded by v2" in page.inner_text(row1)
        assert httpx.get(f"{stack.url}/v1/jobs/{job2}", timeout=30).json()["state"] == "queued"
        assert httpx.get(f"{stack.url}/v1/jobs/{job1}", timeout=30).json()["superseded_by"] == 2
        page.goto("about:blank")  # its event stream closed: the gateway stops without waiting 5 s for it


def test_a_study_view_open_while_its_job_runs_shows_the_result_in_place(triton, studies, page, tmp_path):
    """The view of a study being screened reloaded the whole page when its job was done: the sign-in asked again,
    the page flashed, the scroll and the keyboard focus went to the page's start, and a screen reader heard the page
    again instead of the verdict. Now the view is drawn again in place (verdict, boxes), the focus stays on the
    element it was on, and the live region says the outcome once. The page's gateway has no Triton, so the job waits
    queued while the view opens and the reader tabs to its link; a second replica on the same store, on the real
    Triton, then screens it (the page's gateway streams its progress, as any replica streams any job)."""
    common = {"data_dir": tmp_path / "data"}
    with _gateway(triton_url=f"127.0.0.1:{free_port()}", settings_overrides=common) as stack:
        job_id = _sent(stack, studies["covid"])
        page.goto(f"{stack.url}/#/study/{job_id}")
        page.wait_for_selector("main p.state-queued")
        navigated: list[str] = []
        page.on("framenavigated", lambda frame: navigated.append(frame.url))
        page.locator("main a", has_text="← Worklist").focus()
        page.evaluate("""() => { window.__kept = true; window.__said = [];
            new MutationObserver((changes) => {
                for (const c of changes) {
                    const node = c.target.nodeType === 1 ? c.target : c.target.parentElement;
                    const live = node?.closest('[aria-live]:not([aria-live="off"]), [role="status"], [role="alert"]');
                    if (live) window.__said.push([live.id, live.textContent]);
                }
            }).observe(document, {subtree: true, childList: true, characterData: true}); }""")
        with _gateway(triton_url=triton.grpc_url, settings_overrides=common):
            page.wait_for_selector("#viewer[data-ready=true]", timeout=120_000)
        done = httpx.get(f"{stack.url}/v1/jobs/{job_id}", timeout=30).json()
        result = CaseResult.model_validate(done["result"])
        assert page.evaluate("() => window.__kept") is True and navigated == []  # no reload, no navigation
        assert page.inner_text("#verdict") == result.verdict == "positive"
        shown = int(page.get_attribute("#viewer", "data-index"))
        assert 0 < page.locator("#viewer rect.lesion").count() == len(result.slices[shown].boxes)
        assert page.evaluate("""() => { const a = document.activeElement;
            return a.isConnected && a.matches('main a[href="#/"]') && a.textContent; }""") == "← Worklist"
        said = page.evaluate("() => window.__said")
        assert [t for where, t in said if where == "announce"] == ["screening done: positive"], said
        assert not [t for where, t in said if where != "announce" and "done" in t], said
        page.goto("about:blank")  # its event streams closed: the gateway stops without waiting for them


def test_a_study_view_open_when_its_job_fails_shows_the_failure_in_place(studies, page, tmp_path):
    """As a done one, a job that fails while its view is open is drawn again in place (its reason, Screen again),
    the focus kept and the failure said once; the view read the job again and replaced itself, the focus lost. No
    Triton: the job's deadline passes while it waits queued."""
    settings = {"data_dir": tmp_path / "data", "job_deadline_s": 4.0}
    with _gateway(triton_url=f"127.0.0.1:{free_port()}", settings_overrides=settings) as stack:
        page.goto(f"{stack.url}/#/study/{_sent(stack, studies['covid'])}")
        page.wait_for_selector("main p.state-queued")
        page.locator("main a", has_text="← Worklist").focus()
        page.evaluate(HEAR_ANNOUNCE)
        page.wait_for_selector("main p.state-failed", timeout=30_000)
        sync_api.expect(page.locator("#retry")).to_be_enabled()
        said = page.inner_text("#job-state")
        assert said.startswith("failed: ") and "POST" not in said
        assert page.evaluate("() => window.__said") == [f"screening {said}"]
        assert page.evaluate("() => window.__kept") is True
        assert page.evaluate("""() => { const a = document.activeElement;
            return a.isConnected && a.matches('main a[href="#/"]') && a.textContent; }""") == "← Worklist"
        page.goto("about:blank")


def test_screen_again_pressed_from_the_keyboard_keeps_the_place_and_says_what_happened(studies, page, tmp_path):
    """A failed study's Screen again, accepted, had the view built anew: the pressed button gone, the focus fell to
    the page's body and a keyboard or screen-reader user lost her place. Now the view is drawn again in place (the
    job queued), the focus on its heading, and the live region says once that it is queued; refused (409, played
    by the browser's router: retention removed the instances), the button stays with the focus and the refusal is
    said. No Triton: the job's deadline fails it queued, and again after its retry (the view follows it)."""
    settings = {"data_dir": tmp_path / "data", "job_deadline_s": 5.0}
    with _gateway(triton_url=f"127.0.0.1:{free_port()}", settings_overrides=settings) as stack:
        job_id = _sent(stack, studies["covid"])
        page.goto(f"{stack.url}/#/study/{job_id}")
        page.wait_for_selector("main p.state-failed", timeout=30_000)
        button = page.locator("#retry")
        sync_api.expect(button).to_be_enabled()
        page.evaluate(HEAR_ANNOUNCE)
        focused = "() => { const a = document.activeElement; return a === document.body ? 'body' : a.id || a.localName; }"
        gone = f"The instances of job {job_id} are no longer kept (retention); send the study again."
        page.route(f"**/v1/jobs/{job_id}/retry", lambda route: route.fulfill(
            status=409, content_type="application/json", body=json.dumps({"reason": "not_retryable", "message": gone})))
        button.focus()
        page.keyboard.press("Enter")
        refusal = f"Not queued again: {gone}"
        sync_api.expect(page.locator("#retry-refused")).to_have_text(refusal)
        sync_api.expect(button).to_be_enabled()
        assert page.evaluate(focused) == "retry"
        assert page.evaluate("() => window.__said") == [refusal]
        page.unroute(f"**/v1/jobs/{job_id}/retry")

        page.evaluate("() => { window.__said = []; }")
        button.focus()
        with page.expect_response(lambda r: r.url.endswith(f"/v1/jobs/{job_id}/retry")) as answer:
            page.keyboard.press("Enter")
        assert answer.value.status == 202
        page.wait_for_selector("main p.state-queued")
        assert button.count() == 0
        assert page.evaluate(focused) == "h1"  # the view's heading: the button pressed is gone
        assert page.evaluate("() => window.__said") == ["Queued to be screened again"]
        assert page.evaluate("() => window.__kept") is True  # drawn in place, not the page loaded again
        # followed: its deadline fails it again, said once more, the focus left where it is
        page.wait_for_selector("main p.state-failed", timeout=30_000)
        sync_api.expect(button).to_be_enabled()
        said = page.inner_text("#job-state")
        assert page.evaluate("() => window.__said") == ["Queued to be screened again", f"screening {said}"]
        assert page.evaluate(focused) == "h1"
        page.goto("about:blank")


def test_an_urgent_study_says_so_on_its_row(stack, screened, page, tmp_path):
    """An urgent study (screened before every routine one) carries the word on its worklist row; routine rows
    carry none. Seen failing before the worklist read the study's priority (no ``.priority`` on the row)."""
    urgent = Path(phantom.write_study(phantom.make_study(seed=31, kind="normal", n_slices=8), tmp_path / "urgent"))
    (outcome,) = screen_paths(stack.url, [urgent], quiet=True, priority="urgent")
    assert outcome.error is None, outcome.error
    rows = httpx.get(stack.url + "/v1/worklist", timeout=30).json()["rows"]
    assert {r["job_id"]: r["priority"] for r in rows}[outcome.job_id] == "urgent"
    assert {r["priority"] for r in rows if r["job_id"] in {j for j, _ in screened.values()}} == {"routine"}
    page.goto(stack.url + "/")
    row = page.locator(f'tr[data-job-id="{outcome.job_id}"]')
    row.wait_for()
    assert row.get_attribute("data-priority") == "urgent"
    assert row.locator(".priority").inner_text() == "urgent"
    for job_id, _ in screened.values():
        assert page.locator(f'tr[data-job-id="{job_id}"] .priority').count() == 0
    # the worklist filters by priority, as by state and verdict (mercure's and OHIF's worklists do; the web review)
    only = httpx.get(stack.url + "/v1/worklist", params={"priority": "urgent"}, timeout=30).json()["rows"]
    assert outcome.job_id in {r["job_id"] for r in only} and {r["priority"] for r in only} == {"urgent"}
    bad = httpx.get(stack.url + "/v1/worklist", params={"priority": "stat"}, timeout=30)
    assert bad.status_code == 422 and bad.json()["reason"] == "bad_request", bad.text
    page.select_option("#f-priority", "urgent")
    page.click("form.filters button[type=submit]")
    page.wait_for_function("() => location.hash.includes('priority=urgent')")
    for job_id, _ in screened.values():
        sync_api.expect(page.locator(f'tr[data-job-id="{job_id}"]')).to_have_count(0)
    sync_api.expect(page.locator(f'tr[data-job-id="{outcome.job_id}"]')).to_have_count(1)


def _row(**kw: Any) -> dict[str, Any]:
    """A worklist row as ``GET /v1/worklist`` answers it (the page's own routes play it in the browser)."""
    return {"study_id": 1, "study_instance_uid": "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234",
            "version": 1, "origin": "stow", "received_at": "2026-12-07T10:00:00Z", "state": "done",
            "job_id": "a" * 32, "slices_done": 300, "slices_total": 300, "instances": 300, "verdict": "indeterminate",
            "reason": "not_chest", "message": "The series is no chest CT: its widest lung field and body section are "
            "smaller than a chest's.", "finished_at": "2026-12-07T10:05:00Z", "time_s": 300.0,
            "labels": {"study_date": "20261207", "accession_number": "ACC-2026-0000123456789",
                       "series_description": "CHEST 1.0 B70f LUNG"},
            "superseded_by": None, "priority": "routine", **kw}


@pytest.mark.parametrize("width", [1280, 1024])
def test_the_worklist_badges_and_reason_stay_on_screen(stack, browser, width):
    """The urgent badge and "superseded by v3" sat in the name's cell after a long accession number, clipped out
    of sight at 1280 px; at 1024 px the fixed columns left the Reason column 0 px wide and clipped "Turnaround"."""
    rows = [_row(job_id="a" * 32, priority="urgent", version=2, superseded_by=3),
            _row(job_id="b" * 32, priority="low", state="screening", slices_done=10, verdict=None, reason=None,
                 message=None, finished_at=None, time_s=None, labels={"study_date": None, "accession_number": None,
                                                                       "series_description": None})]
    context = browser.new_context(viewport={"width": width, "height": 800})
    try:
        pg = context.new_page()
        pg.route("**/v1/worklist?*", lambda route: route.fulfill(
            status=200, content_type="application/json",
            body=json.dumps({"total": len(rows), "limit": 50, "offset": 0, "rows": rows})))
        pg.goto(stack.url + "/")
        pg.wait_for_selector(f'tr[data-job-id="{"b" * 32}"]')
        hidden = pg.evaluate("""() => {
            const out = [];
            // every badge whole inside its cell, and the cell showing it (the point at its centre is the badge)
            for (const el of document.querySelectorAll('table.worklist tbody :is(.priority, small, .verdict)')) {
                const r = el.getBoundingClientRect(), c = el.closest('th, td').getBoundingClientRect();
                const hit = document.elementFromPoint((r.left + r.right) / 2, (r.top + r.bottom) / 2);
                if (r.width === 0 || r.left < c.left || r.right > c.right || !(hit === el || el.contains(hit)))
                    out.push(el.textContent);
            }
            for (const th of document.querySelectorAll('table.worklist thead th'))
                if (th.scrollWidth > th.clientWidth) out.push(`header ${th.textContent}`);
            return out;
        }""")
        assert not hidden, f"cut off at {width} px: {hidden}"
        badges = pg.locator(f'tr[data-job-id="{"a" * 32}"] th.uid').inner_text()
        assert "urgent" in badges and "v2" in badges and "superseded by v3" in badges
        # found and measured in one evaluation: a locator's element handle could be a row the worklist had just
        # written again (the module's gateway screens other tests' studies: its events reload the page), and a
        # detached cell measures 0 px (CI once)
        width_of_reason = pg.evaluate(f"""() => document.querySelector('tr[data-job-id="{"a" * 32}"] td.reason')
                                               .clientWidth""")
        assert width_of_reason >= 140, "the Reason column is too narrow to read"
        assert pg.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    finally:
        context.close()


def test_the_pages_keep_their_size(stack, screened, page):
    """'Older' went back to 50 rows a page and 'Newer' missed the first page."""
    total = httpx.get(stack.url + "/v1/worklist", timeout=30).json()["total"]
    assert total >= 3
    page.goto(stack.url + "/#/?limit=1")
    page.wait_for_function("() => document.querySelector('.pager-summary').textContent.startsWith('Studies 1–1 ')")
    page.click("text=Older →")
    page.wait_for_function("() => document.querySelector('.pager-summary').textContent.startsWith('Studies 2–2 ')")
    assert "limit=1" in page.evaluate("location.hash")
    page.click("text=← Newer")
    page.wait_for_function("() => document.querySelector('.pager-summary').textContent.startsWith('Studies 1–1 ')")
    assert page.locator("table.worklist tbody tr").count() == 1


def test_a_queued_retry_shows_why_it_waits():
    """A job released after a failed try (Triton away) is queued with that try's error: the row says so."""
    from gateway.store.worklist import WorklistRow
    from gateway.web.routes import row_json

    row = WorklistRow(study_id=1, study_instance_uid="1.2.3", version=1, origin="upload", received_at=0.0,
                      state="queued", job_id="a" * 32, slices_done=0, slices_total=8, instances=8, finished_at=None,
                      started_at=0.0, verdict=None, reason=None, message=None, labels=None,
                      error={"reason": "triton_unavailable", "message": "No Triton answered."})
    shown = row_json(row)
    assert (shown["reason"], shown["message"]) == ("triton_unavailable", "retrying after: No Triton answered.")
    done = row_json(WorklistRow(**{**{f: getattr(row, f) for f in row.__slots__}, "state": "done"}))
    assert done["reason"] is None and done["message"] is None


def test_a_refused_credential_is_not_shown_as_signed_in(stack, screened, page):
    """A stored credential the gateway refuses (revoked, expired) still read "signed in" beside the sign-in
    form. This module's gateway runs without authentication, so its 401 is played by the browser's router."""
    page.route("**/v1/worklist?*", lambda route: route.fulfill(
        status=401, content_type="application/json", headers={"WWW-Authenticate": "Bearer"},
        body='{"reason": "unauthorized", "message": "Unknown or revoked API key."}'))
    page.goto(stack.url + "/")
    # the worklist's 401 opens the sign-in box (clicking its toggle as well raced it: a click after the 401
    # closed the box again, as it should)
    page.wait_for_selector("#signin-form", state="visible")
    page.fill("#credential", "cts_revoked-key")
    page.click("#signin-form button[type=submit]")
    page.wait_for_function("() => document.getElementById('who').textContent === 'credential refused'")
    assert page.is_visible("#signin-form")


def test_a_credential_refused_once_read_takes_what_it_read_off_the_screen(stack, screened, page):
    """A key revoked while the worklist was open: the page said "credential refused" but kept the rows' accession
    numbers and series descriptions on screen, where sign-out clears them (the web review). The revocation's 401
    is played by the browser's router (this module's gateway runs without authentication)."""
    page.goto(stack.url + "/")
    page.evaluate("sessionStorage.setItem('ctscreen.credential', 'cts_soon-revoked')")
    page.reload()
    page.wait_for_selector(f'tr[data-job-id="{screened["covid"][0]}"]')
    # what the screen reader's live region last said (a study's accession number and verdict) is read too
    page.evaluate("document.getElementById('announce').textContent = 'Acc. A123: positive'")
    page.route("**/v1/worklist?*", lambda route: route.fulfill(
        status=401, content_type="application/json", headers={"WWW-Authenticate": "Bearer"},
        body='{"reason": "unauthorized", "message": "Unknown or revoked API key."}'))
    page.evaluate("location.hash = '#/?state=done'")  # the worklist asks again
    page.wait_for_function("() => document.getElementById('who').textContent === 'credential refused'")
    assert page.locator("tr[data-job-id]").count() == 0
    assert "refused the credential" in page.locator("main").inner_text()
    assert page.evaluate("sessionStorage.getItem('ctscreen.credential')") is None
    assert page.inner_text("#announce") == ""
    page.unroute("**/v1/worklist?*")  # signed in again, then out: sign-out clears it too
    page.evaluate("sessionStorage.setItem('ctscreen.credential', 'cts_another')")
    page.evaluate("location.hash = '#/'")
    page.wait_for_selector(f'tr[data-job-id="{screened["covid"][0]}"]')
    page.evaluate("document.getElementById('announce').textContent = 'Acc. A123: positive'")
    if page.is_hidden("#signin-form"):  # open since the 401
        page.click("#signin-toggle")
    page.click("#signout")
    assert page.inner_text("#announce") == ""


def test_the_study_view_says_where_the_result_went_and_sends_a_failed_one_again(stack, screened, ris, page):
    """Delivered to the RIS, failed at the PACS (nobody listens there) with the reason and a button that queues
    it again; the normal study's reading is not sent to the RIS, whose rule takes positive ones only; the
    service view lists the failed deliveries with a link to their study."""
    covid, normal = screened["covid"][0], screened["normal"][0]
    page.goto(f"{stack.url}/#/study/{covid}")
    ris_row, pacs_row = page.locator("tbody[data-destination=ris]"), page.locator("tbody[data-destination=pacs-web]")
    sync_api.expect(ris_row).to_have_attribute("data-state", "done", timeout=30_000)
    sync_api.expect(pacs_row).to_have_attribute("data-state", "failed", timeout=30_000)
    assert ris_row.locator("td").first.inner_text() == "delivered" and "FHIR" in ris_row.inner_text()
    assert "cannot reach http://127.0.0.1:" in pacs_row.inner_text() and "ConnectError" in pacs_row.inner_text()
    assert [r["identifier"][0]["value"] for r in ris.of_type("DiagnosticReport")] and not ris.errors
    before = pacs_row.get_attribute("data-updated")
    pacs_row.get_by_role("button", name="Send again to pacs-web").click()
    # queued again, tried once more (its attempts start afresh), failed again: the row shows the new try
    page.wait_for_function("""(before) => {
        const row = document.querySelector('tbody[data-destination="pacs-web"]');
        return row && row.dataset.state === 'failed' && row.dataset.updated !== before;
    }""", arg=before, timeout=30_000)
    assert page.inner_text("#announce") in ("Sending to pacs-web again", "pacs-web: failed")
    # the row redrawn for the new try keeps the keyboard focus (its new button)
    assert page.evaluate("document.activeElement.closest('tbody')?.dataset.destination") == "pacs-web"
    view = httpx.get(f"{stack.url}/v1/jobs/{covid}/deliveries", timeout=30).json()
    [pacs] = [d for d in view if d["destination"] == "pacs-web"]
    assert sum(e["state"] == "failed" for e in pacs["history"]) == 2, pacs["history"]

    page.goto(f"{stack.url}/#/study/{normal}")
    row = page.locator("tbody[data-destination=ris]")
    sync_api.expect(row).to_have_attribute("data-state", "skipped", timeout=30_000)
    assert row.locator("td").first.inner_text() == "not sent" and "negative results are not sent here" in row.inner_text()

    page.goto(f"{stack.url}/#/service")
    failed = page.locator("table.failed-deliveries tr[data-destination=pacs-web]")
    sync_api.expect(failed.first).to_be_visible(timeout=30_000)
    assert {covid, normal} <= {a.get_attribute("href").rsplit("/", 1)[1] for a in failed.locator("a").all()}
    # each row's link says which study it opens (a screen reader's list of links read "open, open")
    names = [page.get_by_role("link", name=f"Open the study of job {job[:8]}, not delivered to pacs-web")
             for job in (covid, normal)]
    assert all(n.count() >= 1 for n in names) and all(n.first.inner_text() == "open" for n in names)


def test_without_javascript_the_page_says_it_needs_it_where_its_content_goes(stack, browser):
    """The shell's main area read "Loading…" for ever with scripting off (the notice sat below the footer)."""
    context = browser.new_context(java_script_enabled=False)
    try:
        pg = context.new_page()
        pg.goto(stack.url + "/")
        main = pg.inner_text("#main")
        assert "This page needs JavaScript" in main and "/openapi.json" in main
        assert "Loading" not in pg.inner_text("body")
    finally:
        context.close()


def _deliveries_route(page: Any, job_id: str, answer: list[dict[str, Any]], server_now: float) -> None:
    """The gateway's deliveries answer played by the browser's router (a retraction-only delivery needs a PACS
    and two readings; the server's clock, its Date header, cannot be moved otherwise)."""
    from email.utils import formatdate

    page.route(f"**/v1/jobs/{job_id}/deliveries", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(answer),
        headers={"Date": formatdate(server_now, usegmt=True)}))


def test_the_delivery_list_words_a_retraction_and_reads_the_servers_clock(stack, screened, page):
    """A delivery that sent only the note withdrawing an earlier reading (the rule keeps this one from that
    PACS) read "delivered", as if the PACS held this reading's SR; and whether an empty list is "not sent yet"
    was judged by the browser's clock against the server's finished_at (a browser an hour ahead said "no
    delivery" at once)."""
    from datetime import datetime

    job_id = screened["normal"][0]
    finished = datetime.fromisoformat(httpx.get(f"{stack.url}/v1/jobs/{job_id}", timeout=30).json()["finished_at"])
    at = finished.timestamp()
    retraction = {"destination": "pacs", "kind": "dicom", "state": "done", "attempts": 1,
                  "objects": [{"kind": "rejection", "uid": "1.2.3.4"}], "sent": ["1.2.3.4"], "error": None,
                  "next_attempt_at": None, "delivered_at": finished.isoformat(), "updated_at": finished.isoformat(),
                  "history": [{"at": at, "state": "done", "attempt": 1,
                               "detail": "1 object(s) acknowledged (rule: negative results are not sent here)"}]}
    _deliveries_route(page, job_id, [retraction], at + 5)
    page.goto(f"{stack.url}/#/study/{job_id}")
    row = page.locator("tbody[data-destination=pacs]")
    sync_api.expect(row.locator(".state-cell")).to_have_text("earlier reading retracted")
    assert "Rejection Note at" in row.inner_text() and "negative results are not sent here" in row.inner_text()

    # a later reading waiting for the earlier one's delivery there to end read as a bare "waiting"
    page.unroute(f"**/v1/jobs/{job_id}/deliveries")
    held = {**retraction, "state": "pending", "attempts": 0, "objects": [], "sent": [], "delivered_at": None,
            "history": [], "held_behind": "0" * 32}
    _deliveries_route(page, job_id, [held], at + 5)
    page.goto(f"{stack.url}/#/")
    page.goto(f"{stack.url}/#/study/{job_id}")
    sync_api.expect(row.locator(".state-cell")).to_have_text("waiting")
    sync_api.expect(row).to_contain_text("after the earlier reading's delivery here ends")

    page.unroute(f"**/v1/jobs/{job_id}/deliveries")
    page.clock.set_fixed_time(at + 3600)  # the browser an hour ahead of the server
    _deliveries_route(page, job_id, [], at + 5)  # the server: finished 5 s ago, its deliverer not yet round
    page.goto(f"{stack.url}/#/")
    page.goto(f"{stack.url}/#/study/{job_id}")
    sync_api.expect(page.locator("section.deliveries p.hint")).to_have_text("Not sent yet.")


AXE_RULES = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa",
                                                    "best-practice"]}}
"""axe-core's WCAG 2.0-2.2 A and AA rules and its best practices."""


def test_every_view_passes_axe_cores_wcag_rules(stack, screened, page):
    """The worklist, a positive and a negative study with their delivery panels, the service view and the
    sign-in box, checked by axe-core (the engine behind Lighthouse's accessibility audit; bundled by
    axe-playwright-python, nothing downloaded) against WCAG 2.2 A/AA and its best practices."""
    from axe_playwright_python.sync_playwright import Axe

    axe = Axe()
    covid, normal = screened["covid"][0], screened["normal"][0]
    views = [("/", f'tr[data-job-id="{covid}"]'), (f"/#/study/{covid}", "tbody[data-destination]"),
             (f"/#/study/{normal}", "tbody[data-destination]"), ("/#/service", "table.endpoints")]
    # at a desktop's width and a phone's (390 px: the links wrapped onto each other, a target-size failure, and
    # the study's UID overflowed the page; the web review)
    for width, height in ((1280, 800), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        for route, ready in views:
            page.goto(stack.url + route)
            page.wait_for_selector(ready)
            page.wait_for_function("() => document.querySelector('main')?.dataset.loaded")
            violations = axe.run(page, options=AXE_RULES).response["violations"]
            assert not violations, [(width, route, v["id"], v["help"], [n["target"] for n in v["nodes"][:3]])
                                    for v in violations]
            if width < 500:  # nothing wider than the screen: no sideways scrolling
                wide = page.evaluate("""() => [...document.querySelectorAll('main *')]
                    .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 1)
                    .map((e) => e.tagName + '.' + e.className).slice(0, 8)""")
                assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), (width, route, wide)
    page.set_viewport_size({"width": 1280, "height": 800})
    page.click("#signin-toggle")
    page.wait_for_selector("#credential")
    violations = axe.run(page, options=AXE_RULES).response["violations"]
    assert not violations, [("sign-in", v["id"], v["help"]) for v in violations]
    # the check is live: a button without a name is found
    page.evaluate("document.querySelector('main').append(document.createElement('button'))")
    assert "button-name" in {v["id"] for v in axe.run(page, options=AXE_RULES).response["violations"]}


def test_a_done_study_is_screened_again_with_the_current_models_from_its_view(stack, page, tmp_path):
    """A done study's view offers "Screen again with the current models": disabled with its title for a reader (the
    gateway's GET /v1/me for a results:read key, played by the browser's router; this gateway has no keys), usable
    by a writer. Pressed, it asks first (a new reading replaces this one downstream); Cancel posts nothing; a refusal
    (409, played by the router) is said under it; confirmed, the page follows the new version's job until it is done
    (its viewer, which offers it again), and version 1's view, superseded, offers it no more. Last in the module:
    the study screened here adds worklist rows."""
    study = Path(phantom.write_study(phantom.make_study(seed=47, kind="normal", n_slices=8), tmp_path / "again"))
    (outcome,) = screen_paths(stack.url, [study], quiet=True)
    assert outcome.error is None, outcome.error
    first, uid = outcome.job_id, outcome.result["study_instance_uid"]
    posted: list[str] = []
    page.on("request", lambda r: posted.append(r.url) if r.method == "POST" else None)
    reader = {"subject": "key:reader", "kind": "api_key", "scopes": ["results:read"], "effective_scopes": ["results:read"]}
    page.route("**/v1/me", lambda route: route.fulfill(status=200, content_type="application/json",
                                                        body=json.dumps(reader)))
    page.goto(f"{stack.url}/#/study/{first}")
    button = page.locator("#rescreen")
    sync_api.expect(button).to_have_attribute("title", "Needs the studies:write scope, which this credential "
                                                       "(key:reader) does not grant")
    assert button.is_disabled() and button.inner_text() == "Screen again with the current models"
    page.unroute("**/v1/me")
    page.reload()  # asked again: anonymous on loopback, every scope
    sync_api.expect(button).to_be_enabled()
    confirm = page.locator("#rescreen-confirm")
    assert confirm.is_hidden()
    button.click()
    sync_api.expect(confirm).to_be_visible()
    assert "as a new version" in confirm.inner_text() and "replaces this one" in confirm.inner_text()
    page.locator("#rescreen-no").click()
    sync_api.expect(confirm).to_be_hidden()
    assert posted == []
    refusal = {"reason": "not_rescreenable", "message": f"Version 2 of study {uid} is queued (job {'0' * 32}); a "
               "study is screened again once its latest version is done or failed."}
    page.route(f"**/v1/studies/{uid}/rescreen", lambda route: route.fulfill(
        status=409, content_type="application/json", body=json.dumps(refusal)))
    button.click()
    page.locator("#rescreen-yes").click()
    sync_api.expect(page.locator("#rescreen-refused")).to_have_text(f"Not screened again: {refusal['message']}")
    sync_api.expect(button).to_be_enabled()
    assert page.evaluate("() => document.activeElement.id") == "rescreen"  # it fell to the body with the confirmation
    assert page.inner_text("#announce") == f"Not screened again: {refusal['message']}"
    page.unroute(f"**/v1/studies/{uid}/rescreen")
    button.click()
    with page.expect_response(lambda r: r.url.endswith(f"/v1/studies/{uid}/rescreen")) as answer:
        page.locator("#rescreen-yes").click()
    assert answer.value.status == 202
    second = answer.value.json()["job_id"]
    assert posted == [f"{stack.url}/v1/studies/{uid}/rescreen"] * 2
    page.wait_for_function("(h) => location.hash === h", arg=f"#/study/{second}")
    page.wait_for_selector("#viewer[data-ready=true]", timeout=120_000)  # followed until done, then its viewer
    assert httpx.get(f"{stack.url}/v1/jobs/{second}", timeout=30).json()["version"] == 2
    sync_api.expect(page.locator("#rescreen")).to_be_enabled()  # the latest version: offered again
    page.goto(f"{stack.url}/#/study/{first}")
    page.wait_for_selector("#superseded")
    page.wait_for_selector("#viewer[data-ready=true]")
    assert page.locator("#rescreen").count() == 0


def test_a_study_view_open_when_a_later_version_comes_says_it_is_superseded(stack, page, tmp_path):
    """A done study's view, open while a later version of the study came (here a re-screen through the API; late
    instances or the study sent again alike), went on showing its verdict as the study's, said nothing, and offered
    "Screen again with the current models" for a reading no longer the latest, until the reader reloaded. Now the view
    follows the worklist's event stream: the superseded note appears in a live region and the re-screen button goes.
    After the re-screen test: the study screened here adds worklist rows."""
    study = Path(phantom.write_study(phantom.make_study(seed=48, kind="normal", n_slices=8), tmp_path / "later"))
    (outcome,) = screen_paths(stack.url, [study], quiet=True)
    assert outcome.error is None, outcome.error
    first, uid = outcome.job_id, outcome.result["study_instance_uid"]
    page.goto(f"{stack.url}/#/study/{first}")
    page.wait_for_selector("#viewer[data-ready=true]")
    sync_api.expect(page.locator("#rescreen")).to_be_enabled()
    assert page.locator("#superseded").count() == 0
    page.wait_for_timeout(1500)  # the view's first read of its row, as the stream opened, is over
    r = httpx.post(f"{stack.url}/v1/studies/{uid}/rescreen", timeout=30)
    assert r.status_code == 202, r.text
    note = page.locator("#superseded-slot[aria-live=polite] #superseded")
    sync_api.expect(note).to_contain_text("Superseded: version 2 of this study was received after this one "
                                          "(version 1)", timeout=30_000)
    assert page.locator("#rescreen").count() == 0
    assert page.locator("#verdict").is_visible()  # the reading stays on screen, marked

