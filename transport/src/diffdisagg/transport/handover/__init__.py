"""The hand-over channel: offer -> reserve (or busy) -> write -> pushed -> ack, authenticated.

Torch-free at import: the gateway imports `messages` and `auth`. `HandoverReceiver` / `HandoverSender`
are imported lazily (they pull in the codec and backends, still without torch).

Typical worker wiring::

    buffer = StagingBuffer(nbytes, platform)
    backend = make_backend("tcp", token=token, host="0.0.0.0", port=8200, advertise_host=pod_ip)
    register_buffer(backend, buffer)
    manager = TransferManager(platform, buffer)
    receiver = HandoverReceiver(buffer, backend, ReceiverConfig(token, revision, host="0.0.0.0",
                                port=8100, advertise_host=pod_ip), manager).start()
    sender = HandoverSender(backend, SenderConfig(token, revision, name=pod_name))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffdisagg.transport.handover.auth import load_token, sign, verify
from diffdisagg.transport.handover.messages import (
    PROTOCOL_VERSION,
    Ack,
    Busy,
    Cancel,
    Message,
    Nack,
    NackReason,
    Offer,
    Pushed,
    Reserved,
)

if TYPE_CHECKING:
    from diffdisagg.transport.backends.base import Backend

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Busy",
    "Cancel",
    "Delivery",
    "HandoverReceiver",
    "HandoverSender",
    "Message",
    "Nack",
    "NackReason",
    "Offer",
    "Peer",
    "PushResult",
    "Pushed",
    "ReceiverConfig",
    "Reserved",
    "SenderConfig",
    "load_token",
    "register_buffer",
    "sign",
    "verify",
]

_LAZY = {
    "Delivery": "receiver",
    "HandoverReceiver": "receiver",
    "ReceiverConfig": "receiver",
    "HandoverSender": "sender",
    "Peer": "sender",
    "PushResult": "sender",
    "SenderConfig": "sender",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def register_buffer(backend: Backend, buffer: Any) -> None:
    """Register a StagingBuffer's whole region with `backend` (host view when it is host memory)."""
    view = None if getattr(buffer, "device_memory", False) else buffer.region_view()
    backend.register(buffer.address, buffer.nbytes, view)
