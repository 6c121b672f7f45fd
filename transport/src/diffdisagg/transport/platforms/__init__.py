"""Platform layer: the one place that knows device kinds (CPU, CUDA/ROCm, Ascend NPU).

Use `current_platform()` and the `Platform` it returns; never name a device module elsewhere.
"""

from diffdisagg.transport.platforms.base import MemoryInfo, Platform
from diffdisagg.transport.platforms.cpu import CpuPlatform, HostEvent, HostStream
from diffdisagg.transport.platforms.cuda import CudaPlatform
from diffdisagg.transport.platforms.detect import (
    PLATFORM_ENV,
    PLATFORM_NAMES,
    current_platform,
    detect_platform,
    reset_current_platform,
)
from diffdisagg.transport.platforms.npu import NpuPlatform

__all__ = [
    "PLATFORM_ENV",
    "PLATFORM_NAMES",
    "CpuPlatform",
    "CudaPlatform",
    "HostEvent",
    "HostStream",
    "MemoryInfo",
    "NpuPlatform",
    "Platform",
    "current_platform",
    "detect_platform",
    "reset_current_platform",
]
