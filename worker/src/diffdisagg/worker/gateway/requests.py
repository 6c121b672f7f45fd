"""Validation of the OpenAI-shaped requests into the parameters every role receives.

The gateway checks shape and bounds (with the limit in the message) without the model code; the prefill
worker then runs the family's own `validate_params` and its `ParamError` comes back as a 422 naming the
field. The params dict uses the field names of `diffdisagg.worker.pipelines.GenerationParams`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from diffdisagg.worker.gateway.config import GatewayConfig
from diffdisagg.worker.gateway.errors import APIError
from diffdisagg.worker.gateway.forms import FILE_MARKER
from diffdisagg.worker.pipelines.params import GenerationParams, ParamError, validate_params

_IMAGE_FIELDS = {
    "model",
    "prompt",
    "n",
    "size",
    "response_format",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "user",
    "quality",
    "style",
    "output_format",
    "background",
    "moderation",
    "max_sequence_length",
    "timeout",
}
_VIDEO_FIELDS = {
    "model",
    "prompt",
    "seconds",
    "size",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "num_frames",
    "fps",
    "input_reference",
    "max_sequence_length",
    "timeout",
}
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Generation:
    """A validated request: the per-role params plus what only the gateway needs."""

    params: dict[str, Any]
    n: int
    model: str
    timeout_s: float
    size: str
    fps: int = 16


def _bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _int(data: dict[str, Any], key: str, lo: int, hi: int, default: int | None) -> int | None:
    raw = data.get(key)
    if raw is None or raw == "":
        return default
    if isinstance(raw, bool):
        raise _bad(f"'{key}' must be an integer", key)
    try:
        value = int(raw) if not isinstance(raw, float) or raw.is_integer() else None
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise _bad(f"'{key}' must be an integer, got {raw!r}", key)
    if not lo <= value <= hi:
        raise _bad(f"'{key}' must be between {lo} and {hi} (limit), got {value}", key, "limit_exceeded")
    return value


def _float(data: dict[str, Any], key: str, lo: float, hi: float, default: float) -> float:
    raw = data.get(key)
    if raw is None or raw == "":
        return default
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
    except (TypeError, ValueError):
        raise _bad(f"'{key}' must be a number, got {raw!r}", key) from None
    if not lo <= value <= hi:
        raise _bad(f"'{key}' must be between {lo:g} and {hi:g} (limit), got {value:g}", key, "limit_exceeded")
    return value


def _text(data: dict[str, Any], key: str, limit: int, required: bool) -> str | None:
    raw = data.get(key)
    if raw is None:
        if required:
            raise APIError(400, f"'{key}' is required", param=key, code="missing_required_parameter")
        return None
    if not isinstance(raw, str):
        raise _bad(f"'{key}' must be a string", key)
    if required and not raw.strip():
        raise _bad(f"'{key}' must not be empty", key)
    if len(raw) > limit:
        raise _bad(f"'{key}' is {len(raw)} characters; the limit is {limit}", key, "limit_exceeded")
    return raw


def _size(cfg: GatewayConfig, raw: Any) -> tuple[int | None, int | None]:
    lim = cfg.limits
    if raw is None or raw == "" or raw == "auto":
        return cfg.defaults.size or (None, None)
    if not isinstance(raw, str) or "x" not in raw:
        raise _bad(f"'size' must look like 'WIDTHxHEIGHT', got {raw!r}", "size")
    w_s, _, h_s = raw.lower().partition("x")
    try:
        w, h = int(w_s), int(h_s)
    except ValueError:
        raise _bad(f"'size' must look like 'WIDTHxHEIGHT', got {raw!r}", "size") from None
    for side in (w, h):
        if not lim.min_side <= side <= lim.max_side:
            raise _bad(
                f"'size' sides must be between {lim.min_side} and {lim.max_side} pixels (limit), got {raw}",
                "size",
                "limit_exceeded",
            )
        if side % lim.side_multiple:
            raise _bad(f"'size' sides must be multiples of {lim.side_multiple}, got {raw}", "size")
    if w * h > lim.max_pixels:
        raise _bad(
            f"'size' {raw} has {w * h} pixels; the limit is {lim.max_pixels}", "size", "limit_exceeded"
        )
    return w, h


def _model(cfg: GatewayConfig, data: dict[str, Any]) -> str:
    model = data.get("model")
    if model in (None, ""):
        return cfg.model_name
    if model != cfg.model_name:
        raise APIError(
            404,
            f"model {model!r} is not served here; available: {cfg.model_name!r}",
            param="model",
            code="model_not_found",
        )
    return cfg.model_name


def _common(cfg: GatewayConfig, data: dict[str, Any]) -> dict[str, Any]:
    lim = cfg.limits
    prompt = _text(data, "prompt", lim.max_prompt_chars, required=True)
    negative = _text(data, "negative_prompt", lim.max_prompt_chars, required=False)
    w, h = _size(cfg, data.get("size"))
    seed = _int(data, "seed", 0, MAX_SEED, None)
    params: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative,
        "width": w,
        "height": h,
        "num_inference_steps": _int(
            data, "num_inference_steps", 1, lim.max_steps, cfg.defaults.num_inference_steps
        ),
        "guidance_scale": _float(data, "guidance_scale", 0.0, lim.max_guidance, cfg.defaults.guidance_scale),
        # A seed chosen here (not by the worker) makes a request restarted after a failure give the same bits.
        "seed": seed if seed is not None else secrets.randbelow(2**31),
    }
    msl = _int(data, "max_sequence_length", 1, 512, None)
    if msl is not None:
        params["max_sequence_length"] = msl
    return params


def _family_checked(cfg: GatewayConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The family's own validation (torch-free): fills its defaults, enforces its limits."""
    try:
        gp = validate_params(
            cfg.family, GenerationParams.from_dict({k: v for k, v in params.items() if v is not None})
        )
    except ParamError as exc:
        raise _bad(f"'{exc.field}' {exc.message}", exc.field, "invalid_value") from None
    return gp.to_dict()


def _timeout(cfg: GatewayConfig, data: dict[str, Any]) -> float:
    return _float(data, "timeout", 0.1, cfg.request_timeout_s, cfg.request_timeout_s)


def _unknown(data: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise _bad(f"unknown parameter(s): {', '.join(extra)}", extra[0], "unknown_parameter")


def parse_image_request(cfg: GatewayConfig, data: dict[str, Any]) -> Generation:
    _unknown(data, _IMAGE_FIELDS)
    if cfg.is_video:
        raise _bad(
            f"model {cfg.model_name!r} generates video: use POST /v1/videos", "model", "wrong_endpoint"
        )
    model = _model(cfg, data)
    fmt = data.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise _bad(
            f"response_format {fmt!r} is not supported: this server returns images inline; use 'b64_json'",
            "response_format",
            "unsupported_value",
        )
    out_fmt = data.get("output_format")
    if out_fmt not in (None, "png"):
        raise _bad(
            f"output_format {out_fmt!r} is not supported; only 'png'", "output_format", "unsupported_value"
        )
    n = _int(data, "n", 1, cfg.limits.max_n, 1)
    params = _common(cfg, data)
    assert n is not None
    params = _family_checked(cfg, params)
    return Generation(params, n, model, _timeout(cfg, data), f"{params['width']}x{params['height']}")


def parse_video_request(cfg: GatewayConfig, data: dict[str, Any]) -> Generation:
    _unknown(data, _VIDEO_FIELDS)
    if not cfg.is_video:
        raise _bad(
            f"model {cfg.model_name!r} generates images: use POST /v1/images/generations",
            "model",
            "wrong_endpoint",
        )
    if data.get("input_reference") not in (None, ""):
        kind = "file upload" if data["input_reference"] == FILE_MARKER else "reference"
        raise _bad(
            f"input_reference ({kind}) is not supported: text-to-video only",
            "input_reference",
            "unsupported_value",
        )
    model = _model(cfg, data)
    params = _common(cfg, data)
    lim = cfg.limits
    fps = _int(data, "fps", 1, 60, cfg.defaults.fps)
    frames = _int(data, "num_frames", 1, lim.max_frames, None)
    if frames is None:
        seconds = _float(data, "seconds", 0.0, 3600.0, 0.0)
        if seconds:
            assert fps is not None
            # Wan wants 4k+1 frames; round the requested duration to the nearest such count.
            frames = 4 * max(1, round(seconds * fps / 4)) + 1
            if frames > lim.max_frames:
                raise _bad(
                    f"'seconds'={seconds:g} at {fps} fps is {frames} frames; the limit is {lim.max_frames}",
                    "seconds",
                    "limit_exceeded",
                )
        else:
            frames = cfg.defaults.num_frames
    params["num_frames"] = frames
    params = _family_checked(cfg, params)
    assert fps is not None
    return Generation(params, 1, model, _timeout(cfg, data), f"{params['width']}x{params['height']}", fps)
