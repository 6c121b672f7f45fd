"""spec.roles.<role>.accelerator.resourceName: one role's pods request another extended resource (e.g. a
time-sliced `nvidia.com/gpu.shared`, an Ascend vNPU) while the other roles keep spec.accelerator's."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from operator_factories import env_of, find, rendered, spec

from diffdisagg.operator import contract as c
from diffdisagg.operator.api import schema as s
from diffdisagg.operator.api.types import parse_spec
from diffdisagg.operator.errors import SpecError
from diffdisagg.operator.rollout import REVISION_LENGTH, revision

SHARED = "nvidia.com/gpu.shared"


def _pod(ms: list[dict], role: str) -> dict:
    return find(ms, "Deployment", f"d-{role}")["spec"]["template"]["spec"]


def _extended(ms: list[dict], role: str) -> dict[str, tuple[int, int]]:
    """The role's extended resources (name with a '/') as (request, limit)."""
    res = _pod(ms, role)["containers"][0].get("resources", {})
    req, lim = res.get("requests", {}), res.get("limits", {})
    return {k: (req.get(k), lim[k]) for k in lim if "/" in k}


def test_override_applies_to_that_role_only() -> None:
    ms = rendered(spec(**{"roles.decode.accelerator": {"resourceName": SHARED}}))
    assert _extended(ms, "decode") == {SHARED: (1, 1)}, "the override replaces nvidia.com/gpu, not adds to it"
    assert _extended(ms, "prefill") == {"nvidia.com/gpu": (1, 1)}
    assert _extended(ms, "denoise") == {"nvidia.com/gpu": (1, 1)}
    assert env_of(find(ms, "Deployment", "d-decode"))[c.ENV_PLATFORM] == "cuda"
    gw = _pod(ms, "gateway")["containers"][0]
    assert not any("/" in k for k in gw.get("resources", {}).get("limits", {})), "gateway gets no device"


def test_shared_light_stages_exclusive_denoise_with_spec_level_resource_and_devices_per_pod() -> None:
    # spec.accelerator.resourceName stays the default of the roles without an override; devicesPerPod still
    # counts only for denoise, whatever resource it requests
    ms = rendered(
        spec(
            accelerator={
                "vendor": "nvidia",
                "resourceName": "nvidia.com/mig-3g.40gb",
                "devicesPerPod": 2,
                "nodeSelector": {"pool": "gpu"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
            **{
                "roles.prefill.accelerator": {"resourceName": SHARED},
                "roles.denoise.accelerator": {"resourceName": "nvidia.com/gpu"},
                "roles.decode.accelerator": {"resourceName": SHARED},
                "roles.decode.podTemplate": {"nodeSelector": {"gpu-sharing": "time-slicing"}},
            },
        )
    )
    assert _extended(ms, "denoise") == {"nvidia.com/gpu": (2, 2)}
    assert env_of(find(ms, "Deployment", "d-denoise"))[c.ENV_DEVICES_PER_POD] == "2"
    assert any(v["name"] == "dshm" for v in _pod(ms, "denoise")["volumes"])
    for role in ("prefill", "decode"):
        assert _extended(ms, role) == {SHARED: (1, 1)}, role
        assert env_of(find(ms, "Deployment", f"d-{role}"))[c.ENV_DEVICES_PER_POD] == "1"
    # spec.accelerator's placement still applies to every worker role, the role's podTemplate adds to it
    for role in c.STAGE_ROLES:
        assert _pod(ms, role)["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    assert _pod(ms, "prefill")["nodeSelector"] == {"pool": "gpu"}
    assert _pod(ms, "decode")["nodeSelector"] == {"pool": "gpu", "gpu-sharing": "time-slicing"}


def test_ascend_vnpu_for_prefill_and_decode_keeps_the_ascend_wiring() -> None:
    vnpu = "huawei.com/Ascend910-2c"
    ms = rendered(
        spec(
            accelerator={"vendor": "ascend", "hccnConfHostPath": "/etc/hccn.conf"},
            **{
                "roles.prefill.accelerator": {"resourceName": vnpu},
                "roles.decode.accelerator": {"resourceName": vnpu},
            },
        )
    )
    assert _extended(ms, "denoise") == {"huawei.com/Ascend910": (1, 1)}
    for role in ("prefill", "decode"):
        assert _extended(ms, role) == {vnpu: (1, 1)}, role
    for role in c.STAGE_ROLES:
        dep = find(ms, "Deployment", f"d-{role}")
        env = env_of(dep)
        assert env[c.ENV_PLATFORM] == "npu"
        assert env["HCCL_IF_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert {"name": "hccn-conf", "hostPath": {"path": "/etc/hccn.conf", "type": "File"}} in _pod(
            ms, role
        )["volumes"]


def test_no_override_keeps_the_revision_of_before() -> None:
    # the revision as computed before roles had an accelerator: upgrading the operator must not restart
    # the workers of a deployment that does not use the field
    d = parse_spec(spec(**{"accelerator.resourceName": "nvidia.com/mig-1g.10gb"}))
    assert all(r.resource_name is None for r in d.roles)
    legacy = {
        "model": dataclasses.asdict(d.model),
        "accelerator": dataclasses.asdict(d.accelerator),
        "transfer": dataclasses.asdict(d.transfer),
        "gateway": dataclasses.asdict(d.gateway.container)
        | {"apiKey": [d.gateway.api_key_secret, d.gateway.api_key_key]},
        "roles": {r.name: dataclasses.asdict(r.container) for r in d.roles},
    }
    blob = json.dumps(legacy, sort_keys=True, separators=(",", ":"), default=str).encode()
    assert revision(d) == hashlib.sha256(blob).hexdigest()[:REVISION_LENGTH]


def test_override_is_part_of_the_revision() -> None:
    def rev(sd: dict) -> set[str]:
        ms = rendered(sd)
        return {env_of(find(ms, "Deployment", f"d-{r}"))[c.ENV_REVISION] for r in [*c.STAGE_ROLES, "gateway"]}

    base = rev(spec())
    shared = rev(spec(**{"roles.decode.accelerator": {"resourceName": SHARED}}))
    other = rev(spec(**{"roles.decode.accelerator": {"resourceName": "nvidia.com/gpu.mps"}}))
    on_prefill = rev(spec(**{"roles.prefill.accelerator": {"resourceName": SHARED}}))
    assert len(base) == len(shared) == len(other) == len(on_prefill) == 1, "the revision is deployment-wide"
    assert len(base | shared | other | on_prefill) == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"accelerator.vendor": "cpu", "roles.decode.accelerator": {"resourceName": SHARED}},
            "spec.roles.decode.accelerator.resourceName cannot be set when accelerator.vendor is cpu",
        ),
        (
            {"roles.prefill.accelerator": {"resourceName": "gpu"}},
            "spec.roles.prefill.accelerator.resourceName must be an extended resource name",
        ),
        (
            {"roles.denoise.accelerator": {"resourceName": "nvidia.com/gpu shared"}},
            "spec.roles.denoise.accelerator.resourceName must be an extended resource name",
        ),
        ({"roles.denoise.accelerator": {}}, "spec.roles.denoise.accelerator.resourceName is required"),
    ],
)
def test_parse_spec_rejects_what_the_crd_rejects(overrides: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(spec(**overrides))


@pytest.mark.parametrize(
    "name", ["nvidia.com/gpu", SHARED, "nvidia.com/mig-1g.10gb", "huawei.com/Ascend910-2c", "amd.com/gpu"]
)
def test_extended_resource_names_are_accepted(name: str) -> None:
    assert parse_spec(spec(**{"roles.decode.accelerator": {"resourceName": name}})).role(
        "decode"
    ).resource_name == (name)


def test_schema_has_the_field_on_worker_roles_only_with_a_cel_rule_per_role() -> None:
    root = s.ddd_spec_schema()
    roles = root["properties"]["roles"]["properties"]
    for role in c.STAGE_ROLES:
        acc = roles[role]["properties"]["accelerator"]
        assert acc["required"] == ["resourceName"]
        assert acc["properties"]["resourceName"]["pattern"] == s.RESOURCE_NAME_PATTERN
    assert "accelerator" not in root["properties"]["gateway"]["properties"]
    assert (
        root["properties"]["accelerator"]["properties"]["resourceName"]["pattern"] == s.RESOURCE_NAME_PATTERN
    )
    rules = {r["fieldPath"]: r for r in root["x-kubernetes-validations"] if "fieldPath" in r}
    for role in c.STAGE_ROLES:
        rule = rules[f".roles.{role}.accelerator.resourceName"]
        assert rule["message"] == (
            f"roles.{role}.accelerator.resourceName cannot be set when accelerator.vendor is cpu"
        )
        assert f"self.roles.{role}.accelerator" in rule["rule"]
