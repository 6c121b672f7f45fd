"""The `diffdisagg` CLI against a real gateway process (uvicorn on loopback): models, generate's error
path (HTTP errors become a one-line message and exit code 1), and an unreachable gateway (exit 2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}/transport/src:{ROOT}/worker/src"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    token = tmp_path_factory.mktemp("gw") / "token"
    token.write_text("x" * 32)
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffdisagg.worker",
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--token-file",
            str(token),
            "--family",
            "flux",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError(proc.stdout.read().decode() if proc.stdout else "no gateway") from None
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diffdisagg.worker", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_models(gateway: str) -> None:
    r = cli("models", "--url", gateway)
    assert r.returncode == 0 and r.stdout.strip() == "diffdisagg-tiny-flux", r.stderr


def test_generate_reports_api_errors(gateway: str, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    r = cli("generate", "a fox", "-o", str(out), "--url", gateway, "--steps", "1000")
    assert r.returncode == 1 and "HTTP 400" in r.stderr and "between 1 and 100" in r.stderr
    r = cli("generate", "a fox", "-o", str(out), "--url", gateway)
    assert r.returncode == 1 and "HTTP 503" in r.stderr and "no live worker" in r.stderr
    assert not out.exists()


def test_generate_unreachable_gateway(tmp_path: Path) -> None:
    r = cli("generate", "a fox", "-o", str(tmp_path / "x.png"), "--url", f"http://127.0.0.1:{_free_port()}")
    assert r.returncode == 2 and "cannot reach the gateway" in r.stderr


def test_worker_requires_role_and_token() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "diffdisagg.worker"],
        env={**_env(), "DIFFDISAGG_ROLE": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "DIFFDISAGG_ROLE" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "diffdisagg.worker", "--role", "denoise"],
        env={**_env(), "DIFFDISAGG_TOKEN_FILE": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "DIFFDISAGG_TOKEN_FILE" in r.stderr
