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
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

# machine_info is re-exported: every benchmark stamps its results with it; it lives below training
from ctscreen.machine import machine_info as machine_info

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


def shared_real_data(shared: Path | None = None) -> tuple[Path, Path]:
    """``(dicom-edge-cases folder, real-ct root)`` of the shared data (default ``../shared/data`` beside the
    checkout); raises BenchError, saying what is missing, when the real CT is not there."""
    from training.realct import DataError, real_ct_root

    root = shared or Path(__file__).resolve().parents[2] / "shared" / "data"
    try:
        return root / "dicom-edge-cases", real_ct_root(root / "real-ct")
    except DataError as exc:
        raise BenchError(str(exc)) from None


def publish(prog: str, make: Callable[[], dict[str, Any]], render: Callable[[dict[str, Any]], str], out: Path,
            *, failed: int = 2) -> int:
    """Run ``make()`` (a stamped document), write it to ``out`` and print ``render(doc)`` and where it went;
    exit status ``failed``, with ``prog``'s one-line reason, when ``make`` raises BenchError (2, the default:
    missing data; 1: a run that failed, e.g. a server that did not start)."""
    try:
        doc = make()
    except BenchError as exc:
        print(f"{prog}: {'error: ' if failed == 1 else ''}{exc}", file=sys.stderr)
        return failed
    path = write_json(out, doc)
    print(render(doc))
    print(f"\n{path} (commit {doc['machine'].get('commit')})")
    return 0


def publish_run(prog: str, argv: Sequence[str] | None, make: Callable[[], dict[str, Any]],
                render: Callable[[dict[str, Any]], str], out: Path) -> int:
    """:func:`publish` the document ``make()`` measures, stamped first with the command that ran (``prog`` and
    ``argv``, default ``sys.argv``) and the machine (its load average before the run); a BenchError exits 1.
    Logs at INFO (a run's progress)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = f"{prog} " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = machine_info()
    return publish(prog, lambda: {"command": command.strip(), "machine": machine, **make()}, render, out, failed=1)


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
