"""NVIDIA: one `nvidia.com/gpu` (or the configured resource) per device; the device plugin does the rest."""

from __future__ import annotations

from diffdisagg.operator.accelerators.base import DeviceWiring
from diffdisagg.operator.api.types import AcceleratorSpec

DEFAULT_RESOURCE = "nvidia.com/gpu"


def wiring(accel: AcceleratorSpec, devices: int) -> DeviceWiring:
    return DeviceWiring(platform="cuda", limits={accel.resource_name or DEFAULT_RESOURCE: devices})
