"""The transfer backend interface: move bytes into a peer's registered region.

A backend knows nothing about requests, slots or manifests. It registers one local region (the worker's
staging buffer), tells peers how to reach it (`endpoint`, plain JSON), and writes bytes from local memory
into a peer's region at an offset, blocking until the peer has the bytes. The hand-over channel
(`diffdisagg.transport.handover`) decides *where* a write may land and *when* the bytes may be read.

Three optional hooks let the receiver keep its "never read a partial write, never reuse a slot a late
write can still hit" promise; backends that cannot honour them keep the conservative defaults:

- `set_write_guard(fn)`: the receiving side asks `fn(tag, offset, nbytes)` before accepting a write;
- `landed(tag)`: how many bytes written under `tag` have fully landed (None: this backend cannot tell);
- `quiesce(offset, nbytes, timeout)`: make sure no write into the range can land any more (False: the
  caller must hold the range back for `late_write_window_s(nbytes)` before reusing it).
"""

from __future__ import annotations

import ctypes
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from diffdisagg.transport.errors import TransferError

__all__ = [
    "Backend",
    "InflightWrites",
    "LandedLog",
    "WriteGuard",
    "buffer_address",
    "check_range",
    "source_view",
]

# (tag, offset, nbytes) -> may this write land?
WriteGuard = Callable[[bytes, int, int], bool]

MAX_TAG_BYTES = 32


class Backend(ABC):
    """One worker's side of the data plane. Thread-safe: several writes may run at once."""

    name: str = "abstract"

    def __init__(self) -> None:
        self._guard: WriteGuard | None = None

    @abstractmethod
    def register(self, address: int, nbytes: int, view: memoryview | None = None) -> None:
        """Register the local region peers write into (called once, before `endpoint` is published).

        `address` is the region's start (host or device pointer); `view` is a writable host view of the
        same bytes when the memory is host memory (backends that copy with the CPU need it).
        """

    @property
    @abstractmethod
    def endpoint(self) -> dict[str, Any]:
        """What a peer needs to write into our region: JSON-able, small, includes `backend` and `nbytes`."""

    @abstractmethod
    def write(
        self,
        peer_endpoint: dict[str, Any],
        src: memoryview | int,
        dst_offset: int,
        nbytes: int,
        deadline: float,
        *,
        tag: bytes = b"",
    ) -> None:
        """Copy `nbytes` from `src` (a buffer or a local address) to `dst_offset` of the peer's region.

        Returns only once the peer has all bytes; raises TransferTimeoutError when `deadline` (unix time)
        passes first, PeerUnavailableError when the peer is gone, TransferError when it refuses. After a
        failed or timed-out write the destination range holds undefined bytes. `tag` identifies the
        reservation the write belongs to (the receiver's write guard checks it).
        """

    @abstractmethod
    def close(self) -> None:
        """Stop serving and release every resource; idempotent."""

    # ------------------------------------------------------------------ receiving-side hooks (optional)

    def set_write_guard(self, guard: WriteGuard | None) -> None:
        """Ask `guard` before accepting a write (backends with a one-sided data path cannot)."""
        self._guard = guard

    def landed(self, tag: bytes) -> int | None:
        """Bytes fully landed under `tag` since the last call (consumed), or None if unknown."""
        return None

    def quiesce(self, offset: int, nbytes: int, timeout: float) -> bool:
        """Abort writes in flight into the range; True once none can land there any more."""
        return False

    def late_write_window_s(self, nbytes: int) -> float:
        """How long after an abandoned write its bytes may still land (used when `quiesce` is False)."""
        return 0.0

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_range(offset: int, nbytes: int, region_nbytes: int) -> None:
    """Raise TransferError unless [offset, offset+nbytes) is a non-empty range inside the region."""
    if not isinstance(offset, int) or not isinstance(nbytes, int) or isinstance(offset, bool):
        raise TransferError(f"offset and nbytes must be ints, got {offset!r}, {nbytes!r}")
    if offset < 0 or nbytes <= 0 or offset + nbytes > region_nbytes:
        raise TransferError(
            f"write of {nbytes} B at offset {offset} falls outside the peer's {region_nbytes} B region"
        )


def source_view(src: memoryview | int | bytes | bytearray, nbytes: int) -> memoryview:
    """A flat byte view of the first `nbytes` of `src` (an address is wrapped without copying)."""
    if isinstance(src, int) and not isinstance(src, bool):
        if src == 0:
            raise TransferError("null source address")
        return memoryview((ctypes.c_char * nbytes).from_address(src)).cast("B")
    view = memoryview(src)
    if not view.c_contiguous:
        raise TransferError("source buffer must be C-contiguous")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if view.nbytes < nbytes:
        raise TransferError(f"source holds {view.nbytes} B, write asks for {nbytes} B")
    return view[:nbytes]


def buffer_address(src: memoryview | int | bytearray) -> int:
    """The address of a writable buffer's first byte (for engines that take raw pointers)."""
    if isinstance(src, int) and not isinstance(src, bool):
        return src
    view = memoryview(src)
    if view.readonly:
        raise TransferError("a read-only buffer has no usable address; pass a writable view or an address")
    return ctypes.addressof(ctypes.c_char.from_buffer(view.cast("B") if view.format != "B" else view))


class LandedLog:
    """Bytes landed per tag, bounded so a peer spraying tags cannot grow it without limit."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, int] = OrderedDict()
        self._max = max_entries

    def add(self, tag: bytes, nbytes: int) -> None:
        if not tag:
            return
        with self._lock:
            self._entries[tag] = self._entries.pop(tag, 0) + nbytes
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def take(self, tag: bytes) -> int:
        with self._lock:
            return self._entries.pop(tag, 0)


class InflightWrites:
    """Writes being received into the local region, so `quiesce` can abort those hitting a range.

    `begin` asks the write guard and records the write under one lock; `quiesce` takes the same lock.
    So a write either passed the guard before the receiver retired its slot (then quiesce sees and aborts
    it) or it asks the guard afterwards (and is refused). No third order exists.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._live: dict[int, tuple[int, int, Callable[[], None]]] = {}

    def begin(
        self, guard: WriteGuard | None, tag: bytes, offset: int, nbytes: int, abort: Callable[[], None]
    ) -> int | None:
        """Record a write that may land; None when the guard refuses it."""
        with self._cond:
            if guard is not None and not guard(tag, offset, nbytes):
                return None
            self._next += 1
            self._live[self._next] = (offset, nbytes, abort)
            return self._next

    def end(self, token: int) -> None:
        with self._cond:
            self._live.pop(token, None)
            self._cond.notify_all()

    def count(self) -> int:
        with self._cond:
            return len(self._live)

    def quiesce(self, offset: int, nbytes: int, timeout: float) -> bool:
        def overlapping() -> list[tuple[int, Callable[[], None]]]:
            return [
                (token, abort)
                for token, (o, n, abort) in self._live.items()
                if o < offset + nbytes and offset < o + n
            ]

        with self._cond:
            hits = overlapping()
        for _, abort in hits:
            try:
                abort()
            except OSError:
                pass
        with self._cond:
            return self._cond.wait_for(lambda: not overlapping(), timeout=timeout)
