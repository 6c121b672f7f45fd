"""The transfer manager: the only code that copies tensors between a device and the staging buffer.

Rules it enforces (DESIGN.md "Data path", step 6):
- copies run on one dedicated transfer stream, never the compute stream, so the next request's load
  overlaps the current request's compute;
- the transfer stream first waits for the compute stream (the tensors being staged were produced
  there, and load outputs are allocated there), then copies, then records an event;
- consumers wait on that event on their own stream (`LoadTicket.wait_on()` →
  `current_stream().wait_event(ev)`), never with a device-wide synchronize;
- a slot is released only after every copy touching it completed: `release` checks the events with
  `query()` and raises `TransferInProgressError` otherwise, leaving the slot allocated.
On CPU the copies are synchronous and the events complete at once, but the calls are the same.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from diffdisagg.transport.allocator import SlotHandle
from diffdisagg.transport.buffer import StagingBuffer
from diffdisagg.transport.codec import Manifest, plan, tensor_bytes, torch_dtype
from diffdisagg.transport.errors import (
    InvalidSizeError,
    TransferInProgressError,
    TransferTimeoutError,
    TransportError,
)
from diffdisagg.transport.platforms.base import Platform

__all__ = ["DEFAULT_WAIT_TIMEOUT", "LoadTicket", "TransferManager", "wait_event"]

log = logging.getLogger(__name__)

DEFAULT_WAIT_TIMEOUT = 60.0


def wait_event(event: Any, timeout: float = DEFAULT_WAIT_TIMEOUT, what: str = "transfer") -> None:
    """Block the host until `event` completed, at most `timeout` seconds (TransferTimeoutError).

    Polls `query()` rather than calling `synchronize()`, which has no timeout.
    """
    if event.query():
        return
    start = time.monotonic()
    deadline = start + timeout
    delay = 20e-6
    while not event.query():
        now = time.monotonic()
        if now >= deadline:
            raise TransferTimeoutError(f"{what} did not complete within {timeout:.3f} s")
        time.sleep(delay)
        # staging copies take 0.1-5 ms: poll every 50 us for the first 10 ms (a 1 ms back-off cost 0.72x of
        # the pinned copy at 64 MiB on an H200, 50 us gave 0.94x), then back off to spare the CPU
        delay = min(delay * 2, 50e-6 if now - start < 0.01 else 1e-3)


@dataclass(eq=False)
class LoadTicket:
    """Proof of an issued load: its slot, the event recorded after the copies, and the platform."""

    handle: SlotHandle
    event: Any
    platform: Platform
    nbytes: int = 0
    issued_at: float = field(default_factory=time.monotonic)

    def done(self) -> bool:
        """Whether the copies out of the slot completed (non-blocking)."""
        return bool(self.event.query())

    def wait(self, timeout: float = DEFAULT_WAIT_TIMEOUT) -> None:
        """Block the host until the load completed (TransferTimeoutError after `timeout` s)."""
        wait_event(self.event, timeout, what=f"load from slot {self.handle.slot_id}")

    def wait_on(self, stream: Any | None = None) -> None:
        """Make `stream` (default: the current stream) wait for the load, without blocking the host."""
        stream = stream if stream is not None else self.platform.current_stream()
        stream.wait_event(self.event)


class TransferManager:
    """Stages tensors into slots of `buffer` and loads them back onto a device."""

    def __init__(
        self,
        platform: Platform,
        buffer: StagingBuffer,
        *,
        local_rank: int | None = None,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> None:
        self.platform = platform
        self.buffer = buffer
        self.local_rank = local_rank
        self.wait_timeout = wait_timeout
        self.stream = platform.Stream(local_rank)
        # Last copy event per live slot: release() refuses while one is pending, ticket or not.
        self._pending: dict[int, tuple[SlotHandle, Any]] = {}
        self._lock = threading.Lock()
        self.staged_bytes = 0
        self.loaded_bytes = 0

    # ------------------------------------------------------------------------------------- staging

    def stage_async(
        self,
        handle: SlotHandle,
        tensors: Mapping[str, torch.Tensor],
        scalars: Mapping[str, Any] | None = None,
    ) -> tuple[Manifest, Any]:
        """Issue device→staging copies of `tensors` into the slot; return the manifest and the event.

        The slot's bytes are valid once the event completed (wait before handing them to a backend).
        """
        manifest = plan(tensors, scalars)
        slot = self._slot(handle, manifest)
        compute = self.platform.current_stream(self.local_rank)
        self.stream.wait_stream(compute)
        with self.platform.stream(self.stream):
            for spec in manifest.tensors:
                if not spec.nbytes:
                    continue
                source = tensors[spec.name]
                if source.device.type != "cpu":
                    # The caching allocator must not hand this memory out again before our copy ran.
                    source.record_stream(self.stream)
                slot[spec.offset : spec.end].copy_(tensor_bytes(source), non_blocking=True)
            event = self.platform.Event()
            event.record(self.stream)
        self._track(handle, event, staged=manifest.total_nbytes)
        return manifest, event

    def stage(
        self,
        handle: SlotHandle,
        tensors: Mapping[str, torch.Tensor],
        scalars: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Manifest:
        """Stage and wait (host side) until the slot holds the bytes."""
        manifest, event = self.stage_async(handle, tensors, scalars)
        wait_event(event, self._timeout(timeout), what=f"stage into slot {handle.slot_id}")
        return manifest

    # ------------------------------------------------------------------------------------- loading

    def load_async(
        self,
        handle: SlotHandle,
        manifest: Manifest,
        device: torch.device | str | None = None,
    ) -> tuple[dict[str, torch.Tensor], LoadTicket]:
        """Issue staging→device copies; return the (not yet filled) tensors and a ticket.

        Compute must `ticket.wait_on()` before reading them; the slot may be released once
        `ticket.done()`.
        """
        # Placement only: loading reads the tensors, never the scalars (they were checked when the
        # manifest was planned or decoded), and walking them again cost ~10 us per call.
        manifest.validate(handle.nbytes, scalars=False)
        slot = self._slot(handle, manifest)
        if device is not None:
            target = torch.device(device)
        elif self.local_rank is not None:
            target = self.platform.device(self.local_rank)
        else:
            target = self.platform.current_device()
        compute = self.platform.current_stream(self.local_rank)
        # Allocated on the compute stream, which will use and free them; the transfer stream waits
        # for the allocation (and anything that used that memory before) before writing.
        outputs = {
            spec.name: torch.empty(spec.nbytes, dtype=torch.uint8, device=target) for spec in manifest.tensors
        }
        self.stream.wait_stream(compute)
        with self.platform.stream(self.stream):
            for spec in manifest.tensors:
                if spec.nbytes:
                    outputs[spec.name].copy_(slot[spec.offset : spec.end], non_blocking=True)
            event = self.platform.Event()
            event.record(self.stream)
        tensors = {
            spec.name: outputs[spec.name].view(torch_dtype(spec.dtype)).reshape(spec.shape)
            for spec in manifest.tensors
        }
        self._track(handle, event, loaded=manifest.total_nbytes)
        return tensors, LoadTicket(handle, event, self.platform, nbytes=manifest.total_nbytes)

    def load(
        self,
        handle: SlotHandle,
        manifest: Manifest,
        device: torch.device | str | None = None,
        timeout: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Load and wait (host side) until the tensors are filled."""
        tensors, ticket = self.load_async(handle, manifest, device)
        ticket.wait(self._timeout(timeout))
        return tensors

    # ------------------------------------------------------------------------------------- release

    def release(self, handle: SlotHandle, ticket: LoadTicket | None = None) -> None:
        """Free the slot. Raises TransferInProgressError (slot kept) while a copy on it is pending."""
        if ticket is not None:
            if ticket.handle != handle:
                raise TransportError(f"ticket is for slot {ticket.handle!r}, not {handle!r}")
            if not ticket.event.query():
                raise TransferInProgressError(
                    f"slot {handle.slot_id}: its load has not completed; wait on the ticket first"
                )
        with self._lock:
            pending = self._pending.get(handle.slot_id)
            if pending is not None and pending[0] == handle and not pending[1].query():
                raise TransferInProgressError(f"slot {handle.slot_id}: a copy into or out of it is pending")
            self.buffer.free(handle)
            if pending is not None and pending[0] == handle:
                del self._pending[handle.slot_id]

    def pending(self, handle: SlotHandle) -> bool:
        """Whether a copy into or out of the slot is still running."""
        with self._lock:
            entry = self._pending.get(handle.slot_id)
        return entry is not None and entry[0] == handle and not entry[1].query()

    # ----------------------------------------------------------------------------------- internals

    def _slot(self, handle: SlotHandle, manifest: Manifest) -> torch.Tensor:
        if manifest.total_nbytes > handle.nbytes:
            raise InvalidSizeError(
                f"tensors need {manifest.total_nbytes} B but slot {handle.slot_id} holds {handle.nbytes} B"
            )
        return self.buffer.tensor(handle)  # validates the handle

    def _track(self, handle: SlotHandle, event: Any, *, staged: int = 0, loaded: int = 0) -> None:
        with self._lock:
            self._pending[handle.slot_id] = (handle, event)
            self.staged_bytes += staged
            self.loaded_bytes += loaded

    def _timeout(self, timeout: float | None) -> float:
        return self.wait_timeout if timeout is None else timeout
