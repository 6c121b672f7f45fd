"""Throughput at equal device count: N monolithic replicas vs the same N devices split into role pools.

For a workload (model family + request shape + step count), this script:

1. **probes** stage times: one prefill, one denoise and one decode worker serve ``--probe`` single
   requests one after another; the medians give each stage's time per request (decode: its device
   part; encode: the media encoding, on the decode worker's encode threads — with ``--encode-threads 0``
   it is inline and counted in decode);
2. **lays out** the N devices for each arrangement in ``--layouts``:
   - ``mono``: one monolithic replica per device (the plain diffusers call + PNG/MP4 encoding);
   - ``mono-async``: the same replicas, encoding on ``--encode-threads`` threads beside the next request
     (the strongest monolithic baseline: the overlap a decode pool gets, without the split);
   - ``pools``: dedicated pools, every device belongs to exactly one pool (what the operator deploys
     with whole-device requests). Light stages may share a pool (``prefill+decode`` on the same
     devices); device counts per pool are chosen from the probed stage times to maximise
     ``min(devices / stage time)``;
   - ``shared``: every device runs a denoise worker, and decode (and prefill) workers sit beside them
     on the same devices (device sharing: time-slicing, or MPS); decode workers on
     ``ceil(N * decode share)`` devices, prefill on one;
   - an explicit layout, e.g. ``"prefill:0;denoise:0,1;decode:1"``;
3. for each layout, starts its workers, then measures
   - **saturation**: ``--burst`` requests submitted at once; throughput = completed / makespan, and the
     steady rate (completions 2..K over the time between the first and the last completion);
   - **latency under Poisson arrivals** at each of ``--loads`` x the monolithic saturation throughput
     (one arrival trace per load, seeded, identical for every layout): p50 / p99 / p99÷p50, and the
     achieved throughput.

The driver plays the gateway (``pool_worker.py`` says what the workers run): one FIFO queue per
entry stage, entry batches go to idle workers, every hand-over is late-bound to the downstream
worker with the fewest requests assigned (at most ``2 x max batch`` each; beyond that the request
waits upstream, like the product's admission). Decode workers encode media on ``--encode-threads``
threads, as the product's decode worker does. Requests carry their own seeds, so every layout produces
the replicas' bytes when batch sizes match (``--prefill-batch 1``): the output hashes are compared.

    source bench/gpu/device_env_pools.sh
    python3 bench/gpu/bench_pools.py --workload flux-4,wan-4 --devices 0,1 --json pools.json
    # CPU smoke run (tiny models, 2 "devices" that are CPU processes):
    DIFFDISAGG_PLATFORM=cpu python bench/gpu/bench_pools.py --scale tiny --dtype float32 \
        --workload flux-4 --devices 0,1 --burst 8 --poisson 12
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "pool_worker.py"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from pool_worker import batch_key  # noqa: E402  (torch-free: what must match for requests to share a batch)

ROLES = ("prefill", "denoise", "decode")

PROMPT = "a lighthouse on a cliff at dawn, waves breaking below, photorealistic"
NEGATIVE = "blurry, low quality"

#: Request shapes per workload and scale. "flux-28": FLUX.1-dev's default step count at 1024²;
#: "flux-4": a few-step (schnell / distilled) FLUX image; "wan-4": a few-step distilled Wan2.1-1.3B
#: video (no CFG), "wan-50": the reference 50-step Wan2.1-1.3B sampling with CFG.
WORKLOADS: dict[str, dict[str, Any]] = {
    "flux-28": {
        "family": "flux",
        "real": {"height": 1024, "width": 1024, "num_inference_steps": 28, "guidance_scale": 3.5},
        "tiny": {"height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 3.5},
    },
    "flux-4": {
        "family": "flux",
        "real": {"height": 1024, "width": 1024, "num_inference_steps": 4, "guidance_scale": 3.5},
        "tiny": {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 3.5},
    },
    "wan-4": {
        "family": "wan",
        "real": {
            "height": 480,
            "width": 832,
            "num_frames": 33,
            "num_inference_steps": 4,
            "guidance_scale": 1.0,
        },
        "tiny": {"height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 2, "guidance_scale": 1.0},
    },
    "wan-50": {
        "family": "wan",
        "real": {
            "height": 480,
            "width": 832,
            "num_frames": 33,
            "num_inference_steps": 50,
            "guidance_scale": 5.0,
        },
        "tiny": {"height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 4, "guidance_scale": 5.0},
    },
}


# ------------------------------------------------------------------------------------------ workers


@dataclass
class WorkerSpec:
    name: str
    role: str  # mono | prefill | denoise | decode
    device: str
    max_batch: int = 1
    encode_threads: int = 0


@dataclass
class Proc:
    spec: WorkerSpec
    popen: subprocess.Popen
    address: tuple[str, int] | None = None
    assigned: int = 0  # requests given to it and not yet finished here
    ready: dict[str, Any] = field(default_factory=dict)


class Fleet:
    """The worker processes of one layout; their ``@@`` events arrive on one queue."""

    def __init__(self, specs: list[WorkerSpec], base: dict[str, Any], events: queue.Queue) -> None:
        self.events = events
        self.procs: dict[str, Proc] = {}
        path = [
            str(ROOT / "transport" / "src"),
            str(ROOT / "worker" / "src"),
            os.environ.get("PYTHONPATH", ""),
        ]
        for spec in specs:
            cfg = dict(
                base,
                role=spec.role,
                name=spec.name,
                max_batch=spec.max_batch,
                encode_threads=spec.encode_threads,
            )
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
            if base.get("platform", "cuda") != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = spec.device
            popen = subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            self.procs[spec.name] = Proc(spec, popen)
            threading.Thread(target=self._read, args=(spec.name, popen), daemon=True).start()

    def _read(self, name: str, popen: subprocess.Popen) -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            if line.startswith("@@ "):
                self.events.put(json.loads(line[3:]))
        self.events.put({"ev": "exit", "worker": name, "rc": popen.wait()})

    def send(self, name: str, **msg: Any) -> None:
        stdin = self.procs[name].popen.stdin
        assert stdin is not None
        stdin.write(json.dumps(msg) + "\n")
        stdin.flush()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(not p.ready for p in self.procs.values()):
            ev = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            if ev.get("ev") == "exit":
                raise RuntimeError(f"worker {ev['worker']} exited during start-up (rc={ev['rc']})")
            if ev.get("ev") == "ready":
                p = self.procs[ev["worker"]]
                p.ready = ev
                if "address" in ev:
                    p.address = (ev["address"][0], ev["address"][1])
            if time.monotonic() > deadline:
                raise TimeoutError("workers not ready in time")

    def of_role(self, role: str) -> list[Proc]:
        return [p for p in self.procs.values() if p.spec.role == role]

    def close(self) -> None:
        for name, p in self.procs.items():
            try:
                self.send(name, op="quit")
                assert p.popen.stdin is not None
                p.popen.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
        for p in self.procs.values():
            try:
                p.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=10)


# ------------------------------------------------------------------------------------------ driver


@dataclass
class Request:
    rid: str
    params: dict[str, Any]
    t_arrive: float = 0.0
    t_done: float = 0.0
    error: str = ""
    sha: str = ""
    stages: dict[str, float] = field(default_factory=dict)


class Router:
    """The gateway's part: entry queue, idle-worker dispatch, late-bound hand-overs, completions."""

    def __init__(self, fleet: Fleet, batches: dict[str, int], timeout: float) -> None:
        self.fleet = fleet
        self.timeout = timeout
        self.entry_role = "mono" if fleet.of_role("mono") else "prefill"
        self.batches = batches
        self.queue: list[Request] = []
        self.waiting: dict[str, list[tuple[str, str]]] = {"denoise": [], "decode": []}  # (sender, rid)
        self.requests: dict[str, Request] = {}
        self.log: list[dict[str, Any]] = []

    def submit(self, req: Request) -> None:
        req.t_arrive = time.time()
        self.requests[req.rid] = req
        self.queue.append(req)
        self.dispatch()

    def dispatch(self) -> None:
        for p in self.fleet.of_role(self.entry_role):
            if not self.queue:
                return
            if p.assigned:
                continue
            key = batch_key(self.queue[0].params)
            batch = [r for r in self.queue if batch_key(r.params) == key][: max(1, p.spec.max_batch)]
            for r in batch:
                self.queue.remove(r)
            p.assigned += len(batch)
            self.fleet.send(p.spec.name, op="run", items=[{"rid": r.rid, "params": r.params} for r in batch])

    def route(self) -> None:
        for role, waiting in self.waiting.items():
            while waiting:
                cands = [p for p in self.fleet.of_role(role) if p.assigned < 2 * max(1, p.spec.max_batch)]
                if not cands:
                    break
                target = min(cands, key=lambda p: (p.assigned, p.spec.name))
                sender, rid = waiting.pop(0)
                target.assigned += 1
                assert target.address is not None
                host, port = target.address
                self.fleet.send(sender, op="send", rid=rid, host=host, port=port, to=target.spec.name)

    def handle(self, ev: dict[str, Any]) -> None:
        self.log.append(ev)
        kind, name = ev.get("ev"), ev.get("worker", "")
        if kind == "exit":
            raise RuntimeError(f"worker {name} exited (rc={ev['rc']})")
        proc = self.fleet.procs.get(name)
        if kind == "out":  # prefill/denoise finished a request: free here, bind its next hop
            assert proc is not None
            proc.assigned -= 1
            self.requests[ev["rid"]].stages[proc.spec.role] = ev["compute_s"] / max(1, ev["batch"])
            nxt = "denoise" if proc.spec.role == "prefill" else "decode"
            self.waiting[nxt].append((name, ev["rid"]))
        # mono/decode: the compute thread is free (media may still be encoding). Unlike the product's
        # decode worker, which counts requests being encoded against --capacity, the bench does not bound
        # that backlog: in the measured runs the encoders kept up (encode / threads < decode device time).
        elif kind == "free":
            assert proc is not None
            proc.assigned -= len(ev["rids"])
            for rid in ev["rids"]:
                self.requests[rid].stages[proc.spec.role] = ev["compute_s"] / max(1, ev["batch"])
        elif kind == "done":
            req = self.requests[ev["rid"]]
            req.t_done, req.sha = ev["t"], ev["sha"]
            req.stages["encode"] = ev["encode_s"]
        elif kind == "error":
            req = self.requests.get(ev.get("rid", ""))
            if req is not None and not req.t_done:
                req.error, req.t_done = ev["error"], ev["t"]
                if proc is not None and not ev.get("freed"):
                    proc.assigned = max(0, proc.assigned - 1)
        self.route()
        self.dispatch()

    def dump(self, rids: list[str]) -> None:
        """Where each unfinished request was last seen, and what each worker holds (for a stuck run)."""
        for rid in rids[:8]:
            seen = [e for e in self.log if e.get("rid") == rid or rid in e.get("rids", ())]
            print(f"    stuck {rid}: last events {seen[-3:]}", flush=True)
        held = {n: p.assigned for n, p in self.fleet.procs.items()}
        print(f"    queue {len(self.queue)}, waiting {self.waiting}, assigned {held}", flush=True)

    def run(self, reqs: list[Request], offsets: list[float] | None) -> list[Request]:
        """Submit ``reqs`` (all at once, or at ``offsets`` seconds from now); wait for every one."""
        t0 = time.monotonic()
        pending = list(zip(offsets or [0.0] * len(reqs), reqs, strict=True))
        deadline = t0 + self.timeout
        while pending or any(not r.t_done for r in reqs):
            now = time.monotonic()
            while pending and pending[0][0] <= now - t0:
                self.submit(pending.pop(0)[1])
            wait = (pending[0][0] - (now - t0)) if pending else 0.5
            try:
                self.handle(self.fleet.events.get(timeout=max(0.001, min(wait, 0.5))))
            except queue.Empty:
                pass
            if time.monotonic() > deadline:
                missing = [r.rid for r in reqs if not r.t_done]
                self.dump(missing)
                raise TimeoutError(
                    f"{len(missing)} requests unfinished after {self.timeout} s: {missing[:5]}"
                )
        return reqs


# ------------------------------------------------------------------------------------------ layouts


def parse_layout(
    text: str, batches: dict[str, int], encoders: dict[str, int] | None = None
) -> list[WorkerSpec]:
    """``role:dev,dev;role:dev`` -> one worker per (role, device); ``encoders``: encode threads by role."""
    encoders = encoders or {}
    specs = []
    for part in text.split(";"):
        role, _, devs = part.partition(":")
        role = role.strip()
        if role not in (*ROLES, "mono"):
            raise ValueError(f"layout part {part!r}: role must be mono/prefill/denoise/decode")
        for i, dev in enumerate(d.strip() for d in devs.split(",") if d.strip()):
            specs.append(
                WorkerSpec(f"{role}{i}@{dev}", role, dev, batches.get(role, 1), encoders.get(role, 0))
            )
    return specs


def pools_layout(devices: list[str], t: dict[str, float]) -> tuple[str, float]:
    """Dedicated pools: every device in one pool; pools may hold several stages (co-located on each of
    their devices). Chooses the grouping and device counts maximising min(devices / summed stage time)."""
    n = len(devices)
    groupings = [
        (("prefill",), ("denoise",), ("decode",)),
        (("prefill", "decode"), ("denoise",)),
        (("prefill", "denoise"), ("decode",)),
    ]
    best: tuple[float, str] = (-1.0, "")
    for groups in groupings:
        if len(groups) > n:
            continue
        for counts in itertools.product(range(1, n + 1), repeat=len(groups)):
            if sum(counts) != n:
                continue
            rate = min(c / sum(t[s] for s in g) for g, c in zip(groups, counts, strict=True))
            parts, i = [], 0
            for g, c in zip(groups, counts, strict=True):
                devs = ",".join(devices[i : i + c])
                parts.extend(f"{s}:{devs}" for s in g)
                i += c
            text = ";".join(sorted(parts, key=lambda p: ROLES.index(p.split(":")[0])))
            if rate > best[0] + 1e-12:
                best = (rate, text)
    if not best[1]:
        raise ValueError(f"no dedicated-pool layout fits {n} devices")
    return best[1], best[0]


def shared_layout(devices: list[str], t: dict[str, float]) -> tuple[str, float]:
    n = len(devices)
    total = t["prefill"] + t["denoise"] + t["decode"]
    n_dec = min(n, max(1, math.ceil(n * t["decode"] / total)))
    n_pre = min(n, max(1, math.ceil(n * t["prefill"] / total)))
    pre, dec = ",".join(devices[-n_pre:]), ",".join(devices[-n_dec:])
    text = f"prefill:{pre};denoise:{','.join(devices)};decode:{dec}"
    return text, n / total


# ------------------------------------------------------------------------------------------ stats

_T0 = time.monotonic()


def say(text: str) -> None:
    print(f"  [{time.monotonic() - _T0:7.1f} s] {text}", flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(reqs: list[Request]) -> dict[str, Any]:
    ok = [r for r in reqs if not r.error]
    lat = [r.t_done - r.t_arrive for r in ok]
    first = min(r.t_arrive for r in reqs)
    dones = sorted(r.t_done for r in ok)
    out: dict[str, Any] = {
        "n": len(reqs),
        "errors": len(reqs) - len(ok),
        "makespan_s": (dones[-1] - first) if dones else float("nan"),
        "throughput_rps": len(ok) / (dones[-1] - first) if dones else 0.0,
        "p50_s": pct(lat, 0.5),
        "p99_s": pct(lat, 0.99),
        "mean_s": statistics.mean(lat) if lat else float("nan"),
    }
    out["steady_rps"] = (len(dones) - 1) / (dones[-1] - dones[0]) if len(dones) > 2 else float("nan")
    out["p99_over_p50"] = out["p99_s"] / out["p50_s"] if lat else float("nan")
    if any(r.error for r in reqs):
        out["first_error"] = next(r.error for r in reqs if r.error)
    return out


# ------------------------------------------------------------------------------------------ bench


class Bench:
    def __init__(self, workload: str, args: argparse.Namespace) -> None:
        self.workload = workload
        self.args = args
        w = WORKLOADS[workload]
        self.family = w["family"]
        self.params = dict(w[args.scale], prompt=PROMPT, max_sequence_length=args.max_sequence_length)
        if args.num_frames and "num_frames" in self.params:
            self.params["num_frames"] = args.num_frames
        if self.family == "wan" and self.params["guidance_scale"] > 1.0:
            self.params["negative_prompt"] = NEGATIVE
        self.base = {
            "family": self.family,
            "scale": args.scale,
            "dtype": args.dtype,
            "platform": os.environ.get("DIFFDISAGG_PLATFORM", ""),
            "threads": args.threads,
            "buffer_mib": args.buffer_mib,
            "text_layers": args.text_layers,
        }
        self.batches = {
            "mono": 1,
            "prefill": args.prefill_batch,
            "denoise": args.denoise_batch,
            "decode": args.decode_batch,
        }
        self.seq = itertools.count()

    def requests(self, n: int, tag: str) -> list[Request]:
        return [Request(f"{self.workload}-{tag}-{i}", dict(self.params, seed=1000 + i)) for i in range(n)]

    def start(self, specs: list[WorkerSpec]) -> tuple[Fleet, Router]:
        fleet = Fleet(specs, self.base, queue.Queue())
        fleet.wait_ready(self.args.build_timeout)
        return fleet, Router(fleet, self.batches, self.args.request_timeout)

    def probe(self) -> dict[str, float]:
        d = self.args.devices
        threads = self.args.encode_threads
        specs = parse_layout(f"prefill:{d[0]};denoise:{d[0]};decode:{d[-1]}", {}, {"decode": threads})
        fleet, router = self.start(specs)
        say(f"probe: workers ready ({', '.join(s.name for s in specs)})")
        try:
            stages: dict[str, list[float]] = {r: [] for r in (*ROLES, "encode")}
            for i, req in enumerate(self.requests(self.args.probe + 1, "probe")):
                router.run([req], None)
                if req.error:
                    raise RuntimeError(f"probe request failed: {req.error}")
                if i:  # the first is the warm-up
                    for r in stages:
                        stages[r].append(req.stages[r])
            t = {r: statistics.median(v) for r, v in stages.items()}
            if threads:  # decode's pace: its device part, or its encoders when they are the slower
                t["decode_device"] = t["decode"]
                t["decode"] = max(t["decode"], t["encode"] / threads)
            return t
        finally:
            fleet.close()

    def measure(
        self,
        name: str,
        specs: list[WorkerSpec],
        traces: list[tuple[float, list[float]]],
        mono_rps: float | None,
    ) -> dict[str, Any]:
        t_begin = time.perf_counter()
        fleet, router = self.start(specs)
        try:
            result: dict[str, Any] = {
                "layout": name,
                "workers": [vars(s) for s in specs],
                "startup_s": time.perf_counter() - t_begin,
            }
            n_dev = len({s.device for s in specs})
            say(f"{name}: workers ready in {result['startup_s']:.1f} s")
            warm = self.requests(max(2, n_dev * 2), f"{name}-warm")
            router.run(warm, None)
            say(f"{name}: warm-up done; burst of {self.args.burst}")
            burst = router.run(self.requests(self.args.burst, f"{name}-burst"), None)
            result["saturation"] = summarize(burst)
            result["sha"] = {r.params["seed"]: r.sha for r in burst}
            rps = mono_rps or result["saturation"]["throughput_rps"]
            result["poisson"] = []
            for load, offsets in traces:
                scaled = [o / rps for o in offsets]  # unit-rate trace -> rate = load x mono throughput
                say(f"{name}: poisson load {load} ({len(offsets)} requests at {load * rps:.3f} req/s)")
                reqs = router.run(self.requests(len(offsets), f"{name}-p{load}"), scaled)
                s = summarize(reqs)
                s.update(load=load, rate_rps=load * rps)
                result["poisson"].append(s)
            stages: dict[str, list[float]] = {}
            for r in burst:
                for k, v in r.stages.items():
                    stages.setdefault(k, []).append(v)
            result["stage_s_median"] = {k: statistics.median(v) for k, v in stages.items()}
            result["wall_s"] = time.perf_counter() - t_begin
            return result
        finally:
            fleet.close()

    def run(self) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {
            "workload": self.workload,
            "family": self.family,
            "params": {k: v for k, v in self.params.items() if "prompt" not in k},
            "devices": a.devices,
            "batches": self.batches,
        }
        t = self.probe()
        out["probe_stage_s"] = t
        layouts: list[tuple[str, str, float | None]] = []
        one = t["prefill"] + t["denoise"] + t.get("decode_device", t["decode"])
        if a.encode_threads:
            one += t["encode"]  # a plain replica encodes inline
        for name in a.layouts:
            if name in ("mono", "mono-async"):
                layouts.append((name, "mono:" + ",".join(a.devices), len(a.devices) / one))
            elif name == "pools":
                text, est = pools_layout(a.devices, t)
                layouts.append(("pools", text, est))
            elif name == "shared":
                text, est = shared_layout(a.devices, t)
                layouts.append(("shared", text, est))
            else:
                layouts.append((name, name, None))
        out["layouts"] = {n: {"spec": s, "estimate_rps": e} for n, s, e in layouts}
        print(
            f"  probe: stage s {json.dumps({k: round(v, 4) for k, v in t.items()})}; layouts "
            + "; ".join(f"{n} = {s}" for n, s, _ in layouts),
            flush=True,
        )
        rng = random.Random(a.seed)
        traces = []
        for load in a.loads:
            gaps = [rng.expovariate(load) for _ in range(a.poisson)]
            traces.append((load, list(itertools.accumulate(gaps, initial=0.0))[: a.poisson]))
        results = {}
        mono_rps = None
        for name, text, _ in layouts:
            # Decode workers always get the encoders; replicas only in "mono-async" (plain "mono" is
            # the diffusers call followed by the encoding, one request at a time).
            encoders = {"decode": a.encode_threads, "mono": a.encode_threads if name == "mono-async" else 0}
            specs = parse_layout(text, self.batches, encoders)
            r = self.measure(name, specs, traces, mono_rps)
            if name == "mono":
                mono_rps = r["saturation"]["throughput_rps"]
            results[name] = r
            print_layout(self.workload, r, results.get("mono"), results.get("mono-async"))
        out["results"] = results
        return out


def print_layout(
    workload: str, r: dict[str, Any], mono: dict[str, Any] | None, mono_async: dict[str, Any] | None = None
) -> None:
    flush = True
    s = r["saturation"]
    ratio = f" ({s['throughput_rps'] / mono['saturation']['throughput_rps']:.3f}x mono" if mono else " ("
    if mono_async and r is not mono_async:
        ratio += f", {s['throughput_rps'] / mono_async['saturation']['throughput_rps']:.3f}x mono-async"
    ratio += ")"
    same = ""
    if mono and r is not mono:
        pairs = [(seed, sha) for seed, sha in r["sha"].items() if seed in mono["sha"]]
        same = f", outputs identical to mono {sum(mono['sha'][k] == v for k, v in pairs)}/{len(pairs)}"
    print(
        f"  [{workload}] {r['layout']}: saturation {s['throughput_rps']:.3f} req/s{ratio}, steady "
        f"{s['steady_rps']:.3f}, n={s['n']} errors={s['errors']}{same}; stages "
        + json.dumps({k: round(v, 4) for k, v in r["stage_s_median"].items()}),
        flush=flush,
    )
    for p in r["poisson"]:
        print(
            f"    poisson load {p['load']:.2f} ({p['rate_rps']:.3f} req/s): p50 {p['p50_s']:.3f} s, p99 "
            f"{p['p99_s']:.3f} s, p99/p50 {p['p99_over_p50']:.2f}, achieved {p['throughput_rps']:.3f} req/s, "
            f"n={p['n']} errors={p['errors']}",
            flush=flush,
        )


def describe() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if os.environ.get("DIFFDISAGG_PLATFORM", "").lower() != "cpu":
        try:
            q = "--query-gpu=index,name,memory.total"
            out["gpus"] = (
                subprocess.run(
                    ["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
                )
                .stdout.strip()
                .splitlines()
            )
        except (OSError, subprocess.TimeoutExpired):
            out["gpus"] = "?"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="flux-4,wan-4", help=f"comma-separated, of {sorted(WORKLOADS)}")
    p.add_argument("--devices", default="0,1", help="device indices (CUDA_VISIBLE_DEVICES values)")
    p.add_argument(
        "--layouts",
        default="mono,mono-async,pools,shared",
        help="mono, mono-async, pools, shared, or explicit 'role:dev,dev;role:dev' layouts separated by '|'",
    )
    p.add_argument("--scale", choices=("real", "tiny"), default="real")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--probe", type=int, default=3, help="single requests measured per stage (after one warm-up)"
    )
    p.add_argument(
        "--burst", type=int, default=16, help="requests submitted at once for the saturation point"
    )
    p.add_argument("--poisson", type=int, default=24, help="requests per Poisson load point")
    p.add_argument(
        "--loads", default="0.7", help="arrival rates as fractions of the monolithic saturation rate"
    )
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--denoise-batch", type=int, default=1)
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument(
        "--encode-threads",
        type=int,
        default=2,
        help="media-encoding threads of each decode worker (and of 'mono-async' replicas); 0 = inline",
    )
    p.add_argument("--num-frames", type=int, default=0, help="override the video workloads' frame count")
    p.add_argument("--max-sequence-length", type=int, default=512)
    p.add_argument(
        "--text-layers",
        type=int,
        default=24,
        help="T5-XXL / UMT5-XXL encoder depth at real scale (24 = the real models)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--buffer-mib", type=int, default=256, help="staging buffer per worker")
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--build-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    a.devices = [d for d in a.devices.split(",") if d]
    a.loads = [float(x) for x in a.loads.split(",") if x]
    a.layouts = [x for x in a.layouts.split("|" if "|" in a.layouts or ":" in a.layouts else ",") if x]
    if a.layouts[0] != "mono":
        p.error("--layouts must start with mono (the baseline every ratio is against)")
    meta = describe()
    print(f"# pools vs replicas, {meta}, scale={a.scale}, dtype={a.dtype}, devices={a.devices}", flush=True)
    out = {"meta": meta, "args": vars(a), "workloads": []}
    for w in [x for x in a.workload.split(",") if x]:
        print(f"\n## {w}", flush=True)
        try:
            out["workloads"].append(Bench(w, a).run())
        except Exception as exc:  # one workload's failure must not lose the others' results
            traceback.print_exc()
            out["workloads"].append({"workload": w, "error": f"{type(exc).__name__}: {exc}"})
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
