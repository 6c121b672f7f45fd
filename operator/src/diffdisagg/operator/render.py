"""Pure: `render(owner, observed) -> list[manifest]`, every child a DiffusionDisaggDeployment should have.

No I/O, no clock, no randomness: what varies comes in through `Observed` (the scalers' replica
counts the HPA chose, a fresh token in case the Secret must be created). The same input gives the
same list, in the same order, which is what makes the reconcile idempotent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from diffdisagg.operator.api import names as n
from diffdisagg.operator.api.types import DDDSpec, RoleSpec
from diffdisagg.operator.builders import config, network, scaling, service, workload
from diffdisagg.operator.builders.common import Json, Owner
from diffdisagg.operator.rollout import revision

# kinds written once, on creation, then left alone (see builders/config.py and builders/scaling.py)
CREATE_ONLY_KINDS = frozenset({"Secret", n.DRS_KIND})

# every kind render may emit, for pruning children that are no longer desired
MANAGED_KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "Secret"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    (n.API_VERSION, n.DRS_KIND),
)


@dataclass(frozen=True)
class Observed:
    """What render needs from the cluster: the scalers' spec.replicas per role, and a token to use if
    the Secret does not exist yet (ignored otherwise, since the Secret is create-only)."""

    scaler_replicas: Mapping[str, int] = field(default_factory=dict)
    new_token: str = ""


def make_owner(name: str, namespace: str, uid: str, generation: int, spec: DDDSpec) -> Owner:
    return Owner(
        name=name, namespace=namespace, uid=uid, generation=generation, spec=spec, revision=revision(spec)
    )


def role_replicas(role: RoleSpec, observed: Observed) -> int:
    """Autoscaled: whatever the scaler says (its initial value until it exists); else the inline count."""
    if role.autoscaled:
        return observed.scaler_replicas.get(role.name, scaling.initial_replicas(role))
    return role.replicas


def render(owner: Owner, observed: Observed) -> list[Json]:
    out: list[Json] = [
        config.token_secret(owner, observed.new_token),
        config.config_map(owner),
        network.network_policy(owner),
    ]
    for role in owner.spec.roles:
        out.append(service.worker_service(owner, role.name))
        out.append(workload.worker_deployment(owner, role, role_replicas(role, observed)))
        if role.autoscaled:
            out.append(scaling.scaler(owner, role))
            if role.autoscaling.hpa:  # else an external autoscaler (KEDA) drives the scaler's /scale
                out.append(scaling.hpa(owner, role))
    out.append(service.gateway_service(owner))
    out.append(workload.gateway_deployment(owner))
    return out


def key(manifest: Json) -> tuple[str, str, str]:
    """Identity of a manifest within one namespace: (apiVersion, kind, name)."""
    return manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]


__all__ = ["CREATE_ONLY_KINDS", "MANAGED_KINDS", "Observed", "key", "make_owner", "render", "role_replicas"]
