#!/bin/bash
# Assemble the repository Triton serves and build the TensorRT plans it needs, with a cache.
#
# Runs as an init container in the TensorRT image whose version matches Triton's (24.10: TensorRT 10.5).
# A plan only loads on the GPU product and TensorRT version that built it, and only matches the ONNX it
# was built from, so plans are cached under
#     $CACHE/<gpu product>/trt-<TensorRT version>/<model>-<sha256 of model.onnx, 16 hex>/model.plan
# and a pod that finds its key there (with the COMPLETE marker) skips the build.
#
# Environment (set by the chart): SRC (source repository, read-only), DST (served repository), CACHE,
# BUILD ("true"/"false"), MODELS (space separated), INPUT_NAME, MIN_BATCH, OPT_BATCH, MAX_BATCH,
# PRECISION (fp16|fp32), WORKSPACE_MIB, BUILD_TIMEOUT (seconds), EXTRA_FLAGS.
set -euo pipefail

log() { echo "[build-engines] $*"; }
die() { echo "[build-engines] ERROR: $*" >&2; exit 1; }

[ -d "$SRC" ] || die "model source $SRC is not a directory"
log "copying model repository $SRC -> $DST"
cp -R "$SRC"/. "$DST"/

if [ "${BUILD:-true}" != "true" ]; then
  log "engine build disabled; serving the repository as is"
  exit 0
fi

sanitize() { tr -c 'A-Za-z0-9._\n-' '-' | sed 's/-\{2,\}/-/g; s/^-//; s/-$//'; }
gpu_product="${GPU_PRODUCT:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)}"
[ -n "$gpu_product" ] || die "cannot read the GPU product (nvidia-smi); is a GPU allocated to this init container?"
gpu_key="$(printf '%s\n' "$gpu_product" | sanitize)"
trt_version="${TRT_VERSION:-$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)}"
if [ -z "$trt_version" ]; then
  trt_version="$(trtexec 2>&1 | sed -n 's/.*TensorRT v\([0-9]*\).*/\1/p' | head -n1 || true)"
fi
[ -n "$trt_version" ] || die "cannot read the TensorRT version"
key_dir="$CACHE/$gpu_key/trt-$trt_version"
log "cache key: gpu=$gpu_key tensorrt=$trt_version ($key_dir)"

case "${PRECISION:-fp16}" in
  fp16) precision_flag="--fp16" ;;
  fp32) precision_flag="" ;;
  *) die "PRECISION must be fp16 or fp32, not ${PRECISION}" ;;
esac

for model in $MODELS; do
  onnx="$SRC/$model/1/model.onnx"
  [ -f "$onnx" ] || die "$onnx not found (render the gpu profile with: ctscreen repo --profile gpu)"
  digest="$(sha256sum "$onnx" | cut -c1-16)"
  entry="$key_dir/$model-$digest"
  plan="$entry/model.plan"
  if [ -f "$plan" ] && [ -f "$entry/COMPLETE" ]; then
    log "$model: cached plan $plan"
  else
    log "$model: building $plan"
    mkdir -p "$entry"
    tmp="$entry/model.plan.${HOSTNAME:-pod}.$$.tmp"
    # shellcheck disable=SC2086
    timeout "${BUILD_TIMEOUT:-1800}" trtexec \
      --onnx="$onnx" \
      --saveEngine="$tmp" \
      --minShapes="${INPUT_NAME}:${MIN_BATCH}x1x512x512" \
      --optShapes="${INPUT_NAME}:${OPT_BATCH}x1x512x512" \
      --maxShapes="${INPUT_NAME}:${MAX_BATCH}x1x512x512" \
      --memPoolSize="workspace:${WORKSPACE_MIB}M" \
      --skipInference \
      $precision_flag ${EXTRA_FLAGS:-} \
      || die "$model: trtexec failed"
    # rename is atomic: a pod reading the cache sees the old plan or the new one, never half of one
    mv -f "$tmp" "$plan"
    printf 'gpu=%s\ntensorrt=%s\nonnx_sha256_16=%s\n' "$gpu_product" "$trt_version" "$digest" > "$entry/COMPLETE"
  fi
  ln -sf "$plan" "$DST/$model/1/model.plan"
  rm -f "$DST/$model/1/model.onnx"
done
log "done"
