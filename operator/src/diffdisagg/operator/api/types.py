"""Typed, defaulted view of a DiffusionDisaggDeployment spec: frozen dataclasses + `parse_spec`.

The API server already validated the spec against `api.schema`; `parse_spec` applies the defaults
the schema cannot express and raises `SpecError` for what it cannot check (so a spec that slipped
past an older CRD still gives a clear message instead of a KeyError deep in a builder).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from diffdisagg.operator import contract as c
from diffdisagg.operator.api import schema as s
from diffdisagg.operator.errors import SpecError

DEFAULT_BUFFER_BYTES = 256 * 1024 * 1024
DEFAULT_RDMA_RESOURCE = "rdma/hca"

Json = dict[str, Any]


@dataclass(frozen=True)
class ModelVolume:
    mount_path: str
    pvc_claim: str | None = None
    host_path: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    family: str
    path: str
    volume: ModelVolume | None = None


@dataclass(frozen=True)
class AcceleratorSpec:
    vendor: str
    resource_name: str | None = None
    devices_per_pod: int = 1  # of each denoise pod; prefill and decode pods get one device
    shm_size_limit: str = s.DEFAULT_SHM_SIZE_LIMIT
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[Json, ...] = ()
    hccn_conf_host_path: str | None = None


@dataclass(frozen=True)
class TransferSpec:
    backend: str = "tcp"
    protocol: str | None = None
    rdma_devices: tuple[str, ...] = ()
    rdma_resource: str | None = None  # "" = request no RDMA resource
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    port_min: int = c.DEFAULT_TRANSFER_PORT_MIN
    port_max: int = c.DEFAULT_TRANSFER_PORT_MAX

    @property
    def mooncake(self) -> bool:
        return self.backend == "mooncake"

    @property
    def effective_rdma_resource(self) -> str | None:
        """The extended resource to request per pod, or None."""
        if not self.mooncake or self.protocol != "rdma":
            return None
        if self.rdma_resource is None:
            return DEFAULT_RDMA_RESOURCE
        return self.rdma_resource or None


@dataclass(frozen=True)
class PodTemplateOverrides:
    annotations: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[Json, ...] = ()
    priority_class_name: str | None = None


@dataclass(frozen=True)
class AutoscalingSpec:
    enabled: bool = False
    hpa: bool = True  # false: the scaler is left to an external autoscaler (KEDA), no operator HPA
    min_replicas: int = 1
    max_replicas: int | None = None
    target_queue_depth_per_replica: float = 1.0
    behavior: Json | None = None


@dataclass(frozen=True)
class ContainerSpec:
    """What gateway and worker roles share: image, resources, env, pod-template overrides."""

    image: str
    resources: Json = field(default_factory=dict)
    env: tuple[Json, ...] = ()
    pod_template: PodTemplateOverrides = PodTemplateOverrides()


@dataclass(frozen=True)
class RoleSpec:
    name: str
    container: ContainerSpec
    replicas: int = 1
    replicas_set: bool = False  # whether the user wrote spec.roles.<role>.replicas
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    # spec.roles.<role>.accelerator.resourceName: what this role's pods request instead of
    # spec.accelerator.resourceName / the vendor default (e.g. a time-sliced nvidia.com/gpu.shared)
    resource_name: str | None = None
    # spec.roles.decode.encodeThreads (decode only; None: the worker's default)
    encode_threads: int | None = None

    @property
    def autoscaled(self) -> bool:
        return self.autoscaling.enabled


def devices_of(accel: AcceleratorSpec, role: str) -> int:
    """Devices one pod of `role` gets. Only denoise spans several: prefill's text encoders and decode's
    VAE have no parallel plan, so extra ranks would replicate them (no speed-up, no memory saved)."""
    return accel.devices_per_pod if role == c.ROLE_DENOISE else 1


def accelerator_of(accel: AcceleratorSpec, role: RoleSpec) -> AcceleratorSpec:
    """The accelerator settings one role's pods get: spec.accelerator with the role's resourceName, if
    any. Only the resource name differs per role; the device count stays `devices_of`."""
    if role.resource_name is None:
        return accel
    return dataclasses.replace(accel, resource_name=role.resource_name)


@dataclass(frozen=True)
class GatewaySpec:
    container: ContainerSpec
    replicas: int = 1
    service_type: str = "ClusterIP"
    api_key_secret: str | None = None
    api_key_key: str = "api-key"


@dataclass(frozen=True)
class DDDSpec:
    model: ModelSpec
    accelerator: AcceleratorSpec
    transfer: TransferSpec
    gateway: GatewaySpec
    roles: tuple[RoleSpec, ...]

    def role(self, name: str) -> RoleSpec:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(name)


def _pairs(d: Json | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in (d or {}).items()))


def _need(d: Json, key: str, where: str) -> Any:
    if key not in d or d[key] in (None, ""):
        raise SpecError(f"{where}.{key} is required")
    return d[key]


def _container(d: Json, where: str) -> ContainerSpec:
    pt = d.get("podTemplate") or {}
    names = [e.get("name") for e in d.get("env") or []]
    if len(names) != len(set(names)):
        raise SpecError(f"{where}.env: names must be unique")
    if any(str(x).startswith(c.ENV_PREFIX) for x in names):
        raise SpecError(f"{where}.env: names starting with {c.ENV_PREFIX} are set by the operator")
    return ContainerSpec(
        image=_need(d, "image", where),
        resources={k: dict(v) for k, v in (d.get("resources") or {}).items() if v},
        env=tuple(dict(e) for e in d.get("env") or []),
        pod_template=PodTemplateOverrides(
            annotations=_pairs(pt.get("annotations")),
            labels=_pairs(pt.get("labels")),
            node_selector=_pairs(pt.get("nodeSelector")),
            tolerations=tuple(dict(t) for t in pt.get("tolerations") or []),
            priority_class_name=pt.get("priorityClassName"),
        ),
    )


def _autoscaling(d: Json | None, where: str) -> AutoscalingSpec:
    d = d or {}
    a = AutoscalingSpec(
        enabled=bool(d.get("enabled", False)),
        hpa=bool(d.get("hpa", True)),
        min_replicas=int(d.get("minReplicas", 1)),
        max_replicas=d.get("maxReplicas"),
        target_queue_depth_per_replica=float(d.get("targetQueueDepthPerReplica", 1)),
        behavior=d.get("behavior"),
    )
    if a.enabled and a.hpa and a.max_replicas is None:
        raise SpecError(
            f"{where}.autoscaling.maxReplicas is required when autoscaling.enabled is true"
            " (unless hpa is false)"
        )
    if a.max_replicas is not None and a.min_replicas > a.max_replicas:
        raise SpecError(f"{where}.autoscaling.minReplicas must not exceed autoscaling.maxReplicas")
    return a


def _role_resource_name(d: Json | None, where: str, vendor: str) -> str | None:
    if d is None:
        return None
    where = f"{where}.accelerator"
    name = str(_need(d, "resourceName", where))
    if vendor == "cpu":
        raise SpecError(f"{where}.resourceName cannot be set when accelerator.vendor is cpu")
    if not re.fullmatch(s.RESOURCE_NAME_PATTERN, name):
        raise SpecError(
            f"{where}.resourceName must be an extended resource name <domain>/<name>, got {name!r}"
        )
    return name


def _encode_threads(v: Any, where: str, role: str) -> int | None:
    if v is None:
        return None
    if role != c.ROLE_DECODE:
        raise SpecError(f"{where}.encodeThreads is a decode setting (media encoding)")
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= s.MAX_ENCODE_THREADS:
        raise SpecError(f"{where}.encodeThreads must be an integer between 0 and {s.MAX_ENCODE_THREADS}")
    return v


def parse_spec(spec: Json) -> DDDSpec:
    """Spec dict (as stored) → DDDSpec with defaults applied; SpecError names the offending field."""
    if not isinstance(spec, dict):
        raise SpecError("spec must be an object")
    m = _need(spec, "model", "spec")
    if m.get("family") not in s.FAMILIES:
        raise SpecError(f"spec.model.family must be one of {', '.join(s.FAMILIES)}")
    vol = m.get("volume")
    model = ModelSpec(
        family=m["family"],
        path=_need(m, "path", "spec.model"),
        volume=ModelVolume(
            mount_path=vol["mountPath"],
            pvc_claim=(vol.get("persistentVolumeClaim") or {}).get("claimName"),
            host_path=(vol.get("hostPath") or {}).get("path"),
        )
        if vol
        else None,
    )
    a = _need(spec, "accelerator", "spec")
    if a.get("vendor") not in s.VENDORS:
        raise SpecError(f"spec.accelerator.vendor must be one of {', '.join(s.VENDORS)}")
    accel = AcceleratorSpec(
        vendor=a["vendor"],
        resource_name=a.get("resourceName"),
        devices_per_pod=int(a.get("devicesPerPod", 1)),
        shm_size_limit=str(a.get("shmSizeLimit", s.DEFAULT_SHM_SIZE_LIMIT)),
        node_selector=_pairs(a.get("nodeSelector")),
        tolerations=tuple(dict(t) for t in a.get("tolerations") or []),
        hccn_conf_host_path=a.get("hccnConfHostPath"),
    )
    if not 1 <= accel.devices_per_pod <= s.MAX_DEVICES_PER_POD:
        raise SpecError(f"spec.accelerator.devicesPerPod must be between 1 and {s.MAX_DEVICES_PER_POD}")
    t = spec.get("transfer") or {}
    pr = t.get("portRange") or {}
    transfer = TransferSpec(
        backend=t.get("backend", "tcp"),
        protocol=t.get("protocol"),
        rdma_devices=tuple(t.get("rdmaDevices") or ()),
        rdma_resource=t.get("rdmaResource"),
        buffer_bytes=int(t.get("bufferBytes", DEFAULT_BUFFER_BYTES)),
        port_min=int(pr.get("min", c.DEFAULT_TRANSFER_PORT_MIN)),
        port_max=int(pr.get("max", c.DEFAULT_TRANSFER_PORT_MAX)),
    )
    if transfer.mooncake and not transfer.protocol:
        raise SpecError("spec.transfer.protocol is required when transfer.backend is mooncake")
    g = _need(spec, "gateway", "spec")
    key = g.get("apiKeySecret") or {}
    gateway = GatewaySpec(
        container=_container(g, "spec.gateway"),
        replicas=int(g.get("replicas", 1)),
        service_type=g.get("serviceType", "ClusterIP"),
        api_key_secret=key.get("name"),
        api_key_key=key.get("key", "api-key"),
    )
    if gateway.replicas > 1:
        raise SpecError("spec.gateway.replicas must be 0 or 1 until video job state is shared")
    r = _need(spec, "roles", "spec")
    roles = []
    for name in c.STAGE_ROLES:
        rd = _need(r, name, "spec.roles")
        where = f"spec.roles.{name}"
        roles.append(
            RoleSpec(
                name=name,
                container=_container(rd, where),
                replicas=int(rd.get("replicas", 1)),
                replicas_set="replicas" in rd,
                autoscaling=_autoscaling(rd.get("autoscaling"), where),
                resource_name=_role_resource_name(rd.get("accelerator"), where, accel.vendor),
                encode_threads=_encode_threads(rd.get("encodeThreads"), where, name),
            )
        )
    return DDDSpec(model=model, accelerator=accel, transfer=transfer, gateway=gateway, roles=tuple(roles))
