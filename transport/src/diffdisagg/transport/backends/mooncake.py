"""Mooncake Transfer Engine backend: one-sided writes into the peer's registered region.

Read shared notes/mooncake.md before changing this file. What it guards against:

- `initialize()`'s protocol argument is ignored by the classic engine: the transport is forced through
  `MC_FORCE_TCP=1` / `MC_FORCE_HCA=1` from our config, set before the engine starts.
- the RPC/data ports are random in [MC_MIN_RPC_PORT, MC_MAX_RPC_PORT], bound on 0.0.0.0 without any
  authentication: our config fixes the range so a NetworkPolicy can name it.
- `transfer_sync_*` busy-spins a core: we submit with `transfer_submit_write` and poll with sleeps.
- `transfer_check_status` frees the batch when it returns 1 or -1; polling the id again reads freed
  memory. A batch is polled until it says 1/-1/-2 and never after; a batch still pending at our deadline
  is handed to a reaper thread that keeps (sleep-)polling it to its end, so it is neither leaked nor
  polled after completion.
- the first write to a peer opens its segment (P2P handshake) synchronously inside
  `transfer_submit_write`, with no deadline: a peer that accepts the connection but never answers
  (SIGSTOPped, hung) blocks the caller indefinitely. Until a session has completed one write, submits
  run on a helper thread and the caller waits only until its deadline.
- a timed-out write leaves the destination partially written and may still land later: `quiesce` cannot
  stop a one-sided write, so it answers False and the receiver holds the slot back for
  `late_write_window_s` (the engine's own transfer timeout) before reusing it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from diffdisagg.transport.backends.base import Backend, buffer_address, check_range
from diffdisagg.transport.errors import (
    PeerUnavailableError,
    TransferError,
    TransferTimeoutError,
)

__all__ = ["MooncakeBackend", "MooncakeConfig", "mooncake_env"]

log = logging.getLogger(__name__)

_PROTOCOLS = ("tcp", "rdma", "ascend")


@dataclass(frozen=True)
class MooncakeConfig:
    """How to start the engine (every field maps to one Mooncake setting; see mooncake_env)."""

    host: str = "127.0.0.1"
    """Our address as peers reach it (the pod IP); P2P session = host:<rpc port>."""
    protocol: str = "tcp"
    """tcp | rdma | ascend. Forced through MC_FORCE_TCP / MC_FORCE_HCA, never left to auto-detection."""
    device_name: str = ""
    """Comma-separated RDMA NIC allow-list (DIFFDISAGG_RDMA_DEVICES); empty = all."""
    rpc_port_min: int = 15000
    rpc_port_max: int = 15063
    transfer_timeout_s: int = 10
    """MC_TRANSFER_TIMEOUT (the engine's own limit, >= 5); bounds how late an abandoned write can land."""
    log_level: str = "ERROR"
    location: str = "*"
    """register_memory location: cpu:0, cuda:0, npu:0, or * (auto-detect)."""

    def __post_init__(self) -> None:
        if self.protocol not in _PROTOCOLS:
            raise TransferError(f"mooncake protocol must be one of {_PROTOCOLS}, got {self.protocol!r}")
        if not 0 < self.rpc_port_min <= self.rpc_port_max < 65536:
            raise TransferError(f"bad mooncake port range {self.rpc_port_min}-{self.rpc_port_max}")
        if self.transfer_timeout_s < 5:
            raise TransferError("mooncake enforces a transfer timeout of at least 5 s")


def mooncake_env(cfg: MooncakeConfig) -> dict[str, str]:
    """The Mooncake environment our config stands for (the only place that names MC_* switches)."""
    env = {
        "MC_MIN_RPC_PORT": str(cfg.rpc_port_min),
        "MC_MAX_RPC_PORT": str(cfg.rpc_port_max),
        "MC_TRANSFER_TIMEOUT": str(cfg.transfer_timeout_s),
        "MC_LOG_LEVEL": cfg.log_level,
    }
    if cfg.protocol == "tcp":
        env["MC_FORCE_TCP"] = "1"
    elif cfg.protocol == "rdma":
        env["MC_FORCE_HCA"] = "1"  # fail loudly without an RNIC instead of silently using TCP
    return env


class MooncakeBackend(Backend):
    name = "mooncake"

    def __init__(
        self, config: MooncakeConfig | None = None, poll_min_s: float = 20e-6, poll_max_s: float = 1e-3
    ) -> None:
        super().__init__()
        self._cfg = config or MooncakeConfig()
        env = mooncake_env(self._cfg)
        # The engine reads these when it starts; the opposite switch from an outer env would fight ours.
        for key in ("MC_FORCE_TCP", "MC_FORCE_HCA"):
            os.environ.pop(key, None)
        os.environ.update(env)
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:  # wheel missing or libibverbs1 absent
            raise TransferError(f"mooncake backend unavailable: {exc}") from exc
        self._engine = TransferEngine()
        rc = self._engine.initialize(
            self._cfg.host, "P2PHANDSHAKE", self._cfg.protocol, self._cfg.device_name
        )
        if rc != 0:
            raise TransferError(f"mooncake initialize failed (rc={rc}, protocol={self._cfg.protocol})")
        self._session = f"{self._cfg.host}:{self._engine.get_rpc_port()}"
        self._poll_min, self._poll_max = poll_min_s, poll_max_s
        self._address = 0
        self._nbytes = 0
        self._regions: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._orphans: list[tuple[int, float, tuple[int, int] | None]] = []  # batch, since, temp region
        self._orphan_submits: list[tuple[Future[int], float, tuple[int, int] | None]] = []
        self._known: set[str] = set()  # sessions whose segment is open (a write has completed)
        self._submitter = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mooncake-submit")
        self._reaper_wake = threading.Event()
        self._closed = False
        self._reaper = threading.Thread(target=self._reap_loop, name="mooncake-reaper", daemon=True)
        self._reaper.start()

    @property
    def session(self) -> str:
        return self._session

    def register(self, address: int, nbytes: int, view: memoryview | None = None) -> None:
        if self._nbytes:
            raise TransferError("mooncake backend: a region is registered already")
        rc = self._engine.register_memory(address, nbytes, self._cfg.location)
        if rc != 0:
            raise TransferError(f"mooncake register_memory({nbytes} B) failed, rc={rc}")
        self._address, self._nbytes = address, nbytes
        self._regions.append((address, nbytes))

    @property
    def endpoint(self) -> dict[str, Any]:
        if not self._nbytes:
            raise TransferError("mooncake backend: register a region before publishing the endpoint")
        return {"backend": self.name, "session": self._session, "base": self._address, "nbytes": self._nbytes}

    def write(
        self,
        peer_endpoint: dict[str, Any],
        src: memoryview | int,
        dst_offset: int,
        nbytes: int,
        deadline: float,
        *,
        tag: bytes = b"",
    ) -> None:
        try:
            session, base = str(peer_endpoint["session"]), int(peer_endpoint["base"])
            region = int(peer_endpoint["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TransferError(f"not a mooncake endpoint: {peer_endpoint!r}") from exc
        check_range(dst_offset, nbytes, region)
        if time.time() >= deadline:
            raise TransferTimeoutError("mooncake write: deadline passed before submit")
        local = buffer_address(src)
        temp = self._ensure_registered(local, nbytes)
        batch = self._submit(session, local, base + dst_offset, nbytes, deadline, temp)
        if batch == 0:
            self._drop_temp(temp)
            raise self._failure(session, "submit failed")
        delay = self._poll_min
        while True:
            status = self._engine.transfer_check_status(batch)
            if status == 1:
                self._drop_temp(temp)
                self._known.add(session)
                return
            if status == -1:  # batch freed by the engine: never poll it again
                self._drop_temp(temp)
                self._known.discard(session)
                raise self._failure(session, "transfer failed")
            if status == -2:
                self._drop_temp(temp)
                raise TransferTimeoutError(f"mooncake write to {session} hit the engine's transfer timeout")
            now = time.time()
            if now >= deadline:
                with self._lock:
                    self._orphans.append((batch, now, temp))
                self._reaper_wake.set()
                raise TransferTimeoutError(
                    f"mooncake write of {nbytes} B to {session} not done by its deadline; "
                    "destination contents undefined"
                )
            time.sleep(min(delay, max(deadline - now, 0)))
            delay = min(delay * 2, self._poll_max)

    def _submit(
        self,
        session: str,
        local: int,
        remote: int,
        nbytes: int,
        deadline: float,
        temp: tuple[int, int] | None,
    ) -> int:
        if session in self._known:
            return self._engine.transfer_submit_write(session, local, remote, nbytes)
        future = self._submitter.submit(self._engine.transfer_submit_write, session, local, remote, nbytes)
        try:
            return future.result(timeout=max(deadline - time.time(), 0))
        except FutureTimeout:
            with self._lock:
                self._orphan_submits.append((future, time.time(), temp))
            self._reaper_wake.set()
            raise TransferTimeoutError(
                f"mooncake could not open a session with {session} before the deadline (peer hung?)"
            ) from None

    def _failure(self, session: str, what: str) -> TransferError:
        # The binding folds most failures into -1; a probe tells a dead peer from a refused write.
        if self._engine.send_probe(session) != 0:
            return PeerUnavailableError(f"mooncake peer {session} unreachable ({what})")
        return TransferError(f"mooncake write to {session}: {what} (peer alive; range refused?)")

    def _ensure_registered(self, address: int, nbytes: int) -> tuple[int, int] | None:
        with self._lock:
            for start, size in self._regions:
                if start <= address and address + nbytes <= start + size:
                    return None
        # RDMA needs a registered source; register a one-off region (costly: stage into the buffer).
        rc = self._engine.register_memory(address, nbytes, self._cfg.location)
        if rc != 0:
            raise TransferError(f"mooncake could not register the source ({nbytes} B), rc={rc}")
        with self._lock:
            self._regions.append((address, nbytes))
        return (address, nbytes)

    def _drop_temp(self, temp: tuple[int, int] | None) -> None:
        if temp is None:
            return
        with self._lock:
            if temp in self._regions:
                self._regions.remove(temp)
        self._engine.unregister_memory(temp[0])

    def _reap_loop(self) -> None:
        while not self._closed:
            self._reaper_wake.wait(timeout=0.05)
            self._reaper_wake.clear()
            with self._lock:
                submits, self._orphan_submits = self._orphan_submits, []
            waiting = []
            for future, since, temp in submits:
                if not future.done():
                    waiting.append((future, since, temp))
                elif future.exception() is None and future.result() != 0:
                    with self._lock:
                        self._orphans.append((future.result(), since, temp))
                else:
                    self._drop_temp(temp)
            with self._lock:
                self._orphan_submits.extend(waiting)
                orphans, self._orphans = self._orphans, []
            keep = []
            for batch, since, temp in orphans:
                status = self._engine.transfer_check_status(batch)
                if status == 0:
                    keep.append((batch, since, temp))
                    continue
                log.info(
                    "mooncake orphaned batch %d ended with status %d after %.2fs",
                    batch,
                    status,
                    time.time() - since,
                )
                self._drop_temp(temp)
            if keep:
                with self._lock:
                    self._orphans.extend(keep)

    def late_write_window_s(self, nbytes: int) -> float:
        # The engine gives up after MC_TRANSFER_TIMEOUT plus 1 ns per byte; a margin covers the queue.
        return self._cfg.transfer_timeout_s + nbytes * 1e-9 + 1.0

    @property
    def pending_batches(self) -> int:
        with self._lock:
            return len(self._orphans) + len(self._orphan_submits)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reaper_wake.set()
        self._reaper.join(timeout=1.0)
        self._submitter.shutdown(wait=False, cancel_futures=True)
        if self._nbytes:
            self._engine.unregister_memory(self._address)
