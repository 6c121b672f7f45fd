"""Queue depth is the autoscaling signal: with the denoise pool slow (--stage-delay, test-only), a stream of
requests makes denoise's queue depth rise — not prefill's — and it drains to zero afterwards."""

from __future__ import annotations

import sys
import threading
import time

from diffdisagg.worker.launcher import LocalDeployment

S = sys.modules["diffdisagg_e2e_support"]  # loaded by conftest.py


def test_slow_denoise_pool_raises_denoise_queue_depth_not_prefill(flux: LocalDeployment) -> None:
    n = 10
    statuses: list[int] = []
    samples: dict[str, list[float]] = {r: [] for r in ("prefill", "denoise", "decode")}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            m = S.metrics(flux.url)
            for role in samples:
                samples[role].append(m[("diffdisagg_queue_depth", (("deployment", "local"), ("role", role)))])
            time.sleep(0.05)

    def one(i: int) -> None:
        body = {"prompt": f"depth {i}", "seed": i, "num_inference_steps": 2, "timeout": 50}
        statuses.append(S.http_json("POST", flux.url + "/v1/images/generations", body, timeout=70)[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = []
    for i in range(n):  # 4 arrivals/s: prefill keeps up, the slow denoise pool (~1.5/s) does not
        t = threading.Thread(target=one, args=(i,), daemon=True)
        t.start()
        clients.append(t)
        time.sleep(0.25)
    for t in clients:
        t.join(80)
    stop.set()
    sampler.join(5)
    assert statuses == [200] * n, statuses
    peak = {r: max(v) for r, v in samples.items()}
    mean = {r: sum(v) / len(v) for r, v in samples.items()}
    print(f"queue depth peak {peak} mean {mean}")
    assert peak["denoise"] >= 4, peak
    assert peak["prefill"] < peak["denoise"] - 1, peak
    assert mean["denoise"] > 2 * max(mean["prefill"], 0.1), mean
    assert all(S.queue_depth(flux.url, r) == 0 for r in samples)
