"""``/v1/jobs``: a job's state and result, and its progress as server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from gateway.api.deps import StoreDep
from gateway.auth import AUTH_RESPONSES, results_read
from gateway.jobs import JobState, JobView

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(results_read)],
                   responses=AUTH_RESPONSES)


_NOT_FOUND = {404: {"description": "no such job (unknown id, or expired after it was read)"}}


@router.get("/{job_id}", response_model=JobView, summary="State, progress and result of a job",
            responses=_NOT_FOUND)
async def get_job(job_id: str, store: StoreDep) -> JobView:
    """The job: state, slices done/total, and the CaseResult once done."""
    return store.get(job_id)


@router.get(
    "/{job_id}/events",
    summary="Progress of a job as server-sent events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **_NOT_FOUND},
)
async def job_events(job_id: str, store: StoreDep) -> StreamingResponse:
    """``event: progress`` at each change, then ``event: done`` or ``event: failed`` with the job."""
    store.get(job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[bytes]:
        async for view in store.events(job_id):
            if view is None:
                yield b": keep-alive\n\n"
                continue
            kind = {JobState.done: "done", JobState.failed: "failed"}.get(view.state, "progress")
            data = view.model_dump(mode="json")
            if kind == "progress":
                data.pop("result", None)
            yield f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
