"""Vendor → wiring table. One function: `wiring(accel, devices)`: what the vendor adds to a worker pod."""

from __future__ import annotations

from collections.abc import Callable

from diffdisagg.operator.accelerators import ascend, cpu, nvidia
from diffdisagg.operator.accelerators.base import DeviceWiring
from diffdisagg.operator.api.types import AcceleratorSpec
from diffdisagg.operator.errors import SpecError

_VENDORS: dict[str, Callable[[AcceleratorSpec, int], DeviceWiring]] = {
    "nvidia": nvidia.wiring,
    "ascend": ascend.wiring,
    "cpu": cpu.wiring,
}


def wiring(accel: AcceleratorSpec, devices: int = 1) -> DeviceWiring:
    """What the vendor adds to a worker pod with `devices` devices (see api.types.devices_of)."""
    try:
        return _VENDORS[accel.vendor](accel, devices)
    except KeyError:
        raise SpecError(
            f"spec.accelerator.vendor {accel.vendor!r} is not one of {', '.join(_VENDORS)}"
        ) from None


__all__ = ["DeviceWiring", "wiring"]
