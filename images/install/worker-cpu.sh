#!/usr/bin/env bash
# Install steps of the CPU worker image, one role per target (--role prefill|denoise|decode; decode adds the
# video encoder): PyPI torch 2.14.0, the diffusers stack, Mooncake's non-CUDA wheel (+ Debian libibverbs1).
# Run by images/worker-cpu.Dockerfile and tests/images/test_install_scripts.py.
IMAGE=worker-cpu
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require_role
# Mooncake's engine.so links libibverbs/libnuma/libcurl, which the wheel does not ship.
debian_packages libibverbs1 libnuma1 libcurl4
build_wheels transport worker
extra=()
[ "$ROLE" = decode ] && extra=(-r "$REQ_DIR/video.txt")
pip_install -r "$REQ_DIR/gateway.txt" -r "$REQ_DIR/worker-models.txt" -r "$REQ_DIR/worker-cpu.txt" "${extra[@]}" \
  "$(wheel diffdisagg_transport)" "$(wheel diffdisagg_worker)"
check_imports "
import torch, diffusers, transformers, mooncake.engine
import diffdisagg.worker, diffdisagg.transport
assert torch.__version__.split('+')[0] == '2.14.0', torch.__version__
if '$ROLE' == 'decode':
    import imageio_ffmpeg
    imageio_ffmpeg.get_ffmpeg_exe()
print('worker-cpu ($ROLE) ok: torch', torch.__version__)
"
