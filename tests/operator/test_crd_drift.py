"""crds/ is generated from api/schema.py: the committed YAML must equal what the code generates."""

from __future__ import annotations

from pathlib import Path

import yaml

from diffdisagg.operator.crdgen import build_crds, render_crds

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crds_match_the_code() -> None:
    for name, text in render_crds().items():
        path = ROOT / "crds" / name
        assert path.exists(), f"{path} missing: run `python -m diffdisagg.operator.crdgen`"
        assert path.read_text() == text, (
            f"{path} drifted from api/schema.py: run `python -m diffdisagg.operator.crdgen`"
        )


def test_crds_dir_has_no_stray_files() -> None:
    assert sorted(p.name for p in (ROOT / "crds").glob("*.yaml")) == sorted(render_crds())


def _walk(schema: dict, path: str):
    for name, prop in (schema.get("properties") or {}).items():
        yield f"{path}.{name}", name, prop
        yield from _walk(prop, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_every_spec_and_status_field_is_described_starting_with_its_name() -> None:
    for crd in build_crds().values():
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for part in ("spec", "status"):
            for path, name, prop in _walk(root["properties"][part], part):
                desc = prop.get("description", "")
                assert desc.startswith(f"{name}:"), (
                    f"{path}: description must start with '{name}:' ({desc!r})"
                )


def test_every_cel_rule_has_a_message_naming_a_field() -> None:
    def rules(schema: dict):
        yield from schema.get("x-kubernetes-validations") or []
        for prop in (schema.get("properties") or {}).values():
            yield from rules(prop)
        if "items" in schema:
            yield from rules(schema["items"])

    count = 0
    for crd in build_crds().values():
        for rule in rules(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]):
            count += 1
            msg = rule["message"]
            field = msg.split(" ")[0].rstrip(":")
            assert "." in field or field[0].islower(), (
                f"rule {rule['rule']!r}: message should start with a field"
            )
    assert count >= 15


def test_generated_yaml_round_trips_and_has_the_agreed_names() -> None:
    crds = {k: yaml.safe_load(v) for k, v in render_crds().items()}
    ddd = crds["diffusiondisaggdeployments.diffdisagg.io.yaml"]["spec"]
    drs = crds["diffusionrolescalers.diffdisagg.io.yaml"]["spec"]
    assert ddd["names"]["shortNames"] == ["ddd"] and drs["names"]["shortNames"] == ["drs"]
    assert ddd["versions"][0]["name"] == "v1alpha1" and ddd["group"] == "diffdisagg.io"
    scale = drs["versions"][0]["subresources"]["scale"]
    assert scale == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    status_props = ddd["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert "phase" not in status_props
    assert {"observedGeneration", "conditions", "roles", "gateway"} <= set(status_props)
