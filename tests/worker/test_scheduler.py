"""The in-worker scheduler loop (issue 5, item 3) on a real denoise adapter and the real transfer manager.

The CPU platform's copies complete at once, so the overlap itself is not timed here; what is
checked is the order of operations (the next request's load is issued before the current compute
ends), the bits (interleaved == one after the other), and that every slot is released on every path.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch

from diffdisagg.transport.buffer import StagingBuffer
from diffdisagg.transport.errors import DeadlineExceededError
from diffdisagg.transport.manager import TransferManager
from diffdisagg.transport.platforms import CpuPlatform
from diffdisagg.worker.pipelines import StageError, StageInput, load_role
from diffdisagg.worker.pipelines.tiny import tiny_model_dir
from diffdisagg.worker.scheduler import (
    Completion,
    QueueFullError,
    ReceivedRequest,
    RequestCancelledError,
    SchedulerConfig,
    StageScheduler,
)

_spec = importlib.util.spec_from_file_location("pipe_support", Path(__file__).with_name("pipe_support.py"))
support = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(support)

WAIT_S = 60.0


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(support.THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def flux_roles(tmp_path_factory: pytest.TempPathFactory):
    path = tiny_model_dir("flux", tmp_path_factory.mktemp("tiny"))
    return load_role("flux", "prefill", path), load_role("flux", "denoise", path)


def _embeddings(prefill, seeds_prompts):
    """Prefill outputs for (seed, prompt) pairs, one request each."""
    items = [
        StageInput(f"req-{i}", {"params": support.tiny_params("flux", seed=s, prompt=p).to_dict()})
        for i, (s, p) in enumerate(seeds_prompts)
    ]
    return [prefill.run_batch([it])[0] for it in items]


class Collector:
    def __init__(self) -> None:
        self.done: dict[str, Completion] = {}
        self.trace: list[tuple[str, str]] = []
        self._cond = threading.Condition()

    def __call__(self, c: Completion) -> None:
        with self._cond:
            self.done[c.request_id] = c
            self._cond.notify_all()

    def tracer(self, what: str, rid: str) -> None:
        self.trace.append((what, rid))

    def wait_for(self, n: int, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.done) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(self.done)}/{n} completions after {timeout} s"
                self._cond.wait(left)


def _stage(manager: TransferManager, buffer: StagingBuffer, out, deadline=None) -> ReceivedRequest:
    """What the hand-over receiver produces: the tensors in a slot of our buffer + the manifest."""
    from diffdisagg.transport.codec import total_nbytes

    handle = buffer.allocate(total_nbytes(out.tensors))
    manifest = manager.stage(handle, out.tensors, out.scalars)
    return ReceivedRequest(out.request_id, out.scalars, handle, manifest, deadline)


def _transport():
    platform = CpuPlatform()
    buffer = StagingBuffer(1 << 20, platform)
    return buffer, TransferManager(platform, buffer)


def test_interleaved_requests_equal_sequential_bits(flux_roles) -> None:
    prefill, denoise = flux_roles
    outs = _embeddings(prefill, [(11, support.PROMPTS[0]), (12, support.PROMPTS[1])])
    # One after the other, no scheduler: the reference.
    sequential = {
        o.request_id: denoise.run_batch([StageInput(o.request_id, o.scalars, o.tensors)])[0] for o in outs
    }
    buffer, manager = _transport()
    got = Collector()
    sched = StageScheduler(
        denoise, manager, got, SchedulerConfig(queue_capacity=4, prefetch=1), tracer=got.tracer
    )
    for o in outs:  # both queued before the loop starts: the second one's load must overlap the first
        sched.submit(_stage(manager, buffer, o))
    sched.start()
    try:
        got.wait_for(2)
    finally:
        sched.stop()
    for rid, ref in sequential.items():
        c = got.done[rid]
        assert c.error is None, c.error
        assert torch.equal(c.output.tensors["latents"], ref.tensors["latents"]), rid
    a, b = (o.request_id for o in outs)
    assert not torch.equal(got.done[a].output.tensors["latents"], got.done[b].output.tensors["latents"])
    order = got.trace
    # Prefetch: B's load went out before A's compute finished; A's compute waited for A's load.
    assert order.index(("load_issued", b)) < order.index(("compute_end", a))
    assert order.index(("load_issued", a)) < order.index(("compute_start", a))
    # Every slot freed, each after its load was issued.
    assert buffer.allocator.live_slots == 0
    for rid in (a, b):
        assert order.index(("load_issued", rid)) < order.index(("released", rid))


def test_per_request_noise_scheduler_state_does_not_leak(flux_roles) -> None:
    prefill, denoise = flux_roles
    (out,) = _embeddings(prefill, [(5, support.PROMPTS[2])])
    template = denoise.pipe.scheduler
    before = dict(template.__dict__)
    first = denoise.run_batch([StageInput("x", out.scalars, out.tensors)])[0]
    # The template scheduler was never stepped: each call works on its own deep copy.
    assert template.__dict__.keys() == before.keys()
    assert getattr(template, "_step_index", None) is None
    second = denoise.run_batch([StageInput("x", out.scalars, out.tensors)])[0]
    assert torch.equal(first.tensors["latents"], second.tensors["latents"])


def test_bad_inputs_fail_typed_and_free_their_slots(flux_roles) -> None:
    prefill, denoise = flux_roles
    (out,) = _embeddings(prefill, [(3, support.PROMPTS[0])])
    buffer, manager = _transport()
    got = Collector()
    sched = StageScheduler(denoise, manager, got, SchedulerConfig(queue_capacity=2))

    # Missing tensor: rejected at submit (meta check, no copy), slot freed at once.
    missing = type(out)(
        out.request_id + "-missing", out.scalars, {"prompt_embeds": out.tensors["prompt_embeds"]}
    )
    sched.submit(_stage(manager, buffer, missing))
    # Params tampered on the way: a typed error naming the field.
    bad_params = dict(out.scalars["params"], height=65)
    tampered = type(out)("tampered", {"params": bad_params}, out.tensors)
    sched.submit(_stage(manager, buffer, tampered))
    # Deadline already passed: fails in the loop without compute.
    sched.submit(
        _stage(manager, buffer, type(out)("late", out.scalars, out.tensors), deadline=time.time() - 1)
    )
    good = _stage(manager, buffer, type(out)("good", out.scalars, out.tensors))
    sched.submit(good)
    with pytest.raises(QueueFullError):
        sched.submit(ReceivedRequest("overflow", out.scalars, good.handle, good.manifest))
    sched.run_pending(timeout=WAIT_S)

    assert isinstance(got.done[missing.request_id].error, StageError)
    assert "prompt_embeds" in str(got.done[missing.request_id].error) or "pooled" in str(
        got.done[missing.request_id].error
    )
    assert isinstance(got.done["tampered"].error, StageError)
    assert "height" in str(got.done["tampered"].error)
    assert isinstance(got.done["late"].error, DeadlineExceededError)
    assert got.done["good"].error is None and got.done["good"].output.tensors["latents"].shape == (1, 16, 64)
    assert "overflow" not in got.done
    assert buffer.allocator.live_slots == 0
    assert sched.inflight == 0 and sched.queue_depth == 0


def test_stop_fails_queued_requests_and_frees_slots(flux_roles) -> None:
    prefill, denoise = flux_roles
    (out,) = _embeddings(prefill, [(4, support.PROMPTS[1])])
    buffer, manager = _transport()
    got = Collector()
    sched = StageScheduler(denoise, manager, got, SchedulerConfig(queue_capacity=4))
    for i in range(3):
        sched.submit(_stage(manager, buffer, type(out)(f"q{i}", out.scalars, out.tensors)))
    sched.stop(timeout=WAIT_S)  # never started: everything queued fails, nothing leaks
    assert sorted(got.done) == ["q0", "q1", "q2"]
    assert all(c.error is not None and "shutting down" in str(c.error) for c in got.done.values())
    assert buffer.allocator.live_slots == 0


def test_release_hook_gets_the_completed_ticket(flux_roles) -> None:
    # How a worker whose slots belong to a HandoverReceiver frees them: through the receiver.
    prefill, denoise = flux_roles
    (out,) = _embeddings(prefill, [(6, support.PROMPTS[0])])
    buffer, manager = _transport()
    calls = []

    def release(ticket):
        calls.append((ticket is not None and ticket.done(), ticket.handle if ticket else None))
        manager.release(req.handle, ticket)

    staged = _stage(manager, buffer, out)
    req = ReceivedRequest(staged.request_id, staged.scalars, staged.handle, staged.manifest, release=release)
    got = Collector()
    sched = StageScheduler(denoise, manager, got)
    sched.submit(req)
    sched.run_pending(timeout=WAIT_S)
    assert got.done[req.request_id].error is None
    assert calls == [(True, req.handle)]
    assert buffer.allocator.live_slots == 0


def test_concurrent_denoise_calls_keep_their_own_step_state(flux_roles) -> None:
    # Two requests denoised at the same time on one adapter (threads interleave their steps on the
    # shared transformer) give the bits each gives alone: no step state is shared between calls.
    prefill, denoise = flux_roles
    outs = _embeddings(prefill, [(41, support.PROMPTS[0]), (42, support.PROMPTS[1])])
    inputs = [StageInput(o.request_id, o.scalars, o.tensors) for o in outs]
    alone = [denoise.run_batch([i])[0].tensors["latents"] for i in inputs]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2, timeout=WAIT_S)

    def work(k: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                results[k] = denoise.run_batch([inputs[k]])[0].tensors["latents"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not errors and all(not t.is_alive() for t in threads), errors
    for k in range(2):
        assert torch.equal(results[k], alone[k])


class Gate:
    """The real adapter behind a gate: `run_batch` blocks until the test opens it (bounded), so a
    request can be caught while it computes. Records which requests reached the adapter."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.open = threading.Event()
        self.entered = threading.Event()
        self.computed: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run_batch(self, items):
        self.computed += [i.request_id for i in items]
        self.entered.set()
        assert self.open.wait(WAIT_S), "gate never opened"
        return self.inner.run_batch(items)


def _hooked(manager: TransferManager, buffer: StagingBuffer, out, rid: str, calls: list):
    """A staged request whose slot is freed through a release hook (as a receiver's slots are)."""
    staged = _stage(manager, buffer, type(out)(rid, out.scalars, out.tensors))

    def release(ticket, handle=staged.handle):
        calls.append((rid, ticket is not None))
        manager.release(handle, ticket)

    return ReceivedRequest(rid, staged.scalars, staged.handle, staged.manifest, release=release)


def test_cancel_queued_requests_drops_them_and_frees_their_slots(flux_roles) -> None:
    prefill, denoise = flux_roles
    (out,) = _embeddings(prefill, [(21, support.PROMPTS[0])])
    buffer, manager = _transport()
    got, gate, calls = Collector(), Gate(denoise), []
    sched = StageScheduler(
        gate, manager, got, SchedulerConfig(queue_capacity=4, prefetch=1), tracer=got.tracer
    )
    for rid in ("a", "b", "c"):
        sched.submit(_hooked(manager, buffer, out, rid, calls))
    sched.start()
    try:
        assert gate.entered.wait(WAIT_S)  # a computes; b's load was prefetched, c's was not
        assert ("load_issued", "b") in got.trace and ("load_issued", "c") not in got.trace
        assert sched.cancel("c") == "queued"
        # Never loaded: its slot went back through its hook at once, and it completed at once.
        assert ("c", False) in calls
        assert isinstance(got.done["c"].error, RequestCancelledError) and got.done["c"].output is None
        assert sched.cancel("b") == "queued"  # its prefetched load is freed by the loop once complete
        assert sched.queue_depth == 0 and sched.has_capacity()
        gate.open.set()
        got.wait_for(3)
        deadline = time.monotonic() + WAIT_S
        while buffer.allocator.live_slots and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gate.open.set()
        sched.stop()
    assert got.done["a"].error is None and got.done["a"].output is not None
    assert isinstance(got.done["b"].error, RequestCancelledError)
    assert gate.computed == ["a"], gate.computed  # b and c never reached the model
    assert sorted(r for r, _ in calls) == ["a", "b", "c"]  # every slot freed exactly once
    assert ("b", True) in calls  # b's slot waited for its (issued) load
    assert buffer.allocator.live_slots == 0
    assert sched.inflight == 0 and sched.cancel("a") is None and sched.cancel("nope") is None


def test_cancel_running_request_discards_its_result(flux_roles) -> None:
    prefill, denoise = flux_roles
    (out,) = _embeddings(prefill, [(22, support.PROMPTS[1])])
    buffer, manager = _transport()
    got, gate, calls = Collector(), Gate(denoise), []
    sched = StageScheduler(gate, manager, got, SchedulerConfig(queue_capacity=2), tracer=got.tracer)
    sched.submit(_hooked(manager, buffer, out, "run", calls))
    sched.submit(_hooked(manager, buffer, out, "next", calls))
    sched.start()
    try:
        assert gate.entered.wait(WAIT_S)
        assert sched.cancel("run") == "running"
        assert "run" not in got.done  # it completes when its batch ends, not before
        gate.open.set()
        got.wait_for(2)
    finally:
        gate.open.set()
        sched.stop()
    done = got.done["run"]
    assert isinstance(done.error, RequestCancelledError) and done.output is None
    assert done.compute_s > 0  # it did run: the result was computed and thrown away
    assert got.done["next"].error is None and got.done["next"].output is not None  # neighbour unharmed
    assert gate.computed == ["run", "next"]
    assert buffer.allocator.live_slots == 0 and sorted(r for r, _ in calls) == ["next", "run"]
