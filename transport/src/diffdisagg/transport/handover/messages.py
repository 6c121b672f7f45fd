"""The hand-over control messages: versioned, frozen dataclasses encoded with msgpack (never pickle).

Flow (one hop): sender -> `Offer`; receiver -> `Reserved` | `Busy` | `Nack`; sender writes the bytes
through the backend; sender -> `Pushed`; receiver -> `Ack` | `Nack`. Either side may stop early: the
sender with `Cancel` (or by closing the connection), the receiver with `Nack`.

Every message carries `request_id`, `revision` (the deployment revision of the *sender of the
message*), `deadline` (unix seconds: after it the message is void), a fresh random `nonce` (replay
protection) and `seq` (per-connection counter, for logs). Replies name the `nonce` of the message they
answer in `in_reply_to`, so a reply cannot be replayed onto another exchange.

Decoding is strict: unknown version, unknown type, missing or extra fields, wrong field types all raise
ProtocolError. Torch-free: the gateway imports this module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, get_type_hints

import msgpack

from diffdisagg.transport.errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Busy",
    "Cancel",
    "Message",
    "Nack",
    "NackReason",
    "Offer",
    "Pushed",
    "Reserved",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 1
NONCE_BYTES = 16
TAG_BYTES = 16
MAX_ID_CHARS = 256
MAX_SIZES = 1024


class NackReason(StrEnum):
    AUTH = "auth"  # MAC did not verify
    REVISION = "revision"  # another deployment revision
    DEADLINE = "deadline"  # deadline passed (or a reservation's lease ran out)
    REPLAY = "replay"  # nonce seen before
    PROTOCOL = "protocol"  # malformed, out of order, unknown reservation
    TOO_LARGE = "too_large"  # can never fit this receiver's buffer
    DUPLICATE = "duplicate"  # request already has a live reservation here
    INCOMPLETE = "incomplete"  # the backend did not see all bytes land
    MANIFEST = "manifest"  # manifest does not fit the slot / fails validation
    CLOSING = "closing"  # receiver shutting down


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    TYPE: ClassVar[str] = ""
    request_id: str
    revision: str
    deadline: float
    nonce: bytes
    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer(Message):
    TYPE: ClassVar[str] = "offer"
    nbytes: int  # bytes the slot must hold (the codec's planned total)
    sizes: list[int]  # bytes per tensor, for logs and a consistency check (sum <= nbytes)
    sender: str  # who offers (worker name), for logs


@dataclass(frozen=True, slots=True, kw_only=True)
class Reserved(Message):
    TYPE: ClassVar[str] = "reserved"
    in_reply_to: bytes
    slot_id: int
    generation: int
    offset: int  # where in the receiver's region the bytes go
    nbytes: int
    tag: bytes  # reservation secret; the data plane checks it (tcp, loopback)
    lease_deadline: float  # the sender must push before this (unix seconds)
    endpoint: dict[str, Any]  # the receiver backend's endpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class Busy(Message):
    TYPE: ClassVar[str] = "busy"
    in_reply_to: bytes
    free_bytes: int
    largest_free_block: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Pushed(Message):
    TYPE: ClassVar[str] = "pushed"
    slot_id: int
    generation: int
    tag: bytes
    nbytes: int  # bytes written at the slot's offset
    manifest: dict[str, Any]  # codec Manifest.to_dict(): tensors + scalars


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Message):
    TYPE: ClassVar[str] = "ack"
    in_reply_to: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Nack(Message):
    TYPE: ClassVar[str] = "nack"
    in_reply_to: bytes
    reason: str  # a NackReason value
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    slot_id: int
    generation: int
    tag: bytes
    reason: str


_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Offer, Reserved, Busy, Pushed, Ack, Nack, Cancel)
}
_FIELDS: dict[str, dict[str, Any]] = {name: get_type_hints(cls) for name, cls in _TYPES.items()}


def encode(msg: Message) -> bytes:
    body = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    body["v"] = PROTOCOL_VERSION
    body["type"] = msg.TYPE
    return msgpack.packb(body, use_bin_type=True)


def decode(payload: bytes) -> Message:
    """Parse and validate one message; ProtocolError on anything unexpected (never another exception)."""
    try:
        body = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=1 << 20,
            max_str_len=1 << 20,
            max_array_len=1 << 16,
            max_map_len=1 << 12,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable message: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("message is not a map")
    if body.pop("v", None) != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported hand-over protocol version (want {PROTOCOL_VERSION})")
    kind = body.pop("type", None)
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    hints = {k: v for k, v in _FIELDS[cls.TYPE].items() if k != "TYPE"}
    missing, extra = hints.keys() - body.keys(), body.keys() - hints.keys()
    if missing or extra:
        raise ProtocolError(f"{kind}: missing {sorted(missing)} / unexpected {sorted(map(str, extra))}")
    for name, hint in hints.items():
        _check_field(kind, name, hint, body[name])
    return cls(**body)


def _check_field(kind: str, name: str, hint: Any, value: Any) -> None:
    origin = getattr(hint, "__origin__", hint)
    bad = False
    if origin is str:
        bad = not isinstance(value, str) or (
            name in ("request_id", "revision", "sender") and len(value) > MAX_ID_CHARS
        )
    elif origin is int:
        bad = not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >= 1 << 63
    elif origin is float:
        bad = not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
    elif origin is bytes:
        want = NONCE_BYTES if name in ("nonce", "in_reply_to") else TAG_BYTES
        bad = not isinstance(value, bytes) or len(value) != want
    elif origin is list:
        bad = (
            not isinstance(value, list)
            or len(value) > MAX_SIZES
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        )
    elif origin is dict:
        bad = not isinstance(value, dict) or not all(isinstance(k, str) for k in value)
    if bad:
        raise ProtocolError(f"{kind}.{name}: invalid value {value!r:.80}")
