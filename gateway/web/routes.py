"""Routes of the web page: the shell at ``/`` and the JSON, image and event routes it reads.

==============================================  ==========================================================
``GET /``                                       the page (worklist, study viewer, service view); no data
``GET /web/static/...``                         its HTML, CSS and JS modules (no build step)
``GET /v1/worklist``                            study versions, newest or urgent first; filters and paging in SQL
``GET /v1/worklist/events``                     progress of every job, new study versions, as server-sent events
``GET /v1/jobs/{id}/slices/{index}.png``        one slice of a done job, windowed (``?window=lung``)
``GET /v1/service``                             Triton endpoints, backlog, throughput, latency, failures
==============================================  ==========================================================

Every route but the shell depends on :data:`gateway.web.access.ReadAccess`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from aggregator.schema import CaseResult
from gateway.api.deps import PoolDep, SettingsDep, StoreDep
from gateway.api.jobs import checked_job_id
from gateway.api.ops import triton_ready
from gateway.auth import ADMIN, AUTH_RESPONSES, RESULTS_READ, StreamGuard, event_stream
from gateway.errors import InstancesExpired, NoSuchSlice, NotDone, Unavailable
from gateway.jobs import JobState
from gateway.store import Store
from gateway.store.worklist import EventCursor, Worklist, WorklistRow
from gateway.web.access import ReadAccess
from gateway.web.labels import label_prefix, read_label_header
from gateway.web.render import WINDOWS, InstancesGone, LruCache, Rendered, SeriesMap, png_etag, render_png

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
router = APIRouter(tags=["web"], responses=AUTH_RESPONSES)  # every route in the schema needs results:read

PNG_CACHE_CONTROL = "no-store"
"""Never kept by the browser, like every other answer of the API: ``private, no-cache`` left the slices in the
browser's disk cache after sign-out (a shared workstation). The ETag stays: a client that keeps them may ask with
``If-None-Match`` (304). The study view keeps the slices it showed in memory, for the view only."""


class WebState:
    """The web routes' read models and caches (made on first use; memory is only a cache)."""

    def __init__(self, store: Store, blobs: Any) -> None:
        self.worklist = Worklist(store)
        self.blobs = blobs
        self.results: LruCache[str, CaseResult] = LruCache(16)
        self.series: LruCache[str, SeriesMap] = LruCache(8)
        self.pngs: LruCache[tuple[str, int, str], Rendered] = LruCache(512)
        self.provisional: LruCache[int, dict[str, str | None]] = LruCache(1024)
        """Labels of study versions not done yet, by study id (their series is not chosen: none recorded)."""
        self.unlabelled: LruCache[int, float] = LruCache(1024)
        """When the labels of a study version could not be read (by study id): not read again for
        :data:`UNLABELLED_RETRY_S` (each worklist load read its blobs again)."""
        self._series_locks: dict[str, asyncio.Lock] = {}

    async def series_of(self, job_id: str) -> SeriesMap:
        """The job's :class:`SeriesMap`, built once (per replica) from its stored instances."""
        cached = self.series.get(job_id)
        if cached is not None:
            return cached
        lock = self._series_locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            cached = self.series.get(job_id)
            if cached is None:
                study_id = await self.worklist.study_of_job(job_id)
                instances = [] if study_id is None else await self.worklist.instances(study_id)
                try:
                    cached = await asyncio.to_thread(SeriesMap.build, instances, self.blobs.get)
                except FileNotFoundError:
                    raise
                except OSError as exc:  # the blob store failed a read (a volume's EIO, a bucket that did not answer)
                    raise Unavailable("The study's images cannot be read now (the blob store failed); retry.") from exc
                if len(cached):
                    self.series.put(job_id, cached)
        self._series_locks.pop(job_id, None)
        return cached


def _web(request: Request) -> WebState:
    state = request.app.state
    web = getattr(state, "web", None)
    if web is None:
        web = state.web = WebState(state.store, state.blobs)
    return web


WebDep = Annotated[WebState, Depends(_web)]


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The page's shell (it holds no data; everything else is fetched with the caller's credential)."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _epoch(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def row_json(r: WorklistRow) -> dict[str, Any]:
    """One worklist row as the API answers it (``superseded_by``: the newer version of the study, not failed, if any;
    ``newest_version``: the study's newest, whatever its state)."""
    # a failed job's error is its reason; a job queued again after a failed try (Triton away, ...) shows why it
    # waits, as the error of that try
    error = (r.error or {}) if r.state in ("failed", "queued") else {}
    return {
        "study_id": r.study_id, "study_instance_uid": r.study_instance_uid, "version": r.version, "origin": r.origin,
        "received_at": _iso(r.received_at), "state": r.state, "job_id": r.job_id,
        "slices_done": r.slices_done, "slices_total": r.slices_total, "instances": r.instances,
        "verdict": r.verdict, "reason": r.reason or error.get("reason"),
        "message": r.message or (f"retrying after: {error['message']}" if r.state == "queued" and error.get("message")
                                 else error.get("message")),
        "finished_at": _iso(r.finished_at),
        # the turnaround from the row's "Received" (the version's first instance; an upload: accepted) to its
        # result: the instances arriving, the quiet period and the queue count, as the waiting sender sees it
        "time_s": None if r.finished_at is None or r.job_id is None else round(max(0.0, r.finished_at - r.received_at), 2),
        "labels": r.labels or {"study_date": None, "accession_number": None, "series_description": None},
        "superseded_by": r.latest_version if r.latest_version > r.version else None,
        # the study's newest version, failed or being received too: a failed row below it has no Screen again
        "newest_version": r.newest_version,
        "priority": r.priority,
    }


LABEL_SCAN = 64
UNLABELLED_RETRY_S = 300.0
"""How long a study version whose labels could not be read is shown without them before they are read again."""
"""How many of a done study version's stored instances are read, in the order stored, to find one of the
screened series (a scout or a second series sent first); past them the row gets no series description."""


async def _labels_of(web: WebState, row: WorklistRow) -> dict[str, str | None] | None:
    """The labels of a study version: the study's from its first instance, the series description from the
    first instance of the screened series (``row.series_instance_uid``; None before the job is done)."""
    first: dict[str, str | None] | None = None
    for _, key, _ in await web.worklist.instances(row.study_id, limit=LABEL_SCAN if row.series_instance_uid else 1):
        try:
            data = await asyncio.to_thread(label_prefix, web.blobs, key)  # the header, not the pixel data
        except (OSError, ValueError):  # gone, or the store failed: the labels are a nicety, the row goes on
            continue
        header = await asyncio.to_thread(read_label_header, data)
        if row.series_instance_uid is not None and header.series_instance_uid == row.series_instance_uid:
            return header.labels
        if first is None:
            first = {**header.labels, "series_description": None}  # the study's labels; no series chosen yet
            if row.series_instance_uid is None:
                break
    return first


async def _fill_labels(web: WebState, rows: list[WorklistRow]) -> dict[int, dict[str, str | None]]:
    """Labels of the rows that have none recorded: recorded once a row's job is done (the screened series is
    known then); before, the study's labels without a series, kept in memory only."""
    found: dict[int, dict[str, str | None]] = {}
    for r in rows:
        if r.labels is not None:
            continue
        settled = r.state == "done"
        failed_at = web.unlabelled.get(r.study_id)
        if failed_at is not None and time.monotonic() - failed_at < UNLABELLED_RETRY_S:
            continue
        cached = None if settled else web.provisional.get(r.study_id)
        labels = cached if cached is not None else await _labels_of(web, r)
        if labels is None:
            web.unlabelled.put(r.study_id, time.monotonic())
            continue
        found[r.study_id] = labels
        if not settled:
            web.provisional.put(r.study_id, labels)
            continue
        try:
            await web.worklist.put_labels(r.study_id, labels)
        except Exception as exc:  # noqa: BLE001 - labels are a convenience: shown now, read again next time
            logger.warning("worklist labels of study %d not recorded (%s)", r.study_id, type(exc).__name__)
    return found


@router.get("/v1/worklist", summary="Studies for the worklist, newest first or urgent first (filters and paging)",
            responses={422: {"description": "a filter or the page is out of range"}})
async def worklist(
    _who: ReadAccess, web: WebDep,
    limit: int = Query(50, ge=1, le=1000, description="rows per page"),
    offset: int = Query(0, ge=0, le=100_000_000, description="rows skipped"),
    state: Literal["receiving", "queued", "screening", "done", "failed"] | None = Query(None),
    verdict: Literal["positive", "negative", "indeterminate"] | None = Query(None),
    received_from: Annotated[date | None, Query(description="received on or after this day (UTC), YYYY-MM-DD")] = None,
    received_to: Annotated[date | None, Query(description="received on or before this day (UTC), YYYY-MM-DD")] = None,
    job_id: Annotated[str | None, Query(pattern="^[0-9a-f]{32}$", description="this job's row only")] = None,
    priority: Literal["urgent", "routine", "low"] | None = Query(None, description="study versions of this priority"),
    order: Literal["newest", "priority"] = Query(
        "newest", description="newest: newest first; priority: urgent first, then routine, then low, newest first within "
                              "each. Either is a total order: paging with offset repeats or skips no row"),
) -> JSONResponse:
    """One row per study version: labels (no patient name, ID or birth date), state and progress, verdict with its reason, time taken."""
    if received_from is not None and received_to is not None and received_from > received_to:  # was 200, no rows
        raise RequestValidationError([{"loc": ("query", "received_to"), "type": "value_error",
                                       "msg": f"must be on or after received_from ({received_from.isoformat()})"}])
    page = await web.worklist.page(
        limit=limit, offset=offset, state=state, verdict=verdict,
        received_from=None if received_from is None else _epoch(received_from),
        received_to=None if received_to is None or received_to == date.max else _epoch(received_to + timedelta(days=1)),
        job_id=job_id, priority=priority, order=order)
    labels = await _fill_labels(web, page.rows)
    rows = [row_json(r) for r in page.rows]
    for row in rows:
        if row["study_id"] in labels:
            row["labels"] = labels[row["study_id"]]
    return JSONResponse({"total": page.total, "limit": limit, "offset": offset, "rows": rows},
                        headers={"Cache-Control": "no-store"})


@router.get("/v1/worklist/events", summary="Progress of every job as server-sent events",
            response_class=StreamingResponse, responses={
                200: {"content": {"text/event-stream": {}}},
                429: {"description": "the caller, or the gateway, holds as many event streams open as it may"}})
async def worklist_events(_who: ReadAccess, web: WebDep, settings: SettingsDep, request: Request) -> StreamingResponse:
    """``event: progress`` with ``{job_id, study_instance_uid, state, slices_done, slices_total}`` at each change
    of any job;
    ``: keep-alive`` after ``CTSCREEN_EVENTS_KEEPALIVE_S`` (header ``X-Keepalive-Interval``) without one;
    ``event: studies`` with ``{newest}`` (a study id) when a study version is opened (a study being received
    shows on the worklist before it has a job). A caller holds at most ``CTSCREEN_MAX_STREAMS_PER_CALLER``
    streams open, the replica ``CTSCREEN_MAX_STREAMS``: beyond, 429 ``too_many_streams``."""
    store = web.worklist.store
    cursor = await EventCursor.at_newest(web.worklist)
    newest = await web.worklist.newest_study()

    guard = StreamGuard(request, RESULTS_READ)

    async def read() -> tuple[list[dict[str, Any]], int]:
        return await cursor.next(), await web.worklist.newest_study()

    async def stream() -> AsyncIterator[bytes]:
        nonlocal newest
        yield b"retry: 2000\n\n"
        quiet_since = time.monotonic()
        while not await request.is_disconnected() and await guard.holds():  # a revoked key ends the stream
            seen = store.changed.generation  # a change while reading below is not slept over
            # a restart or fail-over of the state store: the stream waits for it (its keep-alives go on)
            events, top = await store.streams.ride(read(), ([], newest))
            for e in events:
                e.pop("id")
                yield f"event: progress\ndata: {json.dumps(e)}\n\n".encode()
            if top != newest:
                newest = top
                yield f"event: studies\ndata: {json.dumps({'newest': top})}\n\n".encode()
                quiet_since = time.monotonic()
            if events:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= settings.events_keepalive_s:
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"
            await store.changed.wait(settings.worker_poll_s, seen)

    return event_stream(request, _who, stream(), settings.events_keepalive_s)


async def _done_result(web: WebState, store: Store, job_id: str) -> CaseResult:
    checked_job_id(job_id)  # 404 for a malformed id, before a cache, the store or a blob is asked (issue 14)
    cached = web.results.get(job_id)
    if cached is not None:
        return cached
    view = await store.job(job_id)  # JobNotFound -> 404
    if view.state != JobState.done or view.result is None:
        raise NotDone(f"Job {job_id} is {view.state.value}; its slices are shown once it is done.")
    web.results.put(job_id, view.result)
    return view.result


IMAGE_SIDES = "X-Image-Sides"
"""The PNG's header naming the patient directions at its left, top, right and bottom edges (``R A L P`` for an
axial slice stored as scanners usually store it), from Image Orientation (Patient)."""


@router.get("/v1/jobs/{job_id}/slices/{index}.png", summary="One slice of a done job as a windowed PNG",
            response_class=Response, tags=["jobs"],
            responses={200: {"content": {"image/png": {}}}, 304: {"description": "not modified (ETag)"},
                       404: {"description": "no such job, or no such slice"},
                       409: {"description": "the job is not done"},
                       410: {"description": "the job's instances are no longer kept (retention)"}})
async def slice_png(
    job_id: str, index: int, request: Request, _who: ReadAccess, web: WebDep, store: StoreDep,
    window: Literal["lung", "mediastinum"] = Query("lung", description="window preset"),
) -> Response:
    """Slice ``index`` (position order, as in the result) of the screened series, on its stored grid."""
    result = await _done_result(web, store, job_id)
    if not 0 <= index < len(result.slices):
        raise NoSuchSlice(f"Job {job_id} has slices 0..{len(result.slices) - 1}; there is no slice {index}.")
    finding = result.slices[index]
    try:
        source = (await web.series_of(job_id)).find(finding.sop_instance_uid, finding.position_mm)
    except InstancesGone:
        raise InstancesExpired(f"The images of job {job_id} are no longer kept (retention); its result is.") from None
    etag = png_etag(job_id, index, window, source.blob_key)
    headers = {"ETag": etag, "Cache-Control": PNG_CACHE_CONTROL}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    key = (job_id, index, window)
    rendered = web.pngs.get(key)
    if rendered is None:
        try:
            data = await asyncio.to_thread(web.blobs.get, source.blob_key)
        except FileNotFoundError:
            raise InstancesExpired(f"The images of job {job_id} are no longer kept.") from None
        except OSError as exc:
            raise Unavailable("The image cannot be read now (the blob store failed); retry.") from exc
        rendered = await asyncio.to_thread(render_png, data, source.filename, source.frame, window)
        web.pngs.put(key, rendered)
    if rendered.sides is not None:  # the viewer's orientation markers: left, top, right, bottom
        headers[IMAGE_SIDES] = " ".join(rendered.sides)
    return Response(rendered.png, media_type="image/png", headers=headers)


@router.get("/v1/service", summary="Service figures for the ops view")
async def service(_who: ReadAccess, web: WebDep, pool: PoolDep, request: Request) -> JSONResponse:
    """Triton endpoints and readiness, backlog (slices, seconds), studies per hour, p50/p95, recent failures.

    Each endpoint has a ``name`` (``Triton 1``, ...); its ``url``, an address inside the cluster, only for
    an ``admin`` caller (null for the others); ``slices_per_second`` as measured, null before it is. The backlog
    time is the backlog over the measured rates of the ready endpoints: null when none of them has one.
    """
    addresses = _who is None or _who.has(ADMIN)  # None: a gateway without authentication
    ready = set(await triton_ready(request, pool))
    queued, running, backlog = await web.worklist.store.counts()
    # measured rates only: an endpoint never measured showed pool.rates()'s assumed 15 slices/s as "measured", and
    # the backlog time was divided by the rates of endpoints not ready
    rates = pool.measured_rates()
    rate = sum(r for url, r in rates.items() if url in ready) or None
    figures = await web.worklist.service()
    for failure in figures["failures"]:
        failure["finished_at"] = _iso(failure["finished_at"])
    body = {
        "endpoints": [{"name": f"Triton {i}", "url": url if addresses else None, "ready": url in ready,
                       "slices_per_second": None if url not in rates else round(rates[url], 2)}
                      for i, url in enumerate(pool.endpoints, 1)],
        "model": pool.model_name,
        "queued": queued, "running": running,
        "backlog_slices": backlog,
        "backlog_seconds": None if rate is None else round(backlog / rate, 1),
        **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in figures.items()},
        "windows": {name: {"centre": c, "width": w} for name, (c, w) in WINDOWS.items()},
        "at": _iso(time.time()),
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
