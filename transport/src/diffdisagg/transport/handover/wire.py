"""Framing of the hand-over control channel: length-prefixed, MAC-first msgpack frames over TCP.

    frame = length[u32, big-endian] + mac[32] + payload[length - 32]

The length is checked against a limit before anything else is read (an oversized frame is refused
without buffering it), and the MAC is verified before the payload is parsed (unauthenticated bytes never
reach msgpack). Every read and write takes a deadline.
"""

from __future__ import annotations

import socket
import struct
import time

from diffdisagg.transport.errors import (
    AuthenticationError,
    PeerUnavailableError,
    ProtocolError,
    TransferTimeoutError,
)
from diffdisagg.transport.handover import messages
from diffdisagg.transport.handover.auth import MAC_BYTES, sign, verify

__all__ = ["DEFAULT_MAX_FRAME", "FrameTooLarge", "read_message", "write_message"]

DEFAULT_MAX_FRAME = 1 << 20
_LEN = struct.Struct("!I")


class FrameTooLarge(ProtocolError):
    """The peer announced a frame above the limit (the connection cannot be resynchronised)."""


def write_message(sock: socket.socket, token: bytes, msg: messages.Message, deadline: float) -> None:
    payload = messages.encode(msg)
    frame = _LEN.pack(MAC_BYTES + len(payload)) + sign(token, payload) + payload
    try:
        sock.settimeout(_left(deadline))
        sock.sendall(frame)
    except TimeoutError as exc:
        raise TransferTimeoutError(f"sending {msg.TYPE} timed out") from exc
    except OSError as exc:
        raise PeerUnavailableError(f"sending {msg.TYPE} failed: {exc}") from exc


def read_message(
    sock: socket.socket, token: bytes, deadline: float | None, max_frame: int = DEFAULT_MAX_FRAME
) -> messages.Message:
    """Read one frame; `deadline=None` waits for the first byte without limit (idle server side).

    Raises PeerUnavailableError (closed), TransferTimeoutError, FrameTooLarge, AuthenticationError
    (bad MAC), ProtocolError (bad content).
    """
    head = _recv_exact(sock, _LEN.size, deadline, first=True)
    (length,) = _LEN.unpack(head)
    if length > max_frame or length < MAC_BYTES:
        raise FrameTooLarge(f"frame of {length} B refused (limit {max_frame} B)")
    # Once a frame has started, the rest must follow promptly even on an idle connection.
    rest_deadline = deadline if deadline is not None else time.time() + 10.0
    body = _recv_exact(sock, length, rest_deadline, first=False)
    mac, payload = body[:MAC_BYTES], body[MAC_BYTES:]
    if not verify(token, payload, mac):
        raise AuthenticationError("control message MAC did not verify (wrong token or tampered)")
    return messages.decode(payload)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None, first: bool) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    try:
        while pos < n:
            sock.settimeout(None if deadline is None else _left(deadline))
            got = sock.recv_into(view[pos:], n - pos)
            if got == 0:
                raise PeerUnavailableError("connection closed" + ("" if first and pos == 0 else " mid-frame"))
            pos += got
    except TimeoutError as exc:
        raise TransferTimeoutError("control read timed out") from exc
    except PeerUnavailableError:
        raise
    except OSError as exc:
        raise PeerUnavailableError(f"control read failed: {exc}") from exc
    return bytes(buf)


def _left(deadline: float) -> float:
    left = deadline - time.time()
    if left <= 0:
        raise TransferTimeoutError("deadline passed")
    return left
