#!/bin/bash
# Assemble the repository Triton serves and build the TensorRT plans it needs, with a shared cache.
#
# Runs as an init container in the TensorRT image whose version matches Triton's (24.10: TensorRT 10.5).
# A plan only loads on the GPU (product and MIG profile) and TensorRT version that built it, and it
# bakes in the ONNX, the precision, the optimisation profile, the workspace and the trtexec flags. All
# of them (and the GPU resource name) are written to a KEY file whose sha256 names the cache entry:
#     $CACHE/<gpu product>[-mig-<profile>]/trt-<TensorRT version>/<model>/<key, 20 hex>/
#         model.plan  KEY  COMPLETE  LAST_USED
# A changed parameter is a new key: a published entry is never replaced.
#
# Many pods of a scale-up start at once on one ReadWriteMany cache, so:
# - one lock per key ($CACHE/.locks/<model>-<key>.lock, flock): the first pod builds while the others
#   wait on the lock, then load what it published;
# - a build writes <key>.tmp.<pod>.<pid>/ and publishes it with one rename to <key>/ (atomic), then writes
#   "published" into the key's lock file: a pod whose NFS view of the folder lags (lookup and attribute
#   caches) waits for the entry to show instead of building it again (PUBLISH_VISIBLE_S, default 120; an
#   entry that never shows, removed by hand, is built again);
# - the plan is copied into the pod's own repository ($DST): removing an old key never takes a plan
#   from under a running Triton;
# - cleanup: *.tmp.* older than the build timeout (interrupted builds) and keys unused for
#   CACHE_MAX_AGE_DAYS days (each removal under its key's lock, skipped while someone holds it).
#
# Environment (set by the chart): SRC (source repository, read-only), DST (served repository), CACHE,
# BUILD ("true"/"false"), MODELS (space separated), INPUT_NAME, MIN_BATCH, OPT_BATCH, MAX_BATCH,
# PRECISION (fp16|fp32), WORKSPACE_MIB, BUILD_TIMEOUT (seconds), EXTRA_FLAGS, GPU_RESOURCE (e.g.
# nvidia.com/gpu, nvidia.com/mig-1g.10gb), CACHE_MAX_AGE_DAYS (0: keep every key). Optional
# overrides: GPU_PRODUCT, MIG_PROFILE, TRT_VERSION (read from nvidia-smi and TensorRT otherwise).
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

command -v flock >/dev/null || die "flock (util-linux) is needed to share the engine cache"
for n in MIN_BATCH OPT_BATCH MAX_BATCH WORKSPACE_MIB BUILD_TIMEOUT; do
  case "${!n:-}" in ''|*[!0-9]*) die "$n must be a whole number, got '${!n:-}'" ;; esac
done
# The plans' batch range against the served configs, before any build: Triton refuses a plan whose largest batch
# is not the config's max_batch_size (ctscreen repo build --max-batch-size), and only after the build (minutes).
for model in ${MODELS:-}; do
  cfg="$SRC/$model/config.pbtxt"
  [ -f "$cfg" ] || continue  # a missing model is reported below, with its ONNX
  served="$(sed -n 's/^max_batch_size: *\([0-9][0-9]*\) *$/\1/p' "$cfg" | head -n1)"
  if [ -n "$served" ] && [ "$served" != "$MAX_BATCH" ]; then
    die "$model: MAX_BATCH $MAX_BATCH (triton.engines.maxBatch) differs from max_batch_size $served in $cfg; Triton would refuse the plan: render with --max-batch-size $MAX_BATCH or set maxBatch to $served"
  fi
done
case "${PRECISION:-fp16}" in
  fp16) precision_flag="--fp16" ;;
  fp32) precision_flag="" ;;
  *) die "PRECISION must be fp16 or fp32, not ${PRECISION}" ;;
esac

sanitize() { tr -c 'A-Za-z0-9._\n-' '-' | sed 's/-\{2,\}/-/g; s/^-//; s/-$//'; }
gpu_product="${GPU_PRODUCT:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)}"
[ -n "$gpu_product" ] || die "cannot read the GPU product (nvidia-smi); is a GPU allocated to this init container?"
# A MIG slice shows as "  MIG 1g.10gb Device 0: (UUID: MIG-...)" under its GPU.
mig_profile="${MIG_PROFILE-$(nvidia-smi -L 2>/dev/null | sed -n 's/^ *MIG \([^ ]*\) .*/\1/p' | head -n1 || true)}"
gpu_key="$(printf '%s\n' "$gpu_product" | sanitize)"
[ -z "$mig_profile" ] || gpu_key="$gpu_key-mig-$(printf '%s\n' "$mig_profile" | sanitize)"
trt_version="${TRT_VERSION:-$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)}"
if [ -z "$trt_version" ]; then
  trt_version="$(trtexec 2>&1 | sed -n 's/.*TensorRT v\([0-9]*\).*/\1/p' | head -n1 || true)"
fi
[ -n "$trt_version" ] || die "cannot read the TensorRT version"
trt_key="trt-$(printf '%s\n' "$trt_version" | sanitize)"
log "gpu=$gpu_product mig=${mig_profile:-none} resource=${GPU_RESOURCE:-nvidia.com/gpu} tensorrt=$trt_version"

build_timeout="$BUILD_TIMEOUT"
lock_wait=$((build_timeout + 300))
visible_wait="${PUBLISH_VISIBLE_S:-120}"  # how long a published entry may take to show on a lagging NFS view
mkdir -p "$CACHE/.locks"
current_keys=" "

for model in $MODELS; do
  onnx="$SRC/$model/1/model.onnx"
  [ -f "$onnx" ] || die "$onnx not found (render the gpu profile with: ctscreen repo --profile gpu)"
  shapes="min=${INPUT_NAME}:${MIN_BATCH}x1x512x512 opt=${INPUT_NAME}:${OPT_BATCH}x1x512x512 max=${INPUT_NAME}:${MAX_BATCH}x1x512x512"
  key_text="$(printf '%s\n' "format=2" "gpu=$gpu_product" "mig=${mig_profile:-none}" \
    "resource=${GPU_RESOURCE:-nvidia.com/gpu}" "tensorrt=$trt_version" "model=$model" \
    "onnx_sha256=$(sha256sum "$onnx" | cut -d' ' -f1)" "profile=$shapes" "precision=${PRECISION:-fp16}" \
    "workspace_mib=$WORKSPACE_MIB" "extra_flags=${EXTRA_FLAGS:-}")"
  key="$(printf '%s\n' "$key_text" | sha256sum | cut -c1-20)"
  parent="$CACHE/$gpu_key/$trt_key/$model"
  entry="$parent/$key"
  current_keys="$current_keys$entry "
  log "$model: key $gpu_key/$trt_key/$model/$key"
  mkdir -p "$parent"
  # read-write: on NFSv4/EFS flock is a POSIX lock, and a shared (read) lock on a write-only descriptor fails
  # with EBADF (every pod that found a finished plan died here; local file systems do not check)
  lockfile="$CACHE/.locks/$model-$key.lock"
  exec 9<>"$lockfile"
  if [ -f "$entry/COMPLETE" ]; then
    # shared: a cleanup (exclusive) cannot remove the entry while it is copied
    flock -s -w "$lock_wait" 9 || die "$model: timed out waiting for the lock of $key"
    log "$model: cached plan $entry/model.plan"
  else
    if ! flock -n 9; then
      log "$model: another pod is building $key; waiting for its lock"
      flock -w "$lock_wait" 9 || die "$model: timed out after ${lock_wait}s waiting for the build of $key"
    fi
    # A builder writes "published" into the lock file once its entry is in place. On NFS this pod's view
    # of the folder may lag (attribute and lookup caches: the entry not there yet), while the locked file
    # itself is read fresh: wait for the entry to show instead of building it again (and failing to
    # publish onto it).
    marker=""
    read -r marker <&9 || true
    if [ "$marker" = "published" ] && [ ! -f "$entry/COMPLETE" ]; then
      log "$model: $key was published by another pod; waiting for it to show here"
      waited=0
      while [ ! -f "$entry/COMPLETE" ] && [ "$waited" -lt "$visible_wait" ]; do
        ls "$parent" >/dev/null 2>&1 || true  # reading the folder revalidates its cached view
        sleep 1
        waited=$((waited + 1))
      done
      if [ ! -f "$entry/COMPLETE" ]; then  # gone (removed by hand, a cleanup cut short): build it again
        log "$model: $key is marked published but $entry has not shown here in ${waited}s; building it again"
        truncate -s 0 "$lockfile"
      fi
    fi
    if [ -f "$entry/COMPLETE" ]; then
      log "$model: cached plan $entry/model.plan (published while this pod waited)"
    else
      if [ -e "$entry" ]; then  # an entry without COMPLETE is not from this script: set it aside
        mv "$entry" "$entry.tmp.broken.$$"
      fi
      tmp="$entry.tmp.${HOSTNAME:-pod}.$$"
      rm -rf "$tmp"
      mkdir -p "$tmp"
      log "$model: building $entry/model.plan"
      # shellcheck disable=SC2086
      timeout "$build_timeout" trtexec \
        --onnx="$onnx" \
        --saveEngine="$tmp/model.plan" \
        --minShapes="${INPUT_NAME}:${MIN_BATCH}x1x512x512" \
        --optShapes="${INPUT_NAME}:${OPT_BATCH}x1x512x512" \
        --maxShapes="${INPUT_NAME}:${MAX_BATCH}x1x512x512" \
        --memPoolSize="workspace:${WORKSPACE_MIB}M" \
        --skipInference \
        $precision_flag ${EXTRA_FLAGS:-} \
        || { rm -rf "$tmp"; die "$model: trtexec failed"; }
      [ -s "$tmp/model.plan" ] || { rm -rf "$tmp"; die "$model: trtexec wrote no plan"; }
      printf '%s\n' "$key_text" > "$tmp/KEY"
      date -u +%Y-%m-%dT%H:%M:%SZ > "$tmp/COMPLETE"
      # one rename publishes the whole entry; the key path did not exist (checked under the lock)
      if mv -T "$tmp" "$entry" 2>/dev/null; then
        # from a child process, at the file's start: this process's descriptor 9 (holding the lock) stays
        # open and its offset does not matter
        (printf 'published\n' > "$lockfile")
        log "$model: built and published $entry"
      elif [ -f "$entry/COMPLETE" ]; then  # published meanwhile, where this pod's view did not show it
        rm -rf "$tmp"
        log "$model: $entry was published by another pod meanwhile; using it"
      else
        rm -rf "$tmp"
        die "$model: could not publish $entry"
      fi
    fi
  fi
  touch "$entry/LAST_USED" 2>/dev/null || true
  cp "$entry/model.plan" "$DST/$model/1/model.plan.tmp"
  mv -f "$DST/$model/1/model.plan.tmp" "$DST/$model/1/model.plan"
  rm -f "$DST/$model/1/model.onnx"
  flock -u 9
  exec 9>&-
done

# --- cleanup: interrupted builds and keys nobody used for CACHE_MAX_AGE_DAYS days ---------------------
stale_min=$((build_timeout / 60 + 10))
find "$CACHE" -mindepth 4 -maxdepth 4 -type d -name '*.tmp.*' -mmin +"$stale_min" -print 2>/dev/null \
  | while read -r tmp; do log "removing stale $tmp"; rm -rf "$tmp"; done
max_age="${CACHE_MAX_AGE_DAYS:-30}"
if [ "$max_age" != "0" ]; then
  find "$CACHE" -mindepth 5 -maxdepth 5 -type f -name LAST_USED -mtime +"$max_age" -print 2>/dev/null \
    | while read -r used; do
        old="$(dirname "$used")"
        case "$current_keys" in *" $old "*) continue ;; esac
        old_model="$(basename "$(dirname "$old")")"
        old_lock="$CACHE/.locks/$old_model-$(basename "$old").lock"
        exec 8<>"$old_lock"
        if flock -n 8; then
          log "removing $old (unused for more than $max_age days)"
          if mv -T "$old" "$old.tmp.expired.$$"; then
            truncate -s 0 "$old_lock"  # no longer published
            rm -rf "$old.tmp.expired.$$" || log "could not remove all of $old.tmp.expired.$$ (removed later)"
          fi
        fi
        exec 8>&-
      done
fi
log "done"
