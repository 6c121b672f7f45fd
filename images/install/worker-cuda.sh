#!/usr/bin/env bash
# Install steps of the CUDA worker image (--role prefill|denoise|decode): PyPI torch 2.14.0 (+cu130), the
# diffusers stack, the Mooncake CUDA wheel and the CUDA 12 runtime it links. Run by
# images/worker-cuda.Dockerfile; tests/images/test_install_scripts.py runs it with --resolve-only (the CUDA
# libraries cannot load without a GPU driver).
IMAGE=worker-cuda
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require_role
# RDMA verbs + mlx5 provider for GPUDirect RDMA; numa/curl for Mooncake's engine.so.
debian_packages libibverbs1 ibverbs-providers libnuma1 libcurl4
build_wheels transport worker
extra=()
[ "$ROLE" = decode ] && extra=(-r "$REQ_DIR/video.txt")
pip_install -r "$REQ_DIR/gateway.txt" -r "$REQ_DIR/worker-models.txt" -r "$REQ_DIR/worker-cuda.txt" "${extra[@]}" \
  "$(wheel diffdisagg_transport)" "$(wheel diffdisagg_worker)"
# No GPU at build time: importing mooncake.engine needs libcuda.so.1 from the driver, so only Python-level
# imports are checked here; the worker checks the rest when it starts on a GPU node.
check_imports "
import torch, diffusers, diffdisagg.worker, diffdisagg.transport
assert torch.__version__.startswith('2.14.0'), torch.__version__
print('worker-cuda ($ROLE) ok: torch', torch.__version__, 'cuda', torch.version.cuda)
"
