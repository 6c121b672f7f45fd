"""Backend contract, run against loopback (the executable specification) and tcp in this process.

Mooncake runs the same contract between two processes in test_mooncake.py (its engine is kept out of
the pytest process).
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import os
import socket
import struct
import time

import pytest

from diffdisagg.transport.backends import BACKENDS, make_backend
from diffdisagg.transport.backends.base import LandedLog, buffer_address, source_view
from diffdisagg.transport.backends.mooncake import MooncakeConfig, mooncake_env
from diffdisagg.transport.errors import (
    AuthenticationError,
    PeerUnavailableError,
    TransferError,
    TransferTimeoutError,
)

TOKEN = b"backend-test-token-0123456789"
N = 1 << 20


@pytest.fixture(params=["loopback", "tcp"])
def pair(request):
    """(name, receiving backend, its region, sending backend)."""
    region = mmap.mmap(-1, N)
    rx = make_backend(request.param, token=TOKEN)
    rx.register(buffer_address(memoryview(region)), N, memoryview(region))
    tx = rx if request.param == "loopback" else make_backend("tcp", token=TOKEN)
    yield request.param, rx, region, tx
    if tx is not rx:
        tx.close()
    rx.close()
    del region


def test_factory_names():
    assert BACKENDS == ("tcp", "mooncake", "loopback")
    with pytest.raises(TransferError, match="unknown transfer backend"):
        make_backend("carrier-pigeon")
    with pytest.raises(AuthenticationError):
        make_backend("tcp", token=b"short")


def test_write_lands_bytes_and_counts_them(pair):
    _, rx, region, tx = pair
    data = os.urandom(300_000)
    tag = os.urandom(16)
    tx.write(rx.endpoint, memoryview(data), 4096, len(data), time.time() + 5, tag=tag)
    assert region[4096 : 4096 + len(data)] == data
    assert rx.landed(tag) == len(data)
    assert rx.landed(tag) == 0  # consumed
    # from a raw address, too (what staging buffers hand over)
    src = bytearray(b"\xab" * 512)
    tx.write(rx.endpoint, buffer_address(src), 0, 512, time.time() + 5)
    assert region[:512] == bytes(src)


@pytest.mark.parametrize("offset, nbytes", [(N - 10, 11), (-1, 10), (0, 0), (N, 1)])
def test_out_of_range_is_refused_before_any_byte(pair, offset, nbytes):
    _, rx, region, tx = pair
    before = hashlib.sha256(region).digest()
    with pytest.raises(TransferError, match="outside"):
        tx.write(rx.endpoint, memoryview(bytearray(max(nbytes, 1))), offset, nbytes, time.time() + 5)
    assert hashlib.sha256(region).digest() == before


def test_write_guard_refuses_unreserved_writes(pair):
    _, rx, region, tx = pair
    good = os.urandom(16)
    rx.set_write_guard(
        lambda tag, offset, nbytes: tag == good and offset >= 8192 and offset + nbytes <= 16384
    )
    with pytest.raises(TransferError, match=r"no reservation|refused"):
        tx.write(rx.endpoint, memoryview(b"x" * 100), 8192, 100, time.time() + 5, tag=os.urandom(16))
    with pytest.raises(TransferError):
        tx.write(rx.endpoint, memoryview(b"x" * 100), 16300, 100, time.time() + 5, tag=good)
    assert region[8192:8292] == bytes(100)
    big = 512 * 1024  # sent eagerly (no `go` round trip): the refusal must still arrive intact
    with pytest.raises(TransferError, match=r"no reservation|refused"):
        tx.write(rx.endpoint, memoryview(b"q" * big), 0, big, time.time() + 5, tag=os.urandom(16))
    assert region[:big] == bytes(big)
    tx.write(rx.endpoint, memoryview(b"y" * 100), 8192, 100, time.time() + 5, tag=good)
    assert region[8192:8292] == b"y" * 100


def test_deadline_already_passed(pair):
    _, rx, _, tx = pair
    with pytest.raises(TransferTimeoutError):
        tx.write(rx.endpoint, memoryview(b"x" * 10), 0, 10, time.time() - 1)


def test_tcp_peer_gone_is_unavailable_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        tx = make_backend("tcp", token=TOKEN)
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailableError):
            tx.write(
                {"backend": "tcp", "host": "127.0.0.1", "port": port, "nbytes": N},
                memoryview(b"x"),
                0,
                1,
                time.time() + 5,
            )
        assert time.monotonic() - t0 < 1.0
        tx.close()


def test_tcp_wrong_token_cannot_write():
    region = mmap.mmap(-1, N)
    rx = make_backend("tcp", token=TOKEN)
    rx.register(buffer_address(memoryview(region)), N, memoryview(region))
    intruder = make_backend("tcp", token=b"some-other-token-0123456789")
    try:
        with pytest.raises(AuthenticationError):
            intruder.write(rx.endpoint, memoryview(b"z" * 64), 0, 64, time.time() + 5)
        assert region[:64] == bytes(64)
    finally:
        intruder.close()
        rx.close()


def _raw_client(endpoint: dict) -> socket.socket:
    """Speak the tcp data protocol by hand (to stall mid-payload, which the real client never does)."""
    sock = socket.create_connection((endpoint["host"], endpoint["port"]), timeout=5)
    hello = sock.recv(36, socket.MSG_WAITALL)
    server_nonce, client_nonce = hello[4:], os.urandom(32)
    mac = hmac.new(TOKEN, b"dd-tcp-client" + server_nonce + client_nonce, hashlib.sha256).digest()
    sock.sendall(client_nonce + mac)
    assert sock.recv(33, socket.MSG_WAITALL)[0] == 0
    return sock


def test_tcp_quiesce_aborts_a_stalled_write_and_it_never_counts():
    region = mmap.mmap(-1, N)
    rx = make_backend("tcp", token=TOKEN)
    rx.register(buffer_address(memoryview(region)), N, memoryview(region))
    tag = os.urandom(16)
    try:
        sock = _raw_client(rx.endpoint)
        sock.sendall(struct.pack("!4sQQ16s", b"DDW1", 0, 65536, tag))
        assert sock.recv(1) == b"\x00"
        sock.sendall(b"p" * 1000)  # then the "sender" stalls
        deadline = time.monotonic() + 5
        while rx.inflight_writes == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rx.inflight_writes == 1
        t0 = time.monotonic()
        assert rx.quiesce(0, 4096, timeout=2.0)
        assert time.monotonic() - t0 < 1.0
        assert rx.inflight_writes == 0 and rx.landed(tag) == 0
        sock.close()
    finally:
        rx.close()


def test_loopback_endpoint_is_process_local():
    region = bytearray(N)
    rx = make_backend("loopback")
    rx.register(buffer_address(region), N, memoryview(region))
    assert rx.quiesce(0, N, timeout=0.1)  # nothing in flight
    foreign = dict(rx.endpoint, pid=rx.endpoint["pid"] + 1)
    with pytest.raises(PeerUnavailableError):
        rx.write(foreign, memoryview(b"x"), 0, 1, time.time() + 1)
    rx.close()
    with pytest.raises(PeerUnavailableError):
        rx.write(rx.endpoint, memoryview(b"x"), 0, 1, time.time() + 1)


def test_landed_log_is_bounded():
    log = LandedLog(max_entries=3)
    for i in range(10):
        log.add(bytes([i]) * 16, 5)
    assert log.take(bytes([0]) * 16) == 0 and log.take(bytes([9]) * 16) == 5


def test_source_view_checks():
    with pytest.raises(TransferError):
        source_view(b"abc", 10)
    with pytest.raises(TransferError):
        source_view(0, 10)
    assert bytes(source_view(b"abcdef", 3)) == b"abc"
    with pytest.raises(TransferError):
        buffer_address(b"read-only bytes")


def test_mooncake_env_is_explicit():
    env = mooncake_env(MooncakeConfig(protocol="tcp", rpc_port_min=15000, rpc_port_max=15063))
    assert env["MC_FORCE_TCP"] == "1" and "MC_FORCE_HCA" not in env
    assert (env["MC_MIN_RPC_PORT"], env["MC_MAX_RPC_PORT"]) == ("15000", "15063")
    assert env["MC_LOG_LEVEL"] == "ERROR"
    rdma = mooncake_env(MooncakeConfig(protocol="rdma"))
    assert rdma["MC_FORCE_HCA"] == "1" and "MC_FORCE_TCP" not in rdma
    assert "MC_FORCE_TCP" not in mooncake_env(MooncakeConfig(protocol="ascend"))
    with pytest.raises(TransferError):
        MooncakeConfig(protocol="nvlink")
    with pytest.raises(TransferError):
        MooncakeConfig(rpc_port_min=20000, rpc_port_max=19999)
    with pytest.raises(TransferError):
        MooncakeConfig(transfer_timeout_s=1)


@pytest.mark.parametrize("name", ["tcp", "loopback"])
def test_cpu_copying_backends_refuse_a_region_without_host_view(name):
    backend = make_backend(name, token=TOKEN)
    with pytest.raises(TransferError, match="host view"):
        backend.register(0x1000, N, None)  # e.g. device memory: must be staged through host memory
    backend.close()
