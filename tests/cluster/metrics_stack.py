"""The autoscaling metrics path of the cluster tier: Prometheus → prometheus-adapter → external metrics API.

What a user deploys next to the operator, run here as local processes against the test plane:

- `Prometheus`: Debian's `prometheus` binary (scripts/metrics/install.sh) with a generated config (1 s scrape
  interval, storage in a temporary directory). It runs in the host network namespace, scrapes targets on
  127.0.0.1, and listens on the host end of the plane's veth pair (`plane.host_ip`) so that the adapter inside
  the plane's namespace can query it. Each target carries a static `namespace` label: what a Kubernetes
  service-discovery scrape (ServiceMonitor / pod SD relabeling) attaches to a gateway pod's series.
- `MetricsAdapter`: prometheus-adapter (scripts/metrics/build-adapter.sh) serving
  `external.metrics.k8s.io/v1beta1` with the rules of docs/autoscaling/prometheus-adapter-rules.yaml. It runs
  inside the plane's network namespace on `plane.netns_ip` (EndpointSlices refuse loopback addresses), with a
  serving cert from the plane CA, its own client identity and the least-privilege RBAC the chart ships, and
  is registered by an APIService + a selector-less Service + an EndpointSlice pointing at that address.
  `close()` deletes the APIService first: an unavailable aggregated API blocks namespace deletion.
- `QueueDepthExporter`: a tiny real HTTP server exporting `diffdisagg_queue_depth{deployment,role}` with
  values the caller sets, or failing its scrapes: the loop without workers (the lost-metric test).
- `NamedLocalDeployment`: the serving launcher's local gateway + workers labelled with the
  DiffusionDisaggDeployment's name (the operator process and the CRDs come from operator_process.py).
- `AutoscaleLoop`: all of the above in dependency order (the test's fixture and the benchmark use it), with
  `ReplicaWatch` (a kubectl watch on the scalers), `DepthSampler` (the gateway's own queue depth) and
  `RequestBurst` (real requests through the gateway) to observe it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from diffdisagg.worker.launcher import LocalDeployment, Proc
from tests.cluster.operator_process import NamespaceOperator, free_port, install_crds
from tests.cluster.plane import Plane, issue_cert
from tests.cluster.waiting import WaitTimeout, wait_for

log = logging.getLogger("diffdisagg.metrics_stack")

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "metrics" / "install.sh"
BUILD_ADAPTER_SCRIPT = REPO_ROOT / "scripts" / "metrics" / "build-adapter.sh"
ADAPTER_RULES = REPO_ROOT / "docs" / "autoscaling" / "prometheus-adapter-rules.yaml"

QUEUE_DEPTH = "diffdisagg_queue_depth"
EXTERNAL_GROUP = "external.metrics.k8s.io"
EXTERNAL_VERSION = "v1beta1"
APISERVICE_NAME = f"{EXTERNAL_VERSION}.{EXTERNAL_GROUP}"
ADAPTER_SERVICE = "prometheus-adapter"
ADAPTER_USER = "diffdisagg-metrics-adapter"
STOP_GRACE_S = 5.0


class MetricsStackError(RuntimeError):
    """A part of the metrics path could not be installed, built, started or registered."""


def _script_output(script: Path, timeout: float) -> str:
    """Run an install/build script; its last stdout line is the path it produced."""
    proc = subprocess.run(
        ["bash", str(script)], stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if proc.returncode != 0 or not proc.stdout.strip():
        raise MetricsStackError(f"{script} exited {proc.returncode}")
    return proc.stdout.strip().splitlines()[-1]


def prometheus_binary() -> Path:
    """Debian's prometheus, installed by scripts/metrics/install.sh when missing."""
    found = shutil.which("prometheus")
    if found:
        return Path(found)
    return Path(_script_output(INSTALL_SCRIPT, timeout=600))


def adapter_binary() -> Path:
    """prometheus-adapter from the cache, built by scripts/metrics/build-adapter.sh when missing."""
    return Path(_script_output(BUILD_ADAPTER_SCRIPT, timeout=3600))


def _stop(proc: subprocess.Popen[Any] | None, label: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM: SIGKILL", label, proc.pid)
        proc.kill()
        proc.wait(10)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------- Prometheus


@dataclass(frozen=True)
class ScrapeTarget:
    """One static scrape target; `labels` are attached to every series it exports."""

    job: str
    address: str  # host:port
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_path: str = "/metrics"


def prometheus_config(targets: Sequence[ScrapeTarget], scrape_interval_s: float) -> dict[str, Any]:
    interval = f"{int(scrape_interval_s * 1000)}ms"
    jobs: dict[str, dict[str, Any]] = {}
    for t in targets:
        job = jobs.setdefault(
            t.job, {"job_name": t.job, "metrics_path": t.metrics_path, "static_configs": []}
        )
        job["static_configs"].append({"targets": [t.address], "labels": dict(t.labels)})
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": list(jobs.values()),
    }


class Prometheus:
    """A Prometheus server of our own: generated config, temporary storage, stopped by PID."""

    def __init__(
        self, targets: Sequence[ScrapeTarget], listen_host: str = "127.0.0.1", scrape_interval_s: float = 1.0
    ) -> None:
        self.binary = prometheus_binary()
        self.listen_host = listen_host
        self.scrape_interval_s = scrape_interval_s
        self.workdir = Path(tempfile.mkdtemp(prefix="diffdisagg-prometheus-"))
        self.config_path = self.workdir / "prometheus.yml"
        self.log_path = self.workdir / "prometheus.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config(targets)

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    def write_config(self, targets: Sequence[ScrapeTarget]) -> None:
        # JSON is YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(prometheus_config(targets, self.scrape_interval_s), indent=1))

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.port = free_port(self.listen_host)
        argv = [
            str(self.binary), f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}", "--storage.tsdb.retention.time=1h",
            f"--web.listen-address={self.listen_host}:{self.port}",
            # reload after targets change (POST /-/reload), as an operator would with a ConfigMap reloader
            "--web.enable-lifecycle", "--log.level=warn",
        ]  # fmt: skip
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise MetricsStackError(f"prometheus exited {self.proc.returncode}:\n{_tail(self.log_path)}")
            return self._get("/-/ready")[0] == 200

        wait_for(ready, timeout, 0.1, "prometheus /-/ready")
        return self

    def reload(self, targets: Sequence[ScrapeTarget]) -> None:
        self.write_config(targets)
        status, body = self._request("POST", "/-/reload")
        if status != 200:
            raise MetricsStackError(f"prometheus reload answered {status}: {body}")

    def _request(self, method: str, path: str, timeout: float = 3.0) -> tuple[int, str]:
        conn = http.client.HTTPConnection(self.listen_host, self.port, timeout=timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        except OSError:
            return 0, ""
        finally:
            conn.close()

    def _get(self, path: str) -> tuple[int, str]:
        return self._request("GET", path)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (`[{metric: {...}, value: [t, "v"]}, ...]`)."""
        status, body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if status != 200:
            raise MetricsStackError(f"prometheus query {expr!r} answered {status}: {body[:300]}")
        return list(json.loads(body)["data"]["result"])

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, None when it returns nothing."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def targets_up(self) -> bool:
        status, body = self._get("/api/v1/targets")
        if status != 200:
            return False
        active = json.loads(body)["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def close(self) -> None:
        _stop(self.proc, "prometheus")
        shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- adapter


def adapter_rbac(namespace: str, suffix: str) -> list[dict[str, Any]]:
    """What the adapter's identity needs (the chart's RBAC): delegated authn/authz, read-only lists."""
    subject = {"kind": "User", "name": ADAPTER_USER, "apiGroup": "rbac.authorization.k8s.io"}
    name = f"diffdisagg-metrics-adapter-{suffix}"
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
            # namespaces: the rules map the `namespace` label to the namespace resource
            "rules": [{"apiGroups": [""], "resources": ["namespaces", "pods", "services"],
                       "verbs": ["get", "list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [subject],
        },
        {
            # TokenReviews + SubjectAccessReviews: the adapter asks the apiserver whether the HPA controller
            # may read the metric it asks for.
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{name}-auth-delegator"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:auth-delegator"},
            "subjects": [subject],
        },
        {
            # the front-proxy CA and allowed names live in kube-system/extension-apiserver-authentication
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": f"{name}-auth-reader", "namespace": "kube-system"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": "extension-apiserver-authentication-reader"},
            "subjects": [subject],
        },
    ]  # fmt: skip


def adapter_registration(namespace: str, ip: str, port: int, ca_bundle: bytes) -> list[dict[str, Any]]:
    """Service (no selector) + EndpointSlice at `ip:port` + the APIService of the external metrics API."""
    return [
        {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": ADAPTER_SERVICE, "namespace": namespace},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{ADAPTER_SERVICE}-local", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": ADAPTER_SERVICE,
                                    "endpointslice.kubernetes.io/managed-by": "diffdisagg-tests"}},
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
            "metadata": {"name": APISERVICE_NAME},
            "spec": {
                "group": EXTERNAL_GROUP, "version": EXTERNAL_VERSION,
                "groupPriorityMinimum": 100, "versionPriority": 100,
                "service": {"name": ADAPTER_SERVICE, "namespace": namespace, "port": 443},
                # the aggregator verifies the adapter's cert for <service>.<namespace>.svc against this CA
                "caBundle": base64.b64encode(ca_bundle).decode(),
            },
        },
    ]  # fmt: skip


def _kubeconfig(path: Path, server: str, ca: Path, crt: Path, key: Path) -> None:
    doc = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "plane", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": ADAPTER_USER, "user": {"client-certificate": str(crt), "client-key": str(key)}}],
        "contexts": [{"name": "plane", "context": {"cluster": "plane", "user": ADAPTER_USER}}],
        "current-context": "plane",
    }  # fmt: skip
    path.write_text(json.dumps(doc, indent=1))
    path.chmod(0o600)


class MetricsAdapter:
    """prometheus-adapter inside the plane's network namespace, registered as the external metrics API."""

    def __init__(
        self, plane: Plane, namespace: str, prometheus_url: str, relist_interval_s: float = 2.0,
        rules: Path = ADAPTER_RULES,
    ) -> None:  # fmt: skip
        self.binary = adapter_binary()
        self.plane = plane
        self.namespace = namespace
        self.prometheus_url = prometheus_url
        self.relist_interval_s = relist_interval_s
        self.rules = rules
        self.workdir = Path(tempfile.mkdtemp(prefix="diffdisagg-adapter-"))
        self.log_path = self.workdir / "adapter.log"
        self.suffix = namespace[-40:]
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._applied: list[dict[str, Any]] = []

    def start(self, timeout: float = 60.0) -> MetricsAdapter:
        plane, ns = self.plane, self.namespace
        pki = self.workdir / "pki"
        pki.mkdir()
        # The plane CA signs our serving cert (the APIService's caBundle) and our client identity.
        for name in ("ca.crt", "ca.key"):
            shutil.copy(plane.pki / name, pki / name)
        serving_crt, serving_key = issue_cert(
            # CN is capped at 64 bytes; names are checked against the SANs anyway
            pki, "serving", f"/CN={ADAPTER_SERVICE}", "ca", "server",
            [f"DNS:{ADAPTER_SERVICE}.{ns}.svc", f"DNS:{ADAPTER_SERVICE}.{ns}.svc.cluster.local",
             f"IP:{plane.netns_ip}"],
        )  # fmt: skip
        client_crt, client_key = issue_cert(pki, "client", f"/CN={ADAPTER_USER}", "ca", "client")
        (pki / "ca.key").unlink()
        kubeconfig = self.workdir / "adapter.kubeconfig"
        _kubeconfig(kubeconfig, plane.server, pki / "ca.crt", client_crt, client_key)
        self._apply(adapter_rbac(ns, self.suffix))

        # The port is picked inside the namespace, where the adapter binds.
        pick = f"import socket; s=socket.socket(); s.bind(({plane.netns_ip!r}, 0)); print(s.getsockname()[1])"
        self.port = int(
            subprocess.run(
                ["ip", "netns", "exec", plane.netns, sys.executable, "-c", pick],
                capture_output=True, text=True, check=True, timeout=10,
            ).stdout.strip()
        )  # fmt: skip
        relist = f"{int(self.relist_interval_s * 1000)}ms"
        argv = [
            str(self.binary), f"--config={self.rules}", f"--prometheus-url={self.prometheus_url}",
            f"--bind-address={plane.netns_ip}", f"--secure-port={self.port}",
            f"--tls-cert-file={serving_crt}", f"--tls-private-key-file={serving_key}",
            f"--lister-kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            # how often the adapter re-lists series to learn which metrics exist (upstream's manifests: 1m)
            f"--metrics-relist-interval={relist}",
            "--v=1",
        ]  # fmt: skip
        with open(self.log_path, "ab") as out:
            self.proc = plane.netns_popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise MetricsStackError(
                    f"prometheus-adapter exited {self.proc.returncode}:\n{_tail(self.log_path)}"
                )
            return self._netns_get_status("/readyz", ctx) == 200

        try:
            wait_for(healthy, timeout, 0.2, "prometheus-adapter /readyz")
            self._apply(adapter_registration(ns, plane.netns_ip, self.port, (pki / "ca.crt").read_bytes()))
            wait_for(self.available, timeout, 0.2, f"APIService {APISERVICE_NAME} Available")
        except WaitTimeout as exc:
            raise MetricsStackError(f"{exc}\n--- adapter log\n{_tail(self.log_path)}") from exc
        return self

    def _netns_get_status(self, path: str, ctx: ssl.SSLContext) -> int:
        # The adapter's address lives in the plane's namespace; the host reaches it over the veth pair.
        conn = http.client.HTTPSConnection(self.plane.netns_ip, self.port, context=ctx, timeout=2.0)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        except (OSError, ssl.SSLError, http.client.HTTPException):
            return 0
        finally:
            conn.close()

    def _apply(self, docs: list[dict[str, Any]]) -> None:
        doc = {"apiVersion": "v1", "kind": "List", "items": docs}
        self.plane.kubectl("apply", "-f", "-", input=json.dumps(doc))
        self._applied.extend(docs)

    def available(self) -> bool:
        doc = self.plane.kubectl_json("get", "apiservice", APISERVICE_NAME)
        conditions = doc.get("status", {}).get("conditions", [])
        return any(c["type"] == "Available" and c["status"] == "True" for c in conditions)

    def external_metric(
        self, namespace: str, metric: str, selector: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        """GET the external metric through the apiserver, as the HPA controller does; the `items` list."""
        sel = ",".join(f"{k}={v}" for k, v in selector.items())
        path = (
            f"/apis/{EXTERNAL_GROUP}/{EXTERNAL_VERSION}/namespaces/{namespace}/{metric}?"
            + urllib.parse.urlencode({"labelSelector": sel})
        )
        return list(json.loads(self.plane.kubectl("get", "--raw", path).stdout)["items"])

    def close(self) -> None:
        # APIService first: while it points at a dead server, discovery of its group fails, and the namespace
        # controller refuses to finish deleting any namespace.
        for doc in reversed(self._applied):
            kind, meta = doc["kind"], doc["metadata"]
            group = doc["apiVersion"].rpartition("/")[0]
            resource = f"{kind.lower()}.{group}" if group else kind.lower()
            args = ["delete", resource, meta["name"], "--ignore-not-found", "--wait=false"]
            if "namespace" in meta:
                args += ["-n", meta["namespace"]]
            with contextlib.suppress(Exception):
                self.plane.kubectl(*args, check=False, timeout=20)
        self._applied.clear()
        _stop(self.proc, "prometheus-adapter")
        shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- exporter


class QueueDepthExporter:
    """A real HTTP server on 127.0.0.1 exporting `diffdisagg_queue_depth{deployment,role}` = caller's values.

    Stands in for the gateway where the test needs to set the queue depth itself, or to make the gateway
    vanish (`failing = True`: every scrape answers 503); the end-to-end test scrapes the real gateway.
    """

    def __init__(self, deployment: str, roles: Sequence[str] = ("prefill", "denoise", "decode")) -> None:
        self.deployment = deployment
        self.failing = False
        self._values = dict.fromkeys(roles, 0.0)
        self._lock = threading.Lock()
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                if exporter.failing:
                    # what Prometheus sees when the gateway is gone: a failed scrape, so the series go stale
                    self.send_error(503)
                    return
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="depth-exporter", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, role: str, value: float) -> None:
        with self._lock:
            self._values[role] = float(value)

    def render(self) -> str:
        with self._lock:
            values = dict(self._values)
        lines = [f"# HELP {QUEUE_DEPTH} Requests whose next stage is the role and that have not started it",
                 f"# TYPE {QUEUE_DEPTH} gauge"]  # fmt: skip
        dep = self.deployment
        lines += [f'{QUEUE_DEPTH}{{deployment="{dep}",role="{r}"}} {v}' for r, v in values.items()]
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


# ------------------------------------------------------------------------------------------ rest of the loop


@dataclass
class NamedLocalDeployment(LocalDeployment):
    """The serving launcher's local deployment, with its gateway and workers labelled `deployment`.

    Their metrics then carry `deployment=<the DiffusionDisaggDeployment's name>`, which is how the local
    workers stand in for the kwok pods of that deployment. (LocalDeployment always passes
    `--deployment local`; the value is rewritten on the way out rather than copying the launcher.)
    """

    deployment: str = "local"

    def _spawn(self, name: str, role: str, args: list[str], env: dict[str, str]) -> Proc:
        args = list(args)
        for i, arg in enumerate(args[:-1]):
            if arg == "--deployment":
                args[i + 1] = self.deployment
        return super()._spawn(name, role, args, env)


# -------------------------------------------------------------------------------------- observing the loop


def gateway_depths(url: str, deployment: str) -> dict[str, float]:
    """The gateway's own `diffdisagg_queue_depth` per role (the source of truth Prometheus scrapes)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == QUEUE_DEPTH and s.labels.get("deployment") == deployment:
                out[s.labels["role"]] = s.value
    return out


@dataclass
class DepthSampler:
    """Polls the gateway's queue depth in a thread; keeps `(monotonic t, {role: depth})` samples."""

    url: str
    deployment: str
    interval_s: float = 0.1
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> DepthSampler:
        def run() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(OSError):
                    self.samples.append((time.monotonic(), gateway_depths(self.url, self.deployment)))
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=run, name="depth-sampler", daemon=True)
        self._thread.start()
        return self

    def first_at_or_above(self, role: str, depth: float, since: float = 0.0) -> float | None:
        return next((t for t, d in self.samples if t >= since and d.get(role, 0) >= depth), None)

    def peak(self, role: str, since: float = 0.0) -> float:
        return max((d.get(role, 0.0) for t, d in self.samples if t >= since), default=0.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


class ReplicaWatch:
    """`kubectl get drs --watch`: every change of the scalers' spec.replicas with the instant it was seen.

    A watch sees each write as it happens (no polling gaps), so the timeline is what the apiserver stored.
    """

    def __init__(self, plane: Plane, namespace: str, selector: str) -> None:
        self.events: list[tuple[float, str, int]] = []
        self._cond = threading.Condition()
        argv = [
            str(plane.kubectl_path), f"--kubeconfig={plane.kubeconfig}", "get", "drs", "-n", namespace,
            "-l", selector, "--watch", "-o", 'jsonpath={.metadata.name} {.spec.replicas}{"\\n"}',
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True
        )
        self._thread = threading.Thread(target=self._read, name="drs-watch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                continue
            with self._cond:
                self.events.append((time.monotonic(), parts[0], int(parts[1])))
                self._cond.notify_all()

    def timeline(self, name: str) -> list[tuple[float, int]]:
        """(t, replicas) at each change, starting with the first value seen."""
        with self._cond:
            out: list[tuple[float, int]] = []
            for t, n, r in self.events:
                if n == name and (not out or out[-1][1] != r):
                    out.append((t, r))
            return out

    def current(self, name: str) -> int | None:
        line = self.timeline(name)
        return line[-1][1] if line else None

    def wait(
        self, name: str, predicate: Callable[[int], bool], timeout: float, message: str
    ) -> tuple[float, int]:
        """The first (t, replicas) of `name` that satisfies `predicate`: the value current at the call, or
        the first later change that does (a value that comes and goes between two wake-ups is not missed)."""
        since = time.monotonic()
        deadline = since + timeout
        with self._cond:
            while True:
                line = self.timeline(name)
                before = [e for e in line if e[0] < since][-1:]
                for entry in before + [e for e in line if e[0] >= since]:
                    if predicate(entry[1]):
                        return entry
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"timed out after {timeout:g} s waiting for {message} ({line})")
                if self.proc.poll() is not None:
                    raise MetricsStackError(f"kubectl watch exited {self.proc.returncode}")
                self._cond.wait(min(left, 1.0))

    def close(self) -> None:
        _stop(self.proc, "kubectl watch")
        self._thread.join(5)


def post_image(url: str, i: int, timeout: float) -> int:
    """One real generation request through the gateway; the HTTP status (-1: no answer)."""
    body = json.dumps({"prompt": f"autoscale {i}", "seed": i, "num_inference_steps": 2}).encode()
    req = urllib.request.Request(
        url + "/v1/images/generations", data=body, method="POST", headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return -1


class RequestBurst:
    """`n` real requests, one thread each, arriving `gap_s` apart (paced: the fast prefill pool keeps up)."""

    def __init__(self, url: str, n: int, gap_s: float, timeout_s: float) -> None:
        self.statuses: list[int] = []
        self.threads: list[threading.Thread] = []
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        for i in range(n):
            th = threading.Thread(target=lambda i=i: self.statuses.append(post_image(url, i, timeout_s)))
            th.daemon = True
            th.start()
            self.threads.append(th)
            time.sleep(gap_s)  # pacing the arrivals, not waiting for a condition

    def join(self) -> list[int]:
        deadline = time.monotonic() + self.timeout_s + 30
        for th in self.threads:
            th.join(max(0.1, deadline - time.monotonic()))
        return sorted(self.statuses)


# ------------------------------------------------------------------------------------------ the whole loop

KWOK_PLACEMENT = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
}


@dataclass(frozen=True)
class LoopSettings:
    """The knobs of one autoscaling run (same target and bounds for prefill and denoise)."""

    name: str = "flux-as"
    denoise_delay_s: float = 1.5
    target_per_replica: float = 2
    max_replicas: int = 4
    scale_down_window_s: int = 10
    relist_interval_s: float = 2.0

    def autoscaling(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "minReplicas": 1,
            "maxReplicas": self.max_replicas,
            "targetQueueDepthPerReplica": self.target_per_replica,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": self.scale_down_window_s}},
        }

    def ddd(self) -> dict[str, Any]:
        """A CPU DiffusionDisaggDeployment on the kwok nodes; prefill and denoise autoscaled, decode fixed."""
        return {
            "apiVersion": "diffdisagg.io/v1alpha1",
            "kind": "DiffusionDisaggDeployment",
            "metadata": {"name": self.name},
            "spec": {
                "model": {"family": "flux", "path": "/models/tiny-flux"},
                "accelerator": {"vendor": "cpu", **KWOK_PLACEMENT},
                "gateway": {"image": "gw:1", "podTemplate": {"tolerations": KWOK_PLACEMENT["tolerations"]}},
                "roles": {
                    "prefill": {"image": "worker:1", "autoscaling": self.autoscaling()},
                    "denoise": {"image": "worker:1", "autoscaling": self.autoscaling()},
                    "decode": {"image": "worker:1", "replicas": 1},
                },
            },
        }


class AutoscaleLoop:
    """Everything of the loop, started in dependency order and stopped in reverse by `close()`:
    CRDs, operator, the DDD, the local gateway + workers (labelled with the DDD's name), Prometheus scraping
    the gateway, the adapter behind the APIService, and a watch on the scalers."""

    def __init__(
        self, plane: Plane, namespace: str, workdir: Path, settings: LoopSettings, workers: bool = True
    ) -> None:
        """`workers=False`: a `QueueDepthExporter` stands in for the gateway (no workers, no requests)."""
        self.plane, self.namespace, self.workdir, self.settings = plane, namespace, workdir, settings
        self.workers = workers
        self._parts: list[Any] = []
        self.timings: dict[str, float] = {}

    def start(self, ready_timeout_s: float = 180.0) -> AutoscaleLoop:
        plane, ns, s = self.plane, self.namespace, self.settings
        t0 = time.monotonic()
        try:
            # The workers first: their start-up (torch, the tiny model) is the slowest part, and it overlaps
            # with everything else.
            if self.workers:
                self.local = self._keep(
                    NamedLocalDeployment(
                        family="flux",
                        counts={"prefill": 1, "denoise": 1, "decode": 1},
                        stage_delay_s={"denoise": s.denoise_delay_s},
                        capacity=2,
                        max_batch_size=1,
                        deployment=s.name,
                        workdir=self.workdir / "local",
                    ).start()
                )
                scraped = f"127.0.0.1:{self.local.port}"
            else:
                self.exporter = self._keep(QueueDepthExporter(s.name))
                scraped = self.exporter.address
            install_crds(plane)
            self.operator = self._keep(NamespaceOperator(plane, ns, self.workdir / "operator.log").start())
            plane.apply(json.dumps(s.ddd()), ns)
            # Prometheus on the host end of the veth pair: the adapter, in the plane's namespace, reaches it.
            target = ScrapeTarget("diffdisagg-gateway", scraped, {"namespace": ns})
            self.prometheus = self._keep(Prometheus([target], listen_host=plane.host_ip).start())
            self.adapter = self._keep(
                MetricsAdapter(plane, ns, self.prometheus.url, relist_interval_s=s.relist_interval_s).start()
            )
            self.watch = self._keep(ReplicaWatch(plane, ns, f"diffdisagg.io/deployment={s.name}"))
            self.timings["infrastructure"] = time.monotonic() - t0
            if self.workers:
                self.local.wait_ready(timeout_s=ready_timeout_s)
                self.timings["workers ready"] = time.monotonic() - t0
        except BaseException:
            self.close()
            raise
        return self

    def _keep(self, part: Any) -> Any:
        self._parts.append(part)
        return part

    def scaler(self, role: str) -> str:
        return f"{self.settings.name}-{role}"

    def hpa_active(self, role: str) -> bool:
        """The HPA read its metric through the aggregated API (condition ScalingActive=True)."""
        return (self.hpa_condition(role, "ScalingActive") or ("",))[0] == "True"

    def hpa_condition(self, role: str, type_: str) -> tuple[str, str] | None:
        """(status, reason) of one of the role's HPA conditions."""
        hpa = self.plane.kubectl_json("get", "hpa", self.scaler(role), "-n", self.namespace)
        for c in hpa.get("status", {}).get("conditions") or []:
            if c["type"] == type_:
                return str(c["status"]), str(c.get("reason", ""))
        return None

    def depths(self) -> dict[str, float]:
        return gateway_depths(self.local.url, self.settings.name)

    def close(self) -> None:
        for part in reversed(self._parts):
            with contextlib.suppress(Exception):
                (getattr(part, "close", None) or part.stop)()
        self._parts.clear()
