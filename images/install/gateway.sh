#!/usr/bin/env bash
# Install steps of the gateway image: diffdisagg-worker without its model extras and the torch-free parts of
# diffdisagg-transport. Run by images/gateway.Dockerfile and tests/images/test_install_scripts.py.
IMAGE=gateway
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
build_wheels transport worker
pip_install -r "$REQ_DIR/gateway.txt" "$(wheel diffdisagg_transport)" "$(wheel diffdisagg_worker)"
check_imports '
import importlib.util
import diffdisagg.worker.gateway, diffdisagg.transport.handover
assert importlib.util.find_spec("torch") is None, "torch leaked into the gateway image"
print("gateway image ok")
'
