"""Plots of the benchmarks' raw numbers: `make bench` runs this last (matplotlib, Agg: no display).

Reads what the bench scripts wrote to bench/out/<name>.json and writes PNGs to bench/img/ (linked from
bench/RESULTS.md). A bench that did not run this time is skipped with a line saying so; its old PNG
stays as it was.

- serving_latency_vs_load.png   p50/p99 latency vs offered load (Poisson arrivals), disaggregated vs the
                                monolithic pipeline under the same arrivals        (bench_serving.py)
- serving_stage_breakdown.png   where one request's time goes: queue, each stage, each hand-over
                                (median per segment over the sequential requests)  (bench_serving.py)
- transport_throughput.png      hand-over write throughput vs message size, tcp and mooncake backends
                                against the raw-socket baseline, and their ratio   (bench_transport.py)
- operator_reconcile.png        reconcile latency distribution (CR -> children, CR -> Ready) against
                                the direct server-side-apply baseline              (bench_operator.py)

    python bench/plots.py [--data bench/out] [--out bench/img]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
DPI = 110
# One colour per thing, the same in every plot (and as in the playground's stage bar).
COLORS = {
    "disaggregated": "#1f77b4",
    "monolithic": "#d62728",
    "raw": "#444444",
    "tcp": "#1f77b4",
    "mooncake": "#9467bd",
    "queue": "#8c96a0",
    "prefill": "#e8a33d",
    "handover": "#b05cc8",
    "denoise": "#1f77b4",
    "decode": "#3aa876",
    "other": "#cfd5da",
}


def _machine(raw: dict[str, Any]) -> str:
    bits = []
    if raw.get("cpus"):
        bits.append(f"{raw['cpus']} CPUs")
    if raw.get("load_average") is not None:
        bits.append(f"load avg {raw['load_average']:.1f}")
    return ", ".join(bits)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def serving_latency(raw: dict[str, Any], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for name in ("disaggregated", "monolithic"):
        rows = sorted(raw["poisson"].get(name) or [], key=lambda r: r["rate"])
        if not rows:
            continue
        rates = [r["rate"] for r in rows]
        c = COLORS[name]
        ax.plot(rates, [r["p50"] * 1e3 for r in rows], "o-", color=c, label=f"{name} p50")
        ax.plot(rates, [r["p99"] * 1e3 for r in rows], "s--", color=c, label=f"{name} p99")
    mono_seq = raw["sequential"]["monolithic_s"]
    cap = 1.0 / statistics.median(mono_seq)
    ax.axvline(cap, color=COLORS["monolithic"], lw=0.8, ls=":", label=f"monolithic capacity {cap:.1f} req/s")
    ax.set_xlabel("offered load (Poisson arrivals, requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        f"Latency vs offered load — tiny {raw['family']} {raw['size']}, {raw['steps']} steps, CPU "
        f"({_machine(raw)})",
        fontsize=9,
    )
    path = out / "serving_latency_vs_load.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _segment_key(seg: dict[str, Any]) -> tuple[str, str]:
    if seg["kind"] == "handover":
        return (f"hand-over {seg['from']}→{seg['to']}", "handover")
    if seg["kind"] == "queue":
        return (f"queue {seg['role']}", "queue")
    if seg["kind"] == "compute":
        return (seg["role"], seg["role"])
    return ("other", "other")


def serving_breakdown(raw: dict[str, Any], out: Path) -> Path:
    seq = raw["sequential"]
    per: dict[str, list[float]] = {}
    colour: dict[str, str] = {}
    order: list[str] = []
    for t in seq.get("timings") or []:
        for seg in (t or {}).get("segments", []):
            label, kind = _segment_key(seg)
            if label not in per:
                order.append(label)
                per[label] = []
            per[label].append(seg["ms"])
            colour[label] = COLORS[kind]
    if not per:  # an older gateway: only the flat timings_ms
        flat = seq["timings_ms"]
        for key, label, kind in (
            ("queue_prefill_ms", "queue prefill", "queue"),
            ("prefill_ms", "prefill", "prefill"),
            ("hop_prefill_denoise_ms", "hop prefill→denoise", "handover"),
            ("denoise_ms", "denoise", "denoise"),
            ("hop_denoise_decode_ms", "hop denoise→decode", "handover"),
            ("decode_ms", "decode", "decode"),
        ):
            vals = [t[key] for t in flat if key in t]
            if vals:
                order.append(label)
                per[label] = vals
                colour[label] = COLORS[kind]
    fig, ax = plt.subplots(figsize=(9, 4.6))
    left = 0.0
    total = sum(statistics.median(per[label]) for label in order) or 1.0
    for label in order:
        ms = statistics.median(per[label])
        ax.barh([0], [ms], left=left, color=colour[label], edgecolor="white", label=f"{label}: {ms:.1f} ms")
        if ms / total > 0.1:
            ax.text(left + ms / 2, 0, f"{ms:.0f}", ha="center", va="center", fontsize=8)
        left += ms
    mono = statistics.median(seq["monolithic_s"]) * 1e3
    ax.barh([1], [mono], color=COLORS["monolithic"], alpha=0.75, edgecolor="white")
    ax.text(mono / 2, 1, f"pipeline + PNG {mono:.0f}", ha="center", va="center", fontsize=8, color="white")
    e2e = statistics.median(seq["disaggregated_s"]) * 1e3
    ax.axvline(e2e, color="black", lw=0.8, ls=":")
    ax.text(e2e, 0.5, f" client-side\n e2e p50\n {e2e:.0f} ms", fontsize=7, va="center")
    ax.set_yticks([0, 1], ["disaggregated\n(gateway timings)", "monolithic\n(one call)"])
    ax.set_xlim(0, max(e2e, left, mono) * 1.15)
    ax.set_xlabel("milliseconds (median of each segment over the sequential requests)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    ax.set_title(
        f"Per-stage breakdown of one request — tiny {raw['family']} {raw['size']}, {raw['steps']} steps "
        f"({_machine(raw)})",
        fontsize=9,
    )
    path = out / "serving_stage_breakdown.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _size_label(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB"


def transport_throughput(raw: dict[str, Any], out: Path) -> Path:
    rows = sorted(raw["sizes"], key=lambda r: r["bytes"])
    sizes = [r["bytes"] for r in rows]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True, height_ratios=[2, 1])
    for name in ("raw", "tcp", "mooncake"):
        if not all(name in r["median_s"] for r in rows):
            continue
        gib = [r["bytes"] / r["median_s"][name] / 2**30 for r in rows]
        label = "raw socket (baseline)" if name == "raw" else f"{name} backend"
        ax.plot(sizes, gib, "o-", color=COLORS[name], label=label, lw=2 if name != "raw" else 1.5)
        # spread over the repetitions: p10..p90 of per-write throughput
        lo = [r["bytes"] / _pct(r["times_s"][name], 90) / 2**30 for r in rows if "times_s" in r]
        hi = [r["bytes"] / _pct(r["times_s"][name], 10) / 2**30 for r in rows if "times_s" in r]
        if len(lo) == len(sizes):
            ax.fill_between(sizes, lo, hi, color=COLORS[name], alpha=0.12)
        if name != "raw":
            ratio = [r["median_s"]["raw"] / r["median_s"][name] for r in rows]
            ax2.plot(sizes, ratio, "o-", color=COLORS[name], label=f"{name} / raw")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylabel("GiB/s (median; band p10-p90)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax2.axhline(1.0, color=COLORS["raw"], lw=0.8)
    ax2.set_ylabel("ratio to raw")
    ax2.set_xlabel("message size")
    ax2.set_xticks(sizes, [_size_label(s) for s in sizes])
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    hops = raw.get("hop_4k", {})
    hop_txt = ", ".join(f"{k} {v['p50_s'] * 1e3:.2f} ms" for k, v in hops.items())
    ax.set_title(
        f"Hand-over write throughput, two processes on loopback ({_machine(raw)})"
        + (f"\n4 KiB hop p50 (offer→ack): {hop_txt}" if hop_txt else ""),
        fontsize=9,
    )
    path = out / "transport_throughput.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def operator_reconcile(raw: dict[str, Any], out: Path) -> Path:
    series = [
        ("baseline: render + SSA directly", raw["baseline_s"], COLORS["raw"]),
        ("CR → all children present", raw["to_children_s"], COLORS["tcp"]),
        ("CR → status Ready", raw["to_ready_s"], COLORS["decode"]),
    ]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, xs, c in series:
        if not xs:
            continue
        ms = sorted(x * 1e3 for x in xs)
        frac = [(i + 1) / len(ms) for i in range(len(ms))]
        ax.step(
            [ms[0], *ms],
            [0.0, *frac],
            where="post",
            color=c,
            lw=2,
            label=f"{label} (p50 {statistics.median(ms):.0f}, p99 {_pct(ms, 99):.0f} ms)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds")
    ax.set_ylabel("fraction of CRs (ECDF)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    burst = raw.get("burst") or {}
    extra = (
        f"; burst of {burst['crs']} CRs: all children after {burst['all_children_s']:.1f} s"
        if burst.get("all_children_s")
        else ""
    )
    ax.set_title(f"Operator reconcile latency, {raw['count']} CRs one at a time{extra}", fontsize=9)
    path = out / "operator_reconcile.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


PLOTS: dict[str, list[Callable[[dict[str, Any], Path], Path]]] = {
    "serving": [serving_latency, serving_breakdown],
    "transport": [transport_throughput],
    "operator": [operator_reconcile],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE / "out", help="where the benches wrote <name>.json")
    p.add_argument("--out", type=Path, default=HERE / "img", help="where the PNGs go")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, fns in PLOTS.items():
        src = a.data / f"{name}.json"
        if not src.exists():
            print(f"plots: no {src} (bench {name} did not run); its plots are left as they were")
            continue
        raw = json.loads(src.read_text())
        for fn in fns:
            print(f"plots: {fn(raw, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
