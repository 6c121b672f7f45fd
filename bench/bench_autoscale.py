"""Autoscaling reaction: from a denoise backlog building up to the HPA raising the denoise scaler.

The whole loop of tests/cluster/test_autoscale.py (real requests → gateway queue depth → Prometheus →
prometheus-adapter → the real HPA controller → DiffusionRoleScaler → operator → Deployment → kwok pods
Ready), on a control plane of its own started with the HPA sync period under test (default 15 s, the
kube-controller-manager default). Each run sends a paced burst of real requests to the deliberately slow
denoise pool (1.5 s per request), and measures from the backlog build-up — the first gateway sample where
the denoise queue exceeds what one replica should hold (target + 1) — to:
  prom:    Prometheus returns that value (1 s scrape),
  scaler:  the HPA's write of the scaler's spec.replicas is seen by a watch,
  ready:   the operator's Deployment has that many Ready (kwok) pods.
Between runs the burst drains and the pool returns to 1 replica (5 s stabilization window). That return
happens at an HPA tick, so a burst sent right after it would always meet the HPA at the same phase (a first
version of this script measured 13.4 s four times in a row that way); each burst therefore starts after a
random pause in [0, sync period), as independent arrivals would (seeded: --seed).

A control-plane latency has no in-run baseline: it prints p50 / p90 / max over the runs. The HPA acts
only at its sync ticks, so the scaler delay is about uniform in [scrape path, sync period + scrape path].

    python bench/bench_autoscale.py [--sync 15s] [--runs 8] [--seed 1]    (as root: it makes a netns)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "worker" / "src", ROOT / "transport" / "src", ROOT / "operator" / "src"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
# the operator and the workers are child processes: they need the same import paths
_paths = [str(ROOT / d / "src") for d in ("worker", "transport", "operator")] + [str(ROOT)]
os.environ["PYTHONPATH"] = os.pathsep.join(
    dict.fromkeys(_paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
)

from tests.cluster.metrics_stack import (  # noqa: E402 - after the path set-up above
    QUEUE_DEPTH,
    AutoscaleLoop,
    DepthSampler,
    LoopSettings,
    RequestBurst,
)
from tests.cluster.plane import PlaneConfig, PlaneError, build, down, up  # noqa: E402
from tests.cluster.waiting import wait_for  # noqa: E402

ARRIVAL_GAP_S = 0.25


def seconds(duration: str) -> float:
    if duration.endswith("ms"):
        return float(duration[:-2]) / 1000
    if duration.endswith("s"):
        return float(duration[:-1])
    if duration.endswith("m"):
        return float(duration[:-1]) * 60
    raise ValueError(f"use a duration like 15s, 500ms or 1m: {duration!r}")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class PromSampler:
    """Polls Prometheus for the denoise queue depth; the first instant it reached `threshold`."""

    def __init__(self, loop: AutoscaleLoop, threshold: float) -> None:
        self.expr = f'{QUEUE_DEPTH}{{deployment="{loop.settings.name}",role="denoise"}}'
        self.loop, self.threshold = loop, threshold
        self.seen: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.seen is None:
            with contextlib.suppress(Exception):
                value = self.loop.prometheus.value(self.expr)
                if value is not None and value >= self.threshold:
                    self.seen = time.monotonic()
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def one_run(loop: AutoscaleLoop, sync_s: float, index: int, pause_s: float) -> dict[str, float]:
    s, watch = loop.settings, loop.watch
    time.sleep(pause_s)  # de-phases the burst from the HPA's ticks (see the module docstring)
    denoise = loop.scaler("denoise")
    threshold = s.target_per_replica + 1
    n = max(10, math.ceil((sync_s + 10) / s.denoise_delay_s))  # the backlog outlasts one sync period
    sampler = DepthSampler(loop.local.url, s.name).start()
    prom = PromSampler(loop, threshold)
    burst = RequestBurst(loop.local.url, n, ARRIVAL_GAP_S, timeout_s=n * 3 + 60)
    try:
        t_scaler, replicas = watch.wait(denoise, lambda r: r > 1, 2 * sync_s + 30, "the scaler to rise")
        t_backlog = sampler.first_at_or_above("denoise", threshold, since=burst.started)
        if t_backlog is None or t_backlog > t_scaler:
            raise RuntimeError(
                f"run {index}: scaler moved before a backlog was seen ({sampler.samples[-3:]})"
            )

        def ready() -> bool:
            dep = loop.plane.kubectl_json("get", "deployment", denoise, "-n", loop.namespace)
            return dep.get("status", {}).get("readyReplicas") == replicas

        wait_for(ready, 30, 0.1, "the denoise pods Ready")
        t_ready = time.monotonic()
        statuses = burst.join()
        if statuses != [200] * n:
            raise RuntimeError(f"run {index}: request statuses {statuses}")
    finally:
        prom.stop()
        sampler.stop()
    # back to the floor before the next run (drain + stabilization window + a sync tick)
    watch.wait(denoise, lambda r: r == 1, s.scale_down_window_s + 3 * sync_s + 60, "the scaler back at 1")
    return {
        "prom": (prom.seen - t_backlog) if prom.seen else float("nan"),
        "scaler": t_scaler - t_backlog,
        "ready": t_ready - t_backlog,
        "replicas": float(replicas),
        "requests": float(n),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sync", default="15s", help="kube-controller-manager --horizontal-pod-autoscaler-sync-period"
    )
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    sync_s = seconds(a.sync)
    rng = random.Random(a.seed)
    if os.geteuid() != 0:
        print("bench autoscale: needs root (the control plane runs in a network namespace); not run")
        return 0
    config = PlaneConfig.from_env(name=f"bench-as-{os.getpid() % 10000}", hpa_sync_period=a.sync)
    try:
        build(config)
    except PlaneError as exc:
        print(f"bench autoscale: no control plane ({exc}); not run")
        return 0
    t0 = time.monotonic()
    plane = up(config, owner_pid=os.getpid())
    results: list[dict[str, float]] = []
    try:
        ns = "bench-autoscale"
        plane.kubectl("create", "namespace", ns)
        wait_for(
            lambda: plane.kubectl("get", "serviceaccount", "default", "-n", ns, check=False).returncode == 0,
            30,
            message="default ServiceAccount",
        )
        settings = LoopSettings(name="flux-bench", scale_down_window_s=5)
        with tempfile.TemporaryDirectory(prefix="diffdisagg-bench-as-") as tmp:
            loop = AutoscaleLoop(plane, ns, Path(tmp), settings).start()
            try:
                for role in ("prefill", "denoise"):
                    wait_for(
                        lambda role=role: loop.hpa_active(role), 3 * sync_s + 60, 0.5, f"HPA {role} active"
                    )
                print(
                    f"set-up {time.monotonic() - t0:.0f} s ({loop.timings}); HPA sync {a.sync}; {a.runs} runs"
                )
                print(
                    f"{'run':>4} {'requests':>8} {'prom s':>7} {'scaler s':>8} {'ready s':>8} {'replicas':>8}"
                )
                for i in range(a.runs):
                    r = one_run(loop, sync_s, i, pause_s=rng.uniform(0, sync_s))
                    results.append(r)
                    print(
                        f"{i:>4} {r['requests']:>8.0f} {r['prom']:>7.1f} {r['scaler']:>8.1f} "
                        f"{r['ready']:>8.1f} {r['replicas']:>8.0f}",
                        flush=True,
                    )
            finally:
                loop.close()
    finally:
        down(config)
    scaler = [r["scaler"] for r in results]
    ready = [r["ready"] for r in results]
    prom = [r["prom"] for r in results if not math.isnan(r["prom"])]
    print(
        f"\nbacklog → Prometheus   p50 {statistics.median(prom):.1f} s  max {max(prom):.1f} s\n"
        f"backlog → scaler       p50 {statistics.median(scaler):.1f} s  p90 {pct(scaler, 0.9):.1f} s  "
        f"max {max(scaler):.1f} s   (goal ≤ 30 s at 15 s sync)\n"
        f"backlog → pods Ready   p50 {statistics.median(ready):.1f} s  max {max(ready):.1f} s\n"
        f"HPA sync {a.sync}, {len(results)} runs, total {time.monotonic() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    # bench/run.py runs every script in one process: exit only on failure, so the next benchmark still runs
    if rc := main(sys.argv[1:]):
        sys.exit(rc)
