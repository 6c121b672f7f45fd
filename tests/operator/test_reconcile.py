"""reconcile() against an in-memory stand-in for the kube adapter (the real API server is in
tests/cluster): create-only children, pruning, no writes on a quiet second pass, a vanished deployment,
and the adapter's retry of 409/429."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from lightkube.core.exceptions import ApiError
from operator_factories import spec

from diffdisagg.operator.api import names as n
from diffdisagg.operator.config import OperatorConfig
from diffdisagg.operator.kube import Kube
from diffdisagg.operator.reconcile import OperatorContext, reconcile

Json = dict[str, Any]


class FakeKube:
    """Objects by (apiVersion, kind, ns, name); every write that changes content bumps resourceVersion."""

    def __init__(self) -> None:
        self.objs: dict[tuple[str, str, str, str], Json] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.rv = 0

    def _key(self, m: Json) -> tuple[str, str, str, str]:
        return m["apiVersion"], m["kind"], m["metadata"]["namespace"], m["metadata"]["name"]

    def _store(self, key: tuple[str, str, str, str], obj: Json) -> Json:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objs[key] = obj
        return copy.deepcopy(obj)

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Json | None:
        o = self.objs.get((api_version, kind, namespace, name))
        return copy.deepcopy(o) if o else None

    async def list(
        self, api_version: str, kind: str, namespace: str | None, labels: dict | None = None
    ) -> list:
        return [
            copy.deepcopy(o)
            for (av, k, ns, _), o in self.objs.items()
            if av == api_version
            and k == kind
            and namespace in (None, ns)
            and all(o["metadata"].get("labels", {}).get(a) == b for a, b in (labels or {}).items())
        ]

    async def apply(self, m: Json) -> Json:
        key = self._key(m)
        old = self.objs.get(key)
        new = copy.deepcopy(m)
        if old is not None:
            body = {k: v for k, v in old.items() if k not in ("metadata", "status")}
            if body == {k: v for k, v in new.items() if k != "metadata"} and all(
                old["metadata"].get(f) == new["metadata"].get(f)
                for f in ("labels", "annotations", "ownerReferences")
            ):
                return copy.deepcopy(old)  # a no-op apply
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            new["status"] = old.get("status", {})
        else:
            new["metadata"]["generation"] = 1
            if m["kind"] == "Deployment":
                new["status"] = {
                    "replicas": m["spec"]["replicas"],
                    "readyReplicas": m["spec"]["replicas"],
                    "updatedReplicas": m["spec"]["replicas"],
                    "availableReplicas": m["spec"]["replicas"],
                    "observedGeneration": 1,
                }
        self.writes.append(("apply", m["kind"], m["metadata"]["name"]))
        return self._store(key, new)

    async def create_once(self, m: Json) -> Json | None:
        key = self._key(m)
        if key in self.objs:
            return None
        self.writes.append(("create", m["kind"], m["metadata"]["name"]))
        return self._store(key, copy.deepcopy(m) | {"metadata": {**m["metadata"], "generation": 1}})

    async def apply_status(self, m: Json) -> Json:
        key = self._key(m)
        obj = copy.deepcopy(self.objs[key])
        if obj.get("status") == m["status"]:
            return obj
        obj["status"] = m["status"]
        self.writes.append(("status", m["kind"], m["metadata"]["name"]))
        return self._store(key, obj)

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: Json
    ) -> Json | None:
        key = (api_version, kind, namespace, name)
        if key not in self.objs:
            return None
        obj = copy.deepcopy(self.objs[key])
        obj["status"] = {**obj.get("status", {}), **status}
        self.writes.append(("status", kind, name))
        return self._store(key, obj)

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.writes.append(("delete", kind, name))
        self.objs.pop((api_version, kind, namespace, name), None)

    def put_ddd(self, spec_dict: Json, generation: int = 1) -> None:
        key = (n.API_VERSION, n.DDD_KIND, "ns", "d")
        old = self.objs.get(key)
        self._store(
            key,
            {
                "apiVersion": n.API_VERSION,
                "kind": n.DDD_KIND,
                "metadata": {"name": "d", "namespace": "ns", "uid": "uid-d", "generation": generation},
                "spec": spec_dict,
                "status": (old or {}).get("status", {}),
            },
        )

    def children(self) -> dict[tuple[str, str], Json]:
        return {(k[1], k[3]): o for k, o in self.objs.items() if k[1] != n.DDD_KIND}


def _run(ctx: OperatorContext) -> Any:
    return asyncio.run(reconcile(ctx, "ns", "d"))


def _ctx(kube: FakeKube) -> OperatorContext:
    return OperatorContext(config=OperatorConfig(), kube=kube)  # type: ignore[arg-type]


AUTOSCALED = spec(**{"roles.denoise.autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}})


def test_first_pass_creates_everything_second_pass_writes_nothing() -> None:
    kube = FakeKube()
    kube.put_ddd(AUTOSCALED)
    ctx = _ctx(kube)
    result = _run(ctx)
    assert result.failure is None and result.created == 2 and result.applied == 11
    assert len(kube.children()) == 13
    status = kube.objs[(n.API_VERSION, n.DDD_KIND, "ns", "d")]["status"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    assert [e.reason for e in result.events][:1] == ["Created"]

    rvs = {k: o["metadata"]["resourceVersion"] for k, o in kube.children().items()}
    kube.writes.clear()
    again = _run(ctx)
    assert kube.writes == [] and again.applied == 0 and again.created == 0
    # a fresh operator (empty memory) re-applies everything, and still changes nothing
    _run(_ctx(kube))
    assert [w for w in kube.writes if w[0] != "apply"] == []
    assert {k: o["metadata"]["resourceVersion"] for k, o in kube.children().items()} == rvs


def test_scaler_and_token_are_never_overwritten() -> None:
    kube = FakeKube()
    kube.put_ddd(AUTOSCALED)
    ctx = _ctx(kube)
    _run(ctx)
    drs = kube.objs[(n.API_VERSION, n.DRS_KIND, "ns", "d-denoise")]
    drs["spec"]["replicas"] = 5  # what the HPA does through /scale
    drs["metadata"]["generation"] = 2
    token = kube.objs[("v1", "Secret", "ns", "d-token")]["stringData"]["token"]
    _run(_ctx(kube))
    assert kube.objs[(n.API_VERSION, n.DRS_KIND, "ns", "d-denoise")]["spec"]["replicas"] == 5
    assert kube.objs[("apps/v1", "Deployment", "ns", "d-denoise")]["spec"]["replicas"] == 5
    assert kube.objs[("v1", "Secret", "ns", "d-token")]["stringData"]["token"] == token
    # the scaler's status says which of its generations reached the Deployment (its replicas come from the
    # Deployment's status, which only a deployment controller would change here)
    assert kube.objs[(n.API_VERSION, n.DRS_KIND, "ns", "d-denoise")]["status"]["observedGeneration"] == 2


def test_children_no_longer_desired_are_pruned_and_foreign_ones_kept() -> None:
    kube = FakeKube()
    kube.put_ddd(AUTOSCALED)
    ctx = _ctx(kube)
    _run(ctx)
    # an object with our label but another owner is not ours to delete
    kube.objs[("v1", "ConfigMap", "ns", "stranger")] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "stranger",
            "namespace": "ns",
            "labels": {"diffdisagg.io/deployment": "d"},
            "ownerReferences": [{"uid": "other", "controller": True}],
        },
    }
    kube.put_ddd(spec(), generation=2)
    result = _run(ctx)
    assert result.deleted == 2
    assert ("DiffusionRoleScaler", "d-denoise") not in kube.children()
    assert ("HorizontalPodAutoscaler", "d-denoise") not in kube.children()
    assert ("ConfigMap", "stranger") in kube.children()
    assert kube.objs[("apps/v1", "Deployment", "ns", "d-denoise")]["spec"]["replicas"] == 2


def test_invalid_spec_sets_degraded_and_touches_no_child() -> None:
    kube = FakeKube()
    kube.put_ddd(spec(**{"gateway.replicas": 3}))
    result = _run(_ctx(kube))
    assert result.failure is not None and result.failure.reason == "InvalidSpec"
    assert kube.children() == {}
    conds = {c["type"]: c for c in kube.objs[(n.API_VERSION, n.DDD_KIND, "ns", "d")]["status"]["conditions"]}
    assert conds["Degraded"]["status"] == "True" and "gateway.replicas" in conds["Degraded"]["message"]


def test_vanished_deployment_is_a_no_op() -> None:
    kube = FakeKube()
    result = _run(_ctx(kube))
    assert result.body is None and kube.writes == []


class _Status:
    def __init__(self, code: int) -> None:
        self.code, self.message = code, f"status {code}"


class _Err(ApiError):
    def __init__(self, code: int) -> None:  # no HTTP response needed for the adapter's checks
        Exception.__init__(self, f"status {code}")
        self.status = _Status(code)  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("codes", "ok"), [([409, 409], True), ([429], True), ([409] * 6, False), ([422], False)]
)
def test_adapter_retries_conflicts_and_throttling_only(codes: list[int], ok: bool) -> None:
    kube = Kube(client=None, field_manager="f", init_field_manager="i", conflict_retries=5)  # type: ignore[arg-type]
    calls = []

    async def call() -> str:
        calls.append(1)
        if len(calls) <= len(codes):
            raise _Err(codes[len(calls) - 1])
        return "done"

    if ok:
        assert asyncio.run(kube._retrying("x", call)) == "done"
        assert len(calls) == len(codes) + 1
    else:
        with pytest.raises(ApiError):
            asyncio.run(kube._retrying("x", call))


def test_interrupted_reconcile_converges_without_duplicates_or_orphans() -> None:
    """An operator that dies mid-reconcile (here: the API fails after 5 writes) leaves a partial set;
    the next operator's first pass completes it to exactly the desired set."""
    kube = FakeKube()
    kube.put_ddd(AUTOSCALED)
    real_apply = kube.apply

    async def flaky_apply(m: Json) -> Json:
        if len(kube.writes) >= 5:
            raise RuntimeError("connection reset")
        return await real_apply(m)

    kube.apply = flaky_apply  # type: ignore[method-assign]
    partial = _run(_ctx(kube))
    assert partial.failure is not None and partial.failure.reason == "ApplyFailed"
    conds = {
        c["type"]: c["status"]
        for c in kube.objs[(n.API_VERSION, n.DDD_KIND, "ns", "d")]["status"]["conditions"]
    }
    assert conds["Degraded"] == "True"
    assert 0 < len(kube.children()) < 13

    kube.apply = real_apply  # type: ignore[method-assign]
    done = _run(_ctx(kube))
    assert done.failure is None
    names = sorted(kube.children())
    assert len(names) == 13 == len(set(names))
    conds = {
        c["type"]: c["status"]
        for c in kube.objs[(n.API_VERSION, n.DDD_KIND, "ns", "d")]["status"]["conditions"]
    }
    assert conds["Degraded"] == "False" and conds["Ready"] == "True"
