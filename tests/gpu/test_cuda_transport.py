"""CUDA checks of the platform layer, staging buffer and transfer manager (GPU tier; see conftest.py).

Each ordering test makes the ordering observable: `torch.cuda._sleep` parks a stream for a while, so
that a missing `wait_stream` / `wait_event` / `record_stream` would read or write the wrong bytes
(or a release would go through) instead of passing by luck. Checked by mutation on an H200: removing
the stage's `wait_stream`, the `record_stream` or `LoadTicket.wait_on`'s `wait_event` each fails a test.
"""

from __future__ import annotations

import pytest
import torch

from diffdisagg.transport.buffer import StagingBuffer
from diffdisagg.transport.codec import plan
from diffdisagg.transport.errors import TransferInProgressError
from diffdisagg.transport.manager import TransferManager, wait_event
from diffdisagg.transport.platforms import CudaPlatform, current_platform, reset_current_platform

MIB = 1 << 20
SLEEP_CYCLES = 400_000_000  # ~0.2 s at ~2 GHz


@pytest.fixture(scope="module")
def cuda() -> CudaPlatform:
    reset_current_platform()
    platform = current_platform()
    assert isinstance(platform, CudaPlatform), f"needs a CUDA device, detected {platform!r}"
    platform.set_device(0)
    return platform


def _park(platform: CudaPlatform, stream) -> None:
    with platform.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _payload(device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(4, 4096, 4096, dtype=torch.bfloat16, device=device, generator=g),
        "latents": torch.randn(16, 16, 128, 128, device=device, generator=g),
        "ids": torch.randint(-(2**62), 2**62, (4 * MIB,), device=device, generator=g),
        "mask": torch.randint(0, 2, (3 * MIB + 7,), device=device, generator=g).bool(),
        # Arbitrary bf16 bit patterns (NaN payloads, -0.0, denormals) must survive untouched.
        "bits": torch.randint(0, 256, (32 * MIB,), dtype=torch.uint8, device=device, generator=g).view(
            torch.bfloat16
        ),
        "scalar": torch.tensor(0.5, device=device),
    }


def test_platform_basics(cuda):
    assert cuda.device(0) == torch.device("cuda", 0) == cuda.current_device()
    assert (cuda.collective_backend, cuda.visible_devices_env) == ("nccl", "CUDA_VISIBLE_DEVICES")
    info = cuda.memory_info(0)
    assert 0 < info.free <= info.total
    side = cuda.Stream(0)
    default = cuda.current_stream()
    with cuda.stream(side):
        assert cuda.current_stream().stream_id == side.stream_id != default.stream_id
    assert cuda.current_stream().stream_id == default.stream_id
    start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
    start.record(side)
    _park(cuda, side)
    end.record(side)
    assert not end.query()
    end.synchronize()
    assert end.query() and start.elapsed_time(end) > 1.0
    pinned = cuda.empty_host(MIB)
    assert pinned.is_pinned() and pinned.device.type == "cpu"
    on_device = torch.arange(10, device="cuda")
    assert torch.equal(cuda.to_host(on_device), torch.arange(10))


def test_buffers_pinned_and_device(cuda):
    host = StagingBuffer(64 * MIB, cuda, alignment=2 * MIB)
    dev = StagingBuffer(64 * MIB, cuda, device_memory=True, local_rank=0)
    try:
        assert host.pinned and host.address % (2 * MIB) == 0 and host.device.type == "cpu"
        assert dev.device.type == "cuda" and dev.address % 512 == 0
    finally:
        host.close()
        dev.close()


def test_async_stage_load_release_overwrite(cuda):
    device = cuda.device(0)
    tensors = _payload(device, seed=1)
    expected = {k: v.clone() for k, v in tensors.items()}
    # The last tensor is produced late on the compute stream: staging must wait for it.
    late = torch.empty_like(expected["latents"])
    _park(cuda, cuda.current_stream())
    late.copy_(expected["latents"])
    tensors["late"], expected["late"] = late, expected["latents"]

    size = plan(tensors).total_nbytes
    buffer = StagingBuffer(size + 64 * MIB, cuda)
    mgr = TransferManager(cuda, buffer, local_rank=0)
    try:
        handle = buffer.allocate(size)
        manifest, staged = mgr.stage_async(handle, tensors, {"seed": 1})
        assert not staged.query()  # still behind the parked compute stream
        with pytest.raises(TransferInProgressError):
            mgr.release(handle)
        wait_event(staged, timeout=30)
        slot = buffer.tensor(handle)
        for spec in manifest.tensors:
            assert torch.equal(slot[spec.offset : spec.end], _u8(expected[spec.name]).cpu()), spec.name

        # Launch the comparison kernels once before parking: CUDA's lazy module loading may
        # synchronise the whole context at a kernel's first launch, which would hide a missing wait.
        warm = torch.stack([(_u8(v) == _u8(v)).all() for v in expected.values()])
        assert bool(warm.all().item()) and torch.equal(_u8(late), _u8(late))
        # Park the transfer stream so the load is certainly still running when we look.
        _park(cuda, mgr.stream)
        out, ticket = mgr.load_async(handle, manifest, device)
        assert not ticket.done()
        with pytest.raises(TransferInProgressError):
            mgr.release(handle, ticket)
        ticket.wait_on()  # compute waits on the load's event; the host does not block
        same = {k: torch.equal(_u8(out[k]), _u8(expected[k])) for k in ("prompt_embeds", "late")}
        checks = torch.stack([(_u8(out[k]) == _u8(expected[k])).all() for k in expected])
        ticket.wait(timeout=30)
        mgr.release(handle, ticket)

        # Slot released: scribble over the whole staging region and stage another request there.
        buffer.region().fill_(0xAB)
        again = buffer.allocate(size)
        assert again.offset == handle.offset
        mgr.stage(again, {k: torch.zeros_like(v) for k, v in tensors.items()}, timeout=30)
        mgr.release(again)

        assert all(same.values()) and bool(checks.all().item())
        for name, value in expected.items():
            assert out[name].dtype == value.dtype and out[name].shape == value.shape
            assert torch.equal(_u8(out[name]), _u8(value)), name
    finally:
        buffer.close(force=True)


def test_source_memory_is_not_reused_while_staging(cuda):
    device = cuda.device(0)
    n = 128 * MIB
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    expected = src.cpu()
    buffer = StagingBuffer(n, cuda)
    mgr = TransferManager(cuda, buffer, local_rank=0)
    try:
        handle = buffer.allocate(n)
        _park(cuda, mgr.stream)
        _, event = mgr.stage_async(handle, {"x": src})
        ptr = src.data_ptr()
        del src
        # Without record_stream the caching allocator would hand the same block out right away and
        # this fill would race the pending copy.
        junk = torch.full((n,), 0xFF, dtype=torch.uint8, device=device)
        assert junk.data_ptr() != ptr
        wait_event(event, timeout=30)
        assert torch.equal(buffer.tensor(handle), expected)
        mgr.release(handle)
    finally:
        buffer.close(force=True)


def test_device_memory_staging_round_trip(cuda):
    device = cuda.device(0)
    tensors = _payload(device, seed=2)
    size = plan(tensors).total_nbytes
    buffer = StagingBuffer(size, cuda, device_memory=True, local_rank=0)
    mgr = TransferManager(cuda, buffer, local_rank=0)
    try:
        handle = buffer.allocate(size)
        manifest = mgr.stage(handle, tensors, timeout=30)
        out, ticket = mgr.load_async(handle, manifest, device)
        ticket.wait(timeout=30)
        mgr.release(handle, ticket)
        buffer.region().fill_(0)
        cuda.synchronize()
        for name, value in tensors.items():
            assert torch.equal(_u8(out[name]), _u8(value)), name
    finally:
        buffer.close(force=True)
