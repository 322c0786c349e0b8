#!/usr/bin/env bash
# Install what perf_analyzer needs here, check that it starts, and run it.
#
#   scripts/install_perf_analyzer.sh                 install, then a short ct_screen sweep on the embedded
#                                                    Triton (~1 min; results in benchmarks/results/tmp/perf-check)
#   scripts/install_perf_analyzer.sh --all           install, then sweep every model and the ensemble
#                                                    (ctscreen bench perf: benchmarks/results/perf*)
#   scripts/install_perf_analyzer.sh -m ct_screen -u 127.0.0.1:8001 -i grpc --shape HU_SLICES:1,512,512 ...
#                                                    install, then run perf_analyzer with these arguments
#
# perf_analyzer is the binary shipped in the tritonclient==2.51.0 wheel (.venv/bin/perf_analyzer). It
# links libb64.so.0d (Debian libb64-0d) and libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12, put on
# LD_LIBRARY_PATH here; no GPU is needed). The PyPI "perf-analyzer" wheel needs glibc 2.38 and does
# not run on Debian 12: do not use it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || { echo "install_perf_analyzer: no $venv; run scripts/setup.sh first" >&2; exit 1; }

if ! dpkg -s libb64-0d >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq libb64-0d >/dev/null 2>&1 || { apt-get update -qq >/dev/null; apt-get install -y -qq libb64-0d >/dev/null; }
  else
    echo "install_perf_analyzer: please install the Debian package libb64-0d (needs root)" >&2; exit 1
  fi
fi
"$venv/bin/python" -c "import nvidia.cuda_runtime" 2>/dev/null \
  && [ -n "$(ls "$venv"/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12* 2>/dev/null)" ] \
  || "$venv/bin/pip" install -q "tritonclient[grpc,http]==2.51.0" "nvidia-cuda-runtime-cu12>=12,<13"

libdir="$("$venv/bin/python" -c 'import nvidia.cuda_runtime as m, pathlib; print(pathlib.Path(list(m.__path__)[0]) / "lib")')"
export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
pa="$venv/bin/perf_analyzer"
[ -x "$pa" ] || pa="$(dirname "$("$venv/bin/python" -c 'import tritonclient; print(tritonclient.__file__)')")/bin/perf_analyzer"
"$pa" --version >/dev/null 2>&1 || { echo "install_perf_analyzer: $pa does not start:" >&2; "$pa" --version >&2 || true; exit 1; }
echo "perf_analyzer ready: $pa (LD_LIBRARY_PATH=$libdir)"

if [ "$#" -eq 0 ]; then
  # a check run: its results go to the git-ignored tmp folder, not over the committed figures
  exec nice -n 10 "$venv/bin/python" -m benchmarks perf --results benchmarks/results/tmp/perf-check \
    --models ct_screen --batches 1 --pa-concurrency 1:2
elif [ "$1" = "--all" ]; then
  exec nice -n 10 "$venv/bin/python" -m benchmarks perf
else
  exec "$pa" "$@"
fi
