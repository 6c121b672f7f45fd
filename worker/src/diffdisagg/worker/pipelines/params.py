"""Generation parameters of one request and their validation per family (torch-free).

``validate_params`` returns a complete copy (every default filled in) so that every stage, the
monolithic reference and the logs see the same numbers; it raises ``ParamError(field, message)``
naming the field and the limit, which the gateway turns into a 4xx.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .families import check_family
from .limits import LIMITS, FamilyLimits

MAX_SEED = 2**63 - 1


class ParamError(ValueError):
    """A generation parameter outside the family's limits."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class GenerationParams:
    """What a client asked for. ``None`` means "the family's default" until validated."""

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    max_sequence_length: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationParams:
        """Strict: unknown keys are an error (a typo must not silently fall back to a default)."""
        if not isinstance(data, dict):
            raise ParamError("params", f"expected an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParamError(unknown[0], f"unknown parameter; known: {', '.join(sorted(known))}")
        if "prompt" not in data:
            raise ParamError("prompt", "is required")
        return cls(**data)


def _int(field: str, value: object) -> int:
    # bool is an int subclass: "steps": true is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(field, f"must be an integer, got {value!r}")
    return value


def _check_side(field: str, value: int, lim: FamilyLimits) -> None:
    if value < lim.min_side or value > lim.max_side:
        raise ParamError(field, f"must be between {lim.min_side} and {lim.max_side}, got {value}")
    if value % lim.size_multiple:
        raise ParamError(field, f"must be a multiple of {lim.size_multiple}, got {value}")


def validate_params(
    family: str, params: GenerationParams, limits: FamilyLimits | None = None
) -> GenerationParams:
    """Check ``params`` against ``family``'s limits; return them with every default filled in."""
    check_family(family)
    lim = limits or LIMITS[family]

    prompt = params.prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise ParamError("prompt", "must be a non-empty string")
    if len(prompt) > lim.max_prompt_chars:
        raise ParamError("prompt", f"must be at most {lim.max_prompt_chars} characters, got {len(prompt)}")

    negative = params.negative_prompt
    if negative is not None:
        if not isinstance(negative, str):
            raise ParamError("negative_prompt", "must be a string")
        if not lim.uses_negative_prompt and negative:
            raise ParamError("negative_prompt", f"{family} does not use a negative prompt (no CFG)")
        if len(negative) > lim.max_prompt_chars:
            raise ParamError(
                "negative_prompt", f"must be at most {lim.max_prompt_chars} characters, got {len(negative)}"
            )
        if not lim.uses_negative_prompt:
            negative = None

    height = _int("height", lim.default_height if params.height is None else params.height)
    width = _int("width", lim.default_width if params.width is None else params.width)
    _check_side("height", height, lim)
    _check_side("width", width, lim)
    if height * width > lim.max_pixels:
        raise ParamError(
            "width", f"height*width must be at most {lim.max_pixels} pixels, got {height}x{width}"
        )

    if lim.video:
        frames = _int("num_frames", lim.default_frames if params.num_frames is None else params.num_frames)
        if frames < 1 or frames > lim.max_frames:
            raise ParamError("num_frames", f"must be between 1 and {lim.max_frames}, got {frames}")
        if (frames - 1) % lim.frame_multiple:
            raise ParamError("num_frames", f"must be {lim.frame_multiple}k+1 (e.g. 9, 17, 81), got {frames}")
    else:
        if params.num_frames not in (None, 1):
            raise ParamError(
                "num_frames", f"{family} makes images: num_frames must be 1, got {params.num_frames}"
            )
        frames = 1

    steps = _int(
        "num_inference_steps",
        lim.default_steps if params.num_inference_steps is None else params.num_inference_steps,
    )
    if steps < 1 or steps > lim.max_steps:
        raise ParamError("num_inference_steps", f"must be between 1 and {lim.max_steps}, got {steps}")

    guidance = lim.default_guidance if params.guidance_scale is None else params.guidance_scale
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
        raise ParamError("guidance_scale", f"must be a finite number, got {guidance!r}")
    if guidance < lim.min_guidance or guidance > lim.max_guidance:
        raise ParamError(
            "guidance_scale", f"must be between {lim.min_guidance} and {lim.max_guidance}, got {guidance}"
        )

    seed = _int("seed", params.seed)
    if seed < 0 or seed > MAX_SEED:
        raise ParamError("seed", f"must be between 0 and {MAX_SEED}, got {seed}")

    seq = _int(
        "max_sequence_length",
        lim.default_sequence_length if params.max_sequence_length is None else params.max_sequence_length,
    )
    if seq < 1 or seq > lim.max_sequence_length:
        raise ParamError("max_sequence_length", f"must be between 1 and {lim.max_sequence_length}, got {seq}")

    return replace(
        params,
        negative_prompt=negative,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=float(guidance),
        seed=seed,
        max_sequence_length=seq,
    )
