"""Dependencies of the routes (``Annotated`` aliases) and the bounded body reader."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Query, Request

from gateway.errors import TooLarge
from gateway.jobs import Priority
from gateway.metrics import Metrics
from gateway.screening import Screener
from gateway.settings import Settings
from gateway.store import BlobStore, Store
from gateway.stow import Intake
from gateway.triton_pool import TritonPool
from gateway.worker import Worker


def _state(name: str) -> Callable[[Request], Any]:
    """A dependency returning ``app.state.<name>`` (made by the lifespan)."""

    def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    get.__name__ = f"_{name}"
    return get


SettingsDep = Annotated[Settings, Depends(_state("settings"))]
StoreDep = Annotated[Store, Depends(_state("store"))]
PoolDep = Annotated[TritonPool, Depends(_state("pool"))]
MetricsDep = Annotated[Metrics, Depends(_state("metrics"))]
StowDep = Annotated[Intake, Depends(_state("stow"))]
BlobsDep = Annotated[BlobStore, Depends(_state("blobs"))]
ScreenerDep = Annotated[Screener, Depends(_state("screener"))]
WorkerDep = Annotated[Worker, Depends(_state("worker"))]
PriorityQuery = Annotated[Priority, Query(
    description="urgent: screened before every routine and low study waiting (an emergency); low: after them. "
                "Within one priority, the oldest first.")]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with :class:`~gateway.errors.TooLarge` (413) past ``limit`` bytes.

    A declared Content-Length over the limit is refused before anything is read.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"Request body is {int(declared)} bytes; the limit is {limit}.")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise TooLarge(f"Request body is over the limit of {limit} bytes.")
    return bytes(buf)
