"""Ascend NPU: `huawei.com/Ascend910` (or e.g. `huawei.com/ascend-1980`), HCCL's interface IP, hccn.conf.

HCCL_IF_IP is the one non-DIFFDISAGG variable the operator writes: HCCL reads it before any of our
code runs, and it must be the pod IP, which only the downward API knows.
"""

from __future__ import annotations

from diffdisagg.operator.accelerators.base import DeviceWiring
from diffdisagg.operator.api.types import AcceleratorSpec

DEFAULT_RESOURCE = "huawei.com/Ascend910"
HCCN_CONF = "/etc/hccn.conf"
HCCN_VOLUME = "hccn-conf"


def wiring(accel: AcceleratorSpec, devices: int) -> DeviceWiring:
    env = ({"name": "HCCL_IF_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},)
    volumes: tuple = ()
    mounts: tuple = ()
    if accel.hccn_conf_host_path:
        volumes = ({"name": HCCN_VOLUME, "hostPath": {"path": accel.hccn_conf_host_path, "type": "File"}},)
        mounts = ({"name": HCCN_VOLUME, "mountPath": HCCN_CONF, "readOnly": True},)
    return DeviceWiring(
        platform="npu",
        limits={accel.resource_name or DEFAULT_RESOURCE: devices},
        env=env,
        volumes=volumes,
        volume_mounts=mounts,
    )
