# Shared steps of the image install scripts (sourced, not run). Each images/install/<image>.sh parses the same
# options, then calls these functions; the Dockerfile and tests/images/test_install_scripts.py run those
# scripts, so what a test installs is exactly what an image installs.
#
# Options (every script):
#   --python PY            interpreter of the target environment (default: python3; images use /opt/diffdisagg/bin/python)
#   --src DIR              repository root with operator/ worker/ transport/ (default: the checkout this script is in)
#   --role ROLE            worker images only: prefill | denoise | decode (decode adds the video encoder)
#   --resolve-only REPORT  resolve the pinned set and write pip's JSON report to REPORT; install nothing
#   --platform TAG         with --resolve-only: resolve for another platform (repeatable), e.g. manylinux_2_35_aarch64
#   --no-system            skip the Debian packages step (already there, or not a Debian base)
# Environment: PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS are honoured as pip always does.
set -euo pipefail

IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQ_DIR=$IMAGES_DIR/requirements
PY=python3
SRC=$(cd "$IMAGES_DIR/.." && pwd)
ROLE=""
RESOLVE_REPORT=""
PLATFORMS=()
SYSTEM=1

log() { printf '[install/%s %s] %s\n' "${IMAGE:-?}" "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --python) PY=$2; shift 2 ;;
      --src) SRC=$(cd "$2" && pwd); shift 2 ;;
      --role) ROLE=$2; shift 2 ;;
      --resolve-only) RESOLVE_REPORT=$2; shift 2 ;;
      --platform) PLATFORMS+=("$2"); shift 2 ;;
      --no-system) SYSTEM=0; shift ;;
      -h|--help) sed -n '/^# Options/,/^# Environment/p' "${BASH_SOURCE[0]}" >&2; exit 0 ;;
      *) die "unknown option $1 (see --help)" ;;
    esac
  done
  if [ ${#PLATFORMS[@]} -gt 0 ] && [ -z "$RESOLVE_REPORT" ]; then
    die "--platform only makes sense with --resolve-only (pip cannot install for another platform)"
  fi
  "$PY" - <<'PYEOF' || die "$PY is not Python 3.11 or newer"
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PYEOF
}

# require_role: the worker images' per-role targets. decode is the only role that encodes video (MP4).
require_role() {
  case "$ROLE" in
    prefill|denoise|decode) ;;
    "") die "--role prefill|denoise|decode is required for this image" ;;
    *) die "--role must be prefill, denoise or decode, not '$ROLE'" ;;
  esac
}

# debian_packages PKG...: install the Debian runtime libraries a wheel needs but does not ship, when missing.
debian_packages() {
  [ $SYSTEM -eq 1 ] || { log "skipping Debian packages (--no-system)"; return 0; }
  [ -n "$RESOLVE_REPORT" ] && return 0
  command -v dpkg >/dev/null || { log "not a Debian-based system: make sure these are installed: $*"; return 0; }
  local need=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
  [ ${#need[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "need root to apt-get install ${need[*]}"
  log "apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
  rm -rf /var/lib/apt/lists/*
}

# build_wheels DIST_DIR...: wheels of our own distributions (from the source tree), into $WHEELS.
build_wheels() {
  WHEELS=$(mktemp -d)
  trap 'rm -rf "$WHEELS"' EXIT
  local d
  for d in "$@"; do
    [ -f "$SRC/$d/pyproject.toml" ] || die "$SRC/$d/pyproject.toml not found (--src must be the repository root)"
  done
  log "building wheels of: $*"
  # The build backend (hatchling) comes from the index in an isolated build environment.
  (cd "$SRC" && "$PY" -m pip wheel -q --no-deps --wheel-dir "$WHEELS" "${@/#/./}") >&2
}

# wheel NAME: path of the built wheel of distribution NAME (e.g. diffdisagg_worker).
wheel() {
  local w
  w=$(ls "$WHEELS"/"$1"-*.whl 2>/dev/null | head -1)
  [ -n "$w" ] || die "no wheel built for $1"
  echo "$w"
}

# pip_install ARGS...: install (or, with --resolve-only, resolve) ARGS. pip resolves the whole set at once,
# so the pins of every requirements file and our wheels' own requirements must agree.
pip_install() {
  if [ -n "$RESOLVE_REPORT" ]; then
    local plat=()
    if [ ${#PLATFORMS[@]} -gt 0 ]; then
      local p m
      for p in "${PLATFORMS[@]}"; do
        plat+=(--platform "$p")
        # pip does not widen an explicit manylinux_2_N tag to the older glibc tags a real install on such a
        # system accepts (most wheels are manylinux_2_17 / manylinux2014): list them.
        if [[ $p =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
          for ((m = BASH_REMATCH[1] - 1; m >= 17; m--)); do plat+=(--platform "manylinux_2_${m}_${BASH_REMATCH[2]}"); done
          plat+=(--platform "manylinux2014_${BASH_REMATCH[2]}")
        fi
      done
      plat+=(--only-binary=:all: --implementation cp
             --python-version "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')")
    fi
    log "resolving (dry run${PLATFORMS:+ for ${PLATFORMS[*]}}) -> $RESOLVE_REPORT"
    "$PY" -m pip install -q --dry-run --ignore-installed --report "$RESOLVE_REPORT" "${plat[@]}" "$@" >&2
  else
    log "pip install $*"
    "$PY" -m pip install -q "$@" >&2
  fi
}

# check_imports CODE: run CODE in the target interpreter after a real install (an image that cannot import
# what it installed fails its build here, not at the first request).
check_imports() {
  [ -n "$RESOLVE_REPORT" ] && return 0
  log "checking imports"
  "$PY" -c "$1"
}
