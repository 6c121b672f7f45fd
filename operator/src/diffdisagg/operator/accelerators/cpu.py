"""CPU: no device, no extra wiring (tests, `make run`, small deployments)."""

from __future__ import annotations

from diffdisagg.operator.accelerators.base import DeviceWiring
from diffdisagg.operator.api.types import AcceleratorSpec


def wiring(accel: AcceleratorSpec, devices: int) -> DeviceWiring:
    return DeviceWiring(platform="cpu")
