"""The one idempotent, level-triggered reconcile: observe → render → apply → prune → status.

Every trigger (create, update, resume, the timer, an owned child's or a scaler's event) ends up
here with just (namespace, name); the reconcile re-reads everything it needs. Per deployment a lock
serialises runs and coalesces bursts of child events into at most one follow-up run. This is the
only module that imports `kube`.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffdisagg.operator import contract as c
from diffdisagg.operator import status as st
from diffdisagg.operator.api import names as n
from diffdisagg.operator.api.types import parse_spec
from diffdisagg.operator.builders import scaling
from diffdisagg.operator.builders.common import Owner, child_name
from diffdisagg.operator.config import OperatorConfig
from diffdisagg.operator.errors import SpecError
from diffdisagg.operator.kube import Kube
from diffdisagg.operator.render import CREATE_ONLY_KINDS, MANAGED_KINDS, Observed, key, make_owner, render

logger = logging.getLogger(__name__)
Json = dict[str, Any]


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: bool = False


@dataclass
class OperatorContext:
    """What handlers get through kopf's memo: config and the kube adapter (no module globals)."""

    config: OperatorConfig
    kube: Kube | None = None
    resync_task: asyncio.Task[None] | None = None
    _slots: dict[tuple[str, str], _Slot] = field(default_factory=dict)
    # (namespace, apiVersion, kind, name) -> (fingerprint of what we applied, version of the result)
    applied: dict[tuple[str, str, str, str], tuple[str, str]] = field(default_factory=dict)

    def slot(self, namespace: str, name: str) -> _Slot:
        return self._slots.setdefault((namespace, name), _Slot())

    def forget(self, namespace: str, name: str) -> None:
        self._slots.pop((namespace, name), None)
        prefix = f"{name}-"
        for k in [k for k in self.applied if k[0] == namespace and k[3].startswith(prefix)]:
            del self.applied[k]


@dataclass(frozen=True)
class Result:
    body: Json | None  # the DiffusionDisaggDeployment as read (None: gone or being deleted)
    events: tuple[st.Event, ...] = ()
    failure: st.Failure | None = None
    applied: int = 0
    created: int = 0
    deleted: int = 0


def _fingerprint(manifest: Json) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _version(obj: Json) -> str:
    """What changes when anyone but a status writer touches the object: its generation (objects with a
    spec) or resourceVersion (objects without one), plus labels, annotations and owners, which no
    generation covers."""
    meta = obj.get("metadata") or {}
    base = str(meta.get("generation") or f"rv{meta.get('resourceVersion')}")
    extra = json.dumps(
        [meta.get("labels"), meta.get("annotations"), meta.get("ownerReferences")], sort_keys=True
    )
    return base + hashlib.sha256(extra.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owned_by(obj: Json, uid: str) -> bool:
    return any(
        ref.get("uid") == uid and ref.get("controller")
        for ref in obj["metadata"].get("ownerReferences") or []
    )


async def reconcile(
    ctx: OperatorContext, namespace: str, name: str, *, coalesce: bool = False
) -> Result | None:
    """Bring one deployment's children and status in line with its spec.

    coalesce=True (child events): if a run for this deployment is already waiting, return None at once —
    that waiting run will observe whatever this event was about.
    """
    slot = ctx.slot(namespace, name)
    if coalesce and slot.pending:
        return None
    slot.pending = True
    async with slot.lock:
        slot.pending = False
        return await _reconcile(ctx, namespace, name)


async def resync_forever(ctx: OperatorContext, on_result: Callable[[Result | None], None]) -> None:
    """Periodic level-triggered pass over every watched deployment (drift correction).

    An operator-level task rather than a kopf timer: kopf puts a finalizer on every object that has a
    timer, and a finalizer would make deleting a deployment hang whenever the operator is down.
    """
    namespaces: list[str | None] = list(ctx.config.namespaces) or [None]
    while True:
        await asyncio.sleep(ctx.config.resync_seconds)
        for ns in namespaces:
            try:
                assert ctx.kube is not None
                items = await ctx.kube.list(n.API_VERSION, n.DDD_KIND, ns)
            except Exception as e:
                logger.warning("resync: listing deployments in %s failed: %s", ns or "all namespaces", e)
                continue
            for item in items:
                meta = item["metadata"]
                try:
                    on_result(await reconcile(ctx, meta["namespace"], meta["name"], coalesce=True))
                except Exception as e:
                    logger.warning(
                        "resync of %s/%s failed, will retry: %s", meta["namespace"], meta["name"], e
                    )


async def _reconcile(ctx: OperatorContext, namespace: str, name: str) -> Result:
    kube = ctx.kube
    assert kube is not None, "kube adapter not initialised (startup handler did not run)"
    body = await kube.get(n.API_VERSION, n.DDD_KIND, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        ctx.forget(namespace, name)
        return Result(body=None)  # garbage collection removes the children through ownerReferences
    meta = body["metadata"]
    previous = {k: v for k, v in (body.get("status") or {}).items() if k != "kopf"}
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError as e:
        failure = st.Failure(st.REASON_INVALID_SPEC, str(e))
        await _write_failure(kube, body, previous, failure)
        return Result(
            body=body, events=(st.Event("Warning", failure.reason, failure.message),), failure=failure
        )
    owner = make_owner(name, namespace, meta["uid"], int(meta.get("generation") or 0), spec)

    selector = {c.LABEL_DEPLOYMENT: name}
    existing: dict[tuple[str, str, str], Json] = {}
    for api_version, kind in MANAGED_KINDS:
        for obj in await kube.list(api_version, kind, namespace, selector):
            obj.setdefault("apiVersion", api_version)
            obj.setdefault("kind", kind)
            if _owned_by(obj, owner.uid):
                existing[key(obj)] = obj

    scaler_replicas = {}
    for role in spec.roles:
        drs = existing.get((n.API_VERSION, n.DRS_KIND, child_name(owner, role.name)))
        if drs is not None and (drs.get("spec") or {}).get("replicas") is not None:
            scaler_replicas[role.name] = int(drs["spec"]["replicas"])
    observed = Observed(scaler_replicas=scaler_replicas, new_token=secrets.token_urlsafe(32))

    failure: st.Failure | None = None
    live: dict[tuple[str, str, str], Json] = {}
    applied = created = deleted = 0
    desired = render(owner, observed)
    try:
        for manifest in desired:
            k = key(manifest)
            if manifest["kind"] in CREATE_ONLY_KINDS:
                if k in existing:
                    live[k] = existing[k]
                    continue
                obj = await kube.create_once(manifest)
                if obj is None:  # created meanwhile by someone else (a previous, interrupted run)
                    obj = await kube.get(manifest["apiVersion"], manifest["kind"], namespace, k[2])
                else:
                    created += 1
                if obj is not None:
                    live[k] = obj
            else:
                # skip the request when we applied exactly this before and nobody changed the object
                # since (a server-side apply of identical content would be a no-op anyway)
                ck = (namespace, *k)
                fp = _fingerprint(manifest)
                have = existing.get(k)
                if have is not None and ctx.applied.get(ck) == (fp, _version(have)):
                    live[k] = have
                    continue
                obj = await kube.apply(manifest)
                ctx.applied[ck] = (fp, _version(obj))
                live[k] = obj
                applied += 1
        wanted = {key(m) for m in desired}
        for k in existing:
            if k not in wanted:
                await kube.delete(k[0], k[1], namespace, k[2])
                deleted += 1
        scalers = await _sync_scalers(kube, owner, live)
    except Exception as e:  # report any API failure on the object, then let kopf retry
        logger.warning("applying children of %s/%s failed: %s", namespace, name, e)
        failure = st.Failure(st.REASON_APPLY_FAILED, f"{type(e).__name__}: {e}"[:1000])
        scalers = {}

    deployments = {
        role: live.get(("apps/v1", "Deployment", child_name(owner, role)))
        for role in [*c.STAGE_ROLES, c.ROLE_GATEWAY]
    }
    hpas = {
        r.name: live.get(("autoscaling/v2", "HorizontalPodAutoscaler", child_name(owner, r.name)))
        for r in spec.roles
    }
    status, events = st.compute(
        owner,
        deployments=deployments,
        scalers=scalers,
        hpas=hpas,
        gateway_service=live.get(("v1", "Service", child_name(owner, c.ROLE_GATEWAY))),
        failure=failure,
        previous=previous,
        now=_now(),
    )
    await _write_status(kube, owner, previous, status)
    logger.info(
        "reconciled %s/%s generation=%d revision=%s applied=%d created=%d deleted=%d failure=%s",
        namespace,
        name,
        owner.generation,
        owner.revision,
        applied,
        created,
        deleted,
        failure.reason if failure else "none",
    )
    return Result(
        body=body, events=tuple(events), failure=failure, applied=applied, created=created, deleted=deleted
    )


async def _sync_scalers(
    kube: Kube, owner: Owner, live: dict[tuple[str, str, str], Json]
) -> dict[str, Json | None]:
    """Copy each autoscaled role's Deployment counts into its scaler's status (the /scale read side)."""
    out: dict[str, Json | None] = {}
    for role in owner.spec.roles:
        if not role.autoscaled:
            continue
        drs = live.get((n.API_VERSION, n.DRS_KIND, child_name(owner, role.name)))
        dep = live.get(("apps/v1", "Deployment", child_name(owner, role.name)))
        if drs is None or dep is None:
            out[role.name] = drs
            continue
        dst = dep.get("status") or {}
        want = scaling.scaler_status(
            owner,
            role.name,
            int(dst.get("replicas") or 0),
            int(dst.get("readyReplicas") or 0),
            int(drs["metadata"].get("generation") or 0),
        )
        have = drs.get("status") or {}
        if all(have.get(k) == v for k, v in want["status"].items()):
            out[role.name] = drs
        else:
            out[role.name] = await kube.apply_status(want)
    return out


def _same(previous: Json, status: Json) -> bool:
    return all(previous.get(k) == v for k, v in status.items())


async def _write_status(kube: Kube, owner: Owner, previous: Json, status: Json) -> None:
    if _same(previous, status):
        return  # an unchanged status is not written: a quiet reconcile changes no resourceVersion
    await kube.patch_status(n.API_VERSION, n.DDD_KIND, owner.namespace, owner.name, status)


async def _write_failure(kube: Kube, body: Json, previous: Json, failure: st.Failure) -> None:
    gen = int(body["metadata"].get("generation") or 0)
    prev = {cd.get("type"): cd for cd in previous.get("conditions") or []}
    conds = []
    now = _now()
    for type_, ok, reason, msg in [
        (n.COND_READY, False, "RolesNotReady", "see Degraded"),
        (n.COND_DEGRADED, True, failure.reason, failure.message),
    ]:
        cond = st.condition(prev, type_, ok, reason, msg, gen, now)
        conds.append(cond)
    others = [cd for t, cd in prev.items() if t not in (n.COND_READY, n.COND_DEGRADED)]
    status = {"observedGeneration": gen, "conditions": conds + others}
    if not _same(previous, status):
        await kube.patch_status(
            n.API_VERSION, n.DDD_KIND, body["metadata"]["namespace"], body["metadata"]["name"], status
        )
