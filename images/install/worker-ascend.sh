#!/usr/bin/env bash
# Install steps of the Ascend worker image (--role prefill|denoise|decode), on top of a CANN base image
# (>= 8.3.RC1): torch 2.14.0 + torch_npu 2.14.0, the diffusers stack and Mooncake's NPU wheel (Ascend Direct;
# needs glibc >= 2.35; CANN's libascendcl / libllm_datadist / libmetadef come from the base image, not the
# wheel). Run by images/worker-ascend.Dockerfile; tests/images/test_install_scripts.py runs it with
# --resolve-only for x86_64 and aarch64 (no CANN here). See docs/ascend.md.
IMAGE=worker-ascend
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require_role
if [ -z "$RESOLVE_REPORT" ]; then
  # The Mooncake NPU wheel is manylinux_2_35: refuse an older base image here, not at the first transfer.
  "$PY" - <<'PYEOF' || die "glibc >= 2.35 is required by mooncake-transfer-engine-npu (use a newer CANN base image)"
import os, sys
major, minor = (int(x) for x in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 35) else 1)
PYEOF
fi
debian_packages libibverbs1 libnuma1 libcurl4
build_wheels transport worker
extra=()
[ "$ROLE" = decode ] && extra=(-r "$REQ_DIR/video.txt")
pip_install -r "$REQ_DIR/gateway.txt" -r "$REQ_DIR/worker-models.txt" -r "$REQ_DIR/worker-ascend.txt" "${extra[@]}" \
  "$(wheel diffdisagg_transport)" "$(wheel diffdisagg_worker)"
# torch_npu needs CANN's libraries to import: check the pair's versions from metadata only.
check_imports "
from importlib.metadata import version
assert version('torch') == '2.14.0' and version('torch-npu') == '2.14.0', (version('torch'), version('torch-npu'))
import diffusers, diffdisagg.worker, diffdisagg.transport
print('worker-ascend ($ROLE) ok')
"
