"""The operator as the chart deploys it, run as a local process: the command, arguments and environment come
from the Deployment the chart installed, and the credentials are a token of the chart's ServiceAccount, so
every request it makes is authorized (and audited) exactly as in the cluster. kwok's pods run nothing, so this
is how the installed operator actually runs here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.cluster.operator_process import ROOT, OperatorProcess
from tests.cluster.plane import Plane


def sa_kubeconfig(plane: Plane, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as `namespace/service_account` with a bound token (TokenRequest)."""
    token = plane.kubectl("create", "token", service_account, "-n", namespace, "--duration=1h").stdout.strip()
    assert token.count(".") == 2, "kubectl create token did not print a JWT"
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "plane",
                "cluster": {"server": plane.server, "certificate-authority": str(plane.pki / "ca.crt")},
            }
        ],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [
            {"name": "sa", "context": {"cluster": "plane", "user": service_account, "namespace": namespace}}
        ],
        "current-context": "sa",
    }
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


def command_from_deployment(deployment: dict[str, Any], port: int) -> tuple[list[str], dict[str, str]]:
    """argv and env of the chart's operator container, for a local run: this interpreter instead of the
    image's `python`, and the liveness endpoint on a free loopback port instead of 0.0.0.0:<chart port>."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = list(container.get("command") or [])
    assert command[:1] == ["python"], command
    args = []
    for a in container.get("args") or []:
        if a.startswith("--liveness-host="):
            a = "--liveness-host=127.0.0.1"
        elif a.startswith("--liveness-port="):
            a = f"--liveness-port={port}"
        args.append(a)
    env = {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}
    return [sys.executable, *command[1:], *args], env


class LocalOperator(OperatorProcess):
    """`python -m diffdisagg.operator` with the chart's arguments and the ServiceAccount's kubeconfig."""

    def __init__(self, deployment: dict[str, Any], kubeconfig: Path, log_path: Path) -> None:
        super().__init__(log_path, cwd=Path("/"))
        self.deployment, self.kubeconfig = deployment, kubeconfig

    def command(self, port: int) -> tuple[list[str], dict[str, str]]:
        argv, chart_env = command_from_deployment(self.deployment, port)
        base = {
            k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "HELM_", "PYTHONPATH"))
        }
        # Only the operator's own sources: it must run without the worker or the transport (as in its image).
        env = {
            **base,
            **chart_env,
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONPATH": str(ROOT / "operator" / "src"),
        }
        return argv, env
