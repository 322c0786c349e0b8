"""Facts about the machine a figure comes from: usable cores, CPU, memory, load, commit, models.

Stdlib only, so that every package (the benchmarks, the quality reports of training, the evaluation)
stamps its figures the same way and the in-process reference sizes its thread budget from the same
core count.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
"""The checkout this package runs from (its ``git`` commit stamps the figures)."""


def cores() -> int:
    """Cores this process may use (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def shipped_models(repo: Path | None = None) -> dict[str, dict[str, str]]:
    """``{model: {"version", "sha256"}}`` of the ONNX files in ``repo`` (default ``model_repository``),
    hashed by :func:`ctscreen.repo.model_provenance` (as the served Triton configs are).

    A model whose file is missing is left out (a checkout without the ONNX files stamps nothing)."""
    from ctscreen.contracts import LESION_MODEL, VALID_AREA_MODEL
    from ctscreen.repo import model_provenance

    root = Path(repo) if repo is not None else ROOT / "model_repository"
    out = {}
    for name in (VALID_AREA_MODEL, LESION_MODEL):
        path = root / name / "1" / "model.onnx"
        if path.is_file():
            out[name] = model_provenance(path)
    return out


def machine_info() -> dict[str, Any]:
    """The stamp of a figure: CPU model, cores, memory, load, commit (``dirty`` when the tree had
    uncommitted changes), date and the shipped models' sha256 (checked by ``benchmarks.stamps``)."""
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
    commit, dirty = code_commit()
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


FIGURE_OUTPUTS = (":(exclude)benchmarks/results", ":(exclude,glob)**/*.md")
"""Paths a figure run writes itself (result files, plots, the READMEs' figure tables): changes there do not
make the code that measured "uncommitted" (a run's first figure dirtied the tree for every figure after it,
so each published run read "commit (uncommitted changes)" though it ran a clean commit)."""


def code_commit(root: Path = ROOT) -> tuple[str, bool | None]:
    """The checkout's short commit and whether its code had uncommitted changes (tracked files, less
    :data:`FIGURE_OUTPUTS`).

    ``CTSCREEN_COMMIT`` wins where it is set: a copy of the tree (an image, a GPU node) may carry no
    ``.git``, or a stale one; whoever copied it names the commit, and ``dirty`` is then unknown (None)."""
    named = os.environ.get("CTSCREEN_COMMIT", "").strip()
    if named:
        return named, None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty: bool | None = bool(subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".", *FIGURE_OUTPUTS],
            capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        return "", None
    return commit, dirty
