"""Smoke tests proving the test plane is a real Kubernetes control plane, not a stand-in.

Each test exercises one component for real: CEL validation (apiserver), Deployment -> ReplicaSet -> Pod
and garbage collection (kube-controller-manager), device-resource placement and FailedScheduling
(kube-scheduler with kwok's fake GPU/NPU nodes), an aggregated API behind an APIService (aggregation layer +
endpoint routing into the network namespace), helm install, the audit log and /version.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.plane import ForeignClusterError, Plane, check_kubeconfig
from tests.cluster.waiting import WaitTimeout, wait_for

FIXTURES = Path(__file__).resolve().parent / "fixtures"
K8S_VERSION = "v1.36.3"
KWOK_PLACEMENT = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
}


def _pod(name: str, resources: dict[str, str]) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                **KWOK_PLACEMENT,
                "containers": [
                    {"name": "main", "image": "registry.invalid/x:1", "resources": {"limits": resources}}
                ],
            },
        }
    )


def _condition(obj: dict[str, Any], kind: str) -> bool:
    return any(
        c["type"] == kind and c["status"] == "True" for c in obj.get("status", {}).get("conditions", [])
    )


def test_version_is_the_pinned_release(plane: Plane) -> None:
    raw = json.loads(plane.kubectl("get", "--raw", "/version").stdout)
    assert raw["gitVersion"] == K8S_VERSION
    versions = json.loads(plane.kubectl("version", "-o", "json").stdout)
    assert versions["clientVersion"]["gitVersion"] == K8S_VERSION  # the venv's kubectl, not one on PATH
    assert versions["serverVersion"]["gitVersion"] == K8S_VERSION


def test_crd_cel_rule_rejects_bad_object_with_its_message(plane: Plane, namespace: str) -> None:
    group = "smoke.diffdisagg.io"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"ranges.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "ranges", "singular": "range", "kind": "Range"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "min": {"type": "integer"},
                                        "max": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {"rule": "self.min <= self.max", "message": "min must not exceed max"}
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    plane.apply(json.dumps(crd))
    try:
        wait_for(
            lambda: _condition(plane.kubectl_json("get", "crd", f"ranges.{group}"), "Established"),
            30,
            message="CRD Established",
        )

        def obj(name: str, lo: int, hi: int) -> str:
            doc = {"apiVersion": f"{group}/v1", "kind": "Range", "metadata": {"name": name}, "spec": {}}
            doc["spec"] = {"min": lo, "max": hi}
            return json.dumps(doc)

        # Discovery of a fresh CRD can lag Established by a moment in kubectl's cache: retry the good create.
        wait_for(
            lambda: (
                plane.kubectl(
                    "apply", "-n", namespace, "-f", "-", input=obj("good", 1, 2), check=False
                ).returncode
                == 0
            ),
            30,
            message="a valid Range to be accepted",
        )
        bad = plane.kubectl("apply", "-n", namespace, "-f", "-", input=obj("bad", 5, 2), check=False)
        assert bad.returncode != 0
        assert "min must not exceed max" in bad.stderr
        missing = plane.kubectl("get", "range", "bad", "-n", namespace, check=False)
        assert missing.returncode != 0 and "NotFound" in missing.stderr
    finally:
        plane.kubectl("delete", "crd", f"ranges.{group}", "--wait=false", "--ignore-not-found", check=False)


def test_deployment_becomes_replicaset_pods_running(plane: Plane, namespace: str) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    **KWOK_PLACEMENT,
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.invalid/web:1",
                            "resources": {"requests": {"cpu": "1"}},
                        }
                    ],
                },
            },
        },
    }
    plane.apply(json.dumps(deployment), namespace)
    dep_uid = plane.kubectl_json("get", "deployment", "web", "-n", namespace)["metadata"]["uid"]

    def replicaset() -> dict[str, Any] | None:
        for rs in plane.kubectl_json("get", "replicasets", "-n", namespace)["items"]:
            if any(o["uid"] == dep_uid for o in rs["metadata"].get("ownerReferences", [])):
                return rs
        return None

    rs = wait_for(replicaset, 30, message="a ReplicaSet owned by the Deployment")

    def running_pods() -> list[dict[str, Any]] | None:
        pods = [
            p
            for p in plane.kubectl_json("get", "pods", "-n", namespace)["items"]
            if any(o["uid"] == rs["metadata"]["uid"] for o in p["metadata"].get("ownerReferences", []))
        ]
        ok = len(pods) == 2 and all(
            p["status"].get("phase") == "Running" and _condition(p, "Ready") for p in pods
        )
        return pods if ok else None

    pods = wait_for(running_pods, 60, message="2 Running, Ready pods owned by the ReplicaSet")
    assert all(p["spec"]["nodeName"] in {"gpu-node-0", "npu-node-0", "cpu-node-0"} for p in pods)
    wait_for(
        lambda: (
            plane.kubectl_json("get", "deployment", "web", "-n", namespace)["status"].get("availableReplicas")
            == 2
        ),
        30,
        message="Deployment availableReplicas == 2",
    )


def test_deleting_owner_garbage_collects_dependents(plane: Plane, namespace: str) -> None:
    plane.kubectl("create", "configmap", "owner", "-n", namespace, "--from-literal=k=v")
    owner_uid = plane.kubectl_json("get", "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}],
        },
        "data": {"k": "v"},
    }
    plane.apply(json.dumps(dependent), namespace)
    # The dependent survives while the owner exists (nothing deletes it for another reason)...
    assert plane.kubectl("get", "configmap", "dependent", "-n", namespace, check=False).returncode == 0
    plane.kubectl("delete", "configmap", "owner", "-n", namespace)
    # ...and the garbage collector removes it once the owner is gone.
    wait_for(
        lambda: plane.kubectl("get", "configmap", "dependent", "-n", namespace, check=False).returncode != 0,
        30,
        message="the garbage collector to delete the dependent",
    )


def test_device_requests_are_scheduled_by_resource(plane: Plane, namespace: str) -> None:
    plane.apply(_pod("npu", {"huawei.com/Ascend910": "2"}), namespace)
    plane.apply(_pod("too-many-gpus", {"nvidia.com/gpu": "9"}), namespace)

    def npu_running() -> dict[str, Any] | None:
        pod = plane.kubectl_json("get", "pod", "npu", "-n", namespace)
        return pod if pod["status"].get("phase") == "Running" else None

    assert wait_for(npu_running, 30, message="the Ascend pod Running")["spec"]["nodeName"] == "npu-node-0"

    def failed_scheduling() -> list[dict[str, Any]]:
        events = plane.kubectl_json(
            "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=too-many-gpus"
        )["items"]
        return [e for e in events if e["reason"] == "FailedScheduling"]

    events = wait_for(failed_scheduling, 30, message="a FailedScheduling event for the 9-GPU pod")
    assert any("Insufficient nvidia.com/gpu" in e["message"] for e in events), events
    pod = plane.kubectl_json("get", "pod", "too-many-gpus", "-n", namespace)
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def test_apiservice_answers_through_the_apiserver(plane: Plane, namespace: str) -> None:
    service = "smoke-aggregated"
    crt, key = plane.issue_server_cert(f"aggregated-{namespace}", [f"{service}.{namespace}.svc"])
    server = plane.netns_popen(
        [
            sys.executable, str(FIXTURES / "apiservice_server.py"), "--host", plane.netns_ip, "--port", "0",
            "--cert", str(crt), "--key", str(key), "--client-ca", str(plane.pki / "front-proxy-ca.crt"),
            "--max-seconds", "120",
        ],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    apiservice = "v1beta1.test.diffdisagg.io"
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 20)
        assert ready, "the aggregated API server did not report its port"
        port = int(server.stdout.readline().split()[1])
        manifests = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": service, "namespace": namespace},
                "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port}]},
            },
            {
                # No selector and no kubelet: the endpoint is written by hand, the namespace-side address.
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{service}-1",
                    "namespace": namespace,
                    "labels": {"kubernetes.io/service-name": service},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [plane.netns_ip], "conditions": {"ready": True}}],
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            },
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": apiservice},
                "spec": {
                    "group": "test.diffdisagg.io",
                    "version": "v1beta1",
                    "service": {"namespace": namespace, "name": service, "port": 443},
                    "caBundle": base64.b64encode((plane.pki / "ca.crt").read_bytes()).decode(),
                    "groupPriorityMinimum": 1000,
                    "versionPriority": 15,
                },
            },
        ]
        plane.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}))
        wait_for(
            lambda: _condition(plane.kubectl_json("get", "apiservice", apiservice), "Available"),
            60,
            message="the APIService to become Available",
        )
        resources = json.loads(plane.kubectl("get", "--raw", "/apis/test.diffdisagg.io/v1beta1").stdout)
        assert resources["kind"] == "APIResourceList"
        assert [r["name"] for r in resources["resources"]] == ["whoami"]
        whoami = json.loads(plane.kubectl("get", "--raw", "/apis/test.diffdisagg.io/v1beta1/whoami").stdout)
        # The aggregator authenticated us, then forwarded who we are over its front-proxy client cert.
        assert whoami["user"] == "diffdisagg-admin"
        assert "system:masters" in whoami["groups"]
        assert whoami["proxyClient"] == "front-proxy-client"
        missing = plane.kubectl("get", "--raw", "/apis/test.diffdisagg.io/v1beta1/nothing", check=False)
        # The extension server's own Status comes back through the aggregator.
        assert missing.returncode != 0 and "whoami is the only resource" in missing.stderr
    finally:
        plane.kubectl("delete", "apiservice", apiservice, "--ignore-not-found", check=False)
        server.terminate()
        server.wait(timeout=10)


def test_helm_installs_a_chart(plane: Plane, namespace: str) -> None:
    message = f"hello-{secrets.token_hex(4)}"
    plane.helm(
        "install", "tiny", str(FIXTURES / "tiny-chart"), "-n", namespace,
        "--set", f"message={message}", "--wait", "--timeout", "60s",
    )  # fmt: skip
    cm = plane.kubectl_json("get", "configmap", "tiny-settings", "-n", namespace)
    assert cm["data"]["message"] == message
    dep = plane.kubectl_json("get", "deployment", "tiny", "-n", namespace)
    assert dep["status"].get("readyReplicas") == 1  # --wait waited for kwok's Ready pod
    releases = json.loads(plane.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("tiny", "deployed")]
    plane.helm("uninstall", "tiny", "-n", namespace, "--wait", "--timeout", "60s")
    gone = plane.kubectl("get", "configmap", "tiny-settings", "-n", namespace, check=False)
    assert gone.returncode != 0


def test_audit_log_records_requests(plane: Plane, namespace: str) -> None:
    name = f"audited-{secrets.token_hex(4)}"
    plane.kubectl("create", "configmap", name, "-n", namespace, "--from-literal=k=v")

    def audit_event() -> dict[str, Any] | None:
        for line in plane.audit_log.read_text().splitlines():
            if name not in line:
                continue
            event = json.loads(line)
            ref = event.get("objectRef", {})
            if event["verb"] == "create" and ref.get("name") == name and ref.get("namespace") == namespace:
                return event
        return None

    event = wait_for(audit_event, 20, message=f"an audit event for creating configmap {name}")
    assert event["level"] == "Metadata"
    assert event["user"]["username"] == "diffdisagg-admin"
    assert event["responseStatus"]["code"] == 201
    assert "requestObject" not in event  # Metadata level: no bodies


def test_hpa_controller_acts_on_a_new_autoscaler(plane: Plane, namespace: str) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "scaled"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "scaled"}},
            "template": {
                "metadata": {"labels": {"app": "scaled"}},
                "spec": {
                    **KWOK_PLACEMENT,
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.invalid/s:1",
                            "resources": {"requests": {"cpu": "1"}},
                        }
                    ],
                },
            },
        },
    }
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "scaled"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "scaled"},
            "minReplicas": 1,
            "maxReplicas": 3,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
                }
            ],
        },
    }
    plane.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": [deployment, hpa]}), namespace)

    # Only kube-controller-manager's HPA controller writes these conditions (it reads the target through the
    # scale subresource); whether metrics exist decides ScalingActive, not whether the controller runs.
    def conditions() -> dict[str, str] | None:
        status = plane.kubectl_json("get", "hpa", "scaled", "-n", namespace).get("status", {})
        found = {c["type"]: c["status"] for c in status.get("conditions", [])}
        return found if "AbleToScale" in found else None

    period_s = float(plane.hpa_sync_period.removesuffix("s"))
    found = wait_for(conditions, 2 * period_s + 15, message="the HPA controller to set AbleToScale")
    assert found["AbleToScale"] == "True"


def test_fixture_refuses_kubeconfigs_that_are_not_a_local_plane(plane: Plane, tmp_path: Path) -> None:
    check_kubeconfig(plane.kubeconfig, plane.config)  # the plane's own is accepted
    own = yaml.safe_load(plane.kubeconfig.read_text())

    def variant(name: str, server: str) -> Path:
        doc = json.loads(json.dumps(own))
        doc["clusters"][0]["name"] = name
        doc["clusters"][0]["cluster"]["server"] = server
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.kubeconfig"
        path.write_text(json.dumps(doc))
        return path

    for path in (
        variant(
            own["clusters"][0]["name"], "https://127.0.0.1:6443"
        ),  # right name, address off the plane net
        variant("prod", plane.server),  # right address, not a plane's cluster name
    ):
        with pytest.raises(ForeignClusterError):
            check_kubeconfig(path, plane.config)
    not_yaml = tmp_path / "garbage"
    not_yaml.write_text("clusters: [")
    with pytest.raises(ForeignClusterError):
        check_kubeconfig(not_yaml, plane.config)
    # A live apiserver without this plane's marker is refused even with a well-formed kubeconfig.
    impostor = Plane(plane.config, dataclasses.replace(plane.state, nonce="0" * 32), plane.state_dir)
    with pytest.raises(ForeignClusterError):
        impostor.verify()
    plane.verify()


def test_wait_for_returns_the_value_or_times_out_quoting_the_last_error() -> None:
    calls = iter([None, ValueError("not yet"), {"ready": True}])

    def predicate() -> object:
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    assert wait_for(predicate, 5, interval=0.01) == {"ready": True}

    def never() -> bool:
        raise KeyError("missing-object")

    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"the impossible.*missing-object"):
        wait_for(never, 0.3, interval=0.05, message="the impossible")
    assert time.monotonic() - started < 2.0  # bounded: the deadline holds
