"""The sending side of a hand-over: offer -> write through the backend -> pushed, with typed errors.

`HandoverSender.push` moves bytes that are already laid out as a codec manifest describes (a staged
slot, or any host buffer); `send` stages tensors into the sender's own staging buffer first (through
the TransferManager), pushes, and frees the local slot. Both take one receiver or a list of candidates:
with several, a receiver that is busy, unreachable, on another revision or stuck is skipped for the next
one while the deadline allows ("retry another receiver only when told"); with one, its error is raised.

Control connections are pooled per receiver (one hand-over at a time on each), so a hop costs two
round trips on the control channel plus the data write. When anything fails after a slot was reserved,
the sender sends `Cancel` (best effort) and drops the connection, so the receiver frees the slot at once
instead of at lease expiry.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffdisagg.transport.backends.base import Backend
from diffdisagg.transport.codec import Manifest
from diffdisagg.transport.errors import (
    AuthenticationError,
    DeadlineExceededError,
    HandoverError,
    PeerBusyError,
    PeerUnavailableError,
    ProtocolError,
    RevisionMismatchError,
    TransferError,
    TransferTimeoutError,
    TransportError,
)
from diffdisagg.transport.handover import messages as m
from diffdisagg.transport.handover.auth import check_token
from diffdisagg.transport.handover.wire import DEFAULT_MAX_FRAME, read_message, write_message

if TYPE_CHECKING:
    import torch

__all__ = ["HandoverSender", "Peer", "PushResult", "SenderConfig"]

log = logging.getLogger(__name__)

# Errors after which another receiver may take the request: this one will never compute on it.
_RETRY_ELSEWHERE = (PeerBusyError, PeerUnavailableError, RevisionMismatchError, TransferTimeoutError)

Progress = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Peer:
    """A receiver's control address (what the gateway's dispatch names)."""

    host: str
    port: int
    name: str = ""

    def __str__(self) -> str:
        return self.name or f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SenderConfig:
    token: bytes
    revision: str
    name: str = "sender"
    """Who we are, for the receiver's logs."""
    connect_timeout_s: float = 2.0
    io_timeout_s: float = 5.0
    """Cap on one control round trip (a stuck receiver is given up on this early, then the next one)."""
    cancel_timeout_s: float = 0.2
    max_frame_bytes: int = DEFAULT_MAX_FRAME
    pool_per_peer: int = 4

    def __post_init__(self) -> None:
        check_token(self.token)
        if not self.revision:
            raise HandoverError("sender needs a deployment revision")


@dataclass(frozen=True)
class PushResult:
    peer: Peer
    request_id: str
    nbytes: int
    attempts: int
    offer_s: float
    write_s: float
    pushed_s: float


_NACK_ERRORS: dict[str, type[TransportError]] = {
    m.NackReason.AUTH: AuthenticationError,
    m.NackReason.REPLAY: AuthenticationError,
    m.NackReason.REVISION: RevisionMismatchError,
    m.NackReason.DEADLINE: DeadlineExceededError,
    m.NackReason.CLOSING: PeerUnavailableError,
}


def _nack_error(nack: m.Nack, peer: Peer) -> TransportError:
    cls = _NACK_ERRORS.get(nack.reason, ProtocolError)
    exc = cls(f"receiver {peer} refused ({nack.reason}): {nack.detail}")
    exc.reason = nack.reason  # type: ignore[attr-defined]
    return exc


class HandoverSender:
    """Thread-safe; one per worker (it shares the worker's backend with the receiver)."""

    def __init__(self, backend: Backend, config: SenderConfig) -> None:
        self._backend = backend
        self._cfg = config
        self._pool: dict[tuple[str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._closed = False

    # ------------------------------------------------------------------------------------ public

    def push(
        self,
        peers: Peer | Sequence[Peer],
        *,
        request_id: str,
        manifest: Manifest | Mapping[str, Any],
        source: memoryview | int,
        deadline: float,
        progress: Progress | None = None,
    ) -> PushResult:
        """Hand `manifest.total_nbytes` bytes at `source` (laid out as `manifest` says) to a receiver.

        Returns once a receiver acknowledged the complete payload (the caller may then reuse `source`).
        Raises PeerBusyError / PeerUnavailableError / RevisionMismatchError / TransferTimeoutError (the
        last candidate's error), DeadlineExceededError, AuthenticationError, ProtocolError.
        """
        if not isinstance(manifest, Manifest):
            manifest = Manifest.from_dict(manifest)
        manifest.validate()
        nbytes = manifest.total_nbytes
        if nbytes <= 0:
            raise ProtocolError("nothing to hand over (manifest has no bytes)")
        candidates = [peers] if isinstance(peers, Peer) else list(peers)
        if not candidates:
            raise PeerUnavailableError("no receiver to hand over to")
        last: TransportError | None = None
        for attempt, peer in enumerate(candidates, 1):
            if time.time() >= deadline:
                raise DeadlineExceededError(
                    f"request {request_id}: deadline passed before hand-over"
                ) from last
            try:
                return self._push_one(peer, request_id, manifest, source, nbytes, deadline, attempt, progress)
            except _RETRY_ELSEWHERE as exc:
                log.info(
                    "hand-over of %s to %s failed (%s: %s)%s",
                    request_id,
                    peer,
                    type(exc).__name__,
                    exc,
                    "; trying the next receiver" if attempt < len(candidates) else "",
                )
                last = exc
        assert last is not None
        raise last

    def send(
        self,
        peers: Peer | Sequence[Peer],
        *,
        request_id: str,
        tensors: Mapping[str, torch.Tensor],
        scalars: Mapping[str, Any] | None,
        deadline: float,
        manager: Any,
        progress: Progress | None = None,
    ) -> PushResult:
        """Stage `tensors` (any device) into our staging buffer through `manager`, push, free the slot."""
        from diffdisagg.transport.codec import plan

        buffer = manager.buffer
        need = plan(tensors, scalars).total_nbytes
        handle = buffer.allocate(need)  # BufferFullError: our own buffer is full (caller retries later)
        try:
            staged = manager.stage(handle, tensors, scalars)
            source: memoryview | int = (
                buffer.address + handle.offset if buffer.device_memory else buffer.memoryview(handle)
            )
            return self.push(
                peers,
                request_id=request_id,
                manifest=staged,
                source=source,
                deadline=deadline,
                progress=progress,
            )
        finally:
            manager.release(handle)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = [s for ss in self._pool.values() for s in ss]
            self._pool.clear()
        for s in socks:
            s.close()

    def __enter__(self) -> HandoverSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------- one receiver

    def _push_one(
        self,
        peer: Peer,
        request_id: str,
        manifest: Manifest,
        source: memoryview | int,
        nbytes: int,
        deadline: float,
        attempt: int,
        progress: Progress | None,
    ) -> PushResult:
        t0 = time.perf_counter()
        offer = m.Offer(
            request_id=request_id,
            revision=self._cfg.revision,
            deadline=deadline,
            nonce=os.urandom(m.NONCE_BYTES),
            seq=next(self._seq),
            nbytes=nbytes,
            sizes=[t.nbytes for t in manifest.tensors],
            sender=self._cfg.name,
        )
        conn, reply = self._offer(peer, offer, deadline)
        if isinstance(reply, m.Busy):
            self._checkin(peer, conn)
            raise PeerBusyError(
                f"receiver {peer} busy: {reply.free_bytes} B free, "
                f"largest block {reply.largest_free_block} B, need {nbytes} B"
            )
        if isinstance(reply, m.Nack):
            exc = _nack_error(reply, peer)
            if isinstance(exc, (RevisionMismatchError, DeadlineExceededError)):
                self._checkin(peer, conn)
            else:
                conn.close()
            raise exc
        if not isinstance(reply, m.Reserved):
            conn.close()
            raise ProtocolError(f"receiver {peer} answered an offer with {reply.TYPE}")
        t1 = time.perf_counter()
        if progress:
            progress("reserved", {"peer": str(peer), "slot_id": reply.slot_id, "offset": reply.offset})
        try:
            if reply.nbytes < nbytes or reply.endpoint.get("backend") != self._backend.name:
                raise ProtocolError(
                    f"receiver {peer} reserved {reply.nbytes} B on a "
                    f"{reply.endpoint.get('backend')!r} backend; need {nbytes} B on "
                    f"{self._backend.name!r}"
                )
            self._backend.write(
                reply.endpoint,
                source,
                reply.offset,
                nbytes,
                min(deadline, reply.lease_deadline),
                tag=reply.tag,
            )
            t2 = time.perf_counter()
            if progress:
                progress("written", {"peer": str(peer), "nbytes": nbytes})
            pushed = m.Pushed(
                request_id=request_id,
                revision=self._cfg.revision,
                deadline=deadline,
                nonce=os.urandom(m.NONCE_BYTES),
                seq=next(self._seq),
                slot_id=reply.slot_id,
                generation=reply.generation,
                tag=reply.tag,
                nbytes=nbytes,
                manifest=manifest.to_dict(),
            )
            answer = self._round_trip(conn, pushed, deadline)
        except BaseException as exc:
            self._cancel(conn, request_id, reply, f"{type(exc).__name__}: {exc}")
            raise
        if isinstance(answer, m.Ack):
            self._checkin(peer, conn)
            if progress:
                progress("acked", {"peer": str(peer)})
            return PushResult(peer, request_id, nbytes, attempt, t1 - t0, t2 - t1, time.perf_counter() - t2)
        conn.close()
        if isinstance(answer, m.Nack):
            raise _nack_error(answer, peer)
        raise ProtocolError(f"receiver {peer} answered pushed with {answer.TYPE}")

    def _offer(self, peer: Peer, offer: m.Offer, deadline: float) -> tuple[socket.socket, m.Message]:
        for _ in range(2):
            conn, pooled = self._checkout(peer, deadline)
            try:
                return conn, self._round_trip(conn, offer, deadline)
            except PeerUnavailableError:
                conn.close()
                if not pooled:
                    raise
                # A pooled connection the receiver had closed (idle timeout, restart): once more, fresh.
            except BaseException:
                conn.close()
                raise
        raise PeerUnavailableError(f"receiver {peer} keeps closing the connection")

    def _round_trip(self, conn: socket.socket, msg: m.Message, deadline: float) -> m.Message:
        limit = min(deadline, time.time() + self._cfg.io_timeout_s)
        write_message(conn, self._cfg.token, msg, limit)
        reply = read_message(conn, self._cfg.token, limit, self._cfg.max_frame_bytes)
        if getattr(reply, "in_reply_to", None) != msg.nonce:
            raise ProtocolError(f"reply {reply.TYPE} does not answer our {msg.TYPE}")
        if reply.request_id != msg.request_id:
            raise ProtocolError(f"reply for {reply.request_id!r}, expected {msg.request_id!r}")
        return reply

    def _cancel(self, conn: socket.socket, request_id: str, reserved: m.Reserved, reason: str) -> None:
        cancel = m.Cancel(
            request_id=request_id,
            revision=self._cfg.revision,
            deadline=time.time() + self._cfg.cancel_timeout_s + 1,
            nonce=os.urandom(16),
            seq=next(self._seq),
            slot_id=reserved.slot_id,
            generation=reserved.generation,
            tag=reserved.tag,
            reason=reason[:200],
        )
        try:
            write_message(conn, self._cfg.token, cancel, time.time() + self._cfg.cancel_timeout_s)
        except TransferError:
            pass  # the receiver will notice the closed connection or the lease expiry instead
        finally:
            conn.close()

    # ----------------------------------------------------------------------------------- pooling

    def _checkout(self, peer: Peer, deadline: float) -> tuple[socket.socket, bool]:
        key = (peer.host, peer.port)
        with self._lock:
            if self._closed:
                raise HandoverError("sender closed")
            idle = self._pool.get(key)
            if idle:
                return idle.pop(), True
        timeout = min(self._cfg.connect_timeout_s, deadline - time.time())
        if timeout <= 0:
            raise DeadlineExceededError("deadline passed before connecting")
        try:
            conn = socket.create_connection(key, timeout=timeout)
        except TimeoutError as exc:
            raise TransferTimeoutError(f"connect to receiver {peer} timed out") from exc
        except OSError as exc:
            raise PeerUnavailableError(f"receiver {peer} unreachable: {exc}") from exc
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, False

    def _checkin(self, peer: Peer, conn: socket.socket) -> None:
        with self._lock:
            idle = self._pool.setdefault((peer.host, peer.port), [])
            if not self._closed and len(idle) < self._cfg.pool_per_peer:
                idle.append(conn)
                return
        conn.close()
