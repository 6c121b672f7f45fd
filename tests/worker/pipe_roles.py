"""One role of the split (or the monolithic reference) in its own process, for test_split_bitexact.

    python pipe_roles.py ROLE --models DIR --work DIR [--families flux,sd3,wan] [--seeds 7,8]

ROLE is prefill | denoise | decode | mono. prefill/denoise read their input hand-over from WORK
and write their output hand-over there; decode and mono write ``<family>.<seed>.<role>.json`` with
the SHA-256 of the decoded pixels (float32 bytes) and of the encoded media. Every process pins the
thread count and records where it ran (network namespace, interfaces, hub-offline flag) in
``<role>.env.json`` so the test can check it really ran offline.

The hand-over between the processes is ``hand_over`` / ``take_over`` below: today a codec payload
file (msgpack, no pickle). Swapping in the real transport hand-over changes only these two.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipe_support import THREADS, sha256_bytes, sha256_tensor, tiny_params


# ------------------------------------------------------------------------------ the hand-over seam
def hand_over(work: Path, name: str, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    """Send one stage's output to the next stage's process."""
    from diffdisagg.transport.codec import encode_payload

    tmp = work / f".{name}.tmp"
    tmp.write_bytes(encode_payload(tensors, scalars))
    tmp.rename(work / name)  # atomic: the reader never sees a partial payload


def take_over(work: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Receive what the previous stage's process handed over."""
    from diffdisagg.transport.codec import decode_payload

    return decode_payload((work / name).read_bytes())


# ---------------------------------------------------------------------------------------------------


def _environment() -> dict:
    return {
        "netns": os.readlink("/proc/self/ns/net"),
        "interfaces": [name for _, name in socket.if_nameindex()],
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }


def _shapes(tensors: dict[str, torch.Tensor]) -> dict:
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "nbytes": v.nbytes}
        for k, v in tensors.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["prefill", "denoise", "decode", "mono"])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--families", default="flux,sd3,wan")
    ap.add_argument("--seeds", default="7")
    args = ap.parse_args()

    torch.set_num_threads(THREADS)
    from diffdisagg.worker.pipelines import StageInput, load_pipeline, load_role, monolithic_call
    from diffdisagg.worker.pipelines.loading import quiet_hf_logging
    from diffdisagg.worker.pipelines.media import encode_mp4, encode_png

    quiet_hf_logging()
    role = args.role
    report: dict = {"env": _environment(), "stages": {}}
    for family in args.families.split(","):
        model = args.models / family
        t0 = time.perf_counter()
        if role == "mono":
            pipe = load_pipeline(family, model)
        else:
            adapter = load_role(family, role, model)
        load_s = time.perf_counter() - t0
        for seed in (int(s) for s in args.seeds.split(",")):
            params = tiny_params(family, seed=seed)
            tag = f"{family}.{seed}"
            t0 = time.perf_counter()
            if role == "mono":
                pixels = monolithic_call(pipe, family, params)
                media = encode_mp4(pixels[0]) if family == "wan" else encode_png(pixels[0])
                result = {
                    "pixels": sha256_tensor(pixels),
                    "media": sha256_bytes(media),
                    "shape": list(pixels.shape),
                }
            elif role == "prefill":
                out = adapter.run_batch([StageInput(tag, {"params": params.to_dict()})])[0]
                hand_over(args.work, f"{tag}.prefill.msgpack", out.tensors, out.scalars)
                result = {"sent": _shapes(out.tensors)}
            elif role == "denoise":
                tensors, scalars = take_over(args.work, f"{tag}.prefill.msgpack")
                out = adapter.run_batch([StageInput(tag, scalars, tensors)])[0]
                hand_over(args.work, f"{tag}.denoise.msgpack", out.tensors, out.scalars)
                result = {"received": _shapes(tensors), "sent": _shapes(out.tensors)}
            else:
                tensors, scalars = take_over(args.work, f"{tag}.denoise.msgpack")
                item = StageInput(tag, scalars, tensors)
                pixels = adapter.pixels([item])
                out = adapter.run_batch([item])[0]
                result = {
                    "pixels": sha256_tensor(pixels),
                    "media": sha256_bytes(out.media or b""),
                    "media_type": out.media_type,
                    "media_bytes": len(out.media or b""),
                    "shape": list(pixels.shape),
                    "received": _shapes(tensors),
                }
            result["seconds"] = time.perf_counter() - t0
            result["load_seconds"] = load_s
            report["stages"][tag] = result
    (args.work / f"{role}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
