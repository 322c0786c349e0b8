"""The web page of the reading room and the ops desk (issue 16): worklist, study viewer, service view.

Plain HTML, CSS and JavaScript modules under ``static/`` (no build step), served by the gateway with the
read routes in :mod:`gateway.web.routes`. :func:`install` is the one hook in
:func:`gateway.main.create_app`.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from gateway.web.routes import STATIC, router

__all__ = ["install"]


def install(app: FastAPI) -> None:
    """Serve the page at ``/``, its files at ``/web/static`` and its read routes."""
    app.include_router(router)
    app.mount("/web/static", StaticFiles(directory=STATIC), name="web-static")
