"""Hand-over channel: message schema, authentication, replay protection and the slot life cycle.

Receiver and sender run in this process over loopback and tcp (the backends' own contract is in
test_backends.py; real-process failures in test_faults.py). Every test ends with no live slot.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import msgpack
import pytest
import torch

from diffdisagg.transport.backends import make_backend
from diffdisagg.transport.buffer import StagingBuffer
from diffdisagg.transport.errors import (
    AuthenticationError,
    DeadlineExceededError,
    HandoverError,
    PeerBusyError,
    PeerUnavailableError,
    ProtocolError,
    RevisionMismatchError,
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
from diffdisagg.transport.handover.auth import ReplayGuard, load_token, sign, verify
from diffdisagg.transport.manager import TransferManager
from diffdisagg.transport.platforms import current_platform

TOKEN = b"handover-test-token-0123456789"


# ------------------------------------------------------------------------------------------ messages


def _common(**over):
    fields = dict(request_id="r-1", revision="rev", deadline=time.time() + 10, nonce=os.urandom(16), seq=3)
    fields.update(over)
    return fields


SAMPLES = [
    m.Offer(**_common(), nbytes=4096, sizes=[1000, 2000], sender="prefill-0"),
    m.Reserved(
        **_common(),
        in_reply_to=os.urandom(16),
        slot_id=1,
        generation=2,
        offset=512,
        nbytes=4096,
        tag=os.urandom(16),
        lease_deadline=time.time() + 5,
        endpoint={"backend": "tcp", "host": "10.0.0.1", "port": 8200, "nbytes": 1 << 30},
    ),
    m.Busy(**_common(), in_reply_to=os.urandom(16), free_bytes=10, largest_free_block=10),
    m.Pushed(
        **_common(),
        slot_id=1,
        generation=2,
        tag=os.urandom(16),
        nbytes=4096,
        manifest={"version": 1, "tensors": [], "scalars": {"seed": 1}},
    ),
    m.Ack(**_common(), in_reply_to=os.urandom(16)),
    m.Nack(**_common(), in_reply_to=os.urandom(16), reason="busy", detail="x"),
    m.Cancel(**_common(), slot_id=1, generation=2, tag=os.urandom(16), reason="timeout"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: x.TYPE)
def test_messages_round_trip(msg):
    assert m.decode(m.encode(msg)) == msg


def _mutated(**changes):
    body = msgpack.unpackb(m.encode(SAMPLES[0]), raw=False)
    body.update(changes)
    return msgpack.packb({k: v for k, v in body.items() if v is not _DROP}, use_bin_type=True)


_DROP = object()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        _mutated(v=2),
        _mutated(type="teleport"),
        _mutated(nbytes=_DROP),
        _mutated(extra=1),
        _mutated(nbytes=-1),
        _mutated(nbytes=True),
        _mutated(nbytes="4096"),
        _mutated(deadline=float("nan")),
        _mutated(nonce=b"short"),
        _mutated(sizes=[1, -2]),
        _mutated(request_id="x" * 1000),
        _mutated(sender=5),
    ],
    ids=[
        "empty",
        "invalid-byte",
        "not-a-map",
        "version",
        "type",
        "missing",
        "extra",
        "negative",
        "bool",
        "string-int",
        "nan",
        "nonce-length",
        "negative-size",
        "long-id",
        "wrong-type",
    ],
)
def test_malformed_messages_raise_protocol_error(payload):
    with pytest.raises(ProtocolError):
        m.decode(payload)


def test_messages_module_is_torch_free():
    import subprocess
    import sys

    code = (
        "import sys; import diffdisagg.transport.handover.messages, diffdisagg.transport.handover.auth; "
        "import diffdisagg.transport.handover; assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = dict(os.environ)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# ---------------------------------------------------------------------------------------------- auth


def test_sign_and_verify(tmp_path):
    payload = m.encode(SAMPLES[0])
    mac = sign(TOKEN, payload)
    assert verify(TOKEN, payload, mac)
    assert not verify(b"another-token-0123456789", payload, mac)
    assert not verify(TOKEN, payload + b"x", mac)
    assert not verify(TOKEN, payload, mac[:-1] + bytes([mac[-1] ^ 1]))
    (tmp_path / "token").write_bytes(TOKEN + b"\n")
    assert load_token(tmp_path / "token") == TOKEN
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(AuthenticationError):
        load_token(tmp_path / "short")
    with pytest.raises(AuthenticationError):
        load_token(tmp_path / "missing")


def test_replay_guard():
    guard = ReplayGuard(max_horizon_s=60, clock_skew_s=1, max_entries=3)
    now = 1000.0
    guard.check(b"a" * 16, now + 10, now)
    with pytest.raises(AuthenticationError):
        guard.check(b"a" * 16, now + 10, now)
    with pytest.raises(DeadlineExceededError):
        guard.check(b"b" * 16, now - 5, now)
    with pytest.raises(ProtocolError):
        guard.check(b"c" * 16, now + 3600, now)
    guard.check(b"d" * 16, now + 1, now)
    guard.check(b"e" * 16, now + 1, now)
    with pytest.raises(ProtocolError):  # cap reached; nothing expired yet
        guard.check(b"f" * 16, now + 1, now)
    guard.check(b"f" * 16, now + 20, now + 5)  # d and e expired and were pruned
    assert len(guard) == 2


# ------------------------------------------------------------------------------------------ channel


class Rig:
    def __init__(self, backend_name: str, rx_bytes: int = 4 << 20, revision: str = "rev", **rx_cfg):
        platform = current_platform()
        self.rbuf = StagingBuffer(rx_bytes, platform)
        self.sbuf = StagingBuffer(8 << 20, platform)
        self.rbackend = make_backend(backend_name, token=TOKEN)
        register_buffer(self.rbackend, self.rbuf)
        if backend_name == "loopback":
            self.sbackend = self.rbackend
        else:
            self.sbackend = make_backend(backend_name, token=TOKEN)
            register_buffer(self.sbackend, self.sbuf)
        self.rx = HandoverReceiver(
            self.rbuf,
            self.rbackend,
            ReceiverConfig(TOKEN, revision, **rx_cfg),
            TransferManager(platform, self.rbuf),
        ).start()
        self.manager = TransferManager(platform, self.sbuf)
        self.tx = HandoverSender(self.sbackend, SenderConfig(TOKEN, revision))
        self.peer = Peer(*self.rx.address)

    def send(self, request_id: str, tensors, deadline_s: float = 5.0, tx=None, peers=None, **kw):
        return (tx or self.tx).send(
            peers or self.peer,
            request_id=request_id,
            tensors=tensors,
            scalars=kw.pop("scalars", {}),
            deadline=time.time() + deadline_s,
            manager=self.manager,
            **kw,
        )

    def close(self):
        self.tx.close()
        self.rx.close()
        for b in {self.rbackend, self.sbackend}:
            b.close()
        assert self.rbuf.allocator.live_slots == 0, "receiver leaked a slot"
        assert self.sbuf.allocator.live_slots == 0, "sender leaked a slot"


@pytest.fixture(params=["loopback", "tcp"])
def rig(request):
    r = Rig(request.param)
    yield r
    r.close()


def test_hand_over_delivers_tensors_and_scalars(rig):
    tensors = {
        "embeds": torch.randn(2, 77, 64).to(torch.bfloat16),
        "mask": torch.ones(2, 77, dtype=torch.bool),
        "empty": torch.empty(0, 3),
    }
    events = []
    res = rig.send(
        "req-1",
        tensors,
        scalars={"seed": 42, "steps": 28, "prompt": "a cat"},
        progress=lambda stage, info: events.append(stage),
    )
    assert events == ["reserved", "written", "acked"]
    assert res.attempts == 1 and res.nbytes > 0
    delivery = rig.rx.receive(timeout=2)
    assert delivery is not None and delivery.request_id == "req-1"
    assert delivery.scalars == {"seed": 42, "steps": 28, "prompt": "a cat"}
    out = rig.rx.load(delivery, "cpu")
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape and torch.equal(out[name], t)
    assert rig.rx.stats()["live_slots"] == 0
    assert rig.rx.receive(timeout=0.05) is None


def test_load_async_then_release(rig):
    rig.send("req-a", {"x": torch.arange(1000, dtype=torch.float32)})
    d = rig.rx.receive(timeout=2)
    tensors, ticket = rig.rx.load_async(d, "cpu")
    ticket.wait()
    rig.rx.release(d, ticket)
    rig.rx.release(d, ticket)  # idempotent
    assert torch.equal(tensors["x"], torch.arange(1000, dtype=torch.float32))
    with pytest.raises(HandoverError):
        rig.rx.view(d)  # released: the bytes are no longer ours


def test_busy_is_immediate_and_other_peer_is_tried(rig):
    x = {"x": torch.zeros(768 * 1024, dtype=torch.uint8)}
    rig.send("big-1", x)
    rig.send("big-2", x)
    held = [rig.rx.receive(timeout=1) for _ in range(2)]  # 1.5 MiB of 4 MiB held, 2.5 left...
    rig.send("big-3", x)  # ...fits
    held.append(rig.rx.receive(timeout=1))
    rig.send("big-4", x)
    held.append(rig.rx.receive(timeout=1))
    t0 = time.monotonic()
    with pytest.raises(PeerBusyError):
        rig.send("big-5", {"x": torch.zeros(2 << 20, dtype=torch.uint8)}, deadline_s=30)
    assert time.monotonic() - t0 < 0.5
    other = Rig("tcp")
    try:
        res = rig.send(
            "big-5", {"x": torch.zeros(2 << 20, dtype=torch.uint8)}, tx=other.tx, peers=[rig.peer, other.peer]
        )
        assert res.peer == other.peer and res.attempts == 2
        other.rx.load(other.rx.receive(timeout=1))
    finally:
        other.close()
    for d in held:
        rig.rx.release(d)
    assert rig.rx.stats()["counters"]["busy"] >= 1


def test_admission_refusal_is_an_immediate_busy_without_a_slot(rig):
    # The worker's admit callback says no (its scheduler is full): busy at once, nothing reserved,
    # and a sender with another candidate moves on to it.
    seen, verdict = [], {"ok": False}

    def admit(offer: m.Offer) -> bool:
        seen.append((offer.request_id, offer.nbytes, offer.sender))
        if verdict["ok"] is None:
            raise RuntimeError("admission check broke")
        return verdict["ok"]

    rig.rx.set_admit(admit)
    x = {"x": torch.arange(4096, dtype=torch.float32)}
    t0 = time.monotonic()
    with pytest.raises(PeerBusyError):
        rig.send("adm-1", x, deadline_s=30)
    assert time.monotonic() - t0 < 0.5
    st = rig.rx.stats()
    assert st["live_slots"] == 0 and st["reserved"] == 0 and "reserved" not in st["counters"]
    assert st["counters"]["busy_not_admitted"] == 1 and seen[0][0] == "adm-1" and seen[0][1] > 0

    other = Rig("tcp")
    try:
        res = rig.send("adm-1", x, tx=other.tx, peers=[rig.peer, other.peer], deadline_s=30)
        assert res.peer == other.peer and res.attempts == 2
        assert torch.equal(other.rx.load(other.rx.receive(timeout=1))["x"], x["x"])
    finally:
        other.close()
    assert rig.rx.stats()["live_slots"] == 0 and len(seen) == 2, seen

    verdict["ok"] = None  # a failing callback counts as "no": busy, never a crash or a leak
    with pytest.raises(PeerBusyError):
        rig.send("adm-2", x)
    assert rig.rx.stats()["counters"]["busy_not_admitted"] == 3

    verdict["ok"] = True
    rig.send("adm-3", x)
    assert torch.equal(rig.rx.load(rig.rx.receive(timeout=1))["x"], x["x"])
    rig.rx.set_admit(None)  # removed: offers are no longer asked about
    rig.send("adm-4", x)
    rig.rx.load(rig.rx.receive(timeout=1))
    assert [r for r, _, _ in seen] == ["adm-1", "adm-1", "adm-2", "adm-3"]


def test_revision_mismatch_rejected_and_logged(rig, caplog):
    old = HandoverSender(rig.sbackend, SenderConfig(TOKEN, "rev-old"))
    with pytest.raises(RevisionMismatchError):
        rig.send("r", {"x": torch.ones(4)}, tx=old)
    old.close()
    assert any("revision" in r.getMessage() for r in caplog.records)
    assert rig.rx.stats()["counters"]["rejected_revision"] == 1


def test_wrong_token_rejected(rig):
    intruder = HandoverSender(rig.sbackend, SenderConfig(b"intruder-token-0123456789", "rev"))
    with pytest.raises(AuthenticationError):
        rig.send("r", {"x": torch.ones(4)}, tx=intruder)
    intruder.close()
    assert rig.rx.stats()["counters"]["rejected_auth"] == 1


def test_deadline_in_the_past(rig):
    with pytest.raises(DeadlineExceededError):
        rig.send("late", {"x": torch.ones(4)}, deadline_s=-1)


def test_duplicate_request_refused_while_first_is_held(rig):
    rig.send("dup", {"x": torch.ones(4)})
    held = rig.rx.receive(timeout=1)
    with pytest.raises(ProtocolError, match="duplicate"):
        rig.send("dup", {"x": torch.ones(4)})
    rig.rx.release(held)
    rig.send("dup", {"x": torch.ones(4)})  # after release the id may come again (a retry)
    rig.rx.load(rig.rx.receive(timeout=1))


def test_too_large_for_the_receiver(rig):
    with pytest.raises(ProtocolError, match="too_large"):
        rig.send("huge", {"x": torch.zeros(5 << 20, dtype=torch.uint8)})


def test_unclaimed_delivery_expires_and_frees_its_slot():
    rig = Rig("tcp", clock_skew_s=0.0, reap_interval_s=0.02)
    try:
        rig.send("stale", {"x": torch.ones(16)}, deadline_s=0.5)
        assert rig.rx.stats()["pushed"] == 1
        deadline = time.monotonic() + 3
        while rig.rx.stats()["live_slots"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rig.rx.stats()["live_slots"] == 0
        assert rig.rx.receive(timeout=0) is None  # never handed out after its deadline
    finally:
        rig.close()


def test_lease_expiry_frees_a_reservation_nobody_pushes():
    rig = Rig("tcp", max_lease_s=0.3, reap_interval_s=0.02)
    try:
        with socket.create_connection(rig.rx.address, timeout=5) as sock:
            offer = m.Offer(**_common(revision="rev"), nbytes=4096, sizes=[4096], sender="silent")
            payload = m.encode(offer)
            sock.sendall(struct.pack("!I", 32 + len(payload)) + sign(TOKEN, payload) + payload)
            time.sleep(0.05)
            assert rig.rx.stats()["reserved"] == 1
            deadline = time.monotonic() + 3
            while rig.rx.stats()["live_slots"] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert rig.rx.stats()["live_slots"] == 0 and rig.rx.stats()["counters"]["expired"] == 1
    finally:
        rig.close()


def test_unreachable_receiver():
    rig = Rig("tcp")
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            with pytest.raises(PeerUnavailableError):
                rig.send("nowhere", {"x": torch.ones(4)}, peers=Peer("127.0.0.1", s.getsockname()[1]))
    finally:
        rig.close()


def test_close_frees_everything_not_claimed():
    rig = Rig("tcp")
    rig.send("a", {"x": torch.ones(4)})
    rig.send("b", {"x": torch.ones(4)})
    assert rig.rx.stats()["live_slots"] == 2
    rig.close()  # asserts no live slot
