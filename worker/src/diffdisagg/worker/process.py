"""Entry point of one role worker process: settings -> role adapter -> transport -> runtime loops.

`python -m diffdisagg.worker --role denoise ...` (or `diffdisagg worker ...`). SIGTERM/SIGINT stop it
cleanly: the receiver frees every slot it holds and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from diffdisagg.worker.control.signing import load_token
from diffdisagg.worker.gateway_link import GatewayLink
from diffdisagg.worker.settings import WorkerSettings, add_arguments, settings_from_args

logger = logging.getLogger(__name__)


def load_adapter(s: WorkerSettings, device: Any = None) -> Any:
    """The role adapter (imports torch and diffusers) on `device` (default: this worker's first device);
    the tiny model is built on first use. Decode defers its media encoding to the runtime when
    `--encode-threads` > 0 (every rank of a multi-device worker loads through here)."""
    import torch

    from diffdisagg.worker.pipelines import load_role, tiny_model_dir

    path = s.model_path or str(tiny_model_dir(s.family))
    if device is None:
        device = "cpu" if s.platform == "cpu" else _device(s.platform)
    adapter = load_role(
        s.family, s.role, path, device, getattr(torch, s.dtype), max_batch_size=s.max_batch_size
    )
    if s.role == "decode":
        # The runtime encodes PNG / MP4 on its encode threads while the device decodes the next batch.
        adapter.encode_later = s.encode_threads > 0
    return adapter


def rank_env(s: WorkerSettings) -> Any:
    """Where this process sits in the pod's rank group (docs/multi-device.md): one rank unless
    --devices-per-pod / DIFFDISAGG_DEVICES_PER_POD > 1 or the rank variables are set."""
    from diffdisagg.worker import contract as c
    from diffdisagg.worker.distributed import RankEnv

    return RankEnv.from_env({**os.environ, c.ENV_DEVICES_PER_POD: str(s.devices_per_pod)})


def _device(platform: str) -> Any:
    from diffdisagg.transport.platforms import current_platform

    return current_platform().device(0)


class SlowAdapter:
    """The role adapter plus a fixed sleep per batch: `--stage-delay`, to make one pool the slow one in
    tests and benchmarks (queue depth, back-pressure). Never used in production."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self._inner = inner
        self._delay_s = delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def run_batch(self, items: Any) -> Any:
        out = self._inner.run_batch(items)
        time.sleep(self._delay_s)
        return out


def scheduler_factory(s: WorkerSettings, adapter: Any, manager: Any) -> Any:
    """How the runtime builds the role's scheduler loop (diffdisagg.worker.scheduler)."""
    from diffdisagg.worker.scheduler import SchedulerConfig, StageScheduler

    cfg = SchedulerConfig(queue_capacity=s.capacity, max_batch_size=s.max_batch_size, prefetch=1)

    def make(on_complete: Any, tracer: Any) -> Any:
        sched = StageScheduler(adapter, manager, on_complete, cfg, tracer=tracer)
        sched.start()
        return sched

    return make


async def serve(
    s: WorkerSettings,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Any], None] | None = None,
    adapter: Any = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT, or until `stop` is set when given (then no signal
    handlers are installed: several workers may share one loop, as the in-process tests do).
    `on_ready(runtime)` is called once it registered with the gateway."""
    from diffdisagg.worker.handoff import TransportHandoff
    from diffdisagg.worker.runtime import WorkerRuntime

    token = load_token(s.token_file)
    if adapter is None:  # else: rank 0's LeaderAdapter of a multi-device worker, loaded already
        adapter = await asyncio.get_running_loop().run_in_executor(None, load_adapter, s)
    from diffdisagg.worker.scheduler import ReceivedRequest

    if s.stage_delay_s > 0:
        adapter = SlowAdapter(adapter, s.stage_delay_s)
    handoff = TransportHandoff(s, token, adapter.device, receive=s.role != "prefill", send=s.role != "decode")
    link = GatewayLink(s.gateway_url, token)
    manager = handoff.manager if s.role != "prefill" else None
    rt = WorkerRuntime(s, handoff, link, scheduler_factory(s, adapter, manager), ReceivedRequest)
    rt.loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            rt.loop.add_signal_handler(sig, stop.set)
    handoff.start(rt.on_delivery_threadsafe, rt.admit)  # busy at once while the scheduler is full
    try:
        await rt.register_until_done()
        tasks = [asyncio.create_task(c) for c in (rt.pending_loop(), rt.heartbeat_loop(), rt.poll_loop())]
        logger.info("%s worker %s ready (hand-over %s)", s.role, s.worker_id, handoff.endpoint or "send-only")
        if on_ready is not None:
            on_ready(rt)
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not waiter and t.exception() is not None:
                logger.error("worker loop died: %r", t.exception())
        for t in tasks:
            t.cancel()
    finally:
        await rt.stop()
        with contextlib.suppress(Exception):
            handoff.close()


def run(a: argparse.Namespace) -> None:
    s = settings_from_args(a)
    env = rank_env(s)
    rank = f"/rank{env.rank}" if env.distributed else ""
    logging.basicConfig(
        level=a.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {s.role}[{s.worker_id}{rank}] %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per control call is noise
    ranks = None
    if env.distributed:
        # several devices in this pod: one worker made of N ranks (docs/multi-device.md)
        from diffdisagg.worker.distributed import run_follower, start_leader

        def load(device: Any) -> Any:
            return load_adapter(s, device)

        if not env.is_leader:
            # ranks 1..N-1: no socket, no buffer, no gateway link; 0 after STOP, 75 if the group is lost
            code = run_follower(env, load)
            logging.shutdown()
            os._exit(code)
        ranks = start_leader(env, load)  # main thread: the spawned ranks die with this thread
    try:
        asyncio.run(serve(s, adapter=ranks.adapter if ranks is not None else None))
    finally:
        if ranks is not None:
            ranks.close()
    # Every slot is freed and the gateway told by now; do not wait for worker threads (a send stuck on
    # a dead peer) to exit on their own.
    logging.shutdown()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="diffdisagg worker", description="one diffdisagg role worker")
    add_arguments(p)
    run(p.parse_args(argv))
