"""SD3: two CLIPs + T5 prompt encoding, CFG with negative (pooled) embeddings, plain 2-D latents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import stages as names
from .ops_base import FamilyOps
from .params import GenerationParams


class SD3Ops(FamilyOps):
    family = "sd3"
    prefill_components = (
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
    )
    prefill_outputs = (names.PROMPT_EMBEDS, names.POOLED_PROMPT_EMBEDS)
    cfg_outputs = (names.NEGATIVE_PROMPT_EMBEDS, names.NEGATIVE_POOLED_PROMPT_EMBEDS)

    def encode(
        self, pipe: Any, params: Sequence[GenerationParams], device: torch.device
    ) -> dict[str, torch.Tensor]:
        cfg = self.uses_cfg(params[0])
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=[p.prompt for p in params],
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=cfg,
            # The pipeline turns a missing negative prompt into "" itself; doing the same here
            # keeps a batch of mixed None/"" requests one call.
            negative_prompt=[p.negative_prompt or "" for p in params] if cfg else None,
            max_sequence_length=params[0].max_sequence_length,
        )
        out = {names.PROMPT_EMBEDS: pe, names.POOLED_PROMPT_EMBEDS: pooled}
        if cfg:
            out[names.NEGATIVE_PROMPT_EMBEDS] = npe
            out[names.NEGATIVE_POOLED_PROMPT_EMBEDS] = npooled
        return out

    def prompt_kwargs(self, p: GenerationParams) -> dict[str, Any]:
        return {"prompt": p.prompt, "negative_prompt": p.negative_prompt}

    def latent_shape(self, p: GenerationParams) -> tuple[int, ...]:
        assert p.height and p.width
        return (1, 16, p.height // 8, p.width // 8)

    def decode(self, pipe: Any, latents: torch.Tensor, p: GenerationParams) -> torch.Tensor:
        vae = pipe.vae
        lat = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(lat.to(vae.device), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")
