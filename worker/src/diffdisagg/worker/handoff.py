"""The worker's use of the transport: one staging buffer, one backend, a hand-over receiver and sender.

`TransportHandoff` wires `diffdisagg.transport` for one worker (as the transport's handover package
describes): the receiver (denoise, decode) listens on the control port and the backend's data port;
a thread hands each complete delivery, still in its slot, to the runtime, whose scheduler loads it
(prefetched while the previous request computes) and frees the slot after the load. The sender
(prefill, denoise) stages tensors into our own buffer and pushes them to the receiver the gateway named.

Transport errors are mapped to the two outcomes the runtime acts on: `PeerBusy` (ask the gateway for
another receiver or wait) and `PeerGone` (the receiver is unreachable or refused: ask for another one).

Admission: the runtime's `admit(offer)` is asked on every offer before a slot is reserved; False makes
the receiver answer `busy` at once, so a worker whose scheduler is full never takes a request it would
only park (the sender keeps it and the gateway counts it as held upstream).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from diffdisagg.transport.errors import (
    BufferFullError,
    PeerBusyError,
    PeerUnavailableError,
    RevisionMismatchError,
    TransferError,
    TransferTimeoutError,
)
from diffdisagg.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


class PeerBusy(Exception):
    """The receiver (or our own staging buffer) has no room now."""


class PeerGone(Exception):
    """The receiver cannot take this request (unreachable, another revision, stuck)."""


class Sent(NamedTuple):
    """One successful hand-over, as the runtime reports it."""

    nbytes: int
    seconds: float  # staging copy, then offer -> ack
    write_seconds: float  # the backend write alone


class Handoff(Protocol):
    @property
    def endpoint(self) -> dict[str, Any]: ...
    def free_slots(self) -> int: ...
    def in_transit(self) -> int: ...
    def start(
        self, on_delivery: Callable[[Any], None], admit: Callable[[Any], bool] | None = None
    ) -> None: ...
    def release(self, delivery: Any, ticket: Any = None) -> None: ...
    def send(
        self,
        endpoint: dict[str, Any],
        request_id: str,
        tensors: dict[str, Any],
        scalars: dict[str, Any],
        deadline: float,
    ) -> Sent: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def _backend_config(s: WorkerSettings, token: bytes) -> dict[str, Any]:
    if s.transfer_backend == "tcp":
        return {"token": token, "host": s.bind, "port": s.transfer_port, "advertise_host": s.host}
    # Mooncake: our DIFFDISAGG_* settings translated into its own (the operator never writes its switches).
    return {
        "host": s.host,
        "protocol": s.transfer_protocol,
        "device_name": s.rdma_devices,
        "rpc_port_min": s.transfer_port_min,
        "rpc_port_max": s.transfer_port_max,
    }


class TransportHandoff:
    def __init__(self, s: WorkerSettings, token: bytes, device: Any, *, receive: bool, send: bool) -> None:
        from diffdisagg.transport.backends import make_backend
        from diffdisagg.transport.buffer import StagingBuffer
        from diffdisagg.transport.handover import (
            HandoverReceiver,
            HandoverSender,
            ReceiverConfig,
            SenderConfig,
            register_buffer,
        )
        from diffdisagg.transport.manager import TransferManager
        from diffdisagg.transport.platforms import current_platform

        self.s = s
        self.device = device
        platform = current_platform()
        self.buffer = StagingBuffer(s.buffer_bytes, platform)
        self.backend = make_backend(s.transfer_backend, **_backend_config(s, token))
        register_buffer(self.backend, self.buffer)
        self.manager = TransferManager(platform, self.buffer)
        self.receiver = None
        self.sender = None
        if receive:
            cfg = ReceiverConfig(
                token, s.revision, host=s.bind, port=s.control_port, advertise_host=s.host, name=s.worker_id
            )
            self.receiver = HandoverReceiver(self.buffer, self.backend, cfg, self.manager).start()
        if send:
            self.sender = HandoverSender(self.backend, SenderConfig(token, s.revision, name=s.worker_id))
        self._typical = 1 << 20  # bytes of a recent payload: turns free bytes into a slot count
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> dict[str, Any]:
        if self.receiver is None:
            return {}
        host, port = self.receiver.address
        return {"host": host, "port": port, "name": self.s.worker_id}

    def free_slots(self) -> int:
        if self.receiver is None:
            return 0
        st = self.receiver.stats()
        return int(st["free_bytes"] // max(1, self._typical))

    def in_transit(self) -> int:
        """Hand-overs reserved or complete here that the runtime has not taken yet."""
        if self.receiver is None:
            return 0
        st = self.receiver.stats()
        return int(st["reserved"]) + int(st["pushed"])

    def stats(self) -> dict[str, Any]:
        out = dict(self.receiver.stats()) if self.receiver is not None else {}
        out["live_slots"] = self.buffer.allocator.live_slots  # receive and send slots of our one buffer
        return out

    def start(self, on_delivery: Callable[[Any], None], admit: Callable[[Any], bool] | None = None) -> None:
        """Hand every complete delivery (still in its slot) to `on_delivery`, from a thread of ours;
        `admit(offer)` decides on each offer whether to reserve a slot (False: answer busy)."""
        if self.receiver is None:
            return
        self.receiver.set_admit(admit)
        self._thread = threading.Thread(
            target=self._receive_loop, args=(on_delivery,), name="handover-deliver", daemon=True
        )
        self._thread.start()

    def _receive_loop(self, on_delivery: Callable[[Any], None]) -> None:
        assert self.receiver is not None
        while not self._closed.is_set():
            d = self.receiver.receive(timeout=0.25)
            if d is None:
                continue
            self._typical = max(4096, d.nbytes)
            try:
                on_delivery(d)
            except Exception:  # never lose a slot to a failing callback
                logger.exception("delivery of %s not accepted; freeing its slot", d.request_id)
                self.release(d)

    def release(self, delivery: Any, ticket: Any = None) -> None:
        """Free a delivery's slot (after its load completed; the manager refuses earlier)."""
        assert self.receiver is not None
        self.receiver.release(delivery, ticket)

    def send(
        self,
        endpoint: dict[str, Any],
        request_id: str,
        tensors: dict[str, Any],
        scalars: dict[str, Any],
        deadline: float,
    ) -> Sent:
        from diffdisagg.transport.handover import Peer

        assert self.sender is not None
        peer = Peer(str(endpoint["host"]), int(endpoint["port"]), str(endpoint.get("name", "")))
        t0 = time.perf_counter()
        try:
            res = self.sender.send(
                peer,
                request_id=request_id,
                tensors=tensors,
                scalars=scalars,
                deadline=deadline,
                manager=self.manager,
            )
        except (PeerBusyError, BufferFullError) as exc:
            raise PeerBusy(str(exc)) from exc
        except (PeerUnavailableError, RevisionMismatchError, TransferTimeoutError) as exc:
            raise PeerGone(str(exc)) from exc
        except TransferError as exc:
            raise PeerGone(f"{type(exc).__name__}: {exc}") from exc
        return Sent(res.nbytes, time.perf_counter() - t0, res.write_s)

    def close(self) -> None:
        self._closed.set()
        if self.receiver is not None:
            self.receiver.close()
        if self.sender is not None:
            self.sender.close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.backend.close()
