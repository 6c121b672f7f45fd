"""HMAC-SHA256 authentication of control messages between the gateway and the workers.

Every worker->gateway and gateway->worker call is signed with the shared inter-role token (a Secret in
Kubernetes, a file named by DIFFDISAGG_TOKEN_FILE). The MAC covers the method, the path, a timestamp and
the raw body, so a captured message can be neither altered nor replayed outside a short window.
Standard library only (the torch-free gateway imports it).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from pathlib import Path

HEADER_SIGNATURE = "x-diffdisagg-signature"
HEADER_TIMESTAMP = "x-diffdisagg-timestamp"
#: A signed message older (or newer) than this many seconds is refused: bounds replay of a captured call.
MAX_SKEW_S = 30.0


class SignatureError(Exception):
    """The message carries no signature, a wrong one, or one outside the replay window."""


def load_token(path: str | Path) -> bytes:
    """Read the inter-role token; surrounding whitespace (a trailing newline from a Secret) is dropped."""
    token = Path(path).read_bytes().strip()
    if len(token) < 16:
        raise ValueError(f"inter-role token in {path} is shorter than 16 bytes")
    return token


#: Domain label: a MAC made for this channel can never verify on another one that shares the token
#: (the hand-over channel uses its own label in diffdisagg.transport.handover.auth).
_DOMAIN = b"diffdisagg/control/v1\x00"


def _mac(token: bytes, method: str, path: str, timestamp: str, body: bytes) -> str:
    head = _DOMAIN + f"{method.upper()}\n{path}\n{timestamp}\n".encode()
    return hmac.new(token, head + body, hashlib.sha256).hexdigest()


def sign(token: bytes, method: str, path: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """Headers that authenticate `body` sent as `method path`."""
    ts = f"{time.time() if now is None else now:.3f}"
    return {HEADER_TIMESTAMP: ts, HEADER_SIGNATURE: _mac(token, method, path, ts, body)}


def verify(
    token: bytes, method: str, path: str, body: bytes, headers: Mapping[str, str], now: float | None = None
) -> None:
    """Raise SignatureError unless `headers` hold a valid, fresh signature of the message."""
    mac = headers.get(HEADER_SIGNATURE)
    ts = headers.get(HEADER_TIMESTAMP)
    if not mac or not ts:
        raise SignatureError("missing signature headers")
    try:
        sent = float(ts)
    except ValueError:
        raise SignatureError("malformed timestamp") from None
    current = time.time() if now is None else now
    if abs(current - sent) > MAX_SKEW_S:
        raise SignatureError(f"timestamp outside the {MAX_SKEW_S:.0f}s replay window")
    if not hmac.compare_digest(mac, _mac(token, method, path, ts, body)):
        raise SignatureError("bad signature")
