"""The in-worker scheduler loop of one role worker (DESIGN.md "Data path", step 6).

Owns the bounded ready-queue of received requests and the single compute thread that drains it:

- ``submit`` takes a request whose tensors already lie in a staging slot (or a prefill request with
  none), checks its shapes and params against the adapter on meta tensors (no load, no copy), and
  queues it; a full queue raises ``QueueFullError`` so the hand-over receiver answers ``busy``;
- the loop takes the oldest request plus up to ``max_batch_size - 1`` queued ones with the same
  batch key, waiting at most ``max_wait_s`` (counted from the oldest one's arrival) for more;
- before computing it issues the loads of that batch and of the next ``prefetch`` queued requests
  on the transfer stream (``TransferManager.load_async``), so the next request's copy overlaps this
  compute; compute waits on each load's event on the compute stream (``LoadTicket.wait_on``),
  never on a device-wide synchronize;
- a slot is released only once its load event completed (checked with ``query``; a release that
  would come too early is retried on the next turn), on every path: success, stage error, bad
  manifest, expired deadline, shutdown;
- each batch runs through ``RoleAdapter.run_batch``, which gives every call its own copy of the
  diffusers noise scheduler. A batch that fails is retried one request at a time so one bad request
  never fails its neighbours;
- ``cancel`` drops a queued request at once (completion with ``RequestCancelledError``, slot
  released through its release hook, or by the loop once a prefetched load completed) and marks a
  running one, whose result is then discarded (same completion, no output).

It does not talk to other workers: completed outputs go to ``on_complete``, and the worker process
hands them over to the next stage (or returns the media to the gateway).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from diffdisagg.transport.allocator import SlotHandle
from diffdisagg.transport.codec import Manifest, torch_dtype
from diffdisagg.transport.errors import DeadlineExceededError, TransferInProgressError, TransportError
from diffdisagg.transport.manager import LoadTicket, TransferManager
from diffdisagg.worker.pipelines.stages import RoleAdapter, StageError, StageInput, StageOutput

log = logging.getLogger(__name__)

__all__ = [
    "Completion",
    "QueueFullError",
    "ReceivedRequest",
    "RequestCancelledError",
    "SchedulerConfig",
    "SchedulerStoppedError",
    "StageScheduler",
]


class QueueFullError(RuntimeError):
    """The ready-queue is at capacity: the receiver must answer ``busy`` (nothing was queued)."""


class SchedulerStoppedError(RuntimeError):
    """The scheduler is stopping or stopped; queued requests fail with this."""


class RequestCancelledError(RuntimeError):
    """The request was cancelled (``StageScheduler.cancel``); its output, if any, was discarded."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Sizes and waits of one worker's loop. Times in seconds."""

    queue_capacity: int = 16  # requests queued (not counting the batch being computed)
    max_batch_size: int = 1  # 1 = no batching; capped by the adapter's own max_batch_size
    max_wait_s: float = 0.0  # longest a request waits for batch mates, from its arrival
    prefetch: int = 1  # queued requests whose loads are issued ahead of the current compute
    load_timeout_s: float = 60.0  # host waits on a load event (release at shutdown) give up after this
    idle_poll_s: float = 0.05  # how often an idle loop rechecks stop / pending releases

    def __post_init__(self) -> None:
        if self.queue_capacity < 1 or self.max_batch_size < 1 or self.prefetch < 0:
            raise ValueError("queue_capacity and max_batch_size must be >= 1, prefetch >= 0")
        if self.max_wait_s < 0 or self.load_timeout_s <= 0 or self.idle_poll_s <= 0:
            raise ValueError("max_wait_s must be >= 0; load_timeout_s and idle_poll_s > 0")


@dataclass
class ReceivedRequest:
    """A request ready for this stage: its scalars and, unless it is a prefill, its slot + manifest."""

    request_id: str
    scalars: dict[str, Any]
    handle: SlotHandle | None = None
    manifest: Manifest | None = None
    deadline: float | None = None  # unix time; past it the request fails without compute
    #: Frees the slot, given the load ticket (None when never loaded). Set it when the slot belongs
    #: to a HandoverReceiver: ``lambda ticket: receiver.release(delivery, ticket)``; by default the
    #: scheduler calls ``TransferManager.release(handle, ticket)``. Either may raise
    #: TransferInProgressError, and the scheduler retries on its next turn.
    release: Callable[[LoadTicket | None], None] | None = None


@dataclass
class Completion:
    """What ``on_complete`` receives: an output or an error, and where the time went."""

    request_id: str
    output: StageOutput | None
    error: BaseException | None
    queued_s: float
    compute_s: float
    batch_size: int


@dataclass(eq=False)
class _Entry:
    request: ReceivedRequest
    arrived: float
    key: Hashable = None
    tensors: dict[str, torch.Tensor] | None = None
    ticket: LoadTicket | None = None
    load_error: str | None = None
    released: bool = False
    loading: bool = False  # a load is being issued now (outside the lock): the slot is not ours to free
    cancelled: bool = False


Tracer = Callable[[str, str], None]


class StageScheduler:
    """Bounded ready-queue + one compute thread over a ``RoleAdapter`` and a ``TransferManager``.

    Drive it from the worker process: ``start()`` once, ``submit()`` from the hand-over receiver
    (after the sender's ``pushed``) or, for prefill, from the gateway link; ``stop()`` on shutdown.
    ``manager`` may be None for a prefill worker (its requests carry no tensors).
    """

    def __init__(
        self,
        adapter: RoleAdapter,
        manager: TransferManager | None,
        on_complete: Callable[[Completion], None],
        config: SchedulerConfig | None = None,
        *,
        tracer: Tracer | None = None,
    ) -> None:
        self.adapter = adapter
        self.manager = manager
        self.on_complete = on_complete
        self.config = config or SchedulerConfig()
        self._max_batch = max(1, min(self.config.max_batch_size, adapter.max_batch_size))
        self._tracer = tracer
        self._queue: deque[_Entry] = deque()
        self._loaded: list[_Entry] = []  # loads issued, slot not yet released
        self._running: dict[str, _Entry] = {}  # taken from the queue, not yet completed
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._inflight = 0

    # --------------------------------------------------------------------------------- public API

    @property
    def queue_depth(self) -> int:
        """Requests waiting for compute (the worker's share of diffdisagg_queue_depth)."""
        with self._cond:
            return len(self._queue)

    @property
    def inflight(self) -> int:
        """Requests taken from the queue and not yet completed."""
        with self._cond:
            return self._inflight

    def has_capacity(self) -> bool:
        """Whether ``submit`` would accept one more request now (the receiver asks before reserving)."""
        with self._cond:
            return not self._stopping and len(self._queue) < self.config.queue_capacity

    def cancel(self, request_id: str) -> str | None:
        """Cancel a request: ``"queued"`` (dropped now), ``"running"`` (result discarded), None (unknown).

        Thread-safe. A queued request completes at once with ``RequestCancelledError`` and its slot is
        released now, or, when a prefetch already issued its load, by the loop as soon as that load
        completed (a slot is never freed under a pending copy). A running one completes with the same
        error when its batch ends; its neighbours in the batch are not affected.
        """
        with self._cond:
            entry = next((e for e in self._queue if e.request.request_id == request_id), None)
            if entry is None:
                running = self._running.get(request_id)
                if running is None:
                    return None
                running.cancelled = True
                return "running"
            self._queue.remove(entry)
            entry.cancelled = True
            # Free now only when no load was issued; otherwise the slot is in (or about to enter)
            # _loaded and _drain_releases frees it once the copy completed.
            free_now = not entry.loading and entry.ticket is None
            self._cond.notify_all()
        if free_now:
            self._release(entry)
        self._trace("cancelled", request_id)
        self._complete(
            entry,
            None,
            RequestCancelledError(f"{request_id}: cancelled while queued"),
            time.monotonic() - entry.arrived,
            0.0,
            1,
        )
        return "queued"

    def submit(self, request: ReceivedRequest) -> None:
        """Queue ``request``. Raises QueueFullError / SchedulerStoppedError (the caller keeps the slot).

        A request that is malformed for this stage is not queued: it completes at once with a
        StageError through ``on_complete`` and its slot is released.
        """
        if (request.handle is None) != (request.manifest is None):
            raise ValueError("handle and manifest come together (both None only for prefill)")
        if request.handle is not None and self.manager is None:
            raise ValueError("a request with a slot needs a scheduler with a TransferManager")
        with self._cond:
            if self._stopping:
                raise SchedulerStoppedError("scheduler is stopping")
            if len(self._queue) >= self.config.queue_capacity:
                raise QueueFullError(f"ready-queue full ({self.config.queue_capacity})")
        entry = _Entry(request, time.monotonic())
        try:
            meta = self._meta_input(request)
            self.adapter.validate_input(meta)
            entry.key = self.adapter.batch_key(meta)
        except Exception as exc:  # any bad input becomes this request's error
            err = exc if isinstance(exc, StageError) else StageError(request.request_id, str(exc))
            self._finish([entry], None, err, 0.0, counted=False)
            return
        with self._cond:
            self._queue.append(entry)
            self._cond.notify_all()
        self._trace("queued", request.request_id)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("scheduler already started")
        self._thread = threading.Thread(target=self._run, name=f"sched-{self.adapter.role}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, fail everything still queued, release every slot."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"scheduler loop did not stop within {timeout} s")
        with self._cond:
            leftover = list(self._queue)
            self._queue.clear()
        for entry in leftover:
            self._finish([entry], None, SchedulerStoppedError("worker is shutting down"), 0.0, counted=False)
        self._drain_releases(block=True)

    def run_pending(self, timeout: float = 30.0) -> None:
        """Run the loop in the calling thread until the queue is empty (tests and one-shot tools)."""
        if self._thread is not None:
            raise RuntimeError("run_pending on a started scheduler")
        deadline = time.monotonic() + timeout
        while self.queue_depth:
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not drained within {timeout} s")
            self._turn(block=False)
        self._drain_releases(block=True)

    # --------------------------------------------------------------------------------- the loop

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
            try:
                self._turn(block=True)
            except Exception:  # the loop must outlive any single failure
                log.exception("scheduler turn failed")

    def _turn(self, block: bool) -> None:
        self._drain_releases(block=False)
        batch = self._take_batch(block)
        if not batch:
            return
        self._prefetch(batch)
        queued = time.monotonic() - min(e.arrived for e in batch)
        now = time.time()
        ready = []
        for e in batch:
            if e.cancelled:  # cancelled between leaving the queue and now: skip the compute
                self._finish([e], None, RequestCancelledError(f"{e.request.request_id}: cancelled"), queued)
            elif e.request.deadline is not None and e.request.deadline < now:
                self._finish(
                    [e], None, DeadlineExceededError(f"{e.request.request_id}: deadline passed"), queued
                )
            elif e.load_error is not None:
                self._finish(
                    [e], None, StageError(e.request.request_id, f"load failed: {e.load_error}"), queued
                )
            else:
                if e.ticket is not None:
                    # A compute-stream wait, not a host block: kernels queued after it see the copy.
                    e.ticket.wait_on()
                ready.append(e)
        if ready:
            self._compute(ready, queued)
        self._drain_releases(block=False)

    def _take_batch(self, block: bool) -> list[_Entry]:
        cfg = self.config
        with self._cond:
            if not self._queue:
                if not block:
                    return []
                self._cond.wait(cfg.idle_poll_s)
                if not self._queue or self._stopping:
                    return []
            head = self._queue[0]
            wait_until = head.arrived + cfg.max_wait_s
            while True:
                mates = [e for e in self._queue if e.key == head.key][: self._max_batch]
                remaining = wait_until - time.monotonic()
                if len(mates) >= self._max_batch or remaining <= 0 or self._stopping:
                    break
                # Bounded: never past the head's arrival + max_wait_s.
                self._cond.wait(remaining)
            for e in mates:
                self._queue.remove(e)
                self._running[e.request.request_id] = e
            self._inflight += len(mates)
            return mates

    def _prefetch(self, batch: list[_Entry]) -> None:
        """Issue the loads of ``batch`` and of the next queued requests on the transfer stream."""
        with self._cond:
            upcoming = list(self._queue)[: self.config.prefetch]
            todo = [
                e
                for e in batch + upcoming
                if e.request.handle is not None
                and e.ticket is None
                and e.load_error is None
                and not e.loading
            ]
            for e in todo:
                e.loading = True  # cancel() must not free this slot while the load is being issued
        for entry in todo:
            self._issue_load(entry)

    def _issue_load(self, entry: _Entry) -> None:
        req = entry.request
        assert self.manager is not None and req.handle is not None and req.manifest is not None
        try:
            entry.tensors, entry.ticket = self.manager.load_async(
                req.handle, req.manifest, self.adapter.device
            )
        except (TransportError, RuntimeError) as exc:
            # Nothing is in flight on the slot: free it now; the request fails when its turn comes.
            entry.load_error = str(exc)
            log.warning("load failed", extra={"request_id": req.request_id, "error": str(exc)})
            self._release(entry)
            with self._cond:
                entry.loading = False
            return
        self._trace("load_issued", req.request_id)
        with self._cond:
            self._loaded.append(entry)
            entry.loading = False

    def _compute(self, batch: list[_Entry], queued: float) -> None:
        inputs = [StageInput(e.request.request_id, dict(e.request.scalars), e.tensors or {}) for e in batch]
        for e in batch:
            self._trace("compute_start", e.request.request_id)
        # Slots whose copy already completed go back now, not after this compute: the receiver can take
        # the next hand-over into them meanwhile (loads copy out of the slot; nothing here reads it).
        self._drain_releases(block=False)
        t0 = time.monotonic()
        try:
            outputs = self.adapter.run_batch(inputs)
        except Exception as exc:  # a stage failure is the requests' error, not ours
            if len(batch) > 1:
                log.warning("batch failed, retrying one by one", extra={"error": str(exc)})
                for e in batch:
                    self._compute([e], queued)
                return
            err = exc if isinstance(exc, StageError) else StageError(inputs[0].request_id, repr(exc))
            self._finish(batch, None, err, queued, time.monotonic() - t0)
            return
        compute_s = time.monotonic() - t0
        for e in batch:
            # The loaded inputs are dead now; dropping them lets the allocator reuse the memory.
            e.tensors = None
            self._trace("compute_end", e.request.request_id)
        self._drain_releases(block=False)
        for e, out in zip(batch, outputs, strict=True):
            self._finish([e], out, None, queued, compute_s, len(batch))

    # ------------------------------------------------------------------------------ bookkeeping

    def _finish(
        self,
        entries: list[_Entry],
        output: StageOutput | None,
        error: BaseException | None,
        queued: float,
        compute_s: float = 0.0,
        batch_size: int = 1,
        *,
        counted: bool = True,
    ) -> None:
        """Report ``entries`` as done; ``counted``: they had been taken from the queue (in flight)."""
        for e in entries:
            if e.ticket is None:
                self._release(e)  # never loaded: nothing in flight on its slot
            with self._cond:
                if self._running.get(e.request.request_id) is e:
                    del self._running[e.request.request_id]
                cancelled = e.cancelled
            if cancelled and not isinstance(error, RequestCancelledError):
                # Cancelled while it ran: whatever it produced is discarded.
                self._complete(
                    e,
                    None,
                    RequestCancelledError(f"{e.request.request_id}: cancelled while running"),
                    queued,
                    compute_s,
                    batch_size,
                )
            else:
                self._complete(e, output, error, queued, compute_s, batch_size)
        if counted:
            with self._cond:
                self._inflight -= len(entries)

    def _complete(
        self,
        e: _Entry,
        output: StageOutput | None,
        error: BaseException | None,
        queued: float,
        compute_s: float,
        batch_size: int,
    ) -> None:
        e.tensors = None
        done = Completion(e.request.request_id, output, error, queued, compute_s, batch_size)
        try:
            self.on_complete(done)
        except Exception:  # a failing callback must not kill the loop
            log.exception("on_complete failed", extra={"request_id": e.request.request_id})

    def _drain_releases(self, block: bool) -> None:
        """Release the slots whose loads completed; with ``block``, wait (bounded) for all of them."""
        with self._cond:
            pending = list(self._loaded)
        for e in pending:
            if e.released or e.ticket is None:
                continue
            if block:
                try:
                    e.ticket.wait(self.config.load_timeout_s)
                except TransportError:
                    log.error("load never completed; slot kept", extra={"request_id": e.request.request_id})
                    continue
            if e.ticket.done():
                self._release(e)
        with self._cond:
            self._loaded = [e for e in self._loaded if not e.released]

    def _release(self, entry: _Entry) -> None:
        req = entry.request
        if entry.released:
            return
        if req.handle is None or self.manager is None:
            entry.released = True
            return
        try:
            if req.release is not None:
                req.release(entry.ticket)
            else:
                self.manager.release(req.handle, entry.ticket)
        except TransferInProgressError:
            return  # not yet: retried by the next _drain_releases
        except TransportError:
            log.exception("slot release failed", extra={"request_id": req.request_id})
        entry.released = True
        self._trace("released", req.request_id)

    def _meta_input(self, request: ReceivedRequest) -> StageInput:
        """The request as shapes only (meta tensors): enough to validate and batch it without a copy."""
        tensors: dict[str, torch.Tensor] = {}
        if request.manifest is not None:
            assert request.handle is not None
            request.manifest.validate(request.handle.nbytes)
            for spec in request.manifest.tensors:
                tensors[spec.name] = torch.empty(spec.shape, dtype=torch_dtype(spec.dtype), device="meta")
        return StageInput(request.request_id, dict(request.scalars), tensors)

    def _trace(self, what: str, request_id: str) -> None:
        if self._tracer is not None:
            self._tracer(what, request_id)
