"""Settings of one role worker: the contract env vars (diffdisagg.worker.contract), arguments override.

Built once at the entry point and passed down; nothing else reads the environment.
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass

from diffdisagg.worker import contract as c


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class WorkerSettings:
    role: str
    family: str
    model_path: str | None
    """None: the tiny model of the family, built on first use under ~/.cache/diffdisagg."""
    gateway_url: str
    token_file: str
    deployment: str = "local"
    revision: str = "0"
    platform: str = "cpu"
    host: str = "127.0.0.1"
    """Address peers use to reach this worker (DIFFDISAGG_POD_IP in Kubernetes)."""
    bind: str = "0.0.0.0"
    control_port: int = c.DEFAULT_CONTROL_PORT
    transfer_port: int = c.DEFAULT_TRANSFER_PORT
    transfer_backend: str = "tcp"
    transfer_protocol: str = "tcp"
    rdma_devices: str = ""
    transfer_port_min: int = c.DEFAULT_TRANSFER_PORT_MIN
    transfer_port_max: int = c.DEFAULT_TRANSFER_PORT_MAX
    buffer_bytes: int = 64 << 20
    devices_per_pod: int = 1
    worker_id: str = ""
    capacity: int = 4
    """Most requests this worker holds queued + computing; beyond, the gateway keeps them queued."""
    max_batch_size: int = 4
    heartbeat_interval_s: float = 1.0
    stage_delay_s: float = 0.0
    """Extra seconds per batch, to make a pool slow in tests and benches only (never in production)."""
    dtype: str = "float32"
    encode_threads: int = 2
    """Threads that encode the decode role's media (PNG / MP4, CPU) off the compute thread, so the device
    decodes the next batch meanwhile; 0 = encode inline on the compute thread as before. Only the decode
    role uses it."""

    def __post_init__(self) -> None:
        if self.role not in c.STAGE_ROLES:
            raise ValueError(f"role must be one of {', '.join(c.STAGE_ROLES)}, got {self.role!r}")
        if self.platform not in c.PLATFORMS:
            raise ValueError(f"platform must be one of {', '.join(c.PLATFORMS)}, got {self.platform!r}")
        if self.capacity < 1 or self.max_batch_size < 1:
            raise ValueError("capacity and max_batch_size must be >= 1")
        if self.encode_threads < 0:
            raise ValueError(f"encode_threads must be >= 0, got {self.encode_threads}")

    @property
    def control_url(self) -> str:
        """host:port of the hand-over control listener (what the gateway logs for this worker)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.control_port}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", default=_env(c.ENV_ROLE), choices=c.STAGE_ROLES)
    p.add_argument("--family", default=_env(c.ENV_MODEL_FAMILY, "flux"))
    p.add_argument("--model-path", default=_env(c.ENV_MODEL_PATH), help="HF-layout directory (default: tiny)")
    p.add_argument(
        "--gateway-url", default=_env(c.ENV_GATEWAY_URL, f"http://127.0.0.1:{c.GATEWAY_HTTP_PORT}")
    )
    p.add_argument("--token-file", default=_env(c.ENV_TOKEN_FILE))
    p.add_argument("--deployment", default=_env(c.ENV_DEPLOYMENT, "local"))
    p.add_argument("--revision", default=_env(c.ENV_REVISION, "0"))
    p.add_argument("--platform", default=_env(c.ENV_PLATFORM, "cpu"), choices=c.PLATFORMS)
    p.add_argument("--host", default=_env(c.ENV_POD_IP, "127.0.0.1"), help="address peers reach us at")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument(
        "--control-port", type=int, default=int(_env(c.ENV_CONTROL_PORT, str(c.DEFAULT_CONTROL_PORT)))
    )
    p.add_argument(
        "--transfer-port", type=int, default=int(_env(c.ENV_TRANSFER_PORT, str(c.DEFAULT_TRANSFER_PORT)))
    )
    p.add_argument(
        "--transfer-backend", default=_env(c.ENV_TRANSFER_BACKEND, "tcp"), choices=c.TRANSFER_BACKENDS
    )
    p.add_argument(
        "--transfer-protocol", default=_env(c.ENV_TRANSFER_PROTOCOL, "tcp"), choices=c.TRANSFER_PROTOCOLS
    )
    p.add_argument("--rdma-devices", default=_env(c.ENV_RDMA_DEVICES, ""))
    p.add_argument("--buffer-bytes", type=int, default=int(_env(c.ENV_BUFFER_BYTES, str(64 << 20))))
    p.add_argument("--devices-per-pod", type=int, default=int(_env(c.ENV_DEVICES_PER_POD, "1")))
    p.add_argument("--worker-id", default="")
    p.add_argument("--capacity", type=int, default=4)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument(
        "--stage-delay",
        type=float,
        default=0.0,
        help="extra seconds per batch: makes this pool slow, for tests and benchmarks only",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "--encode-threads",
        type=int,
        default=int(_env(c.ENV_ENCODE_THREADS, "2")),
        help="decode role: threads encoding PNG/MP4 off the compute thread (0 = inline)",
    )
    p.add_argument("--log-level", default="info")


def settings_from_args(a: argparse.Namespace) -> WorkerSettings:
    if not a.role:
        raise SystemExit(f"--role or {c.ENV_ROLE} is required")
    if not a.token_file:
        raise SystemExit(f"the inter-role token is required: --token-file or {c.ENV_TOKEN_FILE}")
    lo, hi = (
        int(_env(c.ENV_TRANSFER_PORT_MIN, str(c.DEFAULT_TRANSFER_PORT_MIN))),
        int(_env(c.ENV_TRANSFER_PORT_MAX, str(c.DEFAULT_TRANSFER_PORT_MAX))),
    )
    return WorkerSettings(
        role=a.role,
        family=a.family,
        model_path=a.model_path,
        gateway_url=a.gateway_url.rstrip("/"),
        token_file=a.token_file,
        deployment=a.deployment,
        revision=a.revision,
        platform=a.platform,
        host=a.host,
        bind=a.bind,
        control_port=a.control_port,
        transfer_port=a.transfer_port,
        transfer_backend=a.transfer_backend,
        transfer_protocol=a.transfer_protocol,
        rdma_devices=a.rdma_devices,
        transfer_port_min=lo,
        transfer_port_max=hi,
        buffer_bytes=a.buffer_bytes,
        devices_per_pod=a.devices_per_pod,
        worker_id=a.worker_id or f"{a.role}-{socket.gethostname()}-{a.control_port}",
        capacity=a.capacity,
        max_batch_size=a.max_batch_size,
        heartbeat_interval_s=a.heartbeat_interval,
        stage_delay_s=a.stage_delay,
        dtype=a.dtype,
        encode_threads=a.encode_threads,
    )
