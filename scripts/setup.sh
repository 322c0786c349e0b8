#!/usr/bin/env bash
# Set up ctscreen on a fresh machine: Debian packages, the .venv and the project (editable).
#
#   scripts/setup.sh          serving only (gateway, aggregator, embedded Triton; no torch)
#   scripts/setup.sh --test   everything the tests need: train + test extras, dcmtk, libgdcm-tools (gdcmconv,
#                             the JPEG 2000 oracle of the edge-case tests), libb64-0d, postgresql,
#                             orthanc + orthanc-dicomweb (the PACS of the delivery tests), chromium (the
#                             browser Playwright drives in the web page tests; never `playwright install`)
#                             (the tests start their own PostgreSQL server in a temporary folder), and
#                             .venv-s3: moto's S3 server, for the S3 blob store's tests
#
# Idempotent and quick when nothing changed (a stamp keyed by pyproject.toml and the extras).
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-serve}"
case "$mode" in
  serve|--serve) extras="" ; debs=() ;;
  test|--test)   extras="train,test" ; debs=(dcmtk libgdcm-tools libb64-0d postgresql orthanc orthanc-dicomweb chromium) ;;
  *) echo "setup.sh: unknown mode '$mode' (use --test or nothing)" >&2; exit 2 ;;
esac

# --- Debian packages ------------------------------------------------------------------------
missing=()
for pkg in "${debs[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: please install Debian packages (needs root): ${missing[*]}" >&2
    exit 1
  fi
fi

# --- Python ---------------------------------------------------------------------------------
py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "setup: ctscreen needs Python 3.11 (the Triton python-backend stub in nvidia-pytriton is built for it); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv

# pip, silent on success; on failure its whole log (less the noise of unreachable index folders)
pip_quiet() {
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location 'file:" "$log" >&2 || true
    rm -f "$log"
    echo "setup: 'pip $*' failed" >&2
    return 1
  fi
  rm -f "$log"
}

# the versions the suite passed with (constraints.txt, written by scripts/constraints.sh)
key=$( (cat pyproject.toml constraints.txt; echo "$extras") | sha256sum | cut -c1-16)
stamp=".venv/.ctscreen-setup-$key"
if [ ! -f "$stamp" ]; then
  echo "setup: installing ctscreen${extras:+[$extras]} into .venv (first run takes a few minutes)"
  pip_quiet install --upgrade pip
  pip_quiet install -c constraints.txt -e ".${extras:+[$extras]}"
  # numpy 2 makes the Triton python-backend stub send 0-byte tensors: refuse to go on with it.
  .venv/bin/python -c 'import numpy, sys; sys.exit(int(numpy.__version__.split(".")[0]) >= 2)' \
    || { echo "setup: numpy >= 2 got installed; ctscreen needs numpy < 2" >&2; exit 1; }
  touch "$stamp"
fi
# --- an S3 server for the tests of the S3 blob store (--test) -----------------------------------
# moto's S3 server (a real S3 REST API on loopback: MinIO installs neither from Debian nor from PyPI here) in a
# venv of its own: moto brings botocore, whose python-dateutil<3 the Kubernetes client in .venv refuses
if [ "$mode" = test ] || [ "$mode" = --test ]; then
  s3_reqs="moto[server]==5.2.6"
  s3_stamp=".venv-s3/.ctscreen-setup-$(echo "$s3_reqs" | sha256sum | cut -c1-16)"
  if [ ! -f "$s3_stamp" ]; then
    echo "setup: installing the tests' S3 server (moto) into .venv-s3"
    [ -x .venv-s3/bin/python ] || "$py" -m venv .venv-s3
    if ! .venv-s3/bin/python -m pip install -q "$s3_reqs" >/tmp/ctscreen-setup-s3.log 2>&1; then
      grep -v "^WARNING: Location 'file:" /tmp/ctscreen-setup-s3.log >&2 || true
      echo "setup: 'pip install $s3_reqs' into .venv-s3 failed" >&2
      exit 1
    fi
    touch "$s3_stamp"
  fi
fi
echo "setup: ready (.venv, ctscreen${extras:+[$extras]})"
