"""gateway.discovery: EndpointSlice watch events and DNS fallback -> TritonPool.set_endpoints.

No Kubernetes API server runs on these machines. The events below are the JSON lines the API server
streams for ``GET .../endpointslices?watch=true`` (shape of discovery.k8s.io/v1 as the EndpointSlice
controller writes it: three named ports, conditions ready/serving/terminating, targetRef to the pod).
They are decoded by the ``kubernetes`` client's own watch path (``Watch.unmarshal_event`` ->
``ApiClient.deserialize`` -> ``V1EndpointSlice``). The end-to-end tests run the real client
(``DiscoveryV1Api`` + ``Watch.stream``) over HTTP against a stand-in API server that serves the list
and streams the watch, chunked, like kube-apiserver.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client, watch
from pydantic import ValidationError

from gateway.discovery import (
    NAMESPACE_FILE,
    DiscoveryConfigError,
    DnsDiscovery,
    EndpointSliceDiscovery,
    EndpointSliceState,
    ready_addresses,
    resolve_all,
    start_discovery,
)
from gateway.settings import Settings
from gateway.triton_pool import TritonPool

NS, SVC = "screening", "ctscreen-triton-headless"


def endpoint(ip: str, pod: str, *, ready: bool | None = True, terminating: bool = False) -> dict:
    conditions = {"serving": ready or terminating, "terminating": terminating}
    if ready is not None:
        conditions["ready"] = ready
    return {
        "addresses": [ip],
        "conditions": conditions,
        "targetRef": {"kind": "Pod", "namespace": NS, "name": pod, "uid": f"uid-{pod}"},
        "nodeName": f"gpu-node-{pod[-1]}",
        "zone": "zone-a",
    }


def endpoint_slice(name: str, endpoints: list[dict], *, rv: str = "1", address_type: str = "IPv4",
                   ports: list[dict] | None = None) -> dict:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": f"{SVC}-",
            "namespace": NS,
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "generation": 1,
            "creationTimestamp": "2026-11-26T22:00:00Z",
            "labels": {
                "kubernetes.io/service-name": SVC,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "service.kubernetes.io/headless": "",
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": SVC, "uid": "uid-svc",
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports if ports is not None else [
            {"name": "http", "protocol": "TCP", "port": 8000},
            {"name": "grpc", "protocol": "TCP", "port": 8001, "appProtocol": "grpc"},
            {"name": "metrics", "protocol": "TCP", "port": 8002},
        ],
    }


def event_line(kind: str, obj: dict) -> str:
    return json.dumps({"type": kind, "object": obj}) + "\n"


def decode(kind: str, obj: dict) -> dict:
    """Decode one watch line exactly as ``kubernetes.watch.Watch.stream`` does."""
    event = watch.Watch().unmarshal_event(event_line(kind, obj), "V1EndpointSlice")
    if kind != "BOOKMARK":
        assert isinstance(event["object"], client.V1EndpointSlice)
    return event


class RecordingPool:
    """Records set_endpoints calls (the real TritonPool is used where the loop matters)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self._cond = threading.Condition()

    def set_endpoints(self, ready) -> None:
        with self._cond:
            self.calls.append(list(ready))
            self._cond.notify_all()

    def wait_for(self, expected: list[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.calls or self.calls[-1] != expected:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"pool never got {expected}; calls: {self.calls}")
                self._cond.wait(left)


# --- decoded events -> ready set -----------------------------------------------------------------------

A, B, C = "10.1.0.11", "10.1.0.12", "10.1.0.13"


def test_added_event_decodes_and_yields_ready_grpc_addresses():
    state = EndpointSliceState()
    event = decode("ADDED", endpoint_slice("s1", [endpoint(A, "triton-a"), endpoint(B, "triton-b")]))
    assert state.apply(event["type"], event["object"]) is True
    assert state.ready == [f"{A}:8001", f"{B}:8001"]  # the port named grpc, not http or metrics


def test_pod_turning_not_ready_is_removed_at_once():
    state = EndpointSliceState()
    pool = RecordingPool()
    discovery = EndpointSliceDiscovery(pool, SVC, NS, api=object())
    for kind, obj in [
        ("ADDED", endpoint_slice("s1", [endpoint(A, "triton-a"), endpoint(B, "triton-b")], rv="5")),
        ("MODIFIED", endpoint_slice("s1", [endpoint(A, "triton-a"), endpoint(B, "triton-b", ready=False)], rv="6")),
    ]:
        event = decode(kind, obj)
        discovery.handle_event(event)
        state.apply(event["type"], event["object"])
    assert pool.calls == [[f"{A}:8001", f"{B}:8001"], [f"{A}:8001"]]
    assert state.ready == [f"{A}:8001"]


def test_terminating_pod_gets_no_new_batches_even_while_still_serving():
    event = decode("MODIFIED", endpoint_slice("s1", [endpoint(A, "triton-a"),
                                                     endpoint(B, "triton-b", ready=False, terminating=True)]))
    assert event["object"].endpoints[1].conditions.serving is True
    assert ready_addresses(event["object"]) == {f"{A}:8001"}


def test_unknown_readiness_counts_as_ready_as_the_api_asks():
    event = decode("ADDED", endpoint_slice("s1", [endpoint(A, "triton-a", ready=None)]))
    assert event["object"].endpoints[0].conditions.ready is None
    assert ready_addresses(event["object"]) == {f"{A}:8001"}


def test_several_slices_and_deletion():
    state = EndpointSliceState()
    for kind, obj in [
        ("ADDED", endpoint_slice("s1", [endpoint(A, "triton-a")])),
        ("ADDED", endpoint_slice("s2", [endpoint(B, "triton-b"), endpoint(C, "triton-c")])),
    ]:
        state.apply(kind, decode(kind, obj)["object"])
    assert state.ready == [f"{A}:8001", f"{B}:8001", f"{C}:8001"]
    gone = decode("DELETED", endpoint_slice("s2", [endpoint(B, "triton-b"), endpoint(C, "triton-c")]))
    assert state.apply(gone["type"], gone["object"]) is True
    assert state.ready == [f"{A}:8001"]
    assert state.apply(gone["type"], gone["object"]) is False  # deleting twice changes nothing


def test_bookmark_changes_nothing():
    state = EndpointSliceState()
    state.apply("ADDED", decode("ADDED", endpoint_slice("s1", [endpoint(A, "triton-a")]))["object"])
    bookmark = watch.Watch().unmarshal_event(
        event_line("BOOKMARK", {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                                "metadata": {"resourceVersion": "77"}}), "V1EndpointSlice")
    assert state.apply(bookmark["type"], bookmark["object"]) is False
    assert state.ready == [f"{A}:8001"]


def test_ipv6_addresses_are_bracketed():
    event = decode("ADDED", endpoint_slice("s6", [endpoint("fd00:10::5", "triton-a")], address_type="IPv6"))
    assert ready_addresses(event["object"]) == {"[fd00:10::5]:8001"}


def test_slice_without_the_grpc_port_is_ignored_unless_a_default_is_given(caplog):
    obj = endpoint_slice("s1", [endpoint(A, "triton-a")], ports=[{"name": "http", "protocol": "TCP", "port": 8000}])
    event = decode("ADDED", obj)
    assert ready_addresses(event["object"]) == set()
    assert "no port named 'grpc'" in caplog.text
    assert ready_addresses(event["object"], default_port=9001) == {f"{A}:9001"}


def test_bad_event_type_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match='"event_type" must be ADDED, MODIFIED, DELETED or BOOKMARK'):
        EndpointSliceState().apply("ERROR", endpoint_slice("s1", []))


# --- the real client against a stand-in API server -------------------------------------------------------


class FakeApiServer:
    """Serves LIST and a chunked WATCH of EndpointSlices the way kube-apiserver does."""

    def __init__(self, slices: list[dict]) -> None:
        self.slices = {s["metadata"]["name"]: s for s in slices}
        self.rv = 100
        self.requests: list[dict] = []
        self.watchers: list[queue.Queue] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                with outer.lock:
                    outer.requests.append({"path": url.path, **query})
                if url.path != f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices":
                    self.send_error(404)
                    return
                if query.get("watch") != "true":
                    with outer.lock:
                        body = json.dumps({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                                           "metadata": {"resourceVersion": str(outer.rv)},
                                           "items": list(outer.slices.values())}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                q: queue.Queue = queue.Queue()
                with outer.lock:
                    outer.watchers.append(q)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    while True:
                        line = q.get()
                        if line is None:
                            break
                        data = line.encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:
                    pass
                finally:
                    with outer.lock:
                        if q in outer.watchers:
                            outer.watchers.remove(q)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.end_watches()
        self.httpd.shutdown()
        self.httpd.server_close()

    def wait_watchers(self, n: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.watchers) >= n:
                    return
            time.sleep(0.02)
        raise AssertionError("the client never opened a watch")

    def _send(self, line: str | None) -> None:
        with self.lock:
            for q in self.watchers:
                q.put(line)

    def push(self, kind: str, obj: dict) -> None:
        with self.lock:
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            if kind == "DELETED":
                self.slices.pop(obj["metadata"]["name"], None)
            else:
                self.slices[obj["metadata"]["name"]] = obj
        self._send(event_line(kind, obj))

    def expire(self) -> None:
        """What the API server does when the watched resourceVersion is too old: an ERROR event (410),
        then the watch ends. The ended watches leave ``watchers`` at once, so ``wait_watchers`` waits for
        the client's new watch (a stale queue still listed made it return early, and an event pushed then
        was lost on a busy machine)."""
        line = json.dumps({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 1 (100)", "reason": "Expired", "code": 410}}) + "\n"
        with self.lock:
            ended, self.watchers = self.watchers, []
        for q in ended:
            q.put(line)
            q.put(None)

    def end_watches(self) -> None:
        self._send(None)


def api_for(server: FakeApiServer) -> client.DiscoveryV1Api:
    config = client.Configuration()
    config.host = server.url
    return client.DiscoveryV1Api(client.ApiClient(config))


def test_list_then_watch_follows_readiness_and_relists_after_410():
    first = endpoint_slice("s1", [endpoint(A, "triton-a"), endpoint(B, "triton-b")])
    with FakeApiServer([first]) as server:
        pool = RecordingPool()
        discovery = EndpointSliceDiscovery(pool, SVC, NS, api=api_for(server), backoff_s=0.05).start()
        try:
            pool.wait_for([f"{A}:8001", f"{B}:8001"])
            server.wait_watchers()
            server.push("MODIFIED", endpoint_slice("s1", [endpoint(A, "triton-a"),
                                                          endpoint(B, "triton-b", ready=False)]))
            pool.wait_for([f"{A}:8001"])
            server.push("ADDED", endpoint_slice("s2", [endpoint(C, "triton-c")]))
            pool.wait_for([f"{A}:8001", f"{C}:8001"])
            server.expire()  # 410 Gone: the client must list again, then watch from the new version
            deadline = time.monotonic() + 20
            while discovery.relists < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert discovery.relists == 2
            server.wait_watchers()
            server.push("DELETED", endpoint_slice("s2", [endpoint(C, "triton-c")]))
            pool.wait_for([f"{A}:8001"])
        finally:
            discovery._stop.set()
            server.end_watches()
            discovery.stop()
    lists = [r for r in server.requests if r.get("watch") != "true"]
    watches = [r for r in server.requests if r.get("watch") == "true"]
    assert all(r["labelSelector"] == f"kubernetes.io/service-name={SVC}" for r in server.requests)
    assert len(lists) >= 2 and watches and all("resourceVersion" in w for w in watches)
    # every change reached the pool once, in order
    assert pool.calls == [[f"{A}:8001", f"{B}:8001"], [f"{A}:8001"], [f"{A}:8001", f"{C}:8001"], [f"{A}:8001"]]


def test_updates_reach_a_real_pool_on_its_event_loop():
    """The watch thread hands updates to the loop that owns the TritonPool (it is not thread-safe)."""
    with FakeApiServer([endpoint_slice("s1", [endpoint(A, "triton-a"), endpoint(B, "triton-b")])]) as server:

        async def scenario() -> list[list[str]]:
            pool = TritonPool([])
            seen = []
            settings = Settings(triton_discovery="endpointslice", triton_service=SVC, triton_namespace=NS)
            discovery = start_discovery(settings, pool, api=api_for(server))
            assert isinstance(discovery, EndpointSliceDiscovery)
            try:
                for want in ([f"{A}:8001", f"{B}:8001"], [f"{B}:8001"]):
                    for _ in range(1000):
                        if sorted(pool.endpoints) == want:
                            break
                        await asyncio.sleep(0.02)
                    seen.append(sorted(pool.endpoints))
                    if want[0].startswith(A):
                        await asyncio.get_running_loop().run_in_executor(None, server.wait_watchers)
                        server.push("MODIFIED", endpoint_slice("s1", [endpoint(A, "triton-a", ready=False),
                                                                      endpoint(B, "triton-b")]))
            finally:
                discovery._stop.set()
                server.end_watches()
                await discovery.close()
            return seen

        assert asyncio.run(scenario()) == [[f"{A}:8001", f"{B}:8001"], [f"{B}:8001"]]


# --- DNS fallback and configuration --------------------------------------------------------------------


def test_dns_fallback_follows_the_records_and_survives_a_failed_lookup():
    answers = [["10.2.0.1:8001", "10.2.0.2:8001"], socket.gaierror(-2, "Name or service not known"),
               ["10.2.0.2:8001"], []]

    async def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("triton.screening.svc", 8001)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def scenario() -> list:
        pool = RecordingPool()
        dns = DnsDiscovery(pool, "triton.screening.svc", 8001, interval_s=1, resolver=resolver)
        results = [await dns.refresh() for _ in range(4)]
        return [results, pool.calls, dns.failures]

    results, calls, failures = asyncio.run(scenario())
    assert results[1] is None and failures == 1
    assert calls == [["10.2.0.1:8001", "10.2.0.2:8001"], ["10.2.0.2:8001"], []]


def test_resolve_all_uses_the_system_resolver():
    addresses = asyncio.run(resolve_all("localhost", 8001))
    assert "127.0.0.1:8001" in addresses or "[::1]:8001" in addresses


def test_from_env_outside_a_cluster_falls_back_to_dns(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    seen = []

    async def resolver(host: str, port: int) -> list[str]:
        seen.append((host, port))
        return [f"127.0.0.1:{port}"]

    async def scenario():
        pool = TritonPool([])
        settings = Settings(triton_discovery="endpointslice", triton_service=SVC, triton_namespace=NS,
                            triton_grpc_port=9001)
        discovery = start_discovery(settings, pool, resolver=resolver)
        assert isinstance(discovery, DnsDiscovery)
        for _ in range(100):
            if pool.endpoints:
                break
            await asyncio.sleep(0.01)
        await discovery.close()
        return pool.endpoints

    assert asyncio.run(scenario()) == ["127.0.0.1:9001"]
    assert seen[0] == (f"{SVC}.{NS}.svc", 9001)


@pytest.mark.parametrize(
    ("env", "variable", "message"),
    [
        ({"CTSCREEN_TRITON_DISCOVERY": "consul"}, "CTSCREEN_TRITON_DISCOVERY", "'static', 'endpointslice' or 'dns'"),
        ({"CTSCREEN_TRITON_DISCOVERY": "dns"}, "CTSCREEN_TRITON_SERVICE", "needs CTSCREEN_TRITON_SERVICE"),
        ({"CTSCREEN_TRITON_DISCOVERY": "dns", "CTSCREEN_TRITON_SERVICE": SVC,
          "CTSCREEN_TRITON_GRPC_PORT": "grpc"}, "CTSCREEN_TRITON_GRPC_PORT", "valid integer"),
        ({"CTSCREEN_TRITON_GRPC_PORT": "70000"}, "CTSCREEN_TRITON_GRPC_PORT", "less than or equal to 65535"),
        ({"CTSCREEN_TRITON_DNS_INTERVAL_S": "0"}, "CTSCREEN_TRITON_DNS_INTERVAL_S", "greater than 0"),
        ({"CTSCREEN_TRITON_PORT_NAME": ""}, "CTSCREEN_TRITON_PORT_NAME", "at least 1 character"),
    ],
)
def test_settings_reject_bad_discovery_values(env, variable, message, monkeypatch):
    """Every discovery variable is read and checked by Settings, at start, naming the variable."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    first = info.value.errors()[0]
    assert "CTSCREEN_" + "_".join(str(p) for p in first["loc"]).upper() == variable
    assert message in first["msg"]


def test_discovery_settings_are_read_from_the_environment(monkeypatch):
    for name, value in {"CTSCREEN_TRITON_DISCOVERY": " DNS ", "CTSCREEN_TRITON_SERVICE": f" {SVC} ",
                        "CTSCREEN_TRITON_NAMESPACE": NS, "CTSCREEN_TRITON_PORT_NAME": "grpc-alt",
                        "CTSCREEN_TRITON_GRPC_PORT": "9001", "CTSCREEN_TRITON_DNS_INTERVAL_S": "2.5"}.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert (s.triton_discovery, s.triton_service, s.triton_namespace, s.triton_port_name, s.triton_grpc_port,
            s.triton_dns_interval_s) == ("dns", SVC, NS, "grpc-alt", 9001, 2.5)
    monkeypatch.setenv("CTSCREEN_TRITON_DISCOVERY", "")  # the chart may render an empty value: static
    assert Settings().triton_discovery == "static"


@pytest.mark.skipif(NAMESPACE_FILE.exists(), reason="runs in a pod: its namespace is known")
def test_endpointslices_in_a_cluster_need_a_namespace():
    settings = Settings(triton_discovery="endpointslice", triton_service=SVC)
    with pytest.raises(DiscoveryConfigError, match="CTSCREEN_TRITON_NAMESPACE"):
        start_discovery(settings, RecordingPool(), api=object())


def test_static_mode_starts_nothing():
    assert start_discovery(Settings(), RecordingPool()) is None
