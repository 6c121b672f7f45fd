"""Render, then run: real processes started from exactly what the operator's `render` wrote serve a request.

kwok pods run nothing, so this is the only proof that the operator's wiring is one the worker and the
gateway can run: the command/args, every env var, the token Secret, the pipeline ConfigMap, the model
volume, the gateway URL and the ports. `pods.py` says what stands in for what (a network and UTS
namespace per pod on a bridge, cluster DNS through /etc/hosts, the downward API, volumes as
directories); nothing else is changed — no argument added, no variable set or removed.
"""

from __future__ import annotations

import base64
import importlib.util
import secrets
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from diffdisagg.operator import contract as c
from diffdisagg.operator.api.types import parse_spec
from diffdisagg.operator.render import Observed, make_owner, render
from diffdisagg.worker.pipelines import tiny_model_dir

NAME, NAMESPACE = "flux-tiny", "ml"
READY_TIMEOUT_S = 240.0  # four processes importing torch/diffusers on a shared 2-core machine
REQUEST_TIMEOUT_S = 120.0


def _load(name: str) -> ModuleType:
    key = f"diffdisagg_contract_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        assert spec is not None and spec.loader is not None
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


pods = _load("pods")


def gateway_address(children: list[dict[str, Any]]) -> tuple[str, int]:
    """(Service DNS name, port) of the gateway URL the workers get — checked against what render made:
    the gateway Service, whose port targets the port the gateway container listens on."""
    deps = {m["metadata"]["name"]: m for m in children if m["kind"] == "Deployment"}
    services = {m["metadata"]["name"]: m for m in children if m["kind"] == "Service"}
    gw = f"{NAME}-{c.ROLE_GATEWAY}"
    urls = {
        e["value"]
        for role in c.STAGE_ROLES
        for e in pods.only_container(deps[f"{NAME}-{role}"])["env"]
        if e["name"] == c.ENV_GATEWAY_URL
    }
    assert len(urls) == 1, urls
    url = urlsplit(urls.pop())
    assert url.scheme == "http" and url.path in ("", "/") and url.hostname == f"{gw}.{NAMESPACE}.svc", url
    svc_port = next(p for p in services[gw]["spec"]["ports"] if p["port"] == url.port)
    container_ports = {p["name"]: p["containerPort"] for p in pods.only_container(deps[gw])["ports"]}
    assert container_ports[svc_port["targetPort"]] == c.GATEWAY_HTTP_PORT
    return url.hostname, url.port


def run_rendered(tmp_path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Render `spec`; start the gateway and one worker per role from it, each in its own pod; serve one
    64x64 image through the OpenAI API. Returns the PNG, /v1/models and each process's log."""
    owner = make_owner(NAME, NAMESPACE, "uid-1", 1, parse_spec(spec))
    children = render(owner, Observed(new_token=secrets.token_hex(32)))
    deps = {m["metadata"]["name"]: m for m in children if m["kind"] == "Deployment"}
    gw_host, gw_port = gateway_address(children)
    gw = f"{NAME}-{c.ROLE_GATEWAY}"

    with pods.pod_network("ddc") as net:
        order = [gw] + [f"{NAME}-{r}" for r in c.STAGE_ROLES]
        started = {name: net.add_pod(name) for name in order}
        net.hosts[gw_host] = started[gw].ip  # cluster DNS: the Service forwards to the gateway pod
        for name in order:
            pods.start_rendered(net, started[name], deps[name], children, tmp_path / name)
        base = f"http://{started[gw].ip}:{gw_port}"
        pods.wait_until(
            net, lambda: pods.http("GET", base + c.PATH_READY)[0] == 200, READY_TIMEOUT_S, "gateway /ready"
        )

        from openai import OpenAI

        client = OpenAI(base_url=base + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
        img = client.images.generate(
            prompt="a red fox in the snow",
            size="64x64",  # type: ignore[arg-type]  # the tiny model's size; the API takes any WxH
            response_format="b64_json",
            extra_body={"seed": 7, "num_inference_steps": 2},
        )
        png = base64.b64decode(img.data[0].b64_json or "")
        pods.assert_png(png, (64, 64))
        models = [m.id for m in client.models.list().data]
        for pod in net.pods:
            assert pod.proc.poll() is None, f"{pod.name} died while serving:\n{pod.log_tail()}"
        return {
            "png": png,
            "models": models,
            "logs": {p.name: p.log_tail(400) for p in net.pods},
            "env": {p.name: p.env for p in net.pods},
        }


def test_rendered_gateway_and_workers_serve_an_image(tmp_path: Path) -> None:
    model = tiny_model_dir("flux")
    out = run_rendered(tmp_path, pods.tiny_cpu_spec(model))
    # the gateway names the model from the DIFFDISAGG_MODEL_PATH render gave it
    assert out["models"] == [model.name]
    # each worker's id comes from its pod's hostname, and it reached the gateway by the Service's name
    for role in c.STAGE_ROLES:
        log = out["logs"][f"{NAME}-{role}"]
        url = f"http://{NAME}-gateway.{NAMESPACE}.svc:8000"
        assert f"registered with {url} as {role}-{NAME}-{role}-" in log, log


def test_rendered_multi_device_denoise_pod_serves(tmp_path: Path) -> None:
    """`devicesPerPod: 2` on cpu: the denoise pod gets DIFFDISAGG_DEVICES_PER_POD=2 and its in-memory
    /dev/shm volume; the worker starts its second rank itself (gloo over the pod's loopback,
    docs/multi-device.md) and the request is served through both ranks."""
    model = tiny_model_dir("flux")
    out = run_rendered(tmp_path, pods.tiny_cpu_spec(model, devices_per_pod=2))
    assert out["models"] == [model.name]
    assert (tmp_path / f"{NAME}-denoise" / "volumes" / "dshm").is_dir()
    assert out["env"][f"{NAME}-denoise"][c.ENV_DEVICES_PER_POD] == "2"
    assert out["env"][f"{NAME}-prefill"][c.ENV_DEVICES_PER_POD] == "1"
    # the denoise worker ran as two ranks (it spawned rank 1 itself) and served through both
    denoise_log = out["logs"][f"{NAME}-denoise"]
    assert "started rank 1" in denoise_log and "rank 0 leading 2 ranks" in denoise_log, denoise_log
