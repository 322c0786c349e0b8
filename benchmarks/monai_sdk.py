"""The real peer: MONAI Deploy App SDK's own Triton client (``TritonRemoteModel``) on the same Triton.

The SDK lives in its own virtual environment (``scripts/setup_monai_peer.sh`` -> ``.venv-monai``; why:
``benchmarks/monai_peer/requirements.txt``), so the app (:mod:`benchmarks.monai_sdk_app`) runs as a child
process of that environment's python, as a MONAI Deploy app runs beside the server it calls. Its
studies/hour are timed inside the app, from the first study read to the last verdict (start-up and
connecting are not counted, as the gateway is already running when its studies are sent).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, BenchError
from benchmarks.studies import PoolStudy

APP = ROOT / "benchmarks" / "monai_sdk_app.py"
SETUP = "scripts/setup_monai_peer.sh"


def venv() -> Path:
    """The peer's virtual environment (``CTSCREEN_MONAI_VENV``, default ``.venv-monai`` in the checkout)."""
    return Path(os.environ.get("CTSCREEN_MONAI_VENV") or ROOT / ".venv-monai")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def unavailable() -> str | None:
    """Why the SDK peer cannot run here (None when it can)."""
    py = venv() / "bin" / "python"
    if not py.is_file():
        return f"no MONAI Deploy SDK environment at {venv()}: run {SETUP} once"
    try:
        r = subprocess.run([str(py), "-c", "from monai.deploy.core.models import TritonRemoteModel"],
                           capture_output=True, text=True, timeout=120, env=_env())
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{py} does not run: {exc}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        return f"monai.deploy.core.models.TritonRemoteModel does not import in {venv()}: {last}"
    return None


def run(http_url: str, studies: Sequence[PoolStudy], *, max_seconds: float = 600.0) -> dict[str, Any]:
    """Screen ``studies`` one after another with the SDK app against Triton's HTTP endpoint ``http_url``.

    Returns studies/hour, slices/s, per-study times and verdicts, and the peer's package versions;
    :class:`BenchError` when the peer is not installed or fails."""
    why = unavailable()
    if why:
        raise BenchError(why)
    netloc = http_url.split("://", 1)[-1].rstrip("/")
    cmd = [str(venv() / "bin" / "python"), str(APP), "--netloc", netloc, "--max-seconds", str(max_seconds),
           *[str(s.path) for s in studies]]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max_seconds + 300, env=_env(), cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"the MONAI Deploy SDK app ran past {exc.timeout:.0f} s") from None
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    summary = next((x["summary"] for x in lines if "summary" in x), None)
    if r.returncode != 0 or summary is None:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise BenchError(f"the MONAI Deploy SDK app failed (exit {r.returncode}): {last}")
    return {**summary, "client": "monai.deploy.core.models.TritonRemoteModel (valid_area, lesion; HTTP, JSON input)",
            "runs": [x for x in lines if "summary" not in x]}
