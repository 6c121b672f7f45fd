"""One role worker spanning several devices of a pod: rank groups, rank-0 broadcast, model parallelism.

See docs/multi-device.md. Entry points: ``RankEnv.from_env``, ``start_leader`` (rank 0),
``run_follower`` (ranks 1..N-1). Importing this package imports torch.
"""

from .entry import LeaderRanks, rank_device, run_follower, start_leader
from .env import RankEnv
from .errors import DistributedError, GroupClosedError, LockstepError, RankConfigError, RankLostError
from .group import GroupConfig, RankGroup
from .lockstep import Leader, LeaderAdapter, follow
from .parallel import ParallelMode, apply_parallelism, choose_mode
from .watchdog import RANK_LOST_EXIT_CODE, Watchdog

__all__ = [
    "RANK_LOST_EXIT_CODE",
    "DistributedError",
    "GroupClosedError",
    "GroupConfig",
    "Leader",
    "LeaderAdapter",
    "LeaderRanks",
    "LockstepError",
    "ParallelMode",
    "RankConfigError",
    "RankEnv",
    "RankGroup",
    "RankLostError",
    "Watchdog",
    "apply_parallelism",
    "choose_mode",
    "follow",
    "rank_device",
    "run_follower",
    "start_leader",
]
