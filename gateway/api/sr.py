"""``GET /v1/jobs/{id}/sr``: a finished job's CaseResult as a DICOM Structured Report (TID 1500), for PACS."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from aggregator.sr import SourceError
from gateway.api.deps import StoreDep
from gateway.api.jobs import checked_job_id
from gateway.auth import AUTH_RESPONSES, results_read
from gateway.errors import NotDone, SrUnavailable
from gateway.jobs import JobState
from gateway.report import SrContext, encode_sr

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(results_read)],
                   responses=AUTH_RESPONSES)

DICOM = "application/dicom"


@router.get(
    "/{job_id}/sr",
    summary="The result as a DICOM SR (Comprehensive 3D SR, TID 1500)",
    response_class=Response,
    responses={200: {"content": {DICOM: {}}}, 404: {"description": "no such job"},
               409: {"description": "the job is not done, or its SR cannot be made"}},
)
async def job_sr(job_id: str, store: StoreDep) -> Response:
    """The verdict, the case-rule evidence and its lesion boxes as a DICOM Part 10 SR file."""
    view = await store.job(checked_job_id(job_id))  # JobNotFound -> 404 (malformed ids before the store)
    if view.state != JobState.done or view.result is None:
        raise NotDone(f"Job {job_id} is {view.state.value}; its SR exists once done.")
    stored = await store.sr_context(job_id)
    if stored is None:
        raise SrUnavailable(f"The image headers of job {job_id} could not be read; no SR can be made for it.")
    context = SrContext.from_json(stored)
    try:
        data = await run_in_threadpool(encode_sr, view.result, context, await store.earlier_results(job_id))
    except SourceError as exc:  # its message names UIDs only
        raise SrUnavailable(f"No SR for job {job_id}: {exc}") from exc
    except (ValueError, AttributeError, TypeError) as exc:  # headers highdicom refuses: its message may quote one
        raise SrUnavailable(f"No SR for job {job_id}: highdicom refused the source headers "
                            f"({type(exc).__name__}).") from None
    uid = view.result.study_instance_uid
    return Response(data, media_type=DICOM,
                    headers={"Content-Disposition": f'attachment; filename="ctscreen-sr-{uid}.dcm"'})
