#!/bin/sh
# One-shot MinIO set-up for compose, run in the minio/mc image with the root credentials:
# the two buckets, the application's user (objects of those buckets only) and the results reader
# whose key signs download URLs (GetObject on processed-images, nothing else). Safe to run again:
# existing buckets are kept, users get their secret and policy re-applied.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
: "${MINIO_ACCESS_KEY:?}" "${MINIO_SECRET_KEY:?}"
: "${MINIO_PRESIGN_ACCESS_KEY:?}" "${MINIO_PRESIGN_SECRET_KEY:?}"
POLICIES=/opt/pixelmill/minio

mc alias set pixelmill http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing pixelmill/raw-images pixelmill/processed-images

# grant USER SECRET POLICY: create or update the user and attach exactly that policy.
grant() {
    mc admin policy create pixelmill "$3" "$POLICIES/$3.json"
    mc admin user add pixelmill "$1" "$2"
    # Attaching a policy the user already holds is an error in mc; the state is what we want.
    mc admin policy attach pixelmill "$3" --user "$1" 2>/dev/null ||
        mc admin user info pixelmill "$1" | grep -q "$3"
}

grant "$MINIO_ACCESS_KEY" "$MINIO_SECRET_KEY" app-policy
grant "$MINIO_PRESIGN_ACCESS_KEY" "$MINIO_PRESIGN_SECRET_KEY" results-reader-policy
