"""spec.roles.<role>.autoscaling.hpa: false leaves the DiffusionRoleScaler to an autoscaler the user runs
(a KEDA ScaledObject creates its own HPA on the scaler's /scale): the operator renders the scaler, no HPA."""

from __future__ import annotations

import pytest
from operator_factories import find, rendered, spec

from diffdisagg.operator.api import names as n
from diffdisagg.operator.api import schema as s
from diffdisagg.operator.api.types import parse_spec
from diffdisagg.operator.errors import SpecError
from diffdisagg.operator.render import Observed


def _kinds(ms: list[dict]) -> list[tuple[str, str]]:
    return sorted((m["kind"], m["metadata"]["name"]) for m in ms)


def test_scaler_without_hpa() -> None:
    ms = rendered(spec(**{"roles.denoise.autoscaling": {"enabled": True, "minReplicas": 2, "hpa": False}}))
    assert ("HorizontalPodAutoscaler", "d-denoise") not in _kinds(ms)
    scaler = find(ms, n.DRS_KIND, "d-denoise")
    assert scaler["spec"]["replicas"] == 2, "the scaler starts at minReplicas"
    # the external autoscaler's replica count is what the Deployment follows
    ms = rendered(
        spec(**{"roles.denoise.autoscaling": {"enabled": True, "hpa": False}}),
        Observed(new_token="t", scaler_replicas={"denoise": 7}),
    )
    assert find(ms, "Deployment", "d-denoise")["spec"]["replicas"] == 7


def test_default_keeps_the_operator_hpa() -> None:
    ms = rendered(spec(**{"roles.denoise.autoscaling": {"enabled": True, "maxReplicas": 4}}))
    hpa = find(ms, "HorizontalPodAutoscaler", "d-denoise")
    assert hpa["spec"]["maxReplicas"] == 4
    assert hpa["spec"]["scaleTargetRef"]["kind"] == n.DRS_KIND


def test_max_replicas_needed_only_for_the_operator_hpa() -> None:
    parse_spec(spec(**{"roles.denoise.autoscaling": {"enabled": True, "hpa": False}}))
    with pytest.raises(SpecError, match=r"spec.roles.denoise.autoscaling.maxReplicas is required"):
        parse_spec(spec(**{"roles.denoise.autoscaling": {"enabled": True}}))


def test_schema_field_and_rule() -> None:
    a = s.ddd_spec_schema()["properties"]["roles"]["properties"]["denoise"]["properties"]["autoscaling"]
    assert a["properties"]["hpa"]["type"] == "boolean" and a["properties"]["hpa"]["default"] is True
    rules = [r["rule"] for r in a["x-kubernetes-validations"]]
    assert "!self.enabled || (has(self.hpa) && !self.hpa) || has(self.maxReplicas)" in rules
