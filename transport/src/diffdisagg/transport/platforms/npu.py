"""The Ascend NPU platform (torch_npu).

torch_npu registers its module as torch's "npu" device module (`torch.get_device_module("npu")`)
and renames torch's PrivateUse1 backend to "npu". Every device call goes through that module, and
only through the names in `DEVICE_MODULE_ATTRS` (tests check those names against the real torch_npu
wheel). Streams and events are torch_npu's own classes: its collectives and copy kernels expect them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
from types import ModuleType
from typing import Any

from diffdisagg.transport.platforms.base import MemoryInfo, Platform

__all__ = [
    "DEVICE_MODULE_ATTRS",
    "EVENT_METHODS",
    "STREAM_METHODS",
    "NpuPlatform",
    "npu_device_module",
]

log = logging.getLogger(__name__)

#: Attributes of torch_npu's device module (torch_npu.npu) that this platform uses.
DEVICE_MODULE_ATTRS = (
    "is_available",
    "device_count",
    "current_device",
    "set_device",
    "synchronize",
    "mem_get_info",
    "Stream",
    "Event",
    "stream",
    "current_stream",
)
#: Methods of its Stream / Event classes that the transfer manager calls.
STREAM_METHODS = ("wait_event", "wait_stream", "record_event", "query", "synchronize")
EVENT_METHODS = ("record", "wait", "query", "synchronize", "elapsed_time")


def npu_device_module() -> ModuleType | None:
    """torch_npu's device module when torch_npu imports and sees an NPU, else None."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        importlib.import_module("torch_npu")  # registers torch.npu as a side effect
        import torch

        module = torch.get_device_module("npu")
    except Exception as exc:  # a broken CANN install must read as "no NPU", not crash detection
        log.warning("torch_npu is installed but unusable: %s", exc)
        return None
    try:
        available = bool(module.is_available())
    except Exception as exc:
        log.warning("torch_npu could not query NPUs: %s", exc)
        return None
    return module if available else None


class NpuPlatform(Platform):
    device_type = "npu"
    collective_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"
    pin_memory_supported = True
    # Ascend-direct transfers register device memory (2 MiB-aligned regions).
    device_registration_supported = True

    def is_available(self) -> bool:
        return bool(self.device_module.is_available())

    def device_count(self) -> int:
        return int(self.device_module.device_count())

    def Stream(self, local_rank: int | None = None) -> Any:
        return self.device_module.Stream(device=self._device_for(local_rank))

    def Event(self, enable_timing: bool = False) -> Any:
        return self.device_module.Event(enable_timing=enable_timing)

    def stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return self.device_module.stream(stream)

    def current_stream(self, local_rank: int | None = None) -> Any:
        return self.device_module.current_stream(self._device_for(local_rank))

    def synchronize(self, local_rank: int | None = None) -> None:
        self.device_module.synchronize(self._device_for(local_rank))

    def memory_info(self, local_rank: int | None = None) -> MemoryInfo:
        free, total = self.device_module.mem_get_info(self._device_for(local_rank))
        return MemoryInfo(free=int(free), total=int(total))
