"""FLUX.1: CLIP (pooled) + T5 prompt encoding, no CFG, packed latents that decode needs H/W for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import stages as names
from .ops_base import FamilyOps
from .params import GenerationParams


class FluxOps(FamilyOps):
    family = "flux"
    prefill_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    prefill_outputs = (names.PROMPT_EMBEDS, names.POOLED_PROMPT_EMBEDS)

    def encode(
        self, pipe: Any, params: Sequence[GenerationParams], device: torch.device
    ) -> dict[str, torch.Tensor]:
        # text_ids are zeros of a known shape: the denoise call recomputes them, so they never travel.
        pe, pooled, _text_ids = pipe.encode_prompt(
            prompt=[p.prompt for p in params],
            prompt_2=None,
            device=device,
            max_sequence_length=params[0].max_sequence_length,
        )
        return {names.PROMPT_EMBEDS: pe, names.POOLED_PROMPT_EMBEDS: pooled}

    def prompt_kwargs(self, p: GenerationParams) -> dict[str, Any]:
        return {"prompt": p.prompt}

    def latent_shape(self, p: GenerationParams) -> tuple[int, ...]:
        assert p.height and p.width
        return (1, (p.height // 16) * (p.width // 16), 64)

    def decode(self, pipe: Any, latents: torch.Tensor, p: GenerationParams) -> torch.Tensor:
        vae = pipe.vae
        lat = pipe._unpack_latents(latents, p.height, p.width, pipe.vae_scale_factor)
        lat = (lat / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(lat.to(vae.device), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")
