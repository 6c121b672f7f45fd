"""Typed errors of the transport library.

Every failure the transport can report has its own class so callers branch on the type, never on a
message string. The tree is shared by the core (allocator, buffer, codec, manager, platforms) and by the
backends and hand-over channel. This module imports nothing heavy: the torch-free gateway imports it.
"""

from __future__ import annotations

__all__ = [
    "AllocatorError",
    "AuthenticationError",
    "BufferClosedError",
    "BufferFullError",
    "BufferInUseError",
    "CodecError",
    "DeadlineExceededError",
    "DoubleFreeError",
    "HandoverError",
    "InvalidSizeError",
    "PeerBusyError",
    "PeerUnavailableError",
    "PlatformError",
    "ProtocolError",
    "RevisionMismatchError",
    "StaleHandleError",
    "TransferError",
    "TransferInProgressError",
    "TransferTimeoutError",
    "TransportError",
]


class TransportError(Exception):
    """Base of every error raised by diffdisagg.transport."""


# --- allocator / staging buffer -------------------------------------------------------------------


class AllocatorError(TransportError):
    """A slot could not be allocated, freed or validated."""


class BufferFullError(AllocatorError):
    """No free block is large enough for the request (the receiver should answer `busy`)."""


class DoubleFreeError(AllocatorError):
    """A handle was freed twice."""


class StaleHandleError(AllocatorError):
    """A handle does not name a live slot (freed and reused, or never issued by this allocator)."""


class InvalidSizeError(AllocatorError):
    """A size or alignment is not acceptable (zero, negative, not a power of two, beyond capacity)."""


class BufferInUseError(AllocatorError):
    """A staging buffer was closed while slots were still live (close(force=True) overrides)."""


class BufferClosedError(AllocatorError):
    """The staging buffer was closed; its slots and views can no longer be used."""


# --- codec ----------------------------------------------------------------------------------------


class CodecError(TransportError):
    """A manifest or payload is malformed, inconsistent, or from an unsupported schema version."""


# --- platform -------------------------------------------------------------------------------------


class PlatformError(TransportError):
    """The device platform cannot be determined or does not support the requested operation."""


# --- data movement ----------------------------------------------------------------------------------


class TransferError(TransportError):
    """Bytes could not be moved to or from a peer, or between device and staging memory."""


class TransferTimeoutError(TransferError):
    """A transfer did not complete before its deadline."""


class PeerUnavailableError(TransferError):
    """The peer cannot be reached (connection refused, reset, unknown endpoint)."""


class PeerBusyError(TransferError):
    """The peer is reachable but has no room for the transfer right now."""


class TransferInProgressError(TransferError):
    """A slot was released while a device copy into or out of it had not completed."""


# --- hand-over channel ------------------------------------------------------------------------------


class HandoverError(TransportError):
    """The offer / reserve / push / ack exchange failed."""


class AuthenticationError(HandoverError):
    """A control message's MAC did not verify against the shared token."""


class RevisionMismatchError(HandoverError):
    """The peer runs another deployment revision; the two must not be paired."""


class DeadlineExceededError(HandoverError):
    """The request's deadline passed before the hand-over completed."""


class ProtocolError(HandoverError):
    """A control message was out of order, of an unknown kind, or otherwise malformed."""
