"""Batching in prefill, denoise and decode (issue 5, item 4).

Batched results equal unbatched ones within ``ATOL`` rather than bitwise: on CPU, oneDNN/MKL pick
GEMM and convolution kernels by the batch (M) dimension, so a batch of 3 sums the same products in
another order. Measured on this machine (fp32, tiny models): prefill of FLUX and Wan bitwise equal,
SD3's pooled CLIP projection up to 5e-7; denoise up to 4e-6 after 4 steps; decoded pixels up to
4e-6 (pixels are in [0, 1], so 1e-4 is 40x that and still far below one 8-bit level, 3.9e-3).
Batching is therefore off by default (``SchedulerConfig.max_batch_size=1``): a deployment that
wants bit-exact split == monolithic keeps it off; turning it on trades those ulps for throughput.
"""

from __future__ import annotations

import importlib.util
import io
import threading
import time
from pathlib import Path

import pytest
import torch

from diffdisagg.worker.pipelines import StageInput, load_role
from diffdisagg.worker.pipelines.tiny import tiny_model_dir
from diffdisagg.worker.scheduler import Completion, ReceivedRequest, SchedulerConfig, StageScheduler

_spec = importlib.util.spec_from_file_location("pipe_support", Path(__file__).with_name("pipe_support.py"))
support = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(support)

ATOL = 1e-4
FAMILIES = ("flux", "sd3", "wan")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(support.THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        f: {r: load_role(f, r, tiny_model_dir(f, root)) for r in ("prefill", "denoise", "decode")}
        for f in FAMILIES
    }


def _requests(family: str, n: int = 3) -> list[StageInput]:
    return [
        StageInput(
            f"{family}-{i}",
            {"params": support.tiny_params(family, seed=20 + i, prompt=support.PROMPTS[i],
                                           negative="blurry" if i else None).to_dict()},
        )
        for i in range(n)
    ]  # fmt: skip


def _assert_close(batched: dict, single: dict, what: str) -> None:
    assert batched.keys() == single.keys(), what
    for k in single:
        assert batched[k].shape == single[k].shape, (what, k)
        torch.testing.assert_close(batched[k], single[k], rtol=0, atol=ATOL, msg=f"{what}/{k}")


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_stages_equal_unbatched(roles, family: str) -> None:
    pre, den, dec = (roles[family][r] for r in ("prefill", "denoise", "decode"))
    items = _requests(family)
    assert len({pre.batch_key(i) for i in items}) == 1

    single_pre = [pre.run_batch([i])[0] for i in items]
    batch_pre = pre.run_batch(items)
    for s, b in zip(single_pre, batch_pre, strict=True):
        assert b.request_id == s.request_id
        _assert_close(b.tensors, s.tensors, f"{family} prefill {s.request_id}")

    den_in = [StageInput(o.request_id, o.scalars, o.tensors) for o in single_pre]
    assert len({den.batch_key(i) for i in den_in}) == 1
    single_den = [den.run_batch([i])[0] for i in den_in]
    batch_den = den.run_batch(den_in)
    for s, b in zip(single_den, batch_den, strict=True):
        _assert_close(b.tensors, s.tensors, f"{family} denoise {s.request_id}")
    # Each request kept its own noise (its own seed): the batch did not share one generator.
    lat = [o.tensors["latents"] for o in batch_den]
    assert not torch.allclose(lat[0], lat[1], atol=1e-2)

    dec_in = [StageInput(o.request_id, o.scalars, o.tensors) for o in single_den]
    single_px = torch.cat([dec.pixels([i]) for i in dec_in])
    batch_px = dec.pixels(dec_in)
    torch.testing.assert_close(batch_px, single_px, rtol=0, atol=ATOL)
    outs = dec.run_batch(dec_in)
    assert [o.request_id for o in outs] == [i.request_id for i in dec_in]
    assert len({o.media for o in outs}) == len(outs)  # three different media
    if family != "wan":
        from PIL import Image

        assert Image.open(io.BytesIO(outs[0].media)).size == (64, 64)
    else:
        assert outs[0].media_type == "video/mp4" and outs[0].media[4:8] == b"ftyp"


def test_different_shapes_never_share_a_batch(roles) -> None:
    den = roles["sd3"]["denoise"]
    pre = roles["sd3"]["prefill"]
    a, b = _requests("sd3", 2)
    b.scalars["params"] = dict(b.scalars["params"], height=96)
    keys = {pre.batch_key(a), pre.batch_key(b)}
    assert len(keys) == 1  # prefill does not care about the image size ...
    outs = pre.run_batch([a, b])
    den_keys = {den.batch_key(StageInput(o.request_id, o.scalars, o.tensors)) for o in outs}
    assert len(den_keys) == 2  # ... denoise does


class _Collector:
    def __init__(self) -> None:
        self.done: dict[str, Completion] = {}
        self.cond = threading.Condition()

    def __call__(self, c: Completion) -> None:
        with self.cond:
            self.done[c.request_id] = c
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.done) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self.done)}/{n} done after {timeout} s"
                self.cond.wait(left)


def test_scheduler_batches_same_key_within_bounded_wait(roles) -> None:
    pre = roles["wan"]["prefill"]
    items = _requests("wan", 3)
    odd = StageInput("wan-odd", {"params": dict(items[0].scalars["params"], max_sequence_length=32)})
    got = _Collector()
    max_wait = 0.3
    sched = StageScheduler(pre, None, got, SchedulerConfig(max_batch_size=4, max_wait_s=max_wait))
    sched.start()
    try:
        t0 = time.monotonic()
        for it in [items[0], odd, items[1], items[2]]:
            sched.submit(ReceivedRequest(it.request_id, it.scalars))
        got.wait_for(4)
        elapsed = time.monotonic() - t0
    finally:
        sched.stop()
    for it in items:
        c = got.done[it.request_id]
        assert c.error is None and c.batch_size == 3, (it.request_id, c.batch_size, c.error)
        single = pre.run_batch([it])[0]
        _assert_close(c.output.tensors, single.tensors, it.request_id)
    lone = got.done["wan-odd"]
    assert lone.error is None and lone.batch_size == 1
    assert lone.output.tensors["prompt_embeds"].shape == (1, 32, 32)
    # The batch of 3 never filled to 4: the head waited max_wait_s, not longer (generous upper bound
    # for a loaded CI machine; the lower bound is exact).
    assert got.done[items[0].request_id].queued_s >= max_wait * 0.95
    assert elapsed < max_wait + 20.0
