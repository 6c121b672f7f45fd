"""The charts without a cluster: values.schema.json refuses bad values (through `helm template`, as
`helm install` does), the rendered operator Deployment and RBAC keep their invariants, values.yaml is
documented key by key, the CRD chart never drifts from crds/ and the operator chart's Grafana dashboard never
drifts from docs/grafana/ (scripts/sync-crds.sh --check, which runs scripts/sync-dashboards.sh --check).

helm is the control plane's (scripts/cluster/build.sh builds it once and caches it; a cached call is instant).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OP_CHART = ROOT / "charts" / "diffdisagg"
CRD_CHART = ROOT / "charts" / "diffdisagg-crds"
DASHBOARD = ROOT / "docs" / "grafana" / "diffdisagg-dashboard.json"
DASHBOARD_KEY = "diffdisagg-dashboard.json"
KUBE_VERSION = "1.36.3"


@cache
def _helm() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "cluster" / "build.sh")], capture_output=True, text=True, timeout=1800
    )
    assert out.returncode == 0, f"scripts/cluster/build.sh failed:\n{out.stderr[-3000:]}"
    helm = Path(out.stdout.strip().splitlines()[-1]) / "bin" / "helm"
    assert helm.exists(), helm
    return str(helm)


def _template(chart: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [_helm(), "template", "rel", str(chart), "-n", "ops", "--kube-version", KUBE_VERSION, *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _docs(chart: Path, *args: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_template(chart, *args).stdout) if d]


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


# --- values.schema.json -------------------------------------------------------------------------------------

BAD_VALUES = [
    (["--set", "replicaCount=2"], "replicaCount"),  # one replica only: kopf peering is not leader election
    (["--set", "image.tag=latest"], "image.tag"),
    (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    (["--set", "image.repository="], "image.repository"),
    (["--set", "watchNamespace=Team_A"], "watchNamespace"),
    (["--set", "operator.healthPort=80"], "healthPort"),
    (["--set", "operator.healthPort=http"], "healthPort"),
    (["--set", "operator.resyncSeconds=0"], "resyncSeconds"),
    (["--set", "operator.verbose=yes-please"], "verbose"),
    (["--set", "rbac.create=maybe"], "rbac.create"),
    (["--set", "serviceAccount.create=false"], "serviceAccount"),  # then a name is required
    (["--set", "resources.limits.memory=lots"], "memory"),
    (["--set", "livenessProbe.periodSeconds=0"], "periodSeconds"),
    (["--set", "securityContext.privileged=true"], "privileged"),
    (["--set", "monitoring.serviceMonitor.interval=fast"], "interval"),
    (["--set", "monitoring.adapterRules.enable=true"], "enable"),  # misspelt key
    (["--set", "nodeSelector.zone=1"], "nodeSelector"),  # label values are strings
    (["--set", "grafanaDashboard.enabled=yes"], "grafanaDashboard.enabled"),
    (["--set", "grafanaDashboard.enable=true"], "enable"),  # misspelt key
    (["--set", "grafanaDashboard.namespace=Mon_itoring"], "grafanaDashboard.namespace"),
    (["--set", "grafanaDashboard.labels.grafana_dashboard=1"], "grafana_dashboard"),  # a number, not "1"
    (["--set-string", "grafanaDashboard.labels.team=a+b"], "labels.team"),  # not a label value
    (["--set-string", "grafanaDashboard.labels.-x=1"], "-x"),  # not a label name
    (["--set", "grafanaDashboard.labels.grafana_dashboard=null"], "minProperties"),  # no label: never found
    (["--set", "grafanaDashboard.annotations.folder=2"], "annotations"),
]


@pytest.mark.parametrize(("args", "field"), BAD_VALUES, ids=[a[1] for a in BAD_VALUES])
def test_schema_rejects_bad_values(args: list[str], field: str) -> None:
    proc = _template(OP_CHART, *args, check=False)
    assert proc.returncode != 0, f"{args} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert field.split(".")[-1] in proc.stderr, proc.stderr


def test_schema_accepts_the_documented_alternatives() -> None:
    _template(
        OP_CHART, "--set", "watchNamespace=team-a", "--set", "image.tag=0.1.0-rc.1",
        "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=ops-sa",
        "--set", "resources.limits.cpu=500m", "--set", "operator.verbose=true",
        "--set", "monitoring.adapterRules.enabled=true", "--set", "image.pullPolicy=Always",
    )  # fmt: skip


def test_crd_chart_schema_rejects_unknown_keys() -> None:
    proc = _template(CRD_CHART, "--set", "keepp=false", check=False)
    assert proc.returncode != 0 and "keepp" in proc.stderr, proc.stderr


# --- rendered invariants ------------------------------------------------------------------------------------


def test_operator_deployment_is_one_non_root_replica_with_recreate_and_probe() -> None:
    (dep,) = _kind(_docs(OP_CHART), "Deployment")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert c["image"] == "diffdisagg/operator:0.1.0", "the tag defaults to the chart's appVersion"
    assert c["command"] == ["python", "-m", "diffdisagg.operator"]
    assert "--liveness-port=8080" in c["args"] and not any(a.startswith("--namespace") for a in c["args"])
    probe = c["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], "read-only root needs a writable /tmp"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert pod["serviceAccountName"] == "rel-diffdisagg"


def _rules(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for d in _kind(docs, kind) for r in d["rules"]]


def test_rbac_cluster_wide_by_default_and_namespaced_with_watch_namespace() -> None:
    cluster = _docs(OP_CHART)
    assert not _kind(cluster, "Role") and len(_kind(cluster, "ClusterRole")) == 1
    (crb,) = _kind(cluster, "ClusterRoleBinding")
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "rel-diffdisagg", "namespace": "ops"}]

    scoped = _docs(OP_CHART, "--set", "watchNamespace=team-a")
    (role,) = _kind(scoped, "Role")
    (rb,) = _kind(scoped, "RoleBinding")
    assert role["metadata"]["namespace"] == rb["metadata"]["namespace"] == "team-a"
    assert rb["subjects"][0]["namespace"] == "ops", "the ServiceAccount stays in the release namespace"
    (dep,) = _kind(scoped, "Deployment")
    assert "--namespace=team-a" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    # the namespaced rules are the same in both modes; only the cluster-scoped CRD watch differs
    cluster_rules = _rules(cluster, "ClusterRole")
    crd_rules = [r for r in cluster_rules if r["apiGroups"] == ["apiextensions.k8s.io"]]
    assert [r for r in cluster_rules if r not in crd_rules] == _rules(scoped, "Role")
    assert crd_rules == [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                          "verbs": ["list", "watch"]}]  # fmt: skip


def test_rbac_has_no_wildcards_and_no_secret_reads_beyond_get() -> None:
    for rule in _rules(_docs(OP_CHART), "ClusterRole"):
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
        if "secrets" in rule["resources"]:
            assert "watch" not in rule["verbs"] and "update" not in rule["verbs"], rule


def test_rbac_off_renders_no_rbac() -> None:
    kinds = {d["kind"] for d in _docs(OP_CHART, "--set", "rbac.create=false")}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}, kinds


def test_adapter_rules_are_the_tested_prometheus_adapter_rules() -> None:
    """The ConfigMap carries exactly docs/autoscaling/prometheus-adapter-rules.yaml, the rules the metrics
    tests run prometheus-adapter with."""
    (cm,) = _kind(_docs(OP_CHART, "--set", "monitoring.adapterRules.enabled=true"), "ConfigMap")
    tested = yaml.safe_load((ROOT / "docs" / "autoscaling" / "prometheus-adapter-rules.yaml").read_text())
    assert yaml.safe_load(cm["data"]["config.yaml"]) == tested


def test_service_monitor_needs_its_crd_and_scrapes_gateways() -> None:
    proc = _template(OP_CHART, "--set", "monitoring.serviceMonitor.enabled=true", check=False)
    assert proc.returncode != 0 and "needs the Prometheus Operator's CRDs" in proc.stderr
    args = ("--set", "monitoring.serviceMonitor.enabled=true", "--api-versions",
            "monitoring.coreos.com/v1/ServiceMonitor", "--set", "watchNamespace=team-a")  # fmt: skip
    (sm,) = _kind(_docs(OP_CHART, *args), "ServiceMonitor")
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"


def test_service_monitor_refuses_a_timeout_above_the_interval() -> None:
    base = ("--set", "monitoring.serviceMonitor.enabled=true", "--api-versions",
            "monitoring.coreos.com/v1/ServiceMonitor")  # fmt: skip
    (sm,) = _kind(_docs(OP_CHART, *base), "ServiceMonitor")
    (ep,) = sm["spec"]["endpoints"]
    assert (ep["interval"], ep["scrapeTimeout"]) == ("5s", "4s"), "the documented defaults"
    cases = (("3s", "4s", False), ("1m", "1m1ms", False), ("1m", "59s999ms", True), ("1h", "59m60s", True),
             ("1m30s", "90s", True), ("90s", "1m31s", False))  # fmt: skip
    for interval, timeout, ok in cases:
        args = (*base, "--set", f"monitoring.serviceMonitor.interval={interval}",
                "--set", f"monitoring.serviceMonitor.scrapeTimeout={timeout}")  # fmt: skip
        proc = _template(OP_CHART, *args, check=False)
        assert (proc.returncode == 0) is ok, (interval, timeout, proc.stderr)
        if not ok:
            assert "must not exceed monitoring.serviceMonitor.interval" in proc.stderr, proc.stderr


# --- the Grafana dashboard ----------------------------------------------------------------------------------


def _dashboard_maps(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in _kind(docs, "ConfigMap") if DASHBOARD_KEY in (d.get("data") or {})]


def test_grafana_dashboard_is_off_by_default() -> None:
    assert not _dashboard_maps(_docs(OP_CHART))
    docs = _docs(
        OP_CHART, "--set", "grafanaDashboard.enabled=false", "--set", "monitoring.adapterRules.enabled=true"
    )
    assert not _dashboard_maps(docs) and len(_kind(docs, "ConfigMap")) == 1, "only the adapter rules"


def test_grafana_dashboard_ships_the_docs_dashboard_for_the_sidecar() -> None:
    (cm,) = _dashboard_maps(_docs(OP_CHART, "--set", "grafanaDashboard.enabled=true"))
    text = cm["data"][DASHBOARD_KEY]
    assert text == DASHBOARD.read_text(encoding="utf-8"), "the ConfigMap carries the file byte for byte"
    assert json.loads(text) == json.loads(DASHBOARD.read_text(encoding="utf-8"))
    meta = cm["metadata"]
    assert meta["name"] == "rel-diffdisagg-dashboard" and meta["namespace"] == "ops"
    assert meta["labels"]["grafana_dashboard"] == "1", "the grafana chart's default sidecar label"
    assert meta["labels"]["app.kubernetes.io/instance"] == "rel"
    assert "annotations" not in meta
    assert len(yaml.safe_dump(cm).encode()) < 1024 * 1024, "a ConfigMap holds at most 1 MiB"


def test_grafana_dashboard_labels_namespace_and_annotations_are_overridable() -> None:
    args = ("--set", "grafanaDashboard.enabled=true", "--set", "grafanaDashboard.namespace=monitoring",
            "--set", "grafanaDashboard.labels.grafana_dashboard=null", "--set-string",
            "grafanaDashboard.labels.dashboards=diffdisagg", "--set-string",
            "grafanaDashboard.labels.app\\.kubernetes\\.io/part-of=serving", "--set-string",
            "grafanaDashboard.annotations.grafana_folder=Diffusion serving")  # fmt: skip
    (cm,) = _dashboard_maps(_docs(OP_CHART, *args))
    meta = cm["metadata"]
    assert meta["namespace"] == "monitoring"
    assert "grafana_dashboard" not in meta["labels"] and meta["labels"]["dashboards"] == "diffdisagg"
    assert meta["labels"]["app.kubernetes.io/part-of"] == "serving", "a user label replaces the chart's"
    assert meta["annotations"] == {"grafana_folder": "Diffusion serving"}


def test_grafana_dashboard_refuses_to_render_without_the_synced_file(tmp_path: Path) -> None:
    chart = tmp_path / "diffdisagg"
    shutil.copytree(OP_CHART, chart)
    shutil.rmtree(chart / "dashboards")
    assert _template(chart).returncode == 0, "nothing is asked for while the dashboard is off"
    proc = _template(chart, "--set", "grafanaDashboard.enabled=true", check=False)
    assert proc.returncode != 0 and "run scripts/sync-dashboards.sh" in proc.stderr, proc.stderr


def test_example_ddd_and_keda_example_name_the_same_scaler() -> None:
    ddd = yaml.safe_load((OP_CHART / "examples" / "ddd-cpu.yaml").read_text())
    so = yaml.safe_load((OP_CHART / "examples" / "keda-scaledobject.yaml").read_text())
    assert ddd["spec"]["roles"]["denoise"]["autoscaling"]["enabled"] is True
    ref = so["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"]) == ("diffdisagg.io/v1alpha1", "DiffusionRoleScaler")
    assert ref["name"] == f"{ddd['metadata']['name']}-denoise"
    (trigger,) = so["spec"]["triggers"]
    assert (
        trigger["metricType"] == "AverageValue" and "diffdisagg_queue_depth" in trigger["metadata"]["query"]
    )
    target = ddd["spec"]["roles"]["denoise"]["autoscaling"]["targetQueueDepthPerReplica"]
    assert float(trigger["metadata"]["threshold"]) == target


# --- values.yaml documented key by key ----------------------------------------------------------------------


def _undocumented(lines: list[str]) -> list[str]:
    """Keys with neither a `# --` comment of their own nor a documented ancestor (leaves), in path form."""
    missing: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    comment: list[str] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            comment = []
            continue
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):(.*)$", line)
        if not m:
            comment = []
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = any(c.startswith("# --") for c in comment) or any(d for _, _, d in stack)
        nxt = next((x for x in lines[i + 1 :] if x.strip() and not x.strip().startswith("#")), "")
        is_parent = rest == "" and len(nxt) - len(nxt.lstrip()) > indent
        if not documented and not is_parent:
            missing.append(".".join([k for _, k, _ in stack] + [key]))
        stack.append((indent, key, documented))
        comment = []
    return missing


def test_values_yaml_is_documented_key_by_key() -> None:
    for chart in (OP_CHART, CRD_CHART):
        assert _undocumented((chart / "values.yaml").read_text().splitlines()) == [], chart
    # the checker itself catches a missing comment
    assert _undocumented(["a:", "  # -- doc", "  b: 1", "  c: 2"]) == ["a.c"]


def test_every_value_is_in_the_schema() -> None:
    schema = json.loads((OP_CHART / "values.schema.json").read_text())
    values = yaml.safe_load((OP_CHART / "values.yaml").read_text())

    def walk(v: dict[str, Any], s: dict[str, Any], path: str) -> None:
        props = s.get("properties")
        if props is None or s.get("additionalProperties") is not False:
            return  # open object (a Kubernetes type, e.g. a security context): only known keys are typed
        for k, sub in v.items():
            assert k in props, f"{path}{k} is in values.yaml but not in values.schema.json"
            if isinstance(sub, dict):
                walk(sub, props[k], f"{path}{k}.")

    walk(values, schema, "")
    assert schema["additionalProperties"] is False


# --- the CRD chart is crds/, wrapped -----------------------------------------------------------------------


def test_crd_chart_files_match_crds_folder() -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "sync-crds.sh"), "--check"], capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_crd_chart_renders_crds_folder_plus_keep_annotation() -> None:
    rendered = {d["metadata"]["name"]: d for d in _docs(CRD_CHART)}
    source = {}
    for f in sorted((ROOT / "crds").glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        source[doc["metadata"]["name"]] = doc
    assert rendered.keys() == source.keys() and len(source) == 2
    for name, crd in rendered.items():
        meta = crd["metadata"]
        assert meta["annotations"]["helm.sh/resource-policy"] == "keep"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        stripped = {**crd, "metadata": {k: v for k, v in meta.items() if k not in ("labels", "annotations")}}
        src = source[name]
        src_meta = {k: v for k, v in src["metadata"].items() if k not in ("labels", "annotations")}
        assert stripped == {**src, "metadata": src_meta}, f"{name}: the chart changes more than metadata"


def test_dashboard_chart_copy_matches_docs() -> None:
    chart_copies = sorted(p.name for p in (OP_CHART / "dashboards").glob("*.json"))
    assert chart_copies == sorted(p.name for p in DASHBOARD.parent.glob("*.json")) == [DASHBOARD_KEY]
    assert (OP_CHART / "dashboards" / DASHBOARD_KEY).read_bytes() == DASHBOARD.read_bytes(), (
        "run scripts/sync-dashboards.sh"
    )


SYNCED = ("scripts/sync-crds.sh", "scripts/sync-dashboards.sh", "crds", "charts/diffdisagg-crds",
          "docs/grafana", "charts/diffdisagg/dashboards")  # fmt: skip


def _sync_sandbox(tmp_path: Path) -> None:
    """A copy of every place the sync scripts read or write, so the real checkout is never modified."""
    for rel in SYNCED:
        src, dst = ROOT / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def test_dashboard_sync_check_fails_on_drift_and_sync_repairs_it(tmp_path: Path) -> None:
    _sync_sandbox(tmp_path)
    crds, dash = (["bash", str(tmp_path / "scripts" / s)] for s in ("sync-crds.sh", "sync-dashboards.sh"))

    def run(script: list[str], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*script, *args], capture_output=True, text=True, timeout=30)

    assert run(crds, "--check").returncode == 0 and run(dash, "--check").returncode == 0
    src = tmp_path / "docs" / "grafana" / DASHBOARD_KEY
    doc = json.loads(src.read_text())
    doc["title"] += " (changed)"
    src.write_text(json.dumps(doc, indent=2) + "\n")
    (tmp_path / "charts/diffdisagg/dashboards/old.json").write_text("{}")
    for script in (crds, dash):  # the CRD script's --check covers the dashboards too
        proc = run(script, "--check")
        assert proc.returncode == 1, proc.stderr
        assert DASHBOARD_KEY in proc.stderr and "old.json" in proc.stderr, proc.stderr
    proc = run(crds)
    assert proc.returncode == 0 and f"synced {DASHBOARD_KEY}" in proc.stdout, proc.stdout + proc.stderr
    assert run(dash, "--check").returncode == 0
    copy = tmp_path / "charts/diffdisagg/dashboards" / DASHBOARD_KEY
    assert json.loads(copy.read_text())["title"].endswith("(changed)")
    assert not (tmp_path / "charts/diffdisagg/dashboards/old.json").exists(), "stale copies are removed"

    src.write_text('{"title": "no uid"}\n')  # not importable: refused, the copy kept
    proc = run(dash)
    assert proc.returncode == 1 and "not an importable Grafana dashboard" in proc.stderr, proc.stderr
    assert json.loads(copy.read_text())["title"].endswith("(changed)")
    src.unlink()
    proc = run(dash)
    assert proc.returncode == 1 and "refusing to empty the chart" in proc.stderr and copy.exists()


def test_sync_check_fails_on_drift_and_sync_repairs_it(tmp_path: Path) -> None:
    _sync_sandbox(tmp_path)
    script = ["bash", str(tmp_path / "scripts" / "sync-crds.sh")]
    crd = next((tmp_path / "crds").glob("*.yaml"))
    crd.write_text(crd.read_text().replace("served: true", "served: true  # changed", 1))
    (tmp_path / "crds" / "extra.yaml").write_text((tmp_path / "crds" / crd.name).read_text())
    proc = subprocess.run([*script, "--check"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and crd.name in proc.stderr and "extra.yaml" in proc.stderr, proc.stderr
    assert subprocess.run(script, capture_output=True, text=True, timeout=30).returncode == 0
    assert subprocess.run([*script, "--check"], capture_output=True, text=True, timeout=30).returncode == 0
    assert (tmp_path / "charts/diffdisagg-crds/files/extra.yaml").exists()
    (tmp_path / "crds" / "extra.yaml").unlink()
    subprocess.run(script, check=True, capture_output=True, timeout=30)
    assert not (tmp_path / "charts/diffdisagg-crds/files/extra.yaml").exists(), "stale copies are removed"
    for f in (tmp_path / "crds").glob("*.yaml"):
        f.unlink()
    proc = subprocess.run(script, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "refusing to empty the chart" in proc.stderr
