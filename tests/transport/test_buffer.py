"""StagingBuffer on the CPU platform: aligned region, slot views, socket receive, close rules.

Two tests use `RecordingPlatform`, a CPU platform that CLAIMS pinning / device registration (no
accelerator exists here), to check that the buffer asks the platform layer for the right kind of
memory; the memory it then gets is ordinary host memory.
"""

from __future__ import annotations

import socket

import pytest
import torch

from diffdisagg.transport.allocator import ALIGNMENT_2MIB, SlotHandle
from diffdisagg.transport.buffer import StagingBuffer
from diffdisagg.transport.errors import (
    BufferClosedError,
    BufferFullError,
    BufferInUseError,
    DoubleFreeError,
    InvalidSizeError,
    PlatformError,
    StaleHandleError,
)
from diffdisagg.transport.platforms import CpuPlatform

KIB = 1024


class RecordingPlatform(CpuPlatform):
    """CPU platform that claims pinned host memory and device registration (stand-in, see docstring)."""

    pin_memory_supported = True
    device_registration_supported = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, int, object]] = []

    def empty_host(self, nbytes, *, pin=None):
        self.requests.append(("host", nbytes, pin))
        return torch.empty(nbytes, dtype=torch.uint8)

    def empty_device(self, nbytes, local_rank=None):
        self.requests.append(("device", nbytes, local_rank))
        return torch.empty(nbytes, dtype=torch.uint8)


@pytest.fixture
def buf():
    b = StagingBuffer(64 * KIB, CpuPlatform())
    yield b
    b.close(force=True)


def test_region_is_aligned_and_sized(buf):
    assert buf.nbytes == 64 * KIB and buf.address % 512 == 0
    assert buf.region().data_ptr() == buf.address and buf.region().numel() == buf.nbytes
    assert len(buf.region_view()) == buf.nbytes
    assert not buf.pinned and not buf.device_memory and buf.device.type == "cpu"
    odd = StagingBuffer(1000, CpuPlatform())
    assert odd.nbytes == 1024
    odd.close()


def test_two_mib_aligned_region():
    b = StagingBuffer(3 * ALIGNMENT_2MIB, CpuPlatform(), alignment=ALIGNMENT_2MIB)
    try:
        assert b.address % ALIGNMENT_2MIB == 0
        h = b.allocate(5)
        assert (b.address + h.offset) % ALIGNMENT_2MIB == 0
        b.free(h)
    finally:
        b.close()


@pytest.mark.parametrize(
    ("nbytes", "alignment"), [(0, 512), (-1, 512), (True, 512), (4096, 300), (4096, 256)]
)
def test_rejects_bad_geometry(nbytes, alignment):
    with pytest.raises(InvalidSizeError):
        StagingBuffer(nbytes, CpuPlatform(), alignment=alignment)


def test_memoryview_is_the_slot(buf):
    h1 = buf.allocate(1000)
    h2 = buf.allocate(300)
    view = buf.memoryview(h1)
    assert len(view) == 1000 and not view.readonly and view.format == "B"
    view[:] = bytes(range(256)) * 3 + bytes(232)
    view2 = buf.memoryview(h2)
    view2[:] = b"\xff" * 300
    # The tensor view sees the same bytes, and neighbouring slots are untouched.
    t1 = buf.tensor(h1)
    assert t1.dtype == torch.uint8 and t1.numel() == 1000
    assert t1.data_ptr() == buf.address + h1.offset
    assert t1[:256].tolist() == list(range(256)) and t1[768:].sum().item() == 0
    assert bool((buf.tensor(h2) == 255).all())
    # Writes through the tensor view show in the memoryview.
    t1[0] = 42
    assert view[0] == 42
    buf.free(h1)
    buf.free(h2)


def test_recv_into_a_slot_over_a_real_socket(buf):
    payload = torch.randint(0, 256, (20_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    h = buf.allocate(payload.numel())
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    try:
        a.sendall(payload.numpy().tobytes())
        view, got = buf.memoryview(h), 0
        while got < len(view):
            n = b.recv_into(view[got:])
            assert n > 0
            got += n
    finally:
        a.close()
        b.close()
    assert torch.equal(buf.tensor(h), payload)
    buf.free(h)


def test_stale_handles_refused(buf):
    h = buf.allocate(100)
    buf.free(h)
    for op in (buf.memoryview, buf.tensor, buf.validate):
        with pytest.raises(StaleHandleError):
            op(h)
    with pytest.raises(DoubleFreeError):
        buf.free(h)
    with pytest.raises(StaleHandleError):
        buf.tensor(SlotHandle(0, 0, 10**9, 1))


def test_full_buffer(buf):
    h = buf.allocate(60 * KIB)
    with pytest.raises(BufferFullError):
        buf.allocate(8 * KIB)
    buf.free(h)


def test_close_refuses_with_live_slots_unless_forced():
    b = StagingBuffer(8 * KIB, CpuPlatform())
    h = b.allocate(KIB)
    early_view = b.memoryview(h)
    early_view[:4] = b"abcd"
    with pytest.raises(BufferInUseError):
        b.close()
    assert not b.closed and b.allocator.live_slots == 1
    b.close(force=True)
    assert b.closed and b.allocator.live_slots == 0
    # A view taken before close still points at live memory (kept alive by the view), never freed memory.
    assert bytes(early_view[:4]) == b"abcd"
    for op in (lambda: b.allocate(1), lambda: b.memoryview(h), lambda: b.tensor(h), b.region):
        with pytest.raises(BufferClosedError):
            op()
    b.close()  # idempotent


def test_close_after_all_freed_and_context_manager():
    with StagingBuffer(8 * KIB, CpuPlatform()) as b:
        h = b.allocate(KIB)
        b.free(h)
        b.close()
        assert b.closed
    with StagingBuffer(8 * KIB, CpuPlatform()) as b2:
        b2.allocate(KIB)  # forced close on exit
    assert b2.closed


def test_device_memory_needs_registration_support():
    with pytest.raises(PlatformError, match="cannot register device memory"):
        StagingBuffer(8 * KIB, CpuPlatform(), device_memory=True)


def test_asks_the_platform_for_pinned_host_memory():
    p = RecordingPlatform()
    b = StagingBuffer(8 * KIB, p)
    assert p.requests == [("host", 8 * KIB + 512, True)]
    b.close()


def test_device_memory_buffer_has_no_host_view():
    p = RecordingPlatform()
    b = StagingBuffer(8 * KIB, p, device_memory=True, local_rank=0)
    try:
        assert p.requests == [("device", 8 * KIB + 512, 0)] and b.device_memory
        h = b.allocate(KIB)
        assert b.tensor(h).numel() == KIB
        with pytest.raises(PlatformError):
            b.memoryview(h)
        with pytest.raises(PlatformError):
            b.region_view()
        b.free(h)
    finally:
        b.close()
