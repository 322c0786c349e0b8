"""The web page of the reading room and the ops desk (issue 16): worklist, study viewer, service view.

Plain HTML, CSS and JavaScript modules under ``static/`` (no build step), served by the gateway with the
read routes in :mod:`gateway.web.routes`. :func:`install` is the one hook in
:func:`gateway.main.create_app`.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from gateway.web.routes import STATIC, router

__all__ = ["SecurityHeaders", "install", "page_csp"]


def page_csp(html: str) -> str:
    """The page's Content-Security-Policy: its own files only, and its inline scripts by their hash.

    >>> page_csp("<script>go()</script>").split("; ")[1]
    "script-src 'self' 'sha256-5KYv+PUboo5h+0+YAtGRPbwv5d/QxzHslP4YGnUaxRw='"
    """
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                      for body in re.findall(r"<script>(.*?)</script>", html, re.S))
    return ("default-src 'self'; " + f"script-src 'self' {hashes}".strip() + "; style-src 'self'; "
            "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")


class SecurityHeaders:
    """ASGI middleware: headers every answer gets (no MIME sniffing, no framing, no Referer), and the
    Content-Security-Policy of the page on the page and its files; the API's answers get one that allows
    nothing (a JSON or PNG answer opened as a page runs nothing). The tab holds the reader's credential.
    ``/docs`` and ``/redoc`` load Swagger UI and ReDoc from their CDN: no policy there."""

    def __init__(self, app: Any, page_policy: str) -> None:
        self.app = app
        common = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                  (b"x-frame-options", b"DENY")]
        self._page = [*common, (b"content-security-policy", page_policy.encode())]
        # the page's modules are asked for again each time (a 304 by their ETag): without it the browser
        # guessed them fresh from their age and ran an upgraded index.html with the old worklist.js
        self._static = [*self._page, (b"cache-control", b"no-cache")]
        self._api = [*common, (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")]
        self._docs = common

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        extra = (self._static if path.startswith("/web/static/") else self._page if path == "/" or path.startswith("/web/")
                 else self._docs if path.startswith(("/docs", "/redoc")) else self._api)

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                message = {**message, "headers": headers + [(k, v) for k, v in extra if k not in present]}
            await send(message)

        await self.app(scope, receive, send_wrapper)


def install(app: FastAPI) -> None:
    """Serve the page at ``/``, its files at ``/web/static`` and its read routes, with their headers."""
    app.include_router(router)
    app.mount("/web/static", StaticFiles(directory=STATIC), name="web-static")
    app.add_middleware(SecurityHeaders, page_policy=page_csp((STATIC / "index.html").read_text()))
