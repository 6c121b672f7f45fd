"""The operator against the real control plane: a local kopf process (`python -m diffdisagg.operator`)
reconciling DiffusionDisaggDeployments into Deployments that kube-scheduler places on kwok's fake
GPU/NPU nodes. Nothing runs inside the pods (kwok only marks them Running): the wiring itself is
checked on the rendered pod specs here and by unit tests.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.operator_process import NamespaceOperator, install_crds
from tests.cluster.plane import Plane
from tests.cluster.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
LABEL = "diffdisagg.io/deployment"
CHILD_KINDS = (
    "deployments,services,configmaps,secrets,networkpolicies,horizontalpodautoscalers,diffusionrolescalers"
)

KWOK = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
}
CPU_DDD: dict[str, Any] = {
    "apiVersion": "diffdisagg.io/v1alpha1",
    "kind": "DiffusionDisaggDeployment",
    "metadata": {"name": "tiny"},
    "spec": {
        "model": {"family": "flux", "path": "/models/tiny-flux"},
        "accelerator": {"vendor": "cpu", **KWOK},
        "gateway": {"image": "gw:1", "podTemplate": {"tolerations": KWOK["tolerations"]}},
        "roles": {
            "prefill": {"image": "worker:1", "replicas": 1},
            "denoise": {
                "image": "worker:1",
                "replicas": 3,
                "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 8},
            },
            "decode": {"image": "worker:1", "replicas": 1},
        },
    },
}


@pytest.fixture
def crds(plane: Plane) -> None:
    # CRDs are cluster-scoped and shared by name; they are left installed (deleting them would delete
    # every DiffusionDisaggDeployment on the plane, including other tests'). Applied per test: a chart
    # test may have installed another copy meanwhile.
    install_crds(plane)


#: the plane tests' operator (kept under this name: test_operator_multidevice imports it)
Operator = NamespaceOperator


@pytest.fixture
def operator(plane: Plane, namespace: str, crds: None, tmp_path: Path) -> Iterator[Operator]:
    op = Operator(plane, namespace, tmp_path / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()
        errors = [ln for ln in op.log().splitlines() if "Traceback" in ln]
        assert not errors, f"operator logged tracebacks:\n{op.log()[-4000:]}"


# --- helpers ----------------------------------------------------------------------------------------
def get(plane: Plane, ns: str, kind: str, name: str) -> dict[str, Any]:
    return plane.kubectl_json("get", kind, name, "-n", ns)


def condition(obj: dict[str, Any], type_: str) -> str | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c["status"]
    return None


def wait_ready(plane: Plane, ns: str, name: str, timeout: float = 60) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        ddd = get(plane, ns, "ddd", name)
        ok = (
            condition(ddd, "Ready") == "True"
            and condition(ddd, "Progressing") == "False"
            and ddd["status"].get("observedGeneration") == ddd["metadata"]["generation"]
        )
        return ddd if ok else None

    return wait_for(ready, timeout, interval=0.3, message=f"ddd {ns}/{name} Ready and not Progressing")


def pods(plane: Plane, ns: str, name: str, role: str) -> list[dict[str, Any]]:
    return plane.kubectl_json("get", "pods", "-n", ns, "-l", f"{LABEL}={name},diffdisagg.io/role={role}")[
        "items"
    ]


def env_of(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod_spec["containers"][0]["env"]}


def events(plane: Plane, ns: str, name: str) -> list[str]:
    items = plane.kubectl_json(
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        f"involvedObject.name={name},involvedObject.kind=DiffusionDisaggDeployment",
    )["items"]
    return [e["reason"] for e in items]


def snapshot(plane: Plane, ns: str, name: str) -> dict[str, Any]:
    """resourceVersion and managedFields of every child (the HPA: only the operator's own entry, since
    the HPA controller rewrites its status on its own schedule)."""
    out = {}
    for obj in plane.kubectl_json("get", CHILD_KINDS, "-n", ns, "-l", f"{LABEL}={name}")["items"]:
        key = f"{obj['kind']}/{obj['metadata']['name']}"
        mf = obj["metadata"].get("managedFields") or []
        if obj["kind"] == "HorizontalPodAutoscaler":
            out[key] = [m for m in mf if m["manager"].startswith("diffdisagg")]
        else:
            out[key] = (obj["metadata"]["resourceVersion"], mf)
    return out


def printer_row(plane: Plane, ns: str, name: str) -> dict[str, str]:
    text = plane.kubectl("get", "ddd", name, "-n", ns).stdout.splitlines()
    return dict(zip(text[0].split(), text[1].split(), strict=False))


def apply_obj(plane: Plane, ns: str, obj: dict[str, Any]) -> None:
    plane.apply(json.dumps(obj), ns)


# --- tests -----------------------------------------------------------------------------------------
def test_nvidia_example_lands_on_gpu_node_ready_and_idempotent(
    plane: Plane, namespace: str, operator: Operator
) -> None:
    ns = namespace
    # the example mounts a PVC and asks for one RDMA NIC (rdma/hca); the fake GPU node gets the NIC
    # resource and a statically bound volume so that the pods can schedule
    plane.kubectl(
        "patch",
        "node",
        "gpu-node-0",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"capacity": {"rdma/hca": "1000"}, "allocatable": {"rdma/hca": "1000"}}}),
    )
    pv = f"flux-weights-{ns}"
    plane.apply(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadOnlyMany"],
                    "storageClassName": "",
                    "hostPath": {"path": "/data/flux"},
                    "claimRef": {"namespace": ns, "name": "flux-weights"},
                },
            }
        )
    )
    try:
        plane.apply(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "flux-weights"},
                    "spec": {
                        "accessModes": ["ReadOnlyMany"],
                        "storageClassName": "",
                        "volumeName": pv,
                        "resources": {"requests": {"storage": "1Gi"}},
                    },
                }
            ),
            ns,
        )
        plane.kubectl("apply", "-n", ns, "-f", str(EXAMPLES / "ddd-nvidia.yaml"))
        ddd = wait_ready(plane, ns, "flux-nvidia")

        st = ddd["status"]
        # kopf's bookkeeping stays in a small status stanza, never in annotations
        assert not [k for k in ddd["metadata"].get("annotations") or {} if "kopf" in k], ddd["metadata"]
        assert not ddd["metadata"].get("finalizers"), "no finalizer: garbage collection does the deletes"
        assert st["roles"]["prefill"] == {
            "desired": 1,
            "ready": 1,
            "updated": 1,
            "summary": "1/1",
            "autoscaled": False,
        }
        assert st["roles"]["denoise"]["desired"] == 2 and st["roles"]["denoise"]["autoscaled"]  # minReplicas
        assert st["gateway"]["endpoint"] == f"http://flux-nvidia-gateway.{ns}.svc:8000"
        row = printer_row(plane, ns, "flux-nvidia")
        assert (row["PREFILL"], row["DENOISE"], row["DECODE"], row["GATEWAY"], row["READY"]) == (
            "1/1",
            "2/2",
            "1/1",
            "1/1",
            "True",
        ), row
        assert (row["FAMILY"], row["VENDOR"]) == ("flux", "nvidia")

        for role in ("prefill", "denoise", "decode"):
            for pod in pods(plane, ns, "flux-nvidia", role):
                assert pod["spec"]["nodeName"] == "gpu-node-0", pod["metadata"]["name"]
                assert pod["status"]["phase"] == "Running"
                limits = pod["spec"]["containers"][0]["resources"]["limits"]
                assert limits["nvidia.com/gpu"] == "1" and limits["rdma/hca"] == "1"
                env = env_of(pod["spec"])
                assert (
                    env["DIFFDISAGG_TRANSFER_BACKEND"] == "mooncake"
                    and env["DIFFDISAGG_RDMA_DEVICES"] == "mlx5_0"
                )
                assert (
                    env["DIFFDISAGG_REVISION"]
                    == st["revision"]
                    == pod["metadata"]["labels"]["diffdisagg.io/revision"]
                )

        drs = get(plane, ns, "drs", "flux-nvidia-denoise")
        assert drs["spec"]["replicas"] == 2
        assert drs["status"]["selector"] == "diffdisagg.io/deployment=flux-nvidia,diffdisagg.io/role=denoise"
        hpa = get(plane, ns, "hpa", "flux-nvidia-denoise")
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "DiffusionRoleScaler"
        assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "diffdisagg_queue_depth"
        assert condition(ddd, "ScalersReady") == "True"
        token = get(plane, ns, "secret", "flux-nvidia-token")["data"]["token"]
        assert len(token) > 20
        np_ = get(plane, ns, "networkpolicy", "flux-nvidia-workers")["spec"]
        assert {"protocol": "TCP", "port": 15000, "endPort": 15063} in np_["ingress"][0]["ports"]
        assert "Created" in wait_for(lambda: events(plane, ns, "flux-nvidia"), 10, message="events")

        # a second reconcile leaves every child's resourceVersion and managedFields untouched and never
        # rotates the token: once forced by a label change (the operator skips what it applied before),
        # once after a restart (empty memory: every child is server-side-applied again, as a no-op)
        before = snapshot(plane, ns, "flux-nvidia")
        n = operator.reconciles("flux-nvidia")
        plane.kubectl("label", "ddd", "flux-nvidia", "-n", ns, "poke=1")
        wait_for(lambda: operator.reconciles("flux-nvidia") > n, 15, message="a second reconcile")
        assert snapshot(plane, ns, "flux-nvidia") == before
        operator.stop()
        n = operator.reconciles("flux-nvidia")
        mark = len(operator.log())
        operator.start()
        wait_for(
            lambda: operator.reconciles("flux-nvidia") > n, 30, message="the first reconcile after restart"
        )
        first = next(ln for ln in operator.log()[mark:].splitlines() if f"reconciled {ns}/flux-nvidia " in ln)
        assert "applied=11 created=0 deleted=0" in first, first
        assert snapshot(plane, ns, "flux-nvidia") == before
        assert get(plane, ns, "secret", "flux-nvidia-token")["data"]["token"] == token
    finally:
        plane.kubectl("delete", "pv", pv, "--wait=false", "--ignore-not-found", check=False)


def test_ascend_example_lands_on_npu_node_and_delete_collects_everything(
    plane: Plane, namespace: str, operator: Operator
) -> None:
    ns = namespace
    plane.kubectl("apply", "-n", ns, "-f", str(EXAMPLES / "ddd-ascend.yaml"))
    ddd = wait_ready(plane, ns, "sd3-ascend")
    assert printer_row(plane, ns, "sd3-ascend")["DENOISE"] == "2/2"
    for role in ("prefill", "denoise", "decode"):
        ps = pods(plane, ns, "sd3-ascend", role)
        assert ps and all(p["spec"]["nodeName"] == "npu-node-0" for p in ps)
        spec = ps[0]["spec"]
        assert spec["containers"][0]["resources"]["limits"]["huawei.com/Ascend910"] == "1"
        env = env_of(spec)
        assert env["HCCL_IF_IP"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}
        assert env["DIFFDISAGG_PLATFORM"] == "npu" and env["DIFFDISAGG_TRANSFER_PROTOCOL"] == "ascend"
        assert {"name": "hccn-conf", "hostPath": {"path": "/etc/hccn.conf", "type": "File"}} in spec[
            "volumes"
        ]
    assert ddd["status"]["roles"]["denoise"]["ready"] == 2

    plane.kubectl("delete", "ddd", "sd3-ascend", "-n", ns, "--wait=false")
    wait_for(
        lambda: (
            not plane.kubectl_json("get", CHILD_KINDS + ",pods", "-n", ns, "-l", f"{LABEL}=sd3-ascend")[
                "items"
            ]
        ),
        30,
        interval=0.5,
        message="garbage collection of every child",
    )


def test_image_update_rolls_every_role(plane: Plane, namespace: str, operator: Operator) -> None:
    ns = namespace
    obj = copy.deepcopy(CPU_DDD)
    apply_obj(plane, ns, obj)
    old = wait_ready(plane, ns, "tiny")["status"]["revision"]
    obj["spec"]["roles"]["denoise"]["image"] = "worker:2"
    apply_obj(plane, ns, obj)

    def rolled() -> str | None:
        ddd = wait_ready(plane, ns, "tiny", timeout=1)
        new = ddd["status"]["revision"]
        if new == old:
            return None
        for role in ("prefill", "denoise", "decode", "gateway"):
            revs = {
                p["metadata"]["labels"]["diffdisagg.io/revision"]
                for p in pods(plane, ns, "tiny", role)
                if not p["metadata"].get("deletionTimestamp")
            }
            if revs != {new}:
                return None
        return new

    new = wait_for(rolled, 60, interval=0.5, message="every role on the new revision")
    assert new != old
    images = {
        p["spec"]["containers"][0]["image"]
        for p in pods(plane, ns, "tiny", "denoise")
        if not p["metadata"].get("deletionTimestamp")
    }
    assert images == {"worker:2"}
    reasons = events(plane, ns, "tiny")
    assert "RolloutStarted" in reasons and "ReplicasIgnored" in reasons


def test_scale_drs_reaches_deployment_and_survives_restart(
    plane: Plane, namespace: str, operator: Operator
) -> None:
    ns = namespace
    apply_obj(plane, ns, CPU_DDD)
    wait_ready(plane, ns, "tiny")
    # inline replicas (3) are ignored: the scaler starts at minReplicas
    assert get(plane, ns, "deployment", "tiny-denoise")["spec"]["replicas"] == 1

    t0 = time.monotonic()
    plane.kubectl("scale", "drs", "tiny-denoise", "-n", ns, "--replicas=5")
    wait_for(
        lambda: get(plane, ns, "deployment", "tiny-denoise")["spec"]["replicas"] == 5,
        10,
        interval=0.1,
        message="Deployment to follow the scaler",
    )
    reaction = time.monotonic() - t0
    assert reaction < 5, f"scale reaction {reaction:.1f}s"
    wait_for(
        lambda: get(plane, ns, "drs", "tiny-denoise").get("status", {}).get("readyReplicas") == 5,
        30,
        message="scaler status to report 5 ready",
    )
    scale = json.loads(
        plane.kubectl(
            "get",
            "--raw",
            f"/apis/diffdisagg.io/v1alpha1/namespaces/{ns}/diffusionrolescalers/tiny-denoise/scale",
        ).stdout
    )
    assert scale["status"]["replicas"] == 5 and "diffdisagg.io/role=denoise" in scale["status"]["selector"]

    # restart the operator: it resumes, reconciles, and must neither reset the scaler nor the Deployment
    operator.kill()
    mark = operator.reconciles("tiny")
    operator.start()
    wait_for(
        lambda: operator.reconciles("tiny") > mark, 30, message="the restarted operator's first reconcile"
    )
    assert get(plane, ns, "drs", "tiny-denoise")["spec"]["replicas"] == 5
    assert get(plane, ns, "deployment", "tiny-denoise")["spec"]["replicas"] == 5

    # hpa: false hands the scaler to an external autoscaler (KEDA): the operator's HPA goes, the scaler and
    # its replica count stay, and the Deployment still follows /scale
    assert plane.kubectl_json("get", "hpa", "-n", ns, "-l", f"{LABEL}=tiny")["items"], "the operator's HPA"
    obj = copy.deepcopy(CPU_DDD)
    obj["spec"]["roles"]["denoise"]["autoscaling"]["hpa"] = False
    apply_obj(plane, ns, obj)
    wait_for(
        lambda: not plane.kubectl_json("get", "hpa", "-n", ns, "-l", f"{LABEL}=tiny")["items"],
        20,
        message="the operator's HPA pruned",
    )
    assert get(plane, ns, "drs", "tiny-denoise")["spec"]["replicas"] == 5
    plane.kubectl("scale", "drs", "tiny-denoise", "-n", ns, "--replicas=2")  # what KEDA's HPA would do
    wait_for(
        lambda: get(plane, ns, "deployment", "tiny-denoise")["spec"]["replicas"] == 2,
        10,
        interval=0.1,
        message="Deployment to follow the externally driven scaler",
    )
    wait_for(
        lambda: (
            {c["type"]: c["status"] for c in get(plane, ns, "ddd", "tiny")["status"]["conditions"]}.get(
                "ScalersReady"
            )
            == "True"
        ),
        20,
        message="ScalersReady without an operator HPA",
    )

    # turning autoscaling off removes scaler + HPA and hands the replicas back to the spec
    obj = copy.deepcopy(CPU_DDD)
    obj["spec"]["roles"]["denoise"]["autoscaling"]["enabled"] = False
    apply_obj(plane, ns, obj)
    wait_for(
        lambda: not plane.kubectl_json("get", "drs,hpa", "-n", ns, "-l", f"{LABEL}=tiny")["items"],
        20,
        message="scaler and HPA pruned",
    )
    wait_for(
        lambda: get(plane, ns, "deployment", "tiny-denoise")["spec"]["replicas"] == 3,
        20,
        message="inline replicas back in force",
    )


def test_light_stages_on_a_time_sliced_gpu_resource(plane: Plane, namespace: str, operator: Operator) -> None:
    # spec.roles.<role>.accelerator.resourceName: decode and prefill ask for the resource the NVIDIA device
    # plugin advertises with time-slicing and renameByDefault (nvidia.com/gpu.shared), denoise for a whole
    # nvidia.com/gpu; the fake GPU node advertises both, and kube-scheduler places each pod by its own
    ns = namespace
    shared = "nvidia.com/gpu.shared"
    plane.kubectl(
        "patch",
        "node",
        "gpu-node-0",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"capacity": {shared: "32"}, "allocatable": {shared: "32"}}}),
    )
    obj = copy.deepcopy(CPU_DDD)
    obj["metadata"]["name"] = "shared"
    spec = obj["spec"]
    spec["accelerator"] = {"vendor": "nvidia", **KWOK}
    spec["roles"]["prefill"]["accelerator"] = {"resourceName": shared}
    spec["roles"]["denoise"] = {"image": "worker:1", "replicas": 1}
    spec["roles"]["decode"]["accelerator"] = {"resourceName": shared}
    apply_obj(plane, ns, obj)
    wait_ready(plane, ns, "shared")
    for role, resource in (("prefill", shared), ("denoise", "nvidia.com/gpu"), ("decode", shared)):
        ps = pods(plane, ns, "shared", role)
        assert len(ps) == 1, role
        pod = ps[0]
        assert pod["spec"]["nodeName"] == "gpu-node-0" and pod["status"]["phase"] == "Running", role
        res = pod["spec"]["containers"][0]["resources"]
        assert res["limits"] == {resource: "1"} and res["requests"] == {resource: "1"}, (role, res)
