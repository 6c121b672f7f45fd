#!/usr/bin/env bash
# Copies the CRDs of crds/ (the source of truth, generated from the operator's schema) into the CRD chart,
# charts/diffdisagg-crds/files/, whose one template re-emits each with the chart's labels and the
# `helm.sh/resource-policy: keep` annotation. Files in files/ that crds/ no longer has are removed.
#   scripts/sync-crds.sh          copy (prints what changed)
#   scripts/sync-crds.sh --check  change nothing; exit 1 and name the files when the chart has drifted
# It then runs scripts/sync-dashboards.sh with the same argument (docs/grafana/ -> charts/diffdisagg/dashboards/),
# so one call keeps every copy the charts hold in step with its source.
# tests/operator/test_chart_values.py runs --check, so a CRD or dashboard change that was not synced fails the tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=$root/crds
dst=$root/charts/diffdisagg-crds/files
check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

shopt -s nullglob
sources=("$src"/*.yaml)
if [ ${#sources[@]} -eq 0 ]; then
  echo "sync-crds: no CRD in $src: refusing to empty the chart" >&2
  exit 1
fi
for f in "${sources[@]}"; do
  grep -q '^kind: CustomResourceDefinition' "$f" || { echo "sync-crds: $f is not a CustomResourceDefinition" >&2; exit 1; }
done

drift=()
for f in "${sources[@]}"; do
  name=$(basename "$f")
  cmp -s "$f" "$dst/$name" || drift+=("$name")
done
for f in "$dst"/*.yaml; do
  [ -e "$src/$(basename "$f")" ] || drift+=("$(basename "$f") (not in crds/)")
done

if [ $check -eq 1 ]; then
  status=0
  if [ ${#drift[@]} -gt 0 ]; then
    printf 'sync-crds: charts/diffdisagg-crds/files differs from crds/: %s\n' "${drift[*]}" >&2
    echo "sync-crds: run scripts/sync-crds.sh" >&2
    status=1
  fi
  # both checks run, so one failing run names every drifted copy
  bash "$root/scripts/sync-dashboards.sh" --check || status=1
  exit $status
fi

mkdir -p "$dst"
for f in "$dst"/*.yaml; do
  [ -e "$src/$(basename "$f")" ] || { rm -f "$f"; echo "removed $(basename "$f")"; }
done
for f in "${sources[@]}"; do
  name=$(basename "$f")
  if ! cmp -s "$f" "$dst/$name"; then cp "$f" "$dst/$name"; echo "synced $name"; fi
done
bash "$root/scripts/sync-dashboards.sh"
