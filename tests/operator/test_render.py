"""render(): table tests over vendors, transfer backends, autoscaling, revisions and the NetworkPolicy."""

from __future__ import annotations

import json

import pytest
from operator_factories import env_of, example, find, rendered, spec

from diffdisagg.operator import contract as c
from diffdisagg.operator.api import names as n
from diffdisagg.operator.api.types import parse_spec
from diffdisagg.operator.errors import SpecError
from diffdisagg.operator.render import CREATE_ONLY_KINDS, Observed, make_owner, render


def _container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("accel", "resource", "platform"),
    [
        ({"vendor": "nvidia"}, "nvidia.com/gpu", "cuda"),
        ({"vendor": "nvidia", "resourceName": "nvidia.com/mig-1g.10gb"}, "nvidia.com/mig-1g.10gb", "cuda"),
        ({"vendor": "ascend"}, "huawei.com/Ascend910", "npu"),
        ({"vendor": "ascend", "resourceName": "huawei.com/ascend-1980"}, "huawei.com/ascend-1980", "npu"),
        ({"vendor": "cpu"}, None, "cpu"),
    ],
)
def test_devices_per_vendor(accel: dict, resource: str | None, platform: str) -> None:
    ms = rendered(spec(accelerator=accel))
    for role in c.STAGE_ROLES:
        dep = find(ms, "Deployment", f"d-{role}")
        res = _container(dep).get("resources", {})
        env = env_of(dep)
        assert env[c.ENV_PLATFORM] == platform
        if resource:
            assert res["limits"][resource] == 1 and res["requests"][resource] == 1
        else:
            assert not any("/" in k for k in res.get("limits", {}))
        assert ("HCCL_IF_IP" in env) == (accel["vendor"] == "ascend")
    gw = _container(find(ms, "Deployment", "d-gateway"))
    assert not any("/" in k for k in gw.get("resources", {}).get("limits", {})), "gateway gets no device"


def test_ascend_hccl_ip_from_pod_ip_and_hccn_conf_mount() -> None:
    ms = rendered(
        spec(
            accelerator={
                "vendor": "ascend",
                "hccnConfHostPath": "/etc/hccn.conf",
                "nodeSelector": {"accelerator": "ascend910"},
                "tolerations": [{"key": "npu", "operator": "Exists"}],
            }
        )
    )
    dep = find(ms, "Deployment", "d-denoise")
    pod = dep["spec"]["template"]["spec"]
    assert env_of(dep)["HCCL_IF_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert {"name": "hccn-conf", "mountPath": "/etc/hccn.conf", "readOnly": True} in _container(dep)[
        "volumeMounts"
    ]
    assert {"name": "hccn-conf", "hostPath": {"path": "/etc/hccn.conf", "type": "File"}} in pod["volumes"]
    assert pod["nodeSelector"] == {"accelerator": "ascend910"}
    assert pod["tolerations"] == [{"key": "npu", "operator": "Exists"}]


@pytest.mark.parametrize(
    ("transfer", "expect_env", "absent_env", "rdma"),
    [
        (
            {},
            {c.ENV_TRANSFER_BACKEND: "tcp", c.ENV_TRANSFER_PORT: "8200"},
            [c.ENV_TRANSFER_PROTOCOL, c.ENV_TRANSFER_PORT_MIN, c.ENV_RDMA_DEVICES],
            None,
        ),
        (
            {"backend": "mooncake", "protocol": "tcp"},
            {
                c.ENV_TRANSFER_BACKEND: "mooncake",
                c.ENV_TRANSFER_PROTOCOL: "tcp",
                c.ENV_TRANSFER_PORT_MIN: "15000",
                c.ENV_TRANSFER_PORT_MAX: "15063",
            },
            [c.ENV_TRANSFER_PORT, c.ENV_RDMA_DEVICES],
            None,
        ),
        (
            {
                "backend": "mooncake",
                "protocol": "rdma",
                "rdmaDevices": ["mlx5_0", "mlx5_1"],
                "portRange": {"min": 20000, "max": 20010},
            },
            {
                c.ENV_TRANSFER_PROTOCOL: "rdma",
                c.ENV_RDMA_DEVICES: "mlx5_0,mlx5_1",
                c.ENV_TRANSFER_PORT_MIN: "20000",
                c.ENV_TRANSFER_PORT_MAX: "20010",
            },
            [c.ENV_TRANSFER_PORT],
            "rdma/hca",
        ),
        (
            {"backend": "mooncake", "protocol": "rdma", "rdmaResource": "example.com/roce"},
            {c.ENV_TRANSFER_PROTOCOL: "rdma"},
            [],
            "example.com/roce",
        ),
        (
            {"backend": "mooncake", "protocol": "rdma", "rdmaResource": ""},
            {c.ENV_TRANSFER_PROTOCOL: "rdma"},
            [],
            None,
        ),
    ],
)
def test_transfer_wiring(transfer: dict, expect_env: dict, absent_env: list, rdma: str | None) -> None:
    ms = rendered(spec(transfer=transfer))
    dep = find(ms, "Deployment", "d-prefill")
    env = env_of(dep)
    for k, v in expect_env.items():
        assert env[k] == v, k
    for k in absent_env:
        assert k not in env, k
    # the pod IP always comes from the downward API (mooncake's local hostname; the worker's address)
    assert env[c.ENV_POD_IP] == {"fieldRef": {"fieldPath": "status.podIP"}}
    limits = _container(dep)["resources"]["limits"]
    rdma_keys = [k for k in limits if k not in ("nvidia.com/gpu",)]
    assert rdma_keys == ([rdma] if rdma else [])


@pytest.mark.parametrize(
    ("transfer", "ports"),
    [
        ({}, [{"protocol": "TCP", "port": 8100}, {"protocol": "TCP", "port": 8200}]),
        (
            {"backend": "mooncake", "protocol": "rdma", "portRange": {"min": 16000, "max": 16031}},
            [{"protocol": "TCP", "port": 8100}, {"protocol": "TCP", "port": 16000, "endPort": 16031}],
        ),
    ],
)
def test_network_policy_admits_only_own_pods_on_worker_ports(transfer: dict, ports: list) -> None:
    np_ = find(rendered(spec(transfer=transfer)), "NetworkPolicy", "d-workers")["spec"]
    assert np_["podSelector"]["matchLabels"] == {c.LABEL_DEPLOYMENT: "d"}
    assert np_["podSelector"]["matchExpressions"] == [
        {"key": c.LABEL_ROLE, "operator": "In", "values": ["prefill", "denoise", "decode"]}
    ]
    assert np_["policyTypes"] == ["Ingress"]
    assert np_["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {c.LABEL_DEPLOYMENT: "d"}}}], "ports": ports}
    ]


def test_not_autoscaled_has_no_scaler_and_uses_inline_replicas() -> None:
    ms = rendered(spec())
    assert not [m for m in ms if m["kind"] in (n.DRS_KIND, "HorizontalPodAutoscaler")]
    assert find(ms, "Deployment", "d-denoise")["spec"]["replicas"] == 2
    assert find(ms, "Deployment", "d-decode")["spec"]["replicas"] == 1


def test_autoscaled_role_gets_scaler_and_hpa_and_follows_the_scaler() -> None:
    s = spec(
        **{
            "roles.denoise.autoscaling": {
                "enabled": True,
                "minReplicas": 2,
                "maxReplicas": 8,
                "targetQueueDepthPerReplica": 1.5,
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}},
            }
        }
    )
    ms = rendered(s)
    drs = find(ms, n.DRS_KIND, "d-denoise")
    assert drs["spec"] == {"replicas": 2, "deployment": "d", "role": "denoise"}
    # before the scaler exists: its initial value (minReplicas), not the inline replicas (2 here by chance)
    assert find(ms, "Deployment", "d-denoise")["spec"]["replicas"] == 2
    hpa = find(ms, "HorizontalPodAutoscaler", "d-denoise")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "diffdisagg.io/v1alpha1",
        "kind": "DiffusionRoleScaler",
        "name": "d-denoise",
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 8)
    ext = hpa["metrics"][0]["external"]
    assert hpa["metrics"][0]["type"] == "External"
    assert ext["metric"] == {
        "name": "diffdisagg_queue_depth",
        "selector": {"matchLabels": {"deployment": "d", "role": "denoise"}},
    }
    assert ext["target"] == {"type": "AverageValue", "averageValue": "1500m"}
    assert hpa["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 60}}
    # once the scaler exists, its spec.replicas wins, whatever the inline replicas say
    ms2 = rendered(s, Observed(scaler_replicas={"denoise": 5}, new_token="x"))
    assert find(ms2, "Deployment", "d-denoise")["spec"]["replicas"] == 5
    assert find(ms2, n.DRS_KIND, "d-denoise")["spec"]["replicas"] == 2, (
        "the scaler's initial value never changes"
    )
    assert {"Secret", n.DRS_KIND} == CREATE_ONLY_KINDS


def test_revision_changes_with_template_not_with_replicas() -> None:
    def rev(s: dict) -> str:
        return env_of(find(rendered(s), "Deployment", "d-decode"))[c.ENV_REVISION]

    base = rev(spec())
    assert rev(spec(**{"roles.denoise.replicas": 7})) == base, "scaling must not roll pods"
    assert rev(spec(**{"roles.denoise.autoscaling": {"enabled": True, "maxReplicas": 3}})) == base
    assert rev(spec(**{"gateway.serviceType": "LoadBalancer"})) == base
    for change in (
        {"roles.denoise.image": "w:2"},
        {"roles.prefill.env": [{"name": "X", "value": "1"}]},
        {"model.path": "/models/other"},
        {"accelerator.vendor": "ascend"},
        {"transfer": {"backend": "mooncake", "protocol": "tcp"}},
        {"gateway.image": "gw:2"},
    ):
        assert rev(spec(**change)) != base, change
    # the revision is deployment-wide: a new denoise image rolls prefill and decode too
    ms = rendered(spec(**{"roles.denoise.image": "w:2"}))
    revs = {env_of(find(ms, "Deployment", f"d-{r}"))[c.ENV_REVISION] for r in [*c.STAGE_ROLES, "gateway"]}
    labels = {
        find(ms, "Deployment", f"d-{r}")["spec"]["template"]["metadata"]["labels"][n.LABEL_REVISION]
        for r in c.STAGE_ROLES
    }
    assert len(revs) == 1 and revs == labels


def test_render_is_pure_and_stable() -> None:
    s = example("ddd-nvidia.yaml")["spec"]
    a = rendered(s)
    b = rendered(json.loads(json.dumps(s)))
    assert json.dumps(a, sort_keys=False) == json.dumps(b, sort_keys=False)


def test_every_child_is_owned_and_labelled() -> None:
    for m in rendered(example("ddd-ascend.yaml")["spec"], name="sd3"):
        meta = m["metadata"]
        assert meta["namespace"] == "ns"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "diffdisagg.io/v1alpha1",
                "kind": n.DDD_KIND,
                "name": "sd3",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"][c.LABEL_DEPLOYMENT] == "sd3"
        assert meta["labels"][c.LABEL_MANAGED_BY] == "diffdisagg-operator"


def test_worker_env_and_volumes() -> None:
    s = spec(
        **{
            "model.volume": {"mountPath": "/models", "persistentVolumeClaim": {"claimName": "w"}},
            "roles.decode.env": [{"name": "LOG_LEVEL", "value": "debug"}],
            "roles.decode.podTemplate": {
                "labels": {"team": "a"},
                "annotations": {"x": "y"},
                "priorityClassName": "high",
            },
        }
    )
    ms = rendered(s)
    dep = find(ms, "Deployment", "d-decode")
    env = env_of(dep)
    assert env[c.ENV_ROLE] == "decode" and env[c.ENV_DEPLOYMENT] == "d"
    assert env[c.ENV_MODEL_FAMILY] == "flux" and env[c.ENV_MODEL_PATH] == "/models/flux"
    assert env[c.ENV_GATEWAY_URL] == "http://d-gateway.ns.svc:8000"
    assert env[c.ENV_TOKEN_FILE] == "/var/run/diffdisagg/token/token"
    assert env[c.ENV_CONTROL_PORT] == "8100" and env[c.ENV_DEVICES_PER_POD] == "1"
    assert env[c.ENV_BUFFER_BYTES] == str(256 * 1024 * 1024)
    assert env["LOG_LEVEL"] == "debug"
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "a" and pod["metadata"]["annotations"] == {"x": "y"}
    assert pod["spec"]["priorityClassName"] == "high"
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["model"]["persistentVolumeClaim"] == {"claimName": "w", "readOnly": True}
    assert vols["diffdisagg-token"]["secret"]["secretName"] == "d-token"
    # the selector never carries the revision (it is immutable)
    assert dep["spec"]["selector"]["matchLabels"] == {c.LABEL_DEPLOYMENT: "d", c.LABEL_ROLE: "decode"}
    svc = find(ms, "Service", "d-decode")["spec"]
    assert svc["clusterIP"] == "None"


def test_gateway_service_secret_and_config() -> None:
    s = spec(**{"gateway.serviceType": "LoadBalancer", "gateway.apiKeySecret": {"name": "keys"}})
    ms = rendered(s)
    assert find(ms, "Service", "d-gateway")["spec"]["type"] == "LoadBalancer"
    gw = find(ms, "Deployment", "d-gateway")
    env = env_of(gw)
    assert env[c.ENV_ROLE] == "gateway" and env[c.ENV_API_KEY_FILE] == "/var/run/diffdisagg/api-key/api-key"
    assert c.ENV_PLATFORM not in env
    assert find(ms, "Secret", "d-token")["stringData"] == {"token": "tok"}
    cfg = json.loads(find(ms, "ConfigMap", "d-config")["data"]["pipeline.json"])
    assert cfg["roles"]["denoise"] == {"service": "d-denoise.ns.svc", "controlPort": 8100}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"accelerator.vendor": "amd"}, "spec.accelerator.vendor"),
        ({"accelerator.devicesPerPod": 17}, "spec.accelerator.devicesPerPod"),
        ({"accelerator.devicesPerPod": 0}, "spec.accelerator.devicesPerPod"),
        ({"gateway.replicas": 2}, "spec.gateway.replicas"),
        ({"transfer": {"backend": "mooncake"}}, "spec.transfer.protocol"),
        ({"roles.denoise.autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}}, "minReplicas"),
        (
            {"roles.denoise.env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
            "names must be unique",
        ),
        ({"roles.denoise.env": [{"name": "DIFFDISAGG_ROLE", "value": "x"}]}, "DIFFDISAGG_"),
    ],
)
def test_parse_spec_rejects_what_the_crd_rejects(overrides: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(spec(**overrides))


def test_deployment_replicas_unchanged_by_observed_scaler_when_not_autoscaled() -> None:
    owner = make_owner("d", "ns", "u", 1, parse_spec(spec()))
    ms = render(owner, Observed(scaler_replicas={"denoise": 9}))
    assert find(ms, "Deployment", "d-denoise")["spec"]["replicas"] == 2


@pytest.mark.parametrize(
    ("vendor", "resource"), [("nvidia", "nvidia.com/gpu"), ("ascend", "huawei.com/Ascend910")]
)
def test_multi_device_denoise_gets_n_devices_shm_and_env(vendor: str, resource: str) -> None:
    ms = rendered(spec(**{"accelerator.vendor": vendor, "accelerator.devicesPerPod": 4}))
    dep = find(ms, "Deployment", "d-denoise")
    res = _container(dep)["resources"]
    assert res["requests"][resource] == 4 and res["limits"][resource] == 4
    assert env_of(dep)[c.ENV_DEVICES_PER_POD] == "4"
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in _container(dep)["volumeMounts"]
    # prefill and decode replicate their models on every rank: one device each, no shared memory
    for role in ("prefill", "decode"):
        other = find(ms, "Deployment", f"d-{role}")
        assert _container(other)["resources"]["limits"][resource] == 1
        assert env_of(other)[c.ENV_DEVICES_PER_POD] == "1"
        assert all(v["name"] != "dshm" for v in other["spec"]["template"]["spec"]["volumes"])


def test_single_device_pods_get_no_shm_and_shm_size_is_configurable() -> None:
    ms = rendered(spec())
    assert all(
        v["name"] != "dshm"
        for v in find(ms, "Deployment", "d-denoise")["spec"]["template"]["spec"]["volumes"]
    )
    ms = rendered(spec(**{"accelerator.devicesPerPod": 2, "accelerator.shmSizeLimit": "2Gi"}))
    vols = {v["name"]: v for v in find(ms, "Deployment", "d-denoise")["spec"]["template"]["spec"]["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}


def test_containers_run_the_worker_and_gateway_entry_points() -> None:
    ms = rendered(spec())
    for role in c.STAGE_ROLES:
        container = _container(find(ms, "Deployment", f"d-{role}"))
        # args only: the worker image's entrypoint wraps it; the role comes from the env, so one image
        # serves every role
        assert container["args"] == ["python", "-m", "diffdisagg.worker"] and "command" not in container
        assert env_of(find(ms, "Deployment", f"d-{role}"))[c.ENV_ROLE] == role
    gw = _container(find(ms, "Deployment", "d-gateway"))
    assert gw["command"] == ["python", "-m", "diffdisagg.worker.gateway"]


def test_gateway_carries_what_it_filters_workers_by_and_rolls_with_them() -> None:
    """The gateway dispatches only to workers of its own deployment, revision and family: it must carry
    the same values as the workers, and a change that rolls the workers must roll the gateway too."""
    old = rendered(spec())
    new = rendered(spec(**{"roles.denoise.image": "w:2"}))
    for ms in (old, new):
        gw = env_of(find(ms, "Deployment", "d-gateway"))
        for role in c.STAGE_ROLES:
            wk = env_of(find(ms, "Deployment", f"d-{role}"))
            for var in (c.ENV_DEPLOYMENT, c.ENV_REVISION, c.ENV_MODEL_FAMILY, c.ENV_TOKEN_FILE):
                assert gw[var] == wk[var], var
        assert gw[c.ENV_MODEL_PATH] == "/models/flux"
    old_gw = find(old, "Deployment", "d-gateway")["spec"]["template"]
    new_gw = find(new, "Deployment", "d-gateway")["spec"]["template"]
    assert (
        env_of(find(old, "Deployment", "d-gateway"))[c.ENV_REVISION]
        != env_of(find(new, "Deployment", "d-gateway"))[c.ENV_REVISION]
    )
    assert old_gw["metadata"]["labels"][n.LABEL_REVISION] != new_gw["metadata"]["labels"][n.LABEL_REVISION]


def test_secrets_are_readable_by_the_images_non_root_user() -> None:
    """Secret files belong to root (no fsGroup is set) and the images run as user 65532: the token and
    the API keys must be readable by others, or the worker and the gateway cannot start."""
    ms = rendered(spec(**{"gateway.apiKeySecret": {"name": "keys"}}))
    for name in ("d-prefill", "d-denoise", "d-decode", "d-gateway"):
        pod = find(ms, "Deployment", name)["spec"]["template"]["spec"]
        secrets = [v["secret"] for v in pod["volumes"] if "secret" in v]
        assert secrets and all(s["defaultMode"] & 0o004 for s in secrets), (name, secrets)
