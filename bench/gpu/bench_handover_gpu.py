"""Hand-over bandwidth on one GPU host: device -> pinned -> backend -> pinned -> device, two processes.

Every leg goes through the real code a worker runs:
- **stage** (D2H): `TransferManager.stage` of one device tensor into a slot of the sender's pinned
  `StagingBuffer` (transfer stream, event, host waits with `wait_event`);
- **backend**: `HandoverSender.push` of the staged slot to a `HandoverReceiver` in another process
  (offer -> reserved -> `Backend.write` -> pushed -> ack), over `tcp` or `mooncake` (TCP transport:
  there is no RDMA NIC on the machine);
- **load** (H2D): in the receiver process, `HandoverReceiver.load` (TransferManager load on its
  transfer stream into device memory, host wait, slot release).

Baseline measured in the same run and process: a plain pinned-host <-> device `copy_` of the same
size on a side stream (host wall time around copy + synchronize; best of the repetitions is not used,
medians everywhere). Staging legs are reported twice: the device-side copy time (timing events on the
manager's transfer stream around its copies) and the host-visible time (what a worker waits, including
the polling wait). Target: staging legs >= 0.85 of the pinned copy. The backend leg is reported on its
own (GiB/s of `push`, and the `write` part alone).

Also the fixed cost of one hop for a small tensor (4 KiB on the device): from the sender's call to the
tensor being on the receiver's device (wall clocks of the two processes, same host), p50/p99.

    DIFFDISAGG_PLATFORM=cuda python bench/gpu/bench_handover_gpu.py [--quick] [--json OUT.json]

With `DIFFDISAGG_PLATFORM=cpu` it runs the same code on host memory (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for _p in ("transport/src", "worker/src"):
    if str(ROOT / _p) not in sys.path:
        sys.path.insert(0, str(ROOT / _p))

TOKEN = b"bench-handover-gpu-token-0123456789"
REVISION = "bench-gpu"
MIB = 1 << 20
SIZES = [4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB]
REPS = {4 * MIB: 20, 16 * MIB: 12, 64 * MIB: 7, 256 * MIB: 5}
QUICK_REPS = {4 * MIB: 3, 16 * MIB: 3, 64 * MIB: 2, 256 * MIB: 2}
HOPS, HOPS_LARGE, QUICK_HOPS = 300, 100, 20
SMALL = 4096
KIB = 1 << 10
# 4 KiB (fixed cost), FLUX latents (512 KiB), FLUX prompt embeddings (4 MiB), Wan pos+neg embeddings (8 MiB)
HOP_SIZES = [SMALL, 512 * KIB, 4 * MIB, 8 * MIB]
BUFFER = 256 * MIB + 8 * MIB
BACKENDS = ("tcp", "mooncake")
MC_PORTS_TX, MC_PORTS_RX = (15300, 15331), (15332, 15363)


def _emit(obj: dict[str, Any], lock: threading.Lock) -> None:
    with lock:
        sys.stdout.write("@@ " + json.dumps(obj) + "\n")
        sys.stdout.flush()


def _make_backend(name: str, receiver: bool) -> Any:
    from diffdisagg.transport.backends import make_backend

    if name == "tcp":
        return make_backend("tcp", token=TOKEN, host="127.0.0.1", port=0)
    # Disjoint Mooncake port ranges for the two processes, so their engines never race for a port.
    lo, hi = MC_PORTS_RX if receiver else MC_PORTS_TX
    return make_backend("mooncake", host="127.0.0.1", protocol="tcp", rpc_port_min=lo, rpc_port_max=hi)


def _checksum(t: Any) -> int:
    """Order-sensitive checksum of a tensor's bytes, computed where the tensor lives."""
    import torch

    b = t.reshape(-1).view(torch.uint8).to(torch.int64)
    w = torch.arange(1, b.numel() + 1, device=b.device, dtype=torch.int64) % 65521
    return int((b * w).sum().item())


# ------------------------------------------------------------------------------------- receiver side


def serve(backends: list[str]) -> None:
    from diffdisagg.transport.buffer import StagingBuffer
    from diffdisagg.transport.handover import HandoverReceiver, ReceiverConfig, register_buffer
    from diffdisagg.transport.manager import TransferManager
    from diffdisagg.transport.platforms import current_platform

    plat = current_platform()
    plat.set_device(0)
    device = plat.device(0)
    lock = threading.Lock()
    info: dict[str, Any] = {}
    stop = threading.Event()
    threads = []
    for name in backends:
        buf = StagingBuffer(BUFFER, plat)
        buf.region().zero_()  # resident before timing
        backend = _make_backend(name, receiver=True)
        register_buffer(backend, buf)
        mgr = TransferManager(plat, buf, local_rank=0)
        rx = HandoverReceiver(buf, backend, ReceiverConfig(TOKEN, REVISION, name=f"rx-{name}"), mgr).start()
        info[name] = list(rx.address)
        t = threading.Thread(
            target=_receive_loop, args=(name, rx, mgr, plat, device, lock, stop), daemon=True
        )
        t.start()
        threads.append(t)
    _emit({"ready": info, "platform": plat.name}, lock)
    for _line in sys.stdin:  # EOF or any line: quit
        break
    stop.set()
    for t in threads:
        t.join(timeout=5)


def _receive_loop(name, rx, mgr, plat, device, lock, stop) -> None:
    while not stop.is_set():
        d = rx.receive(timeout=0.2)
        if d is None:
            continue
        t_recv = time.time()
        t0 = time.perf_counter()
        tensors = rx.load(d, device)  # load on the transfer stream, host wait, release the slot
        t1 = time.perf_counter()
        out = {
            "rid": d.request_id,
            "backend": name,
            "t_recv": t_recv,
            "t_loaded": time.time(),
            "load_host_s": t1 - t0,
            "nbytes": d.nbytes,
        }
        if d.scalars.get("check"):
            out["checksum"] = _checksum(tensors["x"])
        _emit(out, lock)


class Receiver:
    """The receiver child process and a reader thread that queues its `@@` lines."""

    def __init__(self, backends: list[str]) -> None:
        path = [
            str(ROOT / "transport" / "src"),
            str(ROOT / "worker" / "src"),
            os.environ.get("PYTHONPATH", ""),
        ]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", ",".join(backends)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.info = self.get(timeout=120)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                self.lines.put(json.loads(line[3:]))
        self.lines.put(None)

    def get(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            item = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"receiver gave no answer within {timeout} s") from None
        if item is None:
            raise RuntimeError(f"receiver process exited (rc={self.proc.poll()})")
        return item

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Busy:
    """Keeps the compute stream busy for a few ms, so that everything the host enqueues behind it is
    queued before the GPU reaches it: events around a copy then time the copy alone, not the host's
    Python work in front of it."""

    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = device.type != "cpu"
        n = 8192 if self.cuda else 8
        self.a = torch.randn(n, n, dtype=torch.bfloat16, device=device)

    def __call__(self) -> None:
        if self.cuda:
            for _ in range(3):  # ~1.4 ms each on an H100/H200
                self.a @ self.a


def spin(event: Any, timeout: float = 30.0) -> None:
    """Wait for an event with the tightest host poll (sleep(0) yields the GIL, never sleeps)."""
    end = time.monotonic() + timeout
    while not event.query():
        if time.monotonic() > end:
            raise TimeoutError("event did not complete")
        time.sleep(0)


def copy_legs(plat: Any, device: Any, mgr: Any, buf: Any, nbytes: int, reps: int) -> dict[str, float]:
    """Median seconds of each way to move `nbytes` between the device and pinned staging.

    raw_*_sync: plain copy_ on a side stream + device synchronize (the baseline);
    raw_*_poll: the same copy, waited for with the manager's `wait_event` (exponential sleep poll);
    stage_api / load_api: `TransferManager.stage` / `.load` as a worker calls them;
    stage_spin / load_spin: `stage_async` / `load_async` + a tight poll of their event;
    stage_dev / load_dev: device time of the manager's copies (events, compute stream kept busy).
    """
    import torch

    from diffdisagg.transport.manager import wait_event

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    src.view(torch.int16).random_(-(2**15), 2**15 - 1)
    host = plat.empty_host(nbytes)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    side = plat.Stream(0)
    busy = Busy(device)
    handle = buf.allocate(nbytes)
    manifest = mgr.stage(handle, {"x": src})
    out: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        out.setdefault(key, []).append(value)

    try:
        for _rep in range(reps + 1):  # the first round warms up
            for kind, (dst, source) in (("d2h", (host, src.view(torch.uint8))), ("h2d", (dev, host))):
                plat.synchronize()
                t0 = time.perf_counter()
                with plat.stream(side):
                    dst.copy_(source, non_blocking=True)
                plat.synchronize()
                add(f"raw_{kind}_sync", time.perf_counter() - t0)
                plat.synchronize()
                t0 = time.perf_counter()
                with plat.stream(side):
                    dst.copy_(source, non_blocking=True)
                    ev = plat.Event()
                    ev.record(side)
                wait_event(ev, 30)
                add(f"raw_{kind}_poll", time.perf_counter() - t0)
            plat.synchronize()
            t0 = time.perf_counter()
            mgr.stage(handle, {"x": src})
            add("stage_api", time.perf_counter() - t0)
            plat.synchronize()
            t0 = time.perf_counter()
            _, ev = mgr.stage_async(handle, {"x": src})
            spin(ev)
            add("stage_spin", time.perf_counter() - t0)
            plat.synchronize()
            t0 = time.perf_counter()
            mgr.load(handle, manifest, device)
            add("load_api", time.perf_counter() - t0)
            plat.synchronize()
            t0 = time.perf_counter()
            _, ticket = mgr.load_async(handle, manifest, device)
            spin(ticket.event)
            add("load_spin", time.perf_counter() - t0)
            for kind in ("stage", "load"):
                start, end = plat.Event(enable_timing=True), plat.Event(enable_timing=True)
                plat.synchronize()
                busy()
                start.record(plat.current_stream())
                if kind == "stage":
                    mgr.stage_async(handle, {"x": src})
                else:
                    mgr.load_async(handle, manifest, device)
                end.record(mgr.stream)
                end.synchronize()
                add(f"{kind}_dev", start.elapsed_time(end) / 1e3)
            plat.synchronize()
    finally:
        plat.synchronize()
        mgr.release(handle)
    return {k: statistics.median(v[1:]) for k, v in out.items()}


def run_sizes(args, plat, device, rx: Receiver, senders: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from diffdisagg.transport.handover import Peer

    reps_of = QUICK_REPS if args.quick else REPS
    rows = []
    for size in SIZES:
        reps = reps_of[size]
        _sender, mgr0, buf0 = senders[args.backends[0]]
        row: dict[str, Any] = {"size": size, "legs": copy_legs(plat, device, mgr0, buf0, size, reps)}
        src = torch.empty(size // 2, dtype=torch.bfloat16, device=device)
        src.view(torch.int16).random_(-(2**15), 2**15 - 1)
        expected = _checksum(src)
        for name in args.backends:
            sender, mgr, buf = senders[name]
            peer = Peer(*rx.info["ready"][name])
            samples: dict[str, list[float]] = {}
            for i in range(reps + 1):  # +1 warm-up (connection setup, first registration), checked
                rid = f"{name}-{size}-{i}"
                check = i == 0
                plat.synchronize()
                handle = buf.allocate(size + 4096)
                t_start = time.time()
                t0 = time.perf_counter()
                manifest = mgr.stage(handle, {"x": src}, {"check": check})
                t1 = time.perf_counter()
                res = sender.push(
                    peer,
                    request_id=rid,
                    manifest=manifest,
                    source=buf.memoryview(handle),
                    deadline=time.time() + 60,
                )
                t2 = time.perf_counter()
                mgr.release(handle)
                got = rx.get(timeout=60)
                assert got["rid"] == rid, got
                if check:
                    if got["checksum"] != expected:
                        raise AssertionError(f"{name} {size}: bytes differ after the hand-over")
                    continue
                for key, value in (
                    ("stage", t1 - t0),
                    ("push", t2 - t1),
                    ("write", res.write_s),
                    ("load", got["load_host_s"]),
                    ("total", got["t_loaded"] - t_start),
                ):
                    samples.setdefault(key, []).append(value)
            row[name] = {k: statistics.median(v) for k, v in samples.items()}
        rows.append(row)
        del src
    return rows


def run_hops(args, plat, device, rx: Receiver, senders: dict[str, Any]) -> list[dict[str, Any]]:
    """One hop at the payload sizes of real requests, split into its parts (what `send` does, timed)."""
    import torch

    from diffdisagg.transport.handover import Peer

    rows = []
    for size in HOP_SIZES:
        n = (
            (QUICK_HOPS if args.quick else HOPS)
            if size <= SMALL
            else (QUICK_HOPS if args.quick else HOPS_LARGE)
        )
        x = torch.randn(size // 2, dtype=torch.bfloat16, device=device)
        for name in args.backends:
            sender, mgr, buf = senders[name]
            peer = Peer(*rx.info["ready"][name])
            parts: dict[str, list[float]] = {}
            for i in range(n + 10):
                rid = f"hop-{name}-{size}-{i}"
                plat.synchronize()
                t_start = time.time()
                t0 = time.perf_counter()
                handle = buf.allocate(size)
                manifest = mgr.stage(handle, {"x": x}, {})
                t1 = time.perf_counter()
                res = sender.push(
                    peer,
                    request_id=rid,
                    manifest=manifest,
                    source=buf.memoryview(handle),
                    deadline=time.time() + 30,
                )
                t2 = time.perf_counter()
                mgr.release(handle)
                t3 = time.perf_counter()
                got = rx.get(timeout=30)
                assert got["rid"] == rid, got
                if i < 10:
                    continue
                for key, value in (
                    ("total", got["t_loaded"] - t_start),
                    ("sender", t3 - t0),
                    ("stage", t1 - t0),
                    ("offer", res.offer_s),
                    ("write", res.write_s),
                    ("pushed", res.pushed_s),
                    ("push_other", (t2 - t1) - res.offer_s - res.write_s - res.pushed_s),
                    ("release", t3 - t2),
                    ("rx_wake_to_loaded", got["t_loaded"] - got["t_recv"]),
                    ("rx_load", got["load_host_s"]),
                ):
                    parts.setdefault(key, []).append(value * 1e3)
            rows.append(
                {
                    "size": size,
                    "backend": name,
                    "hops": n,
                    **{f"{k}_p50_ms": pct(v, 0.5) for k, v in parts.items()},
                    **{f"{k}_p99_ms": pct(v, 0.99) for k, v in parts.items()},
                }
            )
    return rows


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def gibps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / (1 << 30) if seconds > 0 else float("inf")


def describe(plat: Any) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "platform": plat.name,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    if plat.name == "cuda":
        props = plat.device_module.get_device_properties(0)
        out["gpu"] = props.name
        out["gpu_mem_gib"] = round(props.total_memory / (1 << 30), 1)
        try:
            out["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out["driver"] = "?"
    return out


def print_tables(
    meta: dict[str, Any], rows: list[dict[str, Any]], hops: list[dict[str, Any]], backends
) -> None:
    print(f"\n# staging legs vs the pinned copy (medians), {meta}")
    print(
        "| size | dir | raw copy GiB/s (sync) | manager copy, device time GiB/s (ratio) "
        "| manager API as called, host GiB/s (ratio) | async + tight poll GiB/s (ratio) "
        "| raw copy + wait_event poll GiB/s (ratio) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s, legs = r["size"], r["legs"]
        for kind, raw, op in (("D2H", "raw_d2h", "stage"), ("H2D", "raw_h2d", "load")):
            base = gibps(s, legs[f"{raw}_sync"])
            cells = []
            for key in (f"{op}_dev", f"{op}_api", f"{op}_spin", f"{raw}_poll"):
                g = gibps(s, legs[key])
                r.setdefault("ratios", {})[key] = g / base
                cells.append(f"{g:.1f} ({g / base:.2f})")
            print(f"| {s // MIB} MiB | {kind} ({op}) | {base:.1f} | " + " | ".join(cells) + " |")
    print("\n# full hand-over, device -> pinned -> backend -> pinned -> device, two processes (medians)")
    print(
        "| size | backend | stage() GiB/s (ratio to raw D2H) | push GiB/s | backend write only GiB/s "
        "| receiver load() GiB/s (ratio to raw H2D) | device->device GiB/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s, legs = r["size"], r["legs"]
        rd, rh = gibps(s, legs["raw_d2h_sync"]), gibps(s, legs["raw_h2d_sync"])
        for name in backends:
            b = r[name]
            st, ld = gibps(s, b["stage"]), gibps(s, b["load"])
            print(
                f"| {s // MIB} MiB | {name} | {st:.1f} ({st / rd:.2f}) | {gibps(s, b['push']):.2f} "
                f"| {gibps(s, b['write']):.2f} | {ld:.1f} ({ld / rh:.2f}) | {gibps(s, b['total']):.2f} |"
            )
    print("\n# one hop, sender call -> tensor on the receiver's device, in parts (p50 ms; p99 of the total)")
    keys = ("stage", "offer", "write", "pushed", "push_other", "release", "rx_wake_to_loaded", "rx_load")
    print("| size | backend | hops | total p50 | total p99 | " + " | ".join(keys) + " |")
    print("|---|---|---|---|---|" + "---|" * len(keys))
    for h in hops:
        size = f"{h['size'] // KIB} KiB" if h["size"] < MIB else f"{h['size'] // MIB} MiB"
        print(
            f"| {size} | {h['backend']} | {h['hops']} | {h['total_p50_ms']:.3f} | {h['total_p99_ms']:.3f} | "
            + " | ".join(f"{h[k + '_p50_ms']:.3f}" for k in keys)
            + " |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve.split(","))
        return
    args.backends = [b for b in args.backends.split(",") if b]

    from diffdisagg.transport.buffer import StagingBuffer
    from diffdisagg.transport.handover import HandoverSender, SenderConfig, register_buffer
    from diffdisagg.transport.manager import TransferManager
    from diffdisagg.transport.platforms import current_platform

    plat = current_platform()
    plat.set_device(0)
    device = plat.device(0)
    rx = Receiver(args.backends)
    senders: dict[str, Any] = {}
    try:
        for name in args.backends:
            buf = StagingBuffer(BUFFER, plat)
            buf.region().zero_()
            backend = _make_backend(name, receiver=False)
            register_buffer(backend, buf)
            mgr = TransferManager(plat, buf, local_rank=0)
            senders[name] = (
                HandoverSender(backend, SenderConfig(TOKEN, REVISION, name=f"tx-{name}")),
                mgr,
                buf,
            )
        rows = run_sizes(args, plat, device, rx, senders)
        hops = run_hops(args, plat, device, rx, senders)
    finally:
        rx.close()
        for sender, _mgr, _buf in senders.values():
            sender.close()

    meta = describe(plat)
    print_tables(meta, rows, hops, args.backends)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "sizes": rows, "hops": hops}, indent=1))


if __name__ == "__main__":
    main()
