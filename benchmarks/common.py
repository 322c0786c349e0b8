"""Shared pieces of the benchmark harness: target safety, machine facts, results files, statistics.

Errors
------
::

    BenchError(RuntimeError)          a benchmark could not run (missing part, server not ready)
    UnsafeTarget(ValueError)          a URL that is neither loopback nor explicitly allowed
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import platform
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
TMP_DIR = RESULTS_DIR / "tmp"  # git-ignored: generated studies, perf_analyzer input data, logs, history
_results = [RESULTS_DIR]


def results_dir() -> Path:
    """Where results are written (``benchmarks/results`` unless :func:`set_results_dir` said otherwise)."""
    return _results[0]


def set_results_dir(path: Path) -> None:
    """Write results under ``path`` from now on (the smoke test uses a temporary folder)."""
    _results[0] = Path(path)


class BenchError(RuntimeError):
    """A benchmark could not run; the message says what is missing and where."""


class UnsafeTarget(ValueError):
    """A target URL that is neither loopback nor explicitly allowed with ``--allow-remote``."""


def _host_of(url: str) -> str:
    if "://" not in url:
        url = "//" + url
    host = urlsplit(url).hostname
    if not host:
        raise UnsafeTarget(f'Argument "url" has no host: {url!r}.')
    return host


def is_loopback(url: str) -> bool:
    """True when ``url`` (``host:port`` or ``scheme://host:port/...``) names a loopback address.

    >>> is_loopback("127.0.0.1:8001"), is_loopback("http://localhost:8000/v1"), is_loopback("[::1]:1")
    (True, True, True)
    >>> is_loopback("http://10.0.0.5:8000")
    False
    """
    host = _host_of(url)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_target(url: str, *, allow_remote: bool = False) -> str:
    """Return ``url`` if traffic may be sent to it, else raise :class:`UnsafeTarget`.

    Benchmarks send load only to loopback, or to a URL the operator named explicitly *and*
    acknowledged with ``--allow-remote`` (a cluster they own).
    """
    if is_loopback(url) or allow_remote:
        return url
    raise UnsafeTarget(
        f"refusing to send load to {url!r}: not a loopback address; pass --allow-remote if this is "
        "a server you own and mean to load"
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bind to port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine_info() -> dict[str, Any]:
    """The stamp of a figure: CPU model, cores, memory, load, commit (``dirty`` when the tree had
    uncommitted changes), date and the shipped models' sha256 (:mod:`benchmarks.stamps`)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    try:
        dirty = bool(subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
            timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        dirty = None
    from benchmarks.stamps import shipped_models

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem_gib,
        "gpu": None,
        "loadavg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "dirty": dirty,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": shipped_models(),
    }


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` of ``values`` (None when empty).

    >>> percentiles([1.0, 2.0, 3.0, 4.0])["p50"]
    2.5
    """
    if len(values) == 0:
        return {f"p{q:g}": None for q in qs}
    arr = np.asarray(values, dtype=float)
    return {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as indented JSON at ``path`` (folders made); return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def stamp() -> str:
    """A UTC timestamp for result file names."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def goal_line(
    name: str, goal: str, measured: float | None, ok: bool | None, unit: str = "", note: str | None = None
) -> dict[str, Any]:
    """One goal-against-measured row of a report (``note``: why it was not measured, if it was not)."""
    return {"name": name, "goal": goal, "measured": measured, "unit": unit, "met": ok, "note": note}
