"""Gateway configuration: one frozen dataclass built once at the entry point from env and arguments."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from diffdisagg.worker import contract


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may ask for; a request beyond one gets a 4xx naming the limit."""

    max_body_bytes: int = 1 << 20
    """Largest request body accepted (bytes); larger -> 413."""
    max_prompt_chars: int = 2000
    """Longest prompt / negative prompt (characters)."""
    max_n: int = 4
    """Most images per request (`n`)."""
    min_side: int = 16
    max_side: int = 2048
    """Bounds on width and height (pixels)."""
    side_multiple: int = 16
    """Width and height must be multiples of this (latent packing of FLUX/SD3/Wan)."""
    max_pixels: int = 2048 * 2048
    max_steps: int = 100
    max_frames: int = 129
    max_guidance: float = 30.0
    max_pending: int = 256
    """Requests admitted but not finished; beyond -> 429 (the pools are saturated)."""
    max_jobs: int = 1024
    """Video jobs kept (finished ones are evicted oldest-first)."""


@dataclass(frozen=True)
class ModelDefaults:
    """Per-deployment defaults for fields the client omitted; None = the family's own default
    (diffdisagg.worker.pipelines.LIMITS). The local launcher sets small ones for the tiny models."""

    size: tuple[int, int] | None = None  # (width, height)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_frames: int | None = None
    fps: int = 16
    """Frames per second used to turn a video request's `seconds` into a frame count."""


@dataclass(frozen=True)
class GatewayConfig:
    deployment: str = "local"
    revision: str = "0"
    family: str = "flux"
    model_name: str = "diffdisagg-tiny-flux"
    token: bytes = b""
    """Inter-role token: workers sign every control message with it."""
    api_keys: frozenset[str] = frozenset()
    """Client API keys (Bearer); empty = no client authentication."""
    heartbeat_interval_s: float = 1.0
    heartbeat_misses: int = 3
    """A worker that missed this many heartbeats is dropped from dispatch until it reports again."""
    request_timeout_s: float = 300.0
    """Deadline of a request from its arrival; propagated to every role."""
    max_attempts: int = 2
    """Times a request is started from prefill; > 1 restarts it when a worker holding it dies."""
    limits: Limits = field(default_factory=Limits)
    defaults: ModelDefaults = field(default_factory=ModelDefaults)

    @property
    def is_video(self) -> bool:
        return self.family == "wan"

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0 or self.heartbeat_misses < 1:
            raise ValueError("heartbeat interval must be > 0 and misses >= 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")


def read_api_keys(path: str | None) -> frozenset[str]:
    """One key per line; blank lines and '#' comments ignored."""
    if not path:
        return frozenset()
    lines = Path(path).read_text().splitlines()
    return frozenset(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def default_model_name(family: str, model_path: str | None = None) -> str:
    """The id /v1/models lists: the model directory's name, or the tiny model's."""
    if model_path:
        return Path(model_path.rstrip("/")).name
    return f"diffdisagg-tiny-{family}"


__all__ = ["GatewayConfig", "Limits", "ModelDefaults", "contract", "default_model_name", "read_api_keys"]
