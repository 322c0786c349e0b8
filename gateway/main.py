"""The gateway application: ``create_app(settings) -> FastAPI``.

The lifespan owns everything with a connection or a thread: the :class:`~gateway.triton_pool.TritonPool`
(one gRPC client per Triton endpoint), the state store (:class:`~gateway.store.Store`, schema upgraded
at start unless ``CTSCREEN_DB_MIGRATE=false``) and the blob store, the screening function (decode
threads), the worker that claims jobs and the sweeper; all are made on start-up and closed on
shut-down, never at import. The app holds no job in memory: any replica on the same database and
blob folder answers for every job.

Run it with ``uvicorn --http gateway.httpserver:BoundedHttpToolsProtocol --factory gateway.main:app_from_env``
(settings from ``CTSCREEN_*``; the ``--http`` protocol bounds a request's head) or ``ctscreen serve`` (embedded
Triton plus the gateway).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI
from pydantic import ValidationError

from aggregator.case import CaseRule
from ctscreen import __version__
from ctscreen.embedded import apply_malloc_policy
from gateway import security
from gateway.api import caller, deliveries, dicomweb, errors, jobs, ops, sr, studies
from gateway.auth import AuthConfigError
from gateway.logs import RequestIds, configure
from gateway.metrics import Metrics
from gateway.phi import RequestScope, protect_logs
from gateway.screening import Loader, Screener
from gateway.settings import Settings, setting_error, unknown_variables
from gateway.store import Store, StoreUnreachable, redact
from gateway.store.migrate import SchemaError, prepare_schema
from gateway.store.pairing import StorePairingError, check_pairing_now, checked_pairing
from gateway.stow import Intake, Watermark
from gateway.triton_pool import ClientFactory, TritonPool
from gateway.web import install as install_web
from gateway.worker import Sweeper, Worker

logger = logging.getLogger(__name__)

GC_GEN0_THRESHOLD = 50_000
"""Allocations between two youngest-generation collections while the gateway runs (Python's default: 700)."""


@contextmanager
def tuned_gc(on: bool = True) -> Iterator[None]:
    """While open (and ``on``): the heap built so far is frozen out of the cyclic collector (``gc.freeze``)
    and the youngest generation is collected every :data:`GC_GEN0_THRESHOLD` allocations; both are undone
    on exit.

    Parsing a study's DICOM headers allocates millions of short-lived objects; with Python's defaults
    the collector ran hundreds of times per study, each time walking the start-up heap (FastAPI,
    SQLAlchemy, pydicom's dictionaries): about 5 % of the gateway's CPU on a 300-slice study
    (``perf``, docs/gateway.md). Cycles are still collected, only less often.

    >>> before = gc.get_threshold()
    >>> with tuned_gc():
    ...     gc.get_threshold()[0], gc.get_freeze_count() > 0
    (50000, True)
    >>> gc.get_threshold() == before, gc.get_freeze_count()
    (True, 0)
    """
    if not on:
        yield
        return
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def tune_malloc(on: bool = True) -> dict[str, int]:
    """Give the gateway's process Triton's glibc malloc policy (``CTSCREEN_MALLOC_TUNING``, on by default):
    :func:`ctscreen.embedded.apply_malloc_policy`, at the start of the process's gateway (``app_from_env``,
    ``ctscreen serve``), never by :func:`create_app` (a library caller's process is its own). Returns what was set.

    Decoding a slice allocates arrays of 512 KiB and more; with glibc's defaults each is a fresh mmap, unmapped
    when freed, whose pages the kernel zero-fills again at the next slice (docs/gateway.md, "glibc's malloc").
    """
    if not on:
        return {}
    done = apply_malloc_policy()
    if done:
        logger.info("glibc malloc policy of the gateway's process: %s", " ".join(f"{k}={v}" for k, v in done.items()))
    return done


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


def case_rule(settings: Settings) -> CaseRule:
    """The case rule of the settings (``CTSCREEN_CASE_*``); a limit of 0 is no limit (None)."""
    return CaseRule(run_slices=settings.case_run_slices, run_mm=settings.case_run_mm,
                    min_lung_field_cm2=settings.case_min_lung_field_cm2 or None,
                    min_body_cm2=settings.case_min_body_cm2 or None)


def create_app(
    settings: Settings | None = None,
    *,
    client_factory: ClientFactory | None = None,
    loader: Loader | None = None,
    start_checked: bool = False,
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
    start_checked : bool
        The caller has upgraded and checked the schema (:func:`gateway.store.migrate.prepare_schema`) and
        checked that the blob store is the database's (:func:`gateway.store.pairing.check_pairing_now`), each
        failure said in one line; otherwise the start does both (``CTSCREEN_DB_MIGRATE``), and a schema it
        cannot run on or a blob store that is not the database's fails it.
    """
    settings = settings or Settings()
    protect_logs()  # no header value (a malformed birth date ...) in pydicom's log records

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        database = settings.database()
        if not start_checked:  # what app_from_env and the CLI do before the server starts
            try:
                await asyncio.to_thread(prepare_schema, database, settings.db_migrate, settings.db_start_wait_s)
            except SchemaError as exc:  # behind this release, or never migrated: say what to run, then stop
                logger.error("%s", exc)
                raise
        store = Store(database)
        blobs = settings.blob_store()
        if not start_checked:  # a blob folder not mounted, a mistyped database URL: refused before anything is accepted
            try:
                await checked_pairing(store, blobs)
            except StorePairingError as exc:
                logger.error("%s", exc)
                await store.close()
                raise
        store.listen()  # PostgreSQL: other replicas' job events wake this one's worker and SSE streams
        logger.info("state store %s, blobs in %s, replica %s", redact(database), blobs.root, store.owner)
        pool = make_pool(settings, client_factory)
        rule = case_rule(settings)
        screener = Screener(pool, metrics, decode_workers=settings.decode_workers, rule=rule, loader=loader)
        worker = Worker(store, blobs, screener, settings)
        from gateway.delivery.deliverer import Deliverer

        deliverer = Deliverer(store, blobs, settings.destinations(), settings, metrics.registry)
        sweeper = Sweeper(store, blobs, settings, before_expire=deliverer.expire, metrics=metrics)
        # the backlog this gateway counts (its share of the cluster's, as in ctscreen_backlog_slices) and
        # the blob volume's free space (with an S3 bucket: the data folder's, where uploads are spooled), for
        # C-STORE and STOW-RS alike
        watermark = Watermark(backlog=lambda: sweeper.counts[2], max_backlog_slices=settings.dicom_max_backlog_slices,
                              disk=settings.data_dir if settings.blob_url else settings.blobs(),
                              min_free_bytes=settings.dicom_min_free_bytes)
        intake = Intake(store, blobs, max_pending_studies=settings.stow_max_pending_studies,
                        max_pending_bytes=settings.stow_max_pending_bytes, deadline_s=settings.job_deadline_s,
                        watermark=watermark)
        metrics.attach(pool, lambda: sweeper.counts)
        metrics_server = security.start_metrics_port(settings, metrics.registry)
        app.state.settings, app.state.metrics, app.state.pool = settings, metrics, pool
        app.state.sweeper = sweeper
        app.state.store, app.state.blobs, app.state.stow = store, blobs, intake
        app.state.screener, app.state.worker, app.state.deliverer = screener, worker, deliverer
        try:
            await sweeper.sweep()  # studies left quiet while no replica ran are screened now
        except StoreUnreachable as exc:  # a fail-over under way, a read-only standby: not ready until it answers
            logger.warning("start-up sweep: %s The sweeper tries again every %g s; /readyz says 503 meanwhile.",
                           exc, settings.sweep_interval_s)
        sweeper.start()
        worker.start()
        deliverer.start()  # nothing without destinations
        from gateway.dimse import start_from_settings

        scp = start_from_settings(settings, intake, metrics, audit=app.state.audit)  # None unless CTSCREEN_DICOM_PORT
        app.state.dicom_scp = scp
        from gateway.discovery import start_discovery

        discovery = start_discovery(settings, pool)  # None unless CTSCREEN_TRITON_DISCOVERY asks for it
        logger.info("gateway up: Triton endpoints %s, model %s", pool.endpoints, settings.triton_model)

        def drain() -> None:  # in the event loop
            if app.state.draining.is_set():
                return
            app.state.draining.set()  # event streams end (gateway.auth.stream_slot)
            worker.stop_claiming()
            deliverer.stop_claiming()
            logger.info("draining: no new job or delivery is claimed, event streams are closed (their clients "
                        "follow on another replica); running jobs finish")

        loop = asyncio.get_running_loop()
        app.state.drain = lambda: loop.call_soon_threadsafe(drain)  # from any thread (ctscreen serve's)
        restore = drain_on_signals(app.state.drain)
        try:
            with tuned_gc(settings.gc_tuning):
                yield
        finally:
            restore()
            drain()
            if scp is not None:
                await asyncio.to_thread(scp.stop)
            # the sweeper first: once the worker has released this replica's jobs to the others, a sweep
            # here would adopt them back for a replica about to go (and no live one would count them)
            await sweeper.stop()
            # both at once, each within the grace: studies being screened and results being sent finish
            stopped = await asyncio.gather(worker.stop(settings.shutdown_grace_s),
                                           deliverer.stop(settings.shutdown_grace_s), return_exceptions=True)
            for failure in stopped:
                if isinstance(failure, BaseException):
                    raise failure
            screener.close()
            if discovery is not None:
                await discovery.close()
            await pool.close()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            await store.close()

    app = FastAPI(
        title="ctscreen gateway",
        version=__version__,
        summary="Chest-CT studies in, COVID-19 pneumonia verdicts out (Chen et al., Sci Rep 2020).",
        lifespan=lifespan,
        openapi_url="/openapi.json" if settings.api_docs else None,
        docs_url="/docs" if settings.api_docs and settings.api_docs_pages else None,
        redoc_url="/redoc" if settings.api_docs and settings.api_docs_pages else None,
    )
    app.state.draining = asyncio.Event()  # set on SIGTERM (drain_on_signals) and at shut-down
    app.state.drain = lambda: None  # until the lifespan has started
    errors.install(app)  # first: its last-resort middleware sits inside the audit trail's
    security.install(app, settings)  # auth, admission budget, audit trail (issue 14)
    app.add_middleware(RequestScope)  # around the routes: the access log names a refused request by its route's template
    app.include_router(studies.router)
    app.include_router(jobs.router)
    app.include_router(sr.router)
    app.include_router(deliveries.router)
    app.include_router(deliveries.fleet)
    app.include_router(dicomweb.router)
    app.include_router(ops.router)
    app.include_router(caller.router)
    install_web(app)  # the page at /, its files and read routes (issue 16)
    app.add_middleware(RequestIds)  # the outermost: every answer, errors included, says its request's id
    return app


def drain_on_signals(drain: Callable[[], object]) -> Callable[[], None]:
    """Call ``drain`` on SIGTERM and SIGINT before the handler already there (uvicorn's, which begins its own
    shut-down); returns what puts that handler back. Only in the main thread, and only over a handler that
    is a function (signals go to the main thread: elsewhere, as in ``ctscreen serve``, its caller drains).

    uvicorn runs the lifespan's shut-down only once every connection has closed or its graceful timeout
    (the chart's 60 s) is over: until then the worker went on claiming jobs (which the shut-down then cut
    off for another replica to screen again) and every event stream (a browser's worklist, ``ctscreen
    screen`` following its job) held the process open to that timeout.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    before = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if not callable(handler):
            continue

        def on_signal(signum: int, frame: object, handler: Callable[..., object] = handler) -> None:
            drain()
            handler(signum, frame)

        before[sig] = handler
        signal.signal(sig, on_signal)

    def restore() -> None:
        for sig, handler in before.items():
            signal.signal(sig, handler)

    return restore


def app_from_env() -> FastAPI:
    """The app configured from ``CTSCREEN_*`` variables (for ``uvicorn --factory``, as the Helm chart runs it).

    A bad setting stops the process at start with one line naming its variable, not a traceback.
    """
    try:
        settings = Settings()
    except ValidationError as exc:
        raise SystemExit(f"ctscreen gateway: {setting_error(exc)}") from None
    configure(settings.log_format)  # uvicorn has set up its loggers by now: JSON lines if asked, ids on each record

    def stop(message: str) -> SystemExit:
        """The process's end in one line: as it was, or a JSON line (CRITICAL) when the log is JSON."""
        if settings.log_format != "json":
            return SystemExit(f"ctscreen gateway: {message}")
        logger.critical("ctscreen gateway: %s", message)
        return SystemExit(1)

    for line in unknown_variables(os.environ):
        logger.warning("ctscreen gateway: %s", line)
    tune_malloc(settings.malloc_tuning)
    try:
        app = create_app(settings, start_checked=True)
    except AuthConfigError as exc:  # no auth off loopback, an unreadable API key file
        raise stop(str(exc)) from None
    try:  # before uvicorn runs the lifespan: its failure would be logged as a traceback
        prepare_schema(settings.database(), settings.db_migrate, settings.db_start_wait_s)
        check_pairing_now(settings.database(), settings.blob_store())
    except (SchemaError, StorePairingError) as exc:
        raise stop(str(exc)) from None
    return app
