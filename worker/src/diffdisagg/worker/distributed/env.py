"""Where this process sits in its worker's rank group: world size, rank, local rank, rendezvous.

Read once from the environment. Three ways to be started, in this order of precedence:

1. ``DIFFDISAGG_WORLD_SIZE`` / ``DIFFDISAGG_RANK`` (+ optional ``DIFFDISAGG_LOCAL_RANK``,
   ``DIFFDISAGG_MASTER_ADDR``, ``DIFFDISAGG_MASTER_PORT``): set by our own pod-local launcher
   (``spawn.py``) for ranks 1..N-1, or by anyone who starts the ranks by hand;
2. torchrun's ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``;
3. neither: ``DIFFDISAGG_DEVICES_PER_POD`` (what the operator writes) > 1 makes this process rank 0
   *and* the launcher of ranks 1..N-1 on the same pod (``spawn_local``); otherwise a single rank.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import RankConfigError

__all__ = [
    "DEFAULT_MASTER_ADDR",
    "DEFAULT_MASTER_PORT",
    "ENV_LOCAL_RANK",
    "ENV_MASTER_ADDR",
    "ENV_MASTER_PORT",
    "ENV_RANK",
    "ENV_WORLD_SIZE",
    "RankEnv",
]

ENV_WORLD_SIZE = "DIFFDISAGG_WORLD_SIZE"
ENV_RANK = "DIFFDISAGG_RANK"
ENV_LOCAL_RANK = "DIFFDISAGG_LOCAL_RANK"
ENV_MASTER_ADDR = "DIFFDISAGG_MASTER_ADDR"
ENV_MASTER_PORT = "DIFFDISAGG_MASTER_PORT"
# Same name as in diffdisagg.worker.contract (kept literal: this module must not import the worker).
ENV_DEVICES_PER_POD = "DIFFDISAGG_DEVICES_PER_POD"

# All ranks of one worker live in one pod, so the rendezvous is on the pod's loopback: nothing
# outside the pod (and no NetworkPolicy) is involved.
DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500

_TORCHRUN = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name, "")
    if raw == "":
        if default is None:
            raise RankConfigError(f"{name} is required")
        return default
    try:
        return int(raw)
    except ValueError:
        raise RankConfigError(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class RankEnv:
    """One rank's place in the group. ``spawn_local``: this rank 0 must start ranks 1..N-1 itself."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    spawn_local: bool = False
    source: str = "single"

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise RankConfigError(f"world size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise RankConfigError(f"rank {self.rank} outside [0, {self.world_size})")
        if self.local_rank < 0:
            raise RankConfigError(f"local rank must be >= 0, got {self.local_rank}")
        if not 0 < self.master_port < 65536:
            raise RankConfigError(f"master port must be in 1..65535, got {self.master_port}")
        if not self.master_addr:
            raise RankConfigError("master address is empty")
        if self.spawn_local and self.rank != 0:
            raise RankConfigError("only rank 0 spawns the other ranks")

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def init_method(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"

    def for_rank(self, rank: int) -> RankEnv:
        """The env of another rank of the same pod-local group (what ``spawn`` hands to a child)."""
        return RankEnv(self.world_size, rank, rank, self.master_addr, self.master_port, False, "diffdisagg")

    def to_env(self) -> dict[str, str]:
        """The ``DIFFDISAGG_*`` variables that recreate this rank in a child process."""
        return {
            ENV_WORLD_SIZE: str(self.world_size),
            ENV_RANK: str(self.rank),
            ENV_LOCAL_RANK: str(self.local_rank),
            ENV_MASTER_ADDR: self.master_addr,
            ENV_MASTER_PORT: str(self.master_port),
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RankEnv:
        env = os.environ if env is None else env
        if env.get(ENV_RANK, "") != "" or env.get(ENV_WORLD_SIZE, "") != "":
            rank = _int(env, ENV_RANK)
            return cls(
                world_size=_int(env, ENV_WORLD_SIZE),
                rank=rank,
                local_rank=_int(env, ENV_LOCAL_RANK, rank),
                master_addr=env.get(ENV_MASTER_ADDR) or DEFAULT_MASTER_ADDR,
                master_port=_int(env, ENV_MASTER_PORT, DEFAULT_MASTER_PORT),
                source="diffdisagg",
            )
        if env.get("RANK", "") != "" and env.get("WORLD_SIZE", "") != "":
            rank = _int(env, "RANK")
            return cls(
                world_size=_int(env, "WORLD_SIZE"),
                rank=rank,
                local_rank=_int(env, "LOCAL_RANK", rank),
                master_addr=env.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
                master_port=_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT),
                source="torchrun",
            )
        devices = _int(env, ENV_DEVICES_PER_POD, 1)
        if devices < 1:
            raise RankConfigError(f"{ENV_DEVICES_PER_POD} must be >= 1, got {devices}")
        if devices == 1:
            return cls()
        return cls(
            world_size=devices,
            master_addr=env.get(ENV_MASTER_ADDR) or DEFAULT_MASTER_ADDR,
            master_port=_int(env, ENV_MASTER_PORT, DEFAULT_MASTER_PORT),
            spawn_local=True,
            source="devices_per_pod",
        )
