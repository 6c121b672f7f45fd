"""The gateway's HTTP app: the OpenAI-compatible API for clients and the signed internal API for workers.

`create_app(cfg)` wires config -> registry -> dispatcher -> metrics -> routes. Nothing is built at import
time, and nothing imported here imports torch (tests/worker/test_gateway_torchfree.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from diffdisagg.worker import contract
from diffdisagg.worker.control import signing
from diffdisagg.worker.control.messages import (
    PATH_EVENT,
    PATH_HEARTBEAT,
    PATH_HOP,
    PATH_POLL,
    PATH_REGISTER,
    PATH_RESULT,
    Heartbeat,
    HopRequest,
    Poll,
    Register,
    RegisterReply,
    ResultHeader,
    StageEvent,
)
from diffdisagg.worker.gateway.config import GatewayConfig
from diffdisagg.worker.gateway.dispatch import Dispatcher, NoReceiverYet, RequestGone, Result, StaleMessage
from diffdisagg.worker.gateway.errors import APIError, install_handlers
from diffdisagg.worker.gateway.forms import parse_body
from diffdisagg.worker.gateway.jobs import JobStore
from diffdisagg.worker.gateway.metrics import GatewayMetrics
from diffdisagg.worker.gateway.playground import playground_router
from diffdisagg.worker.gateway.registry import Registry
from diffdisagg.worker.gateway.requests import parse_image_request, parse_video_request

logger = logging.getLogger(__name__)

#: How often the client connection is checked while a request computes (seconds): bounds how long a
#: disconnected client's request keeps its workers busy.
DISCONNECT_POLL_S = 0.25


class Gateway:
    """State of one gateway: what the routes share."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.registry = Registry(cfg.heartbeat_interval_s, cfg.heartbeat_misses, cfg.revision)
        self.metrics = GatewayMetrics(cfg.deployment)
        self.dispatcher = Dispatcher(cfg, self.registry, self.metrics.observers())
        self.metrics.attach(self.dispatcher)
        self.jobs = JobStore(self.dispatcher, cfg.limits.max_jobs)
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        await self.dispatcher.close()

    async def _tick_loop(self) -> None:
        period = min(0.05, self.cfg.heartbeat_interval_s / 4)
        while True:
            try:
                self.dispatcher.tick()
            except Exception:  # the loop must survive any single bad state
                logger.exception("dispatcher tick failed")
            await asyncio.sleep(period)

    # --- helpers used by routes -------------------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(
                413, f"request body is {declared} bytes; the limit is {limit}", code="body_too_large"
            )
        body = await request.body()
        if len(body) > limit:
            raise APIError(
                413, f"request body is {len(body)} bytes; the limit is {limit}", code="body_too_large"
            )
        return body

    def check_api_key(self, request: Request) -> None:
        if not self.cfg.api_keys:
            return
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if key not in self.cfg.api_keys:
            raise APIError(
                401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key"
            )

    async def verify_worker(self, request: Request) -> bytes:
        body = await request.body()
        try:
            signing.verify(self.cfg.token, request.method, request.url.path, body, request.headers)
        except signing.SignatureError as exc:
            raise APIError(
                401, f"worker message rejected: {exc}", code="bad_signature", reason="bad_signature"
            ) from None
        return body

    async def wait_all(
        self, request: Request, futures: list[asyncio.Future[Result]], ids: list[str]
    ) -> list[Result]:
        """Wait for every result; on client disconnect cancel them all (propagated to the workers)."""
        gathered = asyncio.gather(*futures)
        try:
            while True:
                done, _ = await asyncio.wait({gathered}, timeout=DISCONNECT_POLL_S)
                if done:
                    return gathered.result()
                if await request.is_disconnected():
                    logger.info("client went away; cancelling %s", ids)
                    for rid in ids:
                        self.dispatcher.cancel(rid, "client_disconnected")
                    err = APIError(499, "client disconnected", code="cancelled", reason="client_disconnected")
                    err.counted = True  # the dispatcher counted the cancel already
                    raise err
        except BaseException:
            for rid in ids:
                self.dispatcher.cancel(rid, "cancelled")
            with contextlib.suppress(BaseException):
                await gathered
            raise
        finally:
            for rid in ids:
                self.dispatcher.forget(rid)


def _model_json(cfg: GatewayConfig) -> dict[str, Any]:
    return {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "diffdisagg"}


def _parse(model: type, body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise APIError(
            400, f"malformed control message: {exc.errors()[0]['msg']}", code="bad_message"
        ) from None


def create_app(cfg: GatewayConfig) -> FastAPI:
    gw = Gateway(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="diffdisagg gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gw
    install_handlers(app, on_error=lambda err: gw.metrics.errors.labels(cfg.deployment, err.reason).inc())

    # --- probes and metrics -------------------------------------------------------------------

    @app.get(contract.PATH_HEALTH)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(contract.PATH_READY)
    async def ready() -> JSONResponse:
        live = gw.registry.roles_live(contract.STAGE_ROLES)
        ok = all(live.values())
        return JSONResponse({"ready": ok, "live_workers": live}, status_code=200 if ok else 503)

    @app.get(contract.PATH_METRICS)
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(playground_router())

    # --- OpenAI API ---------------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        gw.check_api_key(request)
        return {"object": "list", "data": [_model_json(cfg)]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        gw.check_api_key(request)
        if model_id != cfg.model_name:
            raise APIError(404, f"model {model_id!r} not found", param="model", code="model_not_found")
        return _model_json(cfg)

    @app.post("/v1/images/generations")
    async def images(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        gw.check_api_key(request)
        body = await gw.read_body(request)
        gen = parse_image_request(cfg, parse_body(request.headers.get("content-type"), body))
        tracked = []
        try:
            for i in range(gen.n):
                params = {**gen.params, "seed": gen.params["seed"] + i}
                tracked.append(gw.dispatcher.submit(params, gen.timeout_s))
        except APIError:
            for t in tracked:
                gw.dispatcher.cancel(t.id, "admission_failed")
                gw.dispatcher.forget(t.id)
            raise
        results = await gw.wait_all(request, [t.future for t in tracked], [t.id for t in tracked])
        gw.metrics.request_seconds.labels(cfg.deployment, "images").observe(time.perf_counter() - t0)
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": [
                    {"b64_json": base64.b64encode(r.media).decode(), "revised_prompt": None} for r in results
                ],
                "output_format": "png",
                "size": gen.size,
                # Extension (docs/playground.md): ignored by the openai client, read by the playground.
                "diffdisagg": {
                    "request_ids": [t.id for t in tracked],
                    "seeds": [t.params["seed"] for t in tracked],
                    "timings_ms": [r.timings_ms for r in results],
                    "timings": [r.timings for r in results],
                },
            }
        )

    @app.post("/v1/videos")
    async def create_video(request: Request) -> dict[str, Any]:
        gw.check_api_key(request)
        body = await gw.read_body(request)
        data = parse_body(request.headers.get("content-type"), body)
        gen = parse_video_request(cfg, data)
        tracked = gw.dispatcher.submit(gen.params, gen.timeout_s)
        seconds = f"{gen.params['num_frames'] / gen.fps:g}"
        job = gw.jobs.create(tracked, gen.model, gen.params["prompt"], gen.size, seconds)
        return job.view(gw.dispatcher)

    @app.get("/v1/videos/{video_id}")
    async def get_video(video_id: str, request: Request) -> dict[str, Any]:
        gw.check_api_key(request)
        return gw.jobs.get(video_id).view(gw.dispatcher)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, request: Request, variant: str = "video") -> Response:
        gw.check_api_key(request)
        job = gw.jobs.get(video_id)
        if variant != "video":
            raise APIError(
                400,
                f"variant {variant!r} is not available; only 'video'",
                param="variant",
                code="unsupported_value",
            )
        if job.status == "failed":
            raise APIError(
                409,
                f"video job {video_id} failed: {job.error.message if job.error else ''}",
                code="job_failed",
            )
        if job.result is None:
            raise APIError(
                409,
                f"video job {video_id} is {job.status}; poll GET /v1/videos/{video_id}",
                code="job_not_ready",
            )
        return Response(job.result.media, media_type=job.result.media_type)

    # --- internal API (workers; signed with the inter-role token) -------------------------------

    @app.post(PATH_REGISTER)
    async def register(request: Request) -> dict[str, Any]:
        msg = _parse(Register, await gw.verify_worker(request))
        if msg.deployment != cfg.deployment:
            raise APIError(
                409,
                f"worker of deployment {msg.deployment!r} at gateway of {cfg.deployment!r}",
                code="wrong_deployment",
            )
        if msg.family != cfg.family:
            raise APIError(
                409, f"worker serves family {msg.family!r}, gateway {cfg.family!r}", code="wrong_family"
            )
        known = gw.registry.register(msg)
        gw.dispatcher.pump()
        return RegisterReply(heartbeat_interval_s=cfg.heartbeat_interval_s, known=known).model_dump()

    @app.post(PATH_HEARTBEAT)
    async def heartbeat(request: Request) -> JSONResponse:
        msg = _parse(Heartbeat, await gw.verify_worker(request))
        known = gw.registry.heartbeat(msg.worker_id, msg.load)
        if known:
            gw.dispatcher.pump()
        reply = RegisterReply(heartbeat_interval_s=cfg.heartbeat_interval_s, known=known)
        return JSONResponse(reply.model_dump())

    @app.post(PATH_POLL)
    async def poll(request: Request) -> JSONResponse:
        msg = _parse(Poll, await gw.verify_worker(request))
        reply = await gw.dispatcher.poll(msg)
        return JSONResponse(reply.model_dump())

    @app.post(PATH_HOP)
    async def hop(request: Request) -> JSONResponse:
        msg = _parse(HopRequest, await gw.verify_worker(request))
        try:
            grant = await gw.dispatcher.hop(msg)
        except NoReceiverYet:
            return JSONResponse({"retry": True}, status_code=503, headers={"retry-after": "0"})
        except RequestGone:
            return JSONResponse({"gone": True}, status_code=410)
        except StaleMessage as exc:
            return JSONResponse({"stale": str(exc)}, status_code=409)
        return JSONResponse(grant.model_dump())

    @app.post(PATH_EVENT)
    async def event(request: Request) -> JSONResponse:
        msg = _parse(StageEvent, await gw.verify_worker(request))
        try:
            gw.dispatcher.event(msg)
        except RequestGone:
            return JSONResponse({"gone": True}, status_code=410)
        except StaleMessage as exc:
            return JSONResponse({"stale": str(exc)}, status_code=409)
        return JSONResponse({"ok": True})

    @app.post(PATH_RESULT)
    async def result(request: Request) -> JSONResponse:
        body = await gw.verify_worker(request)
        try:
            raw = msgpack.unpackb(body, raw=False)
            media = raw.pop("media")
            header = ResultHeader.model_validate(raw)
            if not isinstance(media, bytes):
                raise TypeError("media must be bytes")
        except (ValueError, TypeError, KeyError, ValidationError, msgpack.ExtraData) as exc:
            raise APIError(400, f"malformed result: {exc}", code="bad_message") from None
        try:
            gw.dispatcher.result(header, media)
        except RequestGone:
            return JSONResponse({"gone": True}, status_code=410)
        except StaleMessage as exc:
            return JSONResponse({"stale": str(exc)}, status_code=409)
        return JSONResponse({"ok": True})

    return app
