"""status.compute(): conditions, per-role counts and events from observed children (pure)."""

from __future__ import annotations

from typing import Any

from operator_factories import spec

from diffdisagg.operator.api.types import parse_spec
from diffdisagg.operator.render import make_owner
from diffdisagg.operator.status import Failure, compute

NOW = "2026-11-26T01:00:00Z"
LATER = "2026-11-26T02:00:00Z"


def dep(desired: int, ready: int, updated: int | None = None, gen: int = 1, **extra: Any) -> dict[str, Any]:
    updated = ready if updated is None else updated
    return {
        "metadata": {"generation": gen},
        "spec": {"replicas": desired},
        "status": {
            "observedGeneration": gen,
            "replicas": desired,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "availableReplicas": ready,
            **extra,
        },
    }


def run(
    s: dict,
    deployments: dict,
    previous: dict | None = None,
    failure: Failure | None = None,
    scalers: dict | None = None,
    hpas: dict | None = None,
    generation: int = 1,
    now: str = NOW,
):
    owner = make_owner("d", "ns", "u", generation, parse_spec(s))
    return compute(
        owner,
        deployments=deployments,
        scalers=scalers or {},
        hpas=hpas or {},
        gateway_service=None,
        failure=failure,
        previous=previous or {},
        now=now,
    )


def conds(status: dict) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


ALL_READY = {"prefill": dep(1, 1), "denoise": dep(2, 2), "decode": dep(1, 1), "gateway": dep(1, 1)}


def test_all_ready() -> None:
    status, events = run(spec(), ALL_READY)
    assert conds(status) == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "False",
        "ScalersReady": "True",
    }
    assert status["roles"]["denoise"] == {
        "desired": 2,
        "ready": 2,
        "updated": 2,
        "summary": "2/2",
        "autoscaled": False,
    }
    assert status["gateway"]["endpoint"] == "http://d-gateway.ns.svc:8000"
    assert status["observedGeneration"] == 1
    assert [e.reason for e in events] == ["Created", "Ready"]


def test_not_ready_until_every_role_and_the_gateway_have_a_ready_replica() -> None:
    status, _ = run(spec(), {**ALL_READY, "decode": dep(1, 0)})
    assert conds(status)["Ready"] == "False" and conds(status)["Progressing"] == "True"
    status, _ = run(spec(), {**ALL_READY, "gateway": None})
    assert conds(status)["Ready"] == "False"
    assert "gateway" in next(c for c in status["conditions"] if c["type"] == "Ready")["message"]


def test_rollout_progress_and_completion_events() -> None:
    first, _ = run(spec(), ALL_READY)
    s2 = spec(**{"roles.denoise.image": "w:2"})
    rolling, events = run(
        s2, {**ALL_READY, "denoise": dep(2, 2, updated=1, gen=2)}, previous=first, generation=2, now=LATER
    )
    assert conds(rolling)["Progressing"] == "True"
    assert "RolloutStarted" in [e.reason for e in events]
    ready = next(c for c in rolling["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == NOW, "an unchanged condition keeps its transition time"
    done, events = run(
        s2, {**ALL_READY, "denoise": dep(2, 2, gen=2)}, previous=rolling, generation=2, now=LATER
    )
    assert conds(done)["Progressing"] == "False"
    assert [e.reason for e in events] == ["RolloutComplete"]


def test_scale_event_and_ignored_replicas_event() -> None:
    s = spec(**{"roles.denoise.autoscaling": {"enabled": True, "maxReplicas": 5}})
    first, events = run(s, ALL_READY)
    assert "ReplicasIgnored" in [e.reason for e in events]
    _, events = run(s, {**ALL_READY, "denoise": dep(4, 2, updated=4)}, previous=first, now=LATER)
    assert [(e.reason, e.message) for e in events if e.reason == "Scaled"] == [
        ("Scaled", "denoise: 2 → 4 replicas (scaler)")
    ]
    assert "ReplicasIgnored" not in [e.reason for e in events], "said once per spec generation"


def test_scalers_ready_needs_scaler_status_and_hpa() -> None:
    s = spec(**{"roles.denoise.autoscaling": {"enabled": True, "maxReplicas": 5}})
    status, _ = run(s, ALL_READY)
    assert conds(status)["ScalersReady"] == "False"
    status, _ = run(s, ALL_READY, scalers={"denoise": {"status": {"selector": "a=b"}}}, hpas={"denoise": {}})
    assert conds(status)["ScalersReady"] == "True"


def test_failure_and_stuck_rollout_are_degraded() -> None:
    status, events = run(spec(), ALL_READY, failure=Failure("ApplyFailed", "boom"))
    assert conds(status)["Degraded"] == "True" and conds(status)["Ready"] == "False"
    assert [(e.type, e.reason) for e in events] == [("Warning", "ApplyFailed")]
    stuck = dep(
        1,
        0,
        conditions=[
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": "took too long",
            }
        ],
    )
    status, _ = run(spec(), {**ALL_READY, "prefill": stuck})
    deg = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (
        deg["status"] == "True"
        and deg["reason"] == "RolloutStuck"
        and "prefill: took too long" in deg["message"]
    )


def test_scalers_ready_without_an_operator_hpa_when_hpa_is_false() -> None:
    # an external autoscaler (KEDA) owns the HPA: the scaler alone makes the role ready to scale
    s = spec(**{"roles.denoise.autoscaling": {"enabled": True, "hpa": False}})
    status, _ = run(s, ALL_READY)
    assert conds(status)["ScalersReady"] == "False", "still needs the scaler and its selector"
    status, _ = run(s, ALL_READY, scalers={"denoise": {"status": {"selector": "a=b"}}})
    assert conds(status)["ScalersReady"] == "True"
