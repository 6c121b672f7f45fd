"""docs/operator.md stays true: it shows both examples verbatim and documents every spec field."""

from __future__ import annotations

from pathlib import Path

from diffdisagg.operator.api import schema as s

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "operator.md").read_text()


def _paths(schema: dict, path: str):
    for name, prop in (schema.get("properties") or {}).items():
        if path.endswith(".roles") and name in ("prefill", "decode"):
            continue
        shown = "<role>" if path.endswith(".roles") and name == "denoise" else name
        p = f"{path}.{shown}"
        yield p
        if name in {"tolerations", "scaleUp", "scaleDown", "requests", "limits", "valueFrom"}:
            continue
        inner = prop.get("items", prop)
        yield from _paths(inner, p + ("[]" if "items" in prop else ""))


def test_examples_are_in_the_doc_verbatim() -> None:
    for name in ("ddd-nvidia.yaml", "ddd-ascend.yaml"):
        assert (ROOT / "examples" / name).read_text() in DOC, (
            f"docs/operator.md does not show examples/{name}"
        )


def test_every_spec_field_is_in_the_field_reference() -> None:
    missing = [p for p in _paths(s.ddd_spec_schema(), "spec") if f"`{p}`" not in DOC]
    assert not missing, f"fields missing from docs/operator.md: {missing}"
