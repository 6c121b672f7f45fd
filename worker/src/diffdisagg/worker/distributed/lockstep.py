"""Rank 0 leads, the other ranks follow: one step per batch (or idle tick), all ranks in lockstep.

Rank 0 (``Leader``, wrapped as a ``RoleAdapter`` by ``LeaderAdapter``) is the only rank that talks
to the outside: it owns the hand-over channel and staging buffer, and its runtime calls
``run_batch`` as on a single-device worker. Each call becomes one COMPUTE step: header, msgpack
payload and input blob go to the other ranks (``wire.py``), every rank runs the same batch through
its own adapter (whose model may be split across the ranks, ``parallel.py``), and a status vote
closes the step. Only rank 0's outputs leave the worker; the others drop theirs.

While rank 0 is idle a ticker thread sends SKIP steps, so idle followers stay inside their
collective timeouts and a dead peer is noticed within one tick. STOP ends the followers' loop.

A step that fails the same way on every rank (a bad request: every rank validates the same input)
is that request's error and the worker lives. Anything else — a collective that failed or timed
out, ranks that voted differently, a follower that fell out of step — is fatal: the group's state
is unknown, so the process exits non-zero (``RANK_LOST_EXIT_CODE``) and the pod restarts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from diffdisagg.worker.pipelines.stages import RoleAdapter, StageError, StageInput, StageOutput

from .errors import DistributedError, GroupClosedError, LockstepError
from .group import RankGroup
from .wire import (
    HEADER_LEN,
    Kind,
    blob_nbytes,
    decode_payload,
    encode_batch,
    make_header,
    pack_blob,
    parse_header,
    unpack_blob,
)

__all__ = ["Leader", "LeaderAdapter", "follow"]

log = logging.getLogger(__name__)

FatalHook = Callable[[BaseException], None]


class Leader:
    """Rank 0's side of the step protocol over a started ``RankGroup``."""

    def __init__(
        self,
        group: RankGroup,
        adapter: RoleAdapter,
        *,
        on_fatal: FatalHook | None = None,
        fatal_grace_s: float = 10.0,
    ) -> None:
        if not group.is_leader:
            raise DistributedError(f"rank {group.rank} cannot lead; only rank 0 does")
        self.group = group
        self.adapter = adapter
        self._on_fatal = on_fatal
        self._fatal_grace_s = fatal_grace_s
        self._lock = threading.Lock()
        self._seq = 0
        self._last_step = time.monotonic()
        self._stopped = threading.Event()
        self._fatal_error: BaseException | None = None
        self._ticker = threading.Thread(target=self._tick_loop, name="rank-ticker", daemon=True)

    @property
    def steps(self) -> int:
        return self._seq

    def start(self) -> Leader:
        self._ticker.start()
        return self

    # ---------------------------------------------------------------------------------- steps

    def run_batch(self, items: Sequence[StageInput]) -> list[StageOutput]:
        """One COMPUTE step: broadcast ``items``, compute on every rank, return rank 0's outputs."""
        # Encoding first: a request that cannot travel fails alone, before any rank hears of it.
        payload, tensors = encode_batch(items)
        blob = pack_blob(tensors, self.group.device)
        with self._lock:
            self._check_usable()
            try:
                self._send_header(Kind.COMPUTE, len(payload))
                self.group.broadcast_control(
                    torch.frombuffer(bytearray(payload), dtype=torch.uint8), "payload"
                )
                if blob.numel():
                    self.group.broadcast_device(blob, "input tensors")
                del blob
                error: BaseException | None = None
                outputs: list[StageOutput] = []
                try:
                    with self.group.watchdog.arm("compute", self.group.config.compute_timeout_s):
                        outputs = self.adapter.run_batch(items)
                except Exception as exc:
                    error = exc
                failed = self.group.vote(error is not None, "step vote")
            except DistributedError as exc:  # lost a rank, or a collective inside compute broke the group
                self._fatal(exc)
                raise
            finally:
                self._last_step = time.monotonic()
            if failed not in (0, self.group.world_size):
                exc2 = LockstepError(f"ranks diverged: {failed} of {self.group.world_size} failed this step")
                self._fatal(exc2)
                raise exc2 from error
            if error is not None:
                raise error
            return outputs

    def stop(self, timeout_s: float | None = None) -> None:
        """Send STOP to the followers (they exit 0) and leave the group. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        acquired = self._lock.acquire(timeout=timeout_s or self.group.config.compute_timeout_s)
        try:
            if acquired and self._fatal_error is None and self.group.broken is None and not self.group.closed:
                with contextlib.suppress(DistributedError):
                    self._send_header(Kind.STOP)
                    self.group.vote(False, "stop vote")
        finally:
            if acquired:
                self._lock.release()
        self.group.close()

    def _send_header(self, kind: Kind, payload_nbytes: int = 0) -> None:
        self.group.broadcast_control(make_header(self._seq, kind, payload_nbytes), f"{kind.name} header")
        self._seq += 1

    def _check_usable(self) -> None:
        if self._fatal_error is not None:
            raise GroupClosedError(f"rank group failed: {self._fatal_error}")
        if self._stopped.is_set():
            raise GroupClosedError("rank group stopped")

    # --------------------------------------------------------------------------------- liveness

    def _tick_loop(self) -> None:
        tick = self.group.config.tick_s
        while not self._stopped.wait(tick / 4):
            if time.monotonic() - self._last_step < tick:
                continue
            if not self._lock.acquire(timeout=tick):
                continue  # a compute step is running; it proves liveness itself
            try:
                if self._stopped.is_set() or self._fatal_error is not None:
                    return
                try:
                    self._send_header(Kind.SKIP)
                    self.group.vote(False, "tick vote")
                except DistributedError as exc:
                    self._fatal(exc)
                    return
                finally:
                    self._last_step = time.monotonic()
            finally:
                self._lock.release()

    def _fatal(self, exc: BaseException) -> None:
        if self._fatal_error is not None:
            return
        self._fatal_error = exc
        log.critical("rank group lost (%s); this worker must restart", exc)
        wd = self.group.watchdog
        if self._on_fatal is None:
            wd.exit_now(f"rank group lost: {exc}")
            return
        # Give the worker a bounded chance to stop cleanly (free slots, tell the gateway).
        wd.arm_token("graceful stop after rank loss", self._fatal_grace_s)
        try:
            self._on_fatal(exc)
        except Exception:
            log.exception("on_fatal hook failed")


class LeaderAdapter(RoleAdapter):
    """A ``RoleAdapter`` for rank 0's runtime: same interface, every batch runs on all ranks.

    ``check(item)`` returns why a request cannot run on this group (e.g. a token count that does
    not split over the ranks); such a request fails with a StageError before any rank hears of it.
    """

    def __init__(self, leader: Leader, check: Callable[[StageInput], str | None] | None = None) -> None:
        self.leader = leader
        self._check = check
        self.inner = leader.adapter
        self.family = self.inner.family
        self.role = self.inner.role
        self.max_batch_size = self.inner.max_batch_size

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def batch_key(self, item: StageInput) -> Hashable:
        return self.inner.batch_key(item)

    def validate_input(self, item: StageInput) -> None:
        self.inner.validate_input(item)
        why = self._check(item) if self._check is not None else None
        if why is not None:
            raise StageError(item.request_id, why)

    def run_batch(self, items: Sequence[StageInput]) -> list[StageOutput]:
        for item in items:
            self.validate_input(item)
        return self.leader.run_batch(items)

    def close(self) -> None:
        self.leader.stop()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not set above: adapter extras (``pipe``, ``ops``, ...).
        return getattr(self.__dict__["inner"], name)


def follow(
    group: RankGroup,
    adapter: RoleAdapter,
    make_input: Callable[[str, dict[str, Any], dict[str, torch.Tensor]], Any] = StageInput,
) -> None:
    """Ranks 1..N-1: run every step rank 0 sends until STOP. Raises on any group failure."""
    if group.is_leader:
        raise DistributedError("rank 0 leads; it does not follow")
    seq = 0
    while True:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        group.broadcast_control(header, "wait for step")
        kind, nbytes = parse_header(header, seq)
        seq += 1
        if kind is not Kind.COMPUTE:
            group.vote(False, f"{kind.name.lower()} vote")
            if kind is Kind.STOP:
                log.info("rank %d: stop after %d steps", group.rank, seq)
                return
            continue
        payload = group.broadcast_control(torch.empty(nbytes, dtype=torch.uint8), "payload")
        metas = decode_payload(payload.numpy().tobytes())
        blob = torch.empty(blob_nbytes(metas), dtype=torch.uint8, device=group.device)
        if blob.numel():
            group.broadcast_device(blob, "input tensors")
        items = [
            make_input(m.request_id, dict(m.scalars), t)
            for m, t in zip(metas, unpack_blob(blob, metas), strict=True)
        ]
        failed = False
        try:
            with group.watchdog.arm("compute", group.config.compute_timeout_s):
                adapter.run_batch(items)
        except Exception as exc:
            failed = True
            log.info("rank %d: step %d failed: %r", group.rank, seq - 1, exc)
        del items, blob
        n_failed = group.vote(failed, "step vote")
        if n_failed not in (0, group.world_size):
            raise LockstepError(f"ranks diverged: {n_failed} of {group.world_size} failed step {seq - 1}")
