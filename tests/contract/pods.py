"""Local stand-ins for what Kubernetes gives a pod, so a rendered container can run as a real process.

Loaded by file path (tests are not a package). What stands in for what, and why:

- **pod network** — `PodNetwork`: the test thread moves into a fresh network namespace (the "node"),
  with a bridge; every pod gets its own network namespace (`ip netns add`), joined to the bridge by a
  veth pair, with its own address. So each worker binds exactly the ports `render` wrote (8000, 8100,
  8200 in every pod, as in Kubernetes) and advertises its own pod IP, and nothing leaves the namespaces
  this module created (the subnet exists only inside them).
- **pod hostname** — each pod also gets its own UTS namespace whose hostname is the pod's name.
- **cluster DNS** — `/etc/netns/<pod>/hosts`, which `ip netns exec` mounts over `/etc/hosts` inside the
  pod: the gateway Service's name resolves to the gateway pod, so workers use the rendered gateway URL
  verbatim.
- **downward API** — `fieldRef: status.podIP` becomes the pod's address.
- **volumes** — Secret, ConfigMap and emptyDir volumes become directories under a tmp dir holding the
  rendered content (the Secret's `stringData`/`data` too); a hostPath is the host directory itself.
  Env values and arguments under a volume's mountPath are rewritten to that directory (a container
  would see the same files at the mountPath).
- **image** — the checkout's code on PYTHONPATH and the venv's `python` first on PATH stand in for what
  the image installs; the worker image's ENTRYPOINT is `images/entrypoint.sh` itself.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
WORKER_ENTRYPOINT = ROOT / "images" / "entrypoint.sh"  # the worker images' ENTRYPOINT
# Inside our own namespaces only (see the module docstring); 10.215/16 is not the test plane's 10.213/16.
SUBNET = "10.215.{index}.{host}"
PYTHONPATH = os.pathsep.join(str(ROOT / p / "src") for p in ("transport", "worker", "operator"))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Pod:
    name: str
    netns: str
    ip: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def log_tail(self, n: int = 60) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@dataclass
class PodNetwork:
    """A node with a bridge and one network namespace per pod. Use as a context manager."""

    prefix: str
    hosts: dict[str, str] = field(default_factory=dict)  # Service DNS name -> pod IP, for every pod
    pods: list[Pod] = field(default_factory=list)
    _index: int = 0
    _orig: int = -1
    _etc: list[Path] = field(default_factory=list)

    def __enter__(self) -> PodNetwork:
        self._index = os.getpid() % 250
        libc = ctypes.CDLL(None, use_errno=True)
        self._orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        if libc.unshare(CLONE_NEWNET) != 0:
            os.close(self._orig)
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed: the contract tier needs root")
        try:
            _ip("link", "set", "lo", "up")
            _ip("link", "add", "br0", "type", "bridge")
            _ip("addr", "add", self.address(1) + "/24", "dev", "br0")
            _ip("link", "set", "br0", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def address(self, host: int) -> str:
        return SUBNET.format(index=self._index, host=host)

    def add_pod(self, name: str) -> Pod:
        n = len(self.pods) + 2
        pod = Pod(name=name, netns=f"{self.prefix}-{os.getpid()}-{name}", ip=self.address(n))
        _ip("netns", "add", pod.netns)
        self.pods.append(pod)
        host_end = f"ddc{n}h"
        _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
        _ip("link", "set", host_end, "master", "br0", "up")
        _ip("-n", pod.netns, "addr", "add", pod.ip + "/24", "dev", "eth0")
        _ip("-n", pod.netns, "link", "set", "eth0", "up")
        _ip("-n", pod.netns, "link", "set", "lo", "up")
        return pod

    def start(self, pod: Pod, argv: list[str], env: dict[str, str], log: Path) -> None:
        """Run argv inside the pod; /etc/hosts there maps every Service name in `hosts` (cluster DNS)."""
        etc = Path("/etc/netns") / pod.netns
        etc.mkdir(parents=True, exist_ok=True)
        self._etc.append(etc)
        lines = ["127.0.0.1 localhost", f"{pod.ip} {pod.name}"]
        lines += [f"{ip} {name}" for name, ip in self.hosts.items()]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        pod.log, pod.env = log, dict(env)
        # its own UTS namespace too: the hostname is the pod's name, as in Kubernetes (workers derive
        # their id from it, so two pods of one role must not share the machine's hostname)
        uts = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', pod.name]
        with log.open("wb") as out:
            pod.proc = subprocess.Popen(
                ["ip", "netns", "exec", pod.netns, *uts, *argv],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop_all(self, timeout: float = 15.0) -> None:
        """As the kubelet does: SIGTERM to the container's main process only (every wrapper exec'd
        into it), SIGKILL to whatever is left of the pod after the grace period."""
        for pod in self.pods:
            if pod.proc is not None and pod.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pod.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for pod in self.pods:
            if pod.proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                pod.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.proc.pid, signal.SIGKILL)  # children (ranks) included
            pod.proc.wait(timeout=10)

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop_all()
        finally:
            for pod in self.pods:
                subprocess.run(["ip", "netns", "del", pod.netns], capture_output=True, timeout=30)
            for etc in self._etc:
                shutil.rmtree(etc, ignore_errors=True)
            with contextlib.suppress(OSError):
                Path("/etc/netns").rmdir()  # only if no one else's namespace config is left
            if self._orig >= 0:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.setns(self._orig, CLONE_NEWNET)
                os.close(self._orig)
                self._orig = -1


# --- rendered container -> local process -----------------------------------------------------------


def materialise_volumes(
    pod_spec: dict[str, Any], children: list[dict[str, Any]], root: Path
) -> dict[str, Path]:
    """Volume name -> a local directory with what the kubelet would mount (from the rendered children)."""
    by_kind = {(m["kind"], m["metadata"]["name"]): m for m in children}
    out: dict[str, Path] = {}
    for vol in pod_spec.get("volumes", []):
        name = vol["name"]
        target = root / name
        if "secret" in vol:
            secret = by_kind[("Secret", vol["secret"]["secretName"])]
            target.mkdir(parents=True)
            files = {k: v.encode() for k, v in (secret.get("stringData") or {}).items()}
            files.update({k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()})
            for key, data in files.items():
                (target / key).write_bytes(data)
                (target / key).chmod(vol["secret"].get("defaultMode", 0o644))
        elif "configMap" in vol:
            cm = by_kind[("ConfigMap", vol["configMap"]["name"])]
            target.mkdir(parents=True)
            for key, text in cm["data"].items():
                (target / key).write_text(text)
        elif "emptyDir" in vol:
            target.mkdir(parents=True)
        elif "hostPath" in vol:
            target = Path(vol["hostPath"]["path"])
            assert target.exists(), f"hostPath {target} of volume {name} does not exist"
        else:
            raise AssertionError(f"volume {name}: no local stand-in for {sorted(vol)}")
        out[name] = target
    return out


def _remap(value: str, mounts: dict[str, Path]) -> str:
    for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(local) + value[len(mount_path.rstrip("/")) :]
    return value


def container_process(
    container: dict[str, Any], volumes: dict[str, Path], pod_ip: str, entrypoint: list[str] | None
) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the process a container runs: its command (or the image's entrypoint) + args,
    and exactly its env, with the downward API and the mount paths resolved locally."""
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
    if "command" in container:
        argv = list(container["command"]) + list(container.get("args", []))
    else:
        assert entrypoint is not None, f"{container['name']}: no command and no image entrypoint given"
        assert container.get("args"), f"{container['name']}: neither command nor args: the image decides"
        argv = list(entrypoint) + list(container["args"])
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = _remap(e["value"], mounts)
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[e["name"]] = pod_ip
        else:
            raise AssertionError(f"env {e['name']}: no local stand-in for {e.get('valueFrom')}")
    argv = [_remap(a, mounts) for a in argv]
    return argv, env


def base_env(home: Path) -> dict[str, str]:
    """What the image provides besides the rendered env: python on PATH, our code, a home; nothing else
    from the test's environment (no DIFFDISAGG_* leaks in)."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        "PATH": os.pathsep.join([venv_bin, "/usr/local/bin", "/usr/bin", "/bin"]),
        "PYTHONPATH": PYTHONPATH,
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # the test machine has 2 cores for many processes
    }


@contextlib.contextmanager
def pod_network(prefix: str) -> Iterator[PodNetwork]:
    with PodNetwork(prefix) as net:
        yield net


# --- the pieces both contract tests share ------------------------------------------------------------


def tiny_cpu_spec(model_dir: Path, devices_per_pod: int = 1) -> dict[str, Any]:
    """A DiffusionDisaggDeployment spec like examples/ddd-*.yaml, for what runs here: cpu, the tcp
    backend, the tiny model of `model_dir` (its family is the directory name's prefix) on a hostPath."""
    return {
        "model": {
            "family": model_dir.name.split("-")[0],
            "path": f"/models/{model_dir.name}",
            "volume": {"mountPath": "/models", "hostPath": {"path": str(model_dir.parent)}},
        },
        "accelerator": {"vendor": "cpu", "devicesPerPod": devices_per_pod},
        "transfer": {"backend": "tcp", "bufferBytes": 16 << 20},
        "gateway": {"image": "diffdisagg/gateway:0.1.0"},
        "roles": {
            role: {"image": "diffdisagg/worker-cpu:0.1.0", "replicas": 1}
            for role in ("prefill", "denoise", "decode")
        },
    }


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def start_rendered(
    net: PodNetwork, pod: Pod, deployment: dict[str, Any], children: list[dict[str, Any]], workdir: Path
) -> None:
    """Start the rendered Deployment's container as a process in `pod` (the gateway's image has no
    entrypoint wrapper; the workers' is images/entrypoint.sh)."""
    container = only_container(deployment)
    volumes = materialise_volumes(deployment["spec"]["template"]["spec"], children, workdir / "volumes")
    entrypoint = None if "command" in container else ["bash", str(WORKER_ENTRYPOINT)]
    argv, env = container_process(container, volumes, pod.ip, entrypoint)
    home = workdir / "home"
    home.mkdir(parents=True)
    net.start(pod, argv, {**base_env(home), **env}, workdir / "process.log")


def http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_until(net: PodNetwork, predicate: Any, timeout: float, message: str) -> Any:
    """Poll `predicate` (exceptions = not yet) until truthy; fail at once when a pod's process exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        for pod in net.pods:
            code = pod.proc.poll() if pod.proc is not None else None
            assert code is None, f"{pod.name} exited with {code}:\n{pod.log_tail()}"
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as exc:  # not ready yet; quoted if the wait fails
            last = exc
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{p.log_tail(20)}" for p in net.pods)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last: {last!r})\n{logs}")


def samples(base_url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric `name` on the gateway's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [
        (dict(s.labels), s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    ]


def live_workers(base_url: str, deployment: str) -> dict[str, int]:
    """The gateway's diffdisagg_live_workers per role."""
    return {
        labels["role"]: int(v)
        for labels, v in samples(base_url, "diffdisagg_live_workers")
        if labels.get("deployment") == deployment
    }


def assert_png(png: bytes, size: tuple[int, int]) -> None:
    from PIL import Image

    assert png.startswith(b"\x89PNG\r\n\x1a\n"), png[:16]
    with Image.open(io.BytesIO(png)) as im:
        im.verify()
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == size, (im.format, im.size)
