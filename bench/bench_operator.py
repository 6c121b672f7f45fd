"""Reconcile latency of the operator on the real control plane (tests/cluster/plane.py).

Measures, with the operator running as a local kopf process:
  1. sequential: apply one DiffusionDisaggDeployment, time until every child exists (Secret, ConfigMap,
     NetworkPolicy, 4 Services, 4 Deployments, scaler + HPA), and until status Ready (pods Running via
     kwok) — p50/p99 over --count CRs;
  2. burst ("from cold"): --burst CRs created at once, time until all children of all of them exist.
Baseline in the same run: the same children server-side-applied directly by this script (render + apply,
no operator): the operator's overhead is the ratio.

    python bench/bench_operator.py [--count 20] [--burst 100]
Uses the plane `make cluster-up` started if healthy, else starts (and stops) its own.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator" / "src")]

from lightkube import Client  # noqa: E402
from lightkube.generic_resource import create_namespaced_resource  # noqa: E402
from lightkube.resources.apps_v1 import Deployment  # noqa: E402
from lightkube.resources.autoscaling_v2 import HorizontalPodAutoscaler  # noqa: E402
from lightkube.resources.core_v1 import ConfigMap, Namespace, Secret, Service  # noqa: E402
from lightkube.resources.networking_v1 import NetworkPolicy  # noqa: E402
from lightkube.types import PatchType  # noqa: E402

from diffdisagg.operator.api.types import parse_spec  # noqa: E402
from diffdisagg.operator.render import Observed, make_owner, render  # noqa: E402
from tests.cluster.plane import PlaneConfig, PlaneError, down, load, up  # noqa: E402

DDD = create_namespaced_resource(
    "diffdisagg.io", "v1alpha1", "DiffusionDisaggDeployment", "diffusiondisaggdeployments"
)
DRS = create_namespaced_resource("diffdisagg.io", "v1alpha1", "DiffusionRoleScaler", "diffusionrolescalers")
KINDS = {
    "apps/v1/Deployment": Deployment,
    "v1/Service": Service,
    "v1/ConfigMap": ConfigMap,
    "v1/Secret": Secret,
    "networking.k8s.io/v1/NetworkPolicy": NetworkPolicy,
    "autoscaling/v2/HorizontalPodAutoscaler": HorizontalPodAutoscaler,
    "diffdisagg.io/v1alpha1/DiffusionRoleScaler": DRS,
}
TOL = [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]
SPEC: dict[str, Any] = {
    "model": {"family": "flux", "path": "/models/flux"},
    "accelerator": {"vendor": "cpu", "nodeSelector": {"type": "kwok"}, "tolerations": TOL},  # GPUs: 8 a node
    "gateway": {"image": "gw:1", "podTemplate": {"tolerations": TOL}},
    "roles": {
        "prefill": {"image": "w:1"},
        "denoise": {"image": "w:1", "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}},
        "decode": {"image": "w:1"},
    },
}
EXPECTED = {
    "apps/v1/Deployment": 4,
    "v1/Service": 4,
    "v1/ConfigMap": 1,
    "v1/Secret": 1,
    "networking.k8s.io/v1/NetworkPolicy": 1,
    "autoscaling/v2/HorizontalPodAutoscaler": 1,
    "diffdisagg.io/v1alpha1/DiffusionRoleScaler": 1,
}
POLL = 0.02


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def children_present(client: Client, ns: str, names: list[str], expected: dict[str, int]) -> bool:
    sel = {"diffdisagg.io/deployment": names[0]} if len(names) == 1 else None  # many: the whole namespace
    for kind, count in expected.items():
        objs = list(client.list(KINDS[kind], namespace=ns, labels=sel))
        if len(objs) < count * len(names):
            return False
    return True


def ready(client: Client, ns: str, name: str) -> bool:
    st = client.get(DDD, name, namespace=ns).get("status") or {}
    return any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions") or [])


def wait(pred, timeout: float) -> float:
    t0 = time.perf_counter()
    while not pred():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("bench wait timed out")
        time.sleep(POLL)
    return time.perf_counter()


def ddd(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "diffdisagg.io/v1alpha1",
        "kind": "DiffusionDisaggDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }


def baseline(client: Client, ns: str, count: int) -> list[float]:
    """Render + server-side apply the same children directly (no operator, no CR)."""
    out = []
    for i in range(count):
        owner = make_owner(f"raw{i}", ns, "00000000-0000-0000-0000-000000000000", 1, parse_spec(SPEC))
        t0 = time.perf_counter()
        for m in render(owner, Observed(new_token="t")):
            m = copy.deepcopy(m)
            m["metadata"].pop("ownerReferences")  # no owner exists: GC would delete them
            res = KINDS[f"{m['apiVersion']}/{m['kind']}"]
            client.patch(
                res,
                m["metadata"]["name"],
                m,
                namespace=ns,
                patch_type=PatchType.APPLY,
                field_manager="bench",
                force=True,
            )
        wait(lambda i=i: children_present(client, ns, [f"raw{i}"], EXPECTED), 30)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--burst", type=int, default=100)
    a = ap.parse_args()

    owned = None
    try:
        plane = load(PlaneConfig.from_env())
        plane.verify()
    except PlaneError:
        owned = PlaneConfig.from_env(name=f"bench-{os.getpid()}")
        plane = up(owned, owner_pid=os.getpid())
    env = {**os.environ, **plane.env(), "PYTHONPATH": str(ROOT / "operator" / "src")}
    os.environ["KUBECONFIG"] = str(plane.kubeconfig)
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    for crd in ("diffusiondisaggdeployments.diffdisagg.io", "diffusionrolescalers.diffdisagg.io"):
        plane.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")
    client = Client(field_manager="bench")
    ns = f"bench-operator-{os.getpid()}"
    bns = f"{ns}-burst"  # the burst gets a namespace of its own, so that counting children is one list
    for n in (ns, bns):
        client.create(Namespace(metadata={"name": n}))
        wait(lambda n=n: plane.kubectl("get", "sa", "default", "-n", n, check=False).returncode == 0, 30)
    log = open(Path("/tmp") / f"{ns}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffdisagg.operator", "-n", ns, "-n", bns, "--liveness-port", "0"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        time.sleep(3)  # kopf start-up (no liveness port here); the first CR's wait absorbs any remainder
        base = baseline(client, ns, a.count)
        to_children, to_ready = [], []
        for i in range(a.count):
            name = f"seq{i}"
            t0 = time.perf_counter()
            client.create(DDD(ddd(name, SPEC)), namespace=ns)
            t1 = wait(lambda n=name: children_present(client, ns, [n], EXPECTED), 60)
            t2 = wait(lambda n=name: ready(client, ns, n), 60)
            to_children.append(t1 - t0)
            to_ready.append(t2 - t0)

        burst_spec = copy.deepcopy(SPEC)
        burst_spec["gateway"]["replicas"] = 0  # no pods: 100 deployments' pods would not fit kwok's nodes
        for r in burst_spec["roles"].values():
            r["replicas"] = 0
            r.pop("autoscaling", None)
        burst_expected = {k: v for k, v in EXPECTED.items() if "Scaler" not in k and "Horizontal" not in k}
        names = [f"burst{i}" for i in range(a.burst)]
        t0 = time.perf_counter()
        for name in names:
            b = ddd(name, burst_spec)
            b["metadata"]["labels"] = {"bench": "burst"}
            client.create(DDD(b), namespace=bns)
        t_created = time.perf_counter() - t0
        t_all = wait(lambda: children_present(client, bns, names, burst_expected), 600) - t0
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        for n in (ns, bns):
            plane.kubectl("delete", "namespace", n, "--wait=false", check=False)
        if owned is not None:
            down(owned)

    def row(label: str, xs: list[float], ref: list[float] | None = None) -> str:
        ratio = f"{statistics.median(xs) / statistics.median(ref):6.1f}x" if ref else "      -"
        return f"{label:<44} {statistics.median(xs) * 1000:8.0f} {pct(xs, 99) * 1000:8.0f} {ratio}"

    print(f"operator reconcile latency, {a.count} CRs one at a time (ms; ratio = p50 / baseline p50)")
    print(f"{'what':<44} {'p50':>8} {'p99':>8} {'ratio':>7}")
    print(row("baseline: render + SSA 13 children directly", base))
    print(row("CR create -> all 13 children present", to_children, base))
    print(row("CR create -> status Ready (pods Running)", to_ready, base))
    print(
        f"burst: {a.burst} CRs created in {t_created:.1f}s; all {a.burst * 11} children present after "
        f"{t_all:.1f}s ({a.burst / t_all:.1f} CR/s)"
    )
    # Raw numbers for bench/plots.py (seconds).
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    raw = {
        "bench": "operator",
        "count": a.count,
        "baseline_s": base,
        "to_children_s": to_children,
        "to_ready_s": to_ready,
        "burst": {"crs": a.burst, "created_s": t_created, "all_children_s": t_all},
    }
    (out / "operator.json").write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
