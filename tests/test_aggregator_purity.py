"""The aggregator library is pure: importing it pulls in no web framework, Triton client, model runtime,
plotting or gateway code (only ``aggregator.cli`` may, and it imports them lazily)."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ["fastapi", "starlette", "uvicorn", "tritonclient", "grpc", "onnxruntime", "torch", "matplotlib",
             "httpx", "gateway", "benchmarks", "training", "phantom", "highdicom"]


def test_library_modules_import_nothing_impure():
    code = (
        "import sys\n"
        "import aggregator, aggregator.case, aggregator.metrics, aggregator.report, aggregator.schema, aggregator.sr\n"
        "import aggregator.keyimages, aggregator.fhir\n"
        "import aggregator.cli\n"
        f"bad = sorted(m for m in {FORBIDDEN!r} if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == ""
