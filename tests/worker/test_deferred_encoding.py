"""Decode's media encoding off the compute thread (`--encode-threads`): same bytes, posted end to end,
failures and cancels per request, and admission that counts requests still being encoded.

Real parts throughout: the tiny FLUX / Wan decode adapters, and the real gateway with real role workers
(tcp hand-over on 127.0.0.1) in this process (`inproc_deployment.py`). The only stand-ins are wrappers
in front of the decode adapter's real `encode` (a gate to hold encodes, a recorder of the thread that ran
it, or an encoder that raises), to put a request where a test needs it.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import io
import sys
import threading
from pathlib import Path
from typing import Any

import pytest


def _load(name: str, file: str) -> Any:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


inproc = _load("diffdisagg_inproc_deployment", "inproc_deployment.py")
support = _load("diffdisagg_pipe_support", "pipe_support.py")
wait = inproc.wait_for


# ----------------------------------------------------------------------------------- the setting


def test_encode_threads_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from diffdisagg.worker import contract as c
    from diffdisagg.worker.settings import WorkerSettings, add_arguments, settings_from_args

    def parse(argv: list[str]) -> WorkerSettings:
        p = argparse.ArgumentParser()
        add_arguments(p)
        return settings_from_args(p.parse_args(["--role", "decode", "--token-file", "/t", *argv]))

    monkeypatch.delenv(c.ENV_ENCODE_THREADS, raising=False)
    assert parse([]).encode_threads == 2
    monkeypatch.setenv(c.ENV_ENCODE_THREADS, "0")
    assert parse([]).encode_threads == 0
    assert parse(["--encode-threads", "3"]).encode_threads == 3  # the argument overrides the variable
    assert c.ENV_ENCODE_THREADS == "DIFFDISAGG_ENCODE_THREADS" and c.ENV_ENCODE_THREADS in c.ENV_VARS
    with pytest.raises(ValueError, match="encode_threads"):
        WorkerSettings(
            role="decode", family="flux", model_path=None, gateway_url="x", token_file="t", encode_threads=-1
        )


# ------------------------------------------------------------------------------------ the adapter


@pytest.mark.parametrize(("family", "media_type"), [("flux", "image/png"), ("wan", "video/mp4")])
def test_deferred_media_is_byte_identical_to_inline(family: str, media_type: str) -> None:
    import torch

    from diffdisagg.worker.pipelines import StageInput, load_role, tiny_model_dir
    from diffdisagg.worker.pipelines.stages import LATENTS

    adapter = load_role(family, "decode", str(tiny_model_dir(family)), "cpu", max_batch_size=2)
    params = support.tiny_params(family)
    gen = torch.Generator("cpu").manual_seed(3)
    items = [
        StageInput(
            f"r{i}",
            {"params": params.to_dict()},
            {LATENTS: torch.randn(adapter.ops.latent_shape(params), generator=gen)},
        )
        for i in range(2)  # a batch of two: each output must encode its own pixels
    ]
    assert adapter.encode_later is False  # the class default: inline, as before
    inline = adapter.run_batch(items)
    adapter.encode_later = True
    deferred = adapter.run_batch(items)

    assert all(o.media is not None and o.encode is None for o in inline)
    assert all(o.media is None and o.encode is not None for o in deferred)  # nothing encoded yet
    assert [o.media_type for o in deferred] == [o.media_type for o in inline] == [media_type] * 2
    media = [o.finish_media() for o in deferred]
    assert media == [o.media for o in inline]  # byte for byte
    assert media[0] != media[1]
    assert [o.finish_media() for o in deferred] == media and all(o.encode is None for o in deferred)


# ---------------------------------------------------------------------------- the worker, end to end


class EncodeHook:
    """In front of the decode worker's real adapter: wraps each output's real `encode` with `around`."""

    def __init__(self, inner: Any, around: Any) -> None:
        self.inner = inner
        self.around = around

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run_batch(self, items: Any) -> Any:
        outs = self.inner.run_batch(items)
        for out in outs:
            if out.encode is not None:
                out.encode = functools.partial(self.around, out.encode, out.scalars["params"]["prompt"])
        return outs


@pytest.fixture(scope="module")
def deferred(tmp_path_factory: pytest.TempPathFactory):
    d = inproc.InProcessDeployment(
        tmp_path_factory.mktemp("deferred"),
        [
            inproc.Spec("p1", "prefill"),
            inproc.Spec("d1", "denoise"),
            inproc.Spec("c1", "decode", capacity=2, encode_threads=1),
        ],
    ).start()
    yield d
    d.stop()


@pytest.fixture
def decode(deferred):
    """The decode worker's runtime; whatever a test puts in front of its adapter is removed after it."""
    rt = deferred.runtimes["c1"]
    adapter = rt.scheduler.adapter
    yield rt
    rt.scheduler.adapter = adapter
    wait(lambda: rt.encoding == 0 and not rt.jobs, timeout=10, what="decode worker idle")


def _png(result: dict[str, Any]) -> bytes:
    assert result["status"] == 200, result.get("body")
    return base64.b64decode(result["body"]["data"][0]["b64_json"])


def _generate(d: Any, prompt: str, seed: int) -> dict[str, Any]:
    r = d.generate_async(prompt, seed)
    r["thread"].join(inproc.WAIT_S)
    return r


def _no_live_slots(d: Any) -> bool:
    return all(rt.handoff.stats().get("live_slots", 0) == 0 for rt in d.runtimes.values())


def test_media_encoded_off_the_compute_thread_reaches_the_client_and_matches_inline(
    deferred, decode, tmp_path: Path
) -> None:
    from PIL import Image

    threads: list[str] = []

    def record(real: Any, prompt: str) -> bytes:
        threads.append(threading.current_thread().name)
        return real()

    assert decode.scheduler.adapter.encode_later is True  # process.load_adapter, from --encode-threads 1
    decode.scheduler.adapter = EncodeHook(decode.scheduler.adapter, record)
    result = _generate(deferred, "a red fox in fresh snow", seed=5)
    png = _png(result)
    assert threads and all(t.startswith("decode-encode") for t in threads), threads
    # the timings say how much of decode's compute was the encoding
    (comp,) = [
        s
        for s in result["body"]["diffdisagg"]["timings"][0]["segments"]
        if s["kind"] == "compute" and s["role"] == "decode"
    ]
    assert 0 < comp["encode_ms"] <= comp["ms"], comp
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.format == "PNG" and img.size == (64, 64)
    wait(lambda: decode.encoding == 0 and not decode.jobs, timeout=5, what="decode worker idle")
    assert decode.load().inflight == 0
    wait(lambda: _no_live_slots(deferred), timeout=5, what="slots freed")

    # --encode-threads 0: the adapter encodes inline on the compute thread, as before; same bytes.
    inline = inproc.InProcessDeployment(
        tmp_path,
        [
            inproc.Spec("p0", "prefill"),
            inproc.Spec("d0", "denoise"),
            inproc.Spec("c0", "decode", encode_threads=0),
        ],
    ).start()
    try:
        rt = inline.runtimes["c0"]
        assert rt.scheduler.adapter.encode_later is False and rt._encoder is None
        assert _png(_generate(inline, "a red fox in fresh snow", seed=5)) == png
        wait(lambda: rt.encoding == 0 and not rt.jobs, timeout=5, what="inline decode worker idle")
    finally:
        inline.stop()


def test_an_encoder_that_raises_fails_that_request_and_the_worker_keeps_serving(deferred, decode) -> None:
    def explode(real: Any, prompt: str) -> bytes:
        if "explode" in prompt:
            raise RuntimeError("encoder exploded")
        return real()

    decode.scheduler.adapter = EncodeHook(decode.scheduler.adapter, explode)
    bad = _generate(deferred, "please explode", seed=1)
    assert bad["status"] == 500, bad.get("body")
    err = bad["body"]["error"]
    assert err["code"] == "worker_error"
    assert "media encoding failed: RuntimeError: encoder exploded" in err["message"], err
    wait(lambda: decode.encoding == 0 and not decode.jobs, timeout=5, what="failed request forgotten")

    assert len(_png(_generate(deferred, "then a calm lake", seed=2))) > 0  # the next one is served
    wait(lambda: _no_live_slots(deferred), timeout=5, what="slots freed")


class Gate:
    """Holds every encode until opened (the real encode then runs)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered: list[str] = []

    def __call__(self, real: Any, prompt: str) -> bytes:
        self.entered.append(prompt)
        assert self.open.wait(inproc.WAIT_S), "gate never opened"
        return real()


def test_requests_being_encoded_occupy_capacity(deferred, decode) -> None:
    gate = Gate()
    decode.scheduler.adapter = EncodeHook(decode.scheduler.adapter, gate)
    rt, cap = decode, decode.s.capacity
    assert cap == 2 and rt.admit(None) is True

    def idle_otherwise() -> bool:
        return rt.scheduler.queue_depth == 0 and rt.scheduler.inflight == 0 and rt.handoff.in_transit() == 0

    try:
        first = deferred.generate_async("first", seed=1)
        wait(lambda: gate.entered == ["first"], what="first encode running")
        assert rt.encoding == 1 and idle_otherwise()
        assert rt.admit(None) is True  # 1 of 2 taken
        assert (rt.load().inflight, rt.load().free_slots) == (1, 1)

        second = deferred.generate_async("second", seed=2)
        wait(lambda: rt.encoding == 2, what="second decoded, waiting for the one encode thread")
        assert gate.entered == ["first"] and idle_otherwise()
        assert rt.admit(None) is False  # the device is idle, but both places are taken by encodes
        load = rt.load()
        assert (load.queued, load.inflight, load.free_slots) == (0, 2, 0)

        # A third waits upstream of decode, and the gateway counts it in decode's queue depth.
        third = deferred.generate_async("third", seed=3)
        wait(lambda: deferred.queue_state("decode")[0] == 1, what="third counted in decode's queue depth")
        assert rt.encoding == 2 and rt.scheduler.queue_depth == 0
    finally:
        gate.open.set()
    for r in (first, second, third):
        r["thread"].join(inproc.WAIT_S)
    pngs = [_png(r) for r in (first, second, third)]
    assert len(set(pngs)) == 3
    wait(lambda: rt.encoding == 0 and rt.admit(None), timeout=5, what="places given back")
    wait(lambda: _no_live_slots(deferred), timeout=5, what="slots freed")


def test_a_request_cancelled_while_encoding_is_not_posted(deferred, decode) -> None:
    gate = Gate()
    decode.scheduler.adapter = EncodeHook(decode.scheduler.adapter, gate)
    posted: list[str] = []
    disp = deferred.gateway.dispatcher

    def spy() -> None:
        result = disp.result

        def on_result(header: Any, media: bytes) -> Any:
            posted.append(header.request_id)
            return result(header, media)

        disp.result = on_result

    original = disp.result
    deferred.on_loop(spy)
    rt = decode
    try:
        running = deferred.open_request("running", seed=1)
        wait(lambda: gate.entered == ["running"], what="its encode running")
        waiting = deferred.open_request("waiting", seed=2)
        wait(lambda: rt.encoding == 2, what="the second waiting for the encode thread")
        waiting.close()  # cancelled before its encode started: dropped, its place given back at once
        wait(lambda: rt.encoding == 1, timeout=5, what="unstarted encode dropped")
        assert gate.entered == ["running"]
        running.close()  # cancelled while its encode runs: finishes, never posted
        wait(
            lambda: rt.jobs and all(rt.is_cancelled(j.request_id, j.attempt) for j in rt.jobs.values()),
            timeout=5,
            what="the cancel of the running one reached decode",
        )
    finally:
        gate.open.set()
    try:
        wait(lambda: rt.encoding == 0 and not rt.jobs, timeout=5, what="decode worker idle")
        assert posted == [] and gate.entered == ["running"]
        after = _generate(deferred, "after the cancels", seed=3)  # and it keeps serving
        assert len(_png(after)) > 0 and len(posted) == 1
    finally:
        deferred.on_loop(lambda: setattr(disp, "result", original))
