"""Transport benchmark (loopback, two processes): tcp and mooncake backends vs a raw-socket baseline.

Measured in one run, interleaved per repetition so machine noise hits all three alike:
- raw: `sendall(16-byte header)` + `sendall(memoryview)` into `recv_into` of a preallocated buffer in
  the receiver process, TCP_NODELAY, 1-byte ack after the data landed (the floor any TCP path can reach);
- tcp: our TcpBackend.write into the receiver's registered region (same ack semantics);
- mooncake: MooncakeBackend.write (TransferEngine TCP transport, P2P handshake, submit + sleeping poll).
Sizes 4 KiB, 1, 16, 64, 256 MiB; GiB/s from the median latency, ratio to raw. Every backend's bytes
are verified once per size (SHA-256 of the destination range in the receiver).

Also: per-hop fixed cost of the hand-over channel (offer -> reserved -> write -> pushed -> ack) for a
4 KiB payload, p50/p99, over tcp and mooncake; and the receiver's peak RSS (VmHWM) before and after all
bulk writes, to show the receive side makes no extra copy (a copy of 256 MiB would raise it by 256 MiB).

    python bench/bench_transport.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform as pyplatform
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "transport" / "src"))

TOKEN = b"bench-transport-token-0123456789"
KIB, MIB = 1 << 10, 1 << 20
SIZES = [4 * KIB, 1 * MIB, 16 * MIB, 64 * MIB, 256 * MIB]
REPS = {4 * KIB: 300, 1 * MIB: 40, 16 * MIB: 12, 64 * MIB: 7, 256 * MIB: 5}
HOPS = 300
REGION = 256 * MIB + 4 * MIB
MC_PORTS = dict(rpc_port_min=15200, rpc_port_max=15263)
_HDR = struct.Struct("!QQ")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------------- receiver side


def serve() -> None:
    from diffdisagg.transport.backends import make_backend
    from diffdisagg.transport.buffer import StagingBuffer
    from diffdisagg.transport.handover import HandoverReceiver, ReceiverConfig, register_buffer
    from diffdisagg.transport.platforms import current_platform

    plat = current_platform()
    bulk = StagingBuffer(REGION, plat)  # the bulk writes' destination, shared by raw / tcp / mooncake
    bulk.region().zero_()  # resident before the memory baseline is taken
    view = bulk.region_view()
    tcp = make_backend("tcp", token=TOKEN)
    tcp.register(bulk.address, bulk.nbytes, view)
    mc = make_backend("mooncake", host="127.0.0.1", protocol="tcp", **MC_PORTS)
    mc.register(bulk.address, bulk.nbytes, view)

    # Hand-over receivers (their own small buffers and backends, as in a worker).
    receivers = []
    for name in ("tcp", "mooncake"):
        hbuf = StagingBuffer(16 * MIB, plat)
        hb = make_backend(name, token=TOKEN) if name == "tcp" else mc_second(make_backend, plat)
        register_buffer(hb, hbuf)
        rx = HandoverReceiver(hbuf, hb, ReceiverConfig(TOKEN, "bench", name=f"bench-{name}")).start()
        threading.Thread(target=_release_all, args=(rx,), daemon=True).start()
        receivers.append((name, rx, hb))

    raw = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_raw_server, args=(raw, view), daemon=True).start()
    print(
        json.dumps(
            {
                "raw": raw.getsockname()[1],
                "tcp": tcp.endpoint,
                "mooncake": mc.endpoint,
                "hop": {name: list(rx.address) for name, rx, _ in receivers},
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "hash":
            reply = {"sha": hashlib.sha256(view[cmd["offset"] : cmd["offset"] + cmd["nbytes"]]).hexdigest()}
        elif cmd["cmd"] == "mem":
            reply = {"hwm": _status("VmHWM"), "rss": _status("VmRSS")}
        else:
            break
        print(json.dumps(reply), flush=True)


def mc_second(make_backend, plat):
    # A second engine in one process works (each gets its own ports); it mirrors a worker's own engine.
    return make_backend("mooncake", host="127.0.0.1", protocol="tcp", **MC_PORTS)


def _release_all(rx) -> None:
    while True:
        d = rx.receive(timeout=1.0)
        if d is not None:
            rx.release(d)


def _raw_server(lsock: socket.socket, view: memoryview) -> None:
    conn, _ = lsock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        head = conn.recv(_HDR.size, socket.MSG_WAITALL)
        if len(head) < _HDR.size:
            return
        offset, nbytes = _HDR.unpack(head)
        dst, pos = view[offset : offset + nbytes], 0
        while pos < nbytes:
            got = conn.recv_into(dst[pos:], nbytes - pos, socket.MSG_WAITALL)
            if not got:
                return
            pos += got
        conn.sendall(b"\x00")


# --------------------------------------------------------------------------------------- sender side


class Child:
    def __init__(self) -> None:
        path = [str(ROOT / "transport" / "src"), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.info = json.loads(self._line())

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("bench receiver died")
        return line

    def call(self, **cmd) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        try:
            self.call(cmd="quit")
        except (RuntimeError, json.JSONDecodeError, BrokenPipeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _write_json(rows, all_times, hop_rows, hop_raw, mem_before, mem_after) -> None:
    """Raw numbers for bench/plots.py: bench/out/transport.json (seconds, bytes)."""
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(parents=True, exist_ok=True)
    raw = {
        "bench": "transport",
        "load_average": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "sizes": [
            {"bytes": size, "median_s": med, "verified": ok, "reps": reps, "times_s": all_times[size]}
            for size, med, ok, reps in rows
        ],
        "hop_4k": {
            name: {"p50_s": p50, "p99_s": p99, "n": n, "times_s": hop_raw.get(name, [])}
            for name, (p50, p99, n) in hop_rows.items()
        },
        "receiver_hwm_bytes": {"before": mem_before["hwm"], "after": mem_after["hwm"]},
    }
    (out / "transport.json").write_text(json.dumps(raw, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    args = parser.parse_args()
    if args.serve:
        serve()
        return

    from diffdisagg.transport.backends import make_backend
    from diffdisagg.transport.buffer import StagingBuffer
    from diffdisagg.transport.codec import Manifest, TensorSpec
    from diffdisagg.transport.handover import HandoverSender, Peer, SenderConfig, register_buffer
    from diffdisagg.transport.platforms import current_platform

    plat = current_platform()
    child = Child()
    try:
        src_buf = StagingBuffer(REGION, plat)
        src_buf.region().random_(0, 256)
        src = src_buf.region_view()
        tcp = make_backend("tcp", token=TOKEN)
        mc = make_backend("mooncake", host="127.0.0.1", protocol="tcp", **MC_PORTS)
        register_buffer(mc, src_buf)
        raw = socket.create_connection(("127.0.0.1", child.info["raw"]))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def w_raw(n: int) -> None:
            raw.sendall(_HDR.pack(0, n))
            raw.sendall(src[:n])
            if raw.recv(1) != b"\x00":
                raise RuntimeError("raw ack")

        writers = {
            "raw": w_raw,
            "tcp": lambda n: tcp.write(child.info["tcp"], src[:n], 0, n, time.time() + 60),
            "mooncake": lambda n: mc.write(child.info["mooncake"], src_buf.address, 0, n, time.time() + 60),
        }
        mem_before = child.call(cmd="mem")
        rows = []
        all_times: dict[int, dict[str, list[float]]] = {}
        hop_raw: dict[str, list[float]] = {}
        for size in SIZES:
            reps = max(3, REPS[size] // (5 if args.quick else 1))
            times: dict[str, list[float]] = {k: [] for k in writers}
            verified = {}
            for name, fn in writers.items():  # warm-up + verification, one backend at a time
                fn(size)
                want = hashlib.sha256(src[:size]).hexdigest()
                verified[name] = child.call(cmd="hash", offset=0, nbytes=size)["sha"] == want
            for _ in range(reps):
                for name, fn in writers.items():
                    t0 = time.perf_counter()
                    fn(size)
                    times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            all_times[size] = times
            rows.append((size, med, verified, reps))
        mem_after = child.call(cmd="mem")

        # Per-hop fixed cost: offer -> reserved -> write -> pushed -> ack, 4 KiB payload.
        hop_rows = {}
        manifest = Manifest(tensors=[TensorSpec("x", "uint8", (4 * KIB,), 0, 4 * KIB)], scalars={"seed": 1})
        hop_src = StagingBuffer(1 * MIB, plat)
        for name, backend in (("tcp", make_backend("tcp", token=TOKEN)), ("mooncake", mc)):
            if name == "tcp":
                register_buffer(backend, hop_src)
            source = hop_src.region_view()[: 4 * KIB] if name == "tcp" else src_buf.address
            sender = HandoverSender(backend, SenderConfig(TOKEN, "bench", name="bench"))
            peer = Peer(*child.info["hop"][name])
            lat = []
            n = max(30, HOPS // (5 if args.quick else 1))
            for i in range(n + 10):
                t0 = time.perf_counter()
                sender.push(
                    peer,
                    request_id=f"hop-{name}-{i}",
                    manifest=manifest,
                    source=source,
                    deadline=time.time() + 10,
                )
                if i >= 10:  # first ones open connections / sessions
                    lat.append(time.perf_counter() - t0)
            hop_rows[name] = (pct(lat, 0.5), pct(lat, 0.99), n)
            hop_raw[name] = lat
            sender.close()
    finally:
        child.close()
    _write_json(rows, all_times, hop_rows, hop_raw, mem_before, mem_after)

    def gibs(size: int, t: float) -> float:
        return size / t / 2**30

    def fmt(size: int) -> str:
        return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"

    load = os.getloadavg()
    print(
        f"machine: {pyplatform.node()} {os.cpu_count()} CPUs, {pyplatform.python_implementation()} "
        f"{pyplatform.python_version()}, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    )
    print(
        "\n| size | raw socket GiB/s | tcp GiB/s | tcp / raw | mooncake GiB/s | mooncake / raw "
        "| verified | reps |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size, med, ok, reps in rows:
        r, t, m = (gibs(size, med[k]) for k in ("raw", "tcp", "mooncake"))
        lat = (
            ""
            if size >= MIB
            else f" ({med['raw'] * 1e6:.0f} / {med['tcp'] * 1e6:.0f} / {med['mooncake'] * 1e6:.0f} µs)"
        )
        print(
            f"| {fmt(size)}{lat} | {r:.2f} | {t:.2f} | {t / r:.2f} | {m:.2f} | {m / r:.2f} | "
            f"{'yes' if all(ok.values()) else ok} | {reps} |"
        )
    print("\n| hand-over hop, 4 KiB (offer → pushed → ack) | p50 | p99 | hops |")
    print("|---|---|---|---|")
    for name, (p50, p99, n) in hop_rows.items():
        print(f"| {name} | {p50 * 1e3:.2f} ms | {p99 * 1e3:.2f} ms | {n} |")
    grew = mem_after["hwm"] - mem_before["hwm"]
    print(
        f"\nreceiver peak RSS (VmHWM): {mem_before['hwm'] / MIB:.0f} MiB before the bulk writes, "
        f"{mem_after['hwm'] / MIB:.0f} MiB after ({grew / MIB:+.1f} MiB) while receiving "
        f"{sum(s * (r + 3) for s, _, _, r in rows) / 2**30:.1f} GiB, 256 MiB per write"
    )


if __name__ == "__main__":
    main()
