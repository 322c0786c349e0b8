"""Dependencies of the routes (``Annotated`` aliases) and the bounded body reader."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.errors import TooLarge
from gateway.jobs import JobStore
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.stow import StowBuffer
from gateway.triton_pool import TritonPool


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _store(request: Request) -> JobStore:
    return request.app.state.store


def _pool(request: Request) -> TritonPool:
    return request.app.state.pool


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _stow(request: Request) -> StowBuffer:
    return request.app.state.stow


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
PoolDep = Annotated[TritonPool, Depends(_pool)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
StowDep = Annotated[StowBuffer, Depends(_stow)]


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
