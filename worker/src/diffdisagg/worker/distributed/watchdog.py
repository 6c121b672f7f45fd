"""The last line of defence against a hung rank: a thread that kills the process past a deadline.

Collective timeouts catch a dead peer on gloo (the socket closes) and a slow one (the group's
timeout), but some hangs never return to Python: an NCCL/HCCL kernel waiting for a peer that is
gone, a device that stopped answering, a deadlock inside a collective library. Every blocking step
of the rank group *arms* the watchdog with a deadline and disarms it afterwards; if a deadline
passes while armed, the watchdog logs what was running and calls ``os._exit`` with a non-zero code
so that Kubernetes restarts the pod. ``os._exit`` (not ``sys.exit``) because the thread that should
unwind is the one that is stuck.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["RANK_LOST_EXIT_CODE", "Watchdog"]

log = logging.getLogger(__name__)

#: Exit status of a rank that lost its group (EX_TEMPFAIL: a restart may well succeed).
RANK_LOST_EXIT_CODE = 75


class Watchdog:
    """One per process. ``arm(what, seconds)`` as a context manager around each blocking step."""

    def __init__(
        self,
        *,
        exit_code: int = RANK_LOST_EXIT_CODE,
        poll_s: float = 0.1,
        exit_fn: Callable[[int], None] = os._exit,
    ) -> None:
        self.exit_code = exit_code
        self._poll_s = poll_s
        self._exit = exit_fn
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[str, float]] = {}
        self._next = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rank-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def arm(self, what: str, seconds: float) -> Iterator[None]:
        token = self.arm_token(what, seconds)
        try:
            yield
        finally:
            self.disarm(token)

    def arm_token(self, what: str, seconds: float) -> int:
        with self._lock:
            self._next += 1
            self._armed[self._next] = (what, time.monotonic() + seconds)
            return self._next

    def disarm(self, token: int) -> None:
        with self._lock:
            self._armed.pop(token, None)

    def exit_now(self, reason: str) -> None:
        """Exit the process at once with ``exit_code`` (from any thread), logs flushed first."""
        log.critical("%s; exiting with %d", reason, self.exit_code)
        self._flush_logs()
        self._exit(self.exit_code)

    @staticmethod
    def _flush_logs() -> None:
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            now = time.monotonic()
            with self._lock:
                expired = [(what, now - due) for what, due in self._armed.values() if due <= now]
            if expired:
                what, late = expired[0]
                log.critical(
                    "rank watchdog: %r still blocked %.1f s past its deadline; exiting with %d",
                    what,
                    late,
                    self.exit_code,
                )
                self._flush_logs()
                self._exit(self.exit_code)
                return
