#!/usr/bin/env bash
# Stops the local test control plane (${DIFFDISAGG_PLANE_NAME:-default}, or every plane with --all) by PID,
# apiserver before etcd, and removes its network namespace and state directory. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
venv=$(scripts/venv.sh)
exec "$venv/bin/python" -m tests.cluster.plane down "$@"
