"""The staging buffer: one memory region per worker, registered with the transfer backend and carved
into slots by a `SlotAllocator`.

Memory comes from the platform layer: page-locked host memory where the platform can pin (CUDA, NPU)
so device copies run asynchronously, plain host memory on CPU, and device memory when asked for and
the platform can register device memory with a backend directly. The region is over-allocated by one
alignment unit so its base address is aligned too (Ascend-direct registration wants 2 MiB-aligned
regions, DMA engines like 512 B). The backing tensor lives until `close()`; memoryviews handed out
keep their memory alive even after that, so a late reader sees stale bytes, never freed memory.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import torch

from diffdisagg.transport.allocator import DEFAULT_ALIGNMENT, SlotAllocator, SlotHandle, Strategy, align_up
from diffdisagg.transport.errors import (
    BufferClosedError,
    BufferInUseError,
    InvalidSizeError,
    PlatformError,
)

if TYPE_CHECKING:
    import numpy as np

    from diffdisagg.transport.platforms.base import Platform

__all__ = ["StagingBuffer"]

log = logging.getLogger(__name__)


class StagingBuffer:
    """A registered region of `nbytes` (rounded up to the alignment) with slot allocation.

    `address` and `nbytes` are what a backend registers; `memoryview(handle)` is a writable view of a
    slot for socket `recv_into`; `tensor(handle)` is a uint8 tensor view of a slot for device copies.
    """

    def __init__(
        self,
        nbytes: int,
        platform: Platform,
        alignment: int = DEFAULT_ALIGNMENT,
        device_memory: bool = False,
        *,
        local_rank: int | None = None,
        strategy: Strategy = "best-fit",
    ) -> None:
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise InvalidSizeError(f"staging buffer size must be a positive int, got {nbytes!r}")
        if not _pow2(alignment):
            raise InvalidSizeError(f"alignment must be a power of two, got {alignment!r}")
        # Built before any memory so a bad alignment or strategy allocates nothing.
        allocator = SlotAllocator(align_up(nbytes, alignment), alignment, strategy)
        capacity = allocator.capacity
        if device_memory and not platform.device_registration_supported:
            raise PlatformError(
                f"{platform.device_type} platform cannot register device memory; use host staging"
            )
        self._platform = platform
        self._device_memory = device_memory
        self._lock = threading.Lock()
        if device_memory:
            backing = platform.empty_device(capacity + alignment, local_rank)
        else:
            backing = platform.empty_host(capacity + alignment, pin=platform.pin_memory_supported)
        shift = align_up(backing.data_ptr(), alignment) - backing.data_ptr()
        self._backing: torch.Tensor | None = backing
        self._region: torch.Tensor | None = backing[shift : shift + capacity]
        self._array: np.ndarray | None = None if device_memory else self._region.numpy()
        self._address = self._region.data_ptr()
        self._allocator = allocator
        self._alignment = alignment
        log.debug(
            "staging buffer: %d B at 0x%x on %s (pinned=%s)",
            capacity, self._address, self._region.device, self.pinned,
        )

    # ------------------------------------------------------------------------------------ identity

    @property
    def address(self) -> int:
        return self._address

    @property
    def nbytes(self) -> int:
        return self._allocator.capacity

    @property
    def alignment(self) -> int:
        return self._alignment

    @property
    def allocator(self) -> SlotAllocator:
        return self._allocator

    @property
    def platform(self) -> Platform:
        return self._platform

    @property
    def device_memory(self) -> bool:
        return self._device_memory

    @property
    def device(self) -> torch.device:
        return self._live_region().device

    @property
    def pinned(self) -> bool:
        region = self._region
        return bool(region is not None and not self._device_memory and region.is_pinned())

    @property
    def closed(self) -> bool:
        return self._region is None

    # ---------------------------------------------------------------------------------------- slots

    def allocate(self, nbytes: int) -> SlotHandle:
        self._live_region()
        return self._allocator.allocate(nbytes)

    def free(self, handle: SlotHandle) -> None:
        self._live_region()
        self._allocator.free(handle)

    def validate(self, handle: SlotHandle) -> None:
        self._live_region()
        self._allocator.validate(handle)

    def memoryview(self, handle: SlotHandle) -> memoryview:
        """Writable bytes of the slot (exactly `handle.nbytes`); host memory only."""
        array = self._host_array()
        self._allocator.validate(handle)
        return memoryview(array[handle.offset : handle.offset + handle.nbytes])

    def region_view(self) -> memoryview:
        """Writable bytes of the whole region (what a host-memory backend registers)."""
        return memoryview(self._host_array())

    def tensor(self, handle: SlotHandle) -> torch.Tensor:
        """uint8 tensor view of the slot (shares memory with the region)."""
        region = self._live_region()
        self._allocator.validate(handle)
        return region[handle.offset : handle.offset + handle.nbytes]

    def region(self) -> torch.Tensor:
        """uint8 tensor view of the whole region."""
        return self._live_region()

    # -------------------------------------------------------------------------------------- closing

    def close(self, force: bool = False) -> None:
        """Release the memory. Refuses while slots are live unless `force` (shutdown paths)."""
        with self._lock:
            if self._region is None:
                return
            live = self._allocator.live_slots
            if live and not force:
                raise BufferInUseError(f"staging buffer still has {live} live slot(s)")
            if live:
                log.warning("closing staging buffer with %d live slot(s)", live)
                for handle in self._allocator.live_handles():
                    self._allocator.free(handle)
            self._array = None
            self._region = None
            self._backing = None

    def __enter__(self) -> StagingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(force=True)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"0x{self._address:x}"
        return f"StagingBuffer({self.nbytes} B, {state}, {self._allocator!r})"

    # ------------------------------------------------------------------------------------ internals

    def _live_region(self) -> torch.Tensor:
        region = self._region
        if region is None:
            raise BufferClosedError("staging buffer is closed")
        return region

    def _host_array(self) -> np.ndarray:
        self._live_region()
        if self._array is None:
            raise PlatformError("a device-memory staging buffer has no host memoryview")
        return self._array


def _pow2(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and not value & (value - 1)
