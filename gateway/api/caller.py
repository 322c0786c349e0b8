"""``GET /v1/me``: who the caller is as the gateway sees it, and which scopes it may act with.

The web page asks it once per credential and offers only the actions the caller may take (a button whose scope the
credential lacks is disabled, its title naming the scope), where it used to offer every one and answer a 403 after
the click. The credential itself is never in the answer.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gateway.auth import AUTH_RESPONSES, Caller
from gateway.keys import SCOPES

router = APIRouter(prefix="/v1", tags=["auth"])


class CallerView(BaseModel):
    """The caller of ``GET /v1/me``."""

    subject: str = Field(description="an OIDC token's `sub` (else `client_id`, `azp`), `key:NAME` for an API key, "
                                     "`anonymous` on a gateway without authentication (loopback)")
    kind: Literal["oidc", "api_key", "anonymous"] = Field(description="how the caller authenticated")
    scopes: list[str] = Field(description="the scopes the credential grants, as it names them (known ones only)")
    effective_scopes: list[str] = Field(
        description="the scopes the caller may act with: `admin` implies `studies:write` and `results:read`; "
                    "every scope for the anonymous caller of a gateway without authentication")


@router.get("/me", response_model=CallerView, summary="The caller as the gateway sees it: who, and its scopes",
            responses={**{k: AUTH_RESPONSES[k] for k in (401, 429, 503)},  # any good credential: no scope to lack
                       403: {"description": "auth_not_configured: a gateway without authentication, called from off "
                                            "the loopback"}})
async def me(caller: Caller) -> CallerView:
    """Any good credential may ask (no scope needed); without one 401, as every route. Never the credential."""
    return CallerView(subject=caller.subject, kind=caller.kind,
                      scopes=[s for s in SCOPES if s in caller.scopes],
                      effective_scopes=[s for s in SCOPES if caller.has(s)])
