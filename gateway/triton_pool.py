"""The one Triton boundary of the gateway: batches of HU slices out, boxes back, over gRPC.

:class:`TritonPool` holds one ``tritonclient.grpc.aio`` client per Triton endpoint and fans the
slices of a study out to them:

* slices travel as binary INT16 tensors ``[B, 1, 512, 512]``, ``batch_size`` slices per request;
* at most ``max_inflight`` requests are in flight per endpoint, and each request goes to the endpoint
  with the fewest requests in flight (ties: the one picked least recently);
* a study keeps at most twice the healthy endpoints' room of its batches waiting for a slot (the next
  is sent as one comes back), so an answer wakes a few waiters, not every batch of every study;
* every call carries a deadline (``timeout_s``);
* every call carries its study's priority (a Triton priority level, :data:`ctscreen.contracts.PRIORITY_LEVELS`):
  a batch of a more urgent study takes the next free slot before the waiting batches of less urgent ones, here,
  and the batchers of the ensemble's models schedule it before the requests of lower levels waiting there (from
  every replica);
* a request that fails with ``UNAVAILABLE``, a deadline or another transport error is retried on
  another endpoint, up to ``max_attempts`` tries; the failing endpoint rests for an exponential
  back-off and then takes one request at a time until one succeeds (a half-open circuit breaker);
* waiting for room on a busy, healthy endpoint has no deadline (its requests have theirs); waiting
  while no endpoint is healthy gives up after ``timeout_s``;
* a slice's result is recorded exactly once: only the attempt that succeeds is kept, and the
  per-endpoint counters (:attr:`TritonPool.slice_counts`) count slices that came back;
* :meth:`TritonPool.set_endpoints` adds and removes endpoints at run time (runtime discovery); a removed
  endpoint finishes the requests it holds and is then closed.

No grpc or tritonclient type leaves this module: failures become :class:`InferenceUnavailable`
(no endpoint could serve the batch: HTTP 503) or :class:`InferenceFailed` (Triton refused the request).

Errors (defined in the gateway's one tree, :mod:`gateway.errors`)::

    GatewayError
    ├── Unavailable
    │   └── InferenceUnavailable   reason "triton_unavailable"   503, Retry-After
    └── InferenceFailed            reason "inference_failed"     502
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctscreen.contracts import (
    BOX_COUNT,
    DEFAULT_PRIORITY_LEVEL,
    ENSEMBLE_MODEL,
    HU_SLICES,
    LESION_BOXES,
    SLICE_SIZE,
    VALID_AREA_BOX,
)
from ctscreen.postprocess import unpack_outputs
from gateway.errors import InferenceFailed, InferenceUnavailable

logger = logging.getLogger(__name__)

#: gRPC status codes after which a request is tried again on another endpoint.
RETRYABLE = frozenset(
    {
        "StatusCode.UNAVAILABLE",
        "StatusCode.DEADLINE_EXCEEDED",
        "StatusCode.CANCELLED",
        "StatusCode.RESOURCE_EXHAUSTED",
        "StatusCode.ABORTED",
        "StatusCode.UNKNOWN",
        "StatusCode.INTERNAL",
        "StatusCode.NOT_FOUND",
    }
)
#: Codes that mean the endpoint itself is unhealthy (it rests for a back-off before the next pick).
_UNHEALTHY = frozenset({"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.NOT_FOUND"})


@dataclass(frozen=True, slots=True)
class SliceOutput:
    """What Triton found on one slice (512-pixel grid), as :func:`ctscreen.postprocess.unpack_outputs` unpacks it.

    Attributes
    ----------
    boxes : np.ndarray
        float32 ``[N, 5]`` lesion boxes ``(x0, y0, x1, y1, score)``.
    valid_area : np.ndarray
        float32 ``[4]`` valid-area box, all ``-1`` when empty.
    endpoint : str
        The endpoint that answered.
    """

    boxes: np.ndarray
    valid_area: np.ndarray
    endpoint: str


@dataclass(slots=True)
class InferStats:
    """What the requests of one :meth:`TritonPool.infer` cost on the gateway's side (answered tries only).

    Attributes
    ----------
    requests, slices : int
        Requests answered and the slices in them.
    roundtrip_s : float
        Seconds from sending each request to its answer, summed over the requests (they overlap when
        several are in flight): gRPC, Triton's queue and compute.
    unpack_s : float
        Seconds spent turning the answers into :class:`SliceOutput` (the gateway's post-processing).
    """

    requests: int = 0
    slices: int = 0
    roundtrip_s: float = 0.0
    unpack_s: float = 0.0

    def add(self, other: InferStats) -> None:
        """Count ``other``'s requests here too."""
        self.requests += other.requests
        self.slices += other.slices
        self.roundtrip_s += other.roundtrip_s
        self.unpack_s += other.unpack_s


def _without(exc: BaseException, url: str) -> str:
    """``exc``'s text with the endpoint's address taken out (tritonclient names it in some errors)."""
    text = str(exc)
    host = url.rsplit(":", 1)[0] if ":" in url else url
    for part in {url, host} - {""}:
        text = text.replace(part, "<endpoint>")
    return text


@dataclass(slots=True)
class _Endpoint:
    url: str
    client: Any = None
    inflight: int = 0
    slices_done: int = 0
    requests_done: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    down_until: float = 0.0
    last_pick: float = 0.0
    removed: bool = False
    # throughput estimate: slices finished over time with at least one request in flight
    busy_s: float = 0.0
    busy_slices: int = 0
    t_mark: float = field(default_factory=time.monotonic)
    rate: float | None = None


ClientFactory = Callable[[str], Any]


def _grpc_client(url: str) -> Any:
    from gateway.triton_client import TritonClient

    return TritonClient(url=url)


def _status(exc: BaseException | None) -> str:
    status = getattr(exc, "status", None)
    value = status() if callable(status) else status
    return str(value) if value else "StatusCode.UNKNOWN"


class TritonPool:
    """Fan slices out to a set of Triton endpoints over gRPC.

    Parameters
    ----------
    endpoints : Iterable[str]
        ``host:port`` of each Triton gRPC endpoint (may be empty; see :meth:`set_endpoints`).
    model_name : str
        The ensemble to call.
    batch_size : int
        Slices per request.
    max_inflight : int
        Requests in flight per endpoint.
    timeout_s : float
        Deadline of every call, and the longest a batch waits for a free endpoint per try.
    max_attempts : int
        Tries per batch before :class:`InferenceUnavailable`.
    default_rate : float
        Slices per second assumed for an endpoint until one is measured.
    client_factory : Callable[[str], Any] | None
        Makes the client of an endpoint; defaults to :class:`gateway.triton_client.TritonClient`
        (``tritonclient.grpc.aio.InferenceServerClient`` sending tensors without protobuf copies).
        Unit tests pass a fake here.
    """

    def __init__(
        self,
        endpoints: Iterable[str] = (),
        *,
        model_name: str = ENSEMBLE_MODEL,
        batch_size: int = 4,
        max_inflight: int = 3,
        timeout_s: float = 30.0,
        max_attempts: int = 6,
        ready_timeout_s: float = 2.0,
        default_rate: float = 15.0,
        client_factory: ClientFactory | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f'Argument "batch_size" must be >= 1, got {batch_size}.')
        if max_inflight < 1:
            raise ValueError(f'Argument "max_inflight" must be >= 1, got {max_inflight}.')
        if timeout_s <= 0:
            raise ValueError(f'Argument "timeout_s" must be > 0, got {timeout_s}.')
        if max_attempts < 1:
            raise ValueError(f'Argument "max_attempts" must be >= 1, got {max_attempts}.')
        self.model_name = model_name
        self.batch_size = batch_size
        self.max_inflight = max_inflight
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.ready_timeout_s = ready_timeout_s
        self.default_rate = default_rate
        self._factory = client_factory or _grpc_client
        self._eps: dict[str, _Endpoint] = {}
        self._retired: list[_Endpoint] = []
        self._cond: asyncio.Condition | None = None
        self._pending_slices = 0
        self._waiting: dict[object, tuple[int, set[str]]] = {}  # batches waiting in _acquire: level, tried
        self.retries = 0
        self.set_endpoints(endpoints)

    # --- endpoints ---------------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        """The endpoints in use, in the order they were added."""
        return [url for url, ep in self._eps.items() if not ep.removed]

    def set_endpoints(self, ready: Iterable[str]) -> None:
        """Use exactly the endpoints in ``ready`` from now on.

        New endpoints are used for the next request; an endpoint no longer listed takes no new
        request, finishes those it holds and is then closed. Counters of every endpoint ever used
        stay in :attr:`slice_counts`.
        """
        wanted = list(dict.fromkeys(u.strip() for u in ready if u and u.strip()))
        for url in wanted:
            ep = self._eps.get(url)
            if ep is None:
                self._eps[url] = _Endpoint(url)
                logger.info("Triton endpoint added: %s", url)
            elif ep.removed:
                ep.removed = False
                ep.down_until = 0.0
                logger.info("Triton endpoint back: %s", url)
        for url, ep in self._eps.items():
            if url not in wanted and not ep.removed:
                ep.removed = True
                logger.info("Triton endpoint removed: %s", url)
        self._notify_soon()

    def _notify_soon(self) -> None:
        cond = self._cond
        if cond is None:
            return

        async def _wake() -> None:
            async with cond:
                cond.notify_all()

        try:
            asyncio.get_running_loop().create_task(_wake())
        except RuntimeError:  # no running loop: nobody can be waiting
            pass

    def window(self) -> int:
        """How many batches one :meth:`infer` keeps sent at once: twice the healthy endpoints' room (at
        least 2), so that an answer's slot is taken at once without every batch of a study waiting for it."""
        now = time.monotonic()
        room = sum(self.max_inflight for ep in self._eps.values() if not ep.removed and ep.down_until <= now)
        return max(2, 2 * room)

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    def _client(self, ep: _Endpoint) -> Any:
        if ep.client is None:
            ep.client = self._factory(ep.url)
        return ep.client

    # --- statistics --------------------------------------------------------------------------
    @property
    def slice_counts(self) -> dict[str, int]:
        """Slices answered by each endpoint ever used (a slice is counted once, by its answerer)."""
        return {url: ep.slices_done for url, ep in self._eps.items()}

    @property
    def pending_slices(self) -> int:
        """Slices handed to :meth:`infer` and not yet answered."""
        return self._pending_slices

    @property
    def inflight_requests(self) -> int:
        """Requests on the wire now, over all endpoints."""
        return sum(ep.inflight for ep in self._eps.values())

    def rates(self) -> dict[str, float]:
        """Measured slices per second of each live endpoint (``default_rate`` until measured)."""
        return {
            url: (ep.rate if ep.rate is not None else self.default_rate)
            for url, ep in self._eps.items()
            if not ep.removed
        }

    def measured_rates(self) -> dict[str, float]:
        """Measured slices per second of the live endpoints that have been measured (none assumed)."""
        return {url: ep.rate for url, ep in self._eps.items() if not ep.removed and ep.rate is not None}

    def capacity(self) -> float:
        """Slices per second the live endpoints are expected to deliver together."""
        return sum(self.rates().values())

    def _mark(self, ep: _Endpoint, delta: int, slices: int = 0) -> None:
        now = time.monotonic()
        if ep.inflight > 0:
            ep.busy_s += now - ep.t_mark
        ep.t_mark = now
        ep.inflight += delta
        ep.busy_slices += slices
        if ep.busy_s >= 2.0 and ep.busy_slices > 0:
            measured = ep.busy_slices / ep.busy_s
            ep.rate = measured if ep.rate is None else 0.7 * ep.rate + 0.3 * measured
            ep.busy_s, ep.busy_slices = 0.0, 0

    # --- readiness ---------------------------------------------------------------------------
    async def _probe(self, ep: _Endpoint) -> bool:
        """Whether ``ep``'s server and model are ready now (each call within ``ready_timeout_s``)."""
        try:
            client = self._client(ep)
            t = self.ready_timeout_s
            return bool(
                await client.is_server_ready(client_timeout=t)
                and await client.is_model_ready(self.model_name, client_timeout=t)
            )
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            logger.debug("readiness probe of %s failed: %s", ep.url, exc)
            return False

    async def ready_endpoints(self) -> list[str]:
        """The live endpoints whose server and model are ready now (probes carry a deadline)."""
        live = [ep for ep in self._eps.values() if not ep.removed]
        oks = await asyncio.gather(*(self._probe(ep) for ep in live))
        return [ep.url for ep, ok in zip(live, oks, strict=True) if ok]

    async def is_ready(self) -> bool:
        """True when at least one endpoint has the model ready, as soon as one says so: a paused endpoint (its
        probe waits out ``ready_timeout_s``) held every idle claim of the worker that long, though another was
        ready."""
        probes = [asyncio.ensure_future(self._probe(ep)) for ep in self._eps.values() if not ep.removed]
        try:
            for answer in asyncio.as_completed(probes):
                if await answer:
                    return True
            return False
        finally:
            for probe in probes:
                probe.cancel()
            await asyncio.gather(*probes, return_exceptions=True)

    async def model_version(self) -> str | None:
        """Version of the ensemble on the first ready endpoint (``None`` if none answers)."""
        for ep in [e for e in self._eps.values() if not e.removed]:
            try:
                meta = await self._client(ep).get_model_metadata(
                    self.model_name, client_timeout=self.ready_timeout_s
                )
                versions = list(getattr(meta, "versions", []) or [])
                return str(versions[-1]) if versions else None
            except Exception as exc:  # noqa: BLE001
                logger.debug("metadata of %s failed: %s", ep.url, exc)
        return None

    async def inference_statistics(self) -> dict[str, dict[str, int]]:
        """Triton's own cumulative statistics per model, summed over the live endpoints that answer.

        ``{model: {"inferences", "queue_ns", "compute_ns", "success_ns", "exec_slices", "exec_compute_ns"}}``:
        slices inferred (batch items), and nanoseconds summed over requests waiting in the queue,
        computing (input, infer and output) and from arrival to answer; ``exec_*`` sum the executions
        instead (a dynamic batch of several requests counted once, with the slices it held). The
        counters are per model, not per request: the difference of two readings covers every request
        in between, whoever sent it. Empty when no endpoint answers.
        """
        total: dict[str, dict[str, int]] = {}
        for ep in [e for e in self._eps.values() if not e.removed]:
            try:
                stats = await self._client(ep).get_inference_statistics(
                    as_json=True, client_timeout=self.ready_timeout_s)
            except Exception as exc:  # noqa: BLE001 - statistics are a nicety, never a failure
                logger.debug("statistics of %s failed: %s", ep.url, exc)
                continue
            for model in stats.get("model_stats", []) if isinstance(stats, dict) else []:
                st = model.get("inference_stats", {})

                def ns(*keys: str, st: dict[str, Any] = st) -> int:
                    return sum(int(st.get(k, {}).get("ns", 0) or 0) for k in keys)

                row = total.setdefault(str(model.get("name", "")), dict.fromkeys(
                    ("inferences", "queue_ns", "compute_ns", "success_ns", "exec_slices", "exec_compute_ns"), 0))
                row["inferences"] += int(model.get("inference_count", 0) or 0)
                row["queue_ns"] += ns("queue")
                row["compute_ns"] += ns("compute_input", "compute_infer", "compute_output")
                row["success_ns"] += ns("success")
                for b in model.get("batch_stats", []) or []:
                    row["exec_slices"] += int(b.get("batch_size", 0) or 0) * int(
                        b.get("compute_infer", {}).get("count", 0) or 0)
                    row["exec_compute_ns"] += ns("compute_input", "compute_infer", "compute_output", st=b)
        return total

    async def model_description(self) -> tuple[str | None, dict[str, dict[str, str]]]:
        """How Triton serves the called model, and the provenance of its ONNX graphs, from one read of its
        configuration: ``(platform, models)``.

        ``platform`` is ``ensemble``, or the model's backend (``python`` for the cpu profile's fused
        model). ``models`` comes from the ``models`` config parameter, where ``ctscreen repo build``
        writes ``{"lesion": {"version": ..., "sha256": ...}, ...}`` (the model cards' versions and the
        ONNX files' sha256) in the ensemble's config and in the fused model's. ``(None, {})`` when no
        endpoint answers; ``models`` is empty when the repository was not rendered by ctscreen.
        """
        for ep in [e for e in self._eps.values() if not e.removed]:
            try:
                cfg = await self._client(ep).get_model_config(
                    self.model_name, as_json=True, client_timeout=self.ready_timeout_s
                )
            except Exception as exc:  # noqa: BLE001
                logger.debug("config of %s failed: %s", ep.url, exc)
                continue
            cfg = cfg.get("config", cfg)
            platform = str(cfg.get("platform") or cfg.get("backend") or "") or None
            raw = (cfg.get("parameters", {}).get("models", {}) or {}).get("string_value")
            try:
                models = json.loads(raw) if raw else {}
            except ValueError:
                logger.warning("model %s has an unreadable 'models' parameter", self.model_name)
                return platform, {}
            return platform, {str(k): {str(a): str(b) for a, b in v.items()} for k, v in models.items()
                              if isinstance(v, dict)}
        return None, {}

    # --- scheduling --------------------------------------------------------------------------
    async def _acquire(self, tried: set[str], priority: int = 0) -> _Endpoint:
        """The least-loaded healthy endpoint with room, preferring ones not in ``tried``.

        A batch of priority level ``priority`` (0: the default level) leaves a free slot to the batches of
        more urgent levels waiting here (1 is the most urgent) that would take it (:meth:`_overtaken`), so an
        urgent study's batches overtake the routine ones already waiting; it looks again when one of them has
        taken a slot or given up, and at the next answer (every answer wakes the waiters).

        Waiting for room on a busy but healthy endpoint has no deadline (the requests it holds have theirs,
        so room comes); waiting while no endpoint is healthy (all resting after failures, removed, or none
        configured) gives up after ``timeout_s``.
        """
        level = priority or DEFAULT_PRIORITY_LEVEL
        me = object()
        self._waiting[me] = (level, tried)
        taken = False
        try:
            ep = await self._acquire_at(tried, level)
            taken = True
            return ep
        finally:
            del self._waiting[me]
            if not taken and self._holds_back(level):
                self._notify_soon()  # given up (cancelled): the slots it was left go to the batches it held back

    def _room(self, tried: set[str], healthy: list[_Endpoint]) -> list[_Endpoint]:
        """The endpoints with a free slot that a batch which tried ``tried`` takes one of: the healthy ones it
        has not tried (all healthy ones when it tried them all); an endpoint that failed lately is on probation,
        one request at a time until one succeeds. ``healthy``: the endpoints neither removed nor resting now."""
        pool = [ep for ep in healthy if ep.url not in tried] or healthy
        return [ep for ep in pool if ep.inflight < (1 if ep.consecutive_failures else self.max_inflight)]

    def _overtaken(self, level: int, healthy: list[_Endpoint]) -> bool:
        """Whether a batch of a more urgent level than ``level`` waits here that would take a free slot now. One
        that waits for another endpoint (it tried the free ones; the one it waits for is full or on probation)
        does not hold the free slots back: they would stay idle until its endpoint answers."""
        return any(other < level and self._room(tried, healthy) for other, tried in self._waiting.values())

    def _holds_back(self, level: int) -> bool:
        """Whether a batch of a less urgent level than ``level`` waits here."""
        return any(other > level for other, _ in self._waiting.values())

    async def _acquire_at(self, tried: set[str], level: int) -> _Endpoint:
        cond = self._condition()
        deadline: float | None = None
        async with cond:
            while True:
                now = time.monotonic()
                live = [ep for ep in self._eps.values() if not ep.removed]
                healthy = [ep for ep in live if ep.down_until <= now]
                free = self._room(tried, healthy)
                if free and not self._overtaken(level, healthy):
                    ep = min(free, key=lambda e: (e.consecutive_failures > 0, e.inflight, e.last_pick))
                    ep.last_pick = now
                    self._mark(ep, +1)
                    if self._holds_back(level) and self._room(set(), healthy):
                        # the less urgent batches woken with this one left the slots to it: one took, the other
                        # free slots are theirs now (else idle until the next answer or their 1 s look)
                        cond.notify_all()
                    return ep
                if healthy:
                    deadline = None
                elif deadline is None:
                    deadline = now + self.timeout_s
                if deadline is not None and now >= deadline:
                    # the message reaches every results:read caller (the job's error): no address in it;
                    # the log, for the operators, names them
                    logger.warning("no Triton endpoint took a request within %g s (endpoints: %s)", self.timeout_s,
                                   ", ".join(ep.url for ep in live) or "none configured")
                    raise InferenceUnavailable(
                        f"No Triton endpoint could take a request within {self.timeout_s:g} s "
                        f"({len(live) or 'none'} configured)."
                    )
                wake = deadline if deadline is not None else now + 1.0
                resting = [ep.down_until for ep in live if ep.down_until > now]
                if resting:
                    wake = min(wake, min(resting))
                # not wait_for: on Python 3.11 it returns the inner result when a cancel arrives as cond.wait()
                # completes (a notify_all), so a batch of a study given up went on calling Triton (CPython gh-86296, fixed in 3.12)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.01, wake - now)):
                        await cond.wait()

    async def _release(self, ep: _Endpoint, slices: int) -> None:
        # The slot comes back before the first await: a batch cancelled while it waits for the lock (its
        # study failed elsewhere) would otherwise keep it forever, and an endpoint on probation (one
        # request at a time) with a kept slot never takes a request again. Only the wake-up needs the
        # lock, and waiters look again within a second without it.
        self._mark(ep, -1, slices)
        if ep.removed and ep.inflight == 0 and ep.client is not None:
            client, ep.client = ep.client, None
            asyncio.get_running_loop().create_task(self._close_client(client))
        cond = self._condition()
        async with cond:
            cond.notify_all()

    @staticmethod
    async def _close_client(client: Any) -> None:
        try:
            await client.close()
        except Exception as exc:  # noqa: BLE001
            logger.debug("closing a Triton client failed: %s", exc)

    # --- inference ---------------------------------------------------------------------------
    async def _call(self, ep: _Endpoint, batch: np.ndarray, stats: InferStats | None = None,
                    priority: int = 0) -> list[SliceOutput]:
        import tritonclient.grpc as grpcclient

        from gateway.triton_client import ArrayInput

        inp = ArrayInput(HU_SLICES, batch)  # the batch's memory, sent by TritonClient with one copy
        outputs = [grpcclient.InferRequestedOutput(n) for n in (LESION_BOXES, BOX_COUNT, VALID_AREA_BOX)]
        t0 = time.perf_counter()
        result = await self._client(ep).infer(
            self.model_name, [inp], outputs=outputs, client_timeout=self.timeout_s, priority=priority
        )
        t1 = time.perf_counter()
        boxes = result.as_numpy(LESION_BOXES)
        counts = result.as_numpy(BOX_COUNT)
        valid = result.as_numpy(VALID_AREA_BOX)
        if boxes is None or counts is None or valid is None:
            raise InferenceFailed(f"Triton endpoint {ep.url} left out an output of {self.model_name}.")
        out = [SliceOutput(s.boxes, s.valid_area, ep.url) for s in unpack_outputs(boxes, counts, valid)]
        if stats is not None:
            stats.requests += 1
            stats.slices += len(out)
            stats.roundtrip_s += t1 - t0
            stats.unpack_s += time.perf_counter() - t1
        return out

    async def infer_batch(self, batch: np.ndarray, stats: InferStats | None = None,
                          attempts: int | None = None, priority: int = 0) -> list[SliceOutput]:
        """Screen one batch of slices ``[B, 512, 512]`` (or ``[B, 1, 512, 512]``) int16 HU.

        Tries up to ``attempts`` (default ``max_attempts``) endpoints; the answer of exactly one try is returned (and counted
        in ``stats``). ``priority``: the batch's Triton priority level (:func:`gateway.jobs.triton_priority`; 0, the
        default level).

        Raises
        ------
        InferenceUnavailable
            When no endpoint answered within the tries.
        InferenceFailed
            When Triton refused the request (bad tensor) or its answer was incomplete.
        """
        if batch.ndim == 3:
            batch = batch[:, None]
        if batch.ndim != 4 or batch.shape[1:] != (1, SLICE_SIZE, SLICE_SIZE):
            raise ValueError(
                f'Argument "batch" must be [B, {SLICE_SIZE}, {SLICE_SIZE}], got shape {batch.shape}.'
            )
        if batch.dtype != np.int16:
            raise ValueError(f'Argument "batch" must be int16 HU, got {batch.dtype}.')
        batch = np.ascontiguousarray(batch)
        tried: set[str] = set()
        last: BaseException | None = None
        tries = self.max_attempts if attempts is None else max(1, attempts)
        for attempt in range(1, tries + 1):
            ep = await self._acquire(tried, priority)
            tried.add(ep.url)
            answered = 0
            try:
                out = await self._call(ep, batch, stats, priority)
                answered = len(out)
                ep.slices_done += answered
                ep.requests_done += 1
                ep.consecutive_failures = 0
                return out
            except InferenceFailed:
                ep.failures += 1
                raise
            except Exception as exc:  # tritonclient raises InferenceServerException
                status = _status(exc)
                ep.failures += 1
                last = exc
                if status not in RETRYABLE:
                    logger.warning("Triton endpoint %s refused a request: %s", ep.url, status)
                    raise InferenceFailed(
                        f"A Triton endpoint refused the request: {status}: {_without(exc, ep.url)}"
                    ) from None
                if status in _UNHEALTHY:
                    ep.consecutive_failures += 1
                    ep.down_until = time.monotonic() + min(5.0, 0.25 * 2 ** (ep.consecutive_failures - 1))
                self.retries += 1
                logger.warning(
                    "Triton endpoint %s failed a batch of %d (try %d/%d): %s",
                    ep.url, len(batch), attempt, tries, status,
                )
            finally:
                await self._release(ep, answered)
        raise InferenceUnavailable(
            f"Every try of a batch of {len(batch)} slices failed ({tries} tries): {_status(last)}."
        )

    async def infer(
        self,
        hu: np.ndarray,
        on_batch: Callable[[int], Awaitable[None] | None] | None = None,
        ready: AsyncIterator[int] | None = None,
        stats: InferStats | None = None,
        priority: int = 0,
    ) -> list[SliceOutput]:
        """Screen every slice of ``hu`` ``[Z, 512, 512]`` int16; results in slice order, each batch at ``priority``
        (:meth:`infer_batch`).

        Batches are sent concurrently (bounded by the endpoints' in-flight limits). ``on_batch(n)``
        is called after each batch of ``n`` slices comes back (progress).

        ``ready`` streams a study through: ``hu`` is being filled while this runs, and ``ready``
        yields how many leading slices are filled so far (ascending, ending at ``Z``); each batch is
        sent as soon as its slices are filled. An exception from ``ready`` cancels the batches sent
        and is raised here; so does a batch that fails while ``ready`` still fills. ``stats`` adds
        up what the answered requests cost (:class:`InferStats`).

        Raises
        ------
        InferenceUnavailable, InferenceFailed
            When a batch cannot be answered; the other batches are cancelled.
        ValueError
            When ``ready`` ends before every slice is filled.
        """
        if hu.ndim != 3:
            raise ValueError(f'Argument "hu" must be [Z, H, W], got shape {hu.shape}.')
        z = len(hu)
        results: list[SliceOutput | None] = [None] * z
        self._pending_slices += z
        remaining = z

        async def run(start: int) -> None:
            nonlocal remaining
            stop = min(z, start + self.batch_size)
            out = await self.infer_batch(hu[start:stop], stats, priority=priority)
            for i, item in enumerate(out):
                if results[start + i] is not None:  # pragma: no cover - guarded by construction
                    raise AssertionError(f"slice {start + i} answered twice")
                results[start + i] = item
            self._pending_slices -= stop - start
            remaining -= stop - start
            if on_batch is not None:
                maybe = on_batch(stop - start)
                if maybe is not None:
                    await maybe

        # Batches are sent through a window a little wider than the endpoints' room: every batch sent waits
        # in _acquire, and each answer wakes every waiter, so sending a whole study at once cost O(batches^2)
        # wake-ups (10,000 for a 300-slice study in 2-slice batches; ~0.3 s of the gateway's CPU).
        running: set[asyncio.Future[None]] = set()
        failed: list[BaseException] = []  # read as each batch ends: no error is left unretrieved
        sent = 0  # batches sent, in slice order
        filled_to = 0  # slices [0, filled_to) are filled
        stopping = False

        def finished(task: asyncio.Future[None]) -> None:
            running.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failed.append(task.exception())  # type: ignore[arg-type]
                return  # the study fails: nothing more is sent
            launch()

        def launch() -> None:
            nonlocal sent
            room = self.window() - len(running)
            while not stopping and not failed and room > 0:
                start = sent * self.batch_size
                if start >= z or min(z, start + self.batch_size) > filled_to:
                    break
                task = asyncio.ensure_future(run(start))
                task.add_done_callback(finished)
                running.add(task)
                sent += 1
                room -= 1

        def send(filled: int) -> None:
            nonlocal filled_to
            filled_to = filled
            launch()

        def raise_failed() -> None:
            if failed:
                raise failed[0]  # the finally cancels the others

        try:
            if ready is None:
                send(z)
            else:
                async for filled in ready:
                    send(filled)
                    raise_failed()
                if filled_to < z:
                    raise ValueError(f'Argument "ready" ended before all {z} slices were filled.')
            while True:
                raise_failed()
                launch()
                if not running:
                    break
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping = True
            for t in list(running):
                t.cancel()
            self._pending_slices -= remaining
            close = getattr(ready, "aclose", None)
            if close is not None:
                await close()  # a stream left early (a batch failed) stops filling
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:  # pragma: no cover - launch sends every filled batch; a failed one raised
            raise InferenceFailed(f"Slices {missing[:5]} came back without a result.")
        return results  # type: ignore[return-value]

    async def close(self) -> None:
        """Close every client."""
        for ep in self._eps.values():
            if ep.client is not None:
                client, ep.client = ep.client, None
                await self._close_client(client)
