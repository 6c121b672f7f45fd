"""End-to-end cost of disaggregation on one GPU: monolithic pipeline vs prefill / denoise / decode processes.

For each family (FLUX.1-size at 1024², 28 steps, bf16; Wan2.1-1.3B-size at 480x832, reduced frame
count, bf16 with the fp32 VAE) this starts four processes on the one GPU, each building its modules
in memory with seeded random weights (``realsize.py``: denoiser and VAE at real size, text encoders
shrunk in depth only):

- ``mono``: the whole pipeline; a request is one plain diffusers call (``monolithic_call``);
- ``prefill``, ``denoise``, ``decode``: the project's role adapters, handing tensors over through the
  real transport (pinned ``StagingBuffer`` + ``TransferManager`` + ``HandoverSender``/``Receiver``, tcp).

All four stay resident (the sizes fit one 80 GB card) and requests alternate between the two paths,
repetition by repetition, so clocks and noise hit both alike; nothing else runs on the GPU while one
request runs. Measured:

1. single requests: latency (driver's submit -> pixels on the host), median over ``--reps``, ratio
   disaggregated / monolithic (target <= 1.01), and whether the two produced the same bytes;
2. ``--concurrency`` requests submitted at once: makespan and mean latency of each path (the
   monolithic process runs them one after another; the split pipelines them);
3. per hop (prefill->denoise, denoise->decode): wall time from the sender's call to the tensors being
   on the receiver's device, p50/p99 (target p50 <= 2 ms), with the sender's ``send`` and the
   receiver's load separately.

    DIFFDISAGG_PLATFORM=cuda python bench/gpu/bench_e2e_gpu.py --family flux,wan [--reps 3] [--json out.json]
    DIFFDISAGG_PLATFORM=cpu  python bench/gpu/bench_e2e_gpu.py --scale tiny --dtype float32   # smoke run
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "e2e_worker.py"
ROLES = ("prefill", "denoise", "decode")

DEFAULTS = {
    "real": {
        "flux": {"height": 1024, "width": 1024, "num_inference_steps": 28, "guidance_scale": 3.5},
        "wan": {
            "height": 480,
            "width": 832,
            "num_frames": 17,
            "num_inference_steps": 50,
            "guidance_scale": 5.0,
        },
    },
    "tiny": {
        "flux": {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 3.5},
        "wan": {"height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 2, "guidance_scale": 5.0},
    },
}
PROMPT = "a lighthouse on a cliff at dawn, waves breaking below, photorealistic"
NEGATIVE = "blurry, low quality"


class Proc:
    """A worker process; its ``@@`` events go to the shared queue tagged with the role."""

    def __init__(self, role: str, cfg: dict[str, Any], events: queue.Queue) -> None:
        path = [
            str(ROOT / "transport" / "src"),
            str(ROOT / "worker" / "src"),
            os.environ.get("PYTHONPATH", ""),
        ]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), role, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.events = events
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                self.events.put((self.role, json.loads(line[3:])))
        self.events.put((self.role, {"ev": "exit", "rc": self.proc.wait()}))

    def send(self, **msg: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        try:
            self.send(op="quit")
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Bench:
    def __init__(self, family: str, args: argparse.Namespace) -> None:
        self.family = family
        self.args = args
        self.events: queue.Queue = queue.Queue()
        self.log: list[tuple[str, dict[str, Any]]] = []
        cfg = {"family": family, "scale": args.scale, "dtype": args.dtype, "backend": args.backend}
        self.params = dict(DEFAULTS[args.scale][family])
        for key in ("num_inference_steps", "num_frames"):
            value = getattr(args, key)
            if value is not None and (key != "num_frames" or family == "wan"):
                self.params[key] = value
        self.params.update(prompt=PROMPT, max_sequence_length=512)
        if family == "wan":
            self.params["negative_prompt"] = NEGATIVE
        self.procs = {role: Proc(role, cfg, self.events) for role in ("mono", *ROLES)}
        self.ready: dict[str, dict[str, Any]] = {}
        self.seq = 0
        self.submitted: dict[str, float] = {}

    def wait(self, predicate, timeout: float) -> tuple[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.family}: no expected event within {timeout} s")
            try:
                role, ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            self.log.append((role, ev))
            if ev.get("ev") == "exit":
                raise RuntimeError(f"{self.family}: worker {role} exited (rc={ev['rc']})")
            if predicate(role, ev):
                return role, ev

    def start(self) -> None:
        while len(self.ready) < len(self.procs):
            role, ev = self.wait(lambda r, e: e.get("ev") == "ready", self.args.build_timeout)
            self.ready[role] = ev
        for sender, receiver in (("prefill", "denoise"), ("denoise", "decode")):
            host, port = self.ready[receiver]["address"]
            self.procs[sender].send(op="peer", host=host, port=port, name=receiver)

    def submit(self, path: str, seed: int) -> tuple[str, float]:
        self.seq += 1
        rid = f"{self.family}-{path}-{self.seq}"
        params = dict(self.params, seed=seed)
        t = time.time()
        if path == "disagg":
            self.procs["prefill"].send(op="req", rid=rid, params=params)
        else:  # mono, split_async, split_sync: all in the monolithic process
            self.procs["mono"].send(op="req", rid=rid, params=params, mode=path)
        self.submitted[rid] = t
        return rid, t

    def run(self, path: str, seeds: list[int]) -> dict[str, Any]:
        """Submit len(seeds) requests at once to one path; wait for all; latencies and makespan."""
        submitted = dict(self.submit(path, s) for s in seeds)
        done: dict[str, dict[str, Any]] = {}
        while len(done) < len(submitted):
            _, ev = self.wait(
                lambda r, e: e.get("ev") == "done" and e["rid"] in submitted, self.args.request_timeout
            )
            done[ev["rid"]] = ev
        t0 = min(submitted.values())
        lat = {rid: done[rid]["t_done"] - submitted[rid] for rid in submitted}
        return {
            "path": path,
            "rids": list(submitted),
            "latency_s": [lat[r] for r in submitted],
            "makespan_s": max(e["t_done"] for e in done.values()) - t0,
            "sha": [done[r]["sha"] for r in submitted],
        }

    def close(self) -> None:
        for p in self.procs.values():
            p.close()

    def events_of(self, rids: list[str], ev: str, role: str) -> list[dict[str, Any]]:
        want = set(rids)
        return [e for r, e in self.log if r == role and e.get("ev") == ev and e.get("rid") in want]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def hop_stats(bench: Bench, rids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sender, receiver in (("prefill", "denoise"), ("denoise", "decode")):
        sends = {e["rid"]: e for e in bench.events_of(rids, "stage", sender)}
        recvs = {e["rid"]: e for e in bench.events_of(rids, "recv", receiver)}
        both = [r for r in rids if r in sends and r in recvs]
        hop = [(recvs[r]["t_loaded"] - sends[r]["t_sent"]) * 1e3 for r in both]
        send = [sends[r]["send_s"] * 1e3 for r in both]
        load = [recvs[r]["load_s"] * 1e3 for r in both]
        write = [sends[r]["write_s"] * 1e3 for r in both]
        stage = [sends[r]["stage_s"] * 1e3 for r in both]
        offer = [sends[r]["offer_s"] * 1e3 for r in both]
        pushed = [sends[r]["pushed_s"] * 1e3 for r in both]
        out[f"{sender}->{receiver}"] = {
            "n": len(both),
            "nbytes": sends[both[0]]["nbytes"] if both else 0,
            "hop_p50_ms": pct(hop, 0.5),
            "hop_p99_ms": pct(hop, 0.99),
            "send_p50_ms": pct(send, 0.5),
            "send_p99_ms": pct(send, 0.99),
            "write_p50_ms": pct(write, 0.5),
            "stage_p50_ms": pct(stage, 0.5),
            "offer_p50_ms": pct(offer, 0.5),
            "pushed_p50_ms": pct(pushed, 0.5),
            "load_p50_ms": pct(load, 0.5),
            "load_p99_ms": pct(load, 0.99),
        }
    return out


def stage_stats(bench: Bench, rids: list[str]) -> dict[str, float]:
    out = {}
    for role in ROLES:
        ev = "done" if role == "decode" else "stage"
        vals = [e["compute_s"] for e in bench.events_of(rids, ev, role)]
        out[role] = statistics.median(vals) if vals else float("nan")
    mono = [
        e["compute_s"]
        for r, e in bench.log
        if r == "mono" and e.get("ev") == "done" and e.get("mode", "mono") == "mono"
    ]
    out["mono"] = statistics.median(mono) if mono else float("nan")
    return out


def timeline(bench: Bench, rids: list[str], path: str) -> dict[str, float]:
    """Single-request latency split into its parts (ms), from the workers' timestamps: the median of
    each part, and the median of each request's own remainder (total minus its parts)."""
    parts: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        parts.setdefault(key, []).append(value * 1e3)

    for rid in rids:
        ev = {(r, e["ev"]): e for r, e in bench.log if e.get("rid") == rid}
        t_submit = bench.submitted[rid]
        if path != "disagg":
            done = ev[("mono", "done")]
            mine = {
                "submit_to_start": done["t_start"] - t_submit,
                "compute (whole call, pixels to host)": done["compute_s"],
            }
            total = done["t_done"] - t_submit
        else:
            pre, den, dec = ev[("prefill", "stage")], ev[("denoise", "stage")], ev[("decode", "done")]
            rden, rdec = ev[("denoise", "recv")], ev[("decode", "recv")]
            mine = {
                "submit_to_start": pre["t_start"] - t_submit,
                "prefill compute": pre["compute_s"],
                "hop prefill->denoise": rden["t_loaded"] - pre["t_sent"],
                "denoise compute": den["compute_s"],
                "hop denoise->decode": rdec["t_loaded"] - den["t_sent"],
                "decode compute (pixels to host)": dec["compute_s"],
            }
            total = dec["t_done"] - t_submit
        for key, value in mine.items():
            add(key, value)
        add("total", total)
        add("remainder", total - sum(mine.values()))
    return {k: statistics.median(v) for k, v in parts.items()}


def bench_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    t_begin = time.perf_counter()
    bench = Bench(family, args)
    try:
        bench.start()
        t_ready = time.perf_counter() - t_begin
        result: dict[str, Any] = {
            "family": family,
            "params": bench.params,
            "startup_s": t_ready,
            "ready": bench.ready,
        }
        paths = args.paths
        # Warm-up: one request per path (first kernels, cuBLAS handles, connections).
        for path in paths:
            bench.run(path, [1])
        singles: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
        for rep in range(args.reps):
            k = rep % len(paths)  # rotate the order, so no path always runs first
            for path in paths[k:] + paths[:k]:
                singles[path].append(bench.run(path, [100 + rep]))
        mono_lat = [r["latency_s"][0] for r in singles["mono"]]
        dis_lat = [r["latency_s"][0] for r in singles["disagg"]]
        same = [m["sha"][0] == d["sha"][0] for m, d in zip(singles["mono"], singles["disagg"], strict=True)]
        result["single"] = {
            "mono_s": mono_lat,
            "disagg_s": dis_lat,
            "mono_median_s": statistics.median(mono_lat),
            "disagg_median_s": statistics.median(dis_lat),
            "ratio": statistics.median(dis_lat) / statistics.median(mono_lat),
            "paired_ratio_median": statistics.median(d / m for d, m in zip(dis_lat, mono_lat, strict=True)),
            "bit_identical": f"{sum(same)}/{len(same)}",
        }
        result["single"]["paths"] = {}
        for path in paths:
            lat = [r["latency_s"][0] for r in singles[path]]
            result["single"]["paths"][path] = {
                "latency_s": lat,
                "median_s": statistics.median(lat),
                "ratio_to_mono": statistics.median(lat) / statistics.median(mono_lat),
                "paired_ratio_median": statistics.median(x / m for x, m in zip(lat, mono_lat, strict=True)),
                "bit_identical_to_mono": sum(
                    a["sha"][0] == b["sha"][0] for a, b in zip(singles[path], singles["mono"], strict=True)
                ),
            }
        single_rids = [rid for r in singles["disagg"] for rid in r["rids"]]
        result["single"]["hops"] = hop_stats(bench, single_rids)
        result["single"]["timeline_ms"] = {
            "mono": timeline(bench, [rid for r in singles["mono"] for rid in r["rids"]], "mono"),
            "disagg": timeline(bench, single_rids, "disagg"),
        }
        result["single"]["stages_s"] = stage_stats(bench, single_rids)
        conc: list[dict[str, Any]] = []
        for n in args.concurrency:
            seeds = [200 + i for i in range(n)]
            for path in ("mono", "disagg") if n % 2 else ("disagg", "mono"):
                r = bench.run(path, seeds)
                r["n"] = n
                conc.append(r)
        result["concurrent"] = []
        for n in args.concurrency:
            m = next(r for r in conc if r["n"] == n and r["path"] == "mono")
            d = next(r for r in conc if r["n"] == n and r["path"] == "disagg")
            result["concurrent"].append(
                {
                    "n": n,
                    "mono_makespan_s": m["makespan_s"],
                    "disagg_makespan_s": d["makespan_s"],
                    "makespan_ratio": d["makespan_s"] / m["makespan_s"],
                    "mono_mean_latency_s": statistics.mean(m["latency_s"]),
                    "disagg_mean_latency_s": statistics.mean(d["latency_s"]),
                    "bit_identical": f"{sum(a == b for a, b in zip(m['sha'], d['sha'], strict=True))}/{n}",
                    "hops": hop_stats(bench, d["rids"]),
                }
            )
        all_rids = [e["rid"] for r, e in bench.log if r == "decode" and e.get("ev") == "done"]
        result["hops_all"] = hop_stats(bench, all_rids)
        result["wall_s"] = time.perf_counter() - t_begin
        result["events"] = [{"role": r, **e} for r, e in bench.log]
        result["submitted"] = bench.submitted
        return result
    finally:
        bench.close()


def describe() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import diffusers

        out["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if os.environ.get("DIFFDISAGG_PLATFORM", "").lower() != "cpu":
        try:
            q = "--query-gpu=name,driver_version,memory.total"
            out["gpu"] = subprocess.run(
                ["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out["gpu"] = "?"
    return out


def print_family(r: dict[str, Any]) -> None:
    s = r["single"]
    shown = {k: v for k, v in r["params"].items() if k not in ("prompt", "negative_prompt")}
    print(f"\n## {r['family']}  {shown}")
    print(
        f"startup {r['startup_s']:.1f} s, total {r['wall_s']:.1f} s; device memory in use when each worker "
        "was ready (GiB, all processes): "
        + ", ".join(f"{k}={v.get('device_used_gib')}" for k, v in r["ready"].items())
    )
    print("| path | latencies s | median s |")
    print("|---|---|---|")
    print(f"| monolithic | {', '.join(f'{x:.3f}' for x in s['mono_s'])} | {s['mono_median_s']:.3f} |")
    print(f"| disaggregated | {', '.join(f'{x:.3f}' for x in s['disagg_s'])} | {s['disagg_median_s']:.3f} |")
    print(
        f"ratio disagg/mono (medians) = {s['ratio']:.4f}; paired median {s['paired_ratio_median']:.4f}; "
        f"bit-identical outputs {s['bit_identical']}"
    )
    if len(s["paths"]) > 2:
        print("| path | median s | ratio to mono (medians) | paired | bit-identical to mono |")
        print("|---|---|---|---|---|")
        for path, v in s["paths"].items():
            print(
                f"| {path} | {v['median_s']:.3f} | {v['ratio_to_mono']:.4f} | {v['paired_ratio_median']:.4f} "
                f"| {v['bit_identical_to_mono']}/{len(v['latency_s'])} |"
            )
    for path, tl in s["timeline_ms"].items():
        print(f"timeline {path} (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in tl.items()))
    print(
        "| hop (single requests) | bytes | hop p50 / p99 ms | send p50 / p99 ms "
        "| stage / offer / write / pushed p50 ms | load p50 / p99 ms |"
    )
    print("|---|---|---|---|---|---|")
    for name, h in s["hops"].items():
        print(
            f"| {name} | {h['nbytes']} | {h['hop_p50_ms']:.2f} / {h['hop_p99_ms']:.2f} "
            f"| {h['send_p50_ms']:.2f} / {h['send_p99_ms']:.2f} "
            f"| {h['stage_p50_ms']:.2f} / {h['offer_p50_ms']:.2f} / {h['write_p50_ms']:.2f} / "
            f"{h['pushed_p50_ms']:.2f} "
            f"| {h['load_p50_ms']:.2f} / {h['load_p99_ms']:.2f} |"
        )
    for c in r["concurrent"]:
        hops = ", ".join(
            f"{k} {v['hop_p50_ms']:.2f} ms (send {v['send_p50_ms']:.2f})" for k, v in c["hops"].items()
        )
        print(
            f"concurrent n={c['n']}: makespan mono {c['mono_makespan_s']:.3f} s, disagg "
            f"{c['disagg_makespan_s']:.3f} s (ratio {c['makespan_ratio']:.3f}); mean latency mono "
            f"{c['mono_mean_latency_s']:.3f} s, disagg {c['disagg_mean_latency_s']:.3f} s; "
            f"bit-identical {c['bit_identical']}; hop p50 (incl. queueing) {hops}"
        )
    print(
        "all hops of the run (incl. queueing): "
        + ", ".join(
            f"{k}: n={v['n']} p50 {v['hop_p50_ms']:.2f} ms p99 {v['hop_p99_ms']:.2f} ms, send p50 "
            f"{v['send_p50_ms']:.2f} p99 {v['send_p99_ms']:.2f} ms"
            for k, v in r["hops_all"].items()
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="flux,wan")
    parser.add_argument("--scale", choices=("real", "tiny"), default="real")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backend", choices=("tcp", "mooncake"), default="tcp")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--paths",
        default="mono,disagg",
        help="mono,disagg plus optionally split_async,split_sync (the adapters in the monolithic process)",
    )
    parser.add_argument("--concurrency", default="2,4", help="comma-separated request counts, e.g. 2,4")
    parser.add_argument("--num-inference-steps", dest="num_inference_steps", type=int, default=None)
    parser.add_argument("--num-frames", dest="num_frames", type=int, default=None)
    parser.add_argument("--build-timeout", type=float, default=300.0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.paths = [p for p in args.paths.split(",") if p]
    if args.paths[:1] != ["mono"] or "disagg" not in args.paths:
        parser.error("--paths must start with mono and include disagg")
    meta = describe()
    print(f"# end-to-end, {meta}, scale={args.scale}, dtype={args.dtype}, backend={args.backend}", flush=True)
    results = []
    for family in [f for f in args.family.split(",") if f]:
        r = bench_family(family, args)
        results.append(r)
        print_family(r)
        sys.stdout.flush()
        if args.json:
            Path(args.json).write_text(
                json.dumps({"meta": meta, "args": vars(args), "results": results}, indent=1)
            )


if __name__ == "__main__":
    main()
