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
# two worker processes, each test file whole in one of them (its module-scoped servers start once);
# CTSCREEN_TEST_WORKERS=0 runs everything in this process (a debugger, -x, a single test)
workers="${CTSCREEN_TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# files in the order tests/conftest.py gives them (the longest first), not xdist's (the most tests first)
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
