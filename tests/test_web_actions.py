"""The web page offers only what its caller may do (``GET /v1/me``), a failed row's Screen again, and the worklist
urgent first: Debian's Chromium (headless) driven by Playwright against a live gateway with API keys.

No Triton: the store is seeded (``benchmarks.web_worklist.seed``: done and failed study versions, some urgent, some
low), and the gateway's Triton is an address nobody listens on, so a study screened again waits queued.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.web_worklist import seed
from ctscreen.embedded import free_port
from gateway.cli import Stack, run_stack
from gateway.keys import KeyStore
from gateway.settings import Settings
from gateway.store.blobs import new_keys
from gateway.store.migrate import upgrade
from tests.conftest import CHROMIUM

pytestmark = pytest.mark.timeout(300)

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
    pytest.skip("Debian's chromium is not installed: scripts/setup.sh --test installs it", allow_module_level=True)

N = 15  # seed(): study versions 1..15, oldest first; every 7th failed (studies 7 and 14)
URGENT, LOW = (2, 9, 13), (5, 11)
FAILED = (7, 14)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The gateway, its keys (``reader``: results:read; ``writer``: results:read and studies:write), the seeded job
    ids by study id and the database's path. The failed studies' instances are recorded (retry needs them)."""
    tmp = tmp_path_factory.mktemp("web-actions")
    database = tmp / "ctscreen.db"
    url = f"sqlite:///{database}"
    upgrade(url)
    jobs = dict(enumerate(seed(url, N), start=1))
    blobs = {i: key for i, key in zip(FAILED, new_keys(len(FAILED)), strict=True)}
    Settings(data_dir=tmp, database_url=url).blob_store().put_many([(key, b"not screened here") for key in blobs.values()])
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.executemany("UPDATE studies SET priority = ? WHERE id = ?", [(2, i) for i in URGENT] + [(0, i) for i in LOW])
        db.executemany("INSERT INTO instances (study_id, sop_instance_uid, filename, blob_key, nbytes, received_at) "
                       "VALUES (?, ?, 'a.dcm', ?, 17, 0)", [(i, f"2.25.{i}", key) for i, key in blobs.items()])
    keys = KeyStore(tmp / "api_keys.json")
    made = {"reader": keys.add("reader", ["results:read"])[0],
            "writer": keys.add("writer", ["results:read", "studies:write"])[0]}
    overrides = {"data_dir": tmp, "database_url": url, "db_migrate": False, "auth_api_keys_file": tmp / "api_keys.json",
                 "audit_log_file": tmp / "audit.jsonl", "events_keepalive_s": 1.0}
    held = run_stack(port=0, triton_url=f"127.0.0.1:{free_port()}", settings_overrides=overrides)
    # started in a thread of its own: run_stack's start-up calls asyncio.run, which Playwright's thread refuses
    with ThreadPoolExecutor(1) as pool:
        stack: Stack = pool.submit(held.__enter__).result()
    try:
        yield {"url": stack.url, "keys": made, "jobs": jobs, "database": database}
    finally:
        held.__exit__(None, None, None)


def _signed_in(page: Any, site: dict[str, Any], who: str, route: str = "/") -> None:
    """The page at ``route`` with ``who``'s key in this tab's sign-in (as the sign-in box stores it), stored from a
    file of the origin: the page itself, loaded without it, would have its 401 clear a key stored meanwhile."""
    page.goto(site["url"] + "/web/static/style.css")
    page.evaluate(f"sessionStorage.setItem('ctscreen.credential', {json.dumps(site['keys'][who])})")
    page.goto(site["url"] + route)


def _row(site: dict[str, Any], study: int) -> str:
    return f'tr[data-job-id="{site["jobs"][study]}"]'


def _api(site: dict[str, Any], who: str, path: str) -> Any:
    r = httpx.get(site["url"] + path, headers={"Authorization": f"Bearer {site['keys'][who]}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_reader_sees_no_usable_screen_again_and_its_title_names_the_scope(site, page):
    """A key without studies:write: each failed row's Screen again and the failed study's are disabled, their title
    saying which scope is needed (they were offered, and answered 403 after the click); nothing is posted."""
    assert _api(site, "reader", "/v1/me")["effective_scopes"] == ["results:read"]
    posted: list[str] = []
    page.on("request", lambda r: posted.append(r.url) if r.method == "POST" else None)
    _signed_in(page, site, "reader")
    button = page.locator(f'{_row(site, 7)} button[data-action="screen-again"]')
    sync_api.expect(button).to_have_attribute("title", "Needs the studies:write scope, which this credential "
                                                       "(key:reader) does not grant")
    assert button.is_disabled() and page.locator('button[data-action="screen-again"]:enabled').count() == 0
    assert button.get_attribute("aria-label").startswith("Screen again: ")
    assert page.locator('tr[data-state="done"] button').count() == 0  # a done row has none
    page.goto(f"{site['url']}/#/study/{site['jobs'][7]}")
    retry = page.locator("#retry")  # the study view's
    sync_api.expect(retry).to_have_attribute("title", "Needs the studies:write scope, which this credential "
                                                      "(key:reader) does not grant")
    assert retry.is_disabled()
    retry.click(force=True)  # a click on it does nothing
    page.wait_for_timeout(300)
    assert posted == []


def test_a_writer_screens_a_failed_row_again_from_the_worklist(site, page):
    """A failed row's Screen again (the study view's, one function): with studies:write it is enabled, and pressed
    the job is queued again (POST /v1/jobs/{id}/retry); its row follows (queued, the button gone)."""
    job = site["jobs"][14]
    _signed_in(page, site, "writer")
    button = page.locator(f'{_row(site, 14)} button[data-action="screen-again"]')
    sync_api.expect(button).to_be_enabled()
    assert button.get_attribute("title") is None
    with page.expect_response(lambda r: r.url.endswith(f"/v1/jobs/{job}/retry")) as answer:
        button.click()
    assert answer.value.status == 202
    page.wait_for_selector(f'{_row(site, 14)}[data-state="queued"]')
    assert page.locator(f'{_row(site, 14)} button').count() == 0
    assert _api(site, "writer", f"/v1/jobs/{job}")["state"] == "queued"
    # the same job queued again (the gateway retries a failed job in place: no new study version)
    rows = [r for r in _api(site, "reader", "/v1/worklist?limit=100")["rows"]
            if r["study_instance_uid"] == _api(site, "reader", f"/v1/jobs/{job}")["study_instance_uid"]]
    assert [(r["job_id"], r["version"], r["state"]) for r in rows] == [(job, 1, "queued")]


def test_a_refused_screen_again_on_a_row_says_why_under_it(site, page):
    """A credential that changed since the page asked (here the gateway's answer, played by the browser's router):
    the 403 is said under the row's button, which can be pressed again."""
    job = site["jobs"][7]
    page.route(f"**/v1/jobs/{job}/retry", lambda route: route.fulfill(
        status=403, content_type="application/json",
        body='{"reason": "insufficient_scope", "message": "This needs the scope studies:write."}'))
    _signed_in(page, site, "writer")
    button = page.locator(f'{_row(site, 7)} button[data-action="screen-again"]')
    button.click()
    sync_api.expect(page.locator(f'{_row(site, 7)} [data-role="refused"]')).to_have_text(
        "Not queued again: This needs the scope studies:write.")
    sync_api.expect(button).to_be_enabled()
    assert httpx.get(f"{site['url']}/v1/jobs/{job}", headers={"X-API-Key": site["keys"]["reader"]},
                     timeout=30).json()["state"] == "failed"


def test_send_again_follows_the_callers_scope(site, page):
    """The study view's delivery panel (deliveries.js) with a failed delivery played by the browser's router: its Send
    again (studies:write) is disabled with its title for a reader, usable for a writer. The seeded results have no
    slices to view, so the panel is drawn on the worklist's page, as the study view draws it."""
    job = site["jobs"][8]
    failed = [{"job_id": job, "destination": "pacs", "kind": "dicom", "state": "failed", "attempts": 5,
               "error": "association refused", "next_attempt_at": None, "delivered_at": None, "objects": [], "sent": [],
               "held": [], "history": [], "updated_at": "2024-01-01T00:01:00Z", "held_behind": None}]
    page.route(f"**/v1/jobs/{job}/deliveries", lambda route: route.fulfill(
        status=200, content_type="application/json", headers={"X-Destinations-Configured": "1"}, body=json.dumps(failed)))
    for who, usable in (("reader", False), ("writer", True)):
        _signed_in(page, site, who)
        page.wait_for_function("() => document.querySelector('main')?.dataset.loaded")
        page.evaluate("""async (job) => { const {deliveriesPanel} = await import('/web/static/deliveries.js');
            document.querySelector('main').append(deliveriesPanel({job_id: job, finished_at: '2024-01-01T00:00:00Z'}).element);
            }""", job)
        button = page.get_by_role("button", name="Send again to pacs")
        if usable:
            sync_api.expect(button).to_be_enabled()
            assert button.get_attribute("title") is None
        else:
            sync_api.expect(button).to_have_attribute("title", "Needs the studies:write scope, which this credential "
                                                               "(key:reader) does not grant")
            assert button.is_disabled()


def test_the_worklist_urgent_first_pages_without_repeating_a_row(site, page):
    """The page's Order control: urgent first, then routine, then low, newest first within each; its pages follow
    on (page 2 starts where page 1 ended); the default is unchanged, newest first."""
    _signed_in(page, site, "reader", "/#/?limit=6")
    page.wait_for_selector("table.worklist tbody tr[data-study-id]")
    newest = page.eval_on_selector_all("tbody tr[data-study-id]", "rs => rs.map(r => Number(r.dataset.studyId))")
    assert newest == list(range(N, N - 6, -1))
    table = page.query_selector("table.worklist")
    page.select_option("#f-order", "priority")
    page.click("form.filters button[type=submit]")
    page.wait_for_function("t => !t.isConnected", arg=table)
    assert "order=priority" in page.url and "limit=6" in page.url
    expected = [*sorted(URGENT, reverse=True), *[i for i in range(N, 0, -1) if i not in URGENT + LOW], *sorted(LOW, reverse=True)]
    seen: list[int] = []
    for _ in range(3):
        page.wait_for_selector("table.worklist tbody tr[data-study-id]")  # the new view's table, loaded
        seen += page.eval_on_selector_all("tbody tr[data-study-id]", "rs => rs.map(r => Number(r.dataset.studyId))")
        nxt = page.get_by_role("button", name="Next →")
        if nxt.is_disabled():
            break
        table = page.query_selector("table.worklist")
        nxt.click()
        page.wait_for_function("t => !t.isConnected", arg=table)
    assert seen == expected
    assert page.locator("#worklist-caption").inner_text().startswith("Studies, urgent first")


def test_a_keyboard_user_keeps_her_place_between_the_views(site, page):
    """A view opened from the page put the focus nowhere: the link or button pressed went with the view it was in, and
    the focus fell to the page's start (Tab went through the header and the filters again, a screen reader heard
    nothing of the new view). Now a study opened puts it at the view's start (its first Tab: "← Worklist"); back on
    the worklist, the focus is on that study's row; a pager button pressed is focused again on the next page."""
    focused = "() => document.activeElement?.dataset?.control || document.activeElement?.id || document.activeElement?.tagName"
    _signed_in(page, site, "reader", "/#/?limit=6")
    table = page.wait_for_selector(f"{_row(site, 15)} th.uid a")
    page.get_by_role("button", name="Older →").focus()
    page.keyboard.press("Enter")
    page.wait_for_function("t => !t.isConnected", arg=table)
    link = page.locator(f"{_row(site, 7)} th.uid a")
    link.wait_for()
    page.wait_for_function(f"() => ({focused})() === 'next'")
    assert page.locator('[data-control="next"]').evaluate("b => b === document.activeElement")
    link.focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("main p.state-failed")
    assert page.evaluate(focused) == "main"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "← Worklist"
    page.keyboard.press("Enter")
    page.wait_for_function(f"""() => document.activeElement === document.querySelector('{_row(site, 7)} th.uid a')""")
    page.go_back()  # the browser's Back to the study, and again to the worklist's second page
    page.wait_for_selector("main p.state-failed")
    page.go_back()
    page.wait_for_function(f"""() => document.activeElement === document.querySelector('{_row(site, 7)} th.uid a')
        && location.hash.includes('offset=6')""")


def test_the_gated_worklist_passes_axe_cores_wcag_rules(site, page):
    """The rows' Screen again, disabled with its title (a reader) and enabled (a writer), and the Order control."""
    from axe_playwright_python.sync_playwright import Axe

    from tests.test_web_page import AXE_RULES

    for who, width in (("reader", 1280), ("writer", 1280), ("writer", 390)):
        page.set_viewport_size({"width": width, "height": 800})
        _signed_in(page, site, who, "/#/?order=priority")
        page.wait_for_selector(f'{_row(site, 7)} button[data-action="screen-again"]'
                               + (":enabled" if who == "writer" else "[title]"))
        violations = Axe().run(page, options=AXE_RULES).response["violations"]
        assert not violations, [(who, width, v["id"], v["help"], [n["target"] for n in v["nodes"][:3]])
                                for v in violations]


def test_a_done_study_is_screened_again_only_by_a_writer_and_once_at_a_time(site):
    """POST /v1/studies/{uid}/rescreen on a done seeded study whose instances are kept: a reader is refused (403,
    nothing recorded), a writer gets version 2's job (202, Location), queued (no Triton here); sent again under its
    Idempotency-Key, the same job; asked again without it while it waits, 409 not_rescreenable names it; an unknown study is 404. The audit log has the route with the study and
    the new job. Last in the module: the new version is a worklist row the tests above do not expect."""
    database = site["database"]
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        uid = db.execute("SELECT study_instance_uid FROM studies WHERE id = 3").fetchone()[0]
        db.execute("INSERT INTO instances (study_id, sop_instance_uid, filename, blob_key, nbytes, received_at) "
                   "VALUES (3, '2.25.3', 'a.dcm', ?, 17, 0)", (new_keys(1)[0],))

    def post(who: str, study: str = uid, key: str | None = None) -> httpx.Response:
        return httpx.post(f"{site['url']}/v1/studies/{study}/rescreen?priority=urgent", timeout=30, headers={
            "Authorization": f"Bearer {site['keys'][who]}", **({"Idempotency-Key": key} if key else {})})

    refused = post("reader")
    assert (refused.status_code, refused.json()["reason"]) == (403, "insufficient_scope")
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("SELECT COUNT(*) FROM studies WHERE study_instance_uid = ?", (uid,)).fetchone()[0] == 1
    r = post("writer", key="rescreen-3")
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["state"], job["version"], job["files"], job["priority"]) == ("queued", 2, 1, "urgent")
    assert r.headers["location"] == f"/v1/jobs/{job['job_id']}"
    replayed = post("writer", key="rescreen-3")  # its answer lost, sent again: the same job, no refusal
    assert (replayed.status_code, replayed.headers["idempotent-replayed"]) == (202, "true")
    assert replayed.json()["job_id"] == job["job_id"]
    again = post("writer")
    assert again.status_code == 409 and again.json() == {"reason": "not_rescreenable", "message": (
        f"Version 2 of study {uid} is queued (job {job['job_id']}); a study is screened again once its latest "
        "version is done or failed.")}
    missing = post("writer", "1.2.3.404")
    assert (missing.status_code, missing.json()["reason"]) == (404, "not_found")

    def audited() -> list[tuple[str, int, str, str | None]]:
        audit = [json.loads(line) for line in (database.parent / "audit.jsonl").read_text().splitlines()]
        return [(a["who"], a["status"], a["study_instance_uid"], a["job_id"]) for a in audit
                if a["action"] == "POST /v1/studies/{study_instance_uid}/rescreen"]

    end = time.monotonic() + 10
    while len(audited()) < 5 and time.monotonic() < end:  # a record is written once its answer is sent
        time.sleep(0.05)
    assert audited() == [("key:reader", 403, uid, None), ("key:writer", 202, uid, job["job_id"]),
                         ("key:writer", 202, uid, job["job_id"]), ("key:writer", 409, uid, None),
                         ("key:writer", 404, "1.2.3.404", None)]


def test_a_failed_version_below_a_later_one_is_not_screened_again(site, page):
    """A failed version 1 whose study has a later version (here screened again as version 2, through the API) was
    retried all the same (its reading then replaced nothing, its deliveries skipped) and the page offered it Screen
    again. Now POST .../retry answers 409 ``superseded``, naming version 2 and its job; neither its worklist row nor
    its study view offers Screen again, and each says which version is newer. Version 2 failing too (its deadline
    played by the database: no Triton here, and a day's deadline) changes neither; version 2 has the button. After
    the re-screen test: version 2 is a worklist row the tests above do not expect."""
    writer = {"Authorization": f"Bearer {site['keys']['writer']}"}
    job = site["jobs"][7]
    uid = _api(site, "reader", f"/v1/jobs/{job}")["study_instance_uid"]
    r = httpx.post(f"{site['url']}/v1/studies/{uid}/rescreen", headers=writer, timeout=30)
    assert r.status_code == 202, r.text
    later = r.json()["job_id"]
    refused = httpx.post(f"{site['url']}/v1/jobs/{job}/retry", headers=writer, timeout=30)
    assert refused.status_code == 409 and refused.json() == {"reason": "superseded", "message": (
        f"Job {job} screens version 1 of study {uid}, and version 2 (job {later}, queued) came after it: its reading "
        "is to be the study's. Only a job of a study's latest version is retried."),
        "superseded_by": 2, "superseded_by_job": later}
    view = _api(site, "reader", f"/v1/jobs/{job}")
    assert (view["state"], view["version"], view["newest_version"], view["superseded_by"]) == ("failed", 1, 2, 2)

    _signed_in(page, site, "writer")
    row = page.locator(_row(site, 7))
    sync_api.expect(row.locator(".superseded")).to_have_text("superseded by v2")
    assert row.locator("button").count() == 0 and row.locator(".newer-version").count() == 0
    with contextlib.closing(sqlite3.connect(site["database"])) as db, db:
        db.execute("UPDATE jobs SET state = 'failed', finished_at = updated_at, error = ? WHERE id = ?",
                   (json.dumps({"reason": "triton_unavailable", "message": "No Triton could take the study."}), later))
    refused = httpx.post(f"{site['url']}/v1/jobs/{job}/retry", headers=writer, timeout=30)
    assert refused.status_code == 409 and f"POST /v1/jobs/{later}/retry queues that one again" in refused.json()["message"]
    rows = {r["job_id"]: r for r in _api(site, "reader", "/v1/worklist?limit=100")["rows"]}
    assert {k: (rows[k]["version"], rows[k]["newest_version"], rows[k]["superseded_by"]) for k in (job, later)} == {
        job: (1, 2, None), later: (2, 2, None)}
    page.reload()
    sync_api.expect(row.locator(".newer-version")).to_have_text("v2 is newer")
    assert row.locator("button").count() == 0 and row.locator(".superseded").count() == 0
    sync_api.expect(page.locator(f'tr[data-job-id="{later}"] button[data-action="screen-again"]')).to_be_enabled()
    from axe_playwright_python.sync_playwright import Axe

    from tests.test_web_page import AXE_RULES

    violations = Axe().run(page, options=AXE_RULES).response["violations"]  # the note's contrast on a failed row
    assert not violations, [(v["id"], v["help"], [n["target"] for n in v["nodes"][:3]]) for v in violations]
    page.goto(f"{site['url']}/#/study/{job}")
    sync_api.expect(page.locator("#superseded")).to_contain_text(
        "Version 2 of this study was received after this one (version 1): that version is the one to screen")
    assert page.locator("#retry").count() == 0
    page.goto(f"{site['url']}/#/study/{later}")
    sync_api.expect(page.locator("#retry")).to_be_enabled()
    assert page.locator("#superseded").count() == 0
