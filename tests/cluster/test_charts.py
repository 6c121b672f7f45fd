"""The Helm charts on the real plane: lint, server-side dry run, install, reconcile, upgrade, uninstall, and
RBAC least privilege proved both ways from the apiserver's audit log.

The operator runs as a local process (kwok's pods run nothing) with the installed Deployment's command and
arguments and a token of the chart's ServiceAccount, so every request it makes is authorized by the chart's
rules and audited under that ServiceAccount's name.

CRDs are cluster-scoped and shared with the other cluster tests, which apply crds/ with kubectl: an existing
CRD is adopted into the Helm release (the documented adoption path) and left, at the end, as crds/ defines it.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import chart_audit as audit
from tests.cluster.chart_operator import LocalOperator, sa_kubeconfig
from tests.cluster.plane import KubectlError, Plane
from tests.cluster.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
CRD_CHART = ROOT / "charts" / "diffdisagg-crds"
OP_CHART = ROOT / "charts" / "diffdisagg"
CRDS = ROOT / "crds"
DDD_CRD = "diffusiondisaggdeployments.diffdisagg.io"
DRS_CRD = "diffusionrolescalers.diffdisagg.io"
KUBE_VERSION = "1.36.3"
KWOK = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
}
LABEL_DEPLOYMENT = "diffdisagg.io/deployment"
KOPF_FINALIZER = "diffdisagg.io/kopf-finalizer"  # operator/config.py: settings.persistence.finalizer


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _template(plane: Plane, release: str, chart: Path, namespace: str, *args: str) -> str:
    return plane.helm(
        "template", release, str(chart), "-n", namespace, "--kube-version", KUBE_VERSION, *args
    ).stdout


# --- lint and server-side dry run -------------------------------------------------------------------------


VALUE_SETS = {
    "defaults": [],
    "single-namespace": ["--set", "watchNamespace=team-a"],
    # the optional ConfigMaps ride along here (adapter rules, Grafana dashboard): no extra render or dry run
    "adapter-rules": [
        "--set",
        "monitoring.adapterRules.enabled=true",
        "--set",
        "serviceAccount.name=op",
        "--set",
        "grafanaDashboard.enabled=true",
    ],
}


def test_helm_lint_strict_both_charts(plane: Plane) -> None:
    out = plane.helm("lint", "--strict", str(CRD_CHART)).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out, out
    for name, args in VALUE_SETS.items():
        proc = plane.helm("lint", "--strict", str(OP_CHART), *args, check=False)
        assert proc.returncode == 0 and "0 chart(s) failed" in proc.stdout, (name, proc.stdout, proc.stderr)


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_rendered_operator_chart_passes_a_server_side_dry_run(
    plane: Plane, namespace: str, values: str
) -> None:
    args = list(VALUE_SETS[values])
    if values == "single-namespace":
        args = ["--set", f"watchNamespace={namespace}"]
    rendered = _template(plane, "dry", OP_CHART, namespace, *args)
    kinds = sorted(d["kind"] for d in _docs(rendered))
    expected_role = (
        ["Role", "RoleBinding"] if values == "single-namespace" else ["ClusterRole", "ClusterRoleBinding"]
    )
    assert set(expected_role) <= set(kinds), kinds
    out = plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered).stdout
    assert out.count("(server dry run)") == len(kinds), out


def test_rendered_crd_chart_passes_a_server_side_dry_run(plane: Plane) -> None:
    rendered = _template(plane, "dry", CRD_CHART, "default")
    docs = _docs(rendered)
    assert sorted(d["metadata"]["name"] for d in docs) == [DDD_CRD, DRS_CRD]
    for d in docs:
        assert d["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    out = plane.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--force-conflicts",
        "--field-manager=chart-dry-run",
        "-f",
        "-",
        input=rendered,
    ).stdout
    assert out.count("serverside-applied (server dry run)") == 2, out


# --- install, reconcile, upgrade, uninstall; RBAC from the audit log ---------------------------------------


def _adopt_crds(plane: Plane, release: str, namespace: str) -> None:
    """Existing CRDs (applied with kubectl by other tests or users) are adopted into the Helm release."""
    for crd in (DDD_CRD, DRS_CRD):
        if plane.kubectl("get", "crd", crd, check=False).returncode == 0:
            plane.kubectl(
                "annotate",
                "crd",
                crd,
                "--overwrite",
                f"meta.helm.sh/release-name={release}",
                f"meta.helm.sh/release-namespace={namespace}",
            )
            plane.kubectl("label", "crd", crd, "--overwrite", "app.kubernetes.io/managed-by=Helm")


def _restore_crds(plane: Plane) -> None:
    """Leave the CRDs as crds/ defines them, without Helm's ownership marks (other tests apply crds/)."""
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS), check=False)
    for crd in (DDD_CRD, DRS_CRD):
        plane.kubectl(
            "annotate",
            "crd",
            crd,
            "meta.helm.sh/release-name-",
            "meta.helm.sh/release-namespace-",
            "helm.sh/resource-policy-",
            check=False,
        )
        plane.kubectl(
            "label",
            "crd",
            crd,
            "app.kubernetes.io/managed-by-",
            "app.kubernetes.io/instance-",
            "helm.sh/chart-",
            check=False,
        )


def _changed_crd_chart(tmp: Path) -> Path:
    """A copy of the CRD chart, one version up, with two changes that a served CRD shows: a new printer column
    on DiffusionDisaggDeployment and a new optional field on DiffusionRoleScaler's spec."""
    chart = tmp / "diffdisagg-crds"
    shutil.copytree(CRD_CHART, chart)
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    meta["version"] = "0.1.1-upgradeprobe"
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta))
    for name, change in ((DDD_CRD, "column"), (DRS_CRD, "field")):
        path = chart / "files" / f"{name}.yaml"
        crd = yaml.safe_load(path.read_text())
        version = crd["spec"]["versions"][0]
        if change == "column":
            version["additionalPrinterColumns"].append(
                {"name": "UpgradeProbe", "type": "string", "jsonPath": ".metadata.uid", "priority": 1}
            )
        else:
            version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["upgradeProbe"] = {
                "type": "string",
                "description": "upgradeProbe: added by the chart upgrade test.",
            }
        path.write_text(yaml.safe_dump(crd, sort_keys=False))
    return chart


def _example_ddd(name: str) -> dict[str, Any]:
    ddd = yaml.safe_load((OP_CHART / "examples" / "ddd-cpu.yaml").read_text())
    ddd["metadata"]["name"] = name
    # the plane's nodes are kwok's fake ones: schedule onto them so that Deployments become ready
    ddd["spec"]["accelerator"].update(copy.deepcopy(KWOK))
    ddd["spec"]["gateway"]["podTemplate"] = {
        "nodeSelector": KWOK["nodeSelector"],
        "tolerations": KWOK["tolerations"],
    }
    return ddd


def _children(plane: Plane, ns: str, name: str) -> dict[str, set[str]]:
    kinds = "deployments,services,configmaps,secrets,networkpolicies,hpa,diffusionrolescalers"
    items = plane.kubectl_json("get", kinds, "-n", ns, "-l", f"{LABEL_DEPLOYMENT}={name}")["items"]
    out: dict[str, set[str]] = {}
    for it in items:
        out.setdefault(it["kind"], set()).add(it["metadata"]["name"])
    return out


def _strays(name: str, owner: dict[str, Any]) -> list[dict[str, Any]]:
    """Children a DDD no longer asks for (as an older revision or operator version may leave): labelled and
    owned like the operator's own, under a name render() never produces. The operator must prune them."""
    ref = {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    stray = f"{name}-stray"

    def meta() -> dict[str, Any]:
        return {
            "name": stray,
            "labels": {
                LABEL_DEPLOYMENT: name,
                "app.kubernetes.io/name": "diffdisagg",
                "app.kubernetes.io/managed-by": "diffdisagg-operator",
            },
            "ownerReferences": [ref],
        }

    sel = {"app": stray}
    return [
        {"apiVersion": "v1", "kind": "Secret", "metadata": meta(), "stringData": {"token": "old"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(), "data": {"k": "v"}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(),
            "spec": {"clusterIP": "None", "selector": sel, "ports": [{"port": 8100}]},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta(),
            "spec": {"podSelector": {"matchLabels": sel}, "policyTypes": ["Ingress"]},
        },
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": meta(),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": stray},
                "minReplicas": 1,
                "maxReplicas": 1,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 80},
                        },
                    }
                ],
            },
        },
        {
            "apiVersion": "diffdisagg.io/v1alpha1",
            "kind": "DiffusionRoleScaler",
            "metadata": meta(),
            "spec": {"deployment": name, "role": "decode", "replicas": 1},
        },
        # last: a Deployment event is what wakes the operator (it watches its managed Deployments)
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(),
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": sel},
                "template": {
                    "metadata": {"labels": sel},
                    "spec": {"containers": [{"name": "c", "image": "old:1"}], **KWOK},
                },
            },
        },
    ]


def _status_written(plane: Plane, ns: str, name: str) -> dict[str, Any] | None:
    obj = plane.kubectl_json("get", "ddd", name, "-n", ns)
    status = obj.get("status") or {}
    gen = obj["metadata"]["generation"]
    types = {c["type"] for c in status.get("conditions") or []}
    if status.get("observedGeneration") == gen and {"Ready", "Progressing", "Degraded"} <= types:
        return obj
    return None


def _deployment_replicas(plane: Plane, ns: str, name: str) -> int:
    return int(plane.kubectl_json("get", "deployment", name, "-n", ns)["spec"]["replicas"])


@pytest.fixture
def charts_released(plane: Plane, namespace: str) -> Iterator[dict[str, str]]:
    """Both charts installed into `namespace` (CRDs adopted if present); everything restored afterwards."""
    names = {"crds": f"crds-{namespace[-6:]}", "op": f"op-{namespace[-6:]}", "ns": namespace}
    try:
        yield names
    finally:
        for release in (names["op"], names["crds"]):
            plane.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "60s", check=False)
        _restore_crds(plane)


def _granted_rules(plane: Plane, ns: str, full: str, mode: str) -> list[dict[str, Any]]:
    """The rules the release gave its ServiceAccount: one ClusterRole cluster-wide; a Role in the watched
    namespace (plus a ClusterRole `<full>-cluster` if the chart has cluster-scoped leftovers) otherwise."""
    if mode == "cluster-wide":
        assert plane.kubectl("get", "role", full, "-n", ns, check=False).returncode != 0
        return list(plane.kubectl_json("get", "clusterrole", full)["rules"])
    assert plane.kubectl("get", "clusterrole", full, check=False).returncode != 0
    rules = list(plane.kubectl_json("get", "role", full, "-n", ns)["rules"])
    extra = plane.kubectl("get", "clusterrole", f"{full}-cluster", "-o", "json", check=False)
    if extra.returncode == 0:
        rules += json.loads(extra.stdout)["rules"]
    return rules


@pytest.mark.parametrize("mode", ["cluster-wide", "single-namespace"])
def test_charts_install_reconcile_upgrade_uninstall_with_least_privilege(
    plane: Plane, namespace: str, charts_released: dict[str, str], tmp_path: Path, mode: str
) -> None:
    ns, crd_rel, op_rel = namespace, charts_released["crds"], charts_released["op"]
    mode_values = ["--set", f"watchNamespace={ns}"] if mode == "single-namespace" else []

    # 1. CRD chart, then the operator chart (cluster-wide by default; or watching the release namespace)
    _adopt_crds(plane, crd_rel, ns)
    plane.helm("install", crd_rel, str(CRD_CHART), "-n", ns, "--wait", "--timeout", "60s")
    for crd in (DDD_CRD, DRS_CRD):
        plane.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")
        obj = plane.kubectl_json("get", "crd", crd)
        assert obj["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    plane.helm("install", op_rel, str(OP_CHART), "-n", ns, *mode_values)
    full = f"{op_rel}-diffdisagg"
    dep = plane.kubectl_json("get", "deployment", full, "-n", ns)
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["serviceAccountName"] == full
    assert container["resources"]["limits"]["memory"]
    rules = _granted_rules(plane, ns, full, mode)
    granted = audit.granted_permissions(rules)

    # 2. the operator, as installed, with the ServiceAccount's credentials
    user = f"system:serviceaccount:{ns}:{full}"
    kubeconfig = sa_kubeconfig(plane, ns, full, tmp_path / "sa.kubeconfig")
    offset = plane.audit_log.stat().st_size
    op = LocalOperator(dep, kubeconfig, tmp_path / "operator.log")
    name = "flux-cpu"
    try:
        op.start()

        # a user-provided token Secret and a pre-existing scaler of the same names: the operator keeps them
        plane.kubectl("create", "secret", "generic", f"{name}-token", "-n", ns, "--from-literal=token=mine")
        plane.apply(
            json.dumps(
                {
                    "apiVersion": "diffdisagg.io/v1alpha1",
                    "kind": "DiffusionRoleScaler",
                    "metadata": {"name": f"{name}-denoise"},
                    "spec": {"deployment": name, "role": "denoise", "replicas": 2},
                }
            ),
            ns,
        )

        # 3. the chart's example deployment reconciles: children appear, status is written
        plane.apply(json.dumps(_example_ddd(name)), ns)
        want = {
            "Deployment": {f"{name}-{r}" for r in ("prefill", "denoise", "decode", "gateway")},
            "Service": {f"{name}-{r}" for r in ("prefill", "denoise", "decode", "gateway")},
            "HorizontalPodAutoscaler": {f"{name}-denoise"},
        }
        wait_for(
            lambda: all(v <= _children(plane, ns, name).get(k, set()) for k, v in want.items()),
            45,
            message=f"children of {name}",
        )
        wait_for(lambda: _status_written(plane, ns, name), 45, message=f"{name} status written")
        for kind in ("secret", "drs"):  # create-only children that already existed are used, never taken over
            obj = plane.kubectl_json(
                "get", kind, f"{name}-{'token' if kind == 'secret' else 'denoise'}", "-n", ns
            )
            assert not obj["metadata"].get("ownerReferences"), obj["metadata"]

        # the chart's ServiceMonitor selects the gateway Service the operator made, on its metrics port
        sm_docs = _docs(
            _template(
                plane,
                "sm",
                OP_CHART,
                ns,
                "--set",
                "monitoring.serviceMonitor.enabled=true",
                "--api-versions",
                "monitoring.coreos.com/v1/ServiceMonitor",
            )
        )
        (sm,) = [d for d in sm_docs if d["kind"] == "ServiceMonitor"]
        gw = plane.kubectl_json("get", "service", f"{name}-gateway", "-n", ns)
        assert sm["spec"]["selector"]["matchLabels"].items() <= gw["metadata"]["labels"].items()
        assert sm["spec"]["endpoints"][0]["port"] in [p["name"] for p in gw["spec"]["ports"]]

        # an older operator version's finalizer (this one needs none) is removed, so deletion never blocks
        plane.kubectl(
            "patch",
            "ddd",
            name,
            "-n",
            ns,
            "--type=json",
            "-p",
            json.dumps([{"op": "add", "path": "/metadata/finalizers", "value": [KOPF_FINALIZER]}]),
        )
        wait_for(
            lambda: not plane.kubectl_json("get", "ddd", name, "-n", ns)["metadata"].get("finalizers"),
            30,
            message="the stale kopf finalizer to be removed by the operator",
        )

        # 4. children no longer wanted are pruned (delete on every child kind)
        ddd = plane.kubectl_json("get", "ddd", name, "-n", ns)
        for obj in _strays(name, ddd):
            plane.apply(json.dumps(obj), ns)
        wait_for(
            lambda: not any(f"{name}-stray" in v for v in _children(plane, ns, name).values()),
            45,
            message="stray children pruned by the operator",
        )

        # 5. upgrade the CRD chart with changed fields: served at once, existing objects kept
        plane.helm(
            "upgrade", crd_rel, str(_changed_crd_chart(tmp_path)), "-n", ns, "--wait", "--timeout", "60s"
        )
        crd = plane.kubectl_json("get", "crd", DDD_CRD)
        assert "UpgradeProbe" in [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

        def probe_stored() -> bool:
            plane.kubectl(
                "patch",
                "drs",
                f"{name}-denoise",
                "-n",
                ns,
                "--type=merge",
                "-p",
                '{"spec":{"upgradeProbe":"v2"}}',
            )
            got = plane.kubectl_json("get", "drs", f"{name}-denoise", "-n", ns)["spec"]
            return got.get("upgradeProbe") == "v2"  # pruned unless the new schema is served

        wait_for(probe_stored, 30, interval=0.5, message="the upgraded DRS schema to be served")
        assert plane.kubectl_json("get", "ddd", name, "-n", ns)["metadata"]["uid"] == ddd["metadata"]["uid"]

        # 6. upgrade the operator chart with changed values; the upgraded operator takes over
        plane.helm(
            "upgrade",
            op_rel,
            str(OP_CHART),
            "-n",
            ns,
            "--reuse-values",
            "--set",
            "operator.resyncSeconds=30",
            "--set",
            "resources.limits.memory=320Mi",
        )
        dep2 = plane.kubectl_json("get", "deployment", full, "-n", ns)
        (c2,) = dep2["spec"]["template"]["spec"]["containers"]
        assert "--resync-seconds=30" in c2["args"] and c2["resources"]["limits"]["memory"] == "320Mi"
        assert dep2["spec"]["strategy"]["type"] == "Recreate"
        assert _granted_rules(plane, ns, full, mode) == rules
        op.stop()
        op = LocalOperator(dep2, kubeconfig, tmp_path / "operator2.log")
        op.start()
        plane.kubectl(
            "patch",
            "ddd",
            name,
            "-n",
            ns,
            "--type=merge",
            "-p",
            '{"spec":{"roles":{"decode":{"replicas":2}}}}',
        )
        wait_for(
            lambda: _deployment_replicas(plane, ns, f"{name}-decode") == 2,
            30,
            message="decode scaled to 2 by the upgraded operator",
        )
        wait_for(lambda: _status_written(plane, ns, name), 30, message="status of generation 2")

        # 7. delete the deployment: garbage collection removes what the operator made
        plane.kubectl("delete", "ddd", name, "-n", ns, "--wait=true", "--timeout=30s")
        wait_for(lambda: not _children(plane, ns, name), 45, message="children garbage-collected")
    except Exception as exc:
        # a step that failed for want of a permission says so (the audit log knows)
        op.stop()
        refused = audit.denied(audit.read_audit(plane.audit_log, offset), user)
        raise AssertionError(
            f"{exc}\nrefused by RBAC so far:\n{audit.fmt(refused)}\noperator log tail:\n{op.log()[-3000:]}"
        ) from exc
    finally:
        op.stop()

    # 8. least privilege, both ways: what the ServiceAccount used == what the chart granted
    requests = list(audit.read_audit(plane.audit_log, offset))
    used = audit.used_permissions(requests, user)
    refused = audit.denied(requests, user)
    assert used, f"no request of {user} in the audit log"
    missing, unused = used - granted, granted - used
    assert not refused and not missing and not unused, (
        f"RBAC of the chart differs from what the operator does.\nrefused by RBAC:\n{audit.fmt(refused)}\n"
        f"used but not granted:\n{audit.fmt(missing)}\ngranted but never used:\n{audit.fmt(unused)}\n"
        f"operator log tail:\n{op.log()[-2000:]}"
    )

    # 9. back to the released CRDs, then uninstall both: nothing left but the CRDs the keep policy protects
    plane.helm("upgrade", crd_rel, str(CRD_CHART), "-n", ns, "--wait", "--timeout", "60s")
    crd = plane.kubectl_json("get", "crd", DDD_CRD)
    assert "UpgradeProbe" not in [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    plane.helm("uninstall", op_rel, "-n", ns, "--wait", "--timeout", "60s")
    sel = f"app.kubernetes.io/instance={op_rel}"

    def leftovers() -> list[str]:
        found = plane.kubectl_json(
            "get",
            "deployments,replicasets,pods,serviceaccounts,roles,rolebindings,configmaps,services",
            "-n",
            ns,
            "-l",
            sel,
        )["items"]
        found += plane.kubectl_json("get", "clusterroles,clusterrolebindings", "-l", sel)["items"]
        return [f"{o['kind']}/{o['metadata']['name']}" for o in found]

    wait_for(lambda: not leftovers(), 45, message="no object of the operator release left")
    plane.helm("uninstall", crd_rel, "-n", ns, "--wait", "--timeout", "60s")
    releases = json.loads(plane.helm("list", "-a", "-n", ns, "-o", "json").stdout)
    assert releases == [], releases
    secrets = plane.kubectl_json("get", "secrets", "-n", ns, "-l", "owner=helm")["items"]
    assert secrets == [], [s["metadata"]["name"] for s in secrets]
    for crd_name in (DDD_CRD, DRS_CRD):  # kept on purpose (helm.sh/resource-policy: keep)
        plane.kubectl("get", "crd", crd_name)


def test_service_monitor_needs_the_prometheus_operator_crds(plane: Plane) -> None:
    with pytest.raises(KubectlError) as err:
        _template(plane, "sm", OP_CHART, "default", "--set", "monitoring.serviceMonitor.enabled=true")
    assert "needs the Prometheus Operator's CRDs" in err.value.stderr
    rendered = _template(
        plane,
        "sm",
        OP_CHART,
        "default",
        "--set",
        "monitoring.serviceMonitor.enabled=true",
        "--api-versions",
        "monitoring.coreos.com/v1/ServiceMonitor",
    )
    (sm,) = [d for d in _docs(rendered) if d["kind"] == "ServiceMonitor"]
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert sm["spec"]["namespaceSelector"] == {"any": True}
    assert sm["spec"]["endpoints"][0]["port"] == "http"
