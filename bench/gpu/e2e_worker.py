"""One process of the GPU end-to-end benchmark: the monolithic pipeline, or one role of the split.

Started by ``bench_e2e_gpu.py`` (``python e2e_worker.py ROLE CONFIG_JSON``). Talks to the driver with
JSON lines: requests and peer addresses on stdin, events on stdout prefixed with ``@@ `` (anything
else a library prints is ignored). Roles reuse the project's role adapters
(``diffdisagg.worker.pipelines.roles``) over an in-memory random-weight pipeline (``realsize.py``), and
hand tensors over with the real transport: ``StagingBuffer`` (pinned) + ``TransferManager`` +
``HandoverSender`` / ``HandoverReceiver`` over the ``tcp`` (or ``mooncake``) backend.

- ``mono``: ``monolithic_call`` (the plain diffusers ``pipe(prompt=...)``), pixels to the host.
- ``prefill``: ``PrefillAdapter.run_batch`` -> send embeddings to denoise.
- ``denoise``: receive -> load to the GPU -> ``DenoiseAdapter.run_batch`` -> send latents to decode.
- ``decode``: receive -> load -> ``DecodeAdapter.pixels`` (VAE decode + postprocess), pixels to the host.

Media encoding (PNG / MP4) is left out on both sides alike. After each stage's compute the process
synchronises the device once, so the hop numbers measure the hop alone (the staging copy would wait
for the same work through its event anyway).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _p in (str(HERE), str(ROOT / "transport" / "src"), str(ROOT / "worker" / "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from worker_io import emit, open_ends  # noqa: E402  (bench/gpu is on the path now)

REVISION = "bench-e2e-gpu"
BUFFER_BYTES = 96 << 20


def pixels_done(pixels: Any) -> tuple[float, float, str]:
    """Pixels to the host (what media encoding would need): completion time (wall, perf counter), then
    a hash of the bytes (computed after the timestamps, so it is not part of any latency)."""
    import torch

    host = pixels.detach().to("cpu").contiguous()
    t_done, perf_done = time.time(), time.perf_counter()
    sha = hashlib.sha256(host.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return t_done, perf_done, sha


class Worker:
    def __init__(self, role: str, cfg: dict[str, Any]) -> None:
        import torch
        from realsize import build_pipeline, role_components

        from diffdisagg.transport.platforms import current_platform
        from diffdisagg.worker.pipelines.loading import OPS, quiet_hf_logging

        quiet_hf_logging()
        self.role, self.cfg, self.family = role, cfg, cfg["family"]
        self.plat = current_platform()
        self.plat.set_device(0)
        self.device = self.plat.device(0)
        dtype = getattr(torch, cfg["dtype"])
        t0 = time.perf_counter()
        self.pipe = build_pipeline(
            self.family, role_components(self.family, role), cfg["scale"], self.device, dtype
        )
        self.plat.synchronize()
        self.build_s = time.perf_counter() - t0
        self.ops = OPS[self.family]
        self.adapter = None
        if role != "mono":
            from diffdisagg.worker.pipelines.roles import ROLE_ADAPTERS

            self.adapter = ROLE_ADAPTERS[role](self.ops, self.pipe, self.device, 8)
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.peer = None
        self.peer_ready = threading.Event()
        self.stop = threading.Event()
        self._transport()

    def _transport(self) -> None:
        self.receiver = self.sender = None
        if self.role == "mono":
            return
        lo = {"prefill": 15400, "denoise": 15420, "decode": 15440}[self.role]
        ends = open_ends(
            self.plat,
            BUFFER_BYTES,
            self.role,
            REVISION,
            receive=self.role != "prefill",
            send=self.role != "decode",
            backend=self.cfg["backend"],
            rpc_ports=(lo, lo + 19),
        )
        self.buffer, self.manager, self.receiver, self.sender = (
            ends.buffer,
            ends.manager,
            ends.receiver,
            ends.sender,
        )
        self.buffer.region().zero_()

    # ------------------------------------------------------------------------------------- control

    def read_stdin(self) -> None:
        from diffdisagg.transport.handover import Peer

        for line in sys.stdin:
            msg = json.loads(line)
            if msg["op"] == "peer":
                self.peer = Peer(msg["host"], msg["port"], msg.get("name", ""))
                self.peer_ready.set()
            elif msg["op"] == "req":
                self.inbox.put(msg)
            elif msg["op"] == "quit":
                break
        self.stop.set()
        self.inbox.put(None)

    def run(self) -> None:
        threading.Thread(target=self.read_stdin, daemon=True).start()
        ready: dict[str, Any] = {"ev": "ready", "role": self.role, "build_s": self.build_s}
        if self.receiver is not None:
            ready["address"] = list(self.receiver.address)
        # Device-wide (all processes): memory in use when this worker became ready.
        ready["device_used_gib"] = round(self.plat.memory_info(0).used / (1 << 30), 2)
        emit(**ready)
        if self.role in ("mono", "prefill"):
            while (msg := self.inbox.get()) is not None:
                self.handle_request(msg)
        else:
            while not self.stop.is_set():
                d = self.receiver.receive(timeout=0.2)
                if d is not None:
                    self.handle_delivery(d)
        for part in (self.receiver, self.sender):
            if part is not None:
                part.close()

    # ------------------------------------------------------------------------------------- stages

    def handle_request(self, msg: dict[str, Any]) -> None:
        from diffdisagg.worker.pipelines import GenerationParams, validate_params
        from diffdisagg.worker.pipelines.loading import monolithic_call
        from diffdisagg.worker.pipelines.stages import StageInput

        rid = msg["rid"]
        params = validate_params(self.family, GenerationParams.from_dict(msg["params"]))
        t_start = time.time()
        t0 = time.perf_counter()
        if self.role == "mono":
            mode = msg.get("mode", "mono")
            if mode == "mono":
                pixels = monolithic_call(self.pipe, self.family, params, output_type="pt")
            else:
                pixels = self.split_in_process(rid, params, sync=mode == "split_sync")
            t_done, perf_done, sha = pixels_done(pixels)
            emit(
                ev="done",
                role="mono",
                mode=mode,
                rid=rid,
                t_start=t_start,
                t_done=t_done,
                compute_s=perf_done - t0,
                sha=sha,
            )
            return
        out = self.adapter.run_batch([StageInput(rid, {"params": params.to_dict()})])[0]
        self.plat.synchronize()
        compute_s = time.perf_counter() - t0
        self.forward(rid, out, compute_s, t_start)

    def split_in_process(self, rid: str, params: Any, sync: bool) -> Any:
        """The three role adapters over this process's full pipeline, tensors passed directly (no
        transport, no second process); with `sync`, the device is synchronised at each stage boundary
        as the hand-over's staging wait does. Attributes the split's cost: adapters vs boundaries vs
        transport."""
        from diffdisagg.worker.pipelines.roles import ROLE_ADAPTERS
        from diffdisagg.worker.pipelines.stages import StageInput

        if not hasattr(self, "_inproc"):
            self._inproc = {r: ROLE_ADAPTERS[r](self.ops, self.pipe, self.device, 8) for r in ROLE_ADAPTERS}
        scalars = {"params": params.to_dict()}
        embeds = self._inproc["prefill"].run_batch([StageInput(rid, scalars)])[0].tensors
        if sync:
            self.plat.synchronize()
        latents = self._inproc["denoise"].run_batch([StageInput(rid, scalars, embeds)])[0].tensors
        if sync:
            self.plat.synchronize()
        return self._inproc["decode"].pixels([StageInput(rid, scalars, latents)])

    def handle_delivery(self, d: Any) -> None:
        from diffdisagg.worker.pipelines.stages import StageInput

        t_recv = time.time()
        t0 = time.perf_counter()
        tensors = self.receiver.load(d, self.device)  # transfer stream, host wait, slot released
        load_s = time.perf_counter() - t0
        t_loaded = time.time()
        scalars = dict(d.scalars)
        hop = scalars.pop("_hop", {})
        emit(
            ev="recv",
            role=self.role,
            rid=d.request_id,
            t_recv=t_recv,
            t_loaded=t_loaded,
            load_s=load_s,
            **hop,
        )
        item = StageInput(d.request_id, scalars, tensors)
        t1 = time.perf_counter()
        if self.role == "decode":
            pixels = self.adapter.pixels([item])
            t_done, perf_done, sha = pixels_done(pixels)
            emit(ev="done", role="decode", rid=d.request_id, t_done=t_done, compute_s=perf_done - t1, sha=sha)
            return
        out = self.adapter.run_batch([item])[0]
        self.plat.synchronize()
        self.forward(d.request_id, out, time.perf_counter() - t1, t_recv)

    def forward(self, rid: str, out: Any, compute_s: float, t_start: float) -> None:
        if not self.peer_ready.wait(timeout=120):
            raise RuntimeError(f"{self.role}: no peer address from the driver")
        from diffdisagg.transport.codec import plan

        t_sent = time.time()
        scalars = dict(out.scalars)
        scalars["_hop"] = {"t_sent": t_sent, "from": self.role}
        # Exactly what HandoverSender.send does (allocate, stage, push, release), timed per part.
        t0 = time.perf_counter()
        handle = self.buffer.allocate(plan(out.tensors, scalars).total_nbytes)
        try:
            manifest = self.manager.stage(handle, out.tensors, scalars)
            t1 = time.perf_counter()
            res = self.sender.push(
                self.peer,
                request_id=rid,
                manifest=manifest,
                source=self.buffer.memoryview(handle),
                deadline=time.time() + 120,
            )
        finally:
            self.manager.release(handle)
        send_s = time.perf_counter() - t0
        emit(
            ev="stage",
            role=self.role,
            rid=rid,
            t_start=t_start,
            compute_s=compute_s,
            send_s=send_s,
            stage_s=t1 - t0,
            t_sent=t_sent,
            t_acked=time.time(),
            offer_s=res.offer_s,
            write_s=res.write_s,
            pushed_s=res.pushed_s,
            nbytes=res.nbytes,
        )


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    role, cfg = sys.argv[1], json.loads(sys.argv[2])
    Worker(role, cfg).run()


if __name__ == "__main__":
    main()
