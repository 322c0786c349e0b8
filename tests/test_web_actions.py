"""The worklist urgent first: Debian's Chromium (headless) driven by Playwright against a live gateway with API keys.

No Triton: the store is seeded (``benchmarks.web_worklist.seed``: done and failed study versions, some urgent, some
low), and the gateway's Triton is an address nobody listens on, so a study screened again waits queued.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
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
