"""A whole deployment in this process, for worker-runtime tests that need the real pieces but not the
start-up cost of one Python process per role (tests/e2e has the process version).

The real gateway app (uvicorn, HTTP on 127.0.0.1, ephemeral port) and real role workers
(`diffdisagg.worker.process.serve`: tiny diffusers adapter, `StageScheduler`, tcp hand-over on
127.0.0.1, signed control calls to the gateway) share one asyncio loop in a background thread. Tests
observe the runtimes (`runtimes[worker_id]`) and the gateway (`gateway`) and talk HTTP to `url`.
Tests load it by file path (they are not a package) with the snippet in test_cancel.py, which
registers it in ``sys.modules`` (dataclasses need that).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN = b"inproc-deployment-test-token-000"
WAIT_S = 60.0


@dataclass(frozen=True)
class Spec:
    worker_id: str
    role: str
    capacity: int = 4
    stage_delay_s: float = 0.0
    encode_threads: int = 2  # decode only: media encoding threads (0 = inline on the compute thread)


def wait_for(
    predicate: Callable[[], Any], timeout: float = WAIT_S, interval: float = 0.02, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class InProcessDeployment:
    def __init__(self, tmp: Path, specs: list[Spec], family: str = "flux") -> None:
        self.tmp = tmp
        self.specs = specs
        self.family = family
        self.runtimes: dict[str, Any] = {}
        self.gateway: Any = None
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------------------------ life cycle

    def start(self) -> InProcessDeployment:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        token_file = self.tmp / "token"
        token_file.write_bytes(TOKEN)
        self._thread = threading.Thread(target=self._run, args=(sock, str(token_file)), daemon=True)
        self._thread.start()
        wait_for(lambda: self._error or len(self.runtimes) == len(self.specs), what="workers registered")
        if self._error is not None:
            raise self._error
        wait_for(lambda: self.get("/ready")[0] == 200, what="gateway ready")
        return self

    def _run(self, sock: socket.socket, token_file: str) -> None:
        try:
            asyncio.run(self._main(sock, token_file))
        except BaseException as exc:  # surfaced by start() / stop()
            self._error = exc

    async def _main(self, sock: socket.socket, token_file: str) -> None:
        import uvicorn

        from diffdisagg.worker.gateway.app import create_app
        from diffdisagg.worker.gateway.config import GatewayConfig, ModelDefaults
        from diffdisagg.worker.process import serve
        from diffdisagg.worker.settings import WorkerSettings

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        cfg = GatewayConfig(
            token=TOKEN,
            family=self.family,
            model_name=f"tiny-{self.family}",
            heartbeat_interval_s=0.25,
            heartbeat_misses=8,
            request_timeout_s=60.0,
            defaults=ModelDefaults(size=(64, 64), num_inference_steps=2),
        )
        app = create_app(cfg)
        self.gateway = app.state.gateway
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", log_config=None)
        )
        gw_task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if gw_task.done():
                gw_task.result()  # raises what stopped it
                raise RuntimeError("the gateway stopped before it started serving")
            await asyncio.sleep(0.01)
        tasks = []
        for spec in self.specs:
            s = WorkerSettings(
                role=spec.role,
                family=self.family,
                model_path=None,
                gateway_url=self.url,
                token_file=token_file,
                host="127.0.0.1",
                bind="127.0.0.1",
                control_port=0,
                transfer_port=0,
                buffer_bytes=4 << 20,
                worker_id=spec.worker_id,
                capacity=spec.capacity,
                max_batch_size=1,
                heartbeat_interval_s=0.25,
                stage_delay_s=spec.stage_delay_s,
                encode_threads=spec.encode_threads,
            )

            registered = asyncio.Event()

            def ready(rt: Any, wid: str = spec.worker_id, done: asyncio.Event = registered) -> None:
                self.runtimes[wid] = rt
                done.set()

            task = asyncio.create_task(serve(s, self._stop, on_ready=ready))
            tasks.append(task)
            # One at a time: model loading from several threads at once can deadlock in library imports.
            waiter = asyncio.create_task(registered.wait())
            await asyncio.wait([waiter, task], timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()
                raise RuntimeError(f"worker {spec.worker_id} stopped during start-up")
            if not registered.is_set():
                raise TimeoutError(f"worker {spec.worker_id} did not register within {WAIT_S}s")
        await self._stop.wait()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._server.should_exit = True
        await gw_task

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(WAIT_S)
            assert not self._thread.is_alive(), "in-process deployment did not stop"

    # ---------------------------------------------------------------------------------------- access

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the deployment's loop (where the gateway and the runtimes live); its value."""
        assert self._loop is not None

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(WAIT_S)

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def request(
        self, method: str, path: str, body: dict | None = None, timeout: float = WAIT_S
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def generate_async(self, prompt: str, seed: int) -> dict[str, Any]:
        """POST an image request from a thread; the returned dict gets `status` and `body` when done."""
        out: dict[str, Any] = {}

        def go() -> None:
            body = {"prompt": prompt, "seed": seed, "num_inference_steps": 2, "timeout": 50}
            out["status"], out["body"] = self.request("POST", "/v1/images/generations", body, timeout=WAIT_S)

        t = threading.Thread(target=go, daemon=True)
        t.start()
        out["thread"] = t
        return out

    def open_request(self, prompt: str, seed: int) -> socket.socket:
        """POST an image request over a raw socket and leave it waiting: closing it is a client disconnect."""
        body = json.dumps({"prompt": prompt, "seed": seed, "num_inference_steps": 2, "timeout": 50}).encode()
        host, port = self.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=5)
        head = (
            f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        return sock

    def queue_state(self, role: str) -> tuple[int, dict[str, int]]:
        """The gateway's queue depth for `role` and its breakdown by place, read on its loop."""
        d = self.gateway.dispatcher
        return self.on_loop(lambda: (d.queue_depth(role), d.waiting_by_place(role)))
