"""Page-load budget of the web worklist: 1,000 studies rendered in at most 1 s (issue 16).

Seeds a fresh SQLite state store with ``--studies`` finished study versions (labels, verdicts and
reasons as the gateway writes them; no pixels), starts a real gateway (uvicorn) on it, and lets
Debian's Chromium (headless, driven by Playwright) open ``/#/?limit=N``: the time from navigation
start to the first paint after the rows are in the DOM (the page's ``worklist-painted`` mark; also
``worklist-fetch``, ``-data`` and ``-dom``) is printed for each of ``--loads`` fresh loads, with the
median. A printed figure, not a timed test::

    python -m benchmarks.web_worklist --studies 1000 --loads 5

The gateway's Triton endpoint is a closed port: the page needs no Triton, and nothing is screened.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ctscreen.cliargs import positive

CHROMIUM = "/usr/bin/chromium"


def seed(database_url: str, n: int, *, now: float | None = None) -> list[str]:
    """Insert ``n`` done study versions (one a minute back from ``now``) with results and labels.

    Every third is positive, every seventh failed, the rest negative; returns the job ids, newest last.
    """
    from sqlalchemy import create_engine, insert

    from gateway.store.models import Event, Job, Result, Study
    from gateway.store.worklist import StudyLabels

    now = time.time() if now is None else now
    engine = create_engine(database_url)
    studies, jobs, results, labels, events, ids = [], [], [], [], [], []
    for i in range(n):
        t = now - (n - i) * 60.0
        uid = f"2.25.{uuid.uuid4().int}"[:64]
        job_id = uuid.uuid4().hex
        failed = i % 7 == 6
        verdict = "positive" if i % 3 == 0 else "negative"
        studies.append({"id": i + 1, "study_instance_uid": uid, "version": 1, "origin": "upload",
                        "state": "complete", "created_at": t, "last_rx_at": t, "completed_at": t})
        jobs.append({"id": job_id, "study_id": i + 1, "study_instance_uid": uid, "origin": "upload",
                     "state": "failed" if failed else "done", "files": 120, "slices_total": 120,
                     "slices_done": 120, "attempts": 1, "next_attempt_at": t, "deadline_at": t + 86400,
                     "created_at": t, "updated_at": t + 9, "finished_at": t + 9.0 + i % 5,
                     "error": {"reason": "undecodable", "message": "Pixel data cannot be decoded."} if failed else None})
        if not failed:
            results.append({"job_id": job_id, "study_instance_uid": uid, "created_at": t + 9, "sr_context": None,
                            "result": {"verdict": verdict, "reason": "run_found" if verdict == "positive" else "no_run",
                                       "message": "4 consecutive slices (20.0 mm) with lesions in the bottom right "
                                                  "quadrant" if verdict == "positive" else "Longest run: 1 slice."}})
        labels.append({"study_id": i + 1, "study_date": "20200212", "accession_number": f"A{i:08d}",
                       "series_description": "Chest 1.25mm", "read_at": t})
        events.append({"job_id": job_id, "state": jobs[-1]["state"], "slices_done": 120, "slices_total": 120,
                       "created_at": t + 9})
        ids.append(job_id)
    with engine.begin() as c:
        for table, rows in ((Study, studies), (Job, jobs), (Result, results), (StudyLabels, labels), (Event, events)):
            if rows:
                c.execute(insert(table), rows)
    engine.dispose()
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.web_worklist", description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=positive(int), default=1000, help="studies in the store and on the page")
    parser.add_argument("--loads", type=positive(int), default=5, help="fresh page loads measured")
    parser.add_argument("--chromium", default=CHROMIUM, help="the browser binary (Debian's chromium)")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from ctscreen.embedded import free_port
    from gateway.cli import run_stack
    from gateway.store.migrate import upgrade

    with tempfile.TemporaryDirectory(prefix="ctscreen-web-bench-") as tmp:
        database = f"sqlite:///{Path(tmp) / 'ctscreen.db'}"
        upgrade(database)
        seed(database, args.studies)
        overrides = {"data_dir": Path(tmp), "database_url": database, "db_migrate": False,
                     "audit_log_file": Path(tmp) / "audit.jsonl"}  # not between the figures
        with run_stack(port=0, triton_url=f"127.0.0.1:{free_port()}", settings_overrides=overrides) as stack, \
                sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
            figures: list[float] = []
            stages: list[dict[str, float]] = []
            for _ in range(args.loads):
                context = browser.new_context(viewport={"width": 1280, "height": 800})
                page = context.new_page()
                page.goto(f"{stack.url}/#/?limit={args.studies}")
                page.wait_for_function(f"() => document.querySelectorAll('table.worklist tbody tr').length === {args.studies}",
                                       timeout=30_000)
                page.wait_for_function("() => performance.getEntriesByName('worklist-painted').length > 0")
                marks = page.evaluate("Object.fromEntries(performance.getEntriesByType('mark')"
                                      ".map(m => [m.name, m.startTime / 1000]))")
                figures.append(marks["worklist-painted"])
                stages.append({k: round(v, 3) for k, v in marks.items()})
                context.close()
            browser.close()
    print(json.dumps({"studies": args.studies, "loads_s": [round(f, 3) for f in figures], "marks": stages,  # noqa: T201
                      "median_s": round(statistics.median(figures), 3), "budget_s": 1.0,
                      "within_budget": statistics.median(figures) <= 1.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
