"""A real peer process for the transport tests: a hand-over receiver or sender driven over stdin/stdout.

Run as a script (`python peer.py receiver|sender ...`) it prints one JSON line `{"event": "ready", ...}`
and then answers one JSON line per JSON command. Tests import this file (by path) for `PeerProcess`,
which spawns it, and for `make_tensors` / `tensor_hashes`, which both sides use so that bytes can be
compared by hash without shipping them back.

Receiver commands: stats, drain (release every held delivery), quit. With `--consume`, a thread takes
every delivery, loads it and records per-tensor SHA-256 ("computing" on it); without, deliveries are held.
Sender commands: send (tensors from a seed), send_loop (until killed), write_raw (backend only), quit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TOKEN = b"diffdisagg-test-token-0123456789abcdef"


# ----------------------------------------------------------------------------- shared by both sides


def make_tensors(specs: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Deterministic tensors: same specs + seed give the same bytes in every process."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in specs:
        dtype = getattr(torch, spec["dtype"])
        out[spec["name"]] = torch.randn(spec["shape"], generator=g, dtype=torch.float32).to(dtype)
    return out


def tensor_hashes(tensors: dict[str, Any]) -> dict[str, str]:
    import torch

    return {
        name: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for name, t in tensors.items()
    }


# ------------------------------------------------------------------------------------ test-side API


class PeerProcess:
    """A spawned peer. Every wait is bounded; `close()` always reaps the process."""

    def __init__(self, role: str, *args: str, log_dir: Path | None = None, env: dict[str, str] | None = None):
        self.role = role
        self.log_path = (log_dir or Path("/tmp")) / f"peer-{role}-{os.getpid()}-{time.monotonic_ns()}.log"
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO / "transport" / "src"), full_env.get("PYTHONPATH", "")]
        )
        full_env.update(env or {})
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), role, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=full_env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready = self._next(timeout=60)
        if self.ready.get("event") != "ready":
            raise RuntimeError(f"peer did not start: {self.ready}; log: {self.log_text()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def control(self) -> tuple[str, int]:
        host, port = self.ready["control"]
        return host, int(port)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"peer {self.role} silent for {timeout}s; log: {self.log_text()}") from None
        if line is None:
            raise RuntimeError(f"peer {self.role} exited ({self.proc.poll()}); log: {self.log_text()}")
        return json.loads(line)

    def post(self, **cmd: Any) -> None:
        """Send a command without waiting for its answer (e.g. send_loop, which never answers)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next answer (for a command sent with `post`)."""
        return self._next(timeout)

    def call(self, timeout: float = 30.0, **cmd: Any) -> dict[str, Any]:
        self.post(**cmd)
        return self._next(timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.call(timeout=5, cmd="quit")
            except Exception:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


def wait_for(predicate: Any, timeout: float, interval: float = 0.02, message: str = "condition") -> Any:
    """Poll `predicate` until truthy (returned) or raise AssertionError after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {message} (last: {value!r})")
        time.sleep(interval)


# ----------------------------------------------------------------------------------- process side


def _backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="tcp")
    p.add_argument("--buffer-bytes", type=int, default=64 << 20)
    p.add_argument("--revision", default="rev-1")
    p.add_argument("--mc-port-min", type=int, default=15000)
    p.add_argument("--mc-port-max", type=int, default=15063)
    p.add_argument("--mc-timeout", type=int, default=5)


def _make(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from diffdisagg.transport.backends import make_backend
    from diffdisagg.transport.buffer import StagingBuffer
    from diffdisagg.transport.handover import register_buffer
    from diffdisagg.transport.manager import TransferManager
    from diffdisagg.transport.platforms import current_platform

    platform = current_platform()
    buffer = StagingBuffer(args.buffer_bytes, platform)
    if args.backend == "mooncake":
        backend = make_backend(
            "mooncake",
            host="127.0.0.1",
            protocol="tcp",
            rpc_port_min=args.mc_port_min,
            rpc_port_max=args.mc_port_max,
            transfer_timeout_s=args.mc_timeout,
        )
    else:
        backend = make_backend(args.backend, token=TOKEN)
    register_buffer(backend, buffer)
    return buffer, backend, TransferManager(platform, buffer)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_receiver(args: argparse.Namespace) -> None:
    from diffdisagg.transport.handover import HandoverReceiver, ReceiverConfig

    buffer, backend, manager = _make(args)
    rx = HandoverReceiver(
        buffer,
        backend,
        ReceiverConfig(TOKEN, args.revision, name="peer-rx", max_lease_s=args.max_lease),
        manager,
    ).start()
    results: dict[str, dict[str, str]] = {}
    held: list[Any] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            d = rx.receive(timeout=0.1)
            if d is None:
                continue
            tensors = rx.load(d, "cpu")  # releases the slot
            results[d.request_id] = tensor_hashes(tensors)

    if args.consume:
        threading.Thread(target=consume, daemon=True).start()
    _emit(
        {
            "event": "ready",
            "control": list(rx.address),
            "endpoint": backend.endpoint,
            "pid": os.getpid(),
            "env": {k: v for k, v in os.environ.items() if k.startswith("MC_")},
        }
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "stats":
            stats = rx.stats()
            stats["inflight_writes"] = getattr(backend, "inflight_writes", None)
            _emit({"stats": stats, "results": results, "held": [d.request_id for d in held]})
        elif cmd["cmd"] == "hold":  # take deliveries without releasing them
            while (d := rx.receive(timeout=0.05)) is not None:
                held.append(d)
            _emit({"held": [d.request_id for d in held]})
        elif cmd["cmd"] == "drain":
            while (d := rx.receive(timeout=0.05)) is not None:
                held.append(d)
            for d in held:
                results[d.request_id] = tensor_hashes(rx.load(d, "cpu"))
            held.clear()
            _emit({"drained": True})
        elif cmd["cmd"] == "quit":
            stop.set()
            rx.close()
            backend.close()
            _emit({"bye": True})
            return


def run_sender(args: argparse.Namespace) -> None:
    from diffdisagg.transport.errors import TransportError
    from diffdisagg.transport.handover import HandoverSender, Peer, SenderConfig

    buffer, backend, manager = _make(args)
    tx = HandoverSender(backend, SenderConfig(TOKEN, args.revision, name="peer-tx"))
    _emit({"event": "ready", "control": None, "endpoint": backend.endpoint, "pid": os.getpid()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] in ("send", "send_loop"):
            tensors = make_tensors(cmd["tensors"], cmd["seed"])
            peers = [Peer(h, p) for h, p in cmd["peers"]]
            n = 0
            while True:
                t0 = time.perf_counter()
                try:
                    res = tx.send(
                        peers,
                        request_id=f"{cmd['request_id']}-{n}"
                        if cmd["cmd"] == "send_loop"
                        else cmd["request_id"],
                        tensors=tensors,
                        scalars=cmd.get("scalars", {}),
                        deadline=time.time() + cmd["deadline_s"],
                        manager=manager,
                    )
                    reply = {"ok": True, "peer": str(res.peer), "attempts": res.attempts}
                except TransportError as exc:
                    reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
                reply["elapsed"] = time.perf_counter() - t0
                reply["hashes"] = tensor_hashes(tensors)
                reply["live_slots"] = buffer.allocator.live_slots
                if cmd["cmd"] == "send":
                    _emit(reply)
                    break
                n += 1
        elif cmd["cmd"] == "write_raw":
            data = bytearray(os.urandom(cmd["nbytes"]))
            t0, cpu0 = time.perf_counter(), time.process_time()
            try:
                backend.write(
                    cmd["endpoint"],
                    memoryview(data),
                    cmd["offset"],
                    cmd["nbytes"],
                    time.time() + cmd["deadline_s"],
                )
                reply = {"ok": True}
            except TransportError as exc:
                reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
            reply["elapsed"] = time.perf_counter() - t0
            reply["cpu"] = time.process_time() - cpu0
            reply["pending_batches"] = getattr(backend, "pending_batches", None)
            _emit(reply)
        elif cmd["cmd"] == "pending":
            _emit({"pending_batches": getattr(backend, "pending_batches", None)})
        elif cmd["cmd"] == "quit":
            tx.close()
            backend.close()
            _emit({"bye": True})
            return


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    rx = sub.add_parser("receiver")
    _backend_args(rx)
    rx.add_argument("--consume", action="store_true")
    rx.add_argument("--max-lease", type=float, default=60.0)
    tx = sub.add_parser("sender")
    _backend_args(tx)
    args = parser.parse_args()
    {"receiver": run_receiver, "sender": run_sender}[args.role](args)


if __name__ == "__main__":
    main()
