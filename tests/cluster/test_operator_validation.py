"""The CRDs' OpenAPI + CEL validation on the real API server: each invalid spec is refused with a
message that names the field. Server-side dry-run: nothing is stored, no operator is needed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.plane import KubectlError, Plane

ROOT = Path(__file__).resolve().parents[2]
VALID = yaml.safe_load((ROOT / "examples" / "ddd-ascend.yaml").read_text())


@pytest.fixture
def crds(plane: Plane) -> None:
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    for crd in ("diffusiondisaggdeployments.diffdisagg.io", "diffusionrolescalers.diffdisagg.io"):
        plane.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")


def _set(obj: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        obj = obj.setdefault(p, {})
    if value is _DELETE:
        obj.pop(parts[-1], None)
    else:
        obj[parts[-1]] = value


_DELETE = object()

CASES = [
    (
        "unknown vendor",
        {"spec.accelerator.vendor": "amd"},
        ['spec.accelerator.vendor: Unsupported value: "amd"'],
    ),
    (
        "devicesPerPod > 16",
        {"spec.accelerator.devicesPerPod": 17},
        ["spec.accelerator.devicesPerPod", "less than or equal to 16"],
    ),
    (
        "devicesPerPod 0",
        {"spec.accelerator.devicesPerPod": 0},
        ["spec.accelerator.devicesPerPod", "greater than or equal to 1"],
    ),
    (
        "shmSizeLimit not a quantity",
        {"spec.accelerator.shmSizeLimit": "lots"},
        ["spec.accelerator.shmSizeLimit"],
    ),
    (
        "cpu with a resource name",
        {
            "spec.accelerator.vendor": "cpu",
            "spec.accelerator.resourceName": "x.com/y",
            "spec.accelerator.hccnConfHostPath": _DELETE,
        },
        ["spec.accelerator.resourceName", "cannot be set when accelerator.vendor is cpu"],
    ),
    (
        "hccn.conf on nvidia",
        {"spec.accelerator.vendor": "nvidia", "spec.transfer.protocol": "rdma"},
        ["spec.accelerator.hccnConfHostPath", "only valid when accelerator.vendor is ascend"],
    ),
    (
        "mooncake without protocol",
        {"spec.transfer.protocol": _DELETE},
        ["spec.transfer.protocol", "required when transfer.backend is mooncake"],
    ),
    (
        "rdma on the tcp backend",
        {"spec.transfer": {"backend": "tcp", "protocol": "rdma"}},
        ["spec.transfer.protocol", "needs transfer.backend mooncake"],
    ),
    (
        "ascend protocol on nvidia",
        {"spec.accelerator.vendor": "nvidia", "spec.accelerator.hccnConfHostPath": _DELETE},
        ["spec.transfer.protocol", "ascend needs accelerator.vendor ascend"],
    ),
    (
        "port range inverted",
        {"spec.transfer.portRange": {"min": 16000, "max": 15000}},
        ["spec.transfer.portRange.min", "must not exceed"],
    ),
    (
        "negative replicas",
        {"spec.roles.denoise.replicas": -1},
        ["spec.roles.denoise.replicas", "greater than or equal to 0"],
    ),
    (
        "min > max",
        {"spec.roles.denoise.autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
        ["spec.roles.denoise.autoscaling.minReplicas", "must not exceed autoscaling.maxReplicas"],
    ),
    (
        "autoscaled without max",
        {"spec.roles.decode.autoscaling": {"enabled": True}},
        ["spec.roles.decode.autoscaling.maxReplicas", "required when autoscaling.enabled"],
    ),
    (
        "duplicate env names",
        {"spec.roles.prefill.env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
        ["spec.roles.prefill.env", "names must be unique"],
    ),
    (
        "reserved env name",
        {"spec.roles.prefill.env": [{"name": "DIFFDISAGG_ROLE", "value": "x"}]},
        ["spec.roles.prefill.env", "DIFFDISAGG_ are set by the operator"],
    ),
    (
        "gateway replicas > 1",
        {"spec.gateway.replicas": 2},
        ["spec.gateway.replicas", "0 or 1 until video job state is shared"],
    ),
    ("unknown family", {"spec.model.family": "sdxl"}, ['spec.model.family: Unsupported value: "sdxl"']),
    (
        "model path outside the volume",
        {"spec.model.path": "/weights/sd3"},
        ["spec.model.path", "must lie under model.volume.mountPath"],
    ),
    (
        "two volume sources",
        {"spec.model.volume.persistentVolumeClaim": {"claimName": "w"}},
        ["spec.model.volume", "exactly one of persistentVolumeClaim or hostPath"],
    ),
    (
        "reserved pod label",
        {"spec.roles.decode.podTemplate": {"labels": {"diffdisagg.io/role": "x"}}},
        ["spec.roles.decode.podTemplate.labels", "reserved for the operator"],
    ),
    ("missing role", {"spec.roles.decode": _DELETE}, ["spec.roles.decode: Required value"]),
    (
        "cpu with a role's resource name",
        {
            "spec.accelerator.vendor": "cpu",
            "spec.accelerator.hccnConfHostPath": _DELETE,
            "spec.transfer": {"backend": "tcp"},
            "spec.roles.decode.accelerator": {"resourceName": "nvidia.com/gpu.shared"},
        },
        [
            "spec.roles.decode.accelerator.resourceName",
            "roles.decode.accelerator.resourceName cannot be set when accelerator.vendor is cpu",
        ],
    ),
    (
        "role resource name not an extended resource",
        {"spec.roles.prefill.accelerator": {"resourceName": "gpu"}},
        ["spec.roles.prefill.accelerator.resourceName", "should match"],
    ),
    (
        "role accelerator without resource name",
        {"spec.roles.denoise.accelerator": {}},
        ["spec.roles.denoise.accelerator.resourceName: Required value"],
    ),
    (
        "decode encodeThreads negative",
        {"spec.roles.decode.encodeThreads": -1},
        ["spec.roles.decode.encodeThreads", "greater than or equal to 0"],
    ),
    ("name too long", {"metadata.name": "x" * 51}, ["metadata.name must be at most 50 characters"]),
]


def _dry_run(plane: Plane, ns: str, obj: dict[str, Any]) -> None:
    plane.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(obj))


def test_valid_example_passes(plane: Plane, namespace: str, crds: None) -> None:
    _dry_run(plane, namespace, VALID)


def test_external_autoscaler_needs_no_max_replicas(plane: Plane, namespace: str, crds: None) -> None:
    # hpa: false (KEDA drives the scaler): maxReplicas is the external autoscaler's business
    obj = copy.deepcopy(VALID)
    obj["spec"]["roles"]["decode"]["autoscaling"] = {"enabled": True, "hpa": False}
    _dry_run(plane, namespace, obj)


def test_role_resource_names_pass_on_accelerators(plane: Plane, namespace: str, crds: None) -> None:
    # Ascend vNPUs for the light stages, whole NPUs for denoise; and NVIDIA time-slicing
    obj = copy.deepcopy(VALID)
    for role in ("prefill", "decode"):
        obj["spec"]["roles"][role]["accelerator"] = {"resourceName": "huawei.com/Ascend910-2c"}
    _dry_run(plane, namespace, obj)
    obj = copy.deepcopy(VALID)
    obj["spec"]["accelerator"] = {"vendor": "nvidia"}
    obj["spec"]["transfer"] = {"backend": "tcp"}
    obj["spec"]["roles"]["decode"]["accelerator"] = {"resourceName": "nvidia.com/gpu.shared"}
    obj["spec"]["roles"]["denoise"]["accelerator"] = {"resourceName": "nvidia.com/gpu"}
    _dry_run(plane, namespace, obj)


def test_each_rule_rejects_with_a_message_naming_the_field(plane: Plane, namespace: str, crds: None) -> None:
    failures = []
    for label, changes, expected in CASES:
        obj = copy.deepcopy(VALID)
        for path, value in changes.items():
            _set(obj, path, value)
        try:
            _dry_run(plane, namespace, obj)
            failures.append(f"{label}: accepted")
            continue
        except KubectlError as e:
            err = str(e) + getattr(e, "stderr", "")
        missing = [x for x in expected if x not in err]
        if missing:
            failures.append(f"{label}: {missing} not in {err!r}")
    assert not failures, "\n".join(failures)


def test_scaler_identity_is_immutable(plane: Plane, namespace: str, crds: None) -> None:
    drs = {
        "apiVersion": "diffdisagg.io/v1alpha1",
        "kind": "DiffusionRoleScaler",
        "metadata": {"name": "s"},
        "spec": {"replicas": 1, "deployment": "d", "role": "denoise"},
    }
    plane.apply(json.dumps(drs), namespace)
    drs["spec"]["role"] = "decode"
    with pytest.raises(KubectlError, match=r"spec\.deployment and spec\.role are immutable"):
        plane.apply(json.dumps(drs), namespace)
    plane.kubectl("scale", "drs", "s", "-n", namespace, "--replicas=3")
    assert plane.kubectl_json("get", "drs", "s", "-n", namespace)["spec"]["replicas"] == 3
