#!/usr/bin/env bash
# Builds (once) prometheus-adapter from Go modules and caches the binary, keyed by version, under
# ${DIFFDISAGG_ADAPTER_CACHE:-~/.cache/diffdisagg/prometheus-adapter}/<version>/bin/adapter.
# prometheus-adapter's go.mod has no replace directives, but `go install module/cmd/adapter@version` still fails
# here: it looks up the module's deprecation through the version *list*, which the module proxy answers with 403
# for sigs.k8s.io/prometheus-adapter, while it serves the release itself. So the binary is built from a one-line
# wrapper module (`require sigs.k8s.io/prometheus-adapter <version>`): with nothing else required, minimal version
# selection picks exactly upstream's released dependency set (k8s.io/* v0.30.0 for v0.12.0).
# The version is pinned (v0.12.0 = the newest upstream release) because the list cannot be read.
# A stamp file records what was built; when it matches, the script only verifies and exits.
# Prints the path of the binary as its last line (stdout); progress and timings go to stderr.
set -euo pipefail

VERSION=${DIFFDISAGG_ADAPTER_VERSION:-v0.12.0}
CACHE_ROOT=${DIFFDISAGG_ADAPTER_CACHE:-$HOME/.cache/diffdisagg/prometheus-adapter}
W=$CACHE_ROOT/$VERSION
BIN=$W/bin/adapter
STAMP=$W/stamp
WANT_STAMP="prometheus-adapter=$VERSION"

log() { printf '[build-adapter.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
cached() { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT_STAMP" ] && [ -x "$BIN" ]; }

if cached; then log "cached: $WANT_STAMP in $W"; echo "$BIN"; exit 0; fi
command -v go >/dev/null || { log "no Go toolchain on PATH: cannot build prometheus-adapter"; exit 3; }

mkdir -p "$W/bin"
# One build at a time per cache directory: a second caller waits for the first, then finds the stamp.
exec 9>"$W/.build.lock"
if ! flock -n 9; then
  log "another build holds $W/.build.lock; waiting for it"
  flock 9
  if cached; then log "built by the other process"; echo "$BIN"; exit 0; fi
fi

T0=$(date +%s)
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
WRAP=$W/wrapper
mkdir -p "$WRAP"
printf 'module local.invalid/adapterbin\n\ngo 1.22.1\n\nrequire sigs.k8s.io/prometheus-adapter %s\n' "$VERSION" > "$WRAP/go.mod"
( cd "$WRAP" && go build -trimpath -ldflags "-s -w" -o "$BIN" sigs.k8s.io/prometheus-adapter/cmd/adapter )
# --help exits non-zero (pflag's ErrHelp ends in klog.Fatal); the usage text proves the binary runs.
usage=$("$BIN" --help 2>&1 || true)
[[ $usage == *--prometheus-url* ]] || { log "built $BIN does not run"; exit 1; }
echo "$WANT_STAMP" > "$STAMP"
log "built $WANT_STAMP in $(( $(date +%s) - T0 )) s ($(du -h "$BIN" | cut -f1))"
echo "$BIN"
