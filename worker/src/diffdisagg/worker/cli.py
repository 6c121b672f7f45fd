"""The `diffdisagg` command: run the parts (`gateway`, `worker`, `run`) and call a running gateway
(`generate`, `models`). `generate` talks plain HTTP (httpx) to the OpenAI-compatible API; for a video
it creates a job, shows a progress line while it runs, then downloads the MP4.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from diffdisagg.worker import contract as c

DEFAULT_URL = os.environ.get("DIFFDISAGG_URL", f"http://127.0.0.1:{c.GATEWAY_HTTP_PORT}")


class CLIError(Exception):
    pass


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            msg = err["message"]
        except Exception:
            msg = resp.text[:500]
        raise CLIError(f"HTTP {resp.status_code}: {msg}")
    return resp.json()


def _extras(a: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key in ("seed", "num_inference_steps", "guidance_scale", "negative_prompt", "size", "num_frames"):
        value = getattr(a, key, None)
        if value is not None:
            body[key] = value
    return body


def generate(a: argparse.Namespace, out: Any = sys.stderr) -> Path:
    url = a.url.rstrip("/")
    target = Path(a.output)
    video = a.video or target.suffix.lower() in (".mp4", ".mov", ".webm")
    with httpx.Client(timeout=a.timeout, headers=_headers(a.api_key), trust_env=False) as http:
        body = {"prompt": a.prompt, **_extras(a)}
        if not video:
            data = _check(
                http.post(f"{url}/v1/images/generations", json={**body, "response_format": "b64_json"})
            )
            target.write_bytes(base64.b64decode(data["data"][0]["b64_json"]))
            timings = data.get("diffdisagg", {}).get("timings_ms", [{}])[0]
            if timings.get("total_ms"):
                print(f"done in {timings['total_ms']:.0f} ms", file=out)
            return target
        job = _check(http.post(f"{url}/v1/videos", json=body))
        deadline = time.monotonic() + a.timeout
        t0 = time.monotonic()
        while job["status"] in ("queued", "in_progress"):
            if time.monotonic() > deadline:
                raise CLIError(f"video job {job['id']} not done after {a.timeout:.0f}s")
            bar = "#" * (job["progress"] // 5)
            print(
                f"\r{job['id'][:18]} {job['status']:<11} [{bar:<20}] {job['progress']:3d}% "
                f"{time.monotonic() - t0:5.1f}s",
                end="",
                file=out,
                flush=True,
            )
            time.sleep(0.25)
            job = _check(http.get(f"{url}/v1/videos/{job['id']}"))
        print(
            f"\r{job['id'][:18]} {job['status']:<11} [{'#' * 20}] 100% {time.monotonic() - t0:5.1f}s",
            file=out,
        )
        if job["status"] != "completed":
            raise CLIError(f"video job failed: {(job.get('error') or {}).get('message')}")
        resp = http.get(f"{url}/v1/videos/{job['id']}/content")
        if resp.status_code != 200:
            _check(resp)
        target.write_bytes(resp.content)
        return target


def _add_generate(sub: Any) -> None:
    g = sub.add_parser("generate", help="generate an image (or a video with -o x.mp4) from a running gateway")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("--url", default=DEFAULT_URL)
    g.add_argument("--api-key", default=os.environ.get("DIFFDISAGG_API_KEY"))
    g.add_argument("--size", default=None, help="WIDTHxHEIGHT")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--steps", dest="num_inference_steps", type=int, default=None)
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--num-frames", type=int, default=None)
    g.add_argument("--video", action="store_true", help="use the video job API whatever the file name")
    g.add_argument("--timeout", type=float, default=600.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffdisagg", description="disaggregated diffusion serving")
    sub = p.add_subparsers(dest="cmd", required=True)
    from diffdisagg.worker import launcher, settings
    from diffdisagg.worker.gateway import server

    gw = sub.add_parser("gateway", help="run the gateway (no torch needed)")
    server.add_arguments(gw)
    wk = sub.add_parser("worker", help="run one role worker")
    settings.add_arguments(wk)
    run = sub.add_parser("run", help="run gateway + workers locally (what `make run` does)")
    launcher.add_arguments(run)
    _add_generate(sub)
    m = sub.add_parser("models", help="list the models a gateway serves")
    m.add_argument("--url", default=DEFAULT_URL)
    m.add_argument("--api-key", default=os.environ.get("DIFFDISAGG_API_KEY"))
    a = p.parse_args(argv)
    try:
        if a.cmd == "gateway":
            server.run(a)
        elif a.cmd == "worker":
            from diffdisagg.worker import process

            process.run(a)
        elif a.cmd == "run":
            return launcher.run(a)
        elif a.cmd == "generate":
            path = generate(a)
            print(path)
        elif a.cmd == "models":
            data = _check(
                httpx.get(a.url.rstrip("/") + "/v1/models", headers=_headers(a.api_key), trust_env=False)
            )
            for model in data["data"]:
                print(model["id"])
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the gateway: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
