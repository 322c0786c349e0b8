"""``/v1/jobs/{id}/deliveries``: where a result was sent (PACS, RIS), and a re-send; ``/v1/deliveries``: the
deliveries in one state across jobs (the failed ones, after an outage), and a re-send of every failed one."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from gateway.api.deps import StoreDep
from gateway.api.jobs import checked_job_id
from gateway.auth import AUTH_RESPONSES, ReadAccess, WriteAccess
from gateway.errors import NotFound, NotResendable

# reading deliveries needs results:read, a re-send studies:write (admin implies both), as for the jobs
router = APIRouter(prefix="/v1/jobs", tags=["deliveries"], responses=AUTH_RESPONSES)
fleet = APIRouter(prefix="/v1/deliveries", tags=["deliveries"], responses=AUTH_RESPONSES)


class DeliveryView(BaseModel):
    """One result to one destination."""

    destination: str
    kind: str = Field(description="dicom, stowrs, fhir or hl7")
    state: str = Field(description="pending, sending, done, skipped or failed")
    attempts: int
    objects: list[dict[str, str]] = Field(description="what is sent: kind and SOP Instance UID / report identifier "
                                                    "(FHIR, HL7)")
    sent: list[str] = Field(description="UIDs / identifiers the destination acknowledged (in this round: a forced "
                                        "re-send sends every object again)")
    held: list[str] = Field(description=(
        "UIDs / identifiers the destination is recorded as holding: acknowledged in this round or before a forced "
        "re-send (a later reading's Rejection Note and replacing FHIR report name them, whatever that re-send did)"))
    error: str | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    updated_at: datetime | None = Field(None, description="when its state last changed")
    history: list[dict[str, Any]] = Field(description="the task's events (state, attempt, detail)")
    job_id: str | None = Field(None, description="the job whose result it is (in lists across jobs)")
    held_behind: str | None = Field(None, description=(
        "in a job's deliveries: the job of an earlier version of the study whose delivery to this destination has "
        "not ended; this one, pending, is not sent before it ends (its replaces and Rejection Note name what the "
        "destination acknowledged of it)"))


def _ts(v: float | None) -> datetime | None:
    return None if v is None else datetime.fromtimestamp(v, UTC)


def delivery_view(task: Any, *, with_job: bool = False, held_behind: str | None = None) -> DeliveryView:
    objects = [{"kind": o["kind"], "uid": o["uid"]} for o in (task.payload or {}).get("objects", [])]
    return DeliveryView(destination=task.destination, kind=task.kind, state=task.state, attempts=task.attempts,
                        objects=objects, sent=list(task.sent), held=list(task.held), error=task.error,
                        next_attempt_at=_ts(task.next_attempt_at) if task.state == "pending" else None,
                        delivered_at=_ts(task.delivered_at), updated_at=_ts(task.updated_at),
                        history=list(task.history),
                        job_id=task.job_id if with_job else None, held_behind=held_behind)


_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such job, or no delivery of it to that destination"}}


DESTINATIONS_CONFIGURED = "X-Destinations-Configured"
"""The header of a job's deliveries naming how many destinations are configured (the page says "none" then)."""


@router.get("/{job_id}/deliveries", response_model=list[DeliveryView], summary="Deliveries of a job's result",
            responses=_NOT_FOUND)
async def list_deliveries(job_id: str, request: Request, response: Response, store: StoreDep,
                          _: ReadAccess) -> list[DeliveryView]:
    """Each destination the result goes to, with its state, attempts and events; ``X-Destinations-Configured``:
    how many destinations this gateway sends to (0: none, so an empty list will stay empty)."""
    await store.job(checked_job_id(job_id))  # 404
    response.headers[DESTINATIONS_CONFIGURED] = str(len(request.app.state.deliverer.destinations))
    tasks = request.app.state.deliverer.tasks
    held = await tasks.held_behind(job_id)
    return [delivery_view(t, held_behind=held.get(t.destination)) for t in await tasks.of_job(job_id)]


@router.post("/{job_id}/deliveries/{destination}/resend", status_code=202, response_model=DeliveryView,
             summary="Send a job's result to a destination again",
             responses={**_NOT_FOUND, 409: {"description": "being sent, or delivered already (use force=true)"}})
async def resend(job_id: str, destination: str, request: Request, store: StoreDep, _: WriteAccess,
                 force: bool = Query(False, description="send again even if delivered (same UIDs)")) -> JSONResponse:
    """Queue the delivery again now: a failed or skipped one, or a done one with ``force=true``."""
    await store.job(checked_job_id(job_id))  # 404
    deliverer = request.app.state.deliverer
    if destination not in deliverer.destinations:
        raise NotFound(f"No destination {destination[:64]!r} is configured (GET /v1/jobs/{job_id}/deliveries "
                       "lists this job's).")
    try:
        task = await deliverer.tasks.resend(job_id, destination, deliverer.destinations[destination].kind,
                                           force=force)
    except ValueError as exc:
        raise NotResendable(str(exc)) from None
    return JSONResponse(delivery_view(task).model_dump(mode="json"), status_code=202,
                        headers={"Location": f"/v1/jobs/{job_id}/deliveries"})


def _destination(request: Request, destination: str) -> str:
    if destination not in request.app.state.deliverer.destinations:
        raise NotFound(f"No destination {destination[:64]!r} is configured.")
    return destination


@fleet.get("", response_model=list[DeliveryView], summary="Deliveries in one state, across jobs",
           responses={404: {"description": "no such destination"}})
async def deliveries_in_state(
    request: Request, _: ReadAccess,
    state: Literal["pending", "sending", "done", "skipped", "failed"] = Query("failed"),
    destination: str | None = Query(None, max_length=64, description="one destination (default: every one)"),
    limit: int = Query(100, ge=1, le=1000),
) -> list[DeliveryView]:
    """The deliveries in ``state`` (default ``failed``: those that ran out of tries), the latest changed first,
    each with its job: what an outage left undelivered, without reading the logs."""
    if destination is not None:
        _destination(request, destination)
    tasks = await request.app.state.deliverer.tasks.in_state(state, destination, limit)
    return [delivery_view(t, with_job=True) for t in tasks]


@fleet.post("/resend", status_code=202, summary="Send every failed delivery to a destination again",
            responses={404: {"description": "no such destination"}})
async def resend_failed(request: Request, _: WriteAccess,
                        destination: str = Query(..., max_length=64, description="the destination"),
                        limit: int = Query(1000, ge=1, le=10_000)) -> JSONResponse:
    """Queue again the failed deliveries to ``destination`` (the oldest ``limit``): after an outage longer
    than the tries. A reading superseded since is skipped when its turn comes, never sent over the newer one."""
    queued = await request.app.state.deliverer.tasks.resend_failed(_destination(request, destination), limit)
    return JSONResponse({"destination": destination, "queued": queued}, status_code=202,
                        headers={"Location": f"/v1/deliveries?state=pending&destination={destination}"})
