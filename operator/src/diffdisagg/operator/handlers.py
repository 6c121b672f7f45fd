"""The only module with `@kopf.*`: thin handlers that call `reconcile()` and post its events.

Handlers are registered into an explicit registry by `register(registry)` (called from `__main__`);
their dependencies (OperatorConfig, the kube adapter) come through kopf's memo, not module globals.
Triggers:
create/update/resume on DiffusionDisaggDeployments; events of owned Deployments and of
DiffusionRoleScalers (that is how `kubectl scale drs` or the HPA reach the Deployment within seconds);
and a periodic resync task started on startup (not a kopf timer: timers force a finalizer).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from diffdisagg.operator import contract as c
from diffdisagg.operator.api import names as n
from diffdisagg.operator.errors import NotReady, SpecError
from diffdisagg.operator.reconcile import OperatorContext, Result, reconcile, resync_forever
from diffdisagg.operator.status import REASON_INVALID_SPEC

logger = logging.getLogger(__name__)

RETRY_DELAY_SECONDS = 5.0


def _post(result: Result | None) -> None:
    if result is None or result.body is None:
        return
    for ev in result.events:
        kopf.event(result.body, type=ev.type, reason=ev.reason, message=ev.message)


def _raise_for(result: Result | None) -> None:
    if result is None or result.failure is None:
        return
    if result.failure.reason == REASON_INVALID_SPEC:
        raise SpecError(result.failure.message)
    raise NotReady(result.failure.message, delay=RETRY_DELAY_SECONDS)


async def _reconcile_quietly(memo: Any, namespace: str, name: str) -> None:
    """For watch-event triggers: a failure is logged in one line, not raised (kopf would print a traceback
    and ignore it anyway); the next event, the resync, or the DDD's own handlers retry."""
    try:
        _post(await reconcile(memo.ctx, namespace, name, coalesce=True))
    except Exception as e:
        logger.warning("reconcile of %s/%s (child event) failed, will retry later: %s", namespace, name, e)


def register(registry: kopf.OperatorRegistry) -> None:
    ddd = dict(group=n.GROUP, version=n.VERSION, plural=n.DDD_PLURAL, registry=registry)
    managed = {c.LABEL_MANAGED_BY: c.LABEL_MANAGED_BY_VALUE}

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # a fresh registry has none of kopf's default login handlers: in-cluster first, then KUBECONFIG
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        from diffdisagg.operator.kube import Kube  # the adapter is built where the loop runs

        ctx: OperatorContext = memo.ctx
        ctx.config.apply_to(settings)
        ctx.kube = Kube.from_environment(
            n.FIELD_MANAGER, n.INIT_FIELD_MANAGER, ctx.config.conflict_retries, ctx.config.request_timeout
        )
        ctx.resync_task = asyncio.create_task(resync_forever(ctx, _post), name="diffdisagg-resync")

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: Any, **_: Any) -> None:
        if memo.ctx.resync_task is not None:
            memo.ctx.resync_task.cancel()
        if memo.ctx.kube is not None:
            await memo.ctx.kube.close()

    @kopf.on.probe(id="reconciles", registry=registry)
    def probe(memo: Any, **_: Any) -> int:
        return len(memo.ctx._slots)

    @kopf.on.resume(**ddd, id="reconcile")
    @kopf.on.create(**ddd, id="reconcile")
    @kopf.on.update(**ddd, id="reconcile")
    async def changed(name: str, namespace: str, memo: Any, **_: Any) -> None:
        result = await reconcile(memo.ctx, namespace, name)
        _post(result)
        _raise_for(result)

    @kopf.on.event("apps", "v1", "deployments", labels=managed, registry=registry, id="child")
    async def child_changed(type: str | None, labels: Any, namespace: str, memo: Any, **_: Any) -> None:
        owner = labels.get(c.LABEL_DEPLOYMENT)
        if owner and type is not None:  # type None: the initial listing, already covered by resume
            await _reconcile_quietly(memo, namespace, owner)

    @kopf.on.event(n.GROUP, n.VERSION, n.DRS_PLURAL, registry=registry, id="scaler")
    async def scaler_changed(type: str | None, spec: Any, namespace: str, memo: Any, **_: Any) -> None:
        owner = spec.get("deployment")
        if owner and type is not None:
            await _reconcile_quietly(memo, namespace, owner)
