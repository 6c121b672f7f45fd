"""Pure: the Deployment of each worker role and of the gateway."""

from __future__ import annotations

from diffdisagg.operator import accelerators
from diffdisagg.operator import contract as c
from diffdisagg.operator.api import names as n
from diffdisagg.operator.api.types import ContainerSpec, RoleSpec, accelerator_of, devices_of
from diffdisagg.operator.builders import wiring
from diffdisagg.operator.builders.common import Json, Owner, child_name, labels, metadata, selector_labels

TERMINATION_GRACE_SECONDS = 60


def _resources(container: ContainerSpec, extended: dict[str, int]) -> Json:
    requests = dict(container.resources.get("requests", {}))
    limits = dict(container.resources.get("limits", {}))
    for name, count in extended.items():
        # extended resources cannot be overcommitted: requests must equal limits
        requests[name] = count
        limits[name] = count
    out: Json = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _pod_template(
    owner: Owner,
    role: str,
    container: Json,
    volumes: list[Json],
    spec: ContainerSpec,
    base_selector: dict[str, str],
    base_tolerations: list[Json],
) -> Json:
    pt = spec.pod_template
    pod_labels = {**dict(pt.labels), **labels(owner, role), n.LABEL_REVISION: owner.revision}
    pod_spec: Json = {
        "containers": [container],
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
    }
    if volumes:
        pod_spec["volumes"] = volumes
    node_selector = {**base_selector, **dict(pt.node_selector)}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = base_tolerations + [dict(t) for t in pt.tolerations]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if pt.priority_class_name:
        pod_spec["priorityClassName"] = pt.priority_class_name
    meta: Json = {"labels": pod_labels}
    if pt.annotations:
        meta["annotations"] = dict(pt.annotations)
    return {"metadata": meta, "spec": pod_spec}


def _deployment(owner: Owner, role: str, replicas: int, template: Json) -> Json:
    meta = metadata(owner, child_name(owner, role), role)
    meta["annotations"] = {n.ANNOTATION_GENERATION: str(owner.generation)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(owner, role)},
            # never more pods than asked: accelerators are usually full, a surge pod would only wait
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": template,
        },
    }


def worker_deployment(owner: Owner, role: RoleSpec, replicas: int) -> Json:
    spec = owner.spec
    accel = accelerator_of(spec.accelerator, role)  # the role's resourceName, if it has one
    devices = devices_of(accel, role.name)
    device = accelerators.wiring(accel, devices)
    volumes, mounts = wiring.shared_volumes(owner)
    mv, mm = wiring.model_volume(owner)
    sv, sm = wiring.shm_volume(owner, devices)
    extended = dict(device.limits)
    rdma = spec.transfer.effective_rdma_resource
    if rdma:
        extended[rdma] = 1
    ports = [{"name": "control", "containerPort": c.DEFAULT_CONTROL_PORT, "protocol": "TCP"}]
    if not spec.transfer.mooncake:
        ports.append({"name": "transfer", "containerPort": c.DEFAULT_TRANSFER_PORT, "protocol": "TCP"})
    container: Json = {
        "name": role.name,
        "image": role.container.image,
        "args": list(c.WORKER_ARGS),
        "env": wiring.worker_env(owner, role.name, device, devices, role.encode_threads)
        + [dict(e) for e in role.container.env],
        "ports": ports,
        "volumeMounts": mounts + mm + sm + list(device.volume_mounts),
        # the control port speaks our own protocol, not HTTP: a TCP probe is all we can say about it
        "readinessProbe": {"tcpSocket": {"port": "control"}, "periodSeconds": 5},
    }
    res = _resources(role.container, extended)
    if res:
        container["resources"] = res
    template = _pod_template(
        owner,
        role.name,
        container,
        volumes + mv + sv + list(device.volumes),
        role.container,
        dict(accel.node_selector),
        [dict(t) for t in accel.tolerations],
    )
    return _deployment(owner, role.name, replicas, template)


def gateway_deployment(owner: Owner) -> Json:
    g = owner.spec.gateway
    volumes, mounts = wiring.shared_volumes(owner)
    kv, km = wiring.api_key_volume(owner)
    container: Json = {
        "name": c.ROLE_GATEWAY,
        "image": g.container.image,
        "command": list(c.GATEWAY_COMMAND),
        "env": wiring.gateway_env(owner) + [dict(e) for e in g.container.env],
        "ports": [{"name": "http", "containerPort": c.GATEWAY_HTTP_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts + km,
        "readinessProbe": {"httpGet": {"path": c.PATH_READY, "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": c.PATH_HEALTH, "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
    }
    res = _resources(g.container, {})
    if res:
        container["resources"] = res
    template = _pod_template(owner, c.ROLE_GATEWAY, container, volumes + kv, g.container, {}, [])
    return _deployment(owner, c.ROLE_GATEWAY, g.replicas, template)
