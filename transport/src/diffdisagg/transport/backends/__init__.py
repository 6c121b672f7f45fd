"""Transfer backends behind one small interface (`Backend`) and the factory that picks one by name.

`tcp` is the default and needs nothing; `mooncake` needs the platform's Mooncake wheel (imported only
when chosen); `loopback` is the in-process executable specification used by tests.
"""

from __future__ import annotations

from typing import Any

from diffdisagg.transport.backends.base import Backend
from diffdisagg.transport.errors import TransferError

__all__ = ["BACKENDS", "Backend", "make_backend"]

BACKENDS = ("tcp", "mooncake", "loopback")


def make_backend(name: str, **cfg: Any) -> Backend:
    """Build a backend from plain config.

    - `tcp`: token (bytes, required), host, port, advertise_host, connect_timeout_s, handshake_timeout_s;
    - `mooncake`: the fields of `MooncakeConfig` (host, protocol, device_name, rpc_port_min/max,
      transfer_timeout_s, log_level, location); `token` is accepted and ignored (Mooncake has no auth:
      its port range is fenced by the NetworkPolicy instead);
    - `loopback`: no options (`token` ignored).
    """
    if name == "tcp":
        from diffdisagg.transport.backends.tcp import TcpBackend

        return TcpBackend(**cfg)
    if name == "mooncake":
        from diffdisagg.transport.backends.mooncake import MooncakeBackend, MooncakeConfig

        cfg.pop("token", None)
        poll = {k: cfg.pop(k) for k in ("poll_min_s", "poll_max_s") if k in cfg}
        return MooncakeBackend(MooncakeConfig(**cfg), **poll)
    if name == "loopback":
        from diffdisagg.transport.backends.loopback import LoopbackBackend

        cfg.pop("token", None)
        if cfg:
            raise TransferError(f"loopback backend takes no options, got {sorted(cfg)}")
        return LoopbackBackend()
    raise TransferError(f"unknown transfer backend {name!r} (known: {', '.join(BACKENDS)})")
