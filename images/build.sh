#!/usr/bin/env bash
# Builds every image (`make images`): operator, gateway, and worker-<platform>-<role> for cpu and cuda, plus
# ascend when CANN_BASE_IMAGE names a CANN base image. Needs a running Docker engine (or DOCKER=podman);
# says so and exits 2 when there is none, rather than pretending.
#   REGISTRY=diffdisagg TAG=<version> PLATFORMS="cpu cuda ascend" CANN_BASE_IMAGE=... images/build.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
docker=${DOCKER:-docker}
registry=${REGISTRY:-diffdisagg}
tag=${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/operator/pyproject.toml")}
platforms=${PLATFORMS:-cpu cuda ascend}

if ! command -v "$docker" >/dev/null 2>&1; then
  echo "images: no '$docker' command on PATH: no image was built" >&2; exit 2
fi
if ! "$docker" info >/dev/null 2>&1; then
  echo "images: '$docker' cannot reach a container engine (is the daemon running?): no image was built" >&2; exit 2
fi

build() {  # build DOCKERFILE IMAGE [TARGET] [ARGS...]
  local file=$1 image=$2 target=${3:-}; shift 3 || shift $#
  echo "images: building $registry/$image:$tag" >&2
  "$docker" build -f "$root/images/$file" ${target:+--target "$target"} -t "$registry/$image:$tag" "$@" "$root"
}

build operator.Dockerfile operator ""
build gateway.Dockerfile gateway ""
for p in $platforms; do
  args=()
  if [ "$p" = ascend ]; then
    if [ -z "${CANN_BASE_IMAGE:-}" ]; then
      echo "images: skipping ascend: set CANN_BASE_IMAGE to a CANN >= 8.3.RC1 image (see docs/ascend.md)" >&2
      continue
    fi
    args=(--build-arg "CANN_BASE_IMAGE=$CANN_BASE_IMAGE")
  fi
  for role in prefill denoise decode; do
    build "worker-$p.Dockerfile" "worker-$p-$role" "$role" "${args[@]}"
  done
done
