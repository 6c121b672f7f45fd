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


def worker_env(owner: Owner, role: str, device: DeviceWiring) -> list[Json]:
    spec = owner.spec
    t = spec.transfer
    env = [
        *common_env(owner, role),
        _v(c.ENV_PLATFORM, device.platform),
        _v(c.ENV_MODEL_PATH, spec.model.path),
        _v(c.ENV_GATEWAY_URL, gateway_url(owner)),
        _v(c.ENV_DEVICES_PER_POD, spec.accelerator.devices_per_pod),
        _v(c.ENV_CONTROL_PORT, c.DEFAULT_CONTROL_PORT),
        _v(c.ENV_TRANSFER_BACKEND, t.backend),
        _v(c.ENV_BUFFER_BYTES, t.buffer_bytes),
    ]
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
    env = common_env(owner, c.ROLE_GATEWAY)
    if owner.spec.gateway.api_key_secret:
        env.append(_v(c.ENV_API_KEY_FILE, f"{API_KEY_DIR}/{owner.spec.gateway.api_key_key}"))
    return env


def shared_volumes(owner: Owner) -> tuple[list[Json], list[Json]]:
    """(volumes, mounts) every pod of the deployment gets: the inter-role token and the pipeline config."""
    volumes = [
        {"name": TOKEN_VOLUME, "secret": {"secretName": token_secret_name(owner), "defaultMode": 0o440}},
        {"name": CONFIG_VOLUME, "configMap": {"name": config_map_name(owner)}},
    ]
    mounts = [
        {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
    ]
    return volumes, mounts


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
        [{"name": API_KEY_VOLUME, "secret": {"secretName": g.api_key_secret, "defaultMode": 0o440}}],
        [{"name": API_KEY_VOLUME, "mountPath": API_KEY_DIR, "readOnly": True}],
    )
