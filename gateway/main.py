"""The gateway application: ``create_app(settings) -> FastAPI``.

The lifespan owns everything with a connection or a thread: the :class:`~gateway.triton_pool.TritonPool`
(one gRPC client per Triton endpoint), the :class:`~gateway.jobs.JobStore` (decode threads, running
jobs) and the STOW-RS trigger; all are made on start-up and closed on shut-down, never at import.

Run it with ``uvicorn --factory gateway.main:app_from_env`` (settings from ``CTSCREEN_*``) or
``ctscreen serve`` (embedded Triton plus the gateway).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ctscreen import __version__
from gateway import security
from gateway.api import dicomweb, errors, jobs, ops, sr, studies
from gateway.jobs import JobStore, Loader
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.stow import StowBuffer
from gateway.triton_pool import ClientFactory, TritonPool

logger = logging.getLogger(__name__)


def make_pool(settings: Settings, client_factory: ClientFactory | None = None) -> TritonPool:
    """The Triton pool the settings describe."""
    return TritonPool(
        settings.triton_urls,
        model_name=settings.triton_model,
        batch_size=settings.triton_batch_size,
        max_inflight=settings.triton_max_inflight,
        timeout_s=settings.triton_timeout_s,
        max_attempts=settings.triton_max_attempts,
        ready_timeout_s=settings.triton_ready_timeout_s,
        default_rate=settings.default_slices_per_second,
        client_factory=client_factory,
    )


def create_app(
    settings: Settings | None = None,
    *,
    client_factory: ClientFactory | None = None,
    loader: Loader | None = None,
) -> FastAPI:
    """Build the gateway.

    Parameters
    ----------
    settings : Settings | None
        Configuration; ``Settings()`` (the environment) when None.
    client_factory : Callable[[str], Any] | None
        Makes the Triton client of an endpoint (unit tests pass a fake; default: real gRPC).
    loader : Callable | None
        Turns uploaded files into a prepared study (default :func:`gateway.ingest.load_study`).
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        pool = make_pool(settings, client_factory)
        store = JobStore(
            pool, metrics,
            max_concurrent_studies=settings.max_concurrent_studies,
            max_queued_studies=settings.max_queued_studies,
            retry_after_s=settings.retry_after_s,
            decode_workers=settings.decode_workers,
            max_finished_jobs=settings.max_finished_jobs,
            job_ttl_s=settings.job_ttl_s,
            results_dir=settings.results_dir,
            loader=loader,
        )
        resumed = store.recover()
        if resumed:
            logger.warning("%d jobs left unfinished by a previous run were resumed or marked failed", resumed)
        stow = StowBuffer(
            store,
            quiet_period_s=settings.stow_quiet_period_s,
            max_pending_studies=settings.stow_max_pending_studies,
            max_pending_bytes=settings.stow_max_pending_bytes,
            spool_dir=None if settings.results_dir is None else settings.results_dir / "stow",
        )
        stow.reload()  # accepted instances a previous run had not screened: screened after the quiet period
        metrics.attach(pool, store.state)
        metrics_server = security.start_metrics_port(settings, metrics.registry)
        app.state.settings, app.state.metrics, app.state.pool = settings, metrics, pool
        app.state.store, app.state.stow = store, stow
        stow.start()
        from gateway.dimse import start_from_settings

        scp = start_from_settings(settings, stow, metrics, audit=app.state.audit)  # None unless CTSCREEN_DICOM_PORT
        app.state.dicom_scp = scp
        from gateway.discovery import start_from_env

        discovery = start_from_env(pool)  # None unless CTSCREEN_TRITON_DISCOVERY asks for it
        logger.info("gateway up: Triton endpoints %s, model %s", pool.endpoints, settings.triton_model)
        try:
            yield
        finally:
            if scp is not None:
                await asyncio.to_thread(scp.stop)
            await stow.close()
            await store.drain(settings.shutdown_grace_s)
            await store.close()
            if discovery is not None:
                await discovery.close()
            await pool.close()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()

    app = FastAPI(
        title="ctscreen gateway",
        version=__version__,
        summary="Chest-CT studies in, COVID-19 pneumonia verdicts out (Chen et al., Sci Rep 2020).",
        lifespan=lifespan,
    )
    security.install(app, settings)  # auth, admission budget, audit trail (issue 14)
    errors.install(app)
    app.include_router(studies.router)
    app.include_router(jobs.router)
    app.include_router(sr.router)
    app.include_router(dicomweb.router)
    app.include_router(ops.router)
    return app


def app_from_env() -> FastAPI:
    """The app configured from ``CTSCREEN_*`` variables (for ``uvicorn --factory``)."""
    return create_app(Settings())
