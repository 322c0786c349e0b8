"""Who may read the web page's data: one pluggable dependency, :data:`ReadAccess`.

The page's shell (``/`` and ``/web/static/``) holds no data and is open; every JSON, image and event
route it calls depends on :data:`ReadAccess`. When the gateway has issue 14's authentication
(:mod:`gateway.auth`), that is its ``results:read`` scope: the page sends ``Authorization: Bearer
<OIDC token or API key>`` from its sign-in box on every request (images and the event stream too: they
are fetched, not loaded by ``<img src>`` or ``EventSource``, so no credential ever goes into a URL or
a server log). Without it (or with authentication off on loopback) the routes are open, like the rest
of the API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends

__all__ = ["ReadAccess", "reader"]


async def _open_access() -> None:
    """No authentication in this gateway: every caller may read (as every other route)."""
    return None


def reader() -> Callable[..., Any]:
    """The dependency that guards reads: ``gateway.auth.results_read`` when present, else open."""
    try:
        from gateway.auth import results_read  # issue 14
    except ImportError:
        return _open_access
    return results_read


ReadAccess = Annotated[Any, Depends(reader())]
"""A route parameter: the caller, allowed to read results."""
