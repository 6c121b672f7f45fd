"""Gateway metrics: every contract name is exported with its labels, and queue depth / in-flight follow
the request table exactly as DESIGN.md defines queue depth (gateway queue + held upstream + queued in a
worker of the role)."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from diffdisagg.worker import contract
from diffdisagg.worker.control.messages import HopRequest, Load, Poll, Register, StageEvent
from diffdisagg.worker.gateway.app import Gateway
from diffdisagg.worker.gateway.config import GatewayConfig
from diffdisagg.worker.gateway.dispatch import NoReceiverYet


def samples(gw: Gateway) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(gw.metrics.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def depth(gw: Gateway, role: str) -> float:
    return samples(gw)[(contract.METRIC_QUEUE_DEPTH, (("deployment", "dep"), ("role", role)))]


def gauge(gw: Gateway, name: str, role: str) -> float:
    return samples(gw)[(name, (("deployment", "dep"), ("role", role)))]


def _register(gw: Gateway, wid: str, role: str, capacity: int) -> None:
    gw.registry.register(
        Register(
            worker_id=wid,
            role=role,
            deployment="dep",
            revision="0",
            family="flux",
            control_url="",
            handover={"host": "h", "port": 1},
            load=Load(queued=0, inflight=0, held=0, free_slots=3, capacity=capacity),
        )
    )


def test_every_contract_metric_is_exported() -> None:
    async def main() -> None:
        gw = Gateway(GatewayConfig(deployment="dep", token=b"t" * 32))
        gw.metrics.observers().stage("denoise", 0.5)
        gw.metrics.observers().transfer("denoise", 1024, 0.01)
        gw.metrics.request_seconds.labels("dep", "images").observe(1.0)
        gw.metrics.observers().error("worker_lost")
        names = {fam.name for fam in text_string_to_metric_families(gw.metrics.render().decode())}
        expected = {n.removesuffix("_total") for n in contract.METRICS}
        assert expected <= names, expected - names
        s = samples(gw)
        assert s[("diffdisagg_transfer_bytes_total", (("deployment", "dep"), ("role", "denoise")))] == 1024
        assert s[("diffdisagg_request_errors_total", (("deployment", "dep"), ("reason", "worker_lost")))] == 1
        for role in contract.STAGE_ROLES:
            assert depth(gw, role) == 0

    asyncio.run(main())


def test_queue_depth_counts_gateway_queue_upstream_and_worker_queue_for_the_right_role() -> None:
    async def main() -> None:
        gw = Gateway(GatewayConfig(deployment="dep", token=b"t" * 32))
        d = gw.dispatcher
        _register(gw, "p1", "prefill", capacity=4)
        _register(gw, "d1", "denoise", capacity=1)
        _register(gw, "c1", "decode", capacity=4)
        assert gauge(gw, contract.METRIC_FREE_SLOTS, "denoise") == 3

        # three requests: prefill takes them (queued in the worker, not started) -> prefill depth 3
        poll = asyncio.create_task(d.poll(Poll(worker_id="p1", wait_s=1)))
        await asyncio.sleep(0)
        ts = [d.submit({"prompt": "x", "seed": i}, 30) for i in range(3)]
        await poll
        assert depth(gw, "prefill") == 3 and depth(gw, "denoise") == 0
        for t in ts:
            d.event(StageEvent(request_id=t.id, attempt=1, worker_id="p1", role="prefill", event="started"))
        assert depth(gw, "prefill") == 0 and gauge(gw, contract.METRIC_INFLIGHT, "prefill") == 3

        # prefill finishes all three; denoise has room for one: 1 assigned to d1, 1 waits in the gateway
        # queue (long-poll), 1 held upstream after its long-poll ran out -> denoise depth 3, prefill 0
        g = await d.hop(HopRequest(request_id=ts[0].id, attempt=1, worker_id="p1", from_role="prefill"))
        assert g.worker_id == "d1"
        try:
            await d.hop(
                HopRequest(request_id=ts[1].id, attempt=1, worker_id="p1", from_role="prefill", wait_s=0)
            )
        except NoReceiverYet:
            pass
        waiting = asyncio.create_task(
            d.hop(HopRequest(request_id=ts[2].id, attempt=1, worker_id="p1", from_role="prefill", wait_s=5))
        )
        await asyncio.sleep(0.01)
        assert depth(gw, "denoise") == 3 and depth(gw, "prefill") == 0
        places = {
            dict(k[1])["place"]: v
            for k, v in samples(gw).items()
            if k[0] == "diffdisagg_queue_waiting" and dict(k[1])["role"] == "denoise"
        }
        assert places == {"gateway": 1, "upstream": 1, "worker": 1}
        assert gauge(gw, contract.METRIC_INFLIGHT, "prefill") == 0

        # d1 starts its request: depth drops by one, in-flight rises
        d.event(StageEvent(request_id=ts[0].id, attempt=1, worker_id="d1", role="denoise", event="started"))
        assert depth(gw, "denoise") == 2 and gauge(gw, contract.METRIC_INFLIGHT, "denoise") == 1
        for t in ts:
            d.cancel(t.id)
        waiting.cancel()
        assert all(depth(gw, r) == 0 for r in contract.STAGE_ROLES)

    asyncio.run(main())
