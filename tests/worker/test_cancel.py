"""Cancel reaches a request queued inside a worker: it is dropped before compute and its slot freed.

Real gateway, real role workers (tiny FLUX, tcp hand-over on 127.0.0.1) in this process
(`inproc_deployment.py`). The denoise worker is made slow (`--stage-delay`, test-only) with room for
two, so a second request waits in its scheduler queue, in its staging slot, while the first computes.
The client of that second request disconnects; the gateway cancels it at the worker, whose scheduler
drops it from its queue at once — before the first finishes — and the model never sees it.
"""

from __future__ import annotations

import importlib.util
import sys
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


class Recorder:
    """Sits in front of the worker's adapter (a spy, the real adapter does the work): which requests
    reached the model."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seen: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run_batch(self, items):
        self.seen += [i.request_id for i in items]
        return self.inner.run_batch(items)


@pytest.fixture
def deployment(tmp_path: Path):
    d = inproc.InProcessDeployment(
        tmp_path,
        [
            inproc.Spec("p1", "prefill"),
            inproc.Spec("d1", "denoise", capacity=2, stage_delay_s=DELAY_S),
            inproc.Spec("c1", "decode"),
        ],
    ).start()
    yield d
    d.stop()


def test_cancel_drops_a_request_queued_in_the_worker_before_compute(deployment) -> None:
    d = deployment
    rt = d.runtimes["d1"]
    sched = rt.scheduler
    spy = Recorder(sched.adapter)
    sched.adapter = spy
    wait = inproc.wait_for

    first = d.generate_async("computes first", seed=1)
    wait(lambda: sched.inflight == 1, what="first request computing at denoise")
    client = d.open_request("cancelled while queued", seed=2)
    wait(lambda: sched.queue_depth == 1, what="second request queued at denoise")
    assert rt.handoff.stats()["live_slots"] == 1  # the queued request still sits in its staging slot
    (queued_key,) = [k for k, j in rt.jobs.items() if j.request is None and not spy.seen.count(k)]

    client.close()  # the client goes away: the gateway cancels the request at every worker holding it
    wait(lambda: sched.queue_depth == 0, timeout=DELAY_S, what="queued request dropped")
    wait(lambda: rt.handoff.stats()["live_slots"] == 0, timeout=1.0, what="its slot freed")
    assert sched.inflight == 1, "the first request must still be computing: the drop did not wait for it"

    first["thread"].join(inproc.WAIT_S)
    assert first["status"] == 200, first.get("body")
    assert queued_key not in spy.seen and len(spy.seen) == 1, spy.seen  # the model never saw it
    assert queued_key not in rt.jobs
    depth, places = d.queue_state("denoise")
    assert depth == 0 and sum(places.values()) == 0
    # The worker keeps serving: the next request goes through the same denoise worker.
    again = d.generate_async("after the cancel", seed=3)
    again["thread"].join(inproc.WAIT_S)
    assert again["status"] == 200 and len(spy.seen) == 2
    assert all(r.handoff.stats().get("live_slots", 0) == 0 for r in d.runtimes.values())
