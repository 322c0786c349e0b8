"""Wires issue 14's security pieces into the app: one :func:`install` call in :func:`gateway.main.create_app`.

* ``app.state.auth``: :class:`gateway.auth.Authenticator` (routes depend on :func:`gateway.auth.require`);
* ``app.state.admission``: :class:`gateway.admission.Admission` (bodies stream to disk under a budget);
* ``app.state.audit``: :class:`gateway.audit.AuditLog`, written by :class:`gateway.audit.AuditMiddleware`;
* :class:`NoStoreMiddleware`: API answers (results, studies: patient data) say ``Cache-Control: no-store``;
* :func:`start_metrics_port`: ``/metrics`` on its own port when ``CTSCREEN_METRICS_PORT`` is set.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI

from gateway.admission import Admission
from gateway.audit import API_PREFIXES, AuditLog, AuditMiddleware
from gateway.auth import Authenticator, StreamSlots, check_exposure
from gateway.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["NoStoreMiddleware", "install", "start_metrics_port"]


def install(app: FastAPI, settings: Settings) -> None:
    """Check the exposure (auth required off loopback) and attach auth, admission and audit to ``app``.

    Raises
    ------
    gateway.auth.AuthConfigError
        When ``settings.host`` is not loopback and no authentication is configured (nor ``auth_insecure``).
    """
    check_exposure(settings, settings.host)
    app.state.auth = Authenticator.from_settings(settings)
    app.state.admission = Admission(
        settings.upload_budget_bytes, settings.max_uploads_per_client, settings.retry_after_s, settings.upload_tmp_dir,
        client_bytes=settings.upload_client_bytes or max(settings.upload_budget_bytes // 2, settings.max_upload_bytes),
        idle_timeout_s=settings.body_idle_timeout_s,
    )
    app.state.audit = AuditLog.from_settings(settings)
    app.state.stream_slots = StreamSlots(settings.max_streams_per_caller, settings.max_streams)  # event streams
    app.add_middleware(AuditMiddleware, audit=app.state.audit)
    app.add_middleware(NoStoreMiddleware)
    if not app.state.auth.enabled:
        logger.warning("authentication is off: every caller may upload and read results (%s)",
                       "loopback only" if not settings.auth_insecure else "--insecure")


class NoStoreMiddleware:
    """ASGI middleware: an answer under ``/v1/`` or ``/dicomweb/`` without a ``Cache-Control`` of its own
    gets ``Cache-Control: no-store``, so no browser or proxy keeps a result, a report or a study's images
    (patient data). Answers that set their own (an event stream's ``no-cache``, a rendered slice's private
    caching) keep it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIXES):
            await self.app(scope, receive, send)
            return

        async def send_no_store(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"cache-control", b"no-store")]}
            await send(message)

        await self.app(scope, receive, send_no_store)


def start_metrics_port(settings: Settings, registry: Any) -> Any:
    """Serve the metrics on ``settings.metrics_port`` (same address as the API); returns a server to
    ``shutdown()``, or None when the metrics stay on the API port."""
    if settings.metrics_port is None:
        return None
    from prometheus_client import start_http_server

    server, _thread = start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
    logger.info("metrics on %s:%d/metrics", settings.host, settings.metrics_port)
    return server
