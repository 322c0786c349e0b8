"""``/v1/jobs``: a job's state and result, its progress as server-sent events, and a retry."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.api.deps import SettingsDep, StoreDep
from gateway.auth import AUTH_RESPONSES, RESULTS_READ, ReadAccess, StreamGuard, WriteAccess, event_stream
from gateway.errors import JobNotFound, NotRetryable
from gateway.jobs import TERMINAL, JobAccepted, JobState, JobView, answer_of
from gateway.store import Store
from gateway.uids import is_job_id

# reads need results:read, POST .../retry needs studies:write (admin implies both); each route names its own
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=AUTH_RESPONSES)


_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such job (unknown id, or deleted by retention)"}}


def checked_job_id(job_id: str) -> str:
    """``job_id`` if it has the form of one (32 hex digits), else 404 before the store is asked."""
    if not is_job_id(job_id):
        raise JobNotFound(f"No job {job_id[:64]!r}.")
    return job_id


@router.get("/{job_id}", response_model=JobView, summary="State, progress and result of a job",
            responses=_NOT_FOUND)
async def get_job(job_id: str, store: StoreDep, _: ReadAccess) -> JobView:
    """The job: state, slices done/total, and the CaseResult once done."""
    return await store.job(checked_job_id(job_id))


@router.post("/{job_id}/retry", status_code=202, response_model=JobView | JobAccepted,
             summary="Queue a failed job again",
             responses={202: {"description": "the job queued again: whole with results:read, else its id and state"},
                        **_NOT_FOUND,
                        409: {"description": "not_retryable: the job is not failed, or retention removed its instances; "
                                             "superseded: a later version of its study exists (a late instance, a "
                                             "re-screen, the study sent again), which the message names with its "
                                             "job, as do superseded_by (its version) and superseded_by_job (its "
                                             "job, null while it is being received): only the latest version's "
                                             "job is retried"}})
async def retry_job(job_id: str, store: StoreDep, settings: SettingsDep, caller: WriteAccess) -> JSONResponse:
    """Screen a failed job's instances again (with a fresh deadline); like ``.../complete``, the answer
    shows more than the job's id and state only to a caller who holds ``results:read``. Only a job of the study's
    latest version is retried: an earlier one's reading would replace nothing and reach no destination (409
    ``superseded``, naming the later version and its job)."""
    try:
        view = await store.retry(checked_job_id(job_id), settings.job_deadline_s)
    except ValueError as exc:
        raise NotRetryable(str(exc)) from None
    return JSONResponse(answer_of(view, caller.has(RESULTS_READ)), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


async def job_views(store: Store, job_id: str, poll_s: float, keepalive_s: float = 15.0
                    ) -> AsyncIterator[JobView | None]:
    """The job's view at each change until it finishes (``None``: nothing new, keep-alive).

    Changes are the job's rows in the ``events`` table, so any replica streams any job. A change of this
    job made by this process (or, on PostgreSQL, heard from another replica) wakes the stream at once, and so
    does a change of jobs unknown; the progress of other jobs does not (:meth:`gateway.store.store.Changes.
    watching`). Anything missed is seen within ``poll_s``. While the state store cannot answer (a restart, a
    fail-over), the stream waits for it with its keep-alives (it ended with a traceback in the log).
    """
    last_event, shown, quiet_since = 0, None, time.monotonic()
    with store.changed.watching(job_id) as changes:  # this job's changes: not every running job's progress
        while True:
            seen = changes.generation  # a change while reading below is not slept over
            step = store.job_step(job_id, last_event, view=shown is None)
            events, view = await store.streams.ride(step, ([], None))
            if view is not None:
                if events:
                    last_event = events[-1][0]
                key = (view.state, view.slices_done, view.slices_total, view.attempts)
                if key != shown:
                    shown, quiet_since = key, time.monotonic()
                    yield view
                if view.state in TERMINAL:
                    return
            elif time.monotonic() - quiet_since >= keepalive_s:
                quiet_since = time.monotonic()
                yield None
            await changes.wait(poll_s, seen)


@router.get(
    "/{job_id}/events",
    summary="Progress of a job as server-sent events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **_NOT_FOUND,
               429: {"description": "the caller, or the gateway, holds as many event streams open as it may"}},
)
async def job_events(job_id: str, store: StoreDep, settings: SettingsDep, who: ReadAccess,
                     request: Request) -> StreamingResponse:
    """``event: progress`` at each change, then ``event: done`` or ``event: failed`` with the job. A caller
    holds at most ``CTSCREEN_MAX_STREAMS_PER_CALLER`` streams open (the worklist's too), the replica
    ``CTSCREEN_MAX_STREAMS``: beyond, 429 ``too_many_streams``."""
    await store.job(checked_job_id(job_id))  # 404 before the stream starts
    guard = StreamGuard(request, RESULTS_READ)
    keepalive_s = min(settings.events_keepalive_s, guard.every_s)

    async def stream() -> AsyncIterator[bytes]:
        # a quiet job's stream wakes (a keep-alive) at least as often as its credential is asked again: a key
        # revoked while nothing happened ended the stream only at the next 15 s keep-alive
        async for view in job_views(store, job_id, settings.worker_poll_s, keepalive_s=keepalive_s):
            if not await guard.holds():  # a revoked key, an expired token: the stream ends
                return
            if view is None:
                yield b": keep-alive\n\n"
                continue
            kind = {JobState.done: "done", JobState.failed: "failed"}.get(view.state, "progress")
            data = view.model_dump(mode="json")
            if kind == "progress":
                data.pop("result", None)
            yield f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    return event_stream(request, who, stream(), keepalive_s)
