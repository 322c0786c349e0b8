"""Operations: ``/healthz`` (the process runs), ``/readyz`` (Triton is ready), ``/metrics``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import MetricsDep, PoolDep, SettingsDep
from gateway.errors import NotFound

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the gateway process answers")
async def healthz() -> dict[str, str]:
    """Always 200 while the event loop runs."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: at least one Triton endpoint has the model ready",
            responses={503: {"description": "no Triton endpoint is ready"}})
async def readyz(request: Request, pool: PoolDep) -> JSONResponse:
    """200 when Triton is ready (probed at most once a second), else 503."""
    state = request.app.state
    now = time.monotonic()
    cached = getattr(state, "ready_cache", None)
    if cached is None or now - cached[0] > 1.0:
        ready = await pool.ready_endpoints()
        cached = state.ready_cache = (now, ready)
    ready = cached[1]
    body = {"ready": bool(ready), "endpoints": pool.endpoints, "ready_endpoints": ready}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={404: {"description": "served on CTSCREEN_METRICS_PORT instead"}})
async def metrics(metrics: MetricsDep, settings: SettingsDep) -> Response:
    """The gateway's metrics in the Prometheus text format (here unless ``CTSCREEN_METRICS_PORT`` is set)."""
    if settings.metrics_port is not None:
        raise NotFound("Metrics are on their own port.")
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
