"""Failure injection with real processes and real sockets: kill, stop, flood, garbage.

Every test ends with a leak check: the receiver's allocator holds no slot (or only what the test holds
on purpose, then drained). Waits are bounded polls, never bare sleeps.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from diffdisagg.transport.backends import make_backend
from diffdisagg.transport.buffer import StagingBuffer
from diffdisagg.transport.codec import plan
from diffdisagg.transport.errors import (
    PeerBusyError,
    PeerUnavailableError,
    TransferError,
    TransferTimeoutError,
)
from diffdisagg.transport.handover import (
    HandoverReceiver,
    HandoverSender,
    Peer,
    ReceiverConfig,
    SenderConfig,
    register_buffer,
)
from diffdisagg.transport.handover import messages as m
from diffdisagg.transport.handover.auth import sign, verify
from diffdisagg.transport.manager import TransferManager
from diffdisagg.transport.platforms import current_platform

_spec = importlib.util.spec_from_file_location("dd_transport_peer", Path(__file__).with_name("peer.py"))
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)

TOKEN = peer.TOKEN
BIG = [{"name": "latents", "dtype": "float32", "shape": [16, 1024, 1024]}]  # 64 MiB


@pytest.fixture
def logs(tmp_path):
    return tmp_path


@pytest.fixture(scope="module")
def shared_rx(tmp_path_factory):
    """One consuming receiver process reused by the tests that leave it healthy (starting one is slow)."""
    rx = peer.PeerProcess(
        "receiver", "--buffer-bytes", str(80 << 20), "--consume", log_dir=tmp_path_factory.mktemp("shared-rx")
    )
    yield rx
    rx.close()


@pytest.fixture
def consuming_rx(shared_rx):
    assert shared_rx.proc.poll() is None
    yield shared_rx
    stats = _wait_rx_free(shared_rx)  # leak check after every test
    assert stats["reserved"] == 0 and stats["pushed"] == 0 and stats["claimed"] == 0


@pytest.fixture
def local_sender():
    """A sender in the test process with its own staging buffer, tcp backend and manager."""
    platform = current_platform()
    buf = StagingBuffer(80 << 20, platform)
    backend = make_backend("tcp", token=TOKEN)
    register_buffer(backend, buf)
    tx = HandoverSender(backend, SenderConfig(TOKEN, "rev-1", io_timeout_s=5.0))
    yield tx, TransferManager(platform, buf)
    tx.close()
    backend.close()
    assert buf.allocator.live_slots == 0, "sender leaked a staging slot"


def _rx_stats(rx):
    return rx.call(cmd="stats")


def _wait_rx_free(rx, timeout=8.0):
    return peer.wait_for(
        lambda: (s := _rx_stats(rx)["stats"])["live_slots"] == 0 and s,
        timeout=timeout,
        message="every receiver slot free",
    )


def test_receiver_killed_mid_transfer(logs, local_sender):
    tx, manager = local_sender
    rx = peer.PeerProcess("receiver", "--buffer-bytes", str(80 << 20), log_dir=logs)
    try:
        tensors = peer.make_tensors(BIG, 1)
        killer: list[threading.Timer] = []

        def on_progress(stage, info):
            if stage == "reserved":
                # Freeze it first so the 64 MiB cannot finish, then kill it while the write is blocked.
                rx.signal(signal.SIGSTOP)
                killer.append(threading.Timer(0.3, rx.signal, args=(signal.SIGKILL,)))
                killer[0].start()

        deadline_s = 5.0
        t0 = time.monotonic()  # tensors made above: the clock covers staging + hand-over only
        with pytest.raises(PeerUnavailableError):
            tx.send(
                Peer(*rx.control),
                request_id="kill-1",
                tensors=tensors,
                scalars={},
                deadline=time.time() + deadline_s,
                manager=manager,
                progress=on_progress,
            )
        elapsed = time.monotonic() - t0
        assert 0.25 < elapsed < deadline_s, elapsed
        assert rx.proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        rx.close()


@pytest.mark.parametrize(
    "spec",
    [BIG, [{"name": "x", "dtype": "float32", "shape": [1024]}]],
    ids=["64MiB-write-blocks", "4KiB-ack-lost"],
)
def test_receiver_stopped_mid_transfer(consuming_rx, local_sender, spec):
    tx, manager = local_sender
    rx = consuming_rx
    retired_before = _rx_stats(rx)["stats"]["counters"].get("retired", 0)
    pushed_before = _rx_stats(rx)["stats"]["counters"].get("pushed", 0)
    try:
        stopped = threading.Event()

        def on_progress(stage, info):
            if stage == "reserved":
                rx.signal(signal.SIGSTOP)
                stopped.set()

        deadline_s = 1.5
        tensors = peer.make_tensors(spec, 2)
        t0 = time.monotonic()
        with pytest.raises(TransferTimeoutError):
            tx.send(
                Peer(*rx.control),
                request_id="stop-1",
                tensors=tensors,
                scalars={},
                deadline=time.time() + deadline_s,
                manager=manager,
                progress=on_progress,
            )
        elapsed = time.monotonic() - t0
        assert stopped.is_set() and elapsed < deadline_s + 0.5, elapsed
        rx.signal(signal.SIGCONT)
        stats = _wait_rx_free(rx)
        out = _rx_stats(rx)
        assert "stop-1" not in out["results"], "receiver computed on a timed-out write"
        assert stats["counters"].get("retired", 0) == retired_before + 1
        assert stats["counters"].get("pushed", 0) == pushed_before
        # It recovered: the next hand-over goes through and is computed on, bit-exact.
        good = peer.make_tensors(spec, 3)
        tx.send(
            Peer(*rx.control),
            request_id=f"after-{len(spec[0]['shape'])}",
            tensors=good,
            scalars={},
            deadline=time.time() + 10,
            manager=manager,
        )
        got = peer.wait_for(
            lambda: _rx_stats(rx)["results"].get(f"after-{len(spec[0]['shape'])}"),
            timeout=10,
            message="delivery",
        )
        assert got == peer.tensor_hashes(good)
    finally:
        rx.signal(signal.SIGCONT)


def test_sender_killed_mid_write(logs):
    """Receiver in this process (so the in-flight write is observed directly), sender a real process."""
    platform = current_platform()
    buf = StagingBuffer(160 << 20, platform)
    backend = make_backend("tcp", token=TOKEN)
    register_buffer(backend, buf)
    rx = HandoverReceiver(
        buf, backend, ReceiverConfig(TOKEN, "rev-1", max_lease_s=3.0), TransferManager(platform, buf)
    ).start()
    sender = peer.PeerProcess("sender", "--buffer-bytes", str(160 << 20), log_dir=logs)
    try:
        spec = [{"name": "x", "dtype": "float32", "shape": [32, 1024, 1024]}]  # 128 MiB per hand-over
        expected = peer.tensor_hashes(peer.make_tensors(spec, 4))
        sender.post(
            cmd="send_loop", peers=[list(rx.address)], request_id="loop", tensors=spec, seed=4, deadline_s=3
        )
        delivered = []

        def drain():
            while (d := rx.receive(timeout=0)) is not None:
                delivered.append(peer.tensor_hashes(rx.load(d, "cpu")))

        def writing():
            drain()
            return backend.inflight_writes > 0

        peer.wait_for(writing, timeout=20, interval=0.0005, message="a write in flight")
        sender.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert sender.proc.wait(timeout=5) == -signal.SIGKILL

        def all_free():
            drain()
            return rx.stats()["live_slots"] == 0 and rx.stats()

        stats = peer.wait_for(all_free, timeout=3.0 + 2.0, message="slot of the killed sender freed")
        assert time.monotonic() - killed_at < 3.0 + 2.0
        assert stats["counters"]["retired"] >= 1  # the partial write was retired, not delivered
        assert backend.inflight_writes == 0
        assert all(h == expected for h in delivered), "a delivered payload is not bit-exact"
        assert stats["counters"].get("pushed", 0) == len(delivered)
    finally:
        sender.close()
        rx.close()
        backend.close()
    assert buf.allocator.live_slots == 0


def test_buffer_full_answers_busy_at_once(logs, local_sender, consuming_rx):
    tx, manager = local_sender
    small = peer.PeerProcess("receiver", "--buffer-bytes", str(1 << 20), log_dir=logs)
    roomy = consuming_rx
    try:
        spec = [{"name": "x", "dtype": "float32", "shape": [192, 1024]}]  # 768 KiB
        tx.send(
            Peer(*small.control),
            request_id="fills",
            tensors=peer.make_tensors(spec, 5),
            scalars={},
            deadline=time.time() + 10,
            manager=manager,
        )
        assert small.call(cmd="hold")["held"] == ["fills"]  # the worker is busy with it
        t0 = time.monotonic()
        with pytest.raises(PeerBusyError):
            tx.send(
                Peer(*small.control),
                request_id="second",
                tensors=peer.make_tensors(spec, 6),
                scalars={},
                deadline=time.time() + 30,
                manager=manager,
            )
        assert time.monotonic() - t0 < 0.5, "busy must come at once, not at the deadline"
        # Told about a second candidate, the sender moves on to it.
        tensors = peer.make_tensors(spec, 6)
        res = tx.send(
            [Peer(*small.control), Peer(*roomy.control)],
            request_id="second",
            tensors=tensors,
            scalars={},
            deadline=time.time() + 10,
            manager=manager,
        )
        assert res.peer == Peer(*roomy.control) and res.attempts == 2
        assert peer.wait_for(lambda: _rx_stats(roomy)["results"].get("second"), 10) == peer.tensor_hashes(
            tensors
        )
        assert _rx_stats(small)["stats"]["counters"]["busy"] == 2
        small.call(cmd="drain")
        _wait_rx_free(small)
    finally:
        small.close()


# ------------------------------------------------------------------------------ hostile control frames


def _frame(payload: bytes, token: bytes = TOKEN) -> bytes:
    return struct.pack("!I", 32 + len(payload)) + sign(token, payload) + payload


def _read_reply(sock: socket.socket) -> m.Message | None:
    sock.settimeout(5)
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (n,) = struct.unpack("!I", head)
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        assert chunk, "reply truncated"
        body += chunk
    assert verify(TOKEN, body[32:], body[:32]), "receiver reply not signed with the shared token"
    return m.decode(body[32:])


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _offer(**over) -> m.Offer:
    fields = dict(
        request_id="evil",
        revision="rev-1",
        deadline=time.time() + 30,
        nonce=os.urandom(16),
        seq=1,
        nbytes=4096,
        sizes=[4096],
        sender="test",
    )
    fields.update(over)
    return m.Offer(**fields)


@pytest.fixture
def hostile_target(consuming_rx):
    return consuming_rx


@pytest.mark.parametrize(
    "frame, reason",
    [
        (lambda: _frame(m.encode(_offer()), token=b"not-the-shared-token-at-all"), "auth"),
        (lambda: _frame(b"\xc1\xc1 not msgpack"), "protocol"),
        (lambda: _frame(m.encode(_offer())[:-3]), "protocol"),
        (
            lambda: _frame(__import__("msgpack").packb({"v": 1, "type": "offer", "request_id": "x"})),
            "protocol",
        ),
        (lambda: _frame(__import__("msgpack").packb({"v": 99, "type": "offer"})), "protocol"),
        (lambda: struct.pack("!I", 1 << 30) + b"\0" * 64, "too_large"),
        (lambda: _frame(m.encode(_offer(revision="rev-0"))), "revision"),
        (lambda: _frame(m.encode(_offer(deadline=time.time() - 60))), "deadline"),
        (lambda: _frame(m.encode(_offer(nbytes=128 << 20, sizes=[128 << 20]))), "too_large"),
        (
            lambda: _frame(
                m.encode(
                    m.Ack(
                        request_id="x",
                        revision="rev-1",
                        deadline=time.time() + 5,
                        nonce=os.urandom(16),
                        seq=1,
                        in_reply_to=bytes(16),
                    )
                )
            ),
            "protocol",
        ),
    ],
    ids=[
        "wrong-token",
        "garbage",
        "truncated-msgpack",
        "missing-fields",
        "wrong-version",
        "oversized",
        "wrong-revision",
        "expired",
        "bigger-than-buffer",
        "out-of-order",
    ],
)
def test_bad_frames_are_rejected(hostile_target, frame, reason):
    with socket.create_connection(hostile_target.control, timeout=5) as sock:
        sock.sendall(frame())
        reply = _read_reply(sock)
        assert isinstance(reply, m.Nack) and reply.reason == reason, reply
    counters = _rx_stats(hostile_target)["stats"]["counters"]
    assert counters.get(f"nack_{reason}", 0) + counters.get(f"rejected_{reason}", 0) >= 1


def test_replayed_offer_is_rejected(hostile_target):
    frame = _frame(m.encode(_offer(request_id="replay-me")))
    with socket.create_connection(hostile_target.control, timeout=5) as first:
        first.sendall(frame)
        assert isinstance(_read_reply(first), m.Reserved)
        with socket.create_connection(hostile_target.control, timeout=5) as second:
            second.sendall(frame)
            reply = _read_reply(second)
            assert isinstance(reply, m.Nack) and reply.reason == "replay"
            assert _closed(second)
        assert _rx_stats(hostile_target)["stats"]["reserved"] == 1
    # The first connection closed without pushing: its reservation is retired (checked by the fixture).


def test_pushed_without_bytes_is_never_delivered(hostile_target):
    """A sender that claims `pushed` without writing: tcp knows nothing landed, so no delivery."""
    with socket.create_connection(hostile_target.control, timeout=5) as sock:
        offer = _offer(request_id="liar")
        sock.sendall(_frame(m.encode(offer)))
        res = _read_reply(sock)
        assert isinstance(res, m.Reserved)
        manifest = plan({"x": torch.zeros(1024)}).to_dict()
        sock.sendall(
            _frame(
                m.encode(
                    m.Pushed(
                        request_id="liar",
                        revision="rev-1",
                        deadline=offer.deadline,
                        nonce=os.urandom(16),
                        seq=2,
                        slot_id=res.slot_id,
                        generation=res.generation,
                        tag=res.tag,
                        nbytes=4096,
                        manifest=manifest,
                    )
                )
            )
        )
        reply = _read_reply(sock)
        assert isinstance(reply, m.Nack) and reply.reason == "incomplete"
    assert "liar" not in _rx_stats(hostile_target)["results"]


def test_write_without_reservation_is_refused(hostile_target):
    backend = make_backend("tcp", token=TOKEN)
    try:
        endpoint = hostile_target.ready["endpoint"]
        with pytest.raises(TransferError, match="no reservation"):
            backend.write(endpoint, memoryview(bytearray(4096)), 0, 4096, time.time() + 5, tag=os.urandom(16))
        lying = dict(endpoint, nbytes=endpoint["nbytes"] * 4)  # a peer that lies about the region size
        with pytest.raises(TransferError, match="outside the registered region"):
            backend.write(lying, memoryview(bytearray(4096)), endpoint["nbytes"], 4096, time.time() + 5)
    finally:
        backend.close()
