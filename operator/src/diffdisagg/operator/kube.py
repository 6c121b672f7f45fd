"""The one Kubernetes API adapter (lightkube, async): server-side apply, create-only, get/list/delete.

Only `reconcile` imports this module. Manifests go in and come out as plain dicts. Every write is
retried on 409 Conflict (a racing writer, an object being replaced) a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from lightkube import ALL_NS, AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.autoscaling_v2 import HorizontalPodAutoscaler
from lightkube.resources.core_v1 import ConfigMap, Secret, Service
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.types import PatchType

from diffdisagg.operator.api import names as n

logger = logging.getLogger(__name__)
Json = dict[str, Any]

DDD = create_namespaced_resource(n.GROUP, n.VERSION, n.DDD_KIND, n.DDD_PLURAL)
DRS = create_namespaced_resource(n.GROUP, n.VERSION, n.DRS_KIND, n.DRS_PLURAL)

_RESOURCES: dict[tuple[str, str], Any] = {
    ("v1", "Secret"): Secret,
    ("v1", "ConfigMap"): ConfigMap,
    ("v1", "Service"): Service,
    ("apps/v1", "Deployment"): Deployment,
    ("networking.k8s.io/v1", "NetworkPolicy"): NetworkPolicy,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): HorizontalPodAutoscaler,
    (n.API_VERSION, n.DDD_KIND): DDD,
    (n.API_VERSION, n.DRS_KIND): DRS,
}


# 409: a racing writer; 429: throttled, or a custom resource's storage re-initialising after its CRD
# changed; 500/503/504: a restarting or overloaded API server. Anything else is not retried here.
RETRIED = frozenset({409, 429, 500, 503, 504})


def _res(api_version: str, kind: str) -> Any:
    try:
        return _RESOURCES[(api_version, kind)]
    except KeyError:
        raise ValueError(f"kube adapter does not know {api_version} {kind}") from None


def _dict(obj: Any) -> Json:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ApiError) and exc.status.code == 404


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ApiError) and exc.status.code == 409


class Kube:
    """Async API adapter. One instance per operator process (created on startup, closed on cleanup)."""

    def __init__(
        self, client: AsyncClient, field_manager: str, init_field_manager: str, conflict_retries: int = 5
    ) -> None:
        self._client = client
        self._fm = field_manager
        self._init_fm = init_field_manager
        self._retries = conflict_retries

    @classmethod
    def from_environment(
        cls, field_manager: str, init_field_manager: str, conflict_retries: int = 5, timeout: float = 30.0
    ) -> Kube:
        # lightkube picks KUBECONFIG / ~/.kube/config, or the in-cluster service account
        return cls(
            AsyncClient(field_manager=field_manager, timeout=timeout),
            field_manager,
            init_field_manager,
            conflict_retries,
        )

    async def close(self) -> None:
        await self._client.close()

    async def _retrying(self, what: str, call: Any) -> Any:
        delay = 0.05
        for attempt in range(self._retries + 1):
            try:
                return await call()
            except ApiError as e:
                if e.status.code not in RETRIED or attempt == self._retries:
                    raise
                logger.info(
                    "%s on %s (attempt %d), retrying: %s", e.status.code, what, attempt + 1, e.status.message
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Json | None:
        try:
            return _dict(
                await self._retrying(
                    f"get {kind} {namespace}/{name}",
                    lambda: self._client.get(_res(api_version, kind), name, namespace=namespace),
                )
            )
        except ApiError as e:
            if e.status.code == 404:
                return None
            raise

    async def list(
        self, api_version: str, kind: str, namespace: str | None, labels: dict[str, str] | None = None
    ) -> list[Json]:
        """Objects of one kind in `namespace` (None: every namespace) matching `labels`."""
        ns = ALL_NS if namespace is None else namespace

        async def collect() -> list[Json]:
            return [
                _dict(o)
                async for o in self._client.list(_res(api_version, kind), namespace=ns, labels=labels)
            ]

        return await self._retrying(f"list {kind} in {ns}", collect)

    async def apply(self, manifest: Json) -> Json:
        """Server-side apply under the operator's field manager (force: the operator owns these fields)."""
        res = _res(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        what = f"{manifest['kind']} {meta['namespace']}/{meta['name']}"
        return _dict(
            await self._retrying(
                what,
                lambda: self._client.patch(
                    res,
                    meta["name"],
                    manifest,
                    namespace=meta["namespace"],
                    patch_type=PatchType.APPLY,
                    field_manager=self._fm,
                    force=True,
                ),
            )
        )

    async def apply_status(self, manifest: Json) -> Json:
        """Server-side apply of the status subresource (custom resources only)."""
        res = _res(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        what = f"{manifest['kind']} {meta['namespace']}/{meta['name']} status"
        return _dict(
            await self._retrying(
                what,
                lambda: self._client.patch(
                    res.Status,
                    meta["name"],
                    manifest,
                    namespace=meta["namespace"],
                    patch_type=PatchType.APPLY,
                    field_manager=self._fm,
                    force=True,
                ),
            )
        )

    async def create_once(self, manifest: Json) -> Json | None:
        """Create under the init field manager; None when it already exists (never overwritten)."""
        res = _res(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        try:
            # a POST, not an apply: an apply would re-assert the initial values on an existing object
            obj = await self._client.create(
                res.from_dict(manifest), namespace=meta["namespace"], field_manager=self._init_fm
            )
            return _dict(obj)
        except ApiError as e:
            if e.status.code == 409:
                return None
            raise

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: Json
    ) -> Json | None:
        """JSON merge patch of `.status` (the DiffusionDisaggDeployment's own); None if the object is gone."""
        res = _res(api_version, kind)
        try:
            obj = await self._retrying(
                f"{kind} {namespace}/{name} status",
                lambda: self._client.patch(
                    res.Status, name, {"status": status}, namespace=namespace, patch_type=PatchType.MERGE
                ),
            )
        except ApiError as e:
            if e.status.code == 404:  # deleted while we reconciled: garbage collection takes over
                return None
            raise
        return _dict(obj)

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            await self._client.delete(_res(api_version, kind), name, namespace=namespace)
        except ApiError as e:
            if e.status.code != 404:
                raise
