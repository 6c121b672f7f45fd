"""Wan2.1 T2V: UMT5 prompt encoding, CFG with negative embeddings, 3-D video latents kept in fp32."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import stages as names
from .ops_base import FamilyOps
from .params import GenerationParams


class WanOps(FamilyOps):
    family = "wan"
    prefill_components = ("text_encoder", "tokenizer")
    prefill_outputs = (names.PROMPT_EMBEDS,)
    cfg_outputs = (names.NEGATIVE_PROMPT_EMBEDS,)
    video = True

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # The Wan VAE is run in fp32 (as the reference pipelines load it): its 3-D causal convs
        # lose visible quality in bf16, and the pipeline keeps Wan latents in fp32 anyway.
        return torch.float32

    def encode(
        self, pipe: Any, params: Sequence[GenerationParams], device: torch.device
    ) -> dict[str, torch.Tensor]:
        cfg = self.uses_cfg(params[0])
        pe, npe = pipe.encode_prompt(
            prompt=[p.prompt for p in params],
            negative_prompt=[p.negative_prompt or "" for p in params] if cfg else None,
            do_classifier_free_guidance=cfg,
            max_sequence_length=params[0].max_sequence_length,
            device=device,
        )
        out = {names.PROMPT_EMBEDS: pe}
        if cfg:
            out[names.NEGATIVE_PROMPT_EMBEDS] = npe
        return out

    def denoise_kwargs(self, p: GenerationParams) -> dict[str, Any]:
        return {**super().denoise_kwargs(p), "num_frames": p.num_frames}

    def prompt_kwargs(self, p: GenerationParams) -> dict[str, Any]:
        return {"prompt": p.prompt, "negative_prompt": p.negative_prompt}

    def latent_shape(self, p: GenerationParams) -> tuple[int, ...]:
        assert p.height and p.width and p.num_frames
        return (1, 16, (p.num_frames - 1) // 4 + 1, p.height // 8, p.width // 8)

    def decode(self, pipe: Any, latents: torch.Tensor, p: GenerationParams) -> torch.Tensor:
        vae = pipe.vae
        lat = latents.to(vae.device, dtype=vae.dtype)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(lat.device, lat.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(lat.device, lat.dtype)
        video = vae.decode(lat / inv_std + mean, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="pt")
