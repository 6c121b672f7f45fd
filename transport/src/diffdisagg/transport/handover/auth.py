"""Authentication of hand-over messages: HMAC-SHA256 with the shared inter-role token, plus replay checks.

The token comes from a file (a Kubernetes Secret mounted at DIFFDISAGG_TOKEN_FILE). A MAC covers a
domain label and the exact encoded message bytes, so a MAC made for another purpose (the tcp data
handshake) can never pass here. Comparison is constant-time.

Replay protection: every message carries a random nonce and a deadline. `ReplayGuard` remembers each
nonce until its message's deadline has passed; a message past its deadline is refused anyway, so the
memory is bounded by the traffic inside the deadline window (and capped outright).
Torch-free: the gateway imports this module.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from pathlib import Path

from diffdisagg.transport.errors import AuthenticationError, DeadlineExceededError, ProtocolError

__all__ = ["MAC_BYTES", "MIN_TOKEN_BYTES", "ReplayGuard", "load_token", "sign", "verify"]

MAC_BYTES = 32
MIN_TOKEN_BYTES = 16
_DOMAIN = b"diffdisagg/handover/v1\x00"


def sign(token: bytes, payload: bytes) -> bytes:
    """The 32-byte MAC of `payload` under `token`."""
    return hmac.new(token, _DOMAIN + payload, hashlib.sha256).digest()


def verify(token: bytes, payload: bytes, mac: bytes) -> bool:
    """True when `mac` is `payload`'s MAC under `token` (constant-time)."""
    return hmac.compare_digest(sign(token, payload), mac)


def load_token(path: str | Path) -> bytes:
    """Read the shared token (surrounding whitespace stripped); refuse short or missing tokens."""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise AuthenticationError(f"cannot read the hand-over token file {path}: {exc}") from exc
    check_token(token)
    return token


def check_token(token: bytes) -> bytes:
    if not isinstance(token, bytes) or len(token) < MIN_TOKEN_BYTES:
        raise AuthenticationError(f"the shared token must be at least {MIN_TOKEN_BYTES} bytes")
    return token


class ReplayGuard:
    """Refuses a nonce seen before, and messages outside [now - skew, now + horizon]."""

    def __init__(self, max_horizon_s: float = 3600.0, clock_skew_s: float = 2.0, max_entries: int = 200_000):
        self._horizon = max_horizon_s
        self._skew = clock_skew_s
        self._max = max_entries
        self._seen: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._next_prune = 0.0

    def check(self, nonce: bytes, deadline: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if deadline + self._skew < now:
            raise DeadlineExceededError(f"message deadline passed {now - deadline:.3f}s ago")
        if deadline > now + self._horizon:
            raise ProtocolError(f"message deadline {deadline - now:.0f}s ahead exceeds {self._horizon:.0f}s")
        with self._lock:
            if now >= self._next_prune or len(self._seen) >= self._max:
                self._prune(now)
            if nonce in self._seen:
                raise AuthenticationError("replayed message (nonce seen before)")
            if len(self._seen) >= self._max:
                raise ProtocolError("replay cache full; refusing new messages until deadlines pass")
            self._seen[nonce] = deadline + self._skew

    def _prune(self, now: float) -> None:
        self._seen = {n: d for n, d in self._seen.items() if d >= now}
        self._next_prune = now + 1.0

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)
