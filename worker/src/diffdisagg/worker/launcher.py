"""Local launcher (`make run`): the gateway and N workers per role as processes on this machine.

CPU and the family's tiny model by default (built on first use into the tiny-model cache), or a real
model directory with `--model-path`. Prints the URL, a ready-to-paste curl and an openai snippet, then
waits; Ctrl-C (or SIGTERM) stops every process it started. `LocalDeployment` is the same thing as a
library: the e2e tests and the serving benchmark start their deployments through it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from diffdisagg.worker import contract as c

logger = logging.getLogger(__name__)

#: Small defaults for the tiny models, so a bare request finishes in about a second on a laptop CPU.
TINY_DEFAULTS = {"size": "64x64", "steps": 4, "frames": 5}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    role: str
    popen: subprocess.Popen[bytes]
    log: Path
    args: list[str]

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class LocalDeployment:
    """A gateway and role workers as child processes, on loopback."""

    family: str = "flux"
    counts: dict[str, int] = field(default_factory=lambda: {r: 1 for r in c.STAGE_ROLES})
    model_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    heartbeat_interval_s: float = 1.0
    heartbeat_misses: int = 3
    request_timeout_s: float = 300.0
    stage_delay_s: dict[str, float] = field(default_factory=dict)
    capacity: int = 4
    max_batch_size: int = 4
    threads_per_worker: int = 1
    tiny_defaults: bool = True
    api_key: str | None = None
    workdir: Path | None = None
    extra_gateway_args: list[str] = field(default_factory=list)
    python: str = sys.executable
    procs: list[Proc] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Children import our code from where this file lives (a checkout: worker/src + transport/src).
        here = Path(__file__).resolve()
        src = [str(here.parents[2]), *(p for p in env.get("PYTHONPATH", "").split(":") if p)]
        transport = here.parents[4] / "transport" / "src"
        if transport.is_dir():
            src.append(str(transport))
        env["PYTHONPATH"] = ":".join(dict.fromkeys(src))
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("DIFFDISAGG_PLATFORM", "cpu")
        # Several workers share the cores: one BLAS/OpenMP thread each avoids oversubscription.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(self.threads_per_worker)
        return env

    def start(self) -> LocalDeployment:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="diffdisagg-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        token = self.workdir / "token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.token_file = token
        if self.port == 0:
            self.port = free_port(self.host)
        env = self._env()
        gw = [
            self.python,
            "-m",
            "diffdisagg.worker.gateway",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--family",
            self.family,
            "--token-file",
            str(token),
            "--deployment",
            "local",
            "--heartbeat-interval",
            str(self.heartbeat_interval_s),
            "--heartbeat-misses",
            str(self.heartbeat_misses),
            "--request-timeout",
            str(self.request_timeout_s),
        ]
        if self.tiny_defaults and not self.model_path:
            gw += [
                "--default-size",
                TINY_DEFAULTS["size"],
                "--default-steps",
                str(TINY_DEFAULTS["steps"]),
                "--default-frames",
                str(TINY_DEFAULTS["frames"]),
            ]
        if self.api_key:
            keyfile = self.workdir / "api-keys"
            keyfile.write_text(self.api_key + "\n")
            gw += ["--api-key-file", str(keyfile)]
        if self.model_path:
            gw += ["--model-path", self.model_path]
        gw += self.extra_gateway_args
        self._spawn("gateway", "gateway", gw, env)
        for role in c.STAGE_ROLES:
            for i in range(self.counts.get(role, 1)):
                self.start_worker(role, i, env)
        return self

    def start_worker(self, role: str, index: int, env: dict[str, str] | None = None) -> Proc:
        env = env or self._env()
        name = f"{role}-{index}"
        args = [
            self.python,
            "-m",
            "diffdisagg.worker",
            "--role",
            role,
            "--family",
            self.family,
            "--gateway-url",
            self.url,
            "--token-file",
            str(self.token_file),
            "--deployment",
            "local",
            "--host",
            self.host,
            "--bind",
            self.host,
            "--control-port",
            str(free_port(self.host)),
            "--transfer-port",
            str(free_port(self.host)),
            "--worker-id",
            name,
            "--heartbeat-interval",
            str(self.heartbeat_interval_s),
            "--capacity",
            str(self.capacity),
            "--max-batch-size",
            str(self.max_batch_size),
            "--buffer-bytes",
            str(32 << 20),
        ]
        if self.model_path:
            args += ["--model-path", self.model_path]
        if self.stage_delay_s.get(role):
            args += ["--stage-delay", str(self.stage_delay_s[role])]
        return self._spawn(name, role, args, env)

    def _spawn(self, name: str, role: str, args: list[str], env: dict[str, str]) -> Proc:
        assert self.workdir is not None
        log = self.workdir / f"{name}.log"
        fh = log.open("ab")
        popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        fh.close()
        proc = Proc(name, role, popen, log, args)
        self.procs = [p for p in self.procs if p.name != name] + [proc]
        return proc

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def ready(self) -> dict[str, object] | None:
        try:
            with urllib.request.urlopen(self.url + c.PATH_READY, timeout=2) as resp:
                return json.loads(resp.read())
        except Exception:
            return None

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.popen.poll() is not None]
            if dead:
                raise RuntimeError(
                    f"{dead[0].name} exited ({dead[0].popen.returncode}):\n{self.tail(dead[0])}"
                )
            status = self.ready()
            if status and status.get("ready"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"deployment not ready after {timeout_s:.0f}s; logs in {self.workdir}")

    def tail(self, proc: Proc, lines: int = 40) -> str:
        try:
            return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)  # a test may have stopped it
                    p.popen.terminate()
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _banner(d: LocalDeployment) -> str:
    auth = f' -H "Authorization: Bearer {d.api_key}"' if d.api_key else ""
    key = d.api_key or "unused"
    kind = "videos" if d.family == "wan" else "images/generations"
    curl = (
        f"curl -s {d.url}/v1/{kind} -H 'Content-Type: application/json'{auth} \\\n"
        f'  -d \'{{"prompt": "a red fox in the snow", "seed": 1}}\''
    )
    if d.family != "wan":
        curl += (
            " | python3 -c 'import sys,json,base64; "
            'open("out.png","wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))\''
        )
        py = (
            f"from openai import OpenAI; import base64\n"
            f'client = OpenAI(base_url="{d.url}/v1", api_key="{key}")\n'
            f'img = client.images.generate(prompt="a red fox in the snow", extra_body={{"seed": 1}})\n'
            f'open("out.png", "wb").write(base64.b64decode(img.data[0].b64_json))'
        )
    else:
        py = (
            f"from openai import OpenAI\n"
            f'client = OpenAI(base_url="{d.url}/v1", api_key="{key}")\n'
            f'job = client.videos.create_and_poll(prompt="a red fox in the snow")\n'
            f'client.videos.download_content(job.id).write_to_file("out.mp4")'
        )
    counts = ", ".join(f"{r}={d.counts.get(r, 1)}" for r in c.STAGE_ROLES)
    return (
        f"\ndiffdisagg is serving {d.family} ({d.model_path or 'tiny model, CPU'}) at {d.url}  [{counts}]\n"
        f"logs: {d.workdir}\n\ncurl:\n{curl}\n\nopenai:\n{py}\n\n"
        f"CLI:\n  diffdisagg generate 'a red fox in the snow' -o out.{'mp4' if d.family == 'wan' else 'png'}"
        f" --url {d.url}\n\nCtrl-C stops every process.\n"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--family", default=os.environ.get(c.ENV_MODEL_FAMILY, "flux"), choices=("flux", "sd3", "wan")
    )
    p.add_argument("--model-path", default=os.environ.get(c.ENV_MODEL_PATH))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=c.GATEWAY_HTTP_PORT)
    for role in c.STAGE_ROLES:
        p.add_argument(f"--{role}", type=int, default=1, help=f"number of {role} workers")
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--api-key", default=None, help="require this client API key")
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--ready-timeout", type=float, default=600.0)


def build_tiny(family: str) -> str:
    """Build (or reuse) the tiny model here once, so the workers do not race to build it."""
    from diffdisagg.worker.pipelines import tiny_model_dir

    return str(tiny_model_dir(family))


def run(a: argparse.Namespace) -> int:
    logging.basicConfig(level="INFO", format="%(message)s")
    if not a.model_path:
        print(f"preparing the tiny {a.family} model (built once, then cached) ...", flush=True)
        build_tiny(a.family)
    d = LocalDeployment(
        family=a.family,
        counts={r: getattr(a, r) for r in c.STAGE_ROLES},
        model_path=a.model_path,
        host=a.host,
        port=a.port,
        heartbeat_interval_s=a.heartbeat_interval,
        api_key=a.api_key,
        threads_per_worker=a.threads_per_worker,
    )
    stop = {"now": False}

    def _stop(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    d.start()
    try:
        print(f"starting gateway and workers (logs in {d.workdir}) ...", flush=True)
        deadline = time.monotonic() + a.ready_timeout
        while not stop["now"]:
            dead = [p for p in d.procs if p.popen.poll() is not None]
            if dead:
                print(f"{dead[0].name} exited:\n{d.tail(dead[0])}", file=sys.stderr)
                return 1
            status = d.ready()
            if status and status.get("ready"):
                break
            if time.monotonic() > deadline:
                print(f"not ready after {a.ready_timeout:.0f}s; see {d.workdir}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        if stop["now"]:
            return 130
        print(_banner(d), flush=True)
        while not stop["now"]:
            dead = [p for p in d.procs if p.popen.poll() is not None]
            if dead:
                print(f"{dead[0].name} exited ({dead[0].popen.returncode}); stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        print("stopping ...", flush=True)
        d.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffdisagg run", description="run gateway + role workers locally")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
