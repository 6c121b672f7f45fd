"""The receiving side of a hand-over: answers offers, owns the slots, hands complete payloads to the worker.

A `HandoverReceiver` runs a small threaded TCP server (the control port) next to the backend's data
plane. Per offer it asks the worker's `admit` callback (if any: False = `Busy` at once, nothing reserved,
so a worker whose queue is full turns work away before it takes a slot), then reserves a slot in the
worker's staging buffer or answers `Busy` at once when the buffer is full; the sender
then writes into the slot through the backend and sends `Pushed(manifest)`; the receiver checks that
every byte landed (where the backend can tell) and that the manifest fits the slot, then queues a
`Delivery`. The worker takes deliveries with `receive()`, loads them (`load` / `load_async`) and
releases the slot.

Slot life cycle (one lock guards it; a reaper thread enforces the deadlines):

    RESERVED --Pushed ok--> PUSHED --receive()--> CLAIMED --release()--> free
       |                      |
       +-- Cancel / connection lost / lease expired / bad Pushed --> retire --> free
                              +-- request deadline passed unclaimed --> free

Retiring a RESERVED slot first asks the backend to `quiesce` the range (abort writes in flight, so no
late byte can land in the next tenant's data); a backend that cannot (Mooncake's one-sided writes) makes
the receiver hold the slot back for `late_write_window_s` before freeing it. A slot that was not
`Pushed` in full is never handed to the worker. CLAIMED slots belong to the worker until `release`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from diffdisagg.transport.allocator import SlotHandle
from diffdisagg.transport.backends.base import Backend
from diffdisagg.transport.codec import Manifest
from diffdisagg.transport.errors import (
    AuthenticationError,
    BufferFullError,
    CodecError,
    DeadlineExceededError,
    HandoverError,
    InvalidSizeError,
    PeerUnavailableError,
    ProtocolError,
    TransferError,
)
from diffdisagg.transport.handover import messages as m
from diffdisagg.transport.handover.auth import ReplayGuard, check_token
from diffdisagg.transport.handover.wire import DEFAULT_MAX_FRAME, FrameTooLarge, read_message, write_message

if TYPE_CHECKING:
    import torch

    from diffdisagg.transport.allocator import SlotAllocator

__all__ = ["Admit", "Delivery", "HandoverReceiver", "ReceiverConfig", "SlotBuffer"]

log = logging.getLogger(__name__)

_NO_NONCE = bytes(m.NONCE_BYTES)


class SlotBuffer(Protocol):
    """What the receiver needs from the staging buffer (StagingBuffer satisfies it)."""

    @property
    def nbytes(self) -> int: ...
    @property
    def allocator(self) -> SlotAllocator: ...
    def allocate(self, nbytes: int) -> SlotHandle: ...
    def free(self, handle: SlotHandle) -> None: ...
    def memoryview(self, handle: SlotHandle) -> memoryview: ...


@dataclass(frozen=True)
class ReceiverConfig:
    token: bytes
    """Shared inter-role token (load it with handover.auth.load_token)."""
    revision: str
    """Deployment revision; offers from another revision are refused."""
    host: str = "127.0.0.1"
    """Control listener bind address (0.0.0.0 in a pod)."""
    port: int = 0
    """Control port (DIFFDISAGG_CONTROL_PORT, 8100 in a pod; 0 = ephemeral)."""
    advertise_host: str | None = None
    """Address peers dial (the pod IP); defaults to `host`."""
    name: str = "receiver"
    max_lease_s: float = 60.0
    """Longest a reservation may wait for its Pushed, whatever the offer's deadline says."""
    max_deadline_horizon_s: float = 3600.0
    clock_skew_s: float = 2.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME
    io_timeout_s: float = 5.0
    """Limit for sending one reply (a sender that stops reading loses its reservation)."""
    idle_timeout_s: float = 300.0
    """An idle control connection is closed after this long."""
    quiesce_timeout_s: float = 2.0
    reap_interval_s: float = 0.05

    def __post_init__(self) -> None:
        check_token(self.token)
        if not self.revision:
            raise HandoverError("receiver needs a deployment revision")


class _State(Enum):
    RESERVED = "reserved"
    PUSHED = "pushed"
    CLAIMED = "claimed"
    RETIRING = "retiring"
    FREED = "freed"


@dataclass(eq=False)
class _Reservation:
    handle: SlotHandle
    request_id: str
    sender: str
    tag: bytes
    deadline: float
    lease_deadline: float
    conn_id: int
    state: _State = _State.RESERVED
    manifest: Manifest | None = None
    nbytes: int = 0
    reserved_at: float = field(default_factory=time.time)


@dataclass(frozen=True, eq=False)
class Delivery:
    """A complete hand-over waiting in (or taken from) the receiver: its slot holds every byte."""

    request_id: str
    manifest: Manifest
    handle: SlotHandle
    nbytes: int
    deadline: float
    sender: str
    _tag: bytes

    @property
    def scalars(self) -> dict[str, Any]:
        return self.manifest.scalars


#: Asked on every authenticated, well-formed offer before a slot is reserved (on a connection thread,
#: without the receiver's lock held): True = go on, False = answer `Busy` now. Keep it fast.
Admit = Callable[[m.Offer], bool]


class HandoverReceiver:
    """Control server + slot owner. `start()` it, then loop on `receive()`; `close()` when done."""

    def __init__(
        self,
        buffer: SlotBuffer,
        backend: Backend,
        config: ReceiverConfig,
        manager: Any = None,
        *,
        admit: Admit | None = None,
    ):
        self._buffer = buffer
        self._admit = admit
        self._backend = backend
        self._cfg = config
        self._manager = manager
        self._replay = ReplayGuard(config.max_deadline_horizon_s, config.clock_skew_s)
        self._lock = threading.Condition()
        self._by_tag: dict[bytes, _Reservation] = {}
        self._by_request: dict[str, _Reservation] = {}
        self._ready: collections.deque[_Reservation] = collections.deque()
        self._quarantine: list[tuple[float, _Reservation]] = []
        self._conns: dict[int, socket.socket] = {}
        self._conn_ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.counters: collections.Counter[str] = collections.Counter()
        backend.set_write_guard(self._write_guard)

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> HandoverReceiver:
        lsock = socket.create_server((self._cfg.host, self._cfg.port), backlog=128)
        lsock.settimeout(0.25)
        self._listener = lsock
        for target, name in ((self._accept_loop, "handover-accept"), (self._reap_loop, "handover-reaper")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("hand-over receiver %s listening on %s:%d", self._cfg.name, *self.address)
        return self

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) that senders dial."""
        if self._listener is None:
            raise HandoverError("receiver not started")
        return (self._cfg.advertise_host or self._cfg.host, self._listener.getsockname()[1])

    def close(self) -> None:
        """Stop accepting, drop connections, free every slot not claimed by the worker."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns.values())
            pending = [r for r in self._by_tag.values() if r.state in (_State.RESERVED, _State.PUSHED)]
            self._lock.notify_all()
        for conn in conns:
            _shutdown(conn)
        for res in pending:
            self._retire(res, "receiver closing", wait_quarantine=True)
        for t in self._threads:
            t.join(timeout=2.0)
        with self._lock:
            quarantined, self._quarantine = self._quarantine, []
        for _, res in quarantined:
            self._free(res)
        self._backend.set_write_guard(None)

    def set_admit(self, admit: Admit | None) -> None:
        """Install (or remove, with None) the admission callback; takes effect with the next offer."""
        self._admit = admit

    def __enter__(self) -> HandoverReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- worker-facing

    def receive(self, timeout: float | None = None) -> Delivery | None:
        """The next complete hand-over (now CLAIMED: the caller must `release` it), or None on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                while self._ready:
                    res = self._ready.popleft()
                    if res.state is _State.PUSHED:
                        res.state = _State.CLAIMED
                        self.counters["claimed"] += 1
                        assert res.manifest is not None
                        return Delivery(
                            res.request_id,
                            res.manifest,
                            res.handle,
                            res.nbytes,
                            res.deadline,
                            res.sender,
                            res.tag,
                        )
                if self._closed.is_set():
                    return None
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._lock.wait(timeout=left)

    def view(self, delivery: Delivery) -> memoryview:
        """The delivered bytes (host staging only), valid until `release`."""
        self._claimed(delivery)
        return self._buffer.memoryview(delivery.handle)[: delivery.nbytes]

    def load(self, delivery: Delivery, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Copy the tensors to `device` (through the TransferManager when given), then release the slot."""
        self._claimed(delivery)
        try:
            if self._manager is not None:
                tensors = self._manager.load(delivery.handle, delivery.manifest, device)
            else:
                from diffdisagg.transport.codec import read_tensors

                tensors = read_tensors(delivery.manifest, self.view(delivery))
                if device is not None:
                    tensors = {k: v.to(device) for k, v in tensors.items()}
        finally:
            self.release(delivery)
        return tensors

    def load_async(self, delivery: Delivery, device: torch.device | str | None = None) -> tuple[Any, Any]:
        """Issue the load on the transfer stream; `release(delivery, ticket)` once `ticket.done()`."""
        if self._manager is None:
            raise HandoverError("load_async needs a TransferManager")
        self._claimed(delivery)
        return self._manager.load_async(delivery.handle, delivery.manifest, device)

    def release(self, delivery: Delivery, ticket: Any = None) -> None:
        """Free a claimed slot (after its load completed; the manager refuses earlier). Idempotent."""
        with self._lock:
            res = self._by_tag.get(delivery._tag)
            if res is None or res.state is not _State.CLAIMED:
                return
        if self._manager is not None:
            self._manager.release(res.handle, ticket)  # raises (slot kept) while a copy is pending
            self._forget(res, freed=True)
        else:
            self._free(res)
        self.counters["released"] += 1

    def stats(self) -> dict[str, Any]:
        """Accounting for metrics and leak checks."""
        a = self._buffer.allocator
        with self._lock:
            states = collections.Counter(r.state.value for r in self._by_tag.values())
            return {
                "capacity": a.capacity,
                "used_bytes": a.used_bytes,
                "live_slots": a.live_slots,
                "free_bytes": a.free_bytes,
                "reserved": states["reserved"],
                "pushed": states["pushed"],
                "claimed": states["claimed"],
                "retiring": states["retiring"],
                "quarantined": len(self._quarantine),
                "connections": len(self._conns),
                "counters": dict(self.counters),
            }

    def _claimed(self, delivery: Delivery) -> None:
        with self._lock:
            res = self._by_tag.get(delivery._tag)
            if res is None or res.state is not _State.CLAIMED:
                raise HandoverError(f"delivery for {delivery.request_id} is no longer claimed (released?)")

    # ------------------------------------------------------------------------------ data-plane guard

    def _write_guard(self, tag: bytes, offset: int, nbytes: int) -> bool:
        with self._lock:
            res = self._by_tag.get(tag)
            return (
                res is not None
                and res.state is _State.RESERVED
                and time.time() <= res.lease_deadline
                and res.handle.offset <= offset
                and offset + nbytes <= res.handle.offset + res.handle.nbytes
            )

    # --------------------------------------------------------------------------------- control plane

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                conn, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn_id = next(self._conn_ids)
            with self._lock:
                self._conns[conn_id] = conn
            t = threading.Thread(
                target=self._serve, args=(conn, addr, conn_id), name="handover-conn", daemon=True
            )
            t.start()

    def _serve(self, conn: socket.socket, addr: Any, conn_id: int) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        why = "closed by peer"
        try:
            while not self._closed.is_set():
                try:
                    msg = read_message(
                        conn,
                        self._cfg.token,
                        time.time() + self._cfg.idle_timeout_s,
                        self._cfg.max_frame_bytes,
                    )
                except (PeerUnavailableError, TransferError) as exc:
                    why = f"connection lost: {exc}"
                    return
                except FrameTooLarge as exc:
                    self._reject(conn, None, m.NackReason.TOO_LARGE, str(exc), addr)
                    why = "oversized frame"
                    return
                except AuthenticationError as exc:
                    self._reject(conn, None, m.NackReason.AUTH, str(exc), addr)
                    why = "unauthenticated message"
                    return
                except ProtocolError as exc:
                    self._reject(conn, None, m.NackReason.PROTOCOL, str(exc), addr)
                    why = "malformed message"
                    return
                if not self._dispatch(conn, conn_id, msg, addr):
                    why = "protocol violation"
                    return
        finally:
            with self._lock:
                self._conns.pop(conn_id, None)
                orphans = [
                    r for r in self._by_tag.values() if r.conn_id == conn_id and r.state is _State.RESERVED
                ]
            conn.close()
            for res in orphans:
                self._retire(res, f"sender connection ended ({why})")

    def _dispatch(self, conn: socket.socket, conn_id: int, msg: m.Message, addr: Any) -> bool:
        """Handle one authenticated message; False closes the connection."""
        try:
            self._replay.check(msg.nonce, msg.deadline)
        except DeadlineExceededError as exc:
            return self._reply_nack(conn, msg, m.NackReason.DEADLINE, str(exc), addr, keep=True)
        except AuthenticationError as exc:
            return self._reply_nack(conn, msg, m.NackReason.REPLAY, str(exc), addr, keep=False)
        except ProtocolError as exc:
            return self._reply_nack(conn, msg, m.NackReason.PROTOCOL, str(exc), addr, keep=False)
        if msg.revision != self._cfg.revision:
            self.counters["rejected_revision"] += 1
            return self._reply_nack(
                conn,
                msg,
                m.NackReason.REVISION,
                f"receiver runs revision {self._cfg.revision!r}, not {msg.revision!r}",
                addr,
                keep=True,
            )
        if isinstance(msg, m.Offer):
            return self._on_offer(conn, conn_id, msg, addr)
        if isinstance(msg, m.Pushed):
            return self._on_pushed(conn, conn_id, msg, addr)
        if isinstance(msg, m.Cancel):
            return self._on_cancel(conn, conn_id, msg)
        return self._reply_nack(
            conn, msg, m.NackReason.PROTOCOL, f"a receiver does not take {msg.TYPE}", addr, keep=False
        )

    def _on_offer(self, conn: socket.socket, conn_id: int, msg: m.Offer, addr: Any) -> bool:
        self.counters["offers"] += 1
        if msg.nbytes <= 0 or sum(msg.sizes) > msg.nbytes:
            return self._reply_nack(
                conn,
                msg,
                m.NackReason.PROTOCOL,
                f"offer of {msg.nbytes} B inconsistent with sizes",
                addr,
                keep=False,
            )
        if msg.nbytes > self._buffer.nbytes:
            self.counters["too_large"] += 1
            return self._reply_nack(
                conn,
                msg,
                m.NackReason.TOO_LARGE,
                f"{msg.nbytes} B exceeds this receiver's {self._buffer.nbytes} B buffer",
                addr,
                keep=True,
            )
        if not self._admitted(msg):
            a = self._buffer.allocator
            self.counters["busy"] += 1
            self.counters["busy_not_admitted"] += 1
            return self._send(
                conn,
                m.Busy(
                    **self._envelope(msg),
                    free_bytes=a.free_bytes,
                    largest_free_block=a.largest_free_block,
                ),
            )
        now = time.time()
        reply: m.Message | None = None
        nack: tuple[m.NackReason, str, bool] = (m.NackReason.CLOSING, "receiver closing", False)
        with self._lock:
            if self._closed.is_set():
                pass
            elif msg.request_id in self._by_request:
                nack = (m.NackReason.DUPLICATE, f"request {msg.request_id} already holds a slot here", True)
            else:
                try:
                    handle = self._buffer.allocate(msg.nbytes)
                except BufferFullError:
                    a = self._buffer.allocator
                    self.counters["busy"] += 1
                    reply = m.Busy(
                        **self._envelope(msg),
                        free_bytes=a.free_bytes,
                        largest_free_block=a.largest_free_block,
                    )
                except InvalidSizeError as exc:
                    nack = (m.NackReason.TOO_LARGE, str(exc), True)
                else:
                    res = _Reservation(
                        handle=handle,
                        request_id=msg.request_id,
                        sender=msg.sender,
                        tag=os.urandom(m.TAG_BYTES),
                        deadline=msg.deadline,
                        lease_deadline=min(msg.deadline, now + self._cfg.max_lease_s),
                        conn_id=conn_id,
                    )
                    self._by_tag[res.tag] = res
                    self._by_request[res.request_id] = res
                    self.counters["reserved"] += 1
                    reply = m.Reserved(
                        **self._envelope(msg),
                        slot_id=handle.slot_id,
                        generation=handle.generation,
                        offset=handle.offset,
                        nbytes=handle.nbytes,
                        tag=res.tag,
                        lease_deadline=res.lease_deadline,
                        endpoint=self._backend.endpoint,
                    )
        if reply is None:
            return self._reply_nack(conn, msg, nack[0], nack[1], addr, keep=nack[2])
        return self._send(conn, reply)

    def _admitted(self, msg: m.Offer) -> bool:
        """The worker's admission verdict; a callback that fails counts as "no" (busy: nothing lost)."""
        admit = self._admit
        if admit is None or self._closed.is_set():
            return True  # closing: the reservation path answers Nack(closing)
        try:
            return bool(admit(msg))
        except Exception:
            log.exception("admission callback failed for %s; answering busy", msg.request_id)
            return False

    def _on_pushed(self, conn: socket.socket, conn_id: int, msg: m.Pushed, addr: Any) -> bool:
        with self._lock:
            res = self._by_tag.get(msg.tag)
            known = (
                res is not None
                and res.request_id == msg.request_id
                and res.conn_id == conn_id
                and res.handle.slot_id == msg.slot_id
                and res.handle.generation == msg.generation
            )
            state = res.state if res is not None else None
        if not known or res is None:
            return self._reply_nack(
                conn, msg, m.NackReason.PROTOCOL, "pushed names no reservation of ours", addr, keep=False
            )
        if state is not _State.RESERVED:
            return self._reply_nack(
                conn,
                msg,
                m.NackReason.DEADLINE,
                f"reservation is {state.value if state else 'gone'}",
                addr,
                keep=True,
            )
        problem: tuple[m.NackReason, str] | None = None
        if time.time() > res.lease_deadline:
            problem = (m.NackReason.DEADLINE, "reservation lease expired before pushed")
        elif not 0 < msg.nbytes <= res.handle.nbytes:
            problem = (m.NackReason.PROTOCOL, f"pushed {msg.nbytes} B into a {res.handle.nbytes} B slot")
        else:
            landed = self._backend.landed(res.tag)
            if landed is not None and landed != msg.nbytes:
                problem = (m.NackReason.INCOMPLETE, f"{landed} of {msg.nbytes} B landed")
        manifest = None
        if problem is None:
            try:
                manifest = Manifest.from_dict(msg.manifest, slot_nbytes=msg.nbytes)
            except CodecError as exc:
                problem = (m.NackReason.MANIFEST, str(exc))
        if problem is not None:
            self._retire(res, f"bad pushed: {problem[1]}")
            return self._reply_nack(conn, msg, problem[0], problem[1], addr, keep=True)
        with self._lock:
            if res.state is not _State.RESERVED:  # the reaper retired it meanwhile
                ok = False
            else:
                res.state, res.manifest, res.nbytes = _State.PUSHED, manifest, msg.nbytes
                self._ready.append(res)
                self.counters["pushed"] += 1
                self._lock.notify_all()
                ok = True
        if not ok:
            return self._reply_nack(conn, msg, m.NackReason.DEADLINE, "reservation expired", addr, keep=True)
        return self._send(
            conn,
            m.Ack(
                **self._envelope(msg),
            ),
        )

    def _on_cancel(self, conn: socket.socket, conn_id: int, msg: m.Cancel) -> bool:
        with self._lock:
            res = self._by_tag.get(msg.tag)
            mine = res is not None and res.request_id == msg.request_id and res.conn_id == conn_id
        if mine and res is not None:
            self.counters["cancelled"] += 1
            self._retire(res, f"cancelled by sender: {msg.reason}")
        return self._send(
            conn,
            m.Ack(
                request_id=msg.request_id,
                revision=self._cfg.revision,
                deadline=max(msg.deadline, time.time() + 1),
                nonce=os.urandom(16),
                seq=next(self._seq),
                in_reply_to=msg.nonce,
            ),
        )

    # ------------------------------------------------------------------------------------ replies

    def _envelope(self, msg: m.Message, deadline: float | None = None) -> dict[str, Any]:
        """The fields every reply carries: it answers `msg` (same request, its nonce) under our revision."""
        return {
            "request_id": msg.request_id,
            "revision": self._cfg.revision,
            "deadline": msg.deadline if deadline is None else deadline,
            "nonce": os.urandom(m.NONCE_BYTES),
            "seq": next(self._seq),
            "in_reply_to": msg.nonce,
        }

    def _send(self, conn: socket.socket, reply: m.Message) -> bool:
        try:
            write_message(conn, self._cfg.token, reply, time.time() + self._cfg.io_timeout_s)
            return True
        except TransferError as exc:
            log.info("hand-over reply %s for %s not delivered: %s", reply.TYPE, reply.request_id, exc)
            return False

    def _reply_nack(
        self, conn: socket.socket, msg: m.Message, reason: m.NackReason, detail: str, addr: Any, keep: bool
    ) -> bool:
        self.counters[f"nack_{reason.value}"] += 1
        log.warning(
            "hand-over %s for request %s from %s refused (%s): %s",
            msg.TYPE,
            msg.request_id,
            addr,
            reason.value,
            detail,
        )
        sent = self._send(
            conn,
            m.Nack(
                **self._envelope(msg, deadline=max(msg.deadline, time.time() + self._cfg.io_timeout_s)),
                reason=reason.value,
                detail=detail[:512],
            ),
        )
        return sent and keep

    def _reject(self, conn: socket.socket, msg: None, reason: m.NackReason, detail: str, addr: Any) -> None:
        """Refuse a frame we could not (or must not) parse; then the connection is closed."""
        self.counters[f"rejected_{reason.value}"] += 1
        log.warning("hand-over frame from %s rejected (%s): %s", addr, reason.value, detail)
        self._send(
            conn,
            m.Nack(
                request_id="",
                revision=self._cfg.revision,
                deadline=time.time() + self._cfg.io_timeout_s,
                nonce=os.urandom(16),
                seq=next(self._seq),
                in_reply_to=_NO_NONCE,
                reason=reason.value,
                detail=detail[:512],
            ),
        )

    # --------------------------------------------------------------------------- retiring and reaping

    def _retire(self, res: _Reservation, why: str, wait_quarantine: bool = False) -> None:
        """Take a slot away from its request (never delivered after this) and free it safely."""
        with self._lock:
            prev = res.state
            if prev not in (_State.RESERVED, _State.PUSHED):
                return
            res.state = _State.RETIRING
            self._lock.notify_all()
        log.info(
            "hand-over slot %d of request %s retired (%s): %s",
            res.handle.slot_id,
            res.request_id,
            prev.value,
            why,
        )
        self.counters["retired"] += 1
        if prev is _State.PUSHED:  # every byte had landed; nothing can still be writing
            self._free(res)
            return
        if self._backend.quiesce(res.handle.offset, res.handle.nbytes, self._cfg.quiesce_timeout_s):
            self._free(res)
            return
        window = self._backend.late_write_window_s(res.handle.nbytes)
        if wait_quarantine:
            self._free(res)  # shutting down: the region goes away with us
            return
        with self._lock:
            self._quarantine.append((time.time() + window, res))
        self.counters["quarantined"] += 1
        log.info("slot %d held back %.1fs: a late write may still land", res.handle.slot_id, window)

    def _free(self, res: _Reservation) -> None:
        self._buffer.free(res.handle)
        self._forget(res, freed=True)

    def _forget(self, res: _Reservation, freed: bool) -> None:
        with self._lock:
            res.state = _State.FREED
            if self._by_tag.get(res.tag) is res:
                del self._by_tag[res.tag]
            if self._by_request.get(res.request_id) is res:
                del self._by_request[res.request_id]
            self._lock.notify_all()

    def _reap_loop(self) -> None:
        while not self._closed.wait(self._cfg.reap_interval_s):
            self.reap()

    def reap(self, now: float | None = None) -> None:
        """Enforce leases and deadlines once (the reaper thread calls this periodically)."""
        now = time.time() if now is None else now
        with self._lock:
            expired = [
                r
                for r in self._by_tag.values()
                if (r.state is _State.RESERVED and now > r.lease_deadline)
                or (r.state is _State.PUSHED and now > r.deadline + self._cfg.clock_skew_s)
            ]
            due = [r for until, r in self._quarantine if until <= now]
            self._quarantine = [(u, r) for u, r in self._quarantine if u > now]
        for res in expired:
            self.counters["expired"] += 1
            self._retire(res, "deadline passed")
        for res in due:
            self._free(res)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
