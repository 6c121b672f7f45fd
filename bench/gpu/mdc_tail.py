"""The latency tail that Poisson arrivals alone impose: p99 / p50 of an ideal M/D/c queue.

c identical servers, deterministic service time 1, Poisson arrivals at utilisation rho, first come
first served; no batching, no hand-overs, no noise. Whatever the serving system, its p99/p50 at that
load and server count cannot be expected below this (bench/RESULTS.md, "Multi-GPU").

    python bench/gpu/mdc_tail.py [--servers 1,2,4,8,16] [--loads 0.5,0.7]
"""

from __future__ import annotations

import argparse
import heapq
import random


def tail(servers: int, rho: float, n: int = 200_000, seed: int = 1) -> tuple[float, float]:
    rng = random.Random(seed)
    free = [0.0] * servers
    t, latency = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rho * servers)
        start = max(t, heapq.heappop(free))
        heapq.heappush(free, start + 1.0)
        latency.append(start + 1.0 - t)
    latency.sort()
    return latency[n // 2 - 1], latency[int(0.99 * n) - 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--servers", default="1,2,4,8,16")
    p.add_argument("--loads", default="0.5,0.7")
    a = p.parse_args()
    print("| servers | load | p50 | p99 | p99/p50 |\n|---|---|---|---|---|")
    for c in (int(x) for x in a.servers.split(",")):
        for rho in (float(x) for x in a.loads.split(",")):
            p50, p99 = tail(c, rho)
            print(f"| {c} | {rho:.1f} | {p50:.2f} | {p99:.2f} | {p99 / p50:.2f} |")


if __name__ == "__main__":
    main()
