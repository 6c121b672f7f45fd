"""Choose the platform once per process.

Order: the `DIFFDISAGG_PLATFORM` override (cpu|cuda|npu) → CUDA (also ROCm) → Ascend NPU (torch_npu
importable and reporting a device) → CPU. A process that sees both CUDA and NPU devices is
misconfigured (two accelerator stacks in one image); that is an error, not a silent pick. An override
naming a platform that is not available is an error too: the operator asked for devices it did not get.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from diffdisagg.transport.errors import PlatformError
from diffdisagg.transport.platforms.base import Platform
from diffdisagg.transport.platforms.cpu import CpuPlatform

__all__ = [
    "PLATFORM_ENV",
    "PLATFORM_NAMES",
    "current_platform",
    "detect_platform",
    "reset_current_platform",
]

log = logging.getLogger(__name__)

PLATFORM_ENV = "DIFFDISAGG_PLATFORM"
PLATFORM_NAMES = ("cpu", "cuda", "npu")

_lock = threading.Lock()
_current: Platform | None = None


def _default_cuda_probe() -> bool:
    from diffdisagg.transport.platforms.cuda import cuda_available

    return cuda_available()


def _default_npu_probe() -> Any | None:
    from diffdisagg.transport.platforms.npu import npu_device_module

    return npu_device_module()


def detect_platform(
    env: Mapping[str, str] | None = None,
    *,
    cuda_probe: Callable[[], bool] | None = None,
    npu_probe: Callable[[], Any | None] | None = None,
) -> Platform:
    """Detect the platform (uncached). The probes are injectable for tests.

    `npu_probe` returns torch_npu's device module when an NPU is usable, else None.
    """
    env = os.environ if env is None else env
    cuda_probe = cuda_probe or _default_cuda_probe
    npu_probe = npu_probe or _default_npu_probe
    override = env.get(PLATFORM_ENV, "").strip().lower()

    if override:
        if override not in PLATFORM_NAMES:
            raise PlatformError(f"{PLATFORM_ENV}={override!r}: expected one of {', '.join(PLATFORM_NAMES)}")
        if override == "cpu":
            return CpuPlatform()
        if override == "cuda":
            if not cuda_probe():
                raise PlatformError(f"{PLATFORM_ENV}=cuda but torch sees no CUDA device")
            return _cuda()
        module = npu_probe()
        if module is None:
            raise PlatformError(f"{PLATFORM_ENV}=npu but torch_npu is missing or sees no NPU")
        return _npu(module)

    has_cuda = cuda_probe()
    npu_module = npu_probe()
    if has_cuda and npu_module is not None:
        raise PlatformError(
            f"both CUDA and Ascend NPU devices are available; set {PLATFORM_ENV} to choose one"
        )
    if has_cuda:
        return _cuda()
    if npu_module is not None:
        return _npu(npu_module)
    return CpuPlatform()


def current_platform() -> Platform:
    """The process-wide platform, detected on first use."""
    global _current
    with _lock:
        if _current is None:
            _current = detect_platform()
            log.info("platform selected: %s", _current.describe())
        return _current


def reset_current_platform(platform: Platform | None = None) -> None:
    """Forget (or replace) the cached platform; for tests and for launchers that set the env late."""
    global _current
    with _lock:
        _current = platform


def _cuda() -> Platform:
    from diffdisagg.transport.platforms.cuda import CudaPlatform

    return CudaPlatform()


def _npu(module: Any) -> Platform:
    from diffdisagg.transport.platforms.npu import NpuPlatform

    return NpuPlatform(device_module=module)
