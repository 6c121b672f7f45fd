#!/usr/bin/env bash
# Copies the Grafana dashboards of docs/grafana/ (the source of truth: tests/contract/test_dashboard_metrics.py
# checks every metric and label they query against a real gateway) into the operator chart,
# charts/diffdisagg/dashboards/, which templates/monitoring/grafana-dashboard.yaml ships as a ConfigMap
# (`grafanaDashboard.enabled`). Files in dashboards/ that docs/grafana/ no longer has are removed.
#   scripts/sync-dashboards.sh          copy (prints what changed)
#   scripts/sync-dashboards.sh --check  change nothing; exit 1 and name the files when the chart has drifted
# scripts/sync-crds.sh runs this too (same argument), so its --check covers both copies.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=$root/docs/grafana
dst=$root/charts/diffdisagg/dashboards
check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

shopt -s nullglob
sources=("$src"/*.json)
if [ ${#sources[@]} -eq 0 ]; then
  echo "sync-dashboards: no dashboard in $src: refusing to empty the chart" >&2
  exit 1
fi
for f in "${sources[@]}"; do
  # A dashboard Grafana can import: one JSON object with a uid (the sidecar updates by uid). 1 MiB is the
  # ConfigMap limit; stay well below it since Helm's release record holds the manifest too.
  python3 - "$f" <<'PY' || { echo "sync-dashboards: $f is not an importable Grafana dashboard" >&2; exit 1; }
import json, os, sys
path = sys.argv[1]
doc = json.load(open(path, encoding="utf-8"))
assert isinstance(doc, dict) and doc.get("uid") and isinstance(doc.get("panels"), list), "no uid or panels"
assert os.path.getsize(path) < 512 * 1024, "larger than 512 KiB"
PY
done

drift=()
for f in "${sources[@]}"; do
  name=$(basename "$f")
  cmp -s "$f" "$dst/$name" || drift+=("$name")
done
for f in "$dst"/*.json; do
  [ -e "$src/$(basename "$f")" ] || drift+=("$(basename "$f") (not in docs/grafana/)")
done

if [ $check -eq 1 ]; then
  if [ ${#drift[@]} -gt 0 ]; then
    printf 'sync-dashboards: charts/diffdisagg/dashboards differs from docs/grafana/: %s\n' "${drift[*]}" >&2
    echo "sync-dashboards: run scripts/sync-dashboards.sh (or scripts/sync-crds.sh)" >&2
    exit 1
  fi
  exit 0
fi

mkdir -p "$dst"
for f in "$dst"/*.json; do
  [ -e "$src/$(basename "$f")" ] || { rm -f "$f"; echo "removed $(basename "$f")"; }
done
for f in "${sources[@]}"; do
  name=$(basename "$f")
  if ! cmp -s "$f" "$dst/$name"; then cp "$f" "$dst/$name"; echo "synced $name"; fi
done
