"""Plain-TCP backend (the default): one data listener per process, `recv_into` straight into the region.

Wire format (all integers big-endian), per connection:

1. handshake, mutual HMAC-SHA256 over fresh nonces with the shared token:
   server -> `DDT1` + server_nonce[32]; client -> client_nonce[32] + mac_c;
   server -> status[1] (0 = ok) + mac_s. A peer without the token can neither write nor fake acks.
2. then any number of writes, one at a time:
   client -> `DDW1` + offset[u64] + nbytes[u64] + tag[16]; server -> go[1] (0 = accepted, else a
   refusal code, and the server closes); client -> payload; server -> done[1] once every byte landed.
   Writes of at most 1 MiB use `DDW2`: the payload follows the header without waiting for `go` (one
   round trip less); a refused eager write is answered with the refusal code and the server closes
   without reading the payload, so it still never touches the region.

The server validates the range against the registered region and asks the receiver's write guard
*before* sending `go`, so a refused write moves no bytes and a bad peer cannot write outside its slot.
The payload is received with `recv_into` on a slice of the registered memoryview: no intermediate
buffer on the receiving side (and `sendall(memoryview)` sends without a copy on the other).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import struct
import threading
import time
from typing import Any

from diffdisagg.transport.backends.base import (
    Backend,
    InflightWrites,
    LandedLog,
    check_range,
    source_view,
)
from diffdisagg.transport.errors import (
    AuthenticationError,
    PeerUnavailableError,
    TransferError,
    TransferTimeoutError,
)

__all__ = ["TcpBackend"]

log = logging.getLogger(__name__)

_HELLO = b"DDT1"
_WRITE = b"DDW1"  # wait for `go` before the payload (large writes: a refusal costs no bytes sent)
_EAGER = b"DDW2"  # payload follows the header at once (small writes: saves a round trip)
EAGER_MAX = 1024 * 1024
_NONCE = 32
_HEADER = struct.Struct("!4sQQ16s")
_OK, _RANGE, _REFUSED, _BADHEADER = 0, 1, 2, 3
_REFUSALS = {
    _RANGE: "outside the registered region",
    _REFUSED: "no reservation for this tag",
    _BADHEADER: "malformed header",
}


def _mac(token: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, label + b"".join(parts), hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        got = sock.recv_into(view[pos:], n - pos)
        if got == 0:
            raise ConnectionResetError("peer closed the connection")
        pos += got
    return bytes(buf)


class TcpBackend(Backend):
    """Data listener + connection pool. `token` authenticates both directions of every connection."""

    name = "tcp"

    def __init__(
        self,
        token: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        connect_timeout_s: float = 2.0,
        handshake_timeout_s: float = 5.0,
        pool_per_peer: int = 4,
    ) -> None:
        super().__init__()
        if not token or len(token) < 16:
            raise AuthenticationError("tcp backend needs a shared token of at least 16 bytes")
        self._token = bytes(token)
        self._host, self._port = host, port
        self._advertise = advertise_host or host
        self._connect_timeout = connect_timeout_s
        self._handshake_timeout = handshake_timeout_s
        self._pool_per_peer = pool_per_peer
        self._pool: dict[tuple[str, int], list[socket.socket]] = {}
        self._pool_lock = threading.Lock()
        self._view: memoryview | None = None
        self._nbytes = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._inflight = InflightWrites()
        self._landed = LandedLog()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------ receiving side

    def register(self, address: int, nbytes: int, view: memoryview | None = None) -> None:
        if self._view is not None:
            raise TransferError("tcp backend: a region is registered already")
        if nbytes <= 0:
            raise TransferError(f"tcp backend: region size must be positive, got {nbytes}")
        if view is None:
            # recv_into writes with the CPU: device memory must go through a host staging buffer.
            raise TransferError(
                "tcp backend needs a host view of the region (device memory is not supported)"
            )
        self._view = view.cast("B")
        self._nbytes = nbytes
        lsock = socket.create_server((self._host, self._port), backlog=64, reuse_port=False)
        lsock.settimeout(0.25)  # accept wakes up to notice close()
        self._listener = lsock
        self._port = lsock.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name=f"tcp-data-accept:{self._port}", daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def endpoint(self) -> dict[str, Any]:
        if self._listener is None:
            raise TransferError("tcp backend: register a region before publishing the endpoint")
        return {"backend": self.name, "host": self._advertise, "port": self._port, "nbytes": self._nbytes}

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                conn, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._closed.is_set():
                    log.exception("tcp data listener failed")
                return
            t = threading.Thread(target=self._serve, args=(conn, addr), name="tcp-data-conn", daemon=True)
            t.start()

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        with self._conns_lock:
            self._conns.add(conn)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if not self._server_handshake(conn, addr):
                return
            conn.settimeout(None)  # idle pooled connections wait; quiesce/close shut them down
            while not self._closed.is_set():
                if not self._serve_one(conn):
                    return
        except OSError:
            pass  # peer went away; an unfinished write simply never counts as landed
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def _server_handshake(self, conn: socket.socket, addr: Any) -> bool:
        conn.settimeout(self._handshake_timeout)
        server_nonce = os.urandom(_NONCE)
        conn.sendall(_HELLO + server_nonce)
        reply = _recv_exact(conn, _NONCE + 32)
        client_nonce, mac = reply[:_NONCE], reply[_NONCE:]
        if not hmac.compare_digest(mac, _mac(self._token, b"dd-tcp-client", server_nonce, client_nonce)):
            log.warning("tcp data connection from %s rejected: bad token", addr)
            conn.sendall(b"\x01" + bytes(32))
            return False
        conn.sendall(b"\x00" + _mac(self._token, b"dd-tcp-server", client_nonce, server_nonce))
        return True

    def _serve_one(self, conn: socket.socket) -> bool:
        try:
            header = _recv_exact(conn, _HEADER.size)
        except ConnectionResetError:
            return False
        magic, offset, nbytes, raw_tag = _HEADER.unpack(header)
        tag = b"" if raw_tag == bytes(16) else raw_tag
        if magic not in (_WRITE, _EAGER) or (magic == _EAGER and nbytes > EAGER_MAX):
            conn.sendall(bytes([_BADHEADER]))
            return False
        try:
            check_range(offset, nbytes, self._nbytes)
        except TransferError:
            log.warning("tcp write refused: %d B at %d outside the %d B region", nbytes, offset, self._nbytes)
            self._refuse(conn, magic, nbytes, _RANGE)
            return False

        def abort() -> None:
            conn.shutdown(socket.SHUT_RDWR)

        token = self._inflight.begin(self._guard, tag, offset, nbytes, abort)
        if token is None:
            log.warning("tcp write refused: %d B at %d has no live reservation", nbytes, offset)
            self._refuse(conn, magic, nbytes, _REFUSED)
            return False
        try:
            if magic == _WRITE:
                conn.sendall(bytes([_OK]))
            assert self._view is not None
            dst = self._view[offset : offset + nbytes]
            pos = 0
            while pos < nbytes:
                got = conn.recv_into(dst[pos:], nbytes - pos, socket.MSG_WAITALL)
                if got == 0:
                    return False  # sender died or gave up mid-write: not landed
                pos += got
            self._landed.add(tag, nbytes)
        finally:
            self._inflight.end(token)
        conn.sendall(bytes([_OK]))
        return True

    @staticmethod
    def _refuse(conn: socket.socket, magic: bytes, nbytes: int, code: int) -> None:
        if magic == _EAGER:
            # Drain the small payload into scratch memory (never the region): closing with unread data
            # would reset the connection and could destroy the refusal code before the client reads it.
            conn.settimeout(5.0)
            _recv_exact(conn, nbytes)
        conn.sendall(bytes([code]))

    def landed(self, tag: bytes) -> int | None:
        return self._landed.take(tag)

    def late_write_window_s(self, nbytes: int) -> float:
        # Only used if quiesce failed to stop a write (its connection ignored shutdown): be conservative.
        return 30.0

    def quiesce(self, offset: int, nbytes: int, timeout: float) -> bool:
        return self._inflight.quiesce(offset, nbytes, timeout)

    @property
    def inflight_writes(self) -> int:
        return self._inflight.count()

    # -------------------------------------------------------------------------------- sending side

    def write(
        self,
        peer_endpoint: dict[str, Any],
        src: memoryview | int,
        dst_offset: int,
        nbytes: int,
        deadline: float,
        *,
        tag: bytes = b"",
    ) -> None:
        try:
            host, port = str(peer_endpoint["host"]), int(peer_endpoint["port"])
            region = int(peer_endpoint["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TransferError(f"not a tcp endpoint: {peer_endpoint!r}") from exc
        check_range(dst_offset, nbytes, region)
        if len(tag) > 16:
            raise TransferError("tcp backend: tags are at most 16 bytes")
        data = source_view(src, nbytes)
        eager = nbytes <= EAGER_MAX
        header = _HEADER.pack(_EAGER if eager else _WRITE, dst_offset, nbytes, tag.ljust(16, b"\0"))
        for attempt in (0, 1):
            sock, pooled = self._checkout((host, port), deadline)
            try:
                if eager:
                    self._send_eager(sock, header, data, deadline)
                else:
                    self._send_one(sock, header, data, deadline)
            except _StaleConnection:
                sock.close()
                if pooled and attempt == 0:
                    continue  # an idle pooled connection had died; the write never started
                raise PeerUnavailableError(f"tcp peer {host}:{port} closed the connection") from None
            except BaseException:
                sock.close()
                raise
            self._checkin((host, port), sock)
            return

    def _send_eager(self, sock: socket.socket, header: bytes, data: memoryview, deadline: float) -> None:
        try:
            _send_blocking(sock, [memoryview(header), data], deadline)  # one gathered send, no copy
            sock.settimeout(_remaining(deadline))
            done = sock.recv(1)
        except TimeoutError as exc:
            raise TransferTimeoutError("tcp write timed out waiting for the ack") from exc
        except (ConnectionError, OSError) as exc:
            raise _StaleConnection() from exc
        if not done:
            raise _StaleConnection()
        if done[0] != _OK:
            raise TransferError(f"tcp peer refused the write: {_REFUSALS.get(done[0], done[0])}")

    def _send_one(self, sock: socket.socket, header: bytes, data: memoryview, deadline: float) -> None:
        where = "header"
        try:
            sock.settimeout(_remaining(deadline))
            sock.sendall(header)
            go = sock.recv(1)
            if not go:
                raise _StaleConnection()
            if go[0] != _OK:
                raise TransferError(f"tcp peer refused the write: {_REFUSALS.get(go[0], go[0])}")
            where = "payload"
            _send_blocking(sock, [data], deadline)
            sock.settimeout(_remaining(deadline))
            done = sock.recv(1)
        except TimeoutError as exc:
            raise TransferTimeoutError(f"tcp write timed out during the {where}") from exc
        except (ConnectionError, OSError) as exc:
            if where == "header":
                raise _StaleConnection() from exc
            raise PeerUnavailableError(f"tcp peer lost during the {where}: {exc}") from exc
        if done != bytes([_OK]):
            raise PeerUnavailableError("tcp peer closed before acknowledging the write")

    def _checkout(self, key: tuple[str, int], deadline: float) -> tuple[socket.socket, bool]:
        with self._pool_lock:
            idle = self._pool.get(key)
            if idle:
                return idle.pop(), True
        return self._connect(key, deadline), False

    def _checkin(self, key: tuple[str, int], sock: socket.socket) -> None:
        with self._pool_lock:
            idle = self._pool.setdefault(key, [])
            if len(idle) < self._pool_per_peer and not self._closed.is_set():
                idle.append(sock)
                return
        sock.close()

    def _connect(self, key: tuple[str, int], deadline: float) -> socket.socket:
        try:
            sock = socket.create_connection(key, timeout=min(self._connect_timeout, _remaining(deadline)))
        except TimeoutError as exc:
            raise TransferTimeoutError(f"tcp connect to {key[0]}:{key[1]} timed out") from exc
        except OSError as exc:
            raise PeerUnavailableError(f"tcp peer {key[0]}:{key[1]} unreachable: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.settimeout(min(self._handshake_timeout, _remaining(deadline)))
            hello = _recv_exact(sock, len(_HELLO) + _NONCE)
            if hello[:4] != _HELLO:
                raise TransferError(f"{key[0]}:{key[1]} is not a diffdisagg tcp data port")
            server_nonce, client_nonce = hello[4:], os.urandom(_NONCE)
            sock.sendall(client_nonce + _mac(self._token, b"dd-tcp-client", server_nonce, client_nonce))
            reply = _recv_exact(sock, 33)
            expect = _mac(self._token, b"dd-tcp-server", client_nonce, server_nonce)
            if reply[0] != 0 or not hmac.compare_digest(reply[1:], expect):
                raise AuthenticationError(f"tcp peer {key[0]}:{key[1]} rejected our token (or has another)")
            return sock
        except TimeoutError as exc:
            sock.close()
            raise TransferTimeoutError(f"tcp handshake with {key[0]}:{key[1]} timed out") from exc
        except (ConnectionError, OSError) as exc:
            sock.close()
            raise PeerUnavailableError(f"tcp handshake with {key[0]}:{key[1]} failed: {exc}") from exc
        except BaseException:
            sock.close()
            raise

    # ----------------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._pool_lock:
            idle = [s for socks in self._pool.values() for s in socks]
            self._pool.clear()
        for s in idle:
            s.close()
        for t in self._threads:
            t.join(timeout=1.0)


class _StaleConnection(Exception):
    """The connection failed before any payload byte was sent (safe to retry on a fresh one)."""


def _send_blocking(sock: socket.socket, parts: list[memoryview], deadline: float) -> None:
    """Send buffers in blocking mode with a kernel send timeout (SO_SNDTIMEO), gathered by sendmsg.

    With a Python-level timeout the socket is non-blocking and a large `sendall` turns into hundreds of
    poll()+send() pairs (measured: 5-10 % below a plain blocking socket); in blocking mode one call moves
    the whole payload. The kernel timeout is re-armed to the time left before each call, so the deadline
    still holds.
    """
    sock.settimeout(None)
    parts = [p for p in parts if len(p)]
    while parts:
        left = _remaining(deadline)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(left), int((left % 1) * 1_000_000))
        )
        try:
            sent = sock.sendmsg(parts)
        except BlockingIOError:
            continue  # the kernel timeout fired with nothing sent: the deadline check above decides
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts and sent:
            parts[0] = parts[0][sent:]


def _remaining(deadline: float) -> float:
    left = deadline - time.time()
    if left <= 0:
        raise TransferTimeoutError("deadline passed")
    return left
