"""Worker registry: registration, heartbeats, drop after missed heartbeats, rejoin (driven clock)."""

from __future__ import annotations

from diffdisagg.worker.control.messages import Load, Register
from diffdisagg.worker.gateway.registry import Registry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _reg(wid: str, role: str = "denoise", queued: int = 0) -> Register:
    return Register(
        worker_id=wid,
        role=role,
        deployment="d",
        revision="r1",
        family="flux",
        control_url="http://x:1",
        handover={"host": "127.0.0.1", "port": 1},
        load=Load(queued=queued, inflight=0, held=0, free_slots=4, capacity=4),
    )


def test_register_heartbeat_and_drop_after_missed_heartbeats() -> None:
    clock = Clock()
    r = Registry(heartbeat_interval_s=1.0, misses=3, revision="r1", clock=clock)
    assert r.register(_reg("a")) is False  # new
    assert r.register(_reg("a")) is True  # known and live
    assert [w.worker_id for w in r.live("denoise")] == ["a"]
    clock.now += 2.9
    assert r.expire() == []
    assert r.heartbeat("a", Load(queued=2, inflight=1, held=0, free_slots=1, capacity=4))
    assert r.get("a").load.queued == 2
    clock.now += 3.01  # three intervals with no heartbeat
    dropped = r.expire()
    assert [w.worker_id for w in dropped] == ["a"]
    assert r.live("denoise") == []
    assert r.expire() == []  # dropped once, not on every tick


def test_dropped_worker_must_reregister_then_rejoins() -> None:
    clock = Clock()
    r = Registry(0.5, 2, "r1", clock=clock)
    r.register(_reg("a"))
    clock.now += 5
    r.expire()
    load = Load(queued=0, inflight=0, held=0, free_slots=4, capacity=4)
    assert r.heartbeat("a", load) is False  # tells the worker to register again
    assert r.live() == []
    assert r.register(_reg("a")) is False
    assert [w.worker_id for w in r.live()] == ["a"]
    assert r.heartbeat("unknown", load) is False


def test_roles_are_separate_and_busy_mark_expires() -> None:
    clock = Clock()
    r = Registry(1.0, 3, "r1", clock=clock)
    r.register(_reg("p", "prefill"))
    r.register(_reg("d", "denoise"))
    assert r.roles_live(("prefill", "denoise", "decode")) == {"prefill": 1, "denoise": 1, "decode": 0}
    r.mark_busy("d", 0.2)
    assert r.get("d").busy_until == clock.now + 0.2
    assert r.drop("d", "test") is not None
    assert r.drop("d", "again") is None


def test_only_workers_of_the_gateways_revision_make_it_ready() -> None:
    # a rollout: the new gateway (r2) still sees every old (r1) worker live, but cannot dispatch to them
    r = Registry(heartbeat_interval_s=1.0, misses=3, revision="r2", clock=Clock())
    roles = ("prefill", "denoise", "decode")
    for role in roles:
        r.register(_reg(f"old-{role}", role=role))
    assert all(len(r.live(role)) == 1 for role in roles)
    assert r.roles_live(roles) == {"prefill": 0, "denoise": 0, "decode": 0}
    r.register(_reg("new-denoise", role="denoise").model_copy(update={"revision": "r2"}))
    assert [w.worker_id for w in r.servable("denoise")] == ["new-denoise"]
    assert r.roles_live(roles) == {"prefill": 0, "denoise": 1, "decode": 0}
