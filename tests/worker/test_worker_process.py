"""The worker's settings come from the contract's env vars, arguments override; bad values are refused."""

from __future__ import annotations

import argparse

import pytest

from diffdisagg.worker import contract as c
from diffdisagg.worker.settings import WorkerSettings, add_arguments, settings_from_args


def parse(argv: list[str]) -> WorkerSettings:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return settings_from_args(p.parse_args(argv))


def test_env_vars_of_the_contract_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        c.ENV_ROLE: "denoise",
        c.ENV_MODEL_FAMILY: "sd3",
        c.ENV_MODEL_PATH: "/models/sd3",
        c.ENV_REVISION: "rev-7",
        c.ENV_DEPLOYMENT: "prod",
        c.ENV_GATEWAY_URL: "http://gw:8000/",
        c.ENV_TOKEN_FILE: "/secrets/token",
        c.ENV_POD_IP: "10.1.2.3",
        c.ENV_TRANSFER_BACKEND: "mooncake",
        c.ENV_TRANSFER_PROTOCOL: "rdma",
        c.ENV_RDMA_DEVICES: "mlx5_0",
        c.ENV_BUFFER_BYTES: str(1 << 30),
        c.ENV_CONTROL_PORT: "9100",
        c.ENV_TRANSFER_PORT: "9200",
        c.ENV_TRANSFER_PORT_MIN: "16000",
        c.ENV_TRANSFER_PORT_MAX: "16010",
        c.ENV_PLATFORM: "cuda",
        c.ENV_DEVICES_PER_POD: "2",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = parse([])
    assert (s.role, s.family, s.model_path, s.revision, s.deployment) == (
        "denoise",
        "sd3",
        "/models/sd3",
        "rev-7",
        "prod",
    )
    assert s.gateway_url == "http://gw:8000" and s.token_file == "/secrets/token" and s.host == "10.1.2.3"
    assert (s.transfer_backend, s.transfer_protocol, s.rdma_devices) == ("mooncake", "rdma", "mlx5_0")
    assert (s.buffer_bytes, s.control_port, s.transfer_port) == (1 << 30, 9100, 9200)
    assert (s.transfer_port_min, s.transfer_port_max, s.platform, s.devices_per_pod) == (
        16000,
        16010,
        "cuda",
        2,
    )
    assert s.control_url == "10.1.2.3:9100"
    # arguments override the environment
    s = parse(["--role", "decode", "--control-port", "1234", "--host", "::1"])
    assert s.role == "decode" and s.control_port == 1234 and s.control_url == "[::1]:1234"


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in c.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    s = parse(["--role", "prefill", "--token-file", "/t"])
    assert s.control_port == c.DEFAULT_CONTROL_PORT and s.transfer_port == c.DEFAULT_TRANSFER_PORT
    assert (s.transfer_port_min, s.transfer_port_max) == (
        c.DEFAULT_TRANSFER_PORT_MIN,
        c.DEFAULT_TRANSFER_PORT_MAX,
    )
    assert s.gateway_url == f"http://127.0.0.1:{c.GATEWAY_HTTP_PORT}" and s.transfer_backend == "tcp"


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="role"):
        WorkerSettings(role="gateway", family="flux", model_path=None, gateway_url="x", token_file="t")
    with pytest.raises(ValueError, match="platform"):
        WorkerSettings(
            role="decode", family="flux", model_path=None, gateway_url="x", token_file="t", platform="tpu"
        )
    with pytest.raises(SystemExit):
        parse(["--role", "nope"])
