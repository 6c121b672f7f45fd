"""Pure: the NetworkPolicy that lets only the deployment's own pods reach its workers' ports.

It selects the worker pods (not the gateway, which clients must reach) and admits pods carrying the
deployment's label on the control port, the tcp backend's data port, or mooncake's fixed range.
"""

from __future__ import annotations

from diffdisagg.operator import contract as c
from diffdisagg.operator.builders.common import Json, Owner, metadata, network_policy_name


def worker_ports(owner: Owner) -> list[Json]:
    t = owner.spec.transfer
    ports: list[Json] = [{"protocol": "TCP", "port": c.DEFAULT_CONTROL_PORT}]
    if t.mooncake:
        ports.append({"protocol": "TCP", "port": t.port_min, "endPort": t.port_max})
    else:
        ports.append({"protocol": "TCP", "port": c.DEFAULT_TRANSFER_PORT})
    return ports


def network_policy(owner: Owner) -> Json:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(owner, network_policy_name(owner)),
        "spec": {
            "podSelector": {
                "matchLabels": {c.LABEL_DEPLOYMENT: owner.name},
                "matchExpressions": [{"key": c.LABEL_ROLE, "operator": "In", "values": list(c.STAGE_ROLES)}],
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {c.LABEL_DEPLOYMENT: owner.name}}}],
                    "ports": worker_ports(owner),
                }
            ],
        },
    }
