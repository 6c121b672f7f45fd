#!/usr/bin/env bash
# Install steps of the operator image: diffdisagg-operator and its pinned requirements, never torch.
# Run by images/operator.Dockerfile and by tests/images/test_install_scripts.py. Options: see common.sh.
IMAGE=operator
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
build_wheels operator
pip_install -r "$REQ_DIR/operator.txt" "$(wheel diffdisagg_operator)"
check_imports '
import importlib.util, kopf, lightkube, diffdisagg.operator
assert importlib.util.find_spec("torch") is None, "torch must never be in the operator image"
print("operator image: kopf", kopf.__version__ if hasattr(kopf, "__version__") else "?", "ok")
'
