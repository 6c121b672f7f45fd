"""Mooncake backend, for real: the non-CUDA wheel in two processes over its TCP transport (no RNIC here).

These tests never skip: the wheel and libibverbs1 are installed by `make install`. What is a stand-in:
the RDMA path itself (no RNIC on this machine); the engine, its P2P handshake, its one-sided writes,
timeouts and failure codes are the real ones. Engines live in peer processes, never in pytest's.
"""

from __future__ import annotations

import importlib.util
import signal
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("dd_transport_peer", Path(__file__).with_name("peer.py"))
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)

PORTS = ("--mc-port-min", "15100", "--mc-port-max", "15163")


@pytest.fixture(scope="module")
def mc_sender(tmp_path_factory):
    tx = peer.PeerProcess("sender", "--backend", "mooncake", *PORTS, log_dir=tmp_path_factory.mktemp("mc-tx"))
    yield tx
    tx.close()


def _spawn_receiver(log_dir):
    return peer.PeerProcess(
        "receiver",
        "--backend",
        "mooncake",
        "--buffer-bytes",
        str(80 << 20),
        "--consume",
        *PORTS,
        log_dir=log_dir,
    )


@pytest.fixture(scope="module")
def shared_receiver(tmp_path_factory):
    rx = _spawn_receiver(tmp_path_factory.mktemp("mc-rx"))
    yield rx
    rx.close()


@pytest.fixture
def mc_receiver(shared_receiver):
    """The shared receiver, checked healthy and leak-free after each test."""
    yield shared_receiver
    shared_receiver.signal(signal.SIGCONT)
    stats = peer.wait_for(
        lambda: (s := shared_receiver.call(cmd="stats")["stats"])["live_slots"] == 0 and s,
        12,
        message="no leak",
    )
    assert stats["reserved"] == 0 and stats["pushed"] == 0


def test_engine_configuration_is_explicit(mc_receiver):
    env = mc_receiver.ready["env"]
    assert env["MC_FORCE_TCP"] == "1" and "MC_FORCE_HCA" not in env
    assert env["MC_LOG_LEVEL"] == "ERROR" and env["MC_TRANSFER_TIMEOUT"] == "5"
    endpoint = mc_receiver.ready["endpoint"]
    assert endpoint["backend"] == "mooncake" and endpoint["nbytes"] == 80 << 20
    host, port = endpoint["session"].rsplit(":", 1)
    assert host == "127.0.0.1" and 15100 <= int(port) <= 15163  # the fixed, policy-named range


def test_hand_over_through_mooncake(mc_receiver, mc_sender):
    spec = [{"name": "latents", "dtype": "float32", "shape": [1, 16, 21, 60, 104]}]
    reply = mc_sender.call(
        cmd="send", peers=[mc_receiver.control], request_id="mc-1", tensors=spec, seed=11, deadline_s=15
    )
    assert reply["ok"], reply
    got = peer.wait_for(lambda: mc_receiver.call(cmd="stats")["results"].get("mc-1"), 10, message="delivery")
    assert got == reply["hashes"] == peer.tensor_hashes(peer.make_tensors(spec, 11))
    assert peer.wait_for(lambda: mc_receiver.call(cmd="stats")["stats"]["live_slots"] == 0, 5)


def test_write_outside_the_region_is_refused_by_the_engine(mc_receiver, mc_sender):
    endpoint = mc_receiver.ready["endpoint"]
    lying = dict(endpoint, nbytes=endpoint["nbytes"] * 2)  # our own range check is bypassed on purpose
    reply = mc_sender.call(
        cmd="write_raw", endpoint=lying, offset=endpoint["nbytes"], nbytes=4096, deadline_s=5
    )
    assert not reply["ok"] and reply["error"] == "TransferError", reply
    ok = mc_sender.call(cmd="write_raw", endpoint=endpoint, offset=0, nbytes=4096, deadline_s=5)
    assert ok["ok"], ok  # the engine recovered


def test_dead_peer_is_unavailable_at_once(tmp_path, mc_sender):
    mc_receiver = _spawn_receiver(tmp_path)
    endpoint = mc_receiver.ready["endpoint"]
    assert mc_sender.call(cmd="write_raw", endpoint=endpoint, offset=0, nbytes=4096, deadline_s=5)["ok"]
    mc_receiver.signal(signal.SIGKILL)
    mc_receiver.proc.wait(timeout=5)
    reply = mc_sender.call(cmd="write_raw", endpoint=endpoint, offset=0, nbytes=1 << 20, deadline_s=5)
    mc_receiver.close()
    assert not reply["ok"] and reply["error"] == "PeerUnavailableError", reply
    assert reply["elapsed"] < 1.0


def test_stopped_peer_times_out_without_spinning_and_batch_is_reaped(mc_receiver, mc_sender):
    endpoint = mc_receiver.ready["endpoint"]
    mc_receiver.signal(signal.SIGSTOP)
    try:
        reply = mc_sender.call(cmd="write_raw", endpoint=endpoint, offset=0, nbytes=64 << 20, deadline_s=1.0)
        assert not reply["ok"] and reply["error"] == "TransferTimeoutError", reply
        assert 0.9 < reply["elapsed"] < 2.0
        assert reply["cpu"] < 0.5 * reply["elapsed"], "the wait must sleep, not spin a core"
        assert reply["pending_batches"] == 1  # handed to the reaper, not polled after completion
    finally:
        mc_receiver.signal(signal.SIGCONT)
    # The reaper sees the orphaned batch through to its end (done, failed or the engine's timeout).
    peer.wait_for(
        lambda: mc_sender.call(cmd="pending")["pending_batches"] == 0,
        timeout=12,
        message="orphaned batch reaped",
    )


def test_timed_out_hand_over_quarantines_the_slot_then_frees_it(mc_receiver, mc_sender):
    """A one-sided write cannot be aborted: the receiver holds the slot back, never delivers it."""
    spec = [{"name": "x", "dtype": "float32", "shape": [16, 1024, 1024]}]  # 64 MiB
    for attempt in range(3):  # the stop must land mid-write; a write that wins the race is retried
        request_id = f"mc-stuck-{attempt}"
        mc_receiver.signal(signal.SIGSTOP)
        mc_sender.post(
            cmd="send",
            peers=[mc_receiver.control],
            request_id=request_id,
            tensors=spec,
            seed=1,
            deadline_s=3.0,
        )
        # The offer itself waits on the stopped receiver; let it through, then freeze again mid-write.
        time.sleep(0.05)
        mc_receiver.signal(signal.SIGCONT)
        peer.wait_for(lambda: mc_receiver.call(cmd="stats")["stats"]["reserved"] == 1, 5, interval=0.001)
        mc_receiver.signal(signal.SIGSTOP)
        reply = mc_sender.reply(timeout=15)
        mc_receiver.signal(signal.SIGCONT)
        if not reply["ok"]:
            break
        # The 64 MiB beat the SIGSTOP: nothing to quarantine, but what was delivered must be exact.
        got = peer.wait_for(lambda: mc_receiver.call(cmd="stats")["results"].get(request_id), 5)  # noqa: B023
        assert got == reply["hashes"]
    else:
        pytest.fail("every write finished before the receiver was stopped; the fault was not injected")
    assert reply["error"] in ("TransferTimeoutError", "DeadlineExceededError"), reply
    stats = peer.wait_for(
        lambda: (s := mc_receiver.call(cmd="stats")["stats"])["quarantined"] == 1 and s,
        5,
        message="slot quarantined",
    )
    assert stats["live_slots"] == 1 and stats["pushed"] == 0
    stats = peer.wait_for(
        lambda: (s := mc_receiver.call(cmd="stats")["stats"])["live_slots"] == 0 and s,
        12,
        message="quarantine over, slot freed",
    )
    assert request_id not in mc_receiver.call(cmd="stats")["results"]
