"""TransferManager on the CPU platform: stage/load round trips, slot reuse, release rules, stream order.

Copies on CPU finish before the call returns, so an event that is still pending cannot occur here.
The refusal and ordering tests therefore use `ScriptedPlatform`, a CPU platform whose streams log the
calls made on them and whose events stay pending until the test completes them: a small STAND-IN for
a device's asynchronous stream/event pair. The bytes are still really copied on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from diffdisagg.transport.buffer import StagingBuffer
from diffdisagg.transport.codec import Manifest, TensorSpec, plan
from diffdisagg.transport.errors import (
    CodecError,
    DoubleFreeError,
    InvalidSizeError,
    PlatformError,
    StaleHandleError,
    TransferInProgressError,
    TransferTimeoutError,
    TransportError,
)
from diffdisagg.transport.manager import LoadTicket, TransferManager
from diffdisagg.transport.platforms import CpuPlatform, HostEvent

KIB = 1024
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
          torch.uint8, torch.bool]  # fmt: skip


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(DTYPES):
        if dtype == torch.bool:
            out[f"t{i}"] = torch.randint(0, 2, (5, 3), generator=g).bool()
            continue
        size = torch.empty(0, dtype=dtype).element_size()
        raw = torch.randint(0, 256, (4 * 6 * size,), dtype=torch.uint8, generator=g)
        out[f"t{i}"] = raw.view(dtype).reshape(4, 6)  # arbitrary bits: NaN payloads, -0.0, denormals
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 2, dtype=torch.bfloat16)
    out["strided"] = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    return out


@pytest.fixture
def cpu():
    platform = CpuPlatform()
    buffer = StagingBuffer(256 * KIB, platform)
    yield platform, buffer, TransferManager(platform, buffer)
    buffer.close(force=True)


def test_stage_load_round_trip_is_bit_exact(cpu):
    _, buffer, mgr = cpu
    tensors = _tensors()
    handle = buffer.allocate(plan(tensors).total_nbytes)
    manifest = mgr.stage(handle, tensors, {"seed": 7, "prompt": "a cat"})
    # What crosses the wire is the manifest's bytes; the receiver decodes it against its slot.
    received = Manifest.from_bytes(manifest.to_bytes(), slot_nbytes=handle.nbytes)
    loaded = mgr.load(handle, received, "cpu")
    mgr.release(handle)
    assert received.scalars == {"seed": 7, "prompt": "a cat"}
    assert list(loaded) == list(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert _bits(loaded[name]) == _bits(t), name
    assert buffer.allocator.live_slots == 0
    assert mgr.staged_bytes == mgr.loaded_bytes == manifest.total_nbytes


def test_async_api_on_cpu(cpu):
    platform, buffer, mgr = cpu
    tensors = {"latents": torch.randn(2, 4, 8, 8), "ids": torch.arange(9)}
    handle = buffer.allocate(plan(tensors).total_nbytes)
    manifest, event = mgr.stage_async(handle, tensors)
    assert isinstance(event, HostEvent) and event.query()
    out, ticket = mgr.load_async(handle, manifest)
    assert isinstance(ticket, LoadTicket) and ticket.handle == handle
    assert ticket.nbytes == manifest.total_nbytes
    ticket.wait_on()  # compute stream waits on the event
    ticket.wait(timeout=1)
    assert ticket.done() and not mgr.pending(handle)
    mgr.release(handle, ticket)
    assert torch.equal(out["latents"], tensors["latents"]) and torch.equal(out["ids"], tensors["ids"])
    assert out["latents"].device == platform.current_device()


def test_loaded_tensors_survive_slot_reuse_and_overwrite(cpu):
    _, buffer, mgr = cpu
    first = {"x": torch.randn(64, 64), "y": torch.randint(0, 9, (100,))}
    expected = {k: v.clone() for k, v in first.items()}
    handle = buffer.allocate(plan(first).total_nbytes)
    manifest = mgr.stage(handle, first)
    loaded, ticket = mgr.load_async(handle, manifest)
    ticket.wait()
    mgr.release(handle, ticket)
    # Scribble over the whole region, then stage another request into the same bytes.
    buffer.region().fill_(0xAB)
    again = buffer.allocate(plan(first).total_nbytes)
    assert again.offset == handle.offset
    mgr.stage(again, {"x": torch.zeros(64, 64), "y": torch.zeros(100, dtype=torch.int64)})
    assert torch.equal(loaded["x"], expected["x"]) and torch.equal(loaded["y"], expected["y"])
    # The staged source is not aliased either.
    first["x"].fill_(1)
    assert torch.equal(loaded["x"], expected["x"])
    mgr.release(again)


def test_slot_too_small_and_stale_handles(cpu):
    _, buffer, mgr = cpu
    tensors = {"x": torch.zeros(1000)}
    small = buffer.allocate(1000)
    with pytest.raises(InvalidSizeError):
        mgr.stage(small, tensors)
    assert buffer.allocator.live_slots == 1
    mgr.release(small)
    with pytest.raises(StaleHandleError):
        mgr.stage(small, {"x": torch.zeros(1)})
    with pytest.raises(DoubleFreeError):
        mgr.release(small)
    with pytest.raises(CodecError):
        mgr.stage(buffer.allocate(KIB), {"x": [1, 2]})  # type: ignore[dict-item]


def test_load_validates_the_manifest_against_the_slot(cpu):
    _, buffer, mgr = cpu
    handle = buffer.allocate(KIB)
    outside = Manifest([TensorSpec("x", "float32", (300,), 0, 1200)], {})
    with pytest.raises(CodecError, match="outside the slot"):
        mgr.load(handle, outside)
    overlapping = Manifest([TensorSpec("a", "int32", (4,), 0, 16), TensorSpec("b", "int32", (4,), 8, 16)], {})
    with pytest.raises(CodecError, match="overlap"):
        mgr.load(handle, overlapping)
    mgr.release(handle)


# -------------------------------------------------------------------------- stand-in device streams


class ScriptedEvent:
    """Stand-in device event: pending until `complete()` (see module docstring)."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.completed = False

    def record(self, stream=None):
        self.log.append(("record", stream.name, self))

    def query(self):
        return self.completed

    def synchronize(self):
        raise AssertionError("host code must poll with a deadline, not block in synchronize()")

    def wait(self, stream=None):
        stream.wait_event(self)

    def complete(self):
        self.completed = True


class ScriptedStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event))

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def query(self):
        return True

    def synchronize(self):
        raise AssertionError("no stream-wide synchronize on the hot path")


class ScriptedPlatform(CpuPlatform):
    def __init__(self) -> None:
        super().__init__()
        self.log: list = []
        self.compute = ScriptedStream("compute", self.log)
        self.active = self.compute
        self.events: list[ScriptedEvent] = []

    def Stream(self, local_rank=None):
        return ScriptedStream("transfer", self.log)

    def Event(self, enable_timing=False):
        self.events.append(ScriptedEvent(self.log))
        return self.events[-1]

    def current_stream(self, local_rank=None):
        return self.active

    def stream(self, stream):
        platform = self

        class _Ctx:
            def __enter__(self):
                platform.log.append(("enter", stream.name))
                platform.previous, platform.active = platform.active, stream
                return stream

            def __exit__(self, *exc):
                platform.active = platform.previous
                platform.log.append(("exit", stream.name))

        return _Ctx()

    def synchronize(self, local_rank=None):
        raise AssertionError("no device-wide synchronize")


@pytest.fixture
def scripted():
    platform = ScriptedPlatform()
    buffer = StagingBuffer(64 * KIB, platform)
    yield platform, buffer, TransferManager(platform, buffer)
    buffer.close(force=True)


def test_copies_run_on_the_transfer_stream_in_order(scripted):
    platform, buffer, mgr = scripted
    tensors = {"x": torch.randn(16)}
    handle = buffer.allocate(KIB)
    manifest, stage_ev = mgr.stage_async(handle, tensors)
    # Transfer waits for compute (the producer), copies inside the transfer stream, records after.
    assert platform.log == [
        ("wait_stream", "transfer", "compute"),
        ("enter", "transfer"),
        ("record", "transfer", stage_ev),
        ("exit", "transfer"),
    ]
    stage_ev.complete()
    platform.log.clear()
    out, ticket = mgr.load_async(handle, manifest)
    ticket.wait_on()
    assert platform.log == [
        ("wait_stream", "transfer", "compute"),
        ("enter", "transfer"),
        ("record", "transfer", ticket.event),
        ("exit", "transfer"),
        ("wait_event", "compute", ticket.event),  # compute waits on the event, nothing global
    ]
    ticket.event.complete()
    mgr.release(handle, ticket)
    assert torch.equal(out["x"], tensors["x"])


def test_release_refuses_until_the_load_event_completed(scripted):
    _platform, buffer, mgr = scripted
    handle = buffer.allocate(KIB)
    manifest, stage_ev = mgr.stage_async(handle, {"x": torch.ones(8)})
    stage_ev.complete()
    out, ticket = mgr.load_async(handle, manifest)
    assert not ticket.done()
    with pytest.raises(TransferInProgressError):
        mgr.release(handle, ticket)
    with pytest.raises(TransferInProgressError):
        mgr.release(handle)  # without the ticket too: the manager tracks the slot's last copy
    assert buffer.allocator.is_live(handle) and mgr.pending(handle)
    with pytest.raises(TransferTimeoutError):
        ticket.wait(timeout=0.05)
    ticket.event.complete()
    ticket.wait(timeout=0.05)
    mgr.release(handle, ticket)
    assert not buffer.allocator.is_live(handle) and torch.equal(out["x"], torch.ones(8))


def test_release_refuses_while_a_stage_is_pending(scripted):
    _, buffer, mgr = scripted
    handle = buffer.allocate(KIB)
    _, event = mgr.stage_async(handle, {"x": torch.ones(8)})
    with pytest.raises(TransferInProgressError):
        mgr.release(handle)
    with pytest.raises(TransferTimeoutError):
        mgr.stage(buffer.allocate(KIB), {"y": torch.ones(2)}, timeout=0.05)
    event.complete()
    mgr.release(handle)


def test_ticket_must_match_the_handle(scripted):
    _platform, buffer, mgr = scripted
    a, b = buffer.allocate(KIB), buffer.allocate(KIB)
    manifest, ev = mgr.stage_async(a, {"x": torch.ones(4)})
    ev.complete()
    _, ticket = mgr.load_async(a, manifest)
    ticket.event.complete()
    with pytest.raises(TransportError, match="ticket is for slot"):
        mgr.release(b, ticket)
    mgr.release(a, ticket)
    mgr.release(b)
    # A freed slot's stale pending entry never blocks the next owner of that slot id.
    c = buffer.allocate(KIB)
    mgr.release(c)
    assert buffer.allocator.live_slots == 0
    with pytest.raises(PlatformError):
        StagingBuffer(KIB, CpuPlatform(), device_memory=True)
