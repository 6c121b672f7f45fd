"""The `Platform` interface: everything the rest of diffdisagg may know about a device kind.

A worker picks one platform once (see `detect.py`) and then speaks only to it: which torch device to
use, how to make streams and events, how much memory is free, whether host memory can be pinned and
whether device memory can be registered with a transfer backend, which environment variable names the
visible devices and which collective backend to use. Concrete platforms live beside this module
(`cpu.py`, `cuda.py`, `npu.py`); this package is the only code allowed to name a device module.

Streams and events follow the `torch.Stream` / `torch.Event` method names (`record`, `query`,
`synchronize`, `wait`, `wait_event`, `wait_stream`, `record_event`) on every platform, so the transfer
manager is written once.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import torch

from diffdisagg.transport.errors import PlatformError

__all__ = ["MemoryInfo", "Platform"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """Free and total bytes of one device (host RAM on CPU)."""

    free: int
    total: int

    @property
    def used(self) -> int:
        return self.total - self.free


class Platform(ABC):
    """One device kind. Subclasses set the class attributes and implement the device calls."""

    #: torch device type string ("cpu", "cuda", "npu").
    device_type: ClassVar[str]
    #: torch.distributed backend for the device group.
    collective_backend: ClassVar[str]
    #: environment variable that restricts the visible devices, None when there is none.
    visible_devices_env: ClassVar[str | None]
    #: host memory can be page-locked for fast, asynchronous device copies.
    pin_memory_supported: ClassVar[bool]
    #: device memory can be registered with a transfer backend (GPUDirect RDMA / Ascend direct).
    device_registration_supported: ClassVar[bool]

    def __init__(self, device_module: ModuleType | Any | None = None) -> None:
        self._device_module = device_module

    # ------------------------------------------------------------------------------ identity, devices

    @property
    def name(self) -> str:
        return self.device_type

    @property
    def device_module(self) -> ModuleType | Any:
        """`torch.get_device_module(device_type)` (torch.cpu on CPU)."""
        if self._device_module is None:
            self._device_module = torch.get_device_module(self.device_type)
        return self._device_module

    @abstractmethod
    def is_available(self) -> bool:
        """Whether at least one device of this kind can be used by this process."""

    @abstractmethod
    def device_count(self) -> int: ...

    def device(self, local_rank: int = 0) -> torch.device:
        """The torch device of the `local_rank`-th visible device."""
        index = self._check_rank(local_rank)
        return torch.device(self.device_type, index)

    def set_device(self, local_rank: int) -> None:
        """Make `local_rank` the current device (NPU needs this before Mooncake's initialize)."""
        self.device_module.set_device(self._check_rank(local_rank))

    def current_device_index(self) -> int:
        return int(self.device_module.current_device())

    def current_device(self) -> torch.device:
        """The torch device that is current in this thread (set_device changes it)."""
        return self._device_for(None)

    # -------------------------------------------------------------------------------- streams, events

    @abstractmethod
    def Stream(self, local_rank: int | None = None) -> Any:
        """A new stream on the device (a side stream for transfers)."""

    @abstractmethod
    def Event(self, enable_timing: bool = False) -> Any:
        """A new event; `record()` it on a stream, `query()` / `synchronize()` / `wait()` it."""

    @abstractmethod
    def stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        """Context manager making `stream` current, so kernels and copies inside run on it."""

    @abstractmethod
    def current_stream(self, local_rank: int | None = None) -> Any: ...

    @abstractmethod
    def synchronize(self, local_rank: int | None = None) -> None:
        """Wait for all work on the device (tests and shutdown only; hot paths wait on events)."""

    @abstractmethod
    def memory_info(self, local_rank: int | None = None) -> MemoryInfo: ...

    # ------------------------------------------------------------------------------------- memory

    def empty_host(self, nbytes: int, *, pin: bool | None = None) -> torch.Tensor:
        """A flat uint8 host tensor; page-locked when `pin` (default: when the platform supports it)."""
        pin = self.pin_memory_supported if pin is None else pin
        if pin and not self.pin_memory_supported:
            raise PlatformError(f"{self.device_type} platform cannot pin host memory")
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def empty_device(self, nbytes: int, local_rank: int | None = None) -> torch.Tensor:
        """A flat uint8 tensor in device memory."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self._device_for(local_rank))

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the host: moved when `tensor.device.type != "cpu"`, returned as is otherwise.

        Placement is tested by device type, never with `tensor.is_npu` (that attribute exists only
        once torch_npu is imported and raises on other builds), so it holds for any future device.
        """
        if tensor.device.type != "cpu":
            return tensor.to("cpu")
        return tensor

    # ------------------------------------------------------------------------------------- helpers

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for logs and /health."""
        return {
            "platform": self.device_type,
            "available": self.is_available(),
            "device_count": self.device_count(),
            "collective_backend": self.collective_backend,
            "visible_devices_env": self.visible_devices_env,
            "pin_memory_supported": self.pin_memory_supported,
            "device_registration_supported": self.device_registration_supported,
        }

    def _check_rank(self, local_rank: int) -> int:
        if not isinstance(local_rank, int) or isinstance(local_rank, bool) or local_rank < 0:
            raise PlatformError(f"local rank must be a non-negative int, got {local_rank!r}")
        count = self.device_count()
        if local_rank >= count:
            env = f" (check {self.visible_devices_env})" if self.visible_devices_env else ""
            raise PlatformError(
                f"local rank {local_rank} but only {count} {self.device_type} device(s) visible{env}"
            )
        return local_rank

    def _device_for(self, local_rank: int | None) -> torch.device:
        if local_rank is None:
            return torch.device(self.device_type, self.current_device_index())
        return self.device(local_rank)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device_type={self.device_type!r})"
