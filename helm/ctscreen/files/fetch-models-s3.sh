#!/bin/sh
# Copy the gpu-profile model repository from S3-compatible storage into the pod (init container).
# Environment: S3_URL (s3://bucket/prefix), S3_ENDPOINT_URL (empty for AWS), AWS_REGION, DEST.
set -eu
case "$S3_URL" in
  s3://*) ;;
  *) echo "[fetch-models] ERROR: S3_URL must start with s3://, got '$S3_URL'" >&2; exit 1 ;;
esac
if [ -n "${S3_ENDPOINT_URL:-}" ]; then
  aws s3 sync "$S3_URL" "$DEST" --only-show-errors --endpoint-url "$S3_ENDPOINT_URL"
else
  aws s3 sync "$S3_URL" "$DEST" --only-show-errors
fi
echo "[fetch-models] synced $S3_URL -> $DEST"
