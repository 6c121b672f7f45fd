"""Pure: a headless Service per worker role (peer discovery by DNS) and the gateway's Service."""

from __future__ import annotations

from diffdisagg.operator import contract as c
from diffdisagg.operator.builders.common import Json, Owner, child_name, metadata, selector_labels


def worker_service(owner: Owner, role: str) -> Json:
    ports = [{"name": "control", "port": c.DEFAULT_CONTROL_PORT, "targetPort": "control", "protocol": "TCP"}]
    if not owner.spec.transfer.mooncake:
        ports.append(
            {"name": "transfer", "port": c.DEFAULT_TRANSFER_PORT, "targetPort": "transfer", "protocol": "TCP"}
        )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, child_name(owner, role), role),
        "spec": {
            "clusterIP": "None",
            # peers must find a starting worker before it is ready (it registers, then reports ready)
            "publishNotReadyAddresses": True,
            "selector": selector_labels(owner, role),
            "ports": ports,
        },
    }


def gateway_service(owner: Owner) -> Json:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, child_name(owner, c.ROLE_GATEWAY), c.ROLE_GATEWAY),
        "spec": {
            "type": owner.spec.gateway.service_type,
            "selector": selector_labels(owner, c.ROLE_GATEWAY),
            "ports": [{"name": "http", "port": c.GATEWAY_HTTP_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
