"""Pod-local launch: rank 0 starts ranks 1..N-1 as its own children and fails when one of them dies.

A pod is one container with one command, so a worker with ``DIFFDISAGG_DEVICES_PER_POD=N`` starts
as a single process: rank 0. It re-executes its own command line N-1 times with
``DIFFDISAGG_WORLD_SIZE/RANK/LOCAL_RANK/MASTER_ADDR/MASTER_PORT`` set (rendezvous on the pod's
loopback). Children die with their parent (``PR_SET_PDEATHSIG``, Linux), and a monitor thread in
rank 0 reports a child that exits on its own, so no rank outlives or silently loses the others.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from .env import RankEnv

__all__ = ["LocalRanks", "spawn_local_ranks"]

log = logging.getLogger(__name__)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LocalRanks:
    """The child processes of rank 0 (ranks 1..N-1)."""

    def __init__(
        self, procs: dict[int, subprocess.Popen[bytes]], on_exit: Callable[[int, int], None]
    ) -> None:
        self.procs = procs
        self._on_exit = on_exit
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name="rank-monitor", daemon=True)
        self._thread.start()

    def _monitor(self) -> None:
        while not self._stopping.wait(0.2):
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code is not None and not self._stopping.is_set():
                    log.critical("rank %d (pid %d) exited with %d", rank, proc.pid, code)
                    self._on_exit(rank, code)
                    return

    def wait(self, timeout_s: float) -> dict[int, int | None]:
        """Exit codes after waiting up to ``timeout_s`` for all children (None: still running)."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        return {r: p.poll() for r, p in self.procs.items()}

    def terminate(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; only our own children, by pid."""
        self._stopping.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)


def spawn_local_ranks(
    env: RankEnv,
    on_exit: Callable[[int, int], None],
    argv: Sequence[str] | None = None,
    base_env: Mapping[str, str] | None = None,
) -> LocalRanks:
    """Start ranks 1..N-1 of ``env`` (rank 0's env) running ``argv`` (default: this process's command)."""
    if not (env.spawn_local and env.is_leader):
        raise ValueError("only a spawn_local rank 0 starts the other ranks")
    cmd = list(argv) if argv is not None else [sys.executable, *sys.orig_argv[1:]]
    procs: dict[int, subprocess.Popen[bytes]] = {}
    for rank in range(1, env.world_size):
        child_env = dict(os.environ if base_env is None else base_env)
        child_env.update(env.for_rank(rank).to_env())
        procs[rank] = subprocess.Popen(cmd, env=child_env, preexec_fn=_die_with_parent)
        log.info("started rank %d (pid %d)", rank, procs[rank].pid)
    return LocalRanks(procs, on_exit)
