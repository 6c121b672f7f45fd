"""Dispatch: least-loaded choice, capacity, FIFO, late binding of hops, busy receivers, worker loss,
deadlines and cancellation — the Dispatcher driven directly on an event loop, workers simulated by
calling its worker-side methods (the same ones the internal HTTP API calls)."""

from __future__ import annotations

import asyncio
import time

import pytest

from diffdisagg.worker.control.messages import HopRequest, Load, Poll, Register, ResultHeader, StageEvent
from diffdisagg.worker.gateway.config import GatewayConfig
from diffdisagg.worker.gateway.dispatch import Dispatcher, NoReceiverYet, StaleMessage, Where
from diffdisagg.worker.gateway.errors import APIError
from diffdisagg.worker.gateway.registry import Registry

PARAMS = {"prompt": "x", "seed": 1}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(capacity: int = 2, max_attempts: int = 2, **workers: list[str]) -> tuple[Dispatcher, Clock]:
    clock = Clock()
    cfg = GatewayConfig(
        revision="r1", max_attempts=max_attempts, heartbeat_interval_s=1.0, heartbeat_misses=3
    )
    reg = Registry(1.0, 3, "r1", clock=clock)
    for role, ids in workers.items():
        for wid in ids:
            reg.register(
                Register(
                    worker_id=wid,
                    role=role,
                    deployment="local",
                    revision="r1",
                    family="flux",
                    control_url="",
                    handover={"host": "127.0.0.1", "port": 1, "name": wid},
                    load=Load(queued=0, inflight=0, held=0, free_slots=capacity, capacity=capacity),
                )
            )
    return Dispatcher(cfg, reg), clock


ALL = {"prefill": ["p1", "p2"], "denoise": ["d1", "d2"], "decode": ["c1"]}


async def _poll(d: Dispatcher, wid: str, wait: float = 1.0):
    return await d.poll(Poll(worker_id=wid, wait_s=wait))


def _started(d: Dispatcher, rid: str, attempt: int, wid: str, role: str) -> None:
    d.event(StageEvent(request_id=rid, attempt=attempt, worker_id=wid, role=role, event="started"))


def test_prefill_goes_to_a_polling_worker_least_loaded_first() -> None:
    async def main() -> None:
        d, _ = make(capacity=1, **ALL)
        p1 = asyncio.create_task(_poll(d, "p1"))
        p2 = asyncio.create_task(_poll(d, "p2"))
        await asyncio.sleep(0)
        a = d.submit(PARAMS, 10)
        b = d.submit(PARAMS, 10)
        c = d.submit(PARAMS, 10)  # both workers at capacity 1: waits in the gateway queue
        r1, r2 = await asyncio.gather(p1, p2)
        got = {s.request_id for s in r1.submits} | {s.request_id for s in r2.submits}
        assert got == {a.id, b.id} and len(r1.submits) == len(r2.submits) == 1
        assert c.where is Where.GATEWAY and c.holder is None
        assert d.queue_depth("prefill") == 3  # two assigned (not started) + one in the gateway queue
        assert d.waiting_by_place("prefill") == {"gateway": 1, "upstream": 0, "worker": 2}
        _started(d, a.id, 1, a.holder, "prefill")
        assert d.queue_depth("prefill") == 2 and d.inflight("prefill") == 1
        for t in (a, b, c):
            d.cancel(t.id)

    asyncio.run(main())


def test_no_live_worker_for_a_role_is_503_and_overload_is_429() -> None:
    async def main() -> None:
        d, _ = make(prefill=["p1"], denoise=["d1"])
        with pytest.raises(APIError) as err:
            d.submit(PARAMS, 10)
        assert err.value.status == 503 and "decode" in err.value.message
        d2, _ = make(**ALL)
        d2.cfg = GatewayConfig(revision="r1", limits=type(d2.cfg.limits)(max_pending=1))
        d2.submit(PARAMS, 10)
        with pytest.raises(APIError) as err:
            d2.submit(PARAMS, 10)
        assert err.value.status == 429 and "limit 1" in err.value.message

    asyncio.run(main())


async def _to_denoise_hop(d: Dispatcher) -> tuple:
    poll = asyncio.create_task(_poll(d, "p1"))
    await asyncio.sleep(0)
    t = d.submit(PARAMS, 10)
    await poll
    assert t.holder == "p1"
    _started(d, t.id, 1, "p1", "prefill")
    return t


def test_hop_is_late_bound_to_the_least_loaded_receiver_at_that_moment() -> None:
    async def main() -> None:
        d, _ = make(capacity=2, **ALL)
        t = await _to_denoise_hop(d)
        # d1 gets another request first, so at hop time d2 is the least loaded
        other = await _to_denoise_hop(d)
        g1 = await d.hop(
            HopRequest(
                request_id=other.id, attempt=1, worker_id="p1", from_role="prefill", stage_seconds=0.01
            )
        )
        assert g1.worker_id == "d1"
        g2 = await d.hop(
            HopRequest(request_id=t.id, attempt=1, worker_id="p1", from_role="prefill", stage_seconds=0.02)
        )
        assert g2.worker_id == "d2" and g2.handover["name"] == "d2"
        assert t.role == "denoise" and t.where is Where.WORKER and t.upstream == "p1"
        assert d.queue_depth("denoise") == 2 and d.queue_depth("prefill") == 0
        # a stage event from a worker that does not hold the request is refused
        with pytest.raises(StaleMessage):
            _started(d, t.id, 1, "d1", "denoise")

    asyncio.run(main())


def test_busy_receiver_is_skipped_and_the_request_counts_as_held_upstream() -> None:
    async def main() -> None:
        d, clock = make(capacity=1, prefill=["p1"], denoise=["d1"], decode=["c1"])
        t = await _to_denoise_hop(d)
        g = await d.hop(HopRequest(request_id=t.id, attempt=1, worker_id="p1", from_role="prefill"))
        assert g.worker_id == "d1"
        # d1 said busy: it is skipped for a while, nobody else has room -> held upstream
        with pytest.raises(NoReceiverYet):
            await d.hop(
                HopRequest(
                    request_id=t.id,
                    attempt=1,
                    worker_id="p1",
                    from_role="prefill",
                    failed_worker="d1",
                    failure="busy",
                    wait_s=0.05,
                )
            )
        assert t.where is Where.UPSTREAM and t.role == "denoise"
        assert d.waiting_by_place("denoise")["upstream"] == 1 and d.queue_depth("denoise") == 1
        assert d.queue_depth("prefill") == 0
        # after the back-off, asking again gets d1
        clock.now += 0.25
        g = await d.hop(HopRequest(request_id=t.id, attempt=1, worker_id="p1", from_role="prefill", wait_s=1))
        assert g.worker_id == "d1" and t.where is Where.WORKER

    asyncio.run(main())


def test_long_poll_hop_is_answered_when_a_receiver_frees_up() -> None:
    async def main() -> None:
        d, _ = make(capacity=1, prefill=["p1"], denoise=["d1"], decode=["c1"])
        first = await _to_denoise_hop(d)
        await d.hop(HopRequest(request_id=first.id, attempt=1, worker_id="p1", from_role="prefill"))
        second = await _to_denoise_hop(d)
        waiting = asyncio.create_task(
            d.hop(HopRequest(request_id=second.id, attempt=1, worker_id="p1", from_role="prefill", wait_s=5))
        )
        await asyncio.sleep(0.05)
        assert not waiting.done() and second.where is Where.GATEWAY
        assert d.queue_depth("denoise") == 2
        d.cancel(first.id)  # frees d1's capacity
        grant = await asyncio.wait_for(waiting, 1)
        assert grant.worker_id == "d1"

    asyncio.run(main())


def test_full_path_result_and_timings() -> None:
    async def main() -> None:
        d, _ = make(**ALL)
        t = await _to_denoise_hop(d)
        g = await d.hop(
            HopRequest(request_id=t.id, attempt=1, worker_id="p1", from_role="prefill", stage_seconds=0.01)
        )
        _started(d, t.id, 1, g.worker_id, "denoise")
        g2 = await d.hop(
            HopRequest(
                request_id=t.id, attempt=1, worker_id=g.worker_id, from_role="denoise", stage_seconds=0.5
            )
        )
        assert g2.worker_id == "c1"
        _started(d, t.id, 1, "c1", "decode")
        with pytest.raises(StaleMessage):
            d.result(
                ResultHeader(
                    request_id=t.id, attempt=1, worker_id="d1x", media_type="image/png", stage_seconds=0.1
                ),
                b"png",
            )
        d.result(
            ResultHeader(
                request_id=t.id, attempt=1, worker_id="c1", media_type="image/png", stage_seconds=0.1
            ),
            b"png",
        )
        res = await t.future
        assert res.media == b"png" and res.timings_ms["denoise_ms"] == pytest.approx(500)
        assert {"prefill_ms", "decode_ms", "total_ms", "hop_prefill_denoise_ms"} <= set(res.timings_ms)
        assert all(d.queue_depth(r) == 0 and d.inflight(r) == 0 for r in ("prefill", "denoise", "decode"))

    asyncio.run(main())


def test_lost_worker_restarts_request_from_prefill_then_fails_when_attempts_run_out() -> None:
    async def main() -> None:
        d, clock = make(max_attempts=2, **ALL)
        t = await _to_denoise_hop(d)
        g = await d.hop(HopRequest(request_id=t.id, attempt=1, worker_id="p1", from_role="prefill"))
        _started(d, t.id, 1, g.worker_id, "denoise")
        # every worker but the denoise holder keeps heartbeating; the holder goes silent
        clock.now += 3.5
        for w in d.registry.live():
            if w.worker_id != g.worker_id:
                d.registry.heartbeat(w.worker_id, w.load)
        d.tick()
        assert t.attempt == 2 and t.role == "prefill" and t.where is Where.GATEWAY and not t.done
        assert any(c.request_id == t.id and c.attempt == 1 for c in d.mailboxes[g.worker_id].cancels)
        # messages of the old attempt are stale
        with pytest.raises(StaleMessage):
            await d.hop(HopRequest(request_id=t.id, attempt=1, worker_id=g.worker_id, from_role="denoise"))
        # second loss: no attempts left -> 503 worker_lost
        poll = asyncio.create_task(_poll(d, "p1"))
        reply = await poll
        assert [s.attempt for s in reply.submits] == [2]
        clock.now += 3.5
        d.tick()
        with pytest.raises(APIError) as err:
            await t.future
        assert err.value.status == 503 and err.value.code == "worker_lost"

    asyncio.run(main())


def test_deadline_and_cancel_reach_the_holder() -> None:
    async def main() -> None:
        d, _ = make(**ALL)
        poll = asyncio.create_task(_poll(d, "p1"))
        await asyncio.sleep(0)
        t = d.submit(PARAMS, 0.05)
        await poll
        await asyncio.sleep(0.1)
        d.tick()
        with pytest.raises(APIError) as err:
            await t.future
        assert err.value.status == 504 and "deadline" in err.value.message
        reply = await _poll(d, "p1", 0.01)
        assert [c.request_id for c in reply.cancels] == [t.id]
        # cancel while queued: the pending submit is withdrawn, nothing is sent
        t2 = d.submit(PARAMS, 10)
        d.cancel(t2.id)
        with pytest.raises(APIError) as err:
            await t2.future
        assert err.value.code == "cancelled"
        reply = await _poll(d, "p2", 0.01)
        assert reply.submits == []

    asyncio.run(main())


def test_unknown_worker_poll_is_told_to_register() -> None:
    async def main() -> None:
        d, _ = make(**ALL)
        reply = await _poll(d, "nobody", 0.01)
        assert reply.known is False

    asyncio.run(main())


def test_deadline_is_unix_time_of_arrival_plus_timeout() -> None:
    async def main() -> None:
        d, _ = make(**ALL)
        t = d.submit(PARAMS, 30)
        assert abs(t.deadline - (time.time() + 30)) < 1

    asyncio.run(main())
