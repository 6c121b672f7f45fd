#!/usr/bin/env bash
# Prints the path of the project's Python environment, creating it first when the
# requirements changed. The environment holds third-party packages only: our three
# distributions are put on PYTHONPATH by the Makefile, so one cached environment
# (5+ GB with torch) serves every checkout without pointing at a stale one.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
key=$(cat "$root/requirements/dev.txt" | sha256sum | cut -c1-12)
py=${PYTHON:-python3}
venv=${DIFFDISAGG_VENV:-$HOME/.cache/diffdisagg/venv-$key}
if [ ! -f "$venv/.complete" ]; then
  # several make/pytest processes may ask at once: one creates, the others wait for it
  mkdir -p "$(dirname "$venv")"
  exec 9>"$venv.lock"; flock 9
fi
if [ ! -f "$venv/.complete" ]; then
  echo "creating $venv" >&2
  rm -rf "$venv"; mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "$root/requirements/dev.txt" >&2
  touch "$venv/.complete"
fi
echo "$venv"
