"""What a vendor adds to a worker pod: device resources, env, volumes (a plain value the builder merges)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]


@dataclass(frozen=True)
class DeviceWiring:
    platform: str  # value of DIFFDISAGG_PLATFORM: cpu | cuda | npu
    limits: dict[str, int] = field(default_factory=dict)  # extended resources (requests = limits)
    env: tuple[Json, ...] = ()
    volumes: tuple[Json, ...] = ()
    volume_mounts: tuple[Json, ...] = ()
