"""One rank of a 2-rank CPU (gloo) role worker, run as a real process by tests/worker/test_distributed.py.

``python dist_rank.py model --family F --mode M --out DIR``: rank 0 encodes a prompt with the tiny
model's prefill role, runs the denoise batch once on its plain single-rank adapter (the reference),
then leads the group with that same adapter object split across the ranks and runs the batch again,
a request that every rank rejects, and the batch a third time. It saves the latents with safetensors
and a JSON summary. Ranks > 0 just follow.

``python dist_rank.py toy --out DIR``: a small seeded torch module as the role; rank 0 computes a
request every 0.2 s until its group fails (the failure tests kill or stop a rank and watch the other).

The rank's place comes from DIFFDISAGG_WORLD_SIZE / DIFFDISAGG_RANK / DIFFDISAGG_MASTER_PORT.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Hashable, Sequence
from pathlib import Path

import torch

from diffdisagg.worker.distributed import (
    GroupConfig,
    RankEnv,
    rank_device,
    run_follower,
    start_leader,
)
from diffdisagg.worker.pipelines.stages import RoleAdapter, StageError, StageInput, StageOutput


def _config(args: argparse.Namespace) -> GroupConfig:
    return GroupConfig(
        init_timeout_s=60.0,
        control_timeout_s=args.control_timeout,
        collective_timeout_s=args.control_timeout,
        compute_timeout_s=120.0,
        tick_s=args.tick,
        watchdog_margin_s=5.0,
    )


class ToyAdapter(RoleAdapter):
    """A seeded Linear layer: the smallest real module that a rank group can run."""

    family = "toy"
    role = "denoise"

    def __init__(self, device: torch.device) -> None:
        torch.manual_seed(1234)
        self.layer = torch.nn.Linear(8, 8).to(device).eval()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def batch_key(self, item: StageInput) -> Hashable:
        return "toy"

    def run_batch(self, items: Sequence[StageInput]) -> list[StageOutput]:
        with torch.inference_mode():
            return [
                StageOutput(it.request_id, dict(it.scalars), {"y": self.layer(it.tensors["x"])})
                for it in items
            ]


def toy(args: argparse.Namespace, env: RankEnv, out: Path) -> int:
    if not env.is_leader:
        return run_follower(env, ToyAdapter, config=_config(args))
    ranks = start_leader(env, ToyAdapter, config=_config(args))
    children = {} if ranks.children is None else {r: p.pid for r, p in ranks.children.procs.items()}
    (out / "ready.json").write_text(json.dumps({"pid": os.getpid(), "children": children}))
    n = 0
    while True:  # ends when the watchdog exits the process (group lost)
        x = torch.full((1, 8), float(n))
        ranks.adapter.run_batch([StageInput(f"r{n}", {"n": n}, {"x": x})])
        n += 1
        time.sleep(0.2)


def model(args: argparse.Namespace, env: RankEnv, out: Path) -> int:
    from safetensors.torch import save_file

    from diffdisagg.worker.pipelines import GenerationParams, load_role, tiny_model_dir, validate_params

    family = args.family
    path = tiny_model_dir(family)

    def load(device: torch.device) -> RoleAdapter:
        return load_role(family, "denoise", path, device)

    if not env.is_leader:
        return run_follower(env, load, mode=args.mode, config=_config(args))

    params = validate_params(
        family,
        GenerationParams(
            prompt="a lighthouse at dusk",
            negative_prompt=None if family == "flux" else "blurry",
            height=64,
            width=64,
            num_frames=5 if family == "wan" else None,
            num_inference_steps=2,
            guidance_scale=3.5 if family == "flux" else 4.0,
            seed=11,
            max_sequence_length=16,
        ),
    )
    device = rank_device(env)  # the CPU here; cuda:0 / npu:0 when DIFFDISAGG_PLATFORM says so
    prefill = load_role(family, "prefill", path, device)
    encoded = prefill.run_batch([StageInput("req-1", {"params": params.to_dict()})])[0]
    item = StageInput("req-1", encoded.scalars, encoded.tensors)
    adapter = load(device)
    reference = adapter.run_batch([item])[0].tensors["latents"]  # the single-rank worker

    ranks = start_leader(env, lambda _dev: adapter, mode=args.mode, config=_config(args))
    first = ranks.adapter.run_batch([item])[0].tensors["latents"]
    bad = StageInput("req-bad", {"params": {"prompt": "x", "height": 7}}, encoded.tensors)
    try:
        # Straight to the step, past rank 0's own checks: every rank must reject it alike.
        ranks.leader.run_batch([bad])
        rejected = "none"
    except StageError as exc:
        rejected = type(exc).__name__
    steps_before = ranks.leader.steps
    uneven = "none"
    if family == "flux":  # 80x80 -> 25 image tokens: cannot split over 2 context-parallel ranks
        raw = dict(params.to_dict(), height=80, width=80)
        try:
            ranks.adapter.run_batch([StageInput("req-odd", {"params": raw}, encoded.tensors)])
        except StageError as exc:
            uneven = str(exc)
    uneven_steps = ranks.leader.steps - steps_before  # 0: refused before any rank heard of it
    again = ranks.adapter.run_batch([item])[0].tensors["latents"]
    steps = ranks.leader.steps
    codes = ranks.close()
    save_file(
        {
            k: v.cpu().contiguous()
            for k, v in {"reference": reference, "first": first, "again": again}.items()
        },
        str(out / "latents.safetensors"),
    )
    summary = {
        "mode": ranks.mode.value,
        "rejected": rejected,
        "uneven": uneven,
        "uneven_steps": uneven_steps,
        "steps": steps,
        "children": codes,
    }
    (out / "summary.json").write_text(json.dumps(summary))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["model", "toy"])
    p.add_argument("--family", default="flux")
    p.add_argument("--mode", default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--tick", type=float, default=0.5)
    p.add_argument("--control-timeout", type=float, default=30.0)
    args = p.parse_args()
    env = RankEnv.from_env()
    logging.basicConfig(level=logging.INFO, format=f"rank{env.rank} %(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return (model if args.scenario == "model" else toy)(args, env, out)


if __name__ == "__main__":
    sys.exit(main())
