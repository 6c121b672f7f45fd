"""The family-specific half of a role adapter: which modules each role loads, how prompts are
encoded, which keyword arguments drive the denoise call, and how latents become pixels.

The generic role adapters (``roles.py``) hold the batching and bookkeeping; a ``FamilyOps``
subclass per family (``flux.py``, ``sd3.py``, ``wan.py``) holds what differs. Every method here
mirrors a specific block of the diffusers pipeline's own ``__call__`` so that the split stays
bit-identical to the monolithic call; the tests compare the two.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from . import stages as names
from .families import pipeline_class
from .params import GenerationParams


class FamilyOps(ABC):
    family: str
    #: Module names of the prefill role (text encoders and their tokenizers).
    prefill_components: tuple[str, ...]
    denoise_components: tuple[str, ...] = ("transformer", "scheduler")
    decode_components: tuple[str, ...] = ("vae",)
    #: Tensor names prefill produces when CFG is off / extra ones when it is on.
    prefill_outputs: tuple[str, ...] = (names.PROMPT_EMBEDS,)
    cfg_outputs: tuple[str, ...] = ()
    video: bool = False

    @property
    def pipeline_cls(self) -> Any:
        return pipeline_class(self.family)

    def all_components(self) -> tuple[str, ...]:
        return self.prefill_components + self.denoise_components + self.decode_components

    def uses_cfg(self, p: GenerationParams) -> bool:
        """Classifier-free guidance (and therefore negative embeddings) for these params."""
        return bool(self.cfg_outputs) and float(p.guidance_scale or 0.0) > 1.0

    def expected_tensors(self, p: GenerationParams) -> tuple[str, ...]:
        return self.prefill_outputs + (self.cfg_outputs if self.uses_cfg(p) else ())

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    @abstractmethod
    def encode(
        self, pipe: Any, params: Sequence[GenerationParams], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Prompt encoding for a batch with one batch key; tensors have batch dim len(params)."""

    def denoise_kwargs(self, p: GenerationParams) -> dict[str, Any]:
        """Size and sampling arguments of the pipeline call, shared by denoise and the monolithic call."""
        return {
            "height": p.height,
            "width": p.width,
            "num_inference_steps": p.num_inference_steps,
            "guidance_scale": p.guidance_scale,
            "max_sequence_length": p.max_sequence_length,
        }

    @abstractmethod
    def prompt_kwargs(self, p: GenerationParams) -> dict[str, Any]:
        """Prompt arguments of the monolithic pipeline call (the reference the split must equal)."""

    @abstractmethod
    def latent_shape(self, p: GenerationParams) -> tuple[int, ...]:
        """Shape of one request's latents as the denoise call returns them (batch 1)."""

    @abstractmethod
    def decode(self, pipe: Any, latents: torch.Tensor, p: GenerationParams) -> torch.Tensor:
        """Latents (batch B) -> pixels in [0, 1]: images [B, 3, H, W] or videos [B, F, 3, H, W]."""
