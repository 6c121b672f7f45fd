"""One role of the split (or the monolithic reference) in its own process, for test_split_bitexact.

    python pipe_roles.py ROLE --models DIR --work DIR [--families flux,sd3,wan] [--seeds 7,8]
                              [--backends tcp,mooncake]

ROLE is prefill | denoise | decode | mono. The three roles talk through the real hand-over channel
(``diffdisagg.transport.handover``: offer -> reserved -> backend write -> pushed -> ack, HMAC-signed),
once per backend named in ``--backends``, each backend with its own staging buffer, exactly as a
worker wires it (``diffdisagg.worker.handoff``): denoise and decode run a ``HandoverReceiver`` and
publish its address in ``WORK/<role>.<backend>.addr.json``; prefill and denoise run a
``HandoverSender`` that waits (bounded) for the next role's address and pushes to it. decode and
mono write ``<role>.json`` with the SHA-256 of the decoded pixels (float32 bytes) and of the encoded
media. Every process pins the thread count and records where it ran (network namespace, interfaces,
hub-offline flag) so the test can check it really ran offline.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipe_support import THREADS, sha256_bytes, sha256_tensor, tiny_params

TOKEN = b"diffdisagg-bitexact-test-token-0001"  # test-only inter-role secret (>= 16 bytes)
REVISION = "bitexact-rev"
BUFFER_BYTES = 8 << 20  # the tiny tensors of one request are < 100 KiB; every request fits at once
WAIT_S = 150.0  # every wait below is bounded by this (the test's own timeout is the outer bound)
# Mooncake's RPC ports: the namespace is fresh, so any fixed range is free in it.
MC_PORTS = {"rpc_port_min": 15000, "rpc_port_max": 15063}


# ------------------------------------------------------------------------------ the hand-over wiring
@dataclass
class Channel:
    """One backend of this process: staging buffer + backend + manager (+ receiver / sender)."""

    backend_name: str
    buffer: Any
    backend: Any
    manager: Any
    receiver: Any = None
    sender: Any = None
    pushes: list[dict] = field(default_factory=list)

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        if self.sender is not None:
            self.sender.close()
        self.backend.close()
        self.buffer.close(force=True)  # a leak is reported (live_slots) and asserted by the test


def open_channel(backend_name: str, role: str, work: Path, receive: bool, send: bool) -> Channel:
    from diffdisagg.transport.backends import make_backend
    from diffdisagg.transport.buffer import StagingBuffer
    from diffdisagg.transport.handover import (
        HandoverReceiver,
        HandoverSender,
        ReceiverConfig,
        SenderConfig,
        register_buffer,
    )
    from diffdisagg.transport.manager import TransferManager
    from diffdisagg.transport.platforms import current_platform

    platform = current_platform()
    buffer = StagingBuffer(BUFFER_BYTES, platform)
    if backend_name == "mooncake":
        backend = make_backend("mooncake", host="127.0.0.1", protocol="tcp", **MC_PORTS)
    else:
        backend = make_backend(backend_name, token=TOKEN, host="127.0.0.1", port=0)
    register_buffer(backend, buffer)
    ch = Channel(backend_name, buffer, backend, TransferManager(platform, buffer))
    if receive:
        cfg = ReceiverConfig(TOKEN, REVISION, host="127.0.0.1", port=0, name=f"{role}-{backend_name}")
        ch.receiver = HandoverReceiver(buffer, backend, cfg, ch.manager).start()
        host, port = ch.receiver.address
        tmp = work / f".{role}.{backend_name}.addr.tmp"
        tmp.write_text(json.dumps({"host": host, "port": port, "backend": backend.endpoint["backend"]}))
        tmp.rename(work / f"{role}.{backend_name}.addr.json")  # atomic: never read half-written
    if send:
        ch.sender = HandoverSender(backend, SenderConfig(TOKEN, REVISION, name=f"{role}-{backend_name}"))
    return ch


def hand_over(ch: Channel, work: Path, to_role: str, request_id: str, tensors: dict, scalars: dict) -> None:
    """Push one stage's output into the next role's process (its receiver on this backend)."""
    from diffdisagg.transport.handover import Peer

    addr_file = work / f"{to_role}.{ch.backend_name}.addr.json"
    end = time.monotonic() + WAIT_S
    while not addr_file.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"{to_role} never published its {ch.backend_name} receiver")
        time.sleep(0.05)
    addr = json.loads(addr_file.read_text())
    res = ch.sender.send(
        Peer(addr["host"], addr["port"], f"{to_role}-{ch.backend_name}"),
        request_id=request_id,
        tensors=tensors,
        scalars=scalars,
        deadline=time.time() + WAIT_S,
        manager=ch.manager,
    )
    ch.pushes.append({"request_id": request_id, "nbytes": res.nbytes, "attempts": res.attempts})


def take_overs(channels: list[Channel], expected: int):
    """Yield (channel, delivery, tensors) for `expected` deliveries per channel; slots freed on load."""
    left = {ch.backend_name: expected for ch in channels}
    end = time.monotonic() + WAIT_S
    while any(left.values()):
        if time.monotonic() > end:
            raise TimeoutError(f"hand-overs still missing: {left}")
        for ch in channels:
            if not left[ch.backend_name]:
                continue
            d = ch.receiver.receive(timeout=0.05)
            if d is None:
                continue
            tensors = ch.receiver.load(d, "cpu")  # the TransferManager's load, then the slot is freed
            left[ch.backend_name] -= 1
            yield ch, d, tensors


def channel_report(ch: Channel) -> dict:
    out: dict[str, Any] = {"backend": ch.backend.endpoint["backend"], "pushes": ch.pushes}
    if ch.receiver is not None:
        out["receiver"] = dict(ch.receiver.counters)
    out["live_slots"] = ch.buffer.allocator.live_slots
    return out


# ---------------------------------------------------------------------------------------------------


def _environment() -> dict:
    return {
        "netns": os.readlink("/proc/self/ns/net"),
        "interfaces": [name for _, name in socket.if_nameindex()],
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }


def _shapes(tensors: dict[str, torch.Tensor]) -> dict:
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "nbytes": v.nbytes}
        for k, v in tensors.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["prefill", "denoise", "decode", "mono"])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--families", default="flux,sd3,wan")
    ap.add_argument("--seeds", default="7")
    ap.add_argument("--backends", default="tcp")
    args = ap.parse_args()

    torch.set_num_threads(THREADS)
    from diffdisagg.worker.pipelines import StageInput, load_pipeline, load_role, monolithic_call
    from diffdisagg.worker.pipelines.loading import quiet_hf_logging
    from diffdisagg.worker.pipelines.media import encode_mp4, encode_png

    quiet_hf_logging()
    role, work = args.role, args.work
    families = args.families.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    report: dict = {"env": _environment(), "stages": {}, "channels": {}}

    if role == "mono":
        for family in families:
            pipe = load_pipeline(family, args.models / family)
            for seed in seeds:
                t0 = time.perf_counter()
                pixels = monolithic_call(pipe, family, tiny_params(family, seed=seed))
                media = encode_mp4(pixels[0]) if family == "wan" else encode_png(pixels[0])
                report["stages"][f"{family}.{seed}"] = {
                    "pixels": sha256_tensor(pixels),
                    "media": sha256_bytes(media),
                    "shape": list(pixels.shape),
                    "seconds": time.perf_counter() - t0,
                }
        (work / "mono.json").write_text(json.dumps(report, indent=1))
        return 0

    # Models first, then the receivers: an offer never waits for a model load.
    adapters = {f: load_role(f, role, args.models / f) for f in families}
    channels = [
        open_channel(b, role, work, receive=role != "prefill", send=role != "decode")
        for b in args.backends.split(",")
    ]
    try:
        if role == "prefill":
            for family in families:
                for seed in seeds:
                    tag = f"{family}.{seed}"
                    params = tiny_params(family, seed=seed).to_dict()
                    out = adapters[family].run_batch([StageInput(tag, {"params": params})])[0]
                    for ch in channels:  # the same tensors through every backend
                        hand_over(ch, work, "denoise", f"{tag}.{ch.backend_name}", out.tensors, out.scalars)
                    report["stages"][tag] = {"sent": _shapes(out.tensors)}
        else:
            for ch, d, tensors in take_overs(channels, len(families) * len(seeds)):
                family = d.request_id.split(".")[0]
                item = StageInput(d.request_id, dict(d.scalars), tensors)
                result: dict[str, Any] = {"received": _shapes(tensors), "sender": d.sender}
                t0 = time.perf_counter()
                if role == "denoise":
                    out = adapters[family].run_batch([item])[0]
                    hand_over(ch, work, "decode", d.request_id, out.tensors, out.scalars)
                    result["sent"] = _shapes(out.tensors)
                else:
                    pixels = adapters[family].pixels([item])
                    out = adapters[family].run_batch([item])[0]
                    result.update(
                        pixels=sha256_tensor(pixels),
                        media=sha256_bytes(out.media or b""),
                        media_type=out.media_type,
                        media_bytes=len(out.media or b""),
                        shape=list(pixels.shape),
                    )
                result["seconds"] = time.perf_counter() - t0
                report["stages"][d.request_id] = result
    finally:
        for ch in channels:
            report["channels"][ch.backend_name] = channel_report(ch)
            ch.close()
    (work / f"{role}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
