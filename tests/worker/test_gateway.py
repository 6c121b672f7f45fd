"""The gateway's HTTP surface: OpenAI-style validation and error bodies, probes, models, API keys, and the
authentication of the internal worker API — the real app over ASGI (starlette's TestClient)."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from diffdisagg.worker.control import signing
from diffdisagg.worker.control.messages import PATH_HEARTBEAT, PATH_REGISTER, Load, Register
from diffdisagg.worker.gateway.app import create_app
from diffdisagg.worker.gateway.config import GatewayConfig, Limits, ModelDefaults

TOKEN = b"t" * 32


def cfg(**kw) -> GatewayConfig:
    base = dict(
        token=TOKEN,
        family="flux",
        model_name="tiny-flux",
        revision="r1",
        defaults=ModelDefaults(size=(64, 64), num_inference_steps=2),
        limits=Limits(max_body_bytes=4096),
    )
    base.update(kw)
    return GatewayConfig(**base)


@pytest.fixture
def client():
    with TestClient(create_app(cfg())) as c:
        yield c


def signed_post(c: TestClient, path: str, payload: dict, token: bytes = TOKEN, now: float | None = None):
    body = json.dumps(payload).encode()
    headers = {"content-type": "application/json", **signing.sign(token, "POST", path, body, now=now)}
    return c.post(path, content=body, headers=headers)


def register(c: TestClient, wid: str, role: str, **kw) -> None:
    msg = Register(
        worker_id=wid,
        role=role,
        deployment="local",
        revision="r1",
        family="flux",
        control_url="",
        handover={"host": "127.0.0.1", "port": 1},
        load=Load(queued=0, inflight=0, held=0, free_slots=2, capacity=2),
    )
    r = signed_post(c, PATH_REGISTER, {**msg.model_dump(), **kw})
    assert r.status_code == 200, r.text


def assert_openai_error(r, status: int, *needles: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for n in needles:
        assert n in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_health_ready_models(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 503 and r.json()["live_workers"] == {"prefill": 0, "denoise": 0, "decode": 0}
    for i, role in enumerate(("prefill", "denoise", "decode")):
        register(client, f"w{i}", role)
        assert client.get("/ready").status_code == (200 if role == "decode" else 503)
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-flux"]
    assert client.get("/v1/models/tiny-flux").json()["id"] == "tiny-flux"
    assert_openai_error(client.get("/v1/models/nope"), 404, "nope")


@pytest.mark.parametrize(
    ("body", "status", "needle", "param"),
    [
        ({"prompt": "x" * 2001}, 400, "limit is 2000", "prompt"),
        ({"prompt": "a", "size": "4096x4096"}, 400, "2048", "size"),
        ({"prompt": "a", "size": "100x64"}, 400, "multiples of 16", "size"),
        ({"prompt": "a", "size": "big"}, 400, "WIDTHxHEIGHT", "size"),
        ({"prompt": "a", "num_inference_steps": 1000}, 400, "between 1 and 100", "num_inference_steps"),
        ({"prompt": "a", "n": 9}, 400, "between 1 and 4", "n"),
        ({"prompt": "a", "guidance_scale": "lots"}, 400, "number", "guidance_scale"),
        ({"prompt": "a", "response_format": "url"}, 400, "b64_json", "response_format"),
        ({"prompt": "a", "model": "dall-e-3"}, 404, "tiny-flux", "model"),
        ({"prompt": "a", "bogus": 1}, 400, "bogus", "bogus"),
        ({"n": 1}, 400, "'prompt' is required", "prompt"),
        ({"prompt": "   "}, 400, "empty", "prompt"),
        ({"prompt": "a", "seed": -1}, 400, "seed", "seed"),
        ({"prompt": "a", "negative_prompt": "b"}, 400, "negative", "negative_prompt"),  # flux: no CFG
    ],
)
def test_image_request_validation(
    client: TestClient, body: dict, status: int, needle: str, param: str
) -> None:
    assert_openai_error(client.post("/v1/images/generations", json=body), status, needle, param=param)


def test_malformed_bodies_get_openai_400_not_fastapi_422(client: TestClient) -> None:
    r = client.post(
        "/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(r, 400, "malformed JSON")
    r = client.post("/v1/images/generations", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "JSON object")
    r = client.post("/v1/images/generations", content=b"x", headers={"content-type": "text/plain"})
    assert_openai_error(r, 415, "application/json")
    r = client.post(
        "/v1/images/generations",
        content=b"{" + b" " * 5000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert_openai_error(r, 413, "limit is 4096")
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.put("/v1/models"), 405)


def test_no_workers_is_503_with_retry_after(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json={"prompt": "a"})
    assert_openai_error(r, 503, "no live worker")
    assert r.headers["retry-after"] == "1"
    metrics = client.get("/metrics").text
    assert 'diffdisagg_request_errors_total{deployment="local",reason="no_workers"} 1.0' in metrics


def test_video_endpoints_on_an_image_model_and_unknown_jobs(client: TestClient) -> None:
    assert_openai_error(client.post("/v1/videos", json={"prompt": "a"}), 400, "images", param="model")
    assert_openai_error(client.get("/v1/videos/video_nope"), 404, "video_nope")
    assert_openai_error(client.get("/v1/videos/video_nope/content"), 404)


def test_video_validation_multipart_and_limits() -> None:
    with TestClient(
        create_app(
            cfg(family="wan", model_name="tiny-wan", defaults=ModelDefaults(size=(64, 64), num_frames=5))
        )
    ) as c:
        r = c.post(
            "/v1/videos",
            data={"prompt": "a", "seconds": "12", "fps": "16"},
            files={"input_reference": ("ref.png", b"\x89PNG", "image/png")},
        )
        assert_openai_error(r, 400, "input_reference", param="input_reference")
        # multipart without files, as the openai client sends it
        body = (
            b'--B\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n'
            b'--B\r\nContent-Disposition: form-data; name="seconds"\r\n\r\n12\r\n--B--\r\n'
        )
        r = c.post("/v1/videos", content=body, headers={"content-type": "multipart/form-data; boundary=B"})
        assert_openai_error(r, 400, "limit is 129", param="seconds")  # 12 s at 16 fps = 193 frames
        r = c.post("/v1/videos", content=b"--B\r\ngarbage", headers={"content-type": "multipart/form-data"})
        assert_openai_error(r, 400, "boundary")
        r = c.post("/v1/videos", json={"prompt": "a", "num_frames": 6})
        assert_openai_error(r, 400, "4k+1", param="num_frames")
        r = c.post("/v1/videos", json={"prompt": "a", "num_frames": 1000})
        assert_openai_error(r, 400, "between 1 and 129", param="num_frames")
        assert_openai_error(c.post("/v1/images/generations", json={"prompt": "a"}), 400, "/v1/videos")


def test_api_key_required_when_configured() -> None:
    with TestClient(create_app(cfg(api_keys=frozenset({"k1"})))) as c:
        assert_openai_error(c.get("/v1/models"), 401, "API key")
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/health").status_code == 200  # probes stay open


def test_worker_messages_must_be_signed_with_the_token(client: TestClient) -> None:
    msg = Register(
        worker_id="evil",
        role="denoise",
        deployment="local",
        revision="r1",
        family="flux",
        control_url="",
        handover={},
        load=Load(queued=0, inflight=0, held=0, free_slots=1, capacity=1),
    ).model_dump()
    r = client.post(PATH_REGISTER, json=msg)
    assert_openai_error(r, 401, "missing signature")
    assert_openai_error(signed_post(client, PATH_REGISTER, msg, token=b"x" * 32), 401, "bad signature")
    assert_openai_error(signed_post(client, PATH_REGISTER, msg, now=time.time() - 120), 401, "replay window")
    # a valid signature for another path does not carry over
    body = json.dumps(msg).encode()
    headers = {"content-type": "application/json", **signing.sign(TOKEN, "POST", PATH_HEARTBEAT, body)}
    assert_openai_error(client.post(PATH_REGISTER, content=body, headers=headers), 401, "bad signature")
    assert client.get("/ready").json()["live_workers"]["denoise"] == 0
    metrics = client.get("/metrics").text
    assert 'reason="bad_signature"' in metrics


def test_worker_of_another_deployment_or_family_is_refused(client: TestClient) -> None:
    msg = Register(
        worker_id="w",
        role="denoise",
        deployment="other",
        revision="r1",
        family="flux",
        control_url="",
        handover={},
        load=Load(queued=0, inflight=0, held=0, free_slots=1, capacity=1),
    ).model_dump()
    assert_openai_error(signed_post(client, PATH_REGISTER, msg), 409, "deployment")
    assert_openai_error(
        signed_post(client, PATH_REGISTER, {**msg, "deployment": "local", "family": "sd3"}), 409
    )
    assert_openai_error(
        signed_post(client, PATH_REGISTER, {"worker_id": "w"}), 400, "malformed control message"
    )
