"""Item 2 + 6 of issue 5: the three roles in three processes == one plain ``pipe(...)`` call, offline.

For FLUX, SD3 and Wan (tiny models, 64x64, 4 steps, Wan 9 frames): prefill, denoise and decode each
run in their own process and hand tensors over through the real hand-over channel
(``HandoverSender`` -> ``HandoverReceiver``: offer, reserved slot, backend write, pushed, ack) over
the **tcp** backend and, in the same processes, over the **mooncake** backend (the real non-CUDA
wheel on its TCP transport: no RDMA NIC here). The receivers (decode, then denoise) are started and
listening before the first sender starts. A fourth process runs the monolithic diffusers call.
SHA-256 of the decoded float32 pixels and of the PNG/MP4 bytes must match for both backends; another
seed must give other bytes (negative control). Every process runs inside a network namespace this
test creates (``ip netns add``) that has nothing but a loopback interface (up: the hand-over runs on
its 127.0.0.1), with HF_HUB_OFFLINE=1 and an empty HF cache, so a hidden hub download would fail the
run instead of passing silently.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("pipe_support", Path(__file__).with_name("pipe_support.py"))
support = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(support)

FAMILIES = ("flux", "sd3", "wan")
BACKENDS = ("tcp", "mooncake")
SEED, OTHER_SEED = 7, 8
TIMEOUT_S = 240


def _env(tmp: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": support.PYTHONPATH,
        "HOME": str(tmp / "home"),
        "HF_HOME": str(tmp / "hf-home"),  # empty: nothing cached to fall back on
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(support.THREADS),
        "MKL_NUM_THREADS": str(support.THREADS),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with only loopback (up); deleted afterwards."""
    name = f"dd-bitexact-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def _start(role: str, models: Path, work: Path, tmp: Path, seeds: str, netns: str) -> subprocess.Popen:
    cmd = [
        "ip", "netns", "exec", netns,
        sys.executable, str(support.HERE / "pipe_roles.py"), role,
        "--models", str(models), "--work", str(work), "--families", ",".join(FAMILIES), "--seeds", seeds,
        "--backends", ",".join(BACKENDS),
    ]  # fmt: skip
    log = open(work / f"{role}.log", "wb")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen(cmd, env=_env(tmp), stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _wait(proc: subprocess.Popen, role: str, work: Path, deadline: float) -> dict:
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        rc = "timeout"
    finally:
        proc.log.close()  # type: ignore[attr-defined]
    output = (work / f"{role}.log").read_text(errors="replace")[-4000:]
    assert rc == 0, f"{role} process failed ({rc}):\n{output}"
    return json.loads((work / f"{role}.json").read_text())


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffdisagg.worker.pipelines import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    for family in FAMILIES:
        build_tiny_model(family, root / family)
    return root


def _wait_published(role: str, work: Path, procs: dict[str, subprocess.Popen], deadline: float) -> None:
    """Bounded wait until `role` listens on every backend (its address files exist)."""
    files = [work / f"{role}.{b}.addr.json" for b in BACKENDS]
    while not all(f.exists() for f in files):
        for name, proc in procs.items():
            if proc.poll() is not None:
                proc.log.close()  # type: ignore[attr-defined]
                log = (work / f"{name}.log").read_text(errors="replace")[-4000:]
                raise AssertionError(f"{name} exited ({proc.returncode}) before {role} listened:\n{log}")
        assert time.monotonic() < deadline, f"{role} did not publish its receivers in time"
        time.sleep(0.1)


def test_three_role_processes_equal_monolithic_offline(tiny_models: Path, tmp_path: Path, netns: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    deadline = time.monotonic() + TIMEOUT_S
    procs: dict[str, subprocess.Popen] = {}
    try:
        # Receivers first (decode, then denoise), each listening before anyone sends to it; the
        # reference runs beside the chain (1 thread each, 2 cores).
        for role in ("decode", "denoise"):
            procs[role] = _start(role, tiny_models, work, tmp_path, str(SEED), netns)
            _wait_published(role, work, procs, deadline)
        procs["prefill"] = _start("prefill", tiny_models, work, tmp_path, str(SEED), netns)
        procs["mono"] = _start("mono", tiny_models, work, tmp_path, f"{SEED},{OTHER_SEED}", netns)
        reports = {role: _wait(procs.pop(role), role, work, deadline) for role in list(procs)}
    finally:
        for proc in procs.values():  # only after a failure: nothing may outlive the test
            proc.kill()
            proc.wait(10)
    chain, ref = {r: reports[r] for r in ("prefill", "denoise", "decode")}, reports["mono"]

    # Offline proof: every process ran in the test's namespace, which has no interface but loopback.
    parent_ns = os.readlink("/proc/self/ns/net")
    for role, report in reports.items():
        env = report["env"]
        assert env["netns"] != parent_ns, f"{role} ran in the host's network namespace"
        assert env["interfaces"] == ["lo"], f"{role} saw interfaces {env['interfaces']}"
        assert env["hf_hub_offline"] == "1"
        assert env["threads"] == support.THREADS
    assert len({r["env"]["pid"] for r in reports.values()}) == 4, "roles must run in separate processes"
    assert len({r["env"]["netns"] for r in reports.values()}) == 1

    # The real hand-over carried every request, on each backend, and left no slot behind.
    n = len(FAMILIES)
    for backend in BACKENDS:
        for role in ("prefill", "denoise"):
            ch = chain[role]["channels"][backend]
            assert ch["backend"] == backend
            assert len(ch["pushes"]) == n and all(p["nbytes"] > 0 for p in ch["pushes"]), ch
        for role in ("denoise", "decode"):
            rx = chain[role]["channels"][backend]["receiver"]
            assert rx.get("reserved") == rx.get("pushed") == rx.get("claimed") == n, (role, backend, rx)
        for role in ("prefill", "denoise", "decode"):
            assert chain[role]["channels"][backend]["live_slots"] == 0, (role, backend)

    for family in FAMILIES:
        same = ref["stages"][f"{family}.{SEED}"]
        other = ref["stages"][f"{family}.{OTHER_SEED}"]
        # Negative control: the comparison can fail — another seed changes pixels and bytes.
        assert other["pixels"] != same["pixels"], f"{family}: seed does not change the output"
        assert other["media"] != same["media"]
        sent = chain["prefill"]["stages"][f"{family}.{SEED}"]["sent"]
        for backend in BACKENDS:
            rid = f"{family}.{SEED}.{backend}"
            split = chain["decode"]["stages"][rid]
            assert split["shape"] == same["shape"]
            assert split["pixels"] == same["pixels"], f"{rid}: split pixels differ from pipe(...)"
            assert split["media"] == same["media"], f"{rid}: split media bytes differ from pipe(...)"
            assert split["media_type"] == ("video/mp4" if family == "wan" else "image/png")
            # What crossed each boundary really came from the previous process, through the receiver.
            assert chain["denoise"]["stages"][rid]["received"] == sent
            assert chain["denoise"]["stages"][rid]["sender"] == f"prefill-{backend}"
            assert split["received"] == chain["denoise"]["stages"][rid]["sent"]
            assert split["sender"] == f"denoise-{backend}"
