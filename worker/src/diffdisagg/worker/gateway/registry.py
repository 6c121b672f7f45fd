"""Live workers per role: registration, heartbeats, liveness.

A worker is live while its last heartbeat is younger than `misses * interval`; a worker that went
silent (killed, SIGSTOPped, partitioned) is dropped from dispatch and rejoins by itself when its next
heartbeat arrives (the heartbeat answer tells it to re-register if the gateway forgot it). The clock
is injectable so the tests drive it without sleeping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffdisagg.worker.control.messages import Load, Register

logger = logging.getLogger(__name__)


@dataclass
class WorkerInfo:
    worker_id: str
    role: str
    control_url: str
    handover: dict[str, Any]
    revision: str
    load: Load
    last_seen: float
    registered_at: float
    busy_until: float = 0.0  # a receiver that said `busy` is skipped until then
    live: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    def __init__(
        self,
        heartbeat_interval_s: float,
        misses: int,
        revision: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = heartbeat_interval_s
        self.misses = misses
        self.revision = revision
        self.clock = clock
        self._workers: dict[str, WorkerInfo] = {}

    @property
    def timeout(self) -> float:
        return self.interval * self.misses

    def register(self, msg: Register) -> bool:
        """Add or refresh a worker; returns whether it was known and live before."""
        now = self.clock()
        old = self._workers.get(msg.worker_id)
        known = old is not None and old.live
        self._workers[msg.worker_id] = WorkerInfo(
            worker_id=msg.worker_id,
            role=msg.role,
            control_url=msg.control_url.rstrip("/"),
            handover=dict(msg.handover),
            revision=msg.revision,
            load=msg.load,
            last_seen=now,
            registered_at=old.registered_at if old else now,
        )
        if not known:
            logger.info("worker %s (%s) joined at %s", msg.worker_id, msg.role, msg.control_url)
        return known

    def heartbeat(self, worker_id: str, load: Load) -> bool:
        """Record a heartbeat; False when the worker is unknown or was dropped (it must re-register)."""
        info = self._workers.get(worker_id)
        if info is None or not info.live:
            return False
        info.load = load
        info.last_seen = self.clock()
        return True

    def expire(self) -> list[WorkerInfo]:
        """Drop workers that missed their heartbeats; returns those dropped by this call."""
        now = self.clock()
        dropped = []
        for info in self._workers.values():
            if info.live and now - info.last_seen > self.timeout:
                info.live = False
                dropped.append(info)
                logger.warning(
                    "worker %s (%s) dropped from dispatch: no heartbeat for %.2fs",
                    info.worker_id,
                    info.role,
                    now - info.last_seen,
                )
        return dropped

    def drop(self, worker_id: str, why: str) -> WorkerInfo | None:
        info = self._workers.get(worker_id)
        if info is not None and info.live:
            info.live = False
            logger.warning("worker %s (%s) dropped from dispatch: %s", worker_id, info.role, why)
            return info
        return None

    def mark_busy(self, worker_id: str, seconds: float) -> None:
        info = self._workers.get(worker_id)
        if info is not None:
            info.busy_until = self.clock() + seconds

    def get(self, worker_id: str) -> WorkerInfo | None:
        return self._workers.get(worker_id)

    def live(self, role: str | None = None) -> list[WorkerInfo]:
        return [w for w in self._workers.values() if w.live and (role is None or w.role == role)]

    def all(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    def servable(self, role: str) -> list[WorkerInfo]:
        """Live workers of this gateway's revision: the only ones it dispatches to. During a rollout, old
        workers stay registered (and in the metrics) but must not make the gateway ready."""
        return [w for w in self.live(role) if w.revision == self.revision]

    def roles_live(self, roles: tuple[str, ...]) -> dict[str, int]:
        return {r: len(self.servable(r)) for r in roles}
