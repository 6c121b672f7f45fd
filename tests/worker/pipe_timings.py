"""Per-stage CPU times of the tiny configs and the tensors that cross each boundary (for docs/pipelines.md).

    PYTHONPATH=transport/src:worker/src python tests/worker/pipe_timings.py [--reps 5] [--threads 1]

Not a test: prints two markdown tables. Times are the minimum over ``--reps`` runs after one warm-up,
as process CPU time (what the stage costs) and wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipe_support import tiny_params


def _measure(fn, reps: int):
    fn()  # warm-up
    best_cpu = best_wall = float("inf")
    out = None
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    return out, best_cpu * 1e3, best_wall * 1e3


def _describe(tensors: dict) -> str:
    return "<br>".join(
        f"`{k}` {list(v.shape)} {str(v.dtype).removeprefix('torch.')} ({v.nbytes / 1024:.1f} KiB)"
        for k, v in tensors.items()
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffdisagg.worker.pipelines import StageInput, load_pipeline, load_role, monolithic_call
    from diffdisagg.worker.pipelines.loading import quiet_hf_logging
    from diffdisagg.worker.pipelines.tiny import tiny_model_dir

    quiet_hf_logging()
    root = Path(tempfile.mkdtemp(prefix="dd-timings-"))
    times, crossing = [], []
    for family in ("flux", "sd3", "wan"):
        path = tiny_model_dir(family, root)
        pre, den, dec = (load_role(family, r, path) for r in ("prefill", "denoise", "decode"))
        mono = load_pipeline(family, path)
        p = tiny_params(family)
        item = StageInput("t", {"params": p.to_dict()})
        o1, pre_c, pre_w = _measure(lambda: pre.run_batch([item])[0], args.reps)  # noqa: B023
        d_in = StageInput("t", o1.scalars, o1.tensors)
        o2, den_c, den_w = _measure(lambda: den.run_batch([d_in])[0], args.reps)  # noqa: B023
        c_in = StageInput("t", o2.scalars, o2.tensors)
        px, dec_c, dec_w = _measure(lambda: dec.pixels([c_in]), args.reps)  # noqa: B023
        o3, enc_c, enc_w = _measure(lambda: dec.run_batch([c_in])[0], args.reps)  # noqa: B023
        _, mono_c, mono_w = _measure(lambda: monolithic_call(mono, family, p), args.reps)  # noqa: B023
        size = f"{p.height}x{p.width}" + (f" ({p.num_frames} frames)" if family == "wan" else "")
        times.append(
            f"| {family} | {size} | {p.num_inference_steps} | {pre_c:.1f} / {pre_w:.1f} "
            f"| {den_c:.1f} / {den_w:.1f} | {dec_c:.1f} / {dec_w:.1f} "
            f"| {enc_c:.1f} / {enc_w:.1f} | {mono_c:.1f} / {mono_w:.1f} |"
        )
        crossing.append(
            f"| {family} | {_describe(o1.tensors)} | {_describe(o2.tensors)} "
            f"| pixels {list(px.shape)} -> {o3.media_type} {len(o3.media) / 1024:.1f} KiB |"
        )
    print(f"threads={args.threads} reps={args.reps} torch={torch.__version__}\n")
    print("| family | size | steps | prefill ms cpu / wall | denoise | decode (VAE) ", end="")
    print("| decode + encode | monolithic |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(times))
    print("\n| family | prefill -> denoise | denoise -> decode | decode -> gateway |")
    print("|---|---|---|---|")
    print("\n".join(crossing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
