"""Errors of a multi-rank role worker (one worker spanning several devices of a pod)."""

from __future__ import annotations

__all__ = [
    "DistributedError",
    "GroupClosedError",
    "LockstepError",
    "RankConfigError",
    "RankLostError",
]


class DistributedError(RuntimeError):
    """Base of everything this package raises."""


class RankConfigError(DistributedError, ValueError):
    """The rank environment (world size, rank, master address/port) is missing or inconsistent."""


class RankLostError(DistributedError):
    """A collective failed or timed out: a peer rank died, hung or could not be reached.

    The group is unusable afterwards; the worker must exit non-zero so that its pod restarts.
    """


class LockstepError(DistributedError):
    """Ranks disagree (wrong sequence number, malformed control message, diverging results)."""


class GroupClosedError(DistributedError):
    """The rank group was stopped or broke earlier; no more steps can run on it."""
