"""Fixed host cost of one staging round trip on the CPU platform: allocate a slot, `TransferManager.stage`
a small prompt-embedding-sized payload (128 KiB) with request scalars, `load` it back, release.

The payload is small on purpose: the copies take a few microseconds, so what is measured is the Python
around them (planning, manifest checks, slot views) — the part that made the 4 MiB staging legs run at
0.53-0.56 of the pinned copy on the GPU (bench/RESULTS.md, GPU). Median of 7 rounds of 2000 calls.

    python bench/stage_call_overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch

from diffdisagg.transport.buffer import StagingBuffer
from diffdisagg.transport.codec import plan
from diffdisagg.transport.manager import TransferManager
from diffdisagg.transport.platforms import current_platform


def main() -> None:
    torch.set_num_threads(1)
    plat = current_platform()
    buf = StagingBuffer(64 << 20, plat)
    mgr = TransferManager(plat, buf)
    tensors = {"prompt_embeds": torch.randn(1, 512, 64), "pooled": torch.randn(1, 64)}
    scalars = {"params": {"prompt": "x" * 50, "seed": 1, "height": 1024, "width": 1024, "steps": 28}}
    nbytes = plan(tensors, scalars).total_nbytes
    stage_us, round_us = [], []
    for _ in range(7):
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            h = buf.allocate(nbytes)
            mgr.stage(h, tensors, scalars)
            mgr.release(h)
        stage_us.append((time.perf_counter() - t0) / n * 1e6)
        t0 = time.perf_counter()
        for _ in range(n):
            h = buf.allocate(nbytes)
            manifest = mgr.stage(h, tensors, scalars)
            mgr.load(h, manifest, torch.device("cpu"))
            mgr.release(h)
        round_us.append((time.perf_counter() - t0) / n * 1e6)
    # Baseline, same run: the bare copies a round trip makes (each tensor into the region and back out
    # into a fresh tensor), with no slot, manifest or checks.
    region = buf.region()
    flat = {k: v.reshape(-1).view(torch.uint8) for k, v in tensors.items()}
    raw_us = []
    for _ in range(7):
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            off = 0
            for v in flat.values():
                region[off : off + v.numel()].copy_(v)
                torch.empty_like(v).copy_(region[off : off + v.numel()])
                off += v.numel()
        raw_us.append((time.perf_counter() - t0) / n * 1e6)
    raw, rnd = statistics.median(raw_us), statistics.median(round_us)
    print(
        f"{nbytes} B: allocate+stage+release {statistics.median(stage_us):.1f} us, "
        f"allocate+stage+load+release {rnd:.1f} us; bare copies {raw:.1f} us "
        f"(the round trip is {rnd / raw:.1f}x the copies; {rnd - raw:.1f} us of host overhead; "
        "medians of 7 x 2000)"
    )


if __name__ == "__main__":
    main()
