"""Shared helpers of the pipelines tests (tiny params, model dirs, hashing, loading this module).

Test modules load it with ``load_support()`` (pytest runs with --import-mode=importlib, so sibling
modules are not importable by name).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYTHONPATH = ":".join(str(REPO / p / "src") for p in ("transport", "worker", "operator"))

THREADS = 1  # pinned in every process that computes: thread count changes the bits (notes §4)

PROMPTS = ("a red fox in fresh snow", "a lighthouse at dusk, oil painting", "tiny robot, macro photo")


def tiny_params(family: str, seed: int = 7, prompt: str = PROMPTS[0], negative: str | None = "blurry") -> Any:
    """Validated tiny-size params: 64x64, 4 steps, Wan 9 frames, 64 text tokens."""
    from diffdisagg.worker.pipelines import GenerationParams, validate_params

    return validate_params(
        family,
        GenerationParams(
            prompt=prompt,
            negative_prompt=None if family == "flux" else negative,
            height=64,
            width=64,
            num_frames=9 if family == "wan" else None,
            num_inference_steps=4,
            guidance_scale=None,
            seed=seed,
            max_sequence_length=64,
        ),
    )


def sha256_tensor(t: Any) -> str:
    import torch

    x = t.detach().to("cpu").contiguous()
    return hashlib.sha256(x.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()
