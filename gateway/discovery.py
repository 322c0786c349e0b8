"""Runtime discovery of Triton pods for the gateway's :class:`~gateway.triton_pool.TritonPool`.

In a cluster the chart runs Triton behind a headless Service; the gateway keeps one gRPC channel per
pod and balances every batch itself. Two ways to learn the pods:

* :class:`EndpointSliceDiscovery` (default in a cluster): list, then watch, the EndpointSlices labelled
  ``kubernetes.io/service-name=<headless service>`` with the ``kubernetes`` client (in-cluster config).
  It keeps the addresses whose ``conditions.ready`` is true and calls ``pool.set_endpoints`` on every
  change, so a pod that turns not-ready (failed probe, or terminating: drain) stops getting batches at
  once. A watch that expires (410 Gone) or breaks is followed by a fresh list.
* :class:`DnsDiscovery` (fallback outside a cluster, or without API access): resolve the headless
  Service name every few seconds; its A records are the ready pods (slower: DNS TTL and the interval).

:func:`start_discovery` picks one from the ``triton_*`` discovery settings of
:class:`gateway.settings.Settings` (``CTSCREEN_TRITON_*``, set by the Helm chart and validated at start);
call it inside the gateway's lifespan and ``await discovery.close()`` on the way out.

The watch runs in a daemon thread (the ``kubernetes`` client is blocking); updates are handed to the
event loop with ``call_soon_threadsafe`` because the pool is not thread-safe.

Errors::

    ValueError
    └── DiscoveryConfigError   a bad argument, or the pod's namespace is unknown
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from gateway.settings import Settings

logger = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class DiscoveryConfigError(ValueError):
    """A discovery cannot be made from its arguments (the settings themselves are checked by ``Settings``)."""


class SupportsSetEndpoints(Protocol):
    def set_endpoints(self, ready: Iterable[str]) -> None: ...


# --- EndpointSlice bookkeeping (pure) -------------------------------------------------------------


def _get(obj: Any, attr: str, key: str) -> Any:
    """Read a field from a client model (snake_case attribute) or a raw dict (camelCase key)."""
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, attr, None)


def _host_port(address: str, port: int, address_type: str | None) -> str:
    if address_type == "IPv6" or (":" in address and not address.startswith("[")):
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def ready_addresses(endpoint_slice: Any, port_name: str = "grpc", default_port: int | None = None) -> set[str]:
    """The ``host:port`` of every ready endpoint of one EndpointSlice.

    Parameters
    ----------
    endpoint_slice : kubernetes.client.V1EndpointSlice | Mapping
        The slice, as the client decodes it (or its raw JSON dict).
    port_name : str
        Name of the Service port to use (the chart names Triton's gRPC port ``grpc``).
    default_port : int | None
        Port used when the slice has no port of that name (``None``: such a slice yields nothing).

    Returns
    -------
    set[str]
        Addresses of the endpoints whose ``conditions.ready`` is true. A missing ``ready`` counts as
        ready, as the EndpointSlice API asks consumers to do; a terminating pod is always not ready.
    """
    port = None
    for p in _get(endpoint_slice, "ports", "ports") or []:
        if _get(p, "name", "name") == port_name and _get(p, "port", "port"):
            port = int(_get(p, "port", "port"))
            break
    if port is None:
        port = default_port
    if port is None:
        name = _get(_get(endpoint_slice, "metadata", "metadata") or {}, "name", "name")
        logger.warning("EndpointSlice %s has no port named %r; ignored", name, port_name)
        return set()
    address_type = _get(endpoint_slice, "address_type", "addressType")
    out: set[str] = set()
    for ep in _get(endpoint_slice, "endpoints", "endpoints") or []:
        conditions = _get(ep, "conditions", "conditions")
        ready = _get(conditions, "ready", "ready") if conditions is not None else None
        if ready is False:
            continue
        addresses = _get(ep, "addresses", "addresses") or []
        if addresses:  # all addresses of one endpoint are fungible: use the first
            out.add(_host_port(str(addresses[0]), port, address_type))
    return out


class EndpointSliceState:
    """Ready addresses of one Service, kept from list results and watch events.

    Parameters
    ----------
    port_name : str
        Service port to use.
    default_port : int | None
        Port when a slice lacks ``port_name``.
    """

    def __init__(self, port_name: str = "grpc", default_port: int | None = None) -> None:
        self.port_name = port_name
        self.default_port = default_port
        self._slices: dict[str, set[str]] = {}

    @property
    def ready(self) -> list[str]:
        """Every ready address, sorted (an address in two slices counts once)."""
        return sorted(set().union(*self._slices.values())) if self._slices else []

    def _key(self, endpoint_slice: Any) -> str:
        meta = _get(endpoint_slice, "metadata", "metadata")
        name = _get(meta, "name", "name") if meta is not None else None
        if not name:
            raise ValueError('Argument "endpoint_slice" must have metadata.name.')
        return str(name)

    def reset(self, slices: Iterable[Any]) -> bool:
        """Replace the state with a fresh list result; True when the ready set changed."""
        before = self.ready
        self._slices = {
            self._key(s): ready_addresses(s, self.port_name, self.default_port) for s in slices
        }
        return self.ready != before

    def apply(self, event_type: str, endpoint_slice: Any) -> bool:
        """Apply one watch event (``ADDED``, ``MODIFIED``, ``DELETED``); True when the ready set changed.

        ``BOOKMARK`` events carry no endpoints and change nothing.
        """
        if event_type == "BOOKMARK":
            return False
        if event_type not in ("ADDED", "MODIFIED", "DELETED"):
            raise ValueError(f'Argument "event_type" must be ADDED, MODIFIED, DELETED or BOOKMARK, got {event_type!r}.')
        before = self.ready
        key = self._key(endpoint_slice)
        if event_type == "DELETED":
            self._slices.pop(key, None)
        else:
            self._slices[key] = ready_addresses(endpoint_slice, self.port_name, self.default_port)
        return self.ready != before


# --- publishing to the pool ------------------------------------------------------------------------


class _Publisher:
    """Calls ``pool.set_endpoints`` on the event loop's thread, only when the set changed."""

    def __init__(self, pool: SupportsSetEndpoints, loop: asyncio.AbstractEventLoop | None) -> None:
        self._pool = pool
        self._loop = loop
        self._last: list[str] | None = None
        self._lock = threading.Lock()
        self.updates = 0

    def __call__(self, ready: list[str]) -> None:
        with self._lock:
            if ready == self._last:
                return
            self._last = list(ready)
            self.updates += 1
        logger.info("Triton endpoints now: %s", ", ".join(ready) or "none")
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._pool.set_endpoints, list(ready))
        else:
            self._pool.set_endpoints(list(ready))


# --- EndpointSlice watch --------------------------------------------------------------------------


class EndpointSliceDiscovery:
    """List and watch the EndpointSlices of a Service; feed the ready pods to a pool.

    Parameters
    ----------
    pool : SupportsSetEndpoints
        Receives ``set_endpoints(ready)`` on every change.
    service : str
        The headless Service (label ``kubernetes.io/service-name``).
    namespace : str
        Its namespace.
    port_name : str
        Service port to dial.
    default_port : int | None
        Port when a slice lacks ``port_name``.
    api : kubernetes.client.DiscoveryV1Api | None
        Client to use; default: in-cluster configuration.
    loop : asyncio.AbstractEventLoop | None
        Loop that owns ``pool`` (updates are posted to it); default: the running loop, if any.
    watch_timeout_s : int
        Server-side timeout of one watch request (a new one follows at once).
    backoff_s : float
        Pause after a failed list or watch (doubles up to 30 s).
    """

    def __init__(
        self,
        pool: SupportsSetEndpoints,
        service: str,
        namespace: str,
        *,
        port_name: str = "grpc",
        default_port: int | None = None,
        api: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
        watch_timeout_s: int = 240,
        backoff_s: float = 1.0,
    ) -> None:
        if not service:
            raise DiscoveryConfigError('Argument "service" must name the headless Triton Service.')
        if not namespace:
            raise DiscoveryConfigError('Argument "namespace" must not be empty.')
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        self.service = service
        self.namespace = namespace
        self.label_selector = f"{SERVICE_NAME_LABEL}={service}"
        self.state = EndpointSliceState(port_name, default_port)
        self.watch_timeout_s = watch_timeout_s
        self.backoff_s = backoff_s
        self._api = api
        self._publish = _Publisher(pool, loop)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None
        self.relists = 0
        self.synced = threading.Event()

    @property
    def updates(self) -> int:
        """How many times the pool was given a new endpoint set."""
        return self._publish.updates

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            config.load_incluster_config()
            self._api = client.DiscoveryV1Api()
        return self._api

    def handle_event(self, event: Mapping[str, Any]) -> None:
        """Apply one decoded watch event (``{"type": ..., "object": V1EndpointSlice}``) and publish."""
        if self.state.apply(event["type"], event["object"]):
            self._publish(self.state.ready)

    def _list(self) -> str | None:
        result = self._client().list_namespaced_endpoint_slice(self.namespace, label_selector=self.label_selector)
        self.state.reset(result.items or [])
        self._publish(self.state.ready)
        self.relists += 1
        self.synced.set()
        return result.metadata.resource_version if result.metadata else None

    def run(self) -> None:
        """List and watch until :meth:`stop` (blocking; :meth:`start` runs it in a thread)."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        backoff = self.backoff_s
        while not self._stop.is_set():
            try:
                resource_version = self._list()
                while not self._stop.is_set():
                    self._watch = watch.Watch()
                    for event in self._watch.stream(
                        self._client().list_namespaced_endpoint_slice,
                        self.namespace,
                        label_selector=self.label_selector,
                        resource_version=resource_version,
                        allow_watch_bookmarks=True,
                        timeout_seconds=self.watch_timeout_s,
                    ):
                        if self._stop.is_set():
                            break
                        self.handle_event(event)
                        resource_version = self._watch.resource_version or resource_version
                    backoff = self.backoff_s
            except ApiException as exc:
                if exc.status == 410:
                    logger.info("EndpointSlice watch expired (410 Gone); listing again")
                    continue
                logger.warning("EndpointSlice list/watch failed (%s %s); retrying in %.1f s",
                               exc.status, exc.reason, backoff)
            except Exception as exc:  # noqa: BLE001 - network errors of every kind: keep the last set, retry
                if self._stop.is_set():
                    break
                logger.warning("EndpointSlice list/watch failed (%s); retrying in %.1f s", exc, backoff)
            self._stop.wait(backoff)
            backoff = min(30.0, backoff * 2)

    def start(self) -> EndpointSliceDiscovery:
        """Run :meth:`run` in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name=f"endpointslices-{self.service}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching (the pool keeps its last endpoint set)."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    async def close(self) -> None:
        """Async :meth:`stop` for the gateway lifespan."""
        await asyncio.get_running_loop().run_in_executor(None, self.stop)


# --- DNS fallback ----------------------------------------------------------------------------------

async def resolve_all(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, as sorted ``host:port`` strings (TCP)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = set()
    for family, _, _, _, sockaddr in infos:
        address = sockaddr[0]
        out.add(f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}")
    return sorted(out)


class DnsDiscovery:
    """Re-resolve a headless Service name and feed its addresses to a pool.

    Parameters
    ----------
    pool : SupportsSetEndpoints
        Receives ``set_endpoints`` when the address set changes.
    host : str
        DNS name, e.g. ``ctscreen-triton-headless.screening.svc.cluster.local``.
    port : int
        gRPC port of every pod.
    interval_s : float
        Seconds between resolutions.
    resolver : Callable | None
        ``async (host, port) -> list[str]``; default :func:`resolve_all`.

    A failed lookup keeps the last set (a DNS hiccup must not empty the pool); a lookup that succeeds
    with no address empties it.
    """

    def __init__(self, pool: SupportsSetEndpoints, host: str, port: int, *, interval_s: float = 5.0,
                 resolver: Callable[[str, int], Any] | None = None) -> None:
        if not host:
            raise DiscoveryConfigError('Argument "host" must not be empty.')
        if not 0 < port < 65536:
            raise DiscoveryConfigError(f'Argument "port" must be in 1..65535, got {port}.')
        if interval_s <= 0:
            raise DiscoveryConfigError(f'Argument "interval_s" must be > 0, got {interval_s}.')
        self.host, self.port, self.interval_s = host, port, interval_s
        self._resolver = resolver or resolve_all
        self._publish = _Publisher(pool, None)
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    @property
    def updates(self) -> int:
        return self._publish.updates

    async def refresh(self) -> list[str] | None:
        """Resolve once and publish; the addresses, or None when the lookup failed."""
        try:
            addresses = sorted(set(await self._resolver(self.host, self.port)))
        except (OSError, socket.gaierror) as exc:
            self.failures += 1
            logger.warning("resolving %s failed (%s); keeping the last Triton endpoints", self.host, exc)
            return None
        self._publish(addresses)
        return addresses

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)

    def start(self) -> DnsDiscovery:
        """Start resolving in a task of the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


# --- configuration --------------------------------------------------------------------------------


def in_cluster(env: Mapping[str, str] | None = None) -> bool:
    """True when this process runs in a Kubernetes pod with a service-account token."""
    env = os.environ if env is None else env
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and Path(
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    ).exists()


def start_discovery(
    settings: Settings,
    pool: SupportsSetEndpoints,
    *,
    api: Any = None,
    resolver: Callable[[str, int], Any] | None = None,
) -> EndpointSliceDiscovery | DnsDiscovery | None:
    """Start the discovery ``settings.triton_discovery`` asks for; call inside the running event loop.

    ``static`` (default) keeps ``triton_urls``; ``endpointslice`` watches the EndpointSlices of
    ``triton_service`` in ``triton_namespace`` (default: the pod's namespace), dialling the port named
    ``triton_port_name`` (else ``triton_grpc_port``); ``dns`` resolves the Service name every
    ``triton_dns_interval_s``. ``endpointslice`` outside a cluster (or without an injected api) falls
    back to ``dns``. The values were validated when ``settings`` was made.

    Returns
    -------
    EndpointSliceDiscovery | DnsDiscovery | None
        The started discovery (``await it.close()`` on shut-down), or None for ``static``.

    Raises
    ------
    DiscoveryConfigError
        When EndpointSlices are watched in a cluster and the namespace is neither set nor known.
    """
    mode = settings.triton_discovery
    if mode == "static":
        return None
    service, port = settings.triton_service, settings.triton_grpc_port
    namespace = settings.triton_namespace
    if not namespace and NAMESPACE_FILE.exists():
        namespace = NAMESPACE_FILE.read_text().strip()
    if mode == "endpointslice" and (api is not None or in_cluster()):
        if not namespace:
            raise DiscoveryConfigError("CTSCREEN_TRITON_NAMESPACE is empty and the pod namespace is unknown.")
        discovery = EndpointSliceDiscovery(
            pool, service, namespace, port_name=settings.triton_port_name, default_port=port, api=api,
        )
        logger.info("discovering Triton pods from EndpointSlices %s in %s", discovery.label_selector, namespace)
        return discovery.start()
    if mode == "endpointslice":
        logger.warning("not in a Kubernetes pod: discovering Triton pods through DNS instead of EndpointSlices")
    host = service if "." in service or not namespace else f"{service}.{namespace}.svc"
    interval = settings.triton_dns_interval_s
    dns = DnsDiscovery(pool, host, port, interval_s=interval, resolver=resolver)
    logger.info("discovering Triton pods by resolving %s every %g s", host, interval)
    return dns.start()
