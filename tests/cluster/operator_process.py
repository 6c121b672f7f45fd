"""The operator as a real local process against the test plane, and the CRDs it needs.

One runner for every cluster test that needs an operator: `NamespaceOperator` (the plane and autoscaling
tests: `python -m diffdisagg.operator -n <namespace>` with the plane's admin kubeconfig) and the chart tests'
`LocalOperator` (tests/cluster/chart_operator.py: the chart's own command under its ServiceAccount) differ
only in the command they run; starting, the liveness wait, stopping and the log are shared here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.cluster.plane import Plane
from tests.cluster.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def install_crds(plane: Plane) -> None:
    """Apply the committed CRDs (server-side, like users do) and wait until they serve."""
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    for crd in ("diffusiondisaggdeployments.diffdisagg.io", "diffusionrolescalers.diffdisagg.io"):
        plane.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")


class OperatorProcess:
    """An operator process with its liveness endpoint on a fresh loopback port at every start; its output
    goes to `log_path` (appended across restarts) for assertions. Subclasses say what to run."""

    def __init__(self, log_path: Path, cwd: Path = ROOT) -> None:
        self.log_path, self.cwd = log_path, cwd
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, port: int) -> tuple[list[str], dict[str, str]]:
        """argv and environment of the process, serving liveness on 127.0.0.1:`port`."""
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> OperatorProcess:
        self.port = free_port()
        argv, env = self.command(self.port)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.cwd
            )
        proc = self.proc
        wait_for(
            lambda: proc.poll() is not None or self.healthy(),
            timeout,
            interval=0.2,
            message=f"operator liveness on :{self.port} ({self.log_path})",
        )
        assert proc.poll() is None, f"operator exited {proc.returncode}:\n{self.log()[-3000:]}"
        return self

    def healthy(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
            return r.status == 200

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    close = stop

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class NamespaceOperator(OperatorProcess):
    """`python -m diffdisagg.operator -n <namespace>` with the plane's admin credentials."""

    def __init__(self, plane: Plane, namespace: str, log_path: Path) -> None:
        super().__init__(log_path)
        self.plane, self.namespace = plane, namespace

    def command(self, port: int) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, **self.plane.env()}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "operator" / "src"), env.get("PYTHONPATH", "")])
        argv = [
            sys.executable, "-m", "diffdisagg.operator", "-n", self.namespace,
            "--liveness-host", "127.0.0.1", "--liveness-port", str(port), "--resync-seconds", "30",
        ]  # fmt: skip
        return argv, env

    def reconciles(self, name: str) -> int:
        return self.log().count(f"reconciled {self.namespace}/{name} ")
