"""Builders of DiffusionDisaggDeployment spec dicts for the operator's unit tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from diffdisagg.operator.api.types import parse_spec
from diffdisagg.operator.render import Observed, make_owner, render

ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "model": {"family": "flux", "path": "/models/flux"},
    "accelerator": {"vendor": "nvidia"},
    "gateway": {"image": "gw:1"},
    "roles": {
        "prefill": {"image": "w:1", "replicas": 1},
        "denoise": {"image": "w:1", "replicas": 2},
        "decode": {"image": "w:1"},
    },
}


def spec(**overrides: Any) -> dict[str, Any]:
    """BASE with dotted-path overrides, e.g. spec(**{"accelerator.vendor": "ascend"})."""
    out = copy.deepcopy(BASE)
    for path, value in overrides.items():
        cur = out
        parts = path.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
    return out


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def rendered(
    spec_dict: dict[str, Any], observed: Observed | None = None, name: str = "d", generation: int = 1
) -> list[dict[str, Any]]:
    owner = make_owner(name, "ns", "uid-1", generation, parse_spec(spec_dict))
    return render(owner, observed or Observed(new_token="tok"))


def find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for m in manifests:
        if m["kind"] == kind and m["metadata"]["name"] == name:
            return m
    raise AssertionError(f"no {kind} {name} in {[(m['kind'], m['metadata']['name']) for m in manifests]}")


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        out[e["name"]] = e.get("value", e.get("valueFrom"))
    return out
