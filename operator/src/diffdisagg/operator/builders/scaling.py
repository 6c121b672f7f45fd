"""Pure: the DiffusionRoleScaler and the autoscaling/v2 HPA of an autoscaled role.

Flow is one-way: HPA → scaler.spec.replicas (via /scale) → operator → Deployment. The scaler is
create-only: `spec.replicas` is written once, at creation, under the init field manager, and the
operator never applies the scaler's spec again, so it can never take that field away from the HPA
(the server-side-apply trap); only the status subresource is applied afterwards.
"""

from __future__ import annotations

from diffdisagg.operator import contract as c
from diffdisagg.operator.api import names as n
from diffdisagg.operator.api.types import RoleSpec
from diffdisagg.operator.builders.common import Json, Owner, child_name, metadata, selector_string


def initial_replicas(role: RoleSpec) -> int:
    """The scaler's first spec.replicas: the autoscaler's floor (the inline replicas are ignored)."""
    return role.autoscaling.min_replicas


def quantity(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}m"


def scaler(owner: Owner, role: RoleSpec) -> Json:
    return {
        "apiVersion": n.API_VERSION,
        "kind": n.DRS_KIND,
        "metadata": metadata(owner, child_name(owner, role.name), role.name),
        "spec": {"replicas": initial_replicas(role), "deployment": owner.name, "role": role.name},
    }


def scaler_status(owner: Owner, role: str, replicas: int, ready: int, generation: int) -> Json:
    return {
        "apiVersion": n.API_VERSION,
        "kind": n.DRS_KIND,
        "metadata": {"name": child_name(owner, role), "namespace": owner.namespace},
        "status": {
            "replicas": replicas,
            "readyReplicas": ready,
            "selector": selector_string(owner, role),
            "observedGeneration": generation,
        },
    }


def hpa(owner: Owner, role: RoleSpec) -> Json:
    a = role.autoscaling
    spec: Json = {
        "scaleTargetRef": {
            "apiVersion": n.API_VERSION,
            "kind": n.DRS_KIND,
            "name": child_name(owner, role.name),
        },
        "minReplicas": a.min_replicas,
        "maxReplicas": a.max_replicas,
        "metrics": [
            {
                "type": "External",
                "external": {
                    "metric": {
                        "name": c.METRIC_QUEUE_DEPTH,
                        "selector": {
                            "matchLabels": {
                                c.METRIC_LABEL_DEPLOYMENT: owner.name,
                                c.METRIC_LABEL_ROLE: role.name,
                            }
                        },
                    },
                    # queue per replica: backlog held upstream still scales this pool (DESIGN: queue depth)
                    "target": {
                        "type": "AverageValue",
                        "averageValue": quantity(a.target_queue_depth_per_replica),
                    },
                },
            }
        ],
    }
    if a.behavior:
        spec["behavior"] = a.behavior
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(owner, child_name(owner, role.name), role.name),
        "spec": spec,
    }
