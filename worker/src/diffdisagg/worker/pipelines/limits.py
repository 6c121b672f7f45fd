"""Per-family limits on generation parameters (torch-free).

The numbers follow what each diffusers pipeline requires and what the released models were trained
for: the spatial size must be a multiple of the VAE factor times the transformer's patch size (8 x 2
= 16 for FLUX.1, SD3 and Wan2.1; diffusers silently rounds otherwise, which would change the
request behind the client's back), Wan's frame count must be 4k+1 (its VAE compresses time by 4),
and text beyond the encoder's max sequence length is truncated by the tokenizers, so the sequence
length is capped at what the T5/UMT5 encoders were trained with (512).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class FamilyLimits:
    """Bounds and defaults for one family. Units: pixels, frames, steps, characters, tokens."""

    size_multiple: int
    min_side: int
    max_side: int
    max_pixels: int  # height * width of one frame
    default_height: int
    default_width: int
    max_steps: int
    default_steps: int
    min_guidance: float
    max_guidance: float
    default_guidance: float
    max_prompt_chars: int
    max_sequence_length: int  # upper bound of the encoder's token budget
    default_sequence_length: int
    uses_negative_prompt: bool  # classifier-free guidance with a negative prompt
    video: bool
    frame_multiple: int = 1  # num_frames must be frame_multiple * k + 1 (video only)
    max_frames: int = 1
    default_frames: int = 1

    def with_overrides(self, **changes: object) -> FamilyLimits:
        """A deployment may tighten the limits (e.g. a smaller max_pixels for a small GPU)."""
        return replace(self, **changes)  # type: ignore[arg-type]


LIMITS: dict[str, FamilyLimits] = {
    # FLUX.1-dev: guidance is an embedded scalar (no CFG, no negative prompt); trained up to ~2 MP.
    "flux": FamilyLimits(
        size_multiple=16,
        min_side=64,
        max_side=2048,
        max_pixels=2048 * 2048,
        default_height=1024,
        default_width=1024,
        max_steps=100,
        default_steps=28,
        min_guidance=0.0,
        max_guidance=20.0,
        default_guidance=3.5,
        max_prompt_chars=4000,
        max_sequence_length=512,
        default_sequence_length=512,
        uses_negative_prompt=False,
        video=False,
    ),
    # SD3-medium: CFG with a negative prompt when guidance > 1; its T5 budget defaults to 256 tokens.
    "sd3": FamilyLimits(
        size_multiple=16,
        min_side=64,
        max_side=2048,
        max_pixels=2048 * 2048,
        default_height=1024,
        default_width=1024,
        max_steps=100,
        default_steps=28,
        min_guidance=0.0,
        max_guidance=20.0,
        default_guidance=7.0,
        max_prompt_chars=4000,
        max_sequence_length=512,
        default_sequence_length=256,
        uses_negative_prompt=True,
        video=False,
    ),
    # Wan2.1 T2V: 480p/720p clips of up to 81 frames (5 s at 16 fps), frames 4k+1.
    "wan": FamilyLimits(
        size_multiple=16,
        min_side=64,
        max_side=1280,
        max_pixels=1280 * 720,
        default_height=480,
        default_width=832,
        max_steps=100,
        default_steps=50,
        min_guidance=0.0,
        max_guidance=20.0,
        default_guidance=5.0,
        max_prompt_chars=4000,
        max_sequence_length=512,
        default_sequence_length=512,
        uses_negative_prompt=True,
        video=True,
        frame_multiple=4,
        max_frames=81,
        default_frames=81,
    ),
}
