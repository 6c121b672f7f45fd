"""The two calls a worker process makes to become one rank of a multi-device role worker.

Rank 0::

    ranks = start_leader(env, load_adapter)        # spawns ranks 1..N-1 when env.spawn_local
    runtime = WorkerRuntime(..., ranks.adapter, ...)   # a RoleAdapter, as with one device
    ...
    ranks.close()                                  # STOP to the followers, leave the group

Ranks 1..N-1 (before any socket, buffer or gateway link is opened)::

    sys.exit(run_follower(env, load_adapter))

``load_adapter(device)`` loads the role's adapter onto this rank's device; each rank loads before
it joins the group, so a slow model load never counts against a collective timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffdisagg.transport.platforms import Platform, current_platform
from diffdisagg.worker.pipelines.stages import RoleAdapter, StageInput

from .env import RankEnv
from .errors import DistributedError, RankConfigError
from .group import GroupConfig, RankGroup
from .lockstep import FatalHook, Leader, LeaderAdapter, follow
from .parallel import ParallelMode, apply_parallelism, request_blocker
from .spawn import LocalRanks, spawn_local_ranks
from .watchdog import RANK_LOST_EXIT_CODE, Watchdog

__all__ = ["LeaderRanks", "rank_device", "run_follower", "start_leader"]

log = logging.getLogger(__name__)

AdapterLoader = Callable[[torch.device], RoleAdapter]


def rank_device(env: RankEnv, platform: Platform | None = None) -> torch.device:
    """This rank's device: ``platform.device(local_rank)`` (the CPU for every rank on CPU)."""
    platform = platform or current_platform()
    if platform.device_type == "cpu":
        return torch.device("cpu")
    platform.set_device(env.local_rank)
    return platform.device(env.local_rank)


@dataclass
class LeaderRanks:
    """What rank 0 holds: the adapter to serve with, the group, and its spawned children (if any)."""

    adapter: LeaderAdapter
    leader: Leader
    group: RankGroup
    mode: ParallelMode
    children: LocalRanks | None = None
    _closed: bool = field(default=False, repr=False)

    def close(self, timeout_s: float = 30.0) -> dict[int, int | None]:
        """STOP the followers, leave the group, reap spawned children. Returns their exit codes."""
        if self._closed:
            return {}
        self._closed = True
        self.leader.stop(timeout_s)
        codes: dict[int, int | None] = {}
        if self.children is not None:
            codes = self.children.wait(timeout_s)
            if any(c is None for c in codes.values()):
                self.children.terminate()
        self.group.watchdog.close()
        return codes


def start_leader(
    env: RankEnv,
    load_adapter: AdapterLoader,
    *,
    platform: Platform | None = None,
    mode: str | ParallelMode = ParallelMode.AUTO,
    config: GroupConfig | None = None,
    on_fatal: FatalHook | None = None,
) -> LeaderRanks:
    """Become rank 0: (spawn the pod's other ranks,) load, join, split the model, start ticking."""
    if not env.is_leader or not env.distributed:
        raise RankConfigError(f"start_leader needs rank 0 of a group > 1 (got {env})")
    platform = platform or current_platform()
    watchdog = Watchdog()
    children = None
    if env.spawn_local:

        def lost(rank: int, code: int) -> None:
            watchdog.exit_now(f"rank group lost: rank {rank} exited with {code}")

        children = spawn_local_ranks(env, lost)
    try:
        adapter = load_adapter(rank_device(env, platform))
        group = RankGroup.start(env, platform, config, watchdog)
        chosen = apply_parallelism(adapter, group, mode)
    except BaseException:
        if children is not None:
            children.terminate()
        raise
    leader = Leader(group, adapter, on_fatal=on_fatal).start()
    log.info("rank 0 leading %d ranks (%s parallel)", env.world_size, chosen.value)
    world = env.world_size

    def check(item: StageInput) -> str | None:
        return request_blocker(adapter, chosen, world, item)

    return LeaderRanks(LeaderAdapter(leader, check), leader, group, chosen, children)


def run_follower(
    env: RankEnv,
    load_adapter: AdapterLoader,
    *,
    platform: Platform | None = None,
    mode: str | ParallelMode = ParallelMode.AUTO,
    config: GroupConfig | None = None,
) -> int:
    """Be rank 1..N-1 until rank 0 says STOP (returns 0) or the group fails (RANK_LOST_EXIT_CODE)."""
    if env.is_leader:
        raise RankConfigError("rank 0 leads; use start_leader")
    platform = platform or current_platform()
    watchdog = Watchdog()
    group: RankGroup | None = None
    try:
        adapter = load_adapter(rank_device(env, platform))
        group = RankGroup.start(env, platform, config, watchdog)
        apply_parallelism(adapter, group, mode)
        follow(group, adapter)
    except DistributedError as exc:
        log.critical("rank %d: rank group lost: %s", env.rank, exc)
        return RANK_LOST_EXIT_CODE
    finally:
        if group is not None:
            group.close()
        watchdog.close()
    return 0
