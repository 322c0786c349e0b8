#!/usr/bin/env bash
# Write constraints.txt: the exact version of every package the .venv holds (ctscreen[train,test], set up by
# scripts/setup.sh --test), which setup.sh and helm/gateway.Dockerfile install with (`pip install -c`), so that a
# fresh clone and an image built next month get the versions the suite passed with.
#
#   scripts/constraints.sh          after changing a dependency in pyproject.toml (then run the suite)
#
# Left out: torch and torchvision (pinned in pyproject.toml; their build is the machine's: a CUDA build from this
# disk on x86_64, another pair on aarch64) and what only they bring (CUDA 13 libraries, OpenAI's triton).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "constraints.sh: no .venv; run scripts/setup.sh --test first" >&2; exit 1; }
{
  echo "# Exact versions for pip install -c (scripts/setup.sh, helm/gateway.Dockerfile); written by scripts/constraints.sh"
  echo "# from a .venv of ctscreen[train,test] on Python 3.11. Do not edit by hand."
  .venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -v -E '^(torch|torchvision|triton|cuda-bindings|cuda-pathfinder|cuda-toolkit)==' \
    | grep -v -E '^nvidia-' \
    | LC_ALL=C sort -f -t= -k1,1
  # the CUDA runtime perf_analyzer links (test extra) and the Triton server wheel are ctscreen's own needs
  .venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check | grep -E '^nvidia-(cuda-runtime-cu12|pytriton)=='
} > constraints.txt
echo "constraints.sh: $(grep -c '==' constraints.txt) packages pinned in constraints.txt"
