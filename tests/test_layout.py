"""Guards on the repository layout that DESIGN.md makes rules of."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("operator", "worker", "transport")


def test_no_init_in_component_folders_or_namespace():
    for comp in COMPONENTS:
        assert not (ROOT / comp / "__init__.py").exists(), f"{comp}/__init__.py would shadow a module"
        assert not (ROOT / comp / "src" / "diffdisagg" / "__init__.py").exists(), "diffdisagg is PEP 420"


PROBE = (
    "import operator; print(getattr(operator, '__file__', 'builtin')); print(hasattr(operator, 'itemgetter'))"
)


def test_import_operator_from_repo_root_is_stdlib():
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out[-1] == "True", out
    assert str(ROOT) not in out[0]


def test_namespace_spans_the_three_distributions():
    import importlib

    for comp in ("transport", "worker", "operator"):
        mod = importlib.import_module(f"diffdisagg.{comp}")
        paths = [str(p) for p in mod.__path__]
        assert any(str(ROOT / comp / "src") in p for p in paths), paths
