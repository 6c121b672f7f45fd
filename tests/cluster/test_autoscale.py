"""The autoscaling loop end to end on the real control plane.

real requests → the local gateway's `diffdisagg_queue_depth{deployment,role}` → Prometheus (Debian's binary,
1 s scrape) → prometheus-adapter (built from Go modules) on the external metrics API, an APIService served
from the plane's network namespace → the real HPA controller in kube-controller-manager → the
DiffusionRoleScaler's /scale → the operator (a real kopf process) → the role's Deployment → kube-scheduler →
kwok marks the pods Ready.

What is simulated, exactly: the pods the operator creates run nothing (kwok only marks them Running/Ready).
The requests are served by local processes started by the serving launcher — one gateway and one worker per
role, with a 1.5 s `--stage-delay` per denoise batch (batch size 1) so that the denoise pool is the slow one.
Those local processes stand in for the deployment's pods: they run with `--deployment <the DDD's name>`, so
the gateway's queue-depth series carry `deployment=<name>` (and Prometheus attaches `namespace=<test
namespace>`, as a Kubernetes scrape would), which is what the operator's HPAs select on. The pods the HPA
adds do not take work off the local denoise worker, so the backlog drains at one worker's pace: the test
checks the control loop, not the extra capacity.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.metrics_stack import (
    QUEUE_DEPTH,
    AutoscaleLoop,
    DepthSampler,
    LoopSettings,
    RequestBurst,
)
from tests.cluster.plane import Plane
from tests.cluster.waiting import WaitTimeout, wait_for

SETTINGS = LoopSettings()
ARRIVAL_GAP_S = 0.25  # arrivals spread out: prefill (fast) keeps up, denoise (slow) does not
HPA_WRITER = "system:serviceaccount:kube-system:horizontal-pod-autoscaler"


def seconds(duration: str) -> float:
    """A Go duration as the plane reports its HPA sync period ('5s', '1m30s', '500ms') in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total, num, i = 0.0, "", 0
    while i < len(duration):
        if duration[i].isdigit() or duration[i] == ".":
            num += duration[i]
            i += 1
            continue
        unit = "ms" if duration.startswith("ms", i) else duration[i]
        total += float(num) * units[unit]
        num, i = "", i + len(unit)
    return total


def get(plane: Plane, ns: str, kind: str, name: str) -> dict[str, Any]:
    return plane.kubectl_json("get", kind, name, "-n", ns)


def is_ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", [])
    )


def scale_writes(audit_log: Path, ns: str, name: str) -> list[dict[str, Any]]:
    """Audit events of successful writes to a scaler's /scale subresource."""
    out = []
    for line in audit_log.read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        ref = ev.get("objectRef") or {}
        if (
            ref.get("resource") == "diffusionrolescalers"
            and ref.get("subresource") == "scale"
            and ref.get("namespace") == ns
            and ref.get("name") == name
            and ev.get("verb") in ("update", "patch")
            and (ev.get("responseStatus") or {}).get("code", 0) < 300
        ):
            out.append(ev)
    return out


@pytest.fixture
def loop(plane: Plane, namespace: str, tmp_path: Path) -> Iterator[AutoscaleLoop]:
    lp = AutoscaleLoop(plane, namespace, tmp_path, SETTINGS).start()
    try:
        yield lp
    finally:
        lp.close()
    tracebacks = [ln for ln in lp.operator.log().splitlines() if "Traceback" in ln]
    assert not tracebacks, f"operator logged tracebacks:\n{lp.operator.log()[-3000:]}"


def test_denoise_backlog_scales_denoise_pool_and_back(
    plane: Plane, namespace: str, loop: AutoscaleLoop
) -> None:
    ns, s, watch = namespace, SETTINGS, loop.watch
    denoise, prefill = loop.scaler("denoise"), loop.scaler("prefill")
    sync_s = seconds(plane.hpa_sync_period)
    # Enough requests that the denoise backlog outlasts two HPA syncs plus the scrape path.
    n_requests = max(10, math.ceil((2 * sync_s + 8) / s.denoise_delay_s))

    # --- wired: the external metric answers through the aggregator, and both HPAs read it (value 0)
    selector = {"deployment": s.name, "role": "denoise"}
    items = wait_for(lambda: loop.adapter.external_metric(ns, QUEUE_DEPTH, selector), 30, 0.5, "the metric")
    assert items[0]["metricLabels"] == selector and float(items[0]["value"]) == 0, items
    # the namespace label fences it: the same selector from another namespace finds nothing
    assert loop.adapter.external_metric("default", QUEUE_DEPTH, selector) == []
    for role in ("prefill", "denoise"):
        # generous: the HPA controller learns a freshly installed CRD's /scale at its next discovery refresh
        wait_for(lambda role=role: loop.hpa_active(role), 3 * sync_s + 40, 0.5, f"HPA of {role} active")
    for scaler in (denoise, prefill):
        watch.wait(scaler, lambda r: r == 1, 10, f"{scaler} at its floor")
    assert get(plane, ns, "deployment", denoise)["spec"]["replicas"] == 1

    # --- load: paced real requests; the slow denoise pool builds a backlog, prefill keeps up
    sampler = DepthSampler(loop.local.url, s.name).start()
    burst = RequestBurst(loop.local.url, n_requests, ARRIVAL_GAP_S, timeout_s=n_requests * 3 + 60)
    t_up, scaled_to = watch.wait(
        denoise, lambda r: r > 1, 2 * sync_s + 20, "the HPA to raise the denoise scaler"
    )
    # backlog "built up" = the first moment the queue exceeded what one replica is meant to hold
    t_backlog = sampler.first_at_or_above("denoise", s.target_per_replica + 1, since=burst.started)
    assert t_backlog is not None and t_backlog < t_up, (t_backlog, t_up, sampler.samples[-3:])

    # the operator follows the scaler, kube-scheduler binds the pods to the fake nodes, kwok makes them Ready
    def denoise_ready() -> int | None:
        want = watch.current(denoise) or 0
        dep = get(plane, ns, "deployment", denoise)
        ok = (
            want > 1
            and dep["spec"]["replicas"] == want
            and dep.get("status", {}).get("readyReplicas") == want
        )
        return want if ok else None

    ready_n = wait_for(denoise_ready, 30, 0.2, "the denoise Deployment to follow the scaler with Ready pods")
    t_pods = time.monotonic()
    pods = plane.kubectl_json(
        "get", "pods", "-n", ns, "-l", f"diffdisagg.io/deployment={s.name},diffdisagg.io/role=denoise"
    )["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert sum(is_ready(p) for p in live) >= ready_n and all(p["spec"].get("nodeName") for p in live)

    # who wrote the new size: the HPA controller's own identity, through /scale
    writes = scale_writes(plane.audit_log, ns, denoise)
    assert writes and {w["user"]["username"] for w in writes} == {HPA_WRITER}, writes[:2]

    assert burst.join() == [200] * n_requests

    # --- prefill kept up: its queue never exceeded one replica's target, and its scaler never moved
    peak = {
        role: loop.prometheus.value(
            f'max_over_time({QUEUE_DEPTH}{{deployment="{s.name}",role="{role}"}}[5m])'
        )
        for role in ("prefill", "denoise")
    }
    assert peak["denoise"] is not None and peak["denoise"] >= s.target_per_replica + 1, peak
    assert peak["prefill"] is not None and peak["prefill"] <= s.target_per_replica, peak
    assert [r for _, r in watch.timeline(prefill)] == [1]
    assert scale_writes(plane.audit_log, ns, prefill) == []
    assert get(plane, ns, "deployment", prefill)["spec"]["replicas"] == 1

    # --- load over: the queue drains; the pool shrinks to the floor, never inside the stabilization window
    wait_for(lambda: loop.depths().get("denoise") == 0, 30, 0.2, "the denoise queue to drain")
    t_drained = time.monotonic()
    t_down, _ = watch.wait(
        denoise, lambda r: r == 1, s.scale_down_window_s + 3 * sync_s + 20, "the denoise scaler back at 1"
    )
    wait_for(
        lambda: get(plane, ns, "deployment", denoise)["spec"]["replicas"] == 1, 20, 0.2, "Deployment at 1"
    )
    sampler.stop()
    line = watch.timeline(denoise)
    last_up = max(t for (t, r), (_, prev) in zip(line[1:], line, strict=False) if r > prev)
    first_down = min(t for (t, r), (_, prev) in zip(line[1:], line, strict=False) if r < prev and t > last_up)
    # 0.5 s of slack: the watch sees each write a few milliseconds after the HPA controller decided it
    assert first_down - last_up >= s.scale_down_window_s - 0.5, line

    print(
        f"\nautoscale loop, HPA sync {plane.hpa_sync_period}, {n_requests} requests: gateway queue peaks "
        f"denoise {sampler.peak('denoise'):.0f} / prefill {sampler.peak('prefill'):.0f}; "
        f"backlog → scaler {t_up - t_backlog:.1f} s (to {scaled_to}); scaler → {ready_n} pods Ready "
        f"{t_pods - t_up:.1f} s; denoise scaler timeline {[(round(t - line[0][0], 1), r) for t, r in line]}; "
        f"drained → at 1 {t_down - t_drained:.1f} s; set-up {loop.timings}"
    )


@pytest.fixture
def bare_loop(plane: Plane, namespace: str, tmp_path: Path) -> Iterator[AutoscaleLoop]:
    """The loop with a QueueDepthExporter in place of the gateway: no workers, the test sets the queue."""
    lp = AutoscaleLoop(plane, namespace, tmp_path, LoopSettings(name="flux-hold"), workers=False).start()
    try:
        yield lp
    finally:
        lp.close()


def test_lost_metric_holds_the_pool_until_it_returns(
    plane: Plane, namespace: str, bare_loop: AutoscaleLoop
) -> None:
    """Prometheus loses the gateway: the pool keeps its size (a broken metrics path is not an empty queue)."""
    lp, s, watch = bare_loop, bare_loop.settings, bare_loop.watch
    denoise, prefill = lp.scaler("denoise"), lp.scaler("prefill")
    sync_s = seconds(plane.hpa_sync_period)
    wait_for(lambda: lp.hpa_active("denoise"), 3 * sync_s + 40, 0.5, "HPA of denoise active")

    lp.exporter.set("denoise", 3 * s.target_per_replica)  # → ceil(6 / 2) = 3 replicas
    watch.wait(denoise, lambda r: r == 3, 2 * sync_s + 20, "the HPA to size denoise for a queue of 6")

    # the gateway disappears: the scrape fails, Prometheus marks its series stale, the adapter finds no value
    lp.exporter.failing = True
    wait_for(
        lambda: lp.hpa_condition("denoise", "ScalingActive") == ("False", "FailedGetExternalMetric"),
        2 * sync_s + 20,
        0.5,
        "the HPA to report that it cannot read the metric",
    )
    # ... and the HPA holds the pool instead of reading the silence as an empty queue: no change for longer
    # than the scale-down window plus a sync period
    with pytest.raises(WaitTimeout):
        watch.wait(denoise, lambda r: r != 3, s.scale_down_window_s + sync_s + 2, "a change while blind")

    # the gateway is back with an empty queue: the pool returns to its floor
    lp.exporter.set("denoise", 0)
    lp.exporter.failing = False
    watch.wait(denoise, lambda r: r == 1, s.scale_down_window_s + 3 * sync_s + 20, "denoise back at 1")
    wait_for(lambda: lp.hpa_active("denoise"), 2 * sync_s + 20, 0.5, "the HPA reading the metric again")
    assert [r for _, r in watch.timeline(prefill)] == [1]
