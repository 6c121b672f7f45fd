"""The CUDA platform (NVIDIA, and AMD ROCm, whose torch builds report the device type "cuda").

Streams and events are torch's generic `torch.Stream` / `torch.Event`; the device module
(`torch.get_device_module("cuda")`) answers availability, device count, memory and the current
stream. This file and its siblings are the only places that may name torch's CUDA module.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from diffdisagg.transport.platforms.base import MemoryInfo, Platform

__all__ = ["CudaPlatform", "cuda_available"]


def cuda_available() -> bool:
    """Whether this torch build sees at least one CUDA (or ROCm) device."""
    return bool(torch.cuda.is_available())


class CudaPlatform(Platform):
    device_type = "cuda"
    # ROCm builds map the "nccl" backend onto RCCL.
    collective_backend = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    pin_memory_supported = True
    # GPUDirect RDMA: the CUDA Mooncake wheel registers device memory with the NIC.
    device_registration_supported = True

    def is_available(self) -> bool:
        return bool(self.device_module.is_available())

    def device_count(self) -> int:
        return int(self.device_module.device_count())

    @property
    def is_rocm(self) -> bool:
        return torch.version.hip is not None

    def Stream(self, local_rank: int | None = None) -> torch.Stream:
        return torch.Stream(device=self._device_for(local_rank))

    def Event(self, enable_timing: bool = False) -> torch.Event:
        return torch.Event(device=self.device_type, enable_timing=enable_timing)

    def stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return self.device_module.stream(stream)

    def current_stream(self, local_rank: int | None = None) -> Any:
        return self.device_module.current_stream(self._device_for(local_rank))

    def synchronize(self, local_rank: int | None = None) -> None:
        self.device_module.synchronize(self._device_for(local_rank))

    def memory_info(self, local_rank: int | None = None) -> MemoryInfo:
        free, total = self.device_module.mem_get_info(self._device_for(local_rank))
        return MemoryInfo(free=int(free), total=int(total))

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["rocm"] = self.is_rocm
        return info
