"""Multi-device denoise pods on the real control plane: `accelerator.devicesPerPod: N` gives each denoise
pod N devices (requests = limits), `DIFFDISAGG_DEVICES_PER_POD=N` and an in-memory /dev/shm, and
kube-scheduler places it on a node with N free devices; prefill and decode pods keep one device.
Nothing runs in the pods (kwok): that a worker with N ranks serves is the worker tier's business.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.plane import KubectlError, Plane
from tests.cluster.test_operator_plane import CPU_DDD, KWOK, Operator, env_of, install_crds, pods, wait_ready
from tests.cluster.waiting import wait_for


@pytest.fixture
def operator(plane: Plane, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    install_crds(plane)
    op = Operator(plane, namespace, tmp_path / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()
        assert "Traceback" not in op.log(), f"operator logged tracebacks:\n{op.log()[-4000:]}"


def _nvidia_ddd(name: str, devices: int) -> dict[str, Any]:
    ddd = copy.deepcopy(CPU_DDD)
    ddd["metadata"]["name"] = name
    spec = ddd["spec"]
    spec["accelerator"] = {"vendor": "nvidia", "devicesPerPod": devices, "shmSizeLimit": "4Gi", **KWOK}
    spec["roles"]["denoise"] = {"image": "worker:1", "replicas": 2}
    return ddd


def _running(plane: Plane, ns: str, name: str, role: str, count: int) -> list[dict[str, Any]] | None:
    items = [p for p in pods(plane, ns, name, role) if not p["metadata"].get("deletionTimestamp")]
    if len(items) == count and all(p["status"].get("phase") == "Running" for p in items):
        return items
    return None


def test_denoise_with_two_devices_per_pod_lands_on_the_gpu_node(
    plane: Plane, namespace: str, operator: Operator
) -> None:
    ns = namespace
    plane.apply(json.dumps(_nvidia_ddd("md", 2)), ns)
    wait_ready(plane, ns, "md")

    denoise = wait_for(lambda: _running(plane, ns, "md", "denoise", 2), 60, message="2 denoise pods Running")
    for pod in denoise:
        spec = pod["spec"]
        assert spec["nodeName"] == "gpu-node-0"
        res = spec["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == "2" and res["limits"]["nvidia.com/gpu"] == "2"
        env = env_of(spec)
        assert env["DIFFDISAGG_DEVICES_PER_POD"] == "2" and env["DIFFDISAGG_PLATFORM"] == "cuda"
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in [
            {k: m[k] for k in ("name", "mountPath")} for m in spec["containers"][0]["volumeMounts"]
        ]
    for role in ("prefill", "decode"):
        (pod,) = wait_for(lambda r=role: _running(plane, ns, "md", r, 1), 60, message=f"{role} Running")
        res = pod["spec"]["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == "1", f"{role} replicates: one device is all it can use"
        assert env_of(pod["spec"])["DIFFDISAGG_DEVICES_PER_POD"] == "1"
        assert all(v["name"] != "dshm" for v in pod["spec"]["volumes"])

    # the scheduler accounts for all of them: 2x2 + 1 + 1 of the node's 8 GPUs are taken by this test
    node_pods = plane.kubectl_json(
        "get",
        "pods",
        "-n",
        ns,
        "--field-selector",
        "spec.nodeName=gpu-node-0",
        "-l",
        "diffdisagg.io/deployment=md",
    )["items"]
    gpus = sum(
        int(c.get("resources", {}).get("requests", {}).get("nvidia.com/gpu", 0))
        for p in node_pods
        for c in p["spec"]["containers"]
    )
    assert gpus == 6


def test_more_devices_per_pod_than_a_node_has_stays_pending(
    plane: Plane, namespace: str, operator: Operator
) -> None:
    """16 is accepted (the CRD's maximum), but no fake node has 16 GPUs: the denoise pods stay Pending
    for the scheduler's reason, and the deployment says it is not Ready."""
    ns = namespace
    plane.apply(json.dumps(_nvidia_ddd("big", 16)), ns)

    def pending() -> bool:
        items = pods(plane, ns, "big", "denoise")
        return bool(items) and all(
            p["status"].get("phase") == "Pending"
            and any(
                c.get("reason") == "Unschedulable" and "nvidia.com/gpu" in c.get("message", "")
                for c in p["status"].get("conditions") or []
            )
            for p in items
        )

    wait_for(pending, 60, message="denoise pods Pending: Insufficient nvidia.com/gpu")
    ddd = plane.kubectl_json("get", "ddd", "big", "-n", ns)
    ready = [c for c in ddd["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "False"


def test_seventeen_devices_per_pod_is_refused_naming_the_field(plane: Plane, namespace: str) -> None:
    install_crds(plane)
    try:
        plane.kubectl(
            "create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(_nvidia_ddd("x", 17))
        )
    except KubectlError as e:
        err = str(e) + getattr(e, "stderr", "")
        assert "spec.accelerator.devicesPerPod" in err and "16" in err, err
    else:
        raise AssertionError("devicesPerPod 17 was accepted")
