"""GPU tier (DESIGN.md "Testing tiers", 4): CUDA checks of the transport, run by hand on an NVIDIA
machine, never in CI (which has no accelerator).

Collected only when DIFFDISAGG_GPU_TESTS=1, so that CI's `pytest tests/...` neither runs nor skips
them (a skip counts as a failure under CI=true). With the variable set, a missing CUDA device fails.

    DIFFDISAGG_GPU_TESTS=1 PYTHONPATH=transport/src python -m pytest tests/gpu -q -s
"""

from __future__ import annotations

import os

if os.environ.get("DIFFDISAGG_GPU_TESTS") != "1":
    collect_ignore_glob = ["test_*.py"]
