"""The worklist's queries on a real SQLite state store (revision 0004): filters, paging, order, indexes,
labels (the urgent-first order's index on a real PostgreSQL too); and the pure pieces of the slice renderer. No
Triton, no browser (``tests/test_web_page.py``)."""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import create_engine, event, insert, text
from sqlalchemy.engine import Engine

import phantom
from benchmarks.web_worklist import seed
from gateway.store import Store
from gateway.store.migrate import upgrade
from gateway.store.models import Study as StudyModel
from gateway.store.worklist import Worklist, row_state
from gateway.web.labels import read_label_header
from gateway.web.render import WINDOWS, SeriesMap, render_png, window_u8

N = 30  # seed(): every 3rd positive, every 7th failed


@pytest.fixture
def database(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'ctscreen.db'}"
    upgrade(url)
    seed(url, N, now=time.time())
    return url


def _run(url: str, fn):
    async def go():
        store = Store(url)
        try:
            return await fn(Worklist(store))
        finally:
            await store.close()

    return asyncio.run(go())


def test_pages_filter_and_order_in_sql(database):
    async def check(w: Worklist):
        everything = await w.page(limit=1000)
        assert everything.total == N and len(everything.rows) == N
        received = [r.received_at for r in everything.rows]
        assert received == sorted(received, reverse=True)
        failed = [i for i in range(N) if i % 7 == 6]
        positive = [i for i in range(N) if i % 3 == 0 and i not in failed]
        assert (await w.page(verdict="positive")).total == len(positive)
        assert (await w.page(state="failed")).total == len(failed)
        assert (await w.page(state="screening")).total == 0
        second = await w.page(limit=10, offset=10)
        assert [r.study_id for r in second.rows] == [r.study_id for r in everything.rows[10:20]]
        newest = everything.rows[0].received_at
        assert (await w.page(received_from=newest)).total == 1
        assert (await w.page(received_to=newest)).total == N - 1
        row = everything.rows[0]
        assert row.labels == {"study_date": "20200212", "accession_number": f"A{N - 1:08d}",
                              "series_description": "Chest 1.25mm"}
        for bad in ({"state": "lost"}, {"verdict": "maybe"}, {"limit": 0}, {"offset": -1}):
            with pytest.raises(ValueError, match="Argument"):
                await w.page(**bad)
        figures = await w.service()
        assert figures["sampled"] == N - len(failed) and figures["p95_s"] >= figures["p50_s"] > 0
        assert len(figures["failures"]) == min(10, len(failed))
        assert figures["failures"][0]["reason"] == "undecodable"

    _run(database, check)


def _prioritise(url: str) -> dict[int, str]:
    """Study versions of every priority, among them three urgent and two low, and two pairs received in the same
    instant (one pair across a page's edge below), so the order rests on the id where the time ties: study id ->
    priority."""
    urgent, low = {3, 17, 29}, {4, 12}
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text("UPDATE studies SET priority = 2 WHERE id IN (3, 17, 29)"))
        c.execute(text("UPDATE studies SET priority = 0 WHERE id IN (4, 12)"))
        for a, b in ((17, 18), (20, 21)):
            c.execute(text("UPDATE studies SET created_at = (SELECT created_at FROM studies WHERE id = :b) WHERE id = :a"),
                      {"a": a, "b": b})
    engine.dispose()
    return {i: "urgent" if i in urgent else "low" if i in low else "routine" for i in range(1, N + 1)}


def test_urgent_first_orders_by_priority_then_newest_and_pages_without_repeating_a_row(database):
    """A reading room wants its urgent studies at the top: ``order="priority"`` puts urgent first, then routine, then
    low, newest first within each (the id breaking ties of the same instant); every page of it follows on from the
    one before, none repeating or skipping a row. The default order is unchanged (newest first)."""
    priorities = _prioritise(database)
    rank = {"urgent": 2, "routine": 1, "low": 0}

    async def check(w: Worklist):
        newest = (await w.page(limit=1000)).rows
        assert [(r.received_at, r.study_id) for r in newest] == sorted(
            ((r.received_at, r.study_id) for r in newest), reverse=True)  # unchanged
        ordered = (await w.page(limit=1000, order="priority")).rows
        assert [r.priority for r in ordered] == [priorities[r.study_id] for r in ordered]
        assert [r.study_id for r in ordered] == [r.study_id for r in sorted(
            newest, key=lambda r: (rank[r.priority], r.received_at, r.study_id), reverse=True)]
        assert [r.study_id for r in ordered[:3]] == [29, 17, 3] and [r.study_id for r in ordered[-2:]] == [12, 4]
        for size in (4, 7, 10):
            pages = [(await w.page(limit=size, offset=o, order="priority")).rows for o in range(0, N, size)]
            assert [r.study_id for p in pages for r in p] == [r.study_id for r in ordered], size
        second = await w.page(limit=10, offset=10, order="priority")
        assert second.total == N and [r.study_id for r in second.rows] == [r.study_id for r in ordered[10:20]]
        # with a filter too: the urgent and low of one state, in the same order
        done = (await w.page(limit=1000, state="done", order="priority")).rows
        assert [r.study_id for r in done] == [r.study_id for r in ordered if r.state == "done"]
        with pytest.raises(ValueError, match="Argument"):
            await w.page(order="oldest")

    _run(database, check)


def test_the_worklist_route_orders_urgent_first_across_pages(database, tmp_path):
    """``GET /v1/worklist?order=priority``: urgent rows first, page 2 follows page 1; no order is newest first; an
    unknown order is 422."""
    from fastapi.testclient import TestClient

    from gateway.main import create_app
    from gateway.settings import Settings
    from tests.gateway_app_fakes import FakeFleet

    priorities = _prioritise(database)
    settings = Settings(triton_urls="fake:1", data_dir=tmp_path, database_url=database, stow_quiet_period_s=3600,
                        shutdown_grace_s=1)
    with TestClient(create_app(settings, client_factory=FakeFleet())) as c:
        newest = c.get("/v1/worklist", params={"limit": 1000}).json()["rows"]
        assert [r["received_at"] for r in newest] == sorted((r["received_at"] for r in newest), reverse=True)
        pages = [c.get("/v1/worklist", params={"limit": 10, "offset": o, "order": "priority"}).json() for o in (0, 10, 20)]
        rows = [r for p in pages for r in p["rows"]]
        assert len({r["study_id"] for r in rows}) == N and {p["total"] for p in pages} == {N}
        assert [r["priority"] for r in rows] == sorted((r["priority"] for r in rows), key=["urgent", "routine", "low"].index)
        assert [r["priority"] for r in rows] == [priorities[r["study_id"]] for r in rows]
        assert [r["study_id"] for r in pages[0]["rows"][:3]] == [29, 17, 3]
        urgent = c.get("/v1/worklist", params={"priority": "urgent", "order": "priority"}).json()["rows"]
        assert [r["study_id"] for r in urgent] == [29, 17, 3]
        r = c.get("/v1/worklist", params={"order": "oldest"})
        assert r.status_code == 422 and "query parameter order: " in r.json()["message"], r.text
        spec = c.get("/openapi.json").json()["paths"]["/v1/worklist"]["get"]["parameters"]
        assert next(p for p in spec if p["name"] == "order")["schema"]["default"] == "newest"


def test_an_older_version_of_a_study_names_the_version_that_supersedes_it(database):
    """A late instance opens version 2: version 1's row (perhaps negative) must not read as the study's
    verdict; its row names the newer version (the page says "superseded by v2")."""
    from gateway.web.routes import row_json

    async def check(w: Worklist):
        uid = (await w.page(limit=1)).rows[0].study_instance_uid
        await w.store.add_instance(uid, uid + ".99", "late.dcm", "late-key", 10)  # after completion: version 2
        rows = [r for r in (await w.page(limit=1000)).rows if r.study_instance_uid == uid]
        by_version = {r.version: r for r in rows}
        assert set(by_version) == {1, 2} and {r.latest_version for r in rows} == {2}
        assert row_json(by_version[1])["superseded_by"] == 2 and row_json(by_version[2])["superseded_by"] is None

    _run(database, check)


def test_newest_first_and_the_verdict_filter_use_their_indexes(database):
    engine = create_engine(database)
    with engine.connect() as c:
        plan = " ".join(str(r[-1]) for r in c.execute(text(
            "EXPLAIN QUERY PLAN SELECT job_id FROM results WHERE json_extract(results.result, '$.verdict') = 'positive'")))
        assert "ix_results_verdict" in plan, plan
        plan = " ".join(str(r[-1]) for r in c.execute(text(
            "EXPLAIN QUERY PLAN SELECT id FROM studies ORDER BY created_at DESC LIMIT 50")))
        assert "ix_studies_created_at" in plan, plan
    engine.dispose()


async def _page_and_its_plan(w: Worklist, **kw) -> tuple[list, str]:
    """The rows of ``w.page(**kw)`` and the plan of the very statement it ran for them (caught at the cursor, run
    again under EXPLAIN with its parameters), one line per node."""
    seen: list[tuple[str, object]] = []

    def catch(conn, cursor, statement, parameters, context, executemany) -> None:
        seen.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", catch)
    try:
        rows = (await w.page(**kw)).rows
    finally:
        event.remove(Engine, "before_cursor_execute", catch)
    [(statement, parameters)] = [(q, p) for q, p in seen if "ORDER BY" in q]  # the page's (not its count)
    explain = "EXPLAIN QUERY PLAN " if w.store.dialect == "sqlite" else "EXPLAIN "
    async with w.store.engine.connect() as c:
        return rows, "\n".join(str(r[-1]) for r in await c.exec_driver_sql(explain + statement, parameters))


def test_urgent_first_and_the_priority_filter_read_their_index_and_sort_nothing(db_url):
    """``order=priority`` sorted the whole studies table at every load (``coalesce(priority, 1)``, which no index
    serves; a regional centre's 100 000 versions). The page the worklist builds reads
    ``ix_studies_priority_created_at`` backwards (revision 0015), with the priority filter too, and sorts nothing;
    its rows are in the same order as before: urgent, routine, low, each newest first, the id breaking ties.
    3,000 versions, analysed: PostgreSQL's planner reads a small table whole and sorts it, rightly, whatever the
    index, and so a page that skips half of these (SQLite takes an index that serves the ORDER BY at any size)."""
    upgrade(db_url)
    n = 3000
    studies = [{"id": i, "study_instance_uid": f"2.25.{i}", "version": 1, "origin": "upload", "state": "complete",
                "created_at": 1e9 + i // 2, "last_rx_at": 1e9, "priority": (i * 7) % 3} for i in range(1, n + 1)]

    async def check(w: Worklist) -> None:
        async with w.store.tx() as s:  # every second pair received in the same instant: the id decides
            await s.execute(insert(StudyModel), studies)
        if w.store.dialect == "postgresql":
            async with w.store.engine.begin() as c:
                await c.exec_driver_sql("ANALYZE studies")
        expected = [s["id"] for s in sorted(studies, key=lambda s: (s["priority"], s["created_at"], s["id"]),
                                            reverse=True)]
        for kw, want in (({}, expected[:50]), ({"offset": 250}, expected[250:300]),
                         ({"priority": "urgent"}, [i for i in expected if studies[i - 1]["priority"] == 2][:50]),
                         ({"priority": "low", "order": "newest"}, [i for i in expected if studies[i - 1]["priority"] == 0][:50])):
            rows, plan = await _page_and_its_plan(w, **{"order": "priority", **kw})
            assert [r.study_id for r in rows] == want, kw
            assert "ix_studies_priority_created_at" in plan and "SORT" not in plan.upper() \
                and "TEMP B-TREE" not in plan, (kw, plan)

    async def go() -> None:
        store = Store(db_url)
        try:
            await check(Worklist(store))
        finally:
            await store.close()

    asyncio.run(go())


def test_labels_are_recorded_once_and_never_hold_the_patient(database, tmp_path):
    study = phantom.make_study(seed=3, kind="normal", n_slices=4, matrix=64)
    folder = phantom.write_study(study, tmp_path / "s")
    data = sorted(folder.rglob("*.dcm"))[0].read_bytes()
    labels = read_label_header(data).labels
    assert labels["accession_number"] == "A00000003" and labels["study_date"] and labels["series_description"]
    assert not any("Phantom" in (v or "") for v in labels.values())
    # a Study Date that is no DICOM date is not kept (a privacy review's malformed one read "Zyxwvut9": the
    # name of the patient, served to every reader of the worklist)
    ds = pydicom.dcmread(io.BytesIO(data))
    for bad in ("Zyxwvut9", "20200231", "2020-12-31"):
        ds.StudyDate = bad
        buf = io.BytesIO()
        ds.save_as(buf)
        assert read_label_header(buf.getvalue()).labels["study_date"] is None, bad

    async def put(w: Worklist):
        await w.put_labels(1, labels)
        await w.put_labels(1, {"accession_number": "other"})  # a second writer changes nothing
        return (await w.page(limit=1000)).rows

    rows = _run(database, put)
    assert next(r for r in rows if r.study_id == 1).labels["accession_number"] == f"A{0:08d}"  # the seed's


def test_windows_and_png_on_the_stored_grid(tmp_path):
    assert window_u8(np.array([[-1350, 150]]), *WINDOWS["lung"]).tolist() == [[0, 255]]
    assert window_u8(np.array([[40]]), *WINDOWS["mediastinum"]).tolist() == [[128]]
    study = phantom.make_study(seed=3, kind="covid", n_slices=4, matrix=96)
    files = sorted(phantom.write_study(study, tmp_path / "s").rglob("*.dcm"))
    blobs = {f"k{i}": p.read_bytes() for i, p in enumerate(files)}
    series = SeriesMap.build([(p.name, f"k{i}", None) for i, p in enumerate(files)], blobs.__getitem__)
    assert len(series) == len(files)
    ds = pydicom.dcmread(io.BytesIO(blobs["k0"]), stop_before_pixels=True)
    source = series.find(str(ds.SOPInstanceUID), 0.0)
    png = render_png(blobs[source.blob_key], source.filename, source.frame, "lung").png
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode == "L" and image.size == (ds.Columns, ds.Rows)
    with pytest.raises(ValueError, match="window"):
        render_png(blobs["k0"], "x", 0, "bone")
    # the orientation markers: as scanners usually store a slice, and a slice stored mirrored (its row direction
    # to the patient's right), which the page showed with nothing to say the patient's left is on the image's left
    assert render_png(blobs[source.blob_key], source.filename, source.frame, "lung").sides == ("R", "A", "L", "P")
    mirrored = pydicom.dcmread(io.BytesIO(blobs[source.blob_key]))
    mirrored.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    out = io.BytesIO()
    mirrored.save_as(out)
    assert render_png(out.getvalue(), source.filename, source.frame, "lung").sides == ("L", "A", "R", "P")


def test_the_viewer_finds_a_slice_without_a_checked_read_of_every_header(tmp_path, monkeypatch):
    """The first image of an upload of 1,000 slices waited 8.6 s in a review: its map was built with a checked
    header read of every stored instance (uploads record no UIDs). A single-frame object needs its UID alone; a
    re-sent copy of one is found as ingest keeps it (the later); a multi-frame object still gets the full read."""
    import gateway.dicom

    study = phantom.make_study(seed=3, kind="covid", n_slices=6, matrix=64)
    files = sorted(phantom.write_study(study, tmp_path / "s").rglob("*.dcm"))
    blobs = {f"k{i}": p.read_bytes() for i, p in enumerate(files)}
    blobs["again"] = blobs["k0"]  # the first slice sent twice
    checked: list[str] = []
    real = gateway.dicom.read_headers
    monkeypatch.setattr(gateway.dicom, "read_headers", lambda name, data: checked.append(name) or real(name, data))
    instances = [(p.name, f"k{i}", None) for i, p in enumerate(files)] + [("again.dcm", "again", None)]
    series = SeriesMap.build(instances, blobs.__getitem__)
    assert len(series) == len(files) and checked == []
    first = str(pydicom.dcmread(io.BytesIO(blobs["k0"]), stop_before_pixels=True).SOPInstanceUID)
    assert series.find(first, 0.0).blob_key == "again"
    from tests.gateway_dicom_factory import enhanced_ct

    blobs["multi"] = enhanced_ct([np.full((16, 16), -800, np.int16)] * 3, [(1.0, -1024.0)] * 3, [0.0, 5.0, 10.0])
    SeriesMap.build([("multi.dcm", "multi", None)], blobs.__getitem__)
    assert checked == ["multi.dcm"]


def test_row_state_maps_job_states():
    assert [row_state("complete", s) for s in ("queued", "decoding", "inferring", "aggregating", "done", "failed")] == [
        "queued", "screening", "screening", "screening", "done", "failed"]
    assert row_state("receiving", None) == "receiving"


def test_labels_are_one_line_of_plain_text(tmp_path):
    """A right-to-left override in an Accession Number showed 'ACC12<RLO>3456' as 'ACC126543'; a Series
    Description of two values showed as a Python list."""
    study = phantom.make_study(seed=3, kind="normal", n_slices=4, matrix=64)
    folder = phantom.write_study(study, tmp_path / "s")
    ds = pydicom.dcmread(sorted(folder.rglob("*.dcm"))[0])
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.AccessionNumber = "ACC12\u202e3456"
    ds.SeriesDescription = pydicom.multival.MultiValue(str, ["Thorax", "Lung 1.0"])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    header = read_label_header(buf.getvalue())
    assert header.labels["accession_number"] == "ACC123456"
    assert header.labels["series_description"] == "Thorax\\Lung 1.0"
    assert header.series_instance_uid == ds.SeriesInstanceUID


def test_labels_recorded_before_revision_0007_are_read_again(tmp_path):
    """Recorded from the first stored instance (often the scout) while the study was still arriving: 0007
    removes them, so that the worklist reads them from the screened series."""
    from gateway.store.migrate import downgrade, plan_downgrade

    url = f"sqlite:///{tmp_path / 'ctscreen.db'}"
    upgrade(url)
    seed(url, 3, now=time.time())  # by this release's models, then back to 0006 (a downgrade keeps the rows)

    async def put(w: Worklist):
        await w.put_labels(1, {"series_description": "SCOUT"})

    _run(url, put)
    downgrade(plan_downgrade(url, "0006"))
    engine = create_engine(url)
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM study_labels")).scalar() >= 1
    upgrade(url)
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM study_labels")).scalar() == 0
    engine.dispose()


def test_labels_are_read_from_the_header_not_the_whole_blob(tmp_path):
    """The worklist read each label blob whole: a 1.2 GiB instance took memory from 580 MB to 4 GB at each
    load (26_worklist_label_read.py). A blob whose pixel data is large (and garbage) yields its labels from
    a bounded prefix. Before: no bounded read (gateway.web.labels.label_prefix did not exist)."""
    from gateway.store.blobs import FolderBlobs
    from gateway.web.labels import LABEL_PREFIX_BYTES, label_prefix

    study = phantom.make_study(seed=3, kind="normal", n_slices=4, matrix=64)
    folder = phantom.write_study(study, tmp_path / "s")
    ds = pydicom.dcmread(sorted(folder.rglob("*.dcm"))[0])
    ds.AccessionNumber = "ACC42"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue() + b"\xde\xad" * (4 * LABEL_PREFIX_BYTES)  # past the pixel data: never parsed
    blobs = FolderBlobs(tmp_path / "blobs")
    blobs.put("k", data)

    class Counting:  # a blob store without files: read whole, but the labels still come from the prefix
        got = 0

        def get(self, key: str) -> bytes:
            Counting.got += 1
            return blobs.get(key)

    prefix = label_prefix(blobs, "k")
    assert len(prefix) == LABEL_PREFIX_BYTES < len(data)
    assert read_label_header(prefix).labels == read_label_header(buf.getvalue()).labels
    assert read_label_header(prefix).labels["accession_number"] == "ACC42"
    assert read_label_header(label_prefix(Counting(), "k")).labels["accession_number"] == "ACC42"
    assert Counting.got == 1


@pytest.mark.parametrize("syntax", ["native", "rle"])
def test_a_slice_png_decodes_its_frame_only_with_that_frames_rescale(syntax, monkeypatch):
    """Each slice PNG of an Enhanced CT decoded every frame then took one (~1.1 s of CPU per slice of 200
    frames; 12 requests 515 MB -> 3.26 GB, 14_png_multiframe.py). Frame k's PNG equals the whole decode's
    frame k (its own per-frame rescale), and the codec is asked for frame k only. Before: pixel_array was
    called with no index (every frame)."""
    import pydicom.pixels
    from pydicom.uid import RLELossless

    from gateway.dicom import decode_hu, read_headers
    from tests.gateway_dicom_factory import enhanced_ct

    rng = np.random.default_rng(1)
    frames = [np.clip(rng.normal(-400 + 200 * i, 300, (32, 32)), -1024, 2000).astype(np.int16) for i in range(5)]
    data = enhanced_ct(frames, [(1.0, -1024.0), (0.5, -1024.0), (2.0, -2048.0), (1.0, -1000.0), (1.0, -1024.0)],
                       [float(z) for z in range(5)])
    if syntax == "rle":
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.compress(RLELossless)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
    ds, headers = read_headers("x", data)
    whole = decode_hu(ds, headers, "x")
    asked: list[object] = []
    real = pydicom.pixels.pixel_array

    def counting(*args, **kwargs):
        asked.append(kwargs.get("index"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "pixel_array", counting)
    for k in (2, 4):
        png = np.asarray(Image.open(io.BytesIO(render_png(data, "x", k, "lung").png)))
        assert np.array_equal(png, window_u8(whole[k], *WINDOWS["lung"]))
    assert asked == ([] if syntax == "native" else [2, 4])
