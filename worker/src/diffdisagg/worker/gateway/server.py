"""Entry point of the gateway process: config from the contract env vars (arguments override), uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from diffdisagg.worker import contract as c
from diffdisagg.worker.control.signing import load_token
from diffdisagg.worker.gateway.app import create_app
from diffdisagg.worker.gateway.config import (
    GatewayConfig,
    Limits,
    ModelDefaults,
    default_model_name,
    env,
    read_api_keys,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=c.GATEWAY_HTTP_PORT)
    p.add_argument("--deployment", default=env(c.ENV_DEPLOYMENT, "local"))
    p.add_argument("--revision", default=env(c.ENV_REVISION, "0"))
    p.add_argument("--family", default=env(c.ENV_MODEL_FAMILY, "flux"))
    p.add_argument(
        "--model-name", default=None, help="id listed by /v1/models (default: the model dir's name)"
    )
    p.add_argument("--model-path", default=env(c.ENV_MODEL_PATH), help="only used to name the model")
    p.add_argument("--token-file", default=env(c.ENV_TOKEN_FILE), help="inter-role token (required)")
    p.add_argument("--api-key-file", default=env(c.ENV_API_KEY_FILE), help="client API keys, one per line")
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--heartbeat-misses", type=int, default=3)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--max-attempts", type=int, default=2)
    p.add_argument("--max-pending", type=int, default=Limits.max_pending)
    p.add_argument(
        "--default-size", default=None, help="WxH used when a request has no size (default: family's)"
    )
    p.add_argument("--default-steps", type=int, default=None)
    p.add_argument("--default-frames", type=int, default=None)
    p.add_argument("--log-level", default="info")


def config_from_args(a: argparse.Namespace) -> GatewayConfig:
    if not a.token_file:
        raise SystemExit(f"the inter-role token is required: --token-file or {c.ENV_TOKEN_FILE}")
    return GatewayConfig(
        deployment=a.deployment,
        revision=a.revision,
        family=a.family,
        model_name=a.model_name or default_model_name(a.family, a.model_path),
        token=load_token(a.token_file),
        api_keys=read_api_keys(a.api_key_file),
        heartbeat_interval_s=a.heartbeat_interval,
        heartbeat_misses=a.heartbeat_misses,
        request_timeout_s=a.request_timeout,
        max_attempts=a.max_attempts,
        limits=Limits(max_pending=a.max_pending),
        defaults=ModelDefaults(
            size=_size(a.default_size), num_inference_steps=a.default_steps, num_frames=a.default_frames
        ),
    )


def _size(raw: str | None) -> tuple[int, int] | None:
    if not raw:
        return None
    w, _, h = raw.lower().partition("x")
    return int(w), int(h)


def run(a: argparse.Namespace) -> None:
    logging.basicConfig(
        level=a.log_level.upper(), format="%(asctime)s %(levelname)s gateway %(name)s: %(message)s"
    )
    cfg = config_from_args(a)
    uvicorn.run(create_app(cfg), host=a.host, port=a.port, log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="diffdisagg gateway", description="diffdisagg gateway (torch-free)")
    add_arguments(p)
    run(p.parse_args(argv))
