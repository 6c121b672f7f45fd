"""Local end-to-end tier: real gateway and role workers as processes, real tiny diffusers models, the real
hand-over (tcp backend) — all inside an empty network namespace that this session creates.

The namespace is the proof that nothing is downloaded: the test process moves itself into a fresh network
namespace (only a loopback interface, no route anywhere) before any deployment starts, and every worker
and gateway it spawns inherits it. The original namespace is restored at the end of the session.

Two deployments, started once per session: `flux` (prefill 1, denoise 2, decode 1; the denoise pool is
made slow with --stage-delay so queue depth has something to show) and `wan` (1/1/1, video), which loads
in the background while the image tests run. Heartbeats are fast (0.25 s, dropped after 4 misses) so the
failure tests stay short.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diffdisagg.worker.launcher import LocalDeployment

CLONE_NEWNET = 0x40000000


def load_support() -> Any:
    """tests/e2e/support.py, once per process (tests are not a package; importlib import mode)."""
    name = "diffdisagg_e2e_support"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("support.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


support = load_support()
HEARTBEAT_S = support.HEARTBEAT_S
MISSES = support.MISSES
DENOISE_DELAY_S = support.DENOISE_DELAY_S


@pytest.fixture(scope="session", autouse=True)
def empty_network_namespace() -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed: the e2e tier needs root")
    try:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        links = subprocess.run(["ip", "-o", "link"], check=True, capture_output=True, text=True).stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"], links
        routes = subprocess.run(["ip", "route"], check=True, capture_output=True, text=True).stdout
        assert routes.strip() == "", routes  # no default route: nothing outside this machine is reachable
        yield
    finally:
        libc.setns(original, CLONE_NEWNET)
        os.close(original)


def _deployment(family: str, counts: dict[str, int], **kw: Any) -> LocalDeployment:
    env_py = os.environ.get("DIFFDISAGG_E2E_PYTHON")
    d = LocalDeployment(
        family=family,
        counts=counts,
        heartbeat_interval_s=HEARTBEAT_S,
        heartbeat_misses=MISSES,
        request_timeout_s=60.0,
        capacity=2,
        max_batch_size=2,
        **kw,
    )
    if env_py:
        d.python = env_py
    return d


@pytest.fixture(scope="session")
def _deployments(empty_network_namespace: None) -> Iterator[dict[str, LocalDeployment]]:
    flux = _deployment(
        "flux", {"prefill": 1, "denoise": 2, "decode": 1}, stage_delay_s={"denoise": DENOISE_DELAY_S}
    )
    wan = _deployment("wan", {"prefill": 1, "denoise": 1, "decode": 1})
    started: list[LocalDeployment] = []
    try:
        for d in (flux, wan):
            d.start()
            started.append(d)
        yield {"flux": flux, "wan": wan}
    finally:
        for d in started:
            d.stop()


@pytest.fixture(scope="session")
def flux(_deployments: dict[str, LocalDeployment]) -> LocalDeployment:
    d = _deployments["flux"]
    d.wait_ready(timeout_s=240)
    return d


@pytest.fixture(scope="session")
def wan(_deployments: dict[str, LocalDeployment]) -> LocalDeployment:
    d = _deployments["wan"]
    d.wait_ready(timeout_s=240)
    return d
