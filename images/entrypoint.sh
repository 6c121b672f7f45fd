#!/usr/bin/env bash
# Entry point of the worker images: makes the native libraries that wheels link but do not ship findable,
# computing every path from what is installed (never a hard-coded install prefix), then runs the command.
#   cuda:   the directory of the CUDA 12 runtime wheel (libcudart.so.12, needed by Mooncake's CUDA 12 build;
#           torch's own CUDA 13 libraries are found by torch itself)
#   npu:    CANN's environment from its set_env.sh, found from ASCEND_TOOLKIT_HOME / ASCEND_HOME_PATH (set by
#           CANN base images) or DIFFDISAGG_CANN_SET_ENV; libascendcl.so must then resolve.
#   cpu:    nothing to do.
set -euo pipefail
platform=${DIFFDISAGG_PLATFORM:-cpu}
py=${DIFFDISAGG_PYTHON:-python}

prepend_ld() { export LD_LIBRARY_PATH="$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; }

case "$platform" in
  cuda)
    # nvidia.cuda_runtime is a namespace package: its lib/ folder sits next to the first path entry.
    dir=$("$py" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)
    if [ -n "$dir" ] && [ -e "$dir/libcudart.so.12" ]; then prepend_ld "$dir"; else
      echo "entrypoint: libcudart.so.12 not found in the CUDA 12 runtime wheel; Mooncake's CUDA build will not load" >&2
    fi
    ;;
  npu)
    set_env=${DIFFDISAGG_CANN_SET_ENV:-}
    if [ -z "$set_env" ]; then
      for home in "${ASCEND_TOOLKIT_HOME:-}" "${ASCEND_HOME_PATH:-}"; do
        [ -n "$home" ] || continue
        # <toolkit>/latest is what the variables point at; set_env.sh lives beside or inside it.
        for cand in "$home/set_env.sh" "$(dirname "$home")/set_env.sh"; do
          [ -f "$cand" ] && { set_env=$cand; break 2; }
        done
      done
    fi
    if [ -n "$set_env" ]; then
      # CANN's script reads unset variables: source it without nounset.
      set +u; source "$set_env"; set -u
    else
      echo "entrypoint: CANN's set_env.sh not found (set ASCEND_TOOLKIT_HOME or DIFFDISAGG_CANN_SET_ENV)" >&2
    fi
    if ! "$py" -c 'import ctypes; ctypes.CDLL("libascendcl.so")' 2>/dev/null; then
      echo "entrypoint: libascendcl.so does not load: torch_npu and Mooncake's NPU wheel need CANN >= 8.3.RC1" >&2
      exit 1
    fi
    ;;
  cpu) ;;
  *) echo "entrypoint: DIFFDISAGG_PLATFORM must be cpu, cuda or npu, not '$platform'" >&2; exit 2 ;;
esac
exec "$@"
