"""Only the platform layer may name device modules (DESIGN.md, "Platform layer").

`grep -rn "torch.cuda" operator worker transport` must hit nothing outside
transport/src/diffdisagg/transport/platforms/ (tests/ is outside those folders and may use torch.cuda
to check the platform layer). The same holds for torch_npu and torch.npu in Python sources, and no
code tests placement with `tensor.is_npu` (it raises on non-NPU builds; use `tensor.device.type`).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("operator", "worker", "transport")
PLATFORMS = "transport/src/diffdisagg/transport/platforms/"


def _grep(pattern: str, *extra: str) -> list[str]:
    proc = subprocess.run(
        ["grep", "-rnI", "--exclude-dir=__pycache__", *extra, "-e", pattern, *SCANNED],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (0, 1), proc.stderr  # 1 = no match; 2 = grep failed
    return [line for line in proc.stdout.splitlines() if line]


def _outside_platforms(lines: list[str]) -> list[str]:
    return [line for line in lines if not line.startswith(PLATFORMS)]


def test_torch_cuda_only_in_the_platform_layer():
    hits = _grep("torch.cuda")
    # The grep really looks: the platform layer itself names torch.cuda.
    assert any(line.startswith(PLATFORMS + "cuda.py:") for line in hits), hits
    assert _outside_platforms(hits) == []


def test_npu_modules_only_in_the_platform_layer():
    for pattern in (r"torch\.npu", r"torch_npu", r"get_device_module"):
        hits = _grep(pattern, "--include=*.py")
        assert any(line.startswith(PLATFORMS) for line in hits), (pattern, hits)
        assert _outside_platforms(hits) == [], pattern


def test_no_is_npu_placement_checks():
    hits = _grep("is_npu", "--include=*.py")
    # Mentions that warn against it (quoted in backticks in docs) are fine; attribute reads are not.
    code = [line for line in hits if re.search(r"\.is_npu\b(?!`)", line.split(":", 2)[2])]
    assert code == [], code
