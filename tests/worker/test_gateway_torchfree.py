"""The gateway imports and serves without torch (it ships in its own image without it).

Why a blocked import rather than a second virtual environment: a fresh venv would need a download at
test time (not allowed) or a second cached environment to keep in sync. Instead the subprocess installs
an import hook that makes `torch` — and the other heavy model packages — unimportable before anything of
ours is imported, then builds the app and serves requests through every code path a request touches
(registration, validation with the family limits, dispatch, metrics). Any import of them fails loudly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = ("torch", "diffusers", "transformers", "safetensors", "numpy", "PIL", "imageio", "mooncake")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"gateway must not import {name}")
            return None

    sys.meta_path.insert(0, Block())

    import json
    from fastapi.testclient import TestClient
    import diffdisagg.worker.gateway.server  # the entry point and everything it imports
    from diffdisagg.worker.control import signing
    from diffdisagg.worker.gateway.app import create_app
    from diffdisagg.worker.gateway.config import GatewayConfig

    token = b"k" * 32
    with TestClient(create_app(GatewayConfig(token=token, family="sd3", model_name="m"))) as c:
        for i, role in enumerate(("prefill", "denoise", "decode")):
            body = json.dumps({"worker_id": f"w{i}", "role": role, "deployment": "local", "revision": "0",
                               "family": "sd3", "control_url": "", "handover": {},
                               "load": {"queued": 0, "inflight": 0, "held": 0, "free_slots": 1,
                                        "capacity": 1}}).encode()
            path = "/internal/v1/workers/register"
            r = c.post(path, content=body, headers={"content-type": "application/json",
                                                    **signing.sign(token, "POST", path, body)})
            assert r.status_code == 200, r.text
        assert c.get("/ready").status_code == 200
        r = c.post("/v1/images/generations", json={"prompt": "a", "size": "64x48"})
        assert r.status_code == 400 and "between 64" in r.json()["error"]["message"], r.text  # family limit
        r = c.post("/v1/images/generations", json={"prompt": "a", "guidance_scale": 25})
        assert r.status_code == 400, r.text
        assert "diffdisagg_queue_depth" in c.get("/metrics").text
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not heavy, heavy
    print("TORCH-FREE-OK")
    """
)


def test_gateway_imports_and_serves_without_torch() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}/transport/src:{ROOT}/worker/src"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH-FREE-OK" in proc.stdout
