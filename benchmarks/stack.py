"""Start (and always stop) what a benchmark loads: the embedded Triton and a gateway in front of it.

Both listen on loopback ports chosen free at start. A benchmark given ``--url``/``--triton-url`` uses
the servers named instead and starts nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.common import ROOT, TMP_DIR, BenchError, free_port

logger = logging.getLogger(__name__)

GATEWAY_APP = os.environ.get("CTSCREEN_BENCH_GATEWAY_APP", "gateway.main:app_from_env()")


@dataclass
class TritonTarget:
    """Where a Triton answers: gRPC ``host:port``, HTTP ``http://host:port``, metrics URL."""

    grpc_url: str
    http_url: str
    metrics_url: str | None
    model: str | None = None
    """The model the gateway calls (None: the gateway's default); the embedded Triton's
    :attr:`~ctscreen.embedded.EmbeddedTriton.screen_model`, as ``ctscreen serve`` calls."""


def _http(url: str) -> str:
    return url if "://" in url else f"http://{url}"


@contextlib.contextmanager
def embedded_triton(repo_dir: Path | None = None, timeout: float = 300.0,
                    env: Mapping[str, str | None] | None = None) -> Iterator[TritonTarget]:
    """A started :class:`ctscreen.embedded.EmbeddedTriton` (cpu profile unless ``repo_dir``; ``env`` on top of
    the server's environment, None removing a name), stopped on exit."""
    try:
        from ctscreen.embedded import EmbeddedTriton
    except ImportError as exc:
        raise BenchError(f"ctscreen.embedded is not importable ({exc}); pass --triton-url to use a running Triton") from exc
    TMP_DIR.mkdir(parents=True, exist_ok=True)
    server = EmbeddedTriton(repo_dir, log_file=TMP_DIR / "triton.log", env=env)
    try:
        server.start(timeout=timeout)
    except Exception as exc:
        with contextlib.suppress(Exception):
            server.stop()
        raise BenchError(f"the embedded Triton did not start: {exc} (log: {TMP_DIR / 'triton.log'})") from exc
    try:
        metrics = getattr(server, "metrics_url", None)
        if metrics:
            metrics = _http(metrics)
            if not metrics.rstrip("/").endswith("/metrics"):
                metrics = metrics.rstrip("/") + "/metrics"
        yield TritonTarget(server.grpc_url, _http(server.http_url), metrics, server.screen_model)
    finally:
        server.stop()


def triton_from_urls(grpc_url: str, http_url: str | None, metrics_url: str | None) -> TritonTarget:
    """A :class:`TritonTarget` for a server somebody else runs (HTTP and metrics guessed from defaults)."""
    host = grpc_url.rsplit(":", 1)[0]
    return TritonTarget(grpc_url, _http(http_url or f"{host}:8000"), metrics_url or f"http://{host}:8002/metrics")


def check_tree(tree: Path) -> None:
    """:class:`~benchmarks.common.BenchError` unless ``tree`` is a checkout of this repository."""
    if not (tree / "gateway" / "main.py").is_file():
        raise BenchError(f"{tree} is not a checkout of this repository (no gateway/main.py)")


GATEWAY_PIDS: dict[str, int] = {}
"""The process of each gateway :func:`gateway` runs, by its URL (two side by side: each one's own CPU)."""


@contextlib.contextmanager
def gateway(triton: TritonTarget, *, env: dict[str, str] | None = None, timeout: float = 120.0,
            tree: Path | None = None) -> Iterator[str]:
    """Run the gateway (uvicorn, loopback, free port) in front of ``triton``; yield its base URL.

    ``tree``: run the gateway's code of another checkout of this repository (e.g. a ``git worktree`` of
    an earlier commit; its folder comes first on the import path), with this environment's packages."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full_env = dict(os.environ)
    TMP_DIR.mkdir(parents=True, exist_ok=True)
    data = tempfile.mkdtemp(prefix="gateway-data-", dir=TMP_DIR)
    full_env.update({
        "CTSCREEN_TRITON_URLS": triton.grpc_url,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}",
        # a fresh state store per run: no job of an earlier (interrupted) run is screened during this one
        "CTSCREEN_DATA_DIR": data,
    })
    if triton.model:  # what `ctscreen serve` calls, unless the environment names a model (serve respects it)
        full_env.setdefault("CTSCREEN_TRITON_MODEL", triton.model)
    full_env.update(env or {})
    log = (TMP_DIR / "gateway.log").open("w")
    cmd = [sys.executable, "-m", "uvicorn", GATEWAY_APP, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--no-access-log"]
    if GATEWAY_APP.endswith("()"):
        cmd[3] = GATEWAY_APP[:-2]
        cmd.append("--factory")
    if ((tree or ROOT) / "gateway" / "httpserver.py").is_file():  # the protocol the chart and ctscreen serve run
        full_env.setdefault("UVICORN_HTTP", "gateway.httpserver:BoundedHttpToolsProtocol")  # (UVICORN_* of A/B wins)
    if tree is not None:
        check_tree(tree)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), full_env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(cmd, cwd=tree or ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    GATEWAY_PIDS[url] = proc.pid
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise BenchError(f"the gateway exited with {proc.returncode} at start (log: {TMP_DIR / 'gateway.log'})")
            try:
                if httpx.get(f"{url}/readyz/triton", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the gateway was not ready within {timeout:.0f} s (log: {TMP_DIR / 'gateway.log'})")
            time.sleep(0.5)
        yield url
    finally:
        GATEWAY_PIDS.pop(url, None)
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        shutil.rmtree(data, ignore_errors=True)
        log.close()
