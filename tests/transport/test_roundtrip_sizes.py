"""Real-size hand-overs between two processes over every backend, compared byte for byte (SHA-256).

Sizes from the target models: FLUX prompt embeddings [1, 512, 4096] bf16 (+ pooled [1, 768]), Wan2.1
latents [1, 16, 21, 60, 104] fp32, and a 24 MiB three-tensor hop. tcp and mooncake run between a sender
process and a receiver process; loopback (in-process by definition) runs in the test process.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("dd_transport_peer", Path(__file__).with_name("peer.py"))
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)

PAYLOADS = {
    "flux_prompt": [
        {"name": "prompt_embeds", "dtype": "bfloat16", "shape": [1, 512, 4096]},
        {"name": "pooled_prompt_embeds", "dtype": "bfloat16", "shape": [1, 768]},
    ],
    "wan_latents": [{"name": "latents", "dtype": "float32", "shape": [1, 16, 21, 60, 104]}],
    "three_24mib": [
        {"name": "a", "dtype": "float32", "shape": [1, 4096, 512]},
        {"name": "b", "dtype": "bfloat16", "shape": [2, 4096, 512]},
        {"name": "c", "dtype": "float16", "shape": [4, 1024, 1024]},
    ],
}


def test_three_tensor_hop_is_24_mib():
    tensors = peer.make_tensors(PAYLOADS["three_24mib"], 0)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == 24 << 20


@pytest.fixture(scope="module", params=["tcp", "mooncake"])
def pair(request, tmp_path_factory):
    logs = tmp_path_factory.mktemp(f"peers-{request.param}")
    rx = peer.PeerProcess(
        "receiver", "--backend", request.param, "--buffer-bytes", str(64 << 20), "--consume", log_dir=logs
    )
    tx = peer.PeerProcess("sender", "--backend", request.param, "--buffer-bytes", str(64 << 20), log_dir=logs)
    yield request.param, rx, tx
    tx.close()
    rx.close()


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_two_process_round_trip(pair, payload):
    backend, rx, tx = pair
    request_id = f"{backend}-{payload}"
    reply = tx.call(
        cmd="send",
        peers=[rx.control],
        request_id=request_id,
        tensors=PAYLOADS[payload],
        seed=sorted(PAYLOADS).index(payload),
        scalars={"height": 480, "width": 832},
        deadline_s=20,
    )
    assert reply["ok"], reply
    assert reply["live_slots"] == 0  # the sender's own staging slot was given back
    expected = peer.tensor_hashes(peer.make_tensors(PAYLOADS[payload], sorted(PAYLOADS).index(payload)))
    assert reply["hashes"] == expected
    got = peer.wait_for(
        lambda: rx.call(cmd="stats")["results"].get(request_id),
        timeout=10,
        message="receiver computed on the delivery",
    )
    assert got == expected
    stats = peer.wait_for(
        lambda: (s := rx.call(cmd="stats")["stats"])["live_slots"] == 0 and s,
        timeout=5,
        message="receiver slot freed",
    )
    assert stats["used_bytes"] == 0


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_loopback_round_trip(payload):
    from diffdisagg.transport.backends import make_backend
    from diffdisagg.transport.buffer import StagingBuffer
    from diffdisagg.transport.handover import (
        HandoverReceiver,
        HandoverSender,
        Peer,
        ReceiverConfig,
        SenderConfig,
        register_buffer,
    )
    from diffdisagg.transport.manager import TransferManager
    from diffdisagg.transport.platforms import current_platform

    platform = current_platform()
    rbuf, sbuf = StagingBuffer(32 << 20, platform), StagingBuffer(32 << 20, platform)
    backend = make_backend("loopback")  # one region per backend: the receiver's
    register_buffer(backend, rbuf)
    with (
        HandoverReceiver(
            rbuf, backend, ReceiverConfig(peer.TOKEN, "r"), TransferManager(platform, rbuf)
        ) as rx,
        HandoverSender(backend, SenderConfig(peer.TOKEN, "r")) as tx,
    ):
        tensors = peer.make_tensors(PAYLOADS[payload], 7)
        tx.send(
            Peer(*rx.address),
            request_id=payload,
            tensors=tensors,
            scalars={"k": 1},
            deadline=time.time() + 10,
            manager=TransferManager(platform, sbuf),
        )
        delivery = rx.receive(timeout=5)
        assert delivery is not None and delivery.scalars == {"k": 1}
        out = rx.load(delivery, "cpu")
        assert peer.tensor_hashes(out) == peer.tensor_hashes(tensors)
        assert all(out[k].dtype == tensors[k].dtype and out[k].shape == tensors[k].shape for k in tensors)
        assert rx.stats()["live_slots"] == 0 and sbuf.allocator.live_slots == 0
        assert torch.equal(out[next(iter(out))], tensors[next(iter(tensors))])
