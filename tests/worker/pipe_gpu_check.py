"""GPU check of the role adapters and the scheduler loop (not a test: CI has no GPU).

    DIFFDISAGG_PLATFORM=cuda PYTHONPATH=transport/src:worker/src python tests/worker/pipe_gpu_check.py

Per family: the three roles on the GPU equal the monolithic ``pipe(...)`` on the GPU (SHA-256 of the
pixels), in fp32 and bf16; then the scheduler on a denoise worker with the real CUDA transfer stream:
four requests staged into pinned slots and interleaved (loads prefetched while the previous one
computes) give the same bits as the four run one after the other, and every slot is freed.
Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipe_support import PROMPTS, sha256_tensor, tiny_params


def _split_vs_mono(family: str, path: Path, device, dtype) -> dict:
    from diffdisagg.worker.pipelines import StageInput, load_pipeline, load_role, monolithic_call

    pre, den, dec = (load_role(family, r, path, device, dtype) for r in ("prefill", "denoise", "decode"))
    mono = load_pipeline(family, path, device, dtype)
    p = tiny_params(family)
    o1 = pre.run_batch([StageInput("g", {"params": p.to_dict()})])[0]
    o2 = den.run_batch([StageInput("g", o1.scalars, o1.tensors)])[0]
    px = dec.pixels([StageInput("g", o2.scalars, o2.tensors)])
    media = dec.run_batch([StageInput("g", o2.scalars, o2.tensors)])[0] if family != "wan" else None
    ref = monolithic_call(mono, family, p)
    other = monolithic_call(mono, family, tiny_params(family, seed=p.seed + 1))
    return {
        "equal": sha256_tensor(px) == sha256_tensor(ref),
        "max_abs_diff": float((px.float() - ref.float()).abs().max()),
        "other_seed_differs": sha256_tensor(other) != sha256_tensor(ref),
        "devices": sorted({str(t.device) for t in (*o1.tensors.values(), *o2.tensors.values())}),
        "latent_dtype": str(o2.tensors["latents"].dtype),
        "png_bytes": len(media.media) if media else None,
    }


def _scheduler_check(family: str, path: Path, device) -> dict:
    from diffdisagg.transport.buffer import StagingBuffer
    from diffdisagg.transport.codec import total_nbytes
    from diffdisagg.transport.manager import TransferManager
    from diffdisagg.transport.platforms import current_platform
    from diffdisagg.worker.pipelines import StageInput, load_role
    from diffdisagg.worker.scheduler import ReceivedRequest, SchedulerConfig, StageScheduler

    platform = current_platform()
    pre = load_role(family, "prefill", path, device)
    den = load_role(family, "denoise", path, device)
    outs = [
        pre.run_batch(
            [
                StageInput(
                    f"r{i}", {"params": tiny_params(family, seed=30 + i, prompt=PROMPTS[i % 3]).to_dict()}
                )
            ]
        )[0]
        for i in range(4)
    ]
    sequential = {
        o.request_id: den.run_batch([StageInput(o.request_id, o.scalars, o.tensors)])[0] for o in outs
    }
    buffer = StagingBuffer(8 << 20, platform)
    manager = TransferManager(platform, buffer)
    done, trace, cond = {}, [], threading.Condition()

    def on_complete(c):
        with cond:
            done[c.request_id] = c
            cond.notify_all()

    sched = StageScheduler(
        den,
        manager,
        on_complete,
        SchedulerConfig(queue_capacity=8, prefetch=2),
        tracer=lambda w, r: trace.append((w, r, time.perf_counter())),
    )
    for o in outs:
        handle = buffer.allocate(total_nbytes(o.tensors))
        manifest = manager.stage(handle, o.tensors, o.scalars)  # device -> pinned slot
        sched.submit(ReceivedRequest(o.request_id, o.scalars, handle, manifest))
    sched.start()
    deadline = time.monotonic() + 120
    with cond:
        while len(done) < len(outs) and time.monotonic() < deadline:
            cond.wait(1.0)
    sched.stop()
    equal = all(
        done[r].error is None and torch.equal(done[r].output.tensors["latents"], ref.tensors["latents"])
        for r, ref in sequential.items()
    )
    order = [(w, r) for w, r, _ in trace]
    prefetched = all(
        order.index(("load_issued", f"r{i + 1}")) < order.index(("compute_end", f"r{i}")) for i in range(3)
    )
    return {
        "interleaved_equals_sequential": equal,
        "errors": {r: repr(c.error) for r, c in done.items() if c.error},
        "next_load_issued_before_current_compute_ended": prefetched,
        "live_slots_after": buffer.allocator.live_slots,
        "buffer_pinned": buffer.pinned,
        "trace": order,
    }


def main() -> int:
    from diffdisagg.transport.platforms import current_platform
    from diffdisagg.worker.pipelines.loading import quiet_hf_logging
    from diffdisagg.worker.pipelines.tiny import tiny_model_dir

    quiet_hf_logging()
    platform = current_platform()
    device = platform.device(0)
    root = Path(tempfile.mkdtemp(prefix="dd-gpu-"))
    report: dict = {"torch": torch.__version__, "platform": platform.describe(), "families": {}}
    for family in ("flux", "sd3", "wan"):
        path = tiny_model_dir(family, root)
        entry = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            try:
                entry[name] = _split_vs_mono(family, path, device, dtype)
            except Exception as exc:  # report, keep going
                entry[name] = {"error": repr(exc)}
        try:
            entry["scheduler"] = _scheduler_check(family, path, device)
        except Exception as exc:
            entry["scheduler"] = {"error": repr(exc)}
        report["families"][family] = entry
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
