"""Bit-exactness of the role split on CUDA (GPU tier; see conftest.py).

The three role adapters of each family, loaded on the GPU from the tiny model directory, with every
boundary crossing going through the real staging path (``TransferManager.stage`` into a pinned slot,
``load`` back to the device on the transfer stream), must produce the same pixels, byte for byte, as
the plain monolithic diffusers call on the same GPU. Real-size random-weight runs of the same check
(separate processes, tcp hand-over) are part of ``bench/gpu/bench_e2e_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from diffdisagg.transport.buffer import StagingBuffer
from diffdisagg.transport.codec import plan
from diffdisagg.transport.manager import TransferManager
from diffdisagg.transport.platforms import CudaPlatform, current_platform, reset_current_platform
from diffdisagg.worker.pipelines import GenerationParams, load_pipeline, load_role, validate_params
from diffdisagg.worker.pipelines.loading import monolithic_call
from diffdisagg.worker.pipelines.stages import StageInput

CASES = [
    ("flux", torch.float32, {"height": 128, "width": 128, "num_inference_steps": 4}),
    ("flux", torch.bfloat16, {"height": 128, "width": 128, "num_inference_steps": 4}),
    (
        "sd3",
        torch.float32,
        {"height": 128, "width": 128, "num_inference_steps": 4, "negative_prompt": "dull"},
    ),
    (
        "wan",
        torch.float32,
        {"height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 4, "negative_prompt": "dull"},
    ),
]


@pytest.fixture(scope="module")
def cuda() -> CudaPlatform:
    reset_current_platform()
    platform = current_platform()
    assert isinstance(platform, CudaPlatform), f"needs a CUDA device, detected {platform!r}"
    platform.set_device(0)
    return platform


def _hand_over(mgr: TransferManager, tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    buf = mgr.buffer
    handle = buf.allocate(plan(tensors).total_nbytes)
    manifest = mgr.stage(handle, tensors, timeout=30)
    out, ticket = mgr.load_async(handle, manifest, device)
    ticket.wait_on()
    ticket.wait(timeout=30)
    mgr.release(handle, ticket)
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


@pytest.mark.parametrize(("family", "dtype", "overrides"), CASES, ids=lambda v: str(v))
def test_split_equals_monolithic_on_cuda(cuda, family, dtype, overrides):
    device = cuda.device(0)
    params = validate_params(family, GenerationParams(prompt="a red fox in the snow", seed=7, **overrides))
    mono = load_pipeline(family, None, device, dtype)
    reference = monolithic_call(mono, family, params, output_type="pt")
    del mono

    roles = {r: load_role(family, r, None, device, dtype) for r in ("prefill", "denoise", "decode")}
    buffer = StagingBuffer(64 << 20, cuda)
    mgr = TransferManager(cuda, buffer, local_rank=0)
    try:
        scalars = {"params": params.to_dict()}
        embeds = roles["prefill"].run_batch([StageInput("r", scalars)])[0].tensors
        embeds = _hand_over(mgr, embeds, device)
        assert all(t.device.type == "cuda" for t in embeds.values())
        latents = roles["denoise"].run_batch([StageInput("r", scalars, embeds)])[0].tensors
        latents = _hand_over(mgr, latents, device)
        pixels = roles["decode"].pixels([StageInput("r", scalars, latents)])
    finally:
        buffer.close(force=True)
    assert pixels.shape == reference.shape and pixels.dtype == reference.dtype
    assert pixels.device.type == "cuda"
    assert torch.equal(_bytes(pixels), _bytes(reference)), (
        f"{family} {dtype}: split differs from monolithic, max |d| "
        f"{(pixels.float() - reference.float()).abs().max().item()}"
    )
