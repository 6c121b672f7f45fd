"""Per-request stage timings as the API answers them (`"diffdisagg": {"timings": [...]}`).

The gateway sees every stage of a request: it queues it, each worker asks it "who takes it next?" the
moment its stage is done (with the stage's compute seconds), reports what each hand-over moved (bytes,
seconds, offer -> ack) and how long the request waited in the worker's own queue, and decode posts the
result. `breakdown()` turns those into an ordered list of segments that partitions the request's
end-to-end time at the gateway, so a client (the playground's stage bar, a script) sees where the time
went without scraping Prometheus:

    queue(prefill) compute(prefill) handover(prefill->denoise) queue(denoise) compute(denoise)
    handover(denoise->decode) queue(decode) compute(decode) other

The intervals come from the gateway's own clock at the "stage done" marks (a hop ask, or the result),
which a worker sends synchronously when the compute ends; "started" events travel asynchronously and
would make the split lag, so they are not used for it. Within the interval from the previous stage's
end to this stage's end, `queue` is what is neither the hand-over nor the compute: waiting for a
receiver with room (late binding), the receiver's scheduler queue (`worker_queue_ms`, as the worker
measured it), control messages and, for decode, the result upload. `other` is time before the last
attempt started (a restart), so the segments add up to `total_ms` -- except that a negative remainder
is clamped to 0: the sender's offer -> ack can overlap the receiver's start by a few ms (durations come
from three processes' clocks), and then the sum exceeds `total_ms` by that overlap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffdisagg.worker.contract import STAGE_ROLES

#: Bumped when the shape of a timings object changes (documented in docs/playground.md).
TIMINGS_VERSION = 1


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _add(seg: dict[str, Any], key: str, value: float | None, scale: float | None = None) -> None:
    """Set an optional detail only when the worker reported it."""
    if value is not None:
        seg[key] = round(value * scale, 3) if scale is not None else value


def breakdown(
    *,
    marks: Mapping[str, float],
    stage_s: Mapping[str, float],
    transfer_s: Mapping[str, float],
    transfer_bytes: Mapping[str, int],
    queued_s: Mapping[str, float],
    restarts: int,
    stage_timing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The segments of one finished request (marks are gateway monotonic seconds).

    `stage_timing`: each stage's own report (`control.messages.StageTiming`, keyed by the role that did
    the work), when its worker sends one; it adds detail (batch size, the backend write alone, how long
    the sender looked for a receiver, receivers tried) without changing the segments' split.
    """
    reports = stage_timing or {}
    segments: list[dict[str, Any]] = []
    prev_end = marks.get(f"{STAGE_ROLES[0]}.wait")  # the last attempt entered the first queue
    prev_role: str | None = None
    for role in STAGE_ROLES:
        xfer = transfer_s.get(role) if prev_role is not None else None
        sent = reports.get(prev_role) if prev_role is not None else None
        if xfer is not None:
            hand: dict[str, Any] = {
                "kind": "handover",
                "from": prev_role,
                "to": role,
                "ms": _ms(xfer),
                "bytes": int(transfer_bytes.get(role, 0)),
            }
            _add(hand, "write_ms", getattr(sent, "handover_write_seconds", None), scale=1e3)
            _add(hand, "attempts", getattr(sent, "handover_attempts", None))
            segments.append(hand)
        compute = stage_s.get(role)
        end = marks.get(f"{role}.done")
        if prev_end is not None and end is not None:
            rest = end - prev_end - (xfer or 0.0) - (compute or 0.0)
            seg: dict[str, Any] = {"kind": "queue", "role": role, "ms": _ms(max(0.0, rest))}
            own = reports.get(role)
            worker_queue = queued_s.get(role, getattr(own, "queue_seconds", None))
            _add(seg, "worker_queue_ms", worker_queue, scale=1e3)
            # compute end upstream -> the hand-over that succeeded began: asks, busy/unreachable receivers
            _add(seg, "receiver_wait_ms", getattr(sent, "handover_wait_seconds", None), scale=1e3)
            segments.append(seg)
        if compute is not None:
            comp: dict[str, Any] = {"kind": "compute", "role": role, "ms": _ms(compute)}
            _add(comp, "batch_size", getattr(reports.get(role), "batch_size", None))
            # decode: how much of its compute was the PNG/MP4 encoding (on the CPU, beside the device)
            _add(comp, "encode_ms", getattr(reports.get(role), "encode_seconds", None), scale=1e3)
            segments.append(comp)
        prev_end, prev_role = end, role
    last = STAGE_ROLES[-1]
    out: dict[str, Any] = {"version": TIMINGS_VERSION, "segments": segments, "restarts": restarts}
    if "submitted" in marks and f"{last}.done" in marks:
        total = _ms(marks[f"{last}.done"] - marks["submitted"])
        out["total_ms"] = total
        explained = sum(s["ms"] for s in segments)
        segments.append({"kind": "other", "ms": round(max(0.0, total - explained), 3)})
    return out
