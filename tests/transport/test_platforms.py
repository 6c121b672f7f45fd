"""Platform layer: detection order, the CPU platform, and the Ascend NPU platform.

There is no NPU (and no CUDA device) on the CI machine, so the NPU platform is driven here by a
STAND-IN device module (`StandInNpuModule`, with stand-in Stream/Event classes). To keep the stand-in
honest, `test_npu_names_exist_in_the_real_torch_npu_wheel` reads the real torch_npu wheel (downloaded
with `pip download`, never imported: it needs the CANN runtime) and checks that every name the
platform and the stand-in use exists in torch_npu's `torch_npu/npu/__init__.py` `__all__` and in its
`Stream` / `Event` classes. The wheel is cached under ~/.cache/diffdisagg/wheels/; when it is missing
the test downloads it itself and fails (does not skip) when it cannot.

The NPU tests rename torch's PrivateUse1 backend to "npu" exactly as `import torch_npu` does, so that
`torch.device("npu", i)` exists; that rename is process-wide and changes nothing else.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffdisagg.transport.errors import PlatformError
from diffdisagg.transport.platforms import (
    PLATFORM_ENV,
    CpuPlatform,
    CudaPlatform,
    HostEvent,
    HostStream,
    MemoryInfo,
    NpuPlatform,
    Platform,
    current_platform,
    detect_platform,
    reset_current_platform,
)
from diffdisagg.transport.platforms import npu as npu_module
from diffdisagg.transport.platforms.npu import DEVICE_MODULE_ATTRS, EVENT_METHODS, STREAM_METHODS

PLATFORMS_DIR = Path(npu_module.__file__).parent
WHEEL_CACHE = Path.home() / ".cache" / "diffdisagg" / "wheels"
WHEEL_SPECS = ("torch_npu==2.14.0", "torch_npu>=2,<3")


# ------------------------------------------------------------------------------------------ stand-ins


class StandInNpuEvent:
    """Stand-in for torch_npu.npu.Event: completes when `complete()` is called (a device would)."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.enable_timing = enable_timing
        self.recorded_on: StandInNpuStream | None = None
        self.completed = True

    def record(self, stream=None):
        self.recorded_on = stream
        if stream is not None:
            stream.log.append(("record", self))

    def wait(self, stream=None):
        if stream is not None:
            stream.log.append(("wait", self))

    def query(self):
        return self.completed

    def synchronize(self):
        self.completed = True

    def elapsed_time(self, end_event):
        return 0.0


class StandInNpuStream:
    """Stand-in for torch_npu.npu.Stream: records the calls made on it."""

    def __init__(self, device=None, priority=0) -> None:
        self.device = device
        self.log: list[tuple[str, object]] = []

    def wait_event(self, event):
        self.log.append(("wait_event", event))

    def wait_stream(self, stream):
        self.log.append(("wait_stream", stream))

    def record_event(self, event=None):
        event = event or StandInNpuEvent()
        event.record(self)
        return event

    def query(self):
        return True

    def synchronize(self):
        return None


class StandInNpuModule:
    """Stand-in for torch_npu.npu (what `torch.get_device_module("npu")` returns with torch_npu)."""

    def __init__(self, count: int = 2) -> None:
        self.count = count
        self.current = 0
        self.calls: list[tuple] = []
        self.Stream = StandInNpuStream
        self.Event = StandInNpuEvent
        self.default = StandInNpuStream(device=None)
        self.active: StandInNpuStream | None = None

    def is_available(self):
        return self.count > 0

    def device_count(self):
        return self.count

    def current_device(self):
        return self.current

    def set_device(self, index):
        self.calls.append(("set_device", index))
        self.current = index

    def synchronize(self, device=None):
        self.calls.append(("synchronize", device))

    def mem_get_info(self, device=None):
        self.calls.append(("mem_get_info", device))
        return (3 << 30, 64 << 30)

    def current_stream(self, device=None):
        return self.active or self.default

    def stream(self, stream):
        module = self

        class _Ctx:
            def __enter__(self):
                module.previous, module.active = module.active, stream
                return stream

            def __exit__(self, *exc):
                module.active = module.previous

        return _Ctx()


CHILD_ENV = "DIFFDISAGG_NPU_STANDIN_CHILD"


def ran_in_child_process(test_name: str) -> bool:
    """Run `test_name` in a fresh pytest process and report True there, or return False inside that child.

    Renaming torch's PrivateUse1 backend to "npu" (what `import torch_npu` does) cannot be undone, and
    afterwards diffusers/safetensors in the same process look for a `torch.npu` module that does not exist
    here: the rename must never happen in the shared test process.
    """
    if os.environ.get(CHILD_ENV) == test_name:
        if torch._C._get_privateuse1_backend_name() != "npu":
            torch.utils.rename_privateuse1_backend("npu")
        return False
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test_name}"],
        env={**os.environ, CHILD_ENV: test_name},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout + out.stderr
    return True


@pytest.fixture
def standin_npu():
    module = StandInNpuModule(count=2)
    return module, NpuPlatform(device_module=module)


# ------------------------------------------------------------------------------------------- detection


def _probes(cuda: bool, npu: object | None):
    return {"cuda_probe": lambda: cuda, "npu_probe": lambda: npu}


def test_detection_order_without_override():
    standin = StandInNpuModule()
    assert type(detect_platform({}, **_probes(False, None))) is CpuPlatform
    assert type(detect_platform({}, **_probes(True, None))) is CudaPlatform
    npu = detect_platform({}, **_probes(False, standin))
    assert type(npu) is NpuPlatform and npu.device_module is standin
    with pytest.raises(PlatformError, match="both CUDA and Ascend NPU"):
        detect_platform({}, **_probes(True, standin))


@pytest.mark.parametrize("value", ["cpu", "CPU", " cpu "])
def test_cpu_override_wins_over_devices(value):
    # Even with both accelerators present, an explicit cpu choice is honoured (no conflict error).
    platform = detect_platform({PLATFORM_ENV: value}, **_probes(True, StandInNpuModule()))
    assert type(platform) is CpuPlatform


def test_overrides_choose_and_fail_loudly():
    standin = StandInNpuModule()
    assert type(detect_platform({PLATFORM_ENV: "cuda"}, **_probes(True, standin))) is CudaPlatform
    assert type(detect_platform({PLATFORM_ENV: "npu"}, **_probes(True, standin))) is NpuPlatform
    with pytest.raises(PlatformError, match="no CUDA device"):
        detect_platform({PLATFORM_ENV: "cuda"}, **_probes(False, None))
    with pytest.raises(PlatformError, match="no NPU"):
        detect_platform({PLATFORM_ENV: "npu"}, **_probes(True, None))
    with pytest.raises(PlatformError, match="expected one of cpu, cuda, npu"):
        detect_platform({PLATFORM_ENV: "tpu"}, **_probes(False, None))
    # Empty means unset.
    assert type(detect_platform({PLATFORM_ENV: ""}, **_probes(False, None))) is CpuPlatform


def test_real_probes_agree_with_torch():
    platform = detect_platform({})
    cuda = torch.cuda.is_available()
    try:
        import torch_npu  # noqa: F401

        npu = torch.npu.is_available()
    except ImportError:
        npu = False
    expected = CudaPlatform if cuda else NpuPlatform if npu else CpuPlatform
    assert type(platform) is expected
    assert platform.is_available()


def test_current_platform_is_cached_and_resettable(monkeypatch):
    monkeypatch.setenv(PLATFORM_ENV, "cpu")
    reset_current_platform()
    try:
        first = current_platform()
        assert first is current_platform() and first.device_type == "cpu"
        sentinel = CpuPlatform()
        reset_current_platform(sentinel)
        assert current_platform() is sentinel
        monkeypatch.setenv(PLATFORM_ENV, "bogus")
        reset_current_platform()
        with pytest.raises(PlatformError):
            current_platform()
    finally:
        monkeypatch.setenv(PLATFORM_ENV, "cpu")
        reset_current_platform()


# ----------------------------------------------------------------------------------------------- CPU


def test_cpu_platform_attributes():
    p = CpuPlatform()
    assert isinstance(p, Platform)
    assert (p.device_type, p.collective_backend, p.visible_devices_env) == ("cpu", "gloo", None)
    assert not p.pin_memory_supported and not p.device_registration_supported
    assert p.device(0) == torch.device("cpu") == p.device(3) == p.current_device()
    assert p.device_module is torch.get_device_module("cpu")
    p.set_device(0)
    with pytest.raises(PlatformError):
        p.device(-1)
    info = p.memory_info()
    assert isinstance(info, MemoryInfo) and 0 < info.free <= info.total and info.used >= 0
    json.dumps(p.describe())


def test_cpu_streams_and_events_are_working_no_ops():
    p = CpuPlatform()
    s = p.Stream()
    assert isinstance(s, HostStream)
    start, end = p.Event(enable_timing=True), p.Event(enable_timing=True)
    with p.stream(s) as entered:
        assert entered is s
        start.record(s)
        x = torch.ones(1000).sum()
        end.record(s)
    assert x.item() == 1000
    assert start.query() and end.query() and s.query()
    p.current_stream().wait_event(end)
    s.wait_stream(p.current_stream())
    start.synchronize()
    start.wait(s)
    s.synchronize()
    p.synchronize()
    assert end.elapsed_time(start) <= 0 <= start.elapsed_time(end)
    assert isinstance(s.record_event(), HostEvent)
    with pytest.raises(PlatformError):
        p.Event().elapsed_time(p.Event())
    with pytest.raises(PlatformError):
        p.Event(enable_timing=True).elapsed_time(end)


def test_cpu_memory_allocation():
    p = CpuPlatform()
    host = p.empty_host(4096)
    assert host.dtype == torch.uint8 and host.numel() == 4096 and not host.is_pinned()
    with pytest.raises(PlatformError, match="cannot pin"):
        p.empty_host(4096, pin=True)
    assert p.empty_device(128).device.type == "cpu"


class _DeviceTensorStandIn:
    """Stand-in for a tensor on an accelerator (none exists here): `.device.type` is "npu".

    Touching `is_npu` fails the test: placement must be read from `device.type`.
    """

    def __init__(self, host: torch.Tensor) -> None:
        self.device = SimpleNamespace(type="npu", index=0)
        self.host = host
        self.moves: list[object] = []

    @property
    def is_npu(self):
        raise AssertionError("placement must be tested with tensor.device.type, never tensor.is_npu")

    def to(self, device, *args, **kwargs):
        self.moves.append(device)
        return self.host.clone()


@pytest.mark.parametrize("platform_factory", [CpuPlatform, lambda: NpuPlatform(StandInNpuModule())])
def test_to_host_moves_only_non_cpu_tensors(platform_factory):
    p = platform_factory()
    cpu = torch.arange(4)
    assert p.to_host(cpu) is cpu
    remote = _DeviceTensorStandIn(torch.arange(4))
    moved = p.to_host(remote)
    assert remote.moves == ["cpu"] and torch.equal(moved, torch.arange(4))


# ----------------------------------------------------------------------------------- NPU (stand-in)


def test_npu_platform_attributes(standin_npu):
    if ran_in_child_process("test_npu_platform_attributes"):
        return
    module, p = standin_npu
    assert (p.device_type, p.collective_backend, p.visible_devices_env) == (
        "npu",
        "hccl",
        "ASCEND_RT_VISIBLE_DEVICES",
    )
    assert p.pin_memory_supported and p.device_registration_supported
    assert p.is_available() and p.device_count() == 2
    assert p.device(1) == torch.device("npu", 1)
    p.set_device(1)
    assert module.calls[-1] == ("set_device", 1) and p.current_device() == torch.device("npu", 1)
    with pytest.raises(PlatformError, match="ASCEND_RT_VISIBLE_DEVICES"):
        p.set_device(2)
    with pytest.raises(PlatformError):
        p.device(True)
    assert p.memory_info(0) == MemoryInfo(free=3 << 30, total=64 << 30)
    assert module.calls[-1] == ("mem_get_info", torch.device("npu", 0))
    p.synchronize(1)
    assert module.calls[-1] == ("synchronize", torch.device("npu", 1))
    assert p.describe()["collective_backend"] == "hccl"


def test_npu_streams_events_through_the_device_module(standin_npu):
    if ran_in_child_process("test_npu_streams_events_through_the_device_module"):
        return
    module, p = standin_npu
    s = p.Stream(0)
    assert isinstance(s, StandInNpuStream) and s.device == torch.device("npu", 0)
    ev = p.Event(enable_timing=True)
    assert isinstance(ev, StandInNpuEvent) and ev.enable_timing
    assert p.current_stream() is module.default
    with p.stream(s):
        assert p.current_stream() is s
        ev.record(p.current_stream())
    assert p.current_stream() is module.default
    assert ev.recorded_on is s and s.log == [("record", ev)]


def _wheel() -> Path:
    found = sorted(WHEEL_CACHE.glob("torch_npu-*.whl"))
    if found:
        return found[-1]
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    errors = []
    for spec in WHEEL_SPECS:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(WHEEL_CACHE),
            "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--only-binary=:all:",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        found = sorted(WHEEL_CACHE.glob("torch_npu-*.whl"))
        if proc.returncode == 0 and found:
            return found[-1]
        errors.append(f"{spec}: {proc.stderr.strip()[-500:]}")
    pytest.fail("could not download the torch_npu wheel: " + " | ".join(errors))


def _module_all(source: str) -> set[str]:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("torch_npu/npu/__init__.py has no literal __all__")


def _class_methods(source: str, name: str) -> set[str]:
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    raise AssertionError(f"class {name} not found in torch_npu/npu/streams.py")


def _device_module_uses(path: Path) -> set[str]:
    """Attribute names read from `self.device_module` (or a local `module`) in a platform source."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            owner = node.value
            via_self = isinstance(owner, ast.Attribute) and owner.attr == "device_module"
            via_local = isinstance(owner, ast.Name) and owner.id == "module"
            if via_self or via_local:
                used.add(node.attr)
    return used


def test_npu_names_exist_in_the_real_torch_npu_wheel():
    with zipfile.ZipFile(_wheel()) as wheel:
        npu_all = _module_all(wheel.read("torch_npu/npu/__init__.py").decode())
        streams = wheel.read("torch_npu/npu/streams.py").decode()
        backend = wheel.read("torch_npu/_init/registry/backend.py").decode()
    stream_methods = _class_methods(streams, "Stream")
    event_methods = _class_methods(streams, "Event")

    # torch_npu registers itself as torch's "npu" device module, which is what the platform uses.
    assert 'rename_privateuse1_backend("npu")' in backend
    assert '_register_device_module("npu"' in backend

    # What the platform calls on the device module, its streams and its events, exists upstream...
    assert set(DEVICE_MODULE_ATTRS) <= npu_all, set(DEVICE_MODULE_ATTRS) - npu_all
    assert set(STREAM_METHODS) <= stream_methods, set(STREAM_METHODS) - stream_methods
    assert set(EVENT_METHODS) <= event_methods, set(EVENT_METHODS) - event_methods
    # ...the platform's code (and the base class it inherits) uses no name outside that list...
    used = _device_module_uses(PLATFORMS_DIR / "npu.py") | _device_module_uses(PLATFORMS_DIR / "base.py")
    assert used <= set(DEVICE_MODULE_ATTRS), used - set(DEVICE_MODULE_ATTRS)
    # ...and the stand-in offers exactly real names, covering everything the platform needs.
    standin_names = {n for n in vars(StandInNpuModule()) | vars(StandInNpuModule) if not n.startswith("_")}
    standin_names -= {"count", "current", "calls", "default", "active", "previous"}  # bookkeeping
    assert standin_names <= npu_all, standin_names - npu_all
    assert set(DEVICE_MODULE_ATTRS) <= standin_names
    for cls, real, needed in (
        (StandInNpuStream, stream_methods, STREAM_METHODS),
        (StandInNpuEvent, event_methods, EVENT_METHODS),
    ):
        offered = {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}
        assert offered <= real, offered - real
        assert set(needed) <= offered
