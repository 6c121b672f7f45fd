"""Two revisions alive at once, as in the middle of a rolling update: they never work together.

The operator renders the deployment twice, before and after an image update of one role (which, by
design, changes the deployment-wide revision and so rolls every role and the gateway). Then, in pods
started from exactly those renders (`pods.py`):

1. the new gateway and only **old** workers, all registered and live: a request is not served (the
   gateway never hands work to another revision, even when that is all it has);
2. new workers join, the old ones stay alive: an old-revision sender's hand-over to a new-revision
   worker is refused with RevisionMismatchError and leaves no slot behind; the sender, still holding
   its tensors, hands them to a same-revision receiver; and requests are served — by the new revision.
"""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import importlib.util
import secrets
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from diffdisagg.operator import contract as c
from diffdisagg.operator.api.types import parse_spec
from diffdisagg.operator.render import Observed, make_owner, render
from diffdisagg.transport.backends import make_backend
from diffdisagg.transport.buffer import StagingBuffer
from diffdisagg.transport.errors import RevisionMismatchError
from diffdisagg.transport.handover import (
    HandoverReceiver,
    HandoverSender,
    Peer,
    ReceiverConfig,
    SenderConfig,
    register_buffer,
)
from diffdisagg.transport.manager import TransferManager
from diffdisagg.transport.platforms import current_platform
from diffdisagg.worker.pipelines import tiny_model_dir

NAME, NAMESPACE = "flux-tiny", "ml"
READY_TIMEOUT_S = 240.0
REQUEST = {"prompt": "a lighthouse at dusk", "size": "64x64", "seed": 3, "num_inference_steps": 2}


def _load(name: str) -> ModuleType:
    key = f"diffdisagg_contract_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        assert spec is not None and spec.loader is not None
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


pods = _load("pods")


def _render(spec: dict[str, Any], token: str) -> tuple[str, dict[str, dict[str, Any]], list[dict[str, Any]]]:
    owner = make_owner(NAME, NAMESPACE, "uid-1", 1, parse_spec(spec))
    children = render(owner, Observed(new_token=token))
    return owner.revision, {m["metadata"]["name"]: m for m in children if m["kind"] == "Deployment"}, children


def _env(dep: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pods.only_container(dep)["env"] if "value" in e}


def _generate(base: str, timeout_s: float | None = None) -> tuple[int, Any]:
    body = dict(REQUEST, response_format="b64_json")
    if timeout_s is not None:
        body["timeout"] = timeout_s
    return pods.http("POST", base + "/v1/images/generations", body, timeout=(timeout_s or 120) + 30)


def _sender_rig(token: bytes, revision: str, host: str) -> tuple[HandoverSender, TransferManager, Any]:
    platform = current_platform()
    buf = StagingBuffer(4 << 20, platform)
    backend = make_backend("tcp", token=token, host=host, port=0, advertise_host=host)
    register_buffer(backend, buf)
    return (
        HandoverSender(backend, SenderConfig(token, revision, name="old-sender")),
        TransferManager(platform, buf),
        backend,
    )


def test_old_and_new_revision_never_pair(tmp_path: Path) -> None:
    token = secrets.token_hex(32)
    model = tiny_model_dir("flux")
    old_spec = pods.tiny_cpu_spec(model)
    new_spec = copy.deepcopy(old_spec)
    new_spec["roles"]["denoise"]["image"] = "diffdisagg/worker-cpu:0.1.1"
    old_rev, old_deps, old_children = _render(old_spec, token)
    new_rev, new_deps, new_children = _render(new_spec, token)
    assert old_rev != new_rev
    # one role's image changed, every role and the gateway carry the new revision
    for name, dep in new_deps.items():
        assert _env(dep)[c.ENV_REVISION] == new_rev, name
    gw = f"{NAME}-{c.ROLE_GATEWAY}"

    with pods.pod_network("ddr") as net:
        gw_pod = net.add_pod(gw)
        net.hosts[f"{gw}.{NAMESPACE}.svc"] = gw_pod.ip
        base = f"http://{gw_pod.ip}:{c.GATEWAY_HTTP_PORT}"
        pods.start_rendered(net, gw_pod, new_deps[gw], new_children, tmp_path / "gateway")
        old_pods = {}
        for role in c.STAGE_ROLES:
            pod = net.add_pod(f"old-{role}")
            pods.start_rendered(net, pod, old_deps[f"{NAME}-{role}"], old_children, tmp_path / f"old-{role}")
            old_pods[role] = pod
        ones = {r: 1 for r in c.STAGE_ROLES}
        pods.wait_until(
            net, lambda: pods.live_workers(base, NAME) == ones, READY_TIMEOUT_S, "old workers registered"
        )

        # 1. a complete, live, idle pipeline of the old revision: the new gateway never uses it
        status, body = _generate(base, timeout_s=4)
        assert status in (503, 504), (status, body)
        assert pods.live_workers(base, NAME) == ones, "the old workers are alive and registered"

        new_pods = {}
        for role in c.STAGE_ROLES:
            pod = net.add_pod(f"new-{role}")
            pods.start_rendered(net, pod, new_deps[f"{NAME}-{role}"], new_children, tmp_path / f"new-{role}")
            new_pods[role] = pod
        twos = {r: 2 for r in c.STAGE_ROLES}
        pods.wait_until(
            net, lambda: pods.live_workers(base, NAME) == twos, READY_TIMEOUT_S, "new workers registered"
        )

        # 2a. an old-revision sender offers to the new denoise worker (its control port as rendered)
        tensors = {"latents": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}
        sender, manager, backend = _sender_rig(token.encode(), old_rev, net.address(1))
        same_rev_buf = StagingBuffer(4 << 20, current_platform())
        rx_backend = make_backend("tcp", token=token.encode(), host=net.address(1), port=0)
        register_buffer(rx_backend, same_rev_buf)
        same_rev = HandoverReceiver(
            same_rev_buf,
            rx_backend,
            ReceiverConfig(token.encode(), old_rev, host=net.address(1), port=0),
            TransferManager(current_platform(), same_rev_buf),
        ).start()
        try:
            with pytest.raises(RevisionMismatchError):
                sender.send(
                    Peer(new_pods["denoise"].ip, c.DEFAULT_CONTROL_PORT, "new-denoise"),
                    request_id="rolling-1",
                    tensors=tensors,
                    scalars={"seed": 3},
                    deadline=time.time() + 20,
                    manager=manager,
                )
            assert manager.buffer.allocator.live_slots == 0, "the refused sender freed its staging slot"
            # the sender still has the tensors: a receiver of its own revision takes them, bit for bit
            res = sender.send(
                Peer(*same_rev.address, "old-receiver"),
                request_id="rolling-1",
                tensors=tensors,
                scalars={"seed": 3},
                deadline=time.time() + 20,
                manager=manager,
            )
            assert res.nbytes > 0
            delivery = same_rev.receive(timeout=10)
            assert delivery is not None and delivery.request_id == "rolling-1"
            loaded = same_rev.load(delivery)
            assert torch.equal(loaded["latents"], tensors["latents"])
        finally:
            sender.close()
            same_rev.close()
            backend.close()
            rx_backend.close()
        assert same_rev_buf.allocator.live_slots == 0

        # 2b. with both revisions alive, requests are served (by the new revision: see 1.)
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            results = list(ex.map(lambda _: _generate(base), range(2)))
        for status, body in results:
            assert status == 200, body
            pods.assert_png(base64.b64decode(body["data"][0]["b64_json"]), (64, 64))
        # the refused offer left the new denoise worker whole: no slot held once the work is done
        new_denoise = f"denoise-new-denoise-{c.DEFAULT_CONTROL_PORT}"

        def slots_in_use() -> list[float]:
            return [
                v
                for labels, v in pods.samples(base, "diffdisagg_worker_load")
                if labels.get("worker") == new_denoise and labels.get("kind") == "slots_in_use"
            ]

        pods.wait_until(net, lambda: slots_in_use() == [0.0], 30, f"{new_denoise} to hold no slot")
        assert pods.live_workers(base, NAME) == twos
        for pod in [*old_pods.values(), *new_pods.values()]:
            assert pod.proc.poll() is None, f"{pod.name} died:\n{pod.log_tail()}"
        assert "revision" in new_pods["denoise"].log_tail(400).lower()
