"""One role worker's serving logic: arrivals into the scheduler, stage events, next hop, hand-over, result.

Life of a request here: it arrives (prefill: from the gateway's answer to our long-poll; denoise/decode:
a complete hand-over from the receiver, still in its staging slot), is submitted to the role's
`StageScheduler` (bounded ready-queue, loads prefetched while the previous batch computes, slot freed
after its load), computed through the role adapter, and leaves: decode posts the media to the gateway;
the other roles ask the gateway for the next hop (late binding) and hand the tensors over, asking for
another receiver while they still hold the tensors when one is busy or unreachable. The gateway is told
when a stage starts (so its queue depth is exact) and when a request fails here; cancels from the
gateway drop a request wherever it is: parked here before the scheduler (slot freed at once), queued in
the scheduler (dropped from its queue, slot freed), computing (its result is discarded), or held for the
next hop (the hand-over task is cancelled).

Admission: the receiver asks `admit` on every offer; while the scheduler has no room (counting the
hand-overs already reserved here) the answer is `busy` at once, no slot is taken, and the request stays
with the upstream worker, which the gateway counts as held upstream for our role (DESIGN.md, queue
depth). Should arrivals still outrun the scheduler (offers admitted together), the extra ones wait here
in their slots and are offered to the scheduler again.

Decode's media encoding (PNG / MP4, CPU only) runs on a small pool of encode threads (`--encode-threads`,
0 = inline on the compute thread), so the device decodes the next batch while the previous one is
encoded. A request being encoded (or waiting for an encode thread) still occupies this worker: `admit`
counts it and `load` reports it as in flight, so a worker whose encoder is slower than its device
answers busy instead of piling up decoded pixels in host memory. Encoding that fails fails that
request alone; one cancelled meanwhile is not posted.

Timings: each stage reports its `StageTiming` (queue wait here, compute seconds, batch size, and for the
outgoing hand-over its bytes, seconds, write seconds, wait for a receiver and attempts) with the
`handed` event, decode's with the result, and a failed stage's as far as it got.

Asyncio on the main thread for control; the scheduler's compute thread, the receiver's threads and a
small pool for the blocking sends run beside it, so transfers overlap compute.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from diffdisagg.worker.control.messages import (
    Heartbeat,
    HopRequest,
    Load,
    Poll,
    Register,
    ResultHeader,
    StageEvent,
    StageTiming,
)
from diffdisagg.worker.gateway_link import GatewayLink, GatewayUnavailable, Verdict
from diffdisagg.worker.handoff import Handoff, PeerBusy, PeerGone
from diffdisagg.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

#: Longest the gateway may hold one next-hop ask (long-poll), seconds.
HOP_WAIT_S = 2.0
#: Pause before asking again after the gateway said "no receiver yet".
RETRY_PAUSE_S = 0.05
#: How often arrivals that found the scheduler full are offered to it again (seconds).
PENDING_RETRY_S = 0.02


@dataclass
class Job:
    """What the runtime knows of a request while this worker holds it."""

    request_id: str
    attempt: int
    deadline: float
    key: str  # the scheduler's id for it: request id + attempt (a restart may land here twice)
    arrived: float = field(default_factory=time.monotonic)
    nbytes: int | None = None
    request: Any = None  # the scheduler's ReceivedRequest, until it is accepted
    started: asyncio.Task[Any] | None = None
    compute_at: float | None = None  # monotonic time its compute started (the scheduler's thread)
    compute_s: float | None = None
    encode_s: float | None = None  # decode, encoded on an encode thread: that encode alone
    batch_size: int | None = None

    def timing(self, role: str, **handover: Any) -> StageTiming:
        queue_s = None if self.compute_at is None else max(0.0, self.compute_at - self.arrived)
        return StageTiming(
            role=role,  # type: ignore[arg-type]
            queue_seconds=queue_s,
            compute_seconds=self.compute_s,
            encode_seconds=self.encode_s,
            batch_size=self.batch_size,
            **handover,
        )


def _meta(scalars: dict[str, Any], fallback_deadline: float) -> tuple[int, float]:
    meta = scalars.get("diffdisagg") or {}
    return int(meta.get("attempt", 1)), float(meta.get("deadline", fallback_deadline))


class WorkerRuntime:
    def __init__(
        self,
        settings: WorkerSettings,
        handoff: Handoff,
        link: GatewayLink,
        make_scheduler: Any,
        make_request: Any,
    ) -> None:
        """`make_scheduler(on_complete, tracer)` builds the role's StageScheduler; `make_request(**kw)`
        builds its ReceivedRequest (kept injectable so this module stays importable without torch)."""
        self.s = settings
        self.handoff = handoff
        self.link = link
        self._make_request = make_request
        self.scheduler = make_scheduler(self._on_complete_threadsafe, self._trace_threadsafe)
        self.jobs: dict[str, Job] = {}  # by scheduler key
        self.pending: deque[Job] = deque()  # arrived while the scheduler was full
        self.held: dict[str, asyncio.Task[None]] = {}  # key -> forwarding task (tensors held here)
        self.cancelled: dict[str, tuple[int, float]] = {}  # request id -> (void up to attempt, when)
        self._senders = ThreadPoolExecutor(4, thread_name_prefix=f"{settings.role}-send")
        # decode: media encoding off the compute thread (None: the adapter encodes inline)
        self._encoder: ThreadPoolExecutor | None = None
        if settings.role == "decode" and settings.encode_threads > 0:
            self._encoder = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="decode-encode")
        # Keys whose media is waiting for or being encoded: added on the compute thread as the batch
        # completes (before the scheduler stops counting it in flight), removed once the encode ended.
        self._encoding: set[str] = set()
        self._encoding_lock = threading.Lock()
        self._encodes: dict[str, concurrent.futures.Future[float]] = {}  # key -> its encode (loop only)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        # The gateway decides when a silent worker is dropped, so its interval wins over ours.
        self.heartbeat_interval_s = settings.heartbeat_interval_s

    # --- load -----------------------------------------------------------------------------------

    @property
    def encoding(self) -> int:
        """Decoded requests whose media is waiting for, or being, encoded (any thread)."""
        with self._encoding_lock:
            return len(self._encoding)

    def _encoded(self, key: str) -> None:
        with self._encoding_lock:
            self._encoding.discard(key)

    def load(self) -> Load:
        queued = self.scheduler.queue_depth + len(self.pending)
        inflight = self.scheduler.inflight + self.encoding  # encoding: still ours, not yet posted
        free = max(0, self.s.capacity - queued - inflight)
        if self.s.role != "prefill":
            free = min(free, self.handoff.free_slots())
        return Load(
            queued=queued,
            inflight=inflight,
            held=len(self.held),
            free_slots=free,
            capacity=self.s.capacity,
            slots_in_use=int(self.handoff.stats().get("live_slots", 0)),
        )

    def register_msg(self) -> Register:
        return Register(
            worker_id=self.s.worker_id,
            role=self.s.role,  # type: ignore[arg-type]
            deployment=self.s.deployment,
            revision=self.s.revision,
            family=self.s.family,
            control_url=self.s.control_url,
            handover=self.handoff.endpoint or {},
            load=self.load(),
        )

    # --- arrival --------------------------------------------------------------------------------

    def is_cancelled(self, request_id: str, attempt: int) -> bool:
        entry = self.cancelled.get(request_id)
        return entry is not None and attempt <= entry[0]

    def on_delivery_threadsafe(self, delivery: Any) -> None:
        """Called by the hand-over thread with a complete delivery (its slot is ours until released)."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.on_delivery, delivery)

    def on_delivery(self, d: Any) -> None:
        attempt, deadline = _meta(d.scalars, d.deadline)
        if self.is_cancelled(d.request_id, attempt):
            self.handoff.release(d)
            return
        key = f"{d.request_id}#{attempt}"
        req = self._make_request(
            request_id=key,
            scalars=dict(d.scalars),
            handle=d.handle,
            manifest=d.manifest,
            deadline=deadline,
            release=lambda ticket, d=d: self.handoff.release(d, ticket),
        )
        self._admit(Job(d.request_id, attempt, deadline, key, nbytes=d.nbytes, request=req))

    def on_submit(self, request_id: str, attempt: int, deadline: float, params: dict[str, Any]) -> None:
        if self.is_cancelled(request_id, attempt):
            return
        key = f"{request_id}#{attempt}"
        scalars = {"params": params, "diffdisagg": {"attempt": attempt, "deadline": deadline}}
        req = self._make_request(request_id=key, scalars=scalars, deadline=deadline)
        self._admit(Job(request_id, attempt, deadline, key, request=req))

    def admit(self, offer: Any) -> bool:
        """The receiver's question on every offer (its thread): reserve a slot, or answer busy now?

        Yes only while the scheduler has room for one more beside what is queued, computing, parked
        here, already reserved or complete in the receiver (offers admitted but not yet here), and
        (decode) decoded but not yet encoded.
        """
        if self._stopping or self.pending or not self.scheduler.has_capacity():
            return False
        busy = (
            self.scheduler.queue_depth + self.scheduler.inflight + self.handoff.in_transit() + self.encoding
        )
        return busy < self.s.capacity

    def _admit(self, job: Job) -> None:
        self.jobs[job.key] = job
        if self.pending or not self._try_submit(job):
            self.pending.append(job)

    def _try_submit(self, job: Job) -> bool:
        from_scheduler = type(self.scheduler).__module__
        try:
            self.scheduler.submit(job.request)
        except Exception as exc:
            if type(exc).__name__ == "QueueFullError":
                return False
            logger.warning(
                "%s: %s refused by the scheduler (%s): %r", self.s.role, job.key, from_scheduler, exc
            )
            self.jobs.pop(job.key, None)
            self._spawn(self._fail(job, "worker_error", f"{type(exc).__name__}: {exc}"))
            return True
        job.request = None
        return True

    async def pending_loop(self) -> None:
        """Offer arrivals that found the scheduler full to it again, oldest first."""
        while not self._stopping:
            while self.pending:
                job = self.pending[0]
                if self.is_cancelled(job.request_id, job.attempt) or job.deadline < time.time():
                    self.pending.popleft()
                    self.jobs.pop(job.key, None)
                    self._drop_unsubmitted(job)
                    continue
                if not self._try_submit(job):
                    break
                self.pending.popleft()
            await asyncio.sleep(PENDING_RETRY_S)

    def _drop_unsubmitted(self, job: Job) -> None:
        req = job.request
        if req is not None and getattr(req, "release", None) is not None:
            with contextlib.suppress(Exception):
                req.release(None)  # never loaded: nothing in flight on the slot
        if job.deadline < time.time() and not self.is_cancelled(job.request_id, job.attempt):
            self._spawn(self._fail(job, "deadline_exceeded", "deadline passed while queued"))

    def cancel(self, request_id: str, attempt: int, reason: str) -> None:
        prev = self.cancelled.get(request_id, (0, 0.0))[0]
        self.cancelled[request_id] = (max(prev, attempt), time.monotonic())
        # Parked before the scheduler: out of the line now, slot freed.
        for job in [j for j in self.pending if self.is_cancelled(j.request_id, j.attempt)]:
            self.pending.remove(job)
            self.jobs.pop(job.key, None)
            self._drop_unsubmitted(job)
        # In the scheduler: queued -> dropped (slot released through its hook), computing -> result
        # discarded. Either way it completes with RequestCancelledError, which _on_complete ignores.
        for key, job in list(self.jobs.items()):
            if (
                job.request is None
                and key not in self.held
                and self.is_cancelled(job.request_id, job.attempt)
            ):
                where = self.scheduler.cancel(key)
                if where is not None:
                    logger.info("%s: %s cancelled in the scheduler (%s)", self.s.role, key, where)
        for key, task in list(self.held.items()):
            job = self.jobs.get(key)
            if job is not None and self.is_cancelled(job.request_id, job.attempt):
                task.cancel()
        # Waiting for an encode thread: dropped (one already encoding finishes; it is not posted).
        for key, fut in list(self._encodes.items()):
            job = self.jobs.get(key)
            if job is not None and self.is_cancelled(job.request_id, job.attempt):
                fut.cancel()
        logger.info("%s: %s cancelled up to attempt %d (%s)", self.s.role, request_id, attempt, reason)

    # --- the scheduler's callbacks (its compute thread) -------------------------------------------

    def _trace_threadsafe(self, what: str, key: str) -> None:
        if what == "compute_start" and self.loop is not None:
            self.loop.call_soon_threadsafe(self._compute_started, key, time.monotonic())

    def _on_complete_threadsafe(self, completion: Any) -> None:
        assert self.loop is not None
        out = completion.output
        if (
            self.s.role == "decode"
            and completion.error is None
            and out is not None
            and out.media is None
            and getattr(out, "encode", None) is not None
        ):
            # Counted before the scheduler stops counting it in flight: admission never sees a gap.
            with self._encoding_lock:
                self._encoding.add(completion.request_id)
        self.loop.call_soon_threadsafe(self._on_complete, completion)

    def _compute_started(self, key: str, at: float) -> None:
        job = self.jobs.get(key)
        if job is not None and job.started is None:
            job.compute_at = at
            job.started = self._spawn(self._started(job))

    def _on_complete(self, c: Any) -> None:
        job = self.jobs.get(c.request_id)
        if job is None or self._stopping:  # stopping: the link is closing; the gateway notices us gone
            self._encoded(c.request_id)  # nothing will encode it
            return
        if self.is_cancelled(job.request_id, job.attempt):
            self.jobs.pop(job.key, None)
            self._encoded(c.request_id)
            return
        if c.compute_s:
            job.compute_s, job.batch_size = c.compute_s, c.batch_size
        if c.error is not None:
            self.jobs.pop(job.key, None)
            reason, param = _classify(c.error)
            logger.warning("%s: %s failed: %r", self.s.role, job.key, c.error)
            self._spawn(self._fail(job, reason, str(c.error), param, after=job.started))
            return
        if self.s.role == "decode":
            self._spawn(self._post_result(job, c.output, c.compute_s))
        else:
            self.held[job.key] = self._spawn(self._forward(job, c.output, c.compute_s))

    # --- events ---------------------------------------------------------------------------------

    async def _started(self, job: Job) -> None:
        await self._event(
            StageEvent(
                request_id=job.request_id,
                attempt=job.attempt,
                worker_id=self.s.worker_id,
                role=self.s.role,  # type: ignore[arg-type]
                event="started",
                queued_seconds=time.monotonic() - job.arrived,
            )
        )

    async def _fail(
        self, job: Job, reason: str, message: str, param: str | None = None, after: Any = None
    ) -> None:
        if after is not None:
            await after
        await self._event(
            StageEvent(
                request_id=job.request_id,
                attempt=job.attempt,
                worker_id=self.s.worker_id,
                role=self.s.role,  # type: ignore[arg-type]
                event="failed",
                reason=reason,
                message=message[:500],
                param=param,
                timing=job.timing(self.s.role),
            )
        )

    async def _event(self, msg: StageEvent) -> Verdict | None:
        try:
            verdict = await self.link.event(msg)
        except GatewayUnavailable as exc:
            logger.warning(
                "%s: event %s for %s not delivered: %s", self.s.role, msg.event, msg.request_id, exc
            )
            return None
        if verdict in (Verdict.GONE, Verdict.STALE):
            self.cancel(msg.request_id, msg.attempt, verdict.value)
        return verdict

    # --- leaving --------------------------------------------------------------------------------

    async def _post_result(self, job: Job, out: Any, seconds: float) -> None:
        try:
            if out.media is None and getattr(out, "encode", None) is not None:
                if self.is_cancelled(job.request_id, job.attempt):
                    return  # cancelled since it completed: not worth encoding
                try:
                    encode_s = await self._encode(job, out)
                except asyncio.CancelledError:
                    fut = self._encodes.get(job.key)
                    task = asyncio.current_task()
                    if fut is not None and fut.cancelled() and not (task and task.cancelling()):
                        return  # the request was cancelled before its encode started: dropped
                    raise
                except Exception as exc:  # this request fails; the worker keeps serving
                    logger.warning("decode: encoding the media of %s failed: %r", job.key, exc)
                    if not self.is_cancelled(job.request_id, job.attempt):
                        msg = f"media encoding failed: {type(exc).__name__}: {exc}"
                        await self._fail(job, "worker_error", msg, after=job.started)
                    return
                seconds = (seconds or 0.0) + encode_s
                job.compute_s = (job.compute_s or 0.0) + encode_s  # decode's compute: VAE + encoding
                job.encode_s = encode_s
                if self.is_cancelled(job.request_id, job.attempt):
                    return
            if job.started is not None:
                await job.started
            header = ResultHeader(
                request_id=job.request_id,
                attempt=job.attempt,
                worker_id=self.s.worker_id,
                media_type=out.media_type or "application/octet-stream",
                stage_seconds=seconds,
                scalars=_jsonable({k: v for k, v in out.scalars.items() if k != "params"}),
                timing=job.timing(self.s.role),
            )
            for _ in range(3):
                try:
                    await self.link.result(header, out.media or b"")
                    return
                except GatewayUnavailable as exc:
                    logger.warning("decode: result %s not delivered (%s); retrying", job.request_id, exc)
                    await asyncio.sleep(0.2)
        finally:
            if self._encodes.pop(job.key, None) is None:
                self._encoded(job.key)  # no encode was started for it (or none was needed)
            self.jobs.pop(job.key, None)

    async def _encode(self, job: Job, out: Any) -> float:
        """Encode `out`'s media on an encode thread; its seconds (the encode alone, not the wait for a
        thread). `encoding` stops counting it when the encode ends, or when a cancel dropped it unstarted.
        """

        def work() -> float:
            t0 = time.monotonic()
            out.finish_media()
            return time.monotonic() - t0

        if self._encoder is None:  # --encode-threads 0, yet the adapter deferred: never on the loop
            self._encoder = ThreadPoolExecutor(1, thread_name_prefix="decode-encode")
        fut = self._encoder.submit(work)
        self._encodes[job.key] = fut
        fut.add_done_callback(lambda _f, key=job.key: self._encoded(key))
        return await asyncio.wrap_future(fut)

    async def _forward(self, job: Job, out: Any, seconds: float) -> None:
        """Ask the next hop, hand over; busy/unreachable receivers -> ask again, until the deadline."""
        loop = asyncio.get_running_loop()
        failed: str | None = None
        failure: str | None = None
        first = True
        held_since = time.monotonic()  # compute ended (the completion reached us)
        attempts = 0
        scalars = _jsonable(dict(out.scalars))
        scalars["diffdisagg"] = {"attempt": job.attempt, "deadline": job.deadline}
        try:
            if job.started is not None:
                await job.started
            while True:
                if self.is_cancelled(job.request_id, job.attempt):
                    return
                left = job.deadline - time.time()
                if left <= 0:
                    await self._fail(job, "deadline_exceeded", "deadline passed while handing over")
                    return
                ask = HopRequest(
                    request_id=job.request_id,
                    attempt=job.attempt,
                    worker_id=self.s.worker_id,
                    from_role=self.s.role,  # type: ignore[arg-type]
                    stage_seconds=seconds if first else None,
                    failed_worker=failed,
                    failure=failure,  # type: ignore[arg-type]
                    wait_s=min(HOP_WAIT_S, max(0.0, left)),
                )
                try:
                    outcome = await self.link.hop(ask)
                except GatewayUnavailable as exc:
                    logger.warning("%s: next hop for %s: %s", self.s.role, job.request_id, exc)
                    await asyncio.sleep(RETRY_PAUSE_S * 4)
                    continue
                first = False
                if outcome.verdict in (Verdict.GONE, Verdict.STALE):
                    return
                if outcome.verdict is Verdict.RETRY or outcome.grant is None:
                    failed = failure = None
                    await asyncio.sleep(RETRY_PAUSE_S)
                    continue
                grant = outcome.grant
                attempts += 1
                send_at = time.monotonic()
                try:
                    sent = await loop.run_in_executor(
                        self._senders,
                        self.handoff.send,
                        grant.handover,
                        job.request_id,
                        out.tensors,
                        scalars,
                        job.deadline,
                    )
                except PeerBusy:
                    failed, failure = grant.worker_id, "busy"
                    continue
                except PeerGone as exc:
                    logger.warning(
                        "%s: receiver %s unreachable for %s: %s",
                        self.s.role,
                        grant.worker_id,
                        job.request_id,
                        exc,
                    )
                    failed, failure = grant.worker_id, "unavailable"
                    continue
                except Exception as exc:  # deadline, auth, protocol: this request fails, the worker lives
                    logger.warning("%s: hand-over of %s failed: %r", self.s.role, job.request_id, exc)
                    reason = "deadline_exceeded" if "Deadline" in type(exc).__name__ else "handover_failed"
                    await self._fail(job, reason, f"{type(exc).__name__}: {exc}")
                    return
                self._spawn(
                    self._event(
                        StageEvent(
                            request_id=job.request_id,
                            attempt=job.attempt,
                            worker_id=self.s.worker_id,
                            role=_next_role(self.s.role),  # type: ignore[arg-type]
                            event="handed",
                            transfer_bytes=sent.nbytes,
                            transfer_seconds=sent.seconds,
                            timing=job.timing(
                                self.s.role,
                                handover_bytes=sent.nbytes,
                                handover_seconds=sent.seconds,
                                handover_write_seconds=sent.write_seconds,
                                handover_wait_seconds=max(0.0, send_at - held_since),
                                handover_attempts=attempts,
                                to_worker=grant.worker_id,
                            ),
                        )
                    )
                )
                return
        finally:
            self.held.pop(job.key, None)
            self.jobs.pop(job.key, None)

    # --- lifecycle ------------------------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        while not self._stopping:
            try:
                reply = await self.link.heartbeat(Heartbeat(worker_id=self.s.worker_id, load=self.load()))
                self.heartbeat_interval_s = reply.heartbeat_interval_s
                if not reply.known:
                    logger.info("%s: the gateway dropped us (or restarted): registering again", self.s.role)
                    await self.link.register(self.register_msg())
            except GatewayUnavailable as exc:
                logger.warning("%s: heartbeat failed: %s", self.s.role, exc)
            self._prune_cancelled()
            await asyncio.sleep(self.heartbeat_interval_s)

    async def poll_loop(self) -> None:
        """Long-poll the gateway for new prefill requests and for cancels."""
        while not self._stopping:
            try:
                reply = await self.link.poll(Poll(worker_id=self.s.worker_id, wait_s=2.0))
            except GatewayUnavailable as exc:
                logger.warning("%s: poll failed: %s", self.s.role, exc)
                await asyncio.sleep(min(1.0, self.heartbeat_interval_s))
                continue
            if not reply.known:
                await asyncio.sleep(min(0.5, self.heartbeat_interval_s))  # the heartbeat re-registers
                continue
            for c in reply.cancels:
                self.cancel(c.request_id, c.attempt, c.reason)
            for sub in reply.submits:
                self.on_submit(sub.request_id, sub.attempt, sub.deadline, sub.params)

    async def register_until_done(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = await self.link.register(self.register_msg())
                self.heartbeat_interval_s = reply.heartbeat_interval_s
                logger.info("%s: registered with %s as %s", self.s.role, self.link.base_url, self.s.worker_id)
                return
            except GatewayUnavailable as exc:
                if time.monotonic() > deadline:
                    raise
                logger.info("%s: gateway not reachable yet (%s)", self.s.role, exc)
                await asyncio.sleep(0.2)

    def _prune_cancelled(self) -> None:
        cutoff = time.monotonic() - 600
        for rid in [r for r, (_, t) in self.cancelled.items() if t < cutoff]:
            del self.cancelled[rid]

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            self.scheduler.stop(timeout=5.0)
        for job in list(self.pending):
            self._drop_unsubmitted(job)
        self._senders.shutdown(wait=False, cancel_futures=True)
        if self._encoder is not None:  # a running encode is abandoned, not waited for
            self._encoder.shutdown(wait=False, cancel_futures=True)
        await self.link.close()


def _next_role(role: str) -> str:
    return {"prefill": "denoise", "denoise": "decode"}[role]


def _classify(exc: BaseException) -> tuple[str, str | None]:
    name = type(exc).__name__
    if name == "DeadlineExceededError":
        return "deadline_exceeded", None
    if name in ("ParamError", "StageError"):
        return "invalid_params", getattr(exc, "field", None)
    return "worker_error", None


def _jsonable(value: Any) -> Any:
    """Scalars must cross as JSON/msgpack: anything that is not plain data is dropped to its repr."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)
