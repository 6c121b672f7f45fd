#!/usr/bin/env bash
# Starts (or reuses, when healthy) the local test control plane named ${DIFFDISAGG_PLANE_NAME:-default}:
# builds the binaries first when they are not cached, then runs tests/cluster/plane.py. Prints the
# `export KUBECONFIG=...` line to use it. `scripts/cluster/down.sh` stops it. See docs/control-plane.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
venv=$(scripts/venv.sh)
scripts/cluster/build.sh >/dev/null
exec "$venv/bin/python" -m tests.cluster.plane up "$@"
