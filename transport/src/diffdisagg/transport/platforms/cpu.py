"""The CPU platform: first class, because tests and `make run` use it.

CPU copies are synchronous, so a host "stream" has no queue and a host "event" is complete as soon
as it is recorded. `HostStream` / `HostEvent` still offer the `torch.Stream` / `torch.Event` methods
(torch's own CPU stream refuses to record events), so the transfer manager runs the same code here
as on a GPU: record, wait_event, query, synchronize.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from diffdisagg.transport.errors import PlatformError
from diffdisagg.transport.platforms.base import MemoryInfo, Platform

__all__ = ["CpuPlatform", "HostEvent", "HostStream"]


class HostEvent:
    """An event on the host: completed at `record()`; `elapsed_time` measures wall time between two."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.enable_timing = enable_timing
        self._recorded_at: float | None = None

    def record(self, stream: HostStream | None = None) -> None:
        self._recorded_at = time.perf_counter()

    def query(self) -> bool:
        # Host work is done by the time record() returns; an unrecorded event is trivially complete,
        # as torch's device events are.
        return True

    def synchronize(self) -> None:
        return None

    def wait(self, stream: HostStream | None = None) -> None:
        return None

    def elapsed_time(self, end_event: HostEvent) -> float:
        if not (self.enable_timing and end_event.enable_timing):
            raise PlatformError("elapsed_time needs two events created with enable_timing=True")
        if self._recorded_at is None or end_event._recorded_at is None:
            raise PlatformError("elapsed_time needs both events recorded")
        return (end_event._recorded_at - self._recorded_at) * 1000.0

    def __repr__(self) -> str:
        return f"HostEvent(recorded={self._recorded_at is not None})"


class HostStream:
    """A host stream: work submitted "on" it has finished when the call returns."""

    device = torch.device("cpu")
    device_type = "cpu"

    def wait_event(self, event: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None

    def record_event(self, event: HostEvent | None = None) -> HostEvent:
        event = event if event is not None else HostEvent()
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def __repr__(self) -> str:
        return "HostStream()"


_DEFAULT_HOST_STREAM = HostStream()


class CpuPlatform(Platform):
    device_type = "cpu"
    collective_backend = "gloo"
    visible_devices_env = None
    # Page-locking only pays off for DMA to a device; there is none.
    pin_memory_supported = False
    device_registration_supported = False

    def __init__(self) -> None:
        super().__init__(device_module=torch.get_device_module("cpu"))

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        # One logical device: ranks of a CPU role share it (gloo does not care).
        return 1

    def device(self, local_rank: int = 0) -> torch.device:
        if not isinstance(local_rank, int) or isinstance(local_rank, bool) or local_rank < 0:
            raise PlatformError(f"local rank must be a non-negative int, got {local_rank!r}")
        return torch.device("cpu")

    def set_device(self, local_rank: int) -> None:
        self.device(local_rank)

    def current_device_index(self) -> int:
        return 0

    def Stream(self, local_rank: int | None = None) -> HostStream:
        return HostStream()

    def Event(self, enable_timing: bool = False) -> HostEvent:
        return HostEvent(enable_timing=enable_timing)

    @contextlib.contextmanager
    def stream(self, stream: Any) -> Iterator[Any]:
        yield stream

    def current_stream(self, local_rank: int | None = None) -> HostStream:
        return _DEFAULT_HOST_STREAM

    def synchronize(self, local_rank: int | None = None) -> None:
        return None

    def memory_info(self, local_rank: int | None = None) -> MemoryInfo:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        free = _mem_available()
        if free is None:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return MemoryInfo(free=free, total=total)

    def empty_device(self, nbytes: int, local_rank: int | None = None) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def _device_for(self, local_rank: int | None) -> torch.device:
        return torch.device("cpu")


def _mem_available() -> int | None:
    # MemAvailable counts reclaimable page cache; SC_AVPHYS_PAGES does not and under-reports badly.
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
