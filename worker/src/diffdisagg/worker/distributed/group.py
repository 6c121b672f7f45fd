"""The process groups of one multi-rank worker, and every collective it runs, each with a timeout.

Two groups over the same ranks:

- the **device group** (the default process group) with the platform's collective backend — NCCL on
  CUDA, HCCL on Ascend, gloo on CPU: input tensors and the model's own parallel collectives;
- the **control group**, always gloo on the CPU: step headers, msgpack payloads and the status vote
  that closes every step. Scalars never wait behind (or are copied onto) a device stream.

Rendezvous goes through a ``TCPStore`` on rank 0 with its own timeout, so a rank that never comes
up fails the others at start instead of leaving them waiting. Each collective is bounded twice:
the group's timeout (the backend raises) and the process watchdog (it kills the process when the
backend does not return at all). Any failure of a collective marks the group broken and raises
``RankLostError``; the caller turns that into a non-zero exit.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from diffdisagg.transport.platforms import Platform

from .env import RankEnv
from .errors import GroupClosedError, RankConfigError, RankLostError
from .watchdog import Watchdog

__all__ = ["GroupConfig", "RankGroup"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class GroupConfig:
    """Timeouts (seconds) of one rank group."""

    init_timeout_s: float = 600.0  # all ranks must have joined within this (model loads come first)
    # One control collective (header, payload, vote). The vote that closes a COMPUTE step waits
    # for the slowest rank, so this also bounds how far ranks may drift apart within one step.
    control_timeout_s: float = 60.0
    collective_timeout_s: float = 300.0  # one device-group collective (input blob, model collectives)
    compute_timeout_s: float = 1800.0  # one batch's compute, model collectives included
    tick_s: float = 2.0  # an idle rank 0 sends a SKIP step this often
    watchdog_margin_s: float = 15.0  # the watchdog fires this long after a backend timeout should have

    def __post_init__(self) -> None:
        for name in ("init_timeout_s", "control_timeout_s", "collective_timeout_s", "compute_timeout_s"):
            if getattr(self, name) <= 0:
                raise RankConfigError(f"{name} must be > 0")
        if not 0 < self.tick_s < self.control_timeout_s / 2:
            # Idle followers wait for the next header under control_timeout_s: ticks must come
            # well within it, or an idle but healthy worker would time itself out.
            raise RankConfigError("tick_s must be > 0 and < control_timeout_s / 2")


class RankGroup:
    """This rank's view of the group. Build with ``RankGroup.start``; ``close`` at the end."""

    def __init__(
        self,
        env: RankEnv,
        platform: Platform,
        config: GroupConfig,
        watchdog: Watchdog,
        control: Any,
    ) -> None:
        self.env = env
        self.platform = platform
        self.config = config
        self.watchdog = watchdog
        self._control = control
        self.broken: BaseException | None = None
        self.closed = False

    # ------------------------------------------------------------------------------------ start

    @classmethod
    def start(
        cls,
        env: RankEnv,
        platform: Platform,
        config: GroupConfig | None = None,
        watchdog: Watchdog | None = None,
    ) -> RankGroup:
        config = config or GroupConfig()
        watchdog = watchdog or Watchdog()
        if not env.distributed:
            raise RankConfigError("a rank group needs world size > 1")
        if dist.is_initialized():
            raise RankConfigError("torch.distributed is already initialised in this process")
        if platform.device_type != "cpu":
            platform.set_device(env.local_rank)  # before the backend creates its communicators
        backend = platform.collective_backend
        log.info(
            "joining rank group",
            extra={"rank": env.rank, "world_size": env.world_size, "backend": backend, "at": env.init_method},
        )
        with watchdog.arm("rank group rendezvous", config.init_timeout_s + config.watchdog_margin_s):
            try:
                store = dist.TCPStore(
                    env.master_addr,
                    env.master_port,
                    env.world_size,
                    is_master=env.rank == 0,
                    timeout=datetime.timedelta(seconds=config.init_timeout_s),
                    wait_for_workers=True,
                )
                dist.init_process_group(
                    backend=backend,
                    store=store,
                    rank=env.rank,
                    world_size=env.world_size,
                    timeout=datetime.timedelta(seconds=config.collective_timeout_s),
                )
                control = dist.new_group(
                    backend="gloo", timeout=datetime.timedelta(seconds=config.control_timeout_s)
                )
                # One round trip on each group: every rank is really there before we serve.
                probe = torch.ones(1, dtype=torch.int64)
                dist.all_reduce(probe, group=control)
                if int(probe.item()) != env.world_size:
                    raise RankConfigError(f"control group has {int(probe.item())} ranks")
            except RankConfigError:
                raise
            except Exception as exc:
                raise RankLostError(f"rank group rendezvous at {env.init_method} failed: {exc}") from exc
        group = cls(env, platform, config, watchdog, control)
        group._device_barrier()
        return group

    # ------------------------------------------------------------------------------- properties

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_leader(self) -> bool:
        return self.env.rank == 0

    @property
    def device(self) -> torch.device:
        return (
            self.platform.device(self.env.local_rank)
            if self.platform.device_type != "cpu"
            else torch.device("cpu")
        )

    @property
    def device_group(self) -> Any:
        """The default process group (platform backend): what model-parallel code should use."""
        return dist.group.WORLD

    # ------------------------------------------------------------------------------ collectives

    def run(self, what: str, timeout_s: float, fn: Callable[[], T]) -> T:
        """Run ``fn`` (one or more collectives) under the watchdog; failures break the group."""
        if self.closed:
            raise GroupClosedError("rank group is closed")
        if self.broken is not None:
            raise GroupClosedError(f"rank group broke earlier: {self.broken}")
        try:
            with self.watchdog.arm(what, timeout_s + self.config.watchdog_margin_s):
                return fn()
        except Exception as exc:
            self.broken = exc
            raise RankLostError(f"{what} failed on rank {self.rank}: {exc}") from exc

    def broadcast_control(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Broadcast a CPU tensor from rank 0 over the control group (in place)."""
        self.run(
            what, self.config.control_timeout_s, lambda: dist.broadcast(tensor, src=0, group=self._control)
        )
        return tensor

    def broadcast_device(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Broadcast a device tensor from rank 0 over the device group (in place)."""
        self.run(what, self.config.collective_timeout_s, lambda: dist.broadcast(tensor, src=0))
        return tensor

    def vote(self, failed: bool, what: str) -> int:
        """How many ranks report failure for this step (every rank calls it; closes every step)."""
        t = torch.tensor([1 if failed else 0], dtype=torch.int64)
        self.run(what, self.config.control_timeout_s, lambda: dist.all_reduce(t, group=self._control))
        return int(t.item())

    def _device_barrier(self) -> None:
        t = torch.ones(1, dtype=torch.int64, device=self.device)
        self.run("device group probe", self.config.collective_timeout_s, lambda: dist.all_reduce(t))
        if int(t.item()) != self.world_size:
            raise RankConfigError(f"device group has {int(t.item())} ranks, expected {self.world_size}")

    # ---------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Leave the groups. After a failure, skip the collective teardown (peers may be gone)."""
        if self.closed:
            return
        self.closed = True
        if self.broken is None and dist.is_initialized():
            try:
                with self.watchdog.arm("destroy process group", self.config.control_timeout_s):
                    dist.destroy_process_group()
            except Exception:
                log.warning("destroy_process_group failed", exc_info=True)
