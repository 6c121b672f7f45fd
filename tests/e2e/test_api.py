"""The OpenAI-compatible API through real processes: the official openai client unmodified, curl-like
raw HTTP, the CLI, input limits, and authentication of the internal worker API."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from openai import OpenAI
from PIL import Image

from diffdisagg.worker.launcher import LocalDeployment

S = sys.modules["diffdisagg_e2e_support"]  # loaded by conftest.py (tests are not a package)
http_json, queue_depth = S.http_json, S.queue_depth


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()  # decodes every pixel: a truncated file fails here
    return img.size


def test_openai_client_models_and_images(flux: LocalDeployment) -> None:
    client = OpenAI(base_url=flux.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["diffdisagg-tiny-flux"]
    resp = client.images.generate(
        model="diffdisagg-tiny-flux",
        prompt="a red fox in the snow",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 2},
    )
    assert len(resp.data) == 2
    imgs = [base64.b64decode(d.b64_json) for d in resp.data]
    assert all(_png_size(b) == (64, 64) for b in imgs)
    assert imgs[0] != imgs[1]  # n=2 uses seeds 7 and 8
    # same seed, same bits (the split pipeline is deterministic end to end)
    again = client.images.generate(
        prompt="a red fox in the snow", size="64x64", extra_body={"seed": 7, "num_inference_steps": 2}
    )
    assert base64.b64decode(again.data[0].b64_json) == imgs[0]


def test_raw_http_timings_and_bad_input(flux: LocalDeployment) -> None:
    status, body = http_json(
        "POST",
        flux.url + "/v1/images/generations",
        {"prompt": "a cat", "size": "80x64", "seed": 1, "num_inference_steps": 1},
    )
    assert status == 200, body
    assert _png_size(base64.b64decode(body["data"][0]["b64_json"])) == (80, 64)
    t = body["diffdisagg"]["timings_ms"][0]
    assert {"prefill_ms", "denoise_ms", "decode_ms", "hop_prefill_denoise_ms", "total_ms"} <= set(t)
    cases = [
        ({"prompt": "x" * 5000}, "limit is 2000"),
        ({"prompt": "a", "size": "4096x4096"}, "2048"),
        ({"prompt": "a", "num_inference_steps": 10_000}, "between 1 and 100"),
        ({"prompt": "a", "response_format": "url"}, "b64_json"),
    ]
    for payload, needle in cases:
        status, body = http_json("POST", flux.url + "/v1/images/generations", payload)
        assert status == 400 and needle in body["error"]["message"], body
    req = urllib.request.Request(
        flux.url + "/v1/images/generations",
        data=b"{oops",
        method="POST",
        headers={"content-type": "application/json"},
    )
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("malformed JSON accepted")
    except urllib.error.HTTPError as err:
        assert err.code == 400 and json.loads(err.read())["error"]["code"] == "invalid_json"
    # a body over the limit is refused from its Content-Length, before it is read
    host, port = flux.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2097152\r\n\r\n{"
        )
        raw = b""
        while b"limit is" not in raw:  # headers and body may come in separate segments
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    reply = raw.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert "limit is 1048576" in reply, reply
    assert all(queue_depth(flux.url, r) == 0 for r in ("prefill", "denoise", "decode"))


def test_unauthenticated_worker_messages_are_rejected(flux: LocalDeployment) -> None:
    forged = {
        "worker_id": "intruder",
        "role": "denoise",
        "deployment": "local",
        "revision": "0",
        "family": "flux",
        "control_url": "",
        "handover": {"host": "127.0.0.1", "port": 9},
        "load": {"queued": 0, "inflight": 0, "held": 0, "free_slots": 9, "capacity": 9},
    }
    status, body = http_json("POST", flux.url + "/internal/v1/workers/register", forged)
    assert status == 401 and "signature" in body["error"]["message"]
    from diffdisagg.worker.control import signing

    raw = json.dumps(forged).encode()
    path = "/internal/v1/workers/register"
    req = urllib.request.Request(
        flux.url + path,
        data=raw,
        method="POST",
        headers={"content-type": "application/json", **signing.sign(b"w" * 32, "POST", path, raw)},
    )
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("wrong token accepted")
    except urllib.error.HTTPError as err:
        assert err.code == 401
    status, body = http_json("GET", flux.url + "/ready")
    assert body["live_workers"]["denoise"] == 2  # the intruder never joined


def test_cli_generate(flux: LocalDeployment, tmp_path: Path) -> None:
    out = tmp_path / "cli.png"
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffdisagg.worker",
            "generate",
            "a lighthouse",
            "-o",
            str(out),
            "--url",
            flux.url,
            "--seed",
            "3",
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert _png_size(out.read_bytes()) == (64, 64)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffdisagg.worker",
            "generate",
            "x",
            "-o",
            str(out),
            "--url",
            flux.url,
            "--size",
            "7x7",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert bad.returncode == 1 and "HTTP 400" in bad.stderr and "size" in bad.stderr


def test_client_disconnect_cancels_the_request_everywhere(flux: LocalDeployment) -> None:
    host, port = flux.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "abandoned", "seed": 5, "num_inference_steps": 2}).encode()
    before = S.metrics(flux.url).get(
        ("diffdisagg_request_errors_total", (("deployment", "local"), ("reason", "client_disconnected"))), 0.0
    )
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        S.wait_for(
            lambda: (
                any(S.queue_depth(flux.url, r) or 0 for r in ("prefill", "denoise", "decode"))
                or S.metrics(flux.url).get(
                    ("diffdisagg_inflight", (("deployment", "local"), ("role", "denoise"))), 0
                )
            ),
            timeout=10,
            interval=0.02,
            message="request admitted",
        )
    t0 = time.monotonic()

    def cancelled() -> bool:
        m = S.metrics(flux.url)
        n = m.get(
            ("diffdisagg_request_errors_total", (("deployment", "local"), ("reason", "client_disconnected"))),
            0,
        )
        busy = [v for (name, _), v in m.items() if name in ("diffdisagg_queue_depth", "diffdisagg_inflight")]
        return n == before + 1 and not any(busy)

    S.wait_for(cancelled, timeout=10, message="the abandoned request cancelled and gone from every queue")
    assert time.monotonic() - t0 < 10
