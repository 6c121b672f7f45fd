"""One worker of the multi-GPU pool benchmark: a monolithic replica, or a prefill / denoise / decode worker.

Started by ``bench_pools.py`` (``python pool_worker.py CONFIG_JSON``), one process per worker, each
seeing only its own device (the driver sets ``CUDA_VISIBLE_DEVICES``; several workers may share one).
The driver plays the gateway: it queues requests, hands entry batches to idle ``mono`` / ``prefill``
workers, and late-binds every hand-over (a worker says its tensors are ready, the driver names the
receiver). JSON lines on stdin (``run``, ``send``, ``quit``); events on stdout prefixed ``@@ ``.

What each role computes is the product's code: ``monolithic_call`` (the plain diffusers call) or the
role adapters (``diffdisagg.worker.pipelines.roles``, batched by the worker like its scheduler does,
one batch key at a time), media encoding included (``encode_png`` / ``encode_mp4`` on the monolithic
side, ``DecodeAdapter`` with ``encode_later`` on the split side), inline or — with ``encode_threads`` —
on a thread pool beside the next batch, as the product's decode worker does (``--encode-threads``).
Tensors cross workers through the real transport:
pinned ``StagingBuffer`` + ``TransferManager`` + ``HandoverSender`` / ``HandoverReceiver`` over tcp.
Models are ``realsize.py``'s seeded random weights, so every process computes on identical weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _p in (str(HERE), str(ROOT / "transport" / "src"), str(ROOT / "worker" / "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from worker_io import emit, open_ends  # noqa: E402  (bench/gpu is on the path now)

REVISION = "bench-pools"
SEND_DEADLINE_S = 300.0


def batch_key(params: dict[str, Any]) -> tuple:
    """What must match for requests to share a batch (the adapters' keys, read from the params)."""
    return (
        params.get("height"),
        params.get("width"),
        params.get("num_frames"),
        params.get("num_inference_steps"),
        params.get("guidance_scale"),
        params.get("max_sequence_length"),
    )


class Worker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        import realsize
        import torch
        from realsize import build_pipeline, role_components

        from diffdisagg.transport.platforms import current_platform
        from diffdisagg.worker.pipelines.loading import OPS, quiet_hf_logging

        quiet_hf_logging()
        if cfg.get("text_layers"):
            realsize.TEXT_LAYERS = int(cfg["text_layers"])
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg["threads"]))
        self.cfg, self.role, self.name, self.family = cfg, cfg["role"], cfg["name"], cfg["family"]
        self.max_batch = int(cfg.get("max_batch", 1))
        self.plat = current_platform()
        self.plat.set_device(0)
        self.device = self.plat.device(0)
        t0 = time.perf_counter()
        self.pipe = build_pipeline(
            self.family,
            role_components(self.family, self.role),
            cfg["scale"],
            self.device,
            getattr(torch, cfg["dtype"]),
        )
        self.plat.synchronize()
        self.build_s = time.perf_counter() - t0
        self.ops = OPS[self.family]
        self.adapter = None
        if self.role != "mono":
            from diffdisagg.worker.pipelines.roles import ROLE_ADAPTERS

            self.adapter = ROLE_ADAPTERS[self.role](self.ops, self.pipe, self.device, max(self.max_batch, 1))
        self.work: queue.Queue[list[dict[str, Any]] | None] = queue.Queue()  # entry batches (mono, prefill)
        self.arrived: deque[Any] = deque()  # hand-overs received, not yet computed (denoise, decode)
        self.arrived_cv = threading.Condition()
        self.held: dict[str, Any] = {}  # outputs waiting for the driver to name their receiver
        self.held_lock = threading.Lock()
        self.sends: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stop = threading.Event()
        # Media encoding off the compute thread (the product's decode worker does this with
        # --encode-threads; a monolithic replica given encode_threads does the same, as the strongest
        # monolithic baseline): the device starts the next batch while the CPU encodes.
        self.encode_threads = int(cfg.get("encode_threads", 0))
        self.encoders = ThreadPoolExecutor(self.encode_threads) if self.encode_threads else None
        if self.role == "decode":
            self.adapter.encode_later = self.encode_threads > 0
        self._transport(int(cfg.get("buffer_mib", 256)) << 20)

    def _transport(self, nbytes: int) -> None:
        self.receiver = self.sender = None
        if self.role == "mono":
            return
        ends = open_ends(
            self.plat,
            nbytes,
            self.name,
            REVISION,
            receive=self.role in ("denoise", "decode"),
            send=self.role in ("prefill", "denoise"),
        )
        self.buffer, self.manager, self.receiver, self.sender = (
            ends.buffer,
            ends.manager,
            ends.receiver,
            ends.sender,
        )

    # ------------------------------------------------------------------------------------ threads

    def read_stdin(self) -> None:
        for line in sys.stdin:
            try:
                msg = json.loads(line)
            except ValueError:
                logging.warning("dropped a control line that is not JSON: %.80r", line)
                continue
            op = msg.get("op")
            if op == "run":
                self.work.put(msg["items"])
            elif op == "send":
                self.sends.put(msg)
            elif op == "quit":
                break
        self.stop.set()
        self.work.put(None)
        self.sends.put(None)
        with self.arrived_cv:
            self.arrived_cv.notify_all()

    def receive_loop(self) -> None:
        assert self.receiver is not None
        while not self.stop.is_set():
            d = self.receiver.receive(timeout=0.2)
            if d is None:
                continue
            emit(ev="recv", worker=self.name, rid=d.request_id, nbytes=d.nbytes)
            with self.arrived_cv:
                self.arrived.append(d)
                self.arrived_cv.notify()

    def send_loop(self) -> None:
        from diffdisagg.transport.handover import Peer

        while (msg := self.sends.get()) is not None:
            rid = msg["rid"]
            with self.held_lock:
                out = self.held.pop(rid)
            t0 = time.perf_counter()
            try:
                res = self.sender.send(
                    Peer(msg["host"], msg["port"], msg.get("to", "")),
                    request_id=rid,
                    tensors=out.tensors,
                    scalars=out.scalars,
                    deadline=time.time() + SEND_DEADLINE_S,
                    manager=self.manager,
                )
            except Exception as exc:  # reported to the driver, which counts the request as failed
                emit(ev="error", worker=self.name, rid=rid, error=f"{type(exc).__name__}: {exc}")
                continue
            emit(
                ev="sent",
                worker=self.name,
                rid=rid,
                to=msg.get("to", ""),
                send_s=time.perf_counter() - t0,
                nbytes=res.nbytes,
            )

    def run(self) -> None:
        threading.Thread(target=self.read_stdin, daemon=True).start()
        if self.receiver is not None:
            threading.Thread(target=self.receive_loop, daemon=True).start()
        if self.sender is not None:
            threading.Thread(target=self.send_loop, daemon=True).start()
        ready: dict[str, Any] = {
            "ev": "ready",
            "worker": self.name,
            "role": self.role,
            "build_s": self.build_s,
        }
        if self.receiver is not None:
            ready["address"] = list(self.receiver.address)
        ready["device_used_gib"] = round(self.plat.memory_info(0).used / (1 << 30), 2)
        emit(**ready)
        while not self.stop.is_set():
            if self.role in ("mono", "prefill"):
                items = self.work.get()
                if items is None:
                    break
                self.compute_entry(items)
            else:
                batch = self.next_arrived()
                if batch:
                    self.compute_received(batch)
        for part in (self.receiver, self.sender):
            if part is not None:
                part.close()

    def next_arrived(self) -> list[Any]:
        """Up to max_batch received hand-overs sharing the oldest one's batch key (FIFO otherwise)."""
        with self.arrived_cv:
            while not self.arrived and not self.stop.is_set():
                self.arrived_cv.wait(timeout=0.2)
            if not self.arrived:
                return []
            key = batch_key(self.arrived[0].scalars["params"])
            batch = [d for d in self.arrived if batch_key(d.scalars["params"]) == key][: self.max_batch]
            for d in batch:
                self.arrived.remove(d)
            return batch

    # ------------------------------------------------------------------------------------ compute

    def compute_entry(self, items: list[dict[str, Any]]) -> None:
        from diffdisagg.worker.pipelines import GenerationParams, validate_params
        from diffdisagg.worker.pipelines.stages import StageInput

        rids = [it["rid"] for it in items]
        t_start = time.time()
        emit(ev="start", worker=self.name, rids=rids, t=t_start)
        t0 = time.perf_counter()
        try:
            if self.role == "mono":
                self.compute_mono(items)
                return
            inputs = [StageInput(it["rid"], {"params": it["params"]}) for it in items]
            for it in items:  # the family's validation, as the gateway and every stage do
                validate_params(self.family, GenerationParams.from_dict(it["params"]))
            outs = self.adapter.run_batch(inputs)
            self.plat.synchronize()
        except Exception as exc:
            for rid in rids:
                emit(ev="error", worker=self.name, rid=rid, error=f"{type(exc).__name__}: {exc}")
            return
        self.hold(outs, time.perf_counter() - t0)

    def compute_mono(self, items: list[dict[str, Any]]) -> None:
        from diffdisagg.worker.pipelines import GenerationParams, validate_params
        from diffdisagg.worker.pipelines.loading import monolithic_call
        from diffdisagg.worker.pipelines.media import encode_mp4, encode_png

        encode = encode_mp4 if self.ops.video else encode_png
        # One request per call: the monolithic baseline is the plain diffusers call of a replica.
        for it in items:
            t1 = time.perf_counter()
            params = validate_params(self.family, GenerationParams.from_dict(it["params"]))
            pixels = monolithic_call(self.pipe, self.family, params, output_type="pt")
            host = pixels.to("cpu")
            gpu_s = time.perf_counter() - t1
            job = functools.partial(encode, host[0])
            if self.encoders is None:
                self.finish(it["rid"], job, gpu_s, 1, compute_s=gpu_s)
            else:
                emit(ev="free", worker=self.name, rids=[it["rid"]], compute_s=gpu_s, batch=1)
                self.encoders.submit(self.finish, it["rid"], job, gpu_s, 1)

    def finish(self, rid: str, encode: Any, gpu_s: float, batch: int, compute_s: float | None = None) -> None:
        """Encode one request's media (inline, or on an encoder thread) and report it done."""
        t0 = time.perf_counter()
        try:
            media = encode()
        except Exception as exc:
            freed = compute_s is None  # the compute thread was released before encoding
            emit(ev="error", worker=self.name, rid=rid, error=f"encode: {exc!r}", freed=freed)
            return
        encode_s = time.perf_counter() - t0
        if compute_s is not None:  # inline: the compute thread was busy for the encoding too
            emit(ev="free", worker=self.name, rids=[rid], compute_s=compute_s + encode_s, batch=batch)
        emit(
            ev="done",
            worker=self.name,
            rid=rid,
            gpu_s=gpu_s,
            encode_s=encode_s,
            batch=batch,
            sha=hashlib.sha256(media).hexdigest()[:16],
            media_bytes=len(media),
        )

    def compute_received(self, batch: list[Any]) -> None:
        from diffdisagg.worker.pipelines.stages import StageInput

        rids = [d.request_id for d in batch]
        emit(ev="start", worker=self.name, rids=rids)
        t0 = time.perf_counter()
        inputs = []
        try:
            for d in batch:
                scalars = dict(d.scalars)
                inputs.append(StageInput(d.request_id, scalars, self.receiver.load(d, self.device)))
        except Exception as exc:
            for d in batch:
                self.receiver.release(d)
                emit(
                    ev="error", worker=self.name, rid=d.request_id, error=f"load: {type(exc).__name__}: {exc}"
                )
            return
        load_s = time.perf_counter() - t0
        try:
            outs = self.adapter.run_batch(inputs)
            if self.role != "decode":
                self.plat.synchronize()
        except Exception as exc:
            for rid in rids:
                emit(ev="error", worker=self.name, rid=rid, error=f"{type(exc).__name__}: {exc}")
            return
        compute_s = time.perf_counter() - t0 - load_s
        if self.role == "decode":
            # Inline (no encoders), run_batch has encoded already and finish_media just returns the bytes.
            emit(ev="free", worker=self.name, rids=rids, compute_s=compute_s, batch=len(outs))
            for out in outs:
                if self.encoders is None:
                    self.finish(out.request_id, out.finish_media, compute_s, len(outs))
                else:
                    self.encoders.submit(self.finish, out.request_id, out.finish_media, compute_s, len(outs))
            return
        self.hold(outs, compute_s, load_s)

    def hold(self, outs: list[Any], compute_s: float, load_s: float = 0.0) -> None:
        with self.held_lock:
            for out in outs:
                self.held[out.request_id] = out
        for out in outs:
            emit(
                ev="out",
                worker=self.name,
                rid=out.request_id,
                compute_s=compute_s,
                load_s=load_s,
                batch=len(outs),
            )


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cfg = json.loads(sys.argv[1])
    if cfg.get("platform"):
        os.environ["DIFFDISAGG_PLATFORM"] = cfg["platform"]
    Worker(cfg).run()
    # Leave without interpreter teardown: the daemon reader threads and torch's pools need no
    # clean-up here, and tearing them down raced (a C++ "terminate called" on exit in the CPU run).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
