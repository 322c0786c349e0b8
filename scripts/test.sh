#!/usr/bin/env bash
# Run the whole test suite. The tests start every server they use themselves (embedded tritonserver,
# uvicorn gateways, dcmtk peers) on free loopback ports, and stop them.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export MPLBACKEND=Agg
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
.venv/bin/python -m ruff check ctscreen phantom training aggregator gateway benchmarks evaluation tests
.venv/bin/python -m mypy  # the packages and settings of [tool.mypy] in pyproject.toml
exec .venv/bin/python -m pytest "$@"
