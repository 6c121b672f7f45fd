#!/usr/bin/env bash
# The test tiers of DESIGN.md, each timed, so CI's 90-minute budget stays visible.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd); cd "$root"
venv=$(scripts/venv.sh); py="$venv/bin/python"
export PYTHONPATH="$root/transport/src:$root/worker/src:$root/operator/src"
export PATH="$venv/bin:$PATH"
declare -a summary=(); rc=0
tier() {
  local name=$1; shift
  local t0=$SECONDS
  echo "=== tier: $name"
  "$@"; local r=$?
  # pytest exit 5 = nothing collected: a tier that ran no test is a failure, not a pass
  [ $r -eq 0 ] || rc=1
  summary+=("$(printf '%-10s %4ds  rc=%d' "$name" $((SECONDS - t0)) $r)")
}
tier lint "$venv/bin/ruff" check .
# heavy builds (cached under ~/.cache/diffdisagg, keyed by version) before any pytest tier (the chart unit
# tests use the plane's helm too), so a cold build never counts against a test's timeout
tier build bash -c 'scripts/cluster/build.sh >/dev/null && scripts/metrics/install.sh >/dev/null && scripts/metrics/build-adapter.sh >/dev/null'
tier unit "$py" -m pytest -q tests/test_layout.py tests/transport tests/worker tests/operator tests/contract
tier e2e "$py" -m pytest -q tests/e2e
tier cluster "$py" -m pytest -q tests/cluster
tier images "$py" -m pytest -q tests/images
echo "=== tier times"; printf '%s\n' "${summary[@]}"
exit $rc
