"""Admission at the receiver: a worker whose scheduler is full answers an offer `busy` at once (no slot
taken), the sender moves to another receiver or keeps holding, and the gateway counts what is held
upstream in the next role's queue depth. Also: every stage reports its timings to the gateway.

Real gateway and role workers (tiny FLUX, tcp hand-over on 127.0.0.1) in this process
(`inproc_deployment.py`); two slow denoise workers with room for one request each. The gateway and a
worker disagree about room exactly when a request is cancelled while it computes: the gateway frees
its place at once, the worker is still busy until the compute ends (its result is then discarded).
That is the window this test uses: the gateway grants the busy worker, the worker's `admit` says no.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import pytest


def _load_inproc():
    name = "diffdisagg_inproc_deployment"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("inproc_deployment.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


inproc = _load_inproc()
DELAY_S = 2.5


@pytest.fixture
def deployment(tmp_path: Path):
    d = inproc.InProcessDeployment(
        tmp_path,
        [
            inproc.Spec("p1", "prefill"),
            inproc.Spec("dA", "denoise", capacity=1, stage_delay_s=DELAY_S),
            inproc.Spec("dB", "denoise", capacity=1, stage_delay_s=DELAY_S),
            inproc.Spec("c1", "decode"),
        ],
    ).start()
    yield d
    d.stop()


def _spy_on_gateway(d) -> list:
    """Record every stage event and result header the gateway accepts (then handle it as usual)."""
    seen: list = []
    disp = d.gateway.dispatcher

    def install() -> None:
        event, result = disp.event, disp.result

        def on_event(msg):
            seen.append(msg)
            return event(msg)

        def on_result(header, media):
            seen.append(header)
            return result(header, media)

        disp.event, disp.result = on_event, on_result

    d.on_loop(install)
    return seen


def test_full_worker_answers_busy_at_once_and_the_request_is_held_upstream(deployment) -> None:
    d = deployment
    wait = inproc.wait_for
    seen = _spy_on_gateway(d)
    denoise = {wid: d.runtimes[wid] for wid in ("dA", "dB")}

    # 1. A request computes at one denoise worker (X); its client goes away: the gateway frees X's place
    #    at once, but X computes until the batch ends (the result is discarded).
    client = d.open_request("cancelled while it computes", seed=1)
    x = wait(lambda: next((w for w, rt in denoise.items() if rt.scheduler.inflight == 1), None), what="X")
    (y,) = set(denoise) - {x}
    client.close()
    wait(lambda: d.runtimes[x].cancelled, timeout=DELAY_S, what="cancel reached X")
    (cancelled_rid,) = d.runtimes[x].cancelled
    assert d.queue_state("denoise")[0] == 0 and d.runtimes[x].scheduler.inflight == 1
    assert d.runtimes[x].admit(None) is False  # X: no room while it computes

    # 2. Two more requests while X still computes: the gateway grants X (free in its books), X says busy.
    samples: list[tuple[int, dict[str, int], int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            depth, places = d.queue_state("denoise")
            samples.append((depth, places, len(d.runtimes["p1"].held)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    reqs = [d.generate_async("after the cancel", seed=2), d.generate_async("and one more", seed=3)]
    try:
        for r in reqs:
            r["thread"].join(inproc.WAIT_S)
    finally:
        stop.set()
        sampler.join(5)
    assert [r["status"] for r in reqs] == [200, 200], [r.get("body") for r in reqs]

    rx = d.runtimes[x].handoff.receiver
    assert rx.counters["busy_not_admitted"] >= 1, dict(rx.counters)
    assert rx.counters["busy"] == rx.counters["busy_not_admitted"]  # refused by admission, not a full buffer
    handed = [m for m in seen if getattr(m, "event", None) == "handed"]
    # The cancelled request's result was discarded at X: never handed on to decode.
    assert not [m for m in handed if m.request_id == cancelled_rid and m.worker_id == x]
    from_prefill = [m for m in handed if m.worker_id == "p1" and m.request_id != cancelled_rid]
    assert len(from_prefill) == 2
    # The sender moved on: a hand-over refused by X was taken by Y on the next try.
    moved = [m for m in from_prefill if m.timing.handover_attempts >= 2 and m.timing.to_worker == y]
    assert moved, [m.timing for m in from_prefill]
    assert moved[0].timing.handover_wait_seconds > 0

    # 3. Queue depth (DESIGN.md): the request held by prefill after the busy counted for denoise, in the
    #    gateway's queue or as held upstream; the breakdown always adds up to the depth.
    assert all(depth == sum(places.values()) for depth, places, _ in samples)
    held = [(depth, places) for depth, places, p_held in samples if places["gateway"] + places["upstream"]]
    assert held and all(depth >= 1 for depth, _ in held), samples[:50]
    assert any(p_held >= 1 for _, places, p_held in samples if places["upstream"] + places["gateway"])
    assert d.queue_state("denoise")[0] == 0
    assert all(rt.handoff.stats().get("live_slots", 0) == 0 for rt in d.runtimes.values())

    # 4. Per-stage timings: queue wait, compute, and the outgoing hand-over's bytes and seconds.
    rid = moved[0].request_id
    mine = [m for m in seen if m.request_id == rid]
    stages = {m.timing.role: m for m in mine if getattr(m, "timing", None) is not None}
    assert set(stages) == {"prefill", "denoise", "decode"}, mine
    for role in ("prefill", "denoise"):
        t = stages[role].timing
        assert t.queue_seconds is not None and t.queue_seconds >= 0
        assert t.compute_seconds > 0 and t.batch_size == 1
        assert t.handover_bytes > 0 and t.handover_seconds > 0 and t.handover_write_seconds >= 0
        assert t.handover_bytes == stages[role].transfer_bytes  # the older fields still carry it
    assert stages["denoise"].timing.compute_seconds >= DELAY_S  # the slow pool's batches
    assert stages["denoise"].timing.to_worker == "c1"
    t = stages["decode"].timing
    assert t.compute_seconds > 0 and t.queue_seconds >= 0 and t.handover_bytes is None
