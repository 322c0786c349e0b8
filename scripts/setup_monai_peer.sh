#!/usr/bin/env bash
# The MONAI Deploy App SDK peer's virtual environment, .venv-monai (about 1.6 GB, 2-3 minutes).
#
#   scripts/setup_monai_peer.sh          # once; `ctscreen bench ratios` then measures the SDK client
#
# A separate environment because the SDK cannot share ctscreen's: every release with TritonRemoteModel
# needs tritonclient[all]>=2.53.0 (ctscreen pins 2.51.0, the wheel that ships perf_analyzer) and 4.0.0
# brings numpy 2 (ctscreen needs numpy<2). benchmarks/monai_peer/requirements.txt lists what goes in.
# torch: the CPU build where one lies on this machine's disk (/opt/wheels), else PyPI's.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CTSCREEN_MONAI_VENV:-.venv-monai}
py=${PYTHON:-python3.11}
reqs=benchmarks/monai_peer/requirements.txt
stamp="$venv/.ctscreen-$(sha256sum "$reqs" | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "setup_monai_peer: ready ($venv)"
  exit 0
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
cpu_torch=$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -1 || true)
if [ -n "$cpu_torch" ]; then
  "${pip[@]}" "$cpu_torch"
fi
"${pip[@]}" -r "$reqs"
"$venv/bin/python" -c 'from monai.deploy.core.models import TritonRemoteModel' 2>/dev/null
touch "$stamp"
echo "setup_monai_peer: ready ($venv: $("$venv/bin/python" -m pip list 2>/dev/null | grep -i -E '^(monai-deploy-app-sdk|tritonclient|numpy|torch) ' | tr -s ' ' | paste -sd ','))"
