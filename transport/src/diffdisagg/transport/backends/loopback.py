"""In-process backend: a write is a memory copy between two regions registered in this process.

This is the executable specification of the backend contract: range checks, write guard, landed
accounting and quiesce behave exactly as the network backends must, with nothing in between that can
fail. Endpoints name a process-local registry entry, so a loopback endpoint is meaningless in another
process (writing to one raises PeerUnavailableError).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any

from diffdisagg.transport.backends.base import (
    Backend,
    InflightWrites,
    LandedLog,
    check_range,
    source_view,
)
from diffdisagg.transport.errors import PeerUnavailableError, TransferError, TransferTimeoutError

__all__ = ["LoopbackBackend"]

_registry: dict[str, LoopbackBackend] = {}
_registry_lock = threading.Lock()
_ids = itertools.count(1)


class LoopbackBackend(Backend):
    name = "loopback"

    def __init__(self) -> None:
        super().__init__()
        self._id = f"{os.getpid()}-{next(_ids)}"
        self._address = 0
        self._nbytes = 0
        self._view: memoryview = memoryview(b"")
        self._inflight = InflightWrites()
        self._landed = LandedLog()
        self._closed = False

    def register(self, address: int, nbytes: int, view: memoryview | None = None) -> None:
        if self._nbytes:
            raise TransferError("loopback backend: a region is registered already")
        if nbytes <= 0:
            raise TransferError(f"loopback backend: region size must be positive, got {nbytes}")
        self._address, self._nbytes = address, nbytes
        if view is None:
            raise TransferError("loopback backend copies with the CPU: it needs a host view of the region")
        self._view = view.cast("B")
        with _registry_lock:
            _registry[self._id] = self

    @property
    def endpoint(self) -> dict[str, Any]:
        return {"backend": self.name, "id": self._id, "pid": os.getpid(), "nbytes": self._nbytes}

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
        if time.time() >= deadline:
            raise TransferTimeoutError("loopback write: deadline passed before the copy started")
        with _registry_lock:
            peer = _registry.get(str(peer_endpoint.get("id")))
        if peer is None or peer_endpoint.get("pid") != os.getpid():
            raise PeerUnavailableError(f"loopback peer {peer_endpoint.get('id')!r} is not in this process")
        peer._receive(source_view(src, nbytes), dst_offset, nbytes, tag)

    def _receive(self, data: memoryview, offset: int, nbytes: int, tag: bytes) -> None:
        check_range(offset, nbytes, self._nbytes)
        # The copy cannot be interrupted, so there is nothing to abort: quiesce just waits for it.
        token = self._inflight.begin(self._guard, tag, offset, nbytes, abort=lambda: None)
        if token is None:
            raise TransferError(f"loopback peer refused a write of {nbytes} B at {offset} (no reservation)")
        try:
            self._view[offset : offset + nbytes] = data
            self._landed.add(tag, nbytes)
        finally:
            self._inflight.end(token)

    def landed(self, tag: bytes) -> int | None:
        return self._landed.take(tag)

    def quiesce(self, offset: int, nbytes: int, timeout: float) -> bool:
        return self._inflight.quiesce(offset, nbytes, timeout)

    @property
    def inflight_writes(self) -> int:
        return self._inflight.count()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _registry_lock:
            _registry.pop(self._id, None)
