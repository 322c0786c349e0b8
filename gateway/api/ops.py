"""Operations: ``/healthz`` (the process runs), ``/readyz`` (it takes studies), ``/readyz/triton`` (it can
screen now), ``/metrics``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import BlobsDep, MetricsDep, PoolDep, SettingsDep, StoreDep
from gateway.auth import AUTH_RESPONSES, AdminAccess
from gateway.errors import NotFound
from gateway.screening import in_own_thread
from gateway.store import BlobStore, Store
from gateway.triton_pool import TritonPool

logger = logging.getLogger(__name__)
T = TypeVar("T")

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the gateway process answers")
async def healthz() -> dict[str, str]:
    """Always 200 while the event loop runs."""
    return {"status": "ok"}


async def _once_a_second(request: Request, name: str, ask: Callable[[], Awaitable[T]]) -> T:
    """``ask()``, or its answer of less than a second ago kept in ``app.state.<name>`` (probes come often)."""
    state = request.app.state
    now = time.monotonic()
    cached = getattr(state, name, None)
    if cached is None or now - cached[0] > 1.0:
        cached = (now, await ask())
        setattr(state, name, cached)
    return cast(T, cached[1])


def _one_at_a_time(request: Request, name: str, start: Callable[[], asyncio.Future[T]]) -> asyncio.Future[T]:
    """The check under way, kept in ``app.state.<name>``, or a new one ``start()``s: simultaneous probes share
    one check (await it through :func:`asyncio.shield`: a waiter that gives up does not stop it for the others),
    and a hung one is waited on again, not joined by more."""
    state = request.app.state
    probe = getattr(state, name, None)
    if probe is None or probe.done():
        probe = start()
        setattr(state, name, probe)
    return cast("asyncio.Future[T]", probe)


READY_TRITON_WAIT_S = 0.25
"""How long ``/readyz`` waits for a fresh Triton probe before it answers with the last one."""


async def triton_ready(request: Request, pool: TritonPool, wait_s: float | None = None) -> list[str]:
    """The Triton endpoints with the model ready (asked at most once a second, one probe at a time).

    ``wait_s``: how long to wait for a probe under way; past it, the last probe's answer (none before the
    first), while the probe goes on and keeps its answer for the next call. A paused or unreachable Triton
    (SIGSTOP, a node cut off) answers no probe: each then takes ``CTSCREEN_TRITON_READY_TIMEOUT_S`` (2 s),
    and ``/readyz``, which Triton is no part of, took as long, past the kubelet's probe timeout (1 s then): every
    gateway left its Service and no study was taken while Triton hung."""
    state = request.app.state
    cached = getattr(state, "ready_cache", None)
    if cached is not None and time.monotonic() - cached[0] <= 1.0:
        return list(cached[1])

    async def ask() -> list[str]:
        ready = await pool.ready_endpoints()
        state.ready_cache = (time.monotonic(), ready)
        return ready

    probe = _one_at_a_time(request, "ready_probe", lambda: asyncio.ensure_future(ask()))
    try:
        async with asyncio.timeout(wait_s):
            return list(await asyncio.shield(probe))
    except TimeoutError:
        return [] if cached is None else list(cached[1])


STORE_PROBE_S = 3.0
"""How long readiness waits for the state store's answer."""


async def _store_answers(request: Request, store: Store) -> bool:
    """Whether the state store answers a query within 3 s (asked at most once a second, one query at a time):
    simultaneous probes (the kubelet's, a load balancer's, monitoring's) each queried the database, and piled up
    on it while it was slow, when it could least take them; they share the query under way now."""

    async def ping() -> bool:
        try:
            async with asyncio.timeout(STORE_PROBE_S):
                await store.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means: not ready
            logger.warning("readiness: the state store does not answer (%s)", type(exc).__name__)
            return False
        return True

    async def ask() -> bool:
        return await asyncio.shield(_one_at_a_time(request, "store_probe", lambda: asyncio.ensure_future(ping())))

    return await _once_a_second(request, "store_cache", ask)


BLOBS_PROBE_S = 3.0
"""How long readiness waits for the blob store's answer."""


async def _blobs_writable(request: Request, blobs: BlobStore) -> bool:
    """Whether the blob store takes blobs, said within 3 s (asked at most once a second): a bucket that takes
    connections and never answers, or a hung NFS mount, is not ready, probes never pile up behind it, and the
    hung one does not hold the gateway's shut-down: the probe runs on a daemon thread of its own
    (:func:`gateway.screening.in_own_thread`), where one of the loop's default pool held it (``asyncio.run`` joins that
    pool's threads) until the S3 read timeout, 30 s."""


    async def ask() -> bool:
        probe = _one_at_a_time(request, "blobs_probe", lambda: in_own_thread(blobs.writable, "ctscreen-blobs-probe"))
        try:
            async with asyncio.timeout(BLOBS_PROBE_S):
                return bool(await asyncio.shield(probe))
        except TimeoutError:
            logger.warning("readiness: the blob store does not answer within %g s", BLOBS_PROBE_S)
            return False

    return await _once_a_second(request, "blobs_cache", ask)


READYZ_MAX_S = max(READY_TRITON_WAIT_S, STORE_PROBE_S, BLOBS_PROBE_S)
"""The longest ``/readyz`` takes: its checks run at once, so the slowest one's bound (the chart's readiness probe
gives it more: ``timeoutSeconds``, ``tests/test_helm_chart.py``)."""


@router.get("/readyz", summary="Readiness: the gateway takes studies (state store and blob folder usable)",
            responses={503: {"description": "the state store does not answer, or blobs cannot be written"}})
async def readyz(request: Request, pool: PoolDep, store: StoreDep, blobs: BlobsDep) -> JSONResponse:
    """200 while studies can be accepted: the state store answers and the blob folder can be written.

    Triton is not part of it: while no Triton endpoint is ready (an engine build, a drained GPU node) the
    gateway goes on taking studies, which wait in the store and are screened once one is back. Its state
    is in the body (counts only; the addresses are for ``admin`` callers of ``/v1/service``) and at
    ``/readyz/triton``.
    """
    # at once: a slow but working database and a slow blob store take the slower one's time, not the sum, which
    # passed the probe's timeout and took every replica out of its Service together (READYZ_MAX_S)
    ready_triton, store_ok, blobs_ok = await asyncio.gather(
        triton_ready(request, pool, READY_TRITON_WAIT_S),  # Triton is not waited for
        _store_answers(request, store), _blobs_writable(request, blobs))
    ready = store_ok and blobs_ok
    body = {"ready": ready, "store": store_ok, "blobs": blobs_ok,
            "triton": {"ready_endpoints": len(ready_triton), "endpoints": len(pool.endpoints)}}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/readyz/triton", summary="Readiness to screen now: at least one Triton endpoint has the model ready",
            responses={503: {"description": "no Triton endpoint is ready"}})
async def readyz_triton(request: Request, pool: PoolDep) -> JSONResponse:
    """200 when a Triton endpoint has the model ready, else 503 (what a smoke test or a benchmark waits for)."""
    ready_triton = await triton_ready(request, pool)
    body = {"ready": bool(ready_triton), "ready_endpoints": len(ready_triton), "endpoints": len(pool.endpoints)}
    return JSONResponse(body, status_code=200 if ready_triton else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={**AUTH_RESPONSES, 404: {"description": "served on CTSCREEN_METRICS_PORT instead"}})
async def metrics(metrics: MetricsDep, settings: SettingsDep, _: AdminAccess) -> Response:
    """The gateway's metrics in the Prometheus text format (here unless ``CTSCREEN_METRICS_PORT`` is set).

    On the API port they need ``admin``: they name the Triton endpoints' addresses, which ``/v1/service`` shows
    to admins only (a ``results:read`` key, a reading room's, read them here before): a scraper sends an admin
    key, or scrapes the metrics port instead. On their own port (``CTSCREEN_METRICS_PORT``, the Helm chart's)
    they are open to whoever the network lets reach it."""
    if settings.metrics_port is not None:
        raise NotFound("Metrics are on their own port.")
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
