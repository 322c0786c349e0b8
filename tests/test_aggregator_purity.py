"""The aggregator library is pure, every module of it: importing it pulls in no web framework, Triton
client, model runtime, plotting or DICOM toolkit, and no module imports a package above it, not even
inside a function (``ctscreen eval``, which does the I/O, is :mod:`evaluation`)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import aggregator
from tests.import_graph import imports_of, module_name, package_files

ABOVE = ["gateway", "benchmarks", "training", "phantom", "evaluation"]
FORBIDDEN = ["fastapi", "starlette", "uvicorn", "tritonclient", "grpc", "onnxruntime", "torch", "matplotlib",
             "httpx", "highdicom", *ABOVE]
MODULES = ["aggregator", *sorted(m.name for m in pkgutil.walk_packages(aggregator.__path__, "aggregator."))]


def test_every_module_imports_nothing_impure():
    assert {"aggregator.case", "aggregator.report", "aggregator.sr"} <= set(MODULES)
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in {FORBIDDEN!r} if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("path", package_files("aggregator"), ids=lambda p: module_name(p))
def test_no_module_imports_a_package_above_it(path):
    above = [f"line {line}: {name}" for line, name in imports_of(path) if name.split(".")[0] in ABOVE]
    assert above == []
