"""Per-role dispatch: the request table, the gateway's queues, late binding of every hop, queue depth.

Every request is in exactly one place at a time, and the place says which role it waits for:

- `GATEWAY`  in the gateway's dispatch queue for `role` (no worker of that role had room yet);
- `UPSTREAM` finished the previous stage, held by the upstream worker because the receiver said busy
  or no receiver had room within the hop's long-poll (the upstream keeps the tensors and asks again);
- `WORKER`   assigned to a worker of `role` (submitted, or the hand-over is in progress / queued there)
  that has not started it;
- `RUNNING`  being computed by a worker of `role`.

`diffdisagg_queue_depth{role}` is the number of requests in the first three places for that role
(DESIGN.md, Queue depth), computed from this table at scrape time, so it is exact by construction.

Workers open no port for the gateway: each keeps one long-poll (`poll`) open, answered with new prefill
requests (for prefill workers) and cancels as soon as there are any (`Mailbox`).

Late binding: a prefill request goes to the least-loaded live prefill worker with room; when a
stage finishes, the worker asks `hop()` and gets the least-loaded live worker of the next role at that
moment. Load is the gateway's own count of requests it assigned to a worker (exact, no heartbeat lag),
bounded by the capacity the worker reported. Everything runs on the gateway's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffdisagg.worker.contract import ROLE_PREFILL, STAGE_ROLES
from diffdisagg.worker.control.messages import (
    Cancel,
    HopGrant,
    HopRequest,
    Poll,
    PollReply,
    ResultHeader,
    StageEvent,
    Submit,
)
from diffdisagg.worker.gateway.config import GatewayConfig
from diffdisagg.worker.gateway.errors import APIError
from diffdisagg.worker.gateway.registry import Registry, WorkerInfo
from diffdisagg.worker.gateway.timings import breakdown

logger = logging.getLogger(__name__)

#: How long a receiver that answered `busy` is skipped by dispatch (seconds).
BUSY_BACKOFF_S = 0.2
#: How long a receiver an upstream sender could not reach is skipped (seconds).
UNREACHABLE_BACKOFF_S = 1.0


class Where(enum.StrEnum):
    GATEWAY = "gateway"
    UPSTREAM = "upstream"
    WORKER = "worker"
    RUNNING = "running"


WAITING = (Where.GATEWAY, Where.UPSTREAM, Where.WORKER)


class StaleMessage(Exception):
    """A worker spoke about a request it no longer holds (old attempt, cancelled, finished)."""


class RequestGone(Exception):
    """The request was cancelled or failed: the worker must drop it and free what it holds."""


class NoReceiverYet(Exception):
    """No worker of the next role had room within the hop's long-poll; the upstream keeps holding."""


@dataclass
class Result:
    media: bytes
    media_type: str
    scalars: dict[str, Any]
    timings_ms: dict[str, float]
    timings: dict[str, Any] = field(default_factory=dict)  # gateway/timings.py: the segments


@dataclass
class Tracked:
    id: str
    params: dict[str, Any]
    deadline: float  # unix seconds
    role: str
    where: Where
    future: asyncio.Future[Result]
    attempt: int = 1
    holder: str | None = None  # worker assigned (WORKER) or computing (RUNNING)
    upstream: str | None = None  # worker holding the tensors while the hop waits
    marks: dict[str, float] = field(default_factory=dict)  # monotonic timestamps of transitions
    stage_s: dict[str, float] = field(default_factory=dict)
    transfer_s: dict[str, float] = field(default_factory=dict)
    transfer_bytes: dict[str, int] = field(default_factory=dict)  # by receiving role
    queued_s: dict[str, float] = field(default_factory=dict)  # worker-side queue wait, by role
    # each stage's own report (control.messages.StageTiming, by the role that did the work), when sent
    stage_timing: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0

    @property
    def done(self) -> bool:
        return self.future.done()


@dataclass
class _Item:
    request_id: str
    attempt: int
    waiter: asyncio.Future[HopGrant] | None = None  # None: a prefill submission
    exclude: set[str] = field(default_factory=set)


@dataclass
class Mailbox:
    """What the gateway has for one worker, delivered on its next (or current) poll."""

    submits: list[Submit] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    polling: int = 0  # polls waiting now (a prefill worker with no poll open gets no new request)


@dataclass
class Observers:
    """Metric hooks, so this module stays free of prometheus specifics."""

    stage: Callable[[str, float], None] = lambda role, s: None
    transfer: Callable[[str, int, float], None] = lambda role, nbytes, s: None
    error: Callable[[str], None] = lambda reason: None


class Dispatcher:
    def __init__(
        self,
        cfg: GatewayConfig,
        registry: Registry,
        observers: Observers | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.obs = observers or Observers()
        self.clock = clock
        self.requests: dict[str, Tracked] = {}
        self.queues: dict[str, deque[_Item]] = {r: deque() for r in STAGE_ROLES}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.mailboxes: dict[str, Mailbox] = {}

    # --- accounting -----------------------------------------------------------------------------

    def active(self) -> list[Tracked]:
        return [t for t in self.requests.values() if not t.done]

    def queue_depth(self, role: str) -> int:
        return sum(1 for t in self.active() if t.role == role and t.where in WAITING)

    def waiting_by_place(self, role: str) -> dict[str, int]:
        counts = {w.value: 0 for w in WAITING}
        for t in self.active():
            if t.role == role and t.where in WAITING:
                counts[t.where.value] += 1
        return counts

    def inflight(self, role: str) -> int:
        return sum(1 for t in self.active() if t.role == role and t.where is Where.RUNNING)

    def assigned(self, worker_id: str) -> int:
        return sum(1 for t in self.active() if t.holder == worker_id)

    def pending(self) -> int:
        return len(self.active())

    # --- client side ----------------------------------------------------------------------------

    def submit(self, params: dict[str, Any], timeout_s: float) -> Tracked:
        """Admit a request into the prefill queue; raises APIError 429/503 when it cannot be served."""
        if self.pending() >= self.cfg.limits.max_pending:
            raise APIError(
                429,
                f"too many requests in flight (limit {self.cfg.limits.max_pending}); retry later",
                code="rate_limit_exceeded",
                reason="overloaded",
                headers={"retry-after": "1"},
            )
        missing = [r for r in STAGE_ROLES if not self.registry.servable(r)]
        if missing:
            raise APIError(
                503,
                f"no live worker for role(s) {', '.join(missing)}; retry later",
                code="no_workers",
                reason="no_workers",
                headers={"retry-after": "1"},
            )
        rid = f"req-{uuid.uuid4().hex[:16]}"
        loop = asyncio.get_running_loop()
        t = Tracked(
            id=rid,
            params=params,
            deadline=time.time() + timeout_s,
            role=ROLE_PREFILL,
            where=Where.GATEWAY,
            future=loop.create_future(),
        )
        t.marks["submitted"] = self.clock()
        t.marks["prefill.wait"] = t.marks["submitted"]
        self.requests[rid] = t
        self.queues[ROLE_PREFILL].append(_Item(rid, t.attempt))
        self.pump()
        return t

    def cancel(self, rid: str, reason: str = "cancelled") -> None:
        """Client went away or asked to stop: tell every worker that holds a part of it."""
        t = self.requests.get(rid)
        if t is None or t.done:
            return
        self._finish_error(
            t, APIError(499, "request cancelled by the client", code="cancelled", reason=reason)
        )
        self.pump()  # its place is free for the next in line

    def forget(self, rid: str) -> None:
        t = self.requests.get(rid)
        if t is not None and t.done:
            del self.requests[rid]

    # --- worker side ----------------------------------------------------------------------------

    def _get(self, rid: str, attempt: int) -> Tracked:
        t = self.requests.get(rid)
        if t is None or t.done:
            raise RequestGone(rid)
        if t.attempt != attempt:
            raise StaleMessage(f"{rid}: attempt {attempt} superseded by {t.attempt}")
        return t

    async def hop(self, msg: HopRequest) -> HopGrant:
        """Late binding: the worker of `from_role` finished and asks where to hand the request over."""
        t = self._get(msg.request_id, msg.attempt)
        nxt = STAGE_ROLES[STAGE_ROLES.index(msg.from_role) + 1]
        now = self.clock()
        if t.role == msg.from_role:
            if t.holder != msg.worker_id:
                raise StaleMessage(f"{t.id}: held by {t.holder}, not {msg.worker_id}")
            if msg.stage_seconds is not None:
                t.stage_s[msg.from_role] = msg.stage_seconds
                self.obs.stage(msg.from_role, msg.stage_seconds)
            t.marks[f"{msg.from_role}.done"] = now
            t.marks[f"{nxt}.wait"] = now
            t.role, t.holder, t.upstream = nxt, None, msg.worker_id
        elif t.role != nxt or t.upstream != msg.worker_id:
            raise StaleMessage(f"{t.id}: at {t.role}/{t.where}, not a hop from {msg.from_role}")
        exclude: set[str] = set()
        if msg.failed_worker:
            exclude.add(msg.failed_worker)
            # Skip it for a while; whether it is dead is for its heartbeats to say (dropping it here would
            # restart everything it holds on one failed connection).
            backoff = BUSY_BACKOFF_S if msg.failure == "busy" else UNREACHABLE_BACKOFF_S
            self.registry.mark_busy(msg.failed_worker, backoff)
        # A re-ask after busy/timeout: the request is held upstream until the gateway finds a receiver.
        loop = asyncio.get_running_loop()
        item = _Item(t.id, t.attempt, waiter=loop.create_future(), exclude=exclude)
        t.where, t.holder = Where.GATEWAY, None
        self.queues[nxt].append(item)
        self.pump()
        budget = max(0.0, min(msg.wait_s, t.deadline - time.time()))
        assert item.waiter is not None
        try:
            return await asyncio.wait_for(asyncio.shield(item.waiter), timeout=budget)
        except TimeoutError:
            self._unqueue(nxt, item)
            if not t.done and t.attempt == item.attempt and t.where is Where.GATEWAY:
                t.where = Where.UPSTREAM
            if t.done:
                raise RequestGone(t.id) from None
            raise NoReceiverYet(t.id) from None

    def event(self, msg: StageEvent) -> None:
        t = self._get(msg.request_id, msg.attempt)
        timing = getattr(msg, "timing", None)  # optional (workers older than StageTiming send none)
        if timing is not None:
            t.stage_timing[timing.role] = timing
        if msg.event == "started":
            if t.role != msg.role or t.holder != msg.worker_id:
                raise StaleMessage(f"{t.id}: started by {msg.worker_id} but held by {t.holder}")
            t.where = Where.RUNNING
            t.marks[f"{msg.role}.start"] = self.clock()
            if msg.queued_seconds is not None:
                t.queued_s[msg.role] = msg.queued_seconds
        elif msg.event == "handed":
            # sent by the upstream worker: `role` is the receiving role, the time is offer -> ack
            if msg.transfer_seconds is not None:
                t.transfer_s[msg.role] = msg.transfer_seconds
                t.transfer_bytes[msg.role] = msg.transfer_bytes or 0
                self.obs.transfer(msg.role, msg.transfer_bytes or 0, msg.transfer_seconds)
        elif msg.event == "failed":
            status = {"invalid_params": 422, "deadline_exceeded": 504, "busy": 503}.get(msg.reason or "", 500)
            self._finish_error(
                t,
                APIError(
                    status,
                    f"{msg.role} failed: {msg.message or msg.reason}",
                    param=msg.param,
                    code=msg.reason or "worker_error",
                    reason=msg.reason or "worker_error",
                ),
            )
        elif msg.event == "dropped" and t.holder == msg.worker_id:
            self._restart_or_fail(t, f"dropped by {msg.worker_id}: {msg.message or msg.reason}")
        self.pump()

    def result(self, header: ResultHeader, media: bytes) -> None:
        t = self._get(header.request_id, header.attempt)
        if t.role != STAGE_ROLES[-1] or t.holder != header.worker_id:
            raise StaleMessage(f"{t.id}: result from {header.worker_id} but held by {t.holder}")
        now = self.clock()
        t.marks["decode.done"] = now
        t.stage_s["decode"] = header.stage_seconds
        timing = getattr(header, "timing", None)
        if timing is not None:
            t.stage_timing[timing.role] = timing
        self.obs.stage("decode", header.stage_seconds)
        timings = breakdown(
            marks=t.marks,
            stage_s=t.stage_s,
            transfer_s=t.transfer_s,
            transfer_bytes=t.transfer_bytes,
            queued_s=t.queued_s,
            restarts=t.restarts,
            stage_timing=t.stage_timing,
        )
        t.future.set_result(Result(media, header.media_type, header.scalars, self._timings(t), timings))
        self.pump()

    # --- the loop -------------------------------------------------------------------------------

    def _pick(self, role: str, exclude: set[str]) -> WorkerInfo | None:
        now = self.registry.clock()
        best, best_load = None, None
        for w in self.registry.live(role):
            if w.worker_id in exclude or w.busy_until > now or w.revision != self.cfg.revision:
                continue
            if role == ROLE_PREFILL and not self._mailbox(w.worker_id).polling:
                continue
            load = self.assigned(w.worker_id)
            if load >= w.load.capacity:
                continue
            if best_load is None or load < best_load:
                best, best_load = w, load
        return best

    def pump(self) -> None:
        """Hand every queued item for which a worker has room to the least-loaded such worker."""
        for role, queue in self.queues.items():
            blocked: list[_Item] = []
            while queue:
                item = queue.popleft()
                t = self.requests.get(item.request_id)
                if t is None or t.done or t.attempt != item.attempt:
                    continue
                if item.waiter is not None and item.waiter.done():
                    continue
                w = self._pick(role, item.exclude)
                if w is None:
                    blocked.append(item)
                    if not item.exclude:
                        break  # nobody has room: later items (FIFO) wait too
                    continue
                t.where, t.holder = Where.WORKER, w.worker_id
                if item.waiter is None:
                    box = self._mailbox(w.worker_id)
                    box.submits.append(
                        Submit(
                            request_id=t.id,
                            attempt=t.attempt,
                            deadline=t.deadline,
                            revision=self.cfg.revision,
                            params=t.params,
                        )
                    )
                    box.wake.set()
                else:
                    item.waiter.set_result(
                        HopGrant(
                            worker_id=w.worker_id,
                            control_url=w.control_url,
                            handover=w.handover,
                            deadline=t.deadline,
                        )
                    )
            queue.extendleft(reversed(blocked))

    def _unqueue(self, role: str, item: _Item) -> None:
        try:
            self.queues[role].remove(item)
        except ValueError:
            pass

    def _mailbox(self, worker_id: str) -> Mailbox:
        box = self.mailboxes.get(worker_id)
        if box is None:
            box = self.mailboxes[worker_id] = Mailbox()
        return box

    async def poll(self, msg: Poll) -> PollReply:
        """A worker's long-poll: new prefill requests assigned to it, and cancels, as soon as any exist."""
        if self.registry.get(msg.worker_id) is None or not self.registry.get(msg.worker_id).live:  # type: ignore[union-attr]
            return PollReply(known=False)
        box = self._mailbox(msg.worker_id)
        box.polling += 1
        try:
            self.pump()
            if not (box.submits or box.cancels):
                box.wake.clear()
                try:
                    await asyncio.wait_for(box.wake.wait(), timeout=msg.wait_s)
                except TimeoutError:
                    pass
        finally:
            box.polling -= 1
        submits, cancels = box.submits, box.cancels
        box.submits, box.cancels = [], []
        # A submit whose request finished meanwhile (cancelled, deadline) is dropped here, not sent.
        live = [s for s in submits if (t := self.requests.get(s.request_id)) is not None and not t.done]
        return PollReply(known=True, submits=live, cancels=cancels)

    def tick(self) -> None:
        """Periodic: drop silent workers, fail requests past their deadline, retry blocked queues."""
        for w in self.registry.expire():
            self._requests_lost_with(w.worker_id)
        now = time.time()
        for t in self.active():
            if now > t.deadline:
                self._finish_error(
                    t,
                    APIError(
                        504,
                        f"request {t.id} exceeded its deadline at stage {t.role}",
                        code="deadline_exceeded",
                        reason="deadline_exceeded",
                    ),
                )
        self.pump()

    def _requests_lost_with(self, worker_id: str) -> None:
        for t in self.active():
            if t.holder == worker_id or (
                t.upstream == worker_id and t.where in (Where.GATEWAY, Where.UPSTREAM)
            ):
                self._restart_or_fail(t, f"worker {worker_id} lost")

    def _restart_or_fail(self, t: Tracked, why: str) -> None:
        old_holders = {t.holder, t.upstream} - {None}
        if t.attempt < self.cfg.max_attempts and time.time() < t.deadline:
            logger.warning(
                "request %s: %s at %s; restarting from prefill (attempt %d)", t.id, why, t.role, t.attempt + 1
            )
            for wid in old_holders:
                self._notify_cancel(wid, t.id, t.attempt, "restarted")
            t.attempt += 1
            t.restarts += 1
            t.role, t.where, t.holder, t.upstream = ROLE_PREFILL, Where.GATEWAY, None, None
            t.marks["prefill.wait"] = self.clock()
            self.queues[ROLE_PREFILL].append(_Item(t.id, t.attempt))
        else:
            self._finish_error(
                t, APIError(503, f"request {t.id} failed: {why}", code="worker_lost", reason="worker_lost")
            )

    def _finish_error(self, t: Tracked, err: APIError) -> None:
        if t.done:
            return
        for wid in {t.holder, t.upstream} - {None}:
            self._notify_cancel(wid, t.id, t.attempt, err.reason)
        err.counted = True
        self.obs.error(err.reason)
        t.future.set_exception(err)
        t.future.exception()  # mark retrieved: a waiter that went away must not log "never retrieved"
        for q in self.queues.values():
            for item in [i for i in q if i.request_id == t.id]:
                q.remove(item)
                if item.waiter is not None and not item.waiter.done():
                    item.waiter.set_exception(RequestGone(t.id))
                    item.waiter.exception()

    def _notify_cancel(self, worker_id: str, rid: str, attempt: int, reason: str) -> None:
        box = self._mailbox(worker_id)
        box.submits = [s for s in box.submits if not (s.request_id == rid and s.attempt <= attempt)]
        box.cancels.append(Cancel(request_id=rid, attempt=attempt, reason=reason))
        box.wake.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _timings(self, t: Tracked) -> dict[str, float]:
        m = t.marks
        out: dict[str, float] = {}
        if "submitted" in m and "decode.done" in m:
            out["total_ms"] = (m["decode.done"] - m["submitted"]) * 1e3
        for role, secs in t.stage_s.items():
            out[f"{role}_ms"] = secs * 1e3
        for a, b in itertools.pairwise(STAGE_ROLES):
            if f"{a}.done" in m and f"{b}.start" in m:
                # from "stage done" to "next stage started": next-hop ask + hand-over + receiver queue
                out[f"hop_{a}_{b}_ms"] = (m[f"{b}.start"] - m[f"{a}.done"]) * 1e3
            if b in t.transfer_s:
                out[f"transfer_{a}_{b}_ms"] = t.transfer_s[b] * 1e3
        if "prefill.start" in m:
            out["queue_prefill_ms"] = (m["prefill.start"] - m["prefill.wait"]) * 1e3
        out["restarts"] = float(t.restarts)
        return out

    def progress(self, t: Tracked) -> int:
        if t.future.done():
            return 100
        base = {"prefill": 0, "denoise": 10, "decode": 90}[t.role]
        return base + (5 if t.where is Where.RUNNING else 0)

    async def close(self) -> None:
        for t in self.active():
            self._finish_error(t, APIError(503, "gateway shutting down", code="shutdown", reason="shutdown"))
        for task in list(self._tasks):
            task.cancel()
