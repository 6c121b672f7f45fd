"""Pure: the env and volumes a worker or gateway reads — the operator's half of the contract.

Only `DIFFDISAGG_*` names from `contract` are written here; the worker maps them onto Mooncake's
or HCCL's own settings. (The one exception, HCCL_IF_IP, lives in accelerators/ascend.py.)
"""

from __future__ import annotations

from diffdisagg.operator import contract as c
from diffdisagg.operator.accelerators.base import DeviceWiring
from diffdisagg.operator.builders.common import (
    API_KEY_DIR,
    CONFIG_DIR,
    TOKEN_DIR,
    TOKEN_KEY,
    Json,
    Owner,
    config_map_name,
    gateway_url,
    token_secret_name,
)

TOKEN_VOLUME = "diffdisagg-token"
CONFIG_VOLUME = "diffdisagg-config"
MODEL_VOLUME = "model"
API_KEY_VOLUME = "api-key"
SHM_VOLUME = "dshm"
# Secret files are owned by root unless the pod sets an fsGroup, and our images run as a non-root user
# (65532): 0440 would make the token unreadable to the worker. The container runs nothing but our
# process, so world-readable inside it gives away nothing a group bit would keep.
SECRET_MODE = 0o444


def _v(name: str, value: object) -> Json:
    return {"name": name, "value": str(value)}


def _pod_ip(name: str) -> Json:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def common_env(owner: Owner, role: str) -> list[Json]:
    return [
        _v(c.ENV_ROLE, role),
        _v(c.ENV_DEPLOYMENT, owner.name),
        _v(c.ENV_REVISION, owner.revision),
        _v(c.ENV_MODEL_FAMILY, owner.spec.model.family),
        _v(c.ENV_TOKEN_FILE, f"{TOKEN_DIR}/{TOKEN_KEY}"),
        _pod_ip(c.ENV_POD_IP),
    ]


def worker_env(
    owner: Owner, role: str, device: DeviceWiring, devices: int, encode_threads: int | None = None
) -> list[Json]:
    spec = owner.spec
    t = spec.transfer
    env = [
        *common_env(owner, role),
        _v(c.ENV_PLATFORM, device.platform),
        _v(c.ENV_MODEL_PATH, spec.model.path),
        _v(c.ENV_GATEWAY_URL, gateway_url(owner)),
        # N > 1: the worker starts ranks 1..N-1 itself and they rendezvous on the pod's loopback
        _v(c.ENV_DEVICES_PER_POD, devices),
        _v(c.ENV_CONTROL_PORT, c.DEFAULT_CONTROL_PORT),
        _v(c.ENV_TRANSFER_BACKEND, t.backend),
        _v(c.ENV_BUFFER_BYTES, t.buffer_bytes),
    ]
    if encode_threads is not None:  # decode only (parse_spec); unset: the worker's default
        env.append(_v(c.ENV_ENCODE_THREADS, encode_threads))
    if t.mooncake:
        # P2P handshake: the pod IP (DIFFDISAGG_POD_IP above) is mooncake's local hostname; no metadata
        # server. The fixed range lets the NetworkPolicy name the ports.
        env += [
            _v(c.ENV_TRANSFER_PROTOCOL, t.protocol),
            _v(c.ENV_TRANSFER_PORT_MIN, t.port_min),
            _v(c.ENV_TRANSFER_PORT_MAX, t.port_max),
        ]
        if t.rdma_devices:
            env.append(_v(c.ENV_RDMA_DEVICES, ",".join(t.rdma_devices)))
    else:
        env.append(_v(c.ENV_TRANSFER_PORT, c.DEFAULT_TRANSFER_PORT))
    return env + list(device.env)


def gateway_env(owner: Owner) -> list[Json]:
    # The gateway dispatches only to workers of its own deployment, revision and family (the first
    # three come from common_env), so it rolls together with them. The model path only names the
    # model in /v1/models; the gateway never reads it.
    env = [*common_env(owner, c.ROLE_GATEWAY), _v(c.ENV_MODEL_PATH, owner.spec.model.path)]
    if owner.spec.gateway.api_key_secret:
        env.append(_v(c.ENV_API_KEY_FILE, f"{API_KEY_DIR}/{owner.spec.gateway.api_key_key}"))
    return env


def shared_volumes(owner: Owner) -> tuple[list[Json], list[Json]]:
    """(volumes, mounts) every pod of the deployment gets: the inter-role token and the pipeline config."""
    volumes = [
        {
            "name": TOKEN_VOLUME,
            "secret": {"secretName": token_secret_name(owner), "defaultMode": SECRET_MODE},
        },
        {"name": CONFIG_VOLUME, "configMap": {"name": config_map_name(owner)}},
    ]
    mounts = [
        {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
    ]
    return volumes, mounts


def shm_volume(owner: Owner, devices: int) -> tuple[list[Json], list[Json]]:
    """An in-memory /dev/shm for pods whose worker runs several ranks: NCCL moves data between the
    local ranks through shared memory, and a container runtime's default /dev/shm (64 MiB under
    Docker) is too small for its buffers."""
    if devices <= 1:
        return [], []
    size = owner.spec.accelerator.shm_size_limit
    return (
        [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": size}}],
        [{"name": SHM_VOLUME, "mountPath": c.SHM_PATH}],
    )


def model_volume(owner: Owner) -> tuple[list[Json], list[Json]]:
    vol = owner.spec.model.volume
    if vol is None:
        return [], []
    if vol.pvc_claim:
        source: Json = {"persistentVolumeClaim": {"claimName": vol.pvc_claim, "readOnly": True}}
    else:
        source = {"hostPath": {"path": vol.host_path, "type": "Directory"}}
    return [{"name": MODEL_VOLUME, **source}], [
        {"name": MODEL_VOLUME, "mountPath": vol.mount_path, "readOnly": True}
    ]


def api_key_volume(owner: Owner) -> tuple[list[Json], list[Json]]:
    g = owner.spec.gateway
    if not g.api_key_secret:
        return [], []
    return (
        [{"name": API_KEY_VOLUME, "secret": {"secretName": g.api_key_secret, "defaultMode": SECRET_MODE}}],
        [{"name": API_KEY_VOLUME, "mountPath": API_KEY_DIR, "readOnly": True}],
    )
