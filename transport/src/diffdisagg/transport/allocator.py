"""Slot allocator over one contiguous region (no torch, no memory: offsets only).

A worker registers one staging region with its transfer backend and carves it into slots, one per
in-flight hand-over. This module owns that bookkeeping:

- every slot starts and ends on a multiple of the alignment (512 B by default; 2 MiB for regions that
  Ascend registers directly), so any slot can be handed to a DMA engine as is;
- free blocks are kept sorted by offset and neighbours are merged on free (coalescing), so freeing
  everything always gives back one block of the whole capacity;
- handles are explicit values carrying a generation number: a slot id is reused only with a new
  generation, so a handle kept after its free is recognised (`DoubleFreeError` on a second free,
  `StaleHandleError` on validate), never silently aliased to someone else's bytes;
- all state changes happen under one lock: the receiver's control thread allocates while the transfer
  manager frees after loads.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Literal

from diffdisagg.transport.errors import (
    BufferFullError,
    DoubleFreeError,
    InvalidSizeError,
    StaleHandleError,
)

__all__ = [
    "ALIGNMENT_2MIB",
    "DEFAULT_ALIGNMENT",
    "MIN_ALIGNMENT",
    "AllocatorStats",
    "SlotAllocator",
    "SlotHandle",
    "align_up",
]

MIN_ALIGNMENT = 512
DEFAULT_ALIGNMENT = 512
ALIGNMENT_2MIB = 2 * 1024 * 1024

Strategy = Literal["best-fit", "first-fit"]


def align_up(value: int, alignment: int) -> int:
    """Round `value` up to a multiple of `alignment` (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as a size is a bug, not one byte.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class SlotHandle:
    """One live reservation: `nbytes` usable bytes at `offset` of the region.

    `nbytes` is what the caller asked for; the allocator reserves it rounded up to the alignment.
    """

    slot_id: int
    offset: int
    nbytes: int
    generation: int


@dataclass(frozen=True, slots=True)
class AllocatorStats:
    """A consistent snapshot for metrics (taken under the allocator's lock)."""

    capacity: int
    used_bytes: int
    free_bytes: int
    live_slots: int
    free_blocks: int
    largest_free_block: int
    fragmentation: float

    @property
    def occupancy(self) -> float:
        return self.used_bytes / self.capacity if self.capacity else 0.0


class SlotAllocator:
    """Aligned slots over `capacity` bytes with coalescing free blocks and generation-checked handles."""

    def __init__(self, capacity: int, alignment: int = DEFAULT_ALIGNMENT, strategy: Strategy = "best-fit"):
        if not _is_int(alignment) or alignment < MIN_ALIGNMENT or alignment & (alignment - 1):
            raise InvalidSizeError(
                f"alignment must be a power of two >= {MIN_ALIGNMENT}, got {alignment!r}"
            )
        if not _is_int(capacity) or capacity <= 0 or capacity % alignment:
            raise InvalidSizeError(
                f"capacity must be a positive multiple of the alignment ({alignment}), got {capacity!r}"
            )
        if strategy not in ("best-fit", "first-fit"):
            raise InvalidSizeError(f"strategy must be 'best-fit' or 'first-fit', got {strategy!r}")
        self._capacity = capacity
        self._alignment = alignment
        self._strategy: Strategy = strategy
        self._lock = threading.Lock()
        # Free blocks as parallel sorted lists (offsets ascending) so neighbours are found by bisect.
        self._free_offsets: list[int] = [0]
        self._free_sizes: list[int] = [capacity]
        self._used = 0
        # slot_id -> (live handle, reserved bytes)
        self._live: dict[int, tuple[SlotHandle, int]] = {}
        # Highest generation ever issued per slot id: tells "freed already" from "never issued".
        self._generations: dict[int, int] = {}
        self._free_ids: list[int] = []  # kept sorted; few ids, so a list beats a heap
        self._next_id = 0

    # ----------------------------------------------------------------------------------------- api

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def alignment(self) -> int:
        return self._alignment

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self._capacity - self._used

    @property
    def live_slots(self) -> int:
        with self._lock:
            return len(self._live)

    @property
    def largest_free_block(self) -> int:
        with self._lock:
            return max(self._free_sizes, default=0)

    @property
    def fragmentation(self) -> float:
        """0 when all free space is one block (or none is free); towards 1 as it splinters."""
        with self._lock:
            return self._fragmentation_locked()

    @property
    def occupancy(self) -> float:
        with self._lock:
            return self._used / self._capacity

    def stats(self) -> AllocatorStats:
        with self._lock:
            return AllocatorStats(
                capacity=self._capacity,
                used_bytes=self._used,
                free_bytes=self._capacity - self._used,
                live_slots=len(self._live),
                free_blocks=len(self._free_offsets),
                largest_free_block=max(self._free_sizes, default=0),
                fragmentation=self._fragmentation_locked(),
            )

    def reserved_nbytes(self, nbytes: int) -> int:
        """The bytes a request of `nbytes` occupies (rounded up to the alignment)."""
        self._check_request(nbytes)
        return align_up(nbytes, self._alignment)

    def can_allocate(self, nbytes: int) -> bool:
        """Whether `allocate(nbytes)` would succeed right now (a hint: another thread may race)."""
        need = self.reserved_nbytes(nbytes)
        with self._lock:
            return any(size >= need for size in self._free_sizes)

    def allocate(self, nbytes: int) -> SlotHandle:
        """Reserve an aligned slot of at least `nbytes`.

        Raises InvalidSizeError for a size that can never fit (<= 0 or beyond the capacity) and
        BufferFullError when it could fit but no free block is large enough now.
        """
        need = self.reserved_nbytes(nbytes)
        with self._lock:
            index = self._find_block(need)
            if index < 0:
                raise BufferFullError(
                    f"no free block of {need} B (requested {nbytes} B; free {self._capacity - self._used} B "
                    f"in {len(self._free_offsets)} blocks, largest {max(self._free_sizes, default=0)} B)"
                )
            offset = self._free_offsets[index]
            remaining = self._free_sizes[index] - need
            if remaining:
                self._free_offsets[index] = offset + need
                self._free_sizes[index] = remaining
            else:
                del self._free_offsets[index]
                del self._free_sizes[index]
            slot_id = self._take_id()
            generation = self._generations.get(slot_id, 0) + 1
            self._generations[slot_id] = generation
            handle = SlotHandle(slot_id=slot_id, offset=offset, nbytes=nbytes, generation=generation)
            self._live[slot_id] = (handle, need)
            self._used += need
            return handle

    def validate(self, handle: SlotHandle) -> None:
        """Raise StaleHandleError unless `handle` names a live slot of this allocator."""
        with self._lock:
            self._live_entry(handle, freeing=False)

    def is_live(self, handle: SlotHandle) -> bool:
        try:
            self.validate(handle)
        except StaleHandleError:
            return False
        return True

    def free(self, handle: SlotHandle) -> None:
        """Give a slot back. DoubleFreeError if it was freed already; StaleHandleError if unknown."""
        with self._lock:
            _, reserved = self._live_entry(handle, freeing=True)
            del self._live[handle.slot_id]
            self._used -= reserved
            self._insert_free(handle.offset, reserved)
            bisect.insort(self._free_ids, handle.slot_id)

    def live_handles(self) -> list[SlotHandle]:
        """All live handles, by offset (for leak checks and shutdown)."""
        with self._lock:
            return sorted((h for h, _ in self._live.values()), key=lambda h: h.offset)

    def free_blocks(self) -> list[tuple[int, int]]:
        """Free blocks as (offset, size), by offset."""
        with self._lock:
            return list(zip(self._free_offsets, self._free_sizes))

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"SlotAllocator(capacity={s.capacity}, alignment={self._alignment}, used={s.used_bytes}, "
            f"live={s.live_slots}, free_blocks={s.free_blocks}, fragmentation={s.fragmentation:.3f})"
        )

    # ------------------------------------------------------------------------------------ internals

    def _check_request(self, nbytes: int) -> None:
        if not _is_int(nbytes) or nbytes <= 0:
            raise InvalidSizeError(f"slot size must be a positive int, got {nbytes!r}")
        if nbytes > self._capacity:
            raise InvalidSizeError(f"slot of {nbytes} B can never fit a region of {self._capacity} B")

    def _fragmentation_locked(self) -> float:
        free = self._capacity - self._used
        if free == 0:
            return 0.0
        return 1.0 - max(self._free_sizes) / free

    def _find_block(self, need: int) -> int:
        if self._strategy == "first-fit":
            for i, size in enumerate(self._free_sizes):
                if size >= need:
                    return i
            return -1
        best, best_size = -1, 0
        for i, size in enumerate(self._free_sizes):
            if size >= need and (best < 0 or size < best_size):
                best, best_size = i, size
                if size == need:
                    break
        return best

    def _take_id(self) -> int:
        # Reuse the smallest free id so ids stay small (they label metrics and logs).
        if self._free_ids:
            return self._free_ids.pop(0)
        slot_id = self._next_id
        self._next_id += 1
        return slot_id

    def _live_entry(self, handle: SlotHandle, *, freeing: bool) -> tuple[SlotHandle, int]:
        if not isinstance(handle, SlotHandle):
            raise StaleHandleError(f"not a SlotHandle: {handle!r}")
        entry = self._live.get(handle.slot_id)
        if entry is not None and entry[0] == handle:
            return entry
        issued = self._generations.get(handle.slot_id, 0)
        current_live = entry is not None and entry[0].generation == handle.generation
        if freeing and 0 < handle.generation <= issued and not current_live:
            raise DoubleFreeError(
                f"slot {handle.slot_id} generation {handle.generation} was already freed "
                f"(latest generation {issued}, {'live' if entry else 'free'})"
            )
        raise StaleHandleError(f"{handle!r} does not name a live slot of this allocator")

    def _insert_free(self, offset: int, size: int) -> None:
        i = bisect.bisect_left(self._free_offsets, offset)
        # Merge with the right neighbour, then with the left one.
        if i < len(self._free_offsets) and offset + size == self._free_offsets[i]:
            size += self._free_sizes[i]
            del self._free_offsets[i]
            del self._free_sizes[i]
        if i > 0 and self._free_offsets[i - 1] + self._free_sizes[i - 1] == offset:
            self._free_sizes[i - 1] += size
        else:
            self._free_offsets.insert(i, offset)
            self._free_sizes.insert(i, size)
