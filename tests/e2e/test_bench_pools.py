"""The multi-device pool benchmark (bench/gpu/bench_pools.py): its layout arithmetic, and one tiny run on
the CPU with real worker processes, the real transport and the real role adapters.

The benchmark's numbers come from GPU machines (bench/RESULTS.md); this keeps the script honest between
those runs: a layout the driver cannot route, a lost request, a worker that never frees its slot, or a
split that no longer produces the monolithic pipeline's bytes fails here instead of on borrowed GPU time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "gpu"
sys.path.insert(0, str(BENCH))

import bench_pools  # noqa: E402


def test_pools_layout_puts_light_stages_together_and_sizes_by_stage_time() -> None:
    # FLUX-like: denoise dominates; with two devices the best dedicated split is one device for
    # denoise and one shared by prefill + decode.
    t = {"prefill": 0.05, "denoise": 0.70, "decode": 0.09}
    text, rate = bench_pools.pools_layout(["0", "1"], t)
    assert text == "prefill:0;denoise:1;decode:0"
    assert rate == pytest.approx(1 / 0.70)
    # Decode-heavy video on four devices: prefill rides with denoise on two, decode gets two
    # (min(2 / 0.45, 2 / 0.60) beats every other grouping and count).
    t = {"prefill": 0.05, "denoise": 0.40, "decode": 0.60}
    text, rate = bench_pools.pools_layout(["0", "1", "2", "3"], t)
    assert text == "prefill:0,1;denoise:0,1;decode:2,3"
    assert rate == pytest.approx(2 / 0.60)


def test_shared_layout_runs_denoise_everywhere() -> None:
    text, _ = bench_pools.shared_layout(["0", "1"], {"prefill": 0.05, "denoise": 0.4, "decode": 0.6})
    specs = bench_pools.parse_layout(text, {"decode": 2}, {"decode": 3})
    assert sorted(s.device for s in specs if s.role == "denoise") == ["0", "1"]
    assert sorted(s.device for s in specs if s.role == "decode") == ["0", "1"]
    assert all(s.max_batch == 2 and s.encode_threads == 3 for s in specs if s.role == "decode")


def test_parse_layout_names_the_bad_part() -> None:
    with pytest.raises(ValueError, match="'encode:0'"):
        bench_pools.parse_layout("prefill:0;encode:0", {})


def test_tiny_run_on_cpu_matches_the_monolithic_bytes(tmp_path: Path) -> None:
    out = tmp_path / "pools.json"
    env = dict(
        os.environ,
        DIFFDISAGG_PLATFORM="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT / "transport" / "src"), str(ROOT / "worker" / "src")]),
    )
    cmd = [
        sys.executable,
        str(BENCH / "bench_pools.py"),
        "--scale=tiny",
        "--dtype=float32",
        "--workload=flux-4",
        "--devices=0,1",
        # the plain replica, the strong replica (encoding off its compute thread), and a split layout
        "--layouts=mono|mono-async|prefill:0;denoise:0,1;decode:1",
        "--prefill-batch=1",  # batch 1 everywhere: the bytes must then match the monolithic call's
        "--encode-threads=1",
        "--probe=1",
        "--burst=4",
        "--poisson=4",
        "--threads=1",
        "--buffer-mib=16",
        "--request-timeout=120",
        f"--json={out}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (w,) = data["workloads"]
    assert "error" not in w, w.get("error")
    assert set(w["probe_stage_s"]) >= {"prefill", "denoise", "decode", "encode"}
    results = w["results"]
    assert list(results) == ["mono", "mono-async", "prefill:0;denoise:0,1;decode:1"]
    mono_sha = results["mono"]["sha"]
    assert len(mono_sha) == 4 and len(set(mono_sha.values())) == 4  # four seeds, four different images
    for name, r in results.items():
        sat = r["saturation"]
        assert sat["errors"] == 0 and sat["n"] == 4, (name, sat)
        assert sat["throughput_rps"] > 0
        assert r["sha"] == mono_sha, name  # same seeds -> the monolithic pipeline's exact bytes
        (p,) = r["poisson"]
        assert p["errors"] == 0 and p["n"] == 4 and p["p99_s"] >= p["p50_s"] > 0, (name, p)
    split = results["prefill:0;denoise:0,1;decode:1"]
    assert {"prefill", "denoise", "decode", "encode"} <= set(split["stage_s_median"])
    assert [s["device"] for s in split["workers"] if s["role"] == "denoise"] == ["0", "1"]
