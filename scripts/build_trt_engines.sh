#!/usr/bin/env bash
# Build the TensorRT plans of a rendered gpu-profile repository, where the GPU is (trtexec, FP16).
#
#   ctscreen repo build --profile gpu --out /models/gpu-src          # anywhere: ONNX -> TensorRT-ready ONNX
#   scripts/build_trt_engines.sh --repo /models/gpu-src --out /models/gpu [--cache /cache/trt]
#   tritonserver --model-repository /models/gpu                      # same TensorRT version as trtexec
#
# Options (each also settable by the environment variable in brackets, the chart's contract):
#   --repo DIR          rendered gpu repository, read-only [SRC]
#   --out DIR           repository to serve: a copy of --repo with <model>/1/model.plan [DST]
#   --cache DIR         plan cache [CACHE], default ${XDG_CACHE_HOME:-$HOME/.cache}/ctscreen/trt
#   --models "A B"      models to build [MODELS], default "valid_area lesion"
#   --min-batch N       [MIN_BATCH] default 1
#   --opt-batch N       [OPT_BATCH] default: opt_batch of the render (.ctscreen-repo.json), else 16
#   --max-batch N       [MAX_BATCH] default: max_batch_size of the render, else 32; must equal the
#                       max_batch_size in config.pbtxt, or Triton refuses the plan
#   --precision P       fp16 | fp32 [PRECISION] default fp16
#   --workspace-mib N   trtexec workspace pool [WORKSPACE_MIB] default 4096
#   --dry-run           run nothing on a GPU: print the trtexec command lines (a stand-in trtexec
#                       writes placeholder plans into the cache under the dry-run key)
#
# What it runs, per model (the cache key and the skip-when-cached logic are in the chart's script):
#   trtexec --onnx=<repo>/<model>/1/model.onnx --saveEngine=<cache entry>/model.plan \
#           --minShapes=HU_SLICES:1x1x512x512 --optShapes=HU_SLICES:16x1x512x512 \
#           --maxShapes=HU_SLICES:32x1x512x512 --memPoolSize=workspace:4096M --skipInference --fp16
# Plans are cached under <cache>/<gpu product>/trt-<TensorRT version>/<model>-<sha256(onnx), 16 hex>/
# and a second run with the same GPU product, TensorRT version and ONNX skips the build.
#
# One implementation: this wrapper maps its options onto helm/ctscreen/files/build-engines.sh, the
# script the chart's "build-engines" init container runs (environment SRC DST CACHE BUILD MODELS
# INPUT_NAME MIN_BATCH OPT_BATCH MAX_BATCH PRECISION WORKSPACE_MIB BUILD_TIMEOUT EXTRA_FLAGS
# GPU_PRODUCT TRT_VERSION).
# Not run on the development machines (no GPU, no TensorRT): there the tests drive it with stand-ins
# for trtexec and nvidia-smi and check the command line, the FP32-input ONNX and the cache.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
impl="${CTSCREEN_BUILD_ENGINES_IMPL:-$here/../helm/ctscreen/files/build-engines.sh}"
die() { echo "build_trt_engines: $*" >&2; exit 2; }

dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --repo) SRC="${2:?--repo needs a folder}"; shift 2 ;;
    --out) DST="${2:?--out needs a folder}"; shift 2 ;;
    --cache) CACHE="${2:?--cache needs a folder}"; shift 2 ;;
    --models) MODELS="${2:?--models needs names}"; shift 2 ;;
    --min-batch) MIN_BATCH="${2:?}"; shift 2 ;;
    --opt-batch) OPT_BATCH="${2:?}"; shift 2 ;;
    --max-batch) MAX_BATCH="${2:?}"; shift 2 ;;
    --precision) PRECISION="${2:?}"; shift 2 ;;
    --workspace-mib) WORKSPACE_MIB="${2:?}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ -n "${SRC:-}" ] || die "--repo is required (a repository rendered by: ctscreen repo build --profile gpu)"
[ -n "${DST:-}" ] || die "--out is required"
[ -d "$SRC" ] || die "--repo $SRC is not a folder"
[ -f "$impl" ] || die "engine build script not found: $impl"
marker="$SRC/.ctscreen-repo.json"
[ -f "$marker" ] || die "$SRC was not rendered by ctscreen repo build (no .ctscreen-repo.json)"
setting() {  # setting NAME: a value from the render's manifest
  python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m[sys.argv[2]] if sys.argv[2]=="profile" else m["settings"][sys.argv[2]])' "$marker" "$1" 2>/dev/null || true
}
profile="$(setting profile)"
[ -z "$profile" ] || [ "$profile" = "gpu" ] || die "$SRC holds the $profile profile; plans are built for the gpu profile"

export SRC DST
export CACHE="${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ctscreen/trt}"
export MODELS="${MODELS:-valid_area lesion}"
export INPUT_NAME="${INPUT_NAME:-HU_SLICES}"
export MIN_BATCH="${MIN_BATCH:-1}"
export OPT_BATCH="${OPT_BATCH:-$(setting opt_batch)}"; OPT_BATCH="${OPT_BATCH:-16}"
export MAX_BATCH="${MAX_BATCH:-$(setting max_batch_size)}"; MAX_BATCH="${MAX_BATCH:-32}"
export PRECISION="${PRECISION:-fp16}"
export WORKSPACE_MIB="${WORKSPACE_MIB:-4096}"
export BUILD_TIMEOUT="${BUILD_TIMEOUT:-3600}"  # seconds a build may take (and the age of a stale temp)
export BUILD="${BUILD:-true}"
for model in $MODELS; do  # the batch range against the config: checked by the build script itself
  [ -f "$SRC/$model/config.pbtxt" ] || die "$SRC/$model/config.pbtxt not found"
done

if [ "$dry_run" = 1 ]; then
  shim="$(mktemp -d)"; trap 'rm -rf "$shim"' EXIT  # the placeholder plans stay in <cache>/dry-run/
  cat > "$shim/trtexec" <<'SHIM'
#!/usr/bin/env bash
[ $# -eq 0 ] && { echo "&&&& RUNNING TensorRT.trtexec [TensorRT vDRYRUN] # trtexec"; exit 0; }
echo "[dry-run] trtexec $*"
for a in "$@"; do case "$a" in --saveEngine=*) echo "dry-run placeholder plan" > "${a#--saveEngine=}" ;; esac; done
SHIM
  chmod +x "$shim/trtexec"
  export PATH="$shim:$PATH" GPU_PRODUCT=dry-run TRT_VERSION=dry-run  # never a real cache key
  echo "build_trt_engines: dry run: nothing is built; --out gets placeholder plans"
fi

mkdir -p "$DST" "$CACHE"
bash "$impl"
