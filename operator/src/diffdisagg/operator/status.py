"""Pure: the DiffusionDisaggDeployment status and the user-facing events, computed from the children.

Input is what the reconcile observed (the Deployments it just applied, the scalers, the HPAs, an
error if the spec could not be rendered or applied) plus the previous status; output is the new
status and the events that describe the difference. `now` comes in as an argument so this stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffdisagg.operator import contract as c
from diffdisagg.operator.api import names as n
from diffdisagg.operator.builders.common import Owner, gateway_url

Json = dict[str, Any]

# event reasons (what a user sees in `kubectl describe ddd`)
REASON_CREATED = "Created"
REASON_SCALED = "Scaled"
REASON_ROLLOUT_STARTED = "RolloutStarted"
REASON_ROLLOUT_COMPLETE = "RolloutComplete"
REASON_REPLICAS_IGNORED = "ReplicasIgnored"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_APPLY_FAILED = "ApplyFailed"
REASON_READY = "Ready"


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Failure:
    reason: str  # REASON_INVALID_SPEC | REASON_APPLY_FAILED
    message: str


def pool_status(deployment: Json | None) -> Json:
    if deployment is None:
        return {"desired": 0, "ready": 0, "updated": 0, "summary": "0/0"}
    desired = int((deployment.get("spec") or {}).get("replicas") or 0)
    st = deployment.get("status") or {}
    ready = int(st.get("readyReplicas") or 0)
    return {
        "desired": desired,
        "ready": ready,
        "updated": int(st.get("updatedReplicas") or 0),
        "summary": f"{ready}/{desired}",
    }


def rolled_out(deployment: Json | None) -> bool:
    """Deployment controller's own notion of a finished rollout (kubectl rollout status)."""
    if deployment is None:
        return False
    st = deployment.get("status") or {}
    desired = int((deployment.get("spec") or {}).get("replicas") or 0)
    gen = (deployment.get("metadata") or {}).get("generation", 0)
    return (
        int(st.get("observedGeneration") or 0) >= gen
        and int(st.get("updatedReplicas") or 0) == desired
        and int(st.get("replicas") or 0) == desired
        and int(st.get("availableReplicas") or 0) == desired
    )


def _stuck(deployment: Json | None) -> str | None:
    for cond in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return cond.get("message") or "ReplicaFailure"
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return cond.get("message") or "ProgressDeadlineExceeded"
    return None


def endpoint(owner: Owner, gateway_service: Json | None) -> str:
    ingress = ((((gateway_service or {}).get("status") or {}).get("loadBalancer") or {}).get("ingress")) or []
    if ingress:
        host = ingress[0].get("ip") or ingress[0].get("hostname")
        if host:
            return f"http://{host}:{c.GATEWAY_HTTP_PORT}"
    return gateway_url(owner)


def condition(
    prev: dict[str, Json], type_: str, ok: bool, reason: str, message: str, generation: int, now: str
) -> Json:
    status = "True" if ok else "False"
    old = prev.get(type_)
    since = (
        old.get("lastTransitionTime")
        if old and old.get("status") == status and old.get("lastTransitionTime")
        else now
    )
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def compute(
    owner: Owner,
    *,
    deployments: dict[str, Json | None],
    scalers: dict[str, Json | None],
    hpas: dict[str, Json | None],
    gateway_service: Json | None,
    failure: Failure | None,
    previous: Json,
    now: str,
) -> tuple[Json, list[Event]]:
    """(new status, events). `deployments` is keyed by role incl. gateway."""
    spec = owner.spec
    prev_conds = {cd.get("type"): cd for cd in previous.get("conditions") or []}
    roles = {}
    for r in spec.roles:
        roles[r.name] = pool_status(deployments.get(r.name)) | {"autoscaled": r.autoscaled}
    gw = pool_status(deployments.get(c.ROLE_GATEWAY)) | {"endpoint": endpoint(owner, gateway_service)}

    not_ready = [name for name, p in [*roles.items(), (c.ROLE_GATEWAY, gw)] if p["ready"] < 1]
    pending = [name for name in [*roles, c.ROLE_GATEWAY] if not rolled_out(deployments.get(name))]
    stuck = {name: m for name in [*roles, c.ROLE_GATEWAY] if (m := _stuck(deployments.get(name)))}
    own_hpa = {r.name: r.autoscaling.hpa for r in spec.roles}
    autoscaled = [r.name for r in spec.roles if r.autoscaled]
    missing_scalers = [
        r
        for r in autoscaled
        if scalers.get(r) is None
        or not ((scalers[r] or {}).get("status") or {}).get("selector")
        or (own_hpa[r] and hpas.get(r) is None)
    ]
    gen = owner.generation

    if failure:
        degraded = condition(prev_conds, n.COND_DEGRADED, True, failure.reason, failure.message, gen, now)
    elif stuck:
        degraded = condition(
            prev_conds,
            n.COND_DEGRADED,
            True,
            "RolloutStuck",
            "; ".join(f"{k}: {v}" for k, v in sorted(stuck.items())),
            gen,
            now,
        )
    else:
        degraded = condition(prev_conds, n.COND_DEGRADED, False, "AsExpected", "", gen, now)
    ready_ok = not not_ready and failure is None
    conditions = [
        condition(
            prev_conds,
            n.COND_READY,
            ready_ok,
            "AllRolesReady" if ready_ok else "RolesNotReady",
            "every role and the gateway have ready replicas"
            if ready_ok
            else "no ready replicas: " + ", ".join(not_ready)
            if not_ready
            else "see Degraded",
            gen,
            now,
        ),
        condition(
            prev_conds,
            n.COND_PROGRESSING,
            bool(pending),
            "RollingOut" if pending else "Complete",
            ("waiting for " + ", ".join(pending)) if pending else f"revision {owner.revision} rolled out",
            gen,
            now,
        ),
        degraded,
        condition(
            prev_conds,
            n.COND_SCALERS_READY,
            not missing_scalers,
            ("ScalersSynced" if autoscaled else "NoAutoscaling") if not missing_scalers else "ScalerMissing",
            ("scalers and HPAs present for " + ", ".join(autoscaled))
            if autoscaled and not missing_scalers
            else ("waiting for scaler/HPA of " + ", ".join(missing_scalers))
            if missing_scalers
            else "no role is autoscaled",
            gen,
            now,
        ),
    ]
    status: Json = {
        "observedGeneration": gen,
        "revision": owner.revision,
        "conditions": conditions,
        "roles": roles,
        "gateway": gw,
    }
    return status, _events(owner, status, previous, failure)


def _events(owner: Owner, new: Json, previous: Json, failure: Failure | None) -> list[Event]:
    events: list[Event] = []
    first = "observedGeneration" not in previous
    new_spec = previous.get("observedGeneration") != owner.generation
    if failure:
        prev_deg = {cd.get("type"): cd for cd in previous.get("conditions") or []}.get(n.COND_DEGRADED, {})
        if new_spec or prev_deg.get("message") != failure.message:
            events.append(Event("Warning", failure.reason, failure.message))
        return events
    if first:
        events.append(Event("Normal", REASON_CREATED, f"rendered revision {owner.revision}"))
    elif previous.get("revision") and previous["revision"] != owner.revision:
        events.append(
            Event(
                "Normal",
                REASON_ROLLOUT_STARTED,
                f"rolling every role from revision {previous['revision']} to {owner.revision}",
            )
        )
    if new_spec:
        for r in owner.spec.roles:
            if r.autoscaled and r.replicas_set:
                events.append(
                    Event(
                        "Normal",
                        REASON_REPLICAS_IGNORED,
                        f"spec.roles.{r.name}.replicas={r.replicas} is ignored: the role is autoscaled "
                        f"(DiffusionRoleScaler {owner.name}-{r.name} sets the replicas)",
                    )
                )
    if not first:
        prev_roles = {**(previous.get("roles") or {}), c.ROLE_GATEWAY: previous.get("gateway") or {}}
        new_roles = {**new["roles"], c.ROLE_GATEWAY: new["gateway"]}
        for role, p in new_roles.items():
            old = prev_roles.get(role, {}).get("desired")
            if old is not None and old != p["desired"]:
                how = "scaler" if p.get("autoscaled") else "spec"
                events.append(
                    Event("Normal", REASON_SCALED, f"{role}: {old} → {p['desired']} replicas ({how})")
                )
    prev_conds = {cd.get("type"): cd for cd in previous.get("conditions") or []}
    new_conds = {cd["type"]: cd for cd in new["conditions"]}
    if (
        prev_conds.get(n.COND_PROGRESSING, {}).get("status") == "True"
        and new_conds[n.COND_PROGRESSING]["status"] == "False"
    ):
        events.append(Event("Normal", REASON_ROLLOUT_COMPLETE, f"revision {owner.revision} rolled out"))
    if (
        new_conds[n.COND_READY]["status"] == "True"
        and prev_conds.get(n.COND_READY, {}).get("status") != "True"
    ):
        events.append(Event("Normal", REASON_READY, "every role and the gateway have ready replicas"))
    deg = new_conds[n.COND_DEGRADED]
    if deg["status"] == "True" and prev_conds.get(n.COND_DEGRADED, {}).get("status") != "True":
        events.append(Event("Warning", deg["reason"], deg["message"]))
    return events
