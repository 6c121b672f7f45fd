"""Worker -> gateway calls: register, heartbeat, next hop (long-poll), stage events, results. Signed.

Torch-free. Every call has a timeout; a failure raises `GatewayUnavailable` (network) or returns the
gateway's verdict on the request (`HopOutcome`).
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass
from typing import Any

import httpx
import msgpack

from diffdisagg.worker.control import signing
from diffdisagg.worker.control.messages import (
    PATH_EVENT,
    PATH_HEARTBEAT,
    PATH_HOP,
    PATH_POLL,
    PATH_REGISTER,
    PATH_RESULT,
    Heartbeat,
    HopGrant,
    HopRequest,
    Poll,
    PollReply,
    Register,
    RegisterReply,
    ResultHeader,
    StageEvent,
)

logger = logging.getLogger(__name__)


class GatewayUnavailable(Exception):
    """The gateway did not answer (or answered with an unexpected status)."""


class Verdict(enum.Enum):
    GRANTED = "granted"
    RETRY = "retry"  # no receiver with room yet: keep holding, ask again
    GONE = "gone"  # cancelled / failed / finished: drop it and free what we hold
    STALE = "stale"  # superseded attempt: drop it


@dataclass(frozen=True)
class HopOutcome:
    verdict: Verdict
    grant: HopGrant | None = None


_VERDICTS = {410: Verdict.GONE, 409: Verdict.STALE, 503: Verdict.RETRY}


class GatewayLink:
    def __init__(self, base_url: str, token: bytes, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._http = httpx.AsyncClient(timeout=timeout_s, trust_env=False)

    async def _post(self, path: str, body: bytes, ctype: str, timeout: float | None = None) -> httpx.Response:
        headers = {"content-type": ctype, **signing.sign(self.token, "POST", path, body)}
        try:
            kw: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
            return await self._http.post(self.base_url + path, content=body, headers=headers, **kw)
        except httpx.HTTPError as exc:
            raise GatewayUnavailable(f"{path}: {exc!r}") from exc

    async def _json(self, path: str, payload: dict[str, Any], timeout: float | None = None) -> httpx.Response:
        return await self._post(path, json.dumps(payload).encode(), "application/json", timeout)

    @staticmethod
    def _dump(msg: Any) -> dict[str, Any]:
        # Optional fields left at None are not sent: what a message without the newer fields (timings)
        # carries is exactly what an older gateway accepts (its models forbid unknown keys).
        return msg.model_dump(exclude_none=True)

    async def register(self, msg: Register) -> RegisterReply:
        resp = await self._json(PATH_REGISTER, self._dump(msg))
        if resp.status_code != 200:
            raise GatewayUnavailable(f"register refused: {resp.status_code} {resp.text[:300]}")
        return RegisterReply.model_validate(resp.json())

    async def heartbeat(self, msg: Heartbeat) -> RegisterReply:
        resp = await self._json(PATH_HEARTBEAT, self._dump(msg))
        if resp.status_code != 200:
            raise GatewayUnavailable(f"heartbeat refused: {resp.status_code} {resp.text[:300]}")
        return RegisterReply.model_validate(resp.json())

    async def poll(self, msg: Poll) -> PollReply:
        resp = await self._json(PATH_POLL, self._dump(msg), timeout=msg.wait_s + 10.0)
        if resp.status_code != 200:
            raise GatewayUnavailable(f"poll: {resp.status_code} {resp.text[:300]}")
        return PollReply.model_validate(resp.json())

    async def hop(self, msg: HopRequest) -> HopOutcome:
        resp = await self._json(PATH_HOP, self._dump(msg), timeout=msg.wait_s + 10.0)
        if resp.status_code == 200:
            return HopOutcome(Verdict.GRANTED, HopGrant.model_validate(resp.json()))
        if resp.status_code in _VERDICTS:
            return HopOutcome(_VERDICTS[resp.status_code])
        raise GatewayUnavailable(f"hop: {resp.status_code} {resp.text[:300]}")

    async def event(self, msg: StageEvent) -> Verdict:
        resp = await self._json(PATH_EVENT, self._dump(msg))
        if resp.status_code == 200:
            return Verdict.GRANTED
        if resp.status_code in _VERDICTS:
            return _VERDICTS[resp.status_code]
        raise GatewayUnavailable(f"event: {resp.status_code} {resp.text[:300]}")

    async def result(self, header: ResultHeader, media: bytes) -> Verdict:
        body = msgpack.packb({**self._dump(header), "media": media}, use_bin_type=True)
        resp = await self._post(PATH_RESULT, body, "application/msgpack")
        if resp.status_code == 200:
            return Verdict.GRANTED
        if resp.status_code in _VERDICTS:
            return _VERDICTS[resp.status_code]
        raise GatewayUnavailable(f"result: {resp.status_code} {resp.text[:300]}")

    async def close(self) -> None:
        await self._http.aclose()
