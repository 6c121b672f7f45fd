"""Serving benchmark (CPU, tiny models): disaggregated serving vs the monolithic pipeline, same run.

Baseline: the monolithic diffusers call of the same tiny model in this process (`monolithic_call` +
PNG encoding, one torch thread like each worker), measured between the disaggregated runs so that
machine noise hits both. Disaggregated: a local deployment (gateway + prefill/denoise/decode workers
as processes, tcp hand-over on loopback) driven over HTTP.

Prints: sequential latency (p50/p99) of both and their ratio; the per-stage breakdown and per-hop
milliseconds of the disaggregated path (from the gateway's per-request timings); and, under Poisson
arrivals at several rates, throughput and p50/p99 latency, with the monolithic capacity (1 / its p50
latency, one request at a time) as the reference throughput.

    python bench/bench_serving.py [--family flux] [--rates 4,8,16] [--requests 24] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("worker/src", "transport/src"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))
os.environ.setdefault("DIFFDISAGG_PLATFORM", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def post(url: str, body: dict, timeout: float = 120.0) -> tuple[int, dict, float]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), time.perf_counter() - t0


class Monolithic:
    def __init__(self, family: str, path: str) -> None:
        import torch

        from diffdisagg.worker.pipelines import (
            GenerationParams,
            load_pipeline,
            monolithic_call,
            validate_params,
        )
        from diffdisagg.worker.pipelines.loading import quiet_hf_logging
        from diffdisagg.worker.pipelines.media import encode_png

        quiet_hf_logging()
        torch.set_num_threads(1)  # like each worker (the launcher gives each one thread)
        self.torch = torch
        self.family = family
        self.pipe = load_pipeline(family, path, "cpu", torch.float32)
        self._call = monolithic_call
        self._png = encode_png
        self._params = lambda seed, steps, w, h: validate_params(
            family,
            GenerationParams(
                prompt="a red fox in the snow", seed=seed, num_inference_steps=steps, width=w, height=h
            ),
        )

    def run(self, seed: int, steps: int, w: int, h: int) -> float:
        t0 = time.perf_counter()
        pixels = self._call(self.pipe, self.family, self._params(seed, steps, w, h))
        png = self._png(pixels[0])
        assert png[:4] == b"\x89PNG"
        return time.perf_counter() - t0


def poisson(url: str, rate: float, n: int, body: dict, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    lat: list[float] = []
    errors = 0
    done_at: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal errors
        status, _, took = post(url + "/v1/images/generations", {**body, "seed": 1000 + i})
        with lock:
            if status == 200:
                lat.append(took)
            else:
                errors += 1
            done_at.append(time.perf_counter())

    threads = []
    start = time.perf_counter()
    t = start
    for i in range(n):
        t += rng.expovariate(rate)
        time.sleep(max(0.0, t - time.perf_counter()))
        th = threading.Thread(target=one, args=(i,), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(300)
    span = max(done_at) - start
    return {
        "rate": rate,
        "n": n,
        "ok": len(lat),
        "errors": errors,
        "throughput": len(lat) / span,
        "latencies_s": lat,
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
    }


def poisson_monolithic(mono: Monolithic, rate: float, n: int, steps: int, w: int, h: int, seed: int) -> dict:
    """The monolithic server under the same arrivals as `poisson`: one pipeline, FIFO, one request at a
    time (real calls); a request's latency is its completion minus its arrival, queueing included."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
    start = time.perf_counter()
    lat = []
    for i, at in enumerate(arrivals):
        time.sleep(max(0.0, start + at - time.perf_counter()))
        mono.run(1000 + i, steps, w, h)
        lat.append(time.perf_counter() - (start + at))
    span = time.perf_counter() - start
    return {
        "rate": rate,
        "n": n,
        "ok": n,
        "errors": 0,
        "throughput": n / span,
        "latencies_s": lat,
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
    }


def _write_json(a: argparse.Namespace, **raw: object) -> None:
    """Raw numbers for bench/plots.py: bench/out/serving.json (seconds; timings in ms as answered)."""
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "bench": "serving",
        "family": a.family,
        "size": a.size,
        "steps": a.steps,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
    }
    (out / "serving.json").write_text(json.dumps({**meta, **raw}, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="flux", choices=("flux", "sd3"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", default="64x64")
    p.add_argument("--sequential", type=int, default=12)
    p.add_argument("--rates", default="4,8,16")
    p.add_argument("--requests", type=int, default=24)
    a = p.parse_args(argv)
    w, h = (int(x) for x in a.size.split("x"))

    from diffdisagg.worker.launcher import LocalDeployment, build_tiny

    path = build_tiny(a.family)
    dep = LocalDeployment(
        family=a.family,
        heartbeat_interval_s=0.5,
        request_timeout_s=120.0,
        capacity=4,
        max_batch_size=4,
        tiny_defaults=False,
    )
    dep.start()
    try:
        mono = Monolithic(a.family, path)
        for s in range(2):
            mono.run(s, a.steps, w, h)  # warm-up
        dep.wait_ready(600)
        body = {"prompt": "a red fox in the snow", "num_inference_steps": a.steps, "size": a.size}
        url = dep.url
        for s in range(3):
            post(url + "/v1/images/generations", {**body, "seed": s})  # warm-up (connections, caches)

        # sequential, interleaved: one monolithic call, one disaggregated request, ...
        mono_lat, dis_lat, timings, segments = [], [], [], []
        for i in range(a.sequential):
            mono_lat.append(mono.run(i, a.steps, w, h))
            status, resp, took = post(url + "/v1/images/generations", {**body, "seed": i})
            assert status == 200, resp
            dis_lat.append(took)
            timings.append(resp["diffdisagg"]["timings_ms"][0])
            segments.append(resp["diffdisagg"].get("timings", [None])[0])
        # the same arrivals against the monolithic pipeline (for the latency-vs-load plot)
        mono_loads = [
            poisson_monolithic(mono, float(r), a.requests, a.steps, w, h, seed=7) for r in a.rates.split(",")
        ]
        del mono
        import gc

        gc.collect()
        loads = [poisson(url, float(r), a.requests, body, seed=7) for r in a.rates.split(",")]
    finally:
        dep.stop()

    m50, m99 = pct(mono_lat, 50) * 1e3, pct(mono_lat, 99) * 1e3
    d50, d99 = pct(dis_lat, 50) * 1e3, pct(dis_lat, 99) * 1e3
    print(
        f"\nServing bench: {a.family} tiny, {a.size}, {a.steps} steps, CPU ({os.cpu_count()} cores), "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("\nsequential latency (one request at a time)")
    print(f"{'path':<28}{'p50 ms':>10}{'p99 ms':>10}{'ratio p50':>11}")
    print(f"{'monolithic (baseline)':<28}{m50:>10.1f}{m99:>10.1f}{1.0:>11.2f}")
    print(f"{'disaggregated (HTTP e2e)':<28}{d50:>10.1f}{d99:>10.1f}{d50 / m50:>11.2f}")
    _write_json(
        a,
        sequential={
            "monolithic_s": mono_lat,
            "disaggregated_s": dis_lat,
            "timings_ms": timings,
            "timings": segments,
        },
        poisson={"disaggregated": loads, "monolithic": mono_loads},
    )
    keys = [
        "prefill_ms",
        "denoise_ms",
        "decode_ms",
        "hop_prefill_denoise_ms",
        "transfer_prefill_denoise_ms",
        "hop_denoise_decode_ms",
        "transfer_denoise_decode_ms",
        "queue_prefill_ms",
        "total_ms",
    ]
    print("\ndisaggregated breakdown (median over the sequential requests)")
    for k in keys:
        vals = [t[k] for t in timings if k in t]
        print(f"  {k:<30}{statistics.median(vals):>9.1f} ms")
    print(
        "  (hop = stage done -> next stage started: next-hop ask + hand-over + receiver queue;"
        " transfer = sender's offer -> ack)"
    )
    cap = 1.0 / (m50 / 1e3)
    print(
        f"\nPoisson arrivals, {a.requests} requests per rate; reference: monolithic capacity {cap:.2f} req/s "
        "(one at a time)"
    )
    print(f"{'rate/s':>7}{'ok':>5}{'err':>5}{'thru req/s':>12}{'vs mono':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for r in loads:
        print(
            f"{r['rate']:>7.1f}{r['ok']:>5}{r['errors']:>5}{r['throughput']:>12.2f}"
            f"{r['throughput'] / cap:>9.2f}{r['p50'] * 1e3:>9.1f}{r['p99'] * 1e3:>9.1f}"
        )
    print("\nmonolithic pipeline under the same arrivals (one at a time, FIFO; latency includes its queue)")
    print(f"{'rate/s':>7}{'thru req/s':>12}{'p50 ms':>9}{'p99 ms':>9}")
    for r in mono_loads:
        print(f"{r['rate']:>7.1f}{r['throughput']:>12.2f}{r['p50'] * 1e3:>9.1f}{r['p99'] * 1e3:>9.1f}")
    return 0


if __name__ == "__main__":
    main()  # bench/run.py runs this file in-process: no sys.exit
