"""Messages of the control plane between the gateway and the role workers (schema version 1).

JSON bodies (msgpack for the result, which carries the media bytes), never pickle. Every message that
concerns a request carries its id, its attempt number (a request restarted after a worker died gets a new
attempt, so stale messages of the old one are refused) and, where it travels to a worker, its deadline
(unix seconds). Paths of the gateway's internal API and of the worker's control API live here too.

Compatibility: fields added after version 1 are optional with a `None` default, so a message from an
older worker still parses; workers leave out fields that are `None` (`exclude_none`), so a message that
carries none of the new information is byte-for-byte what an older worker sends.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

# gateway endpoints that workers call
PATH_REGISTER = "/internal/v1/workers/register"
PATH_HEARTBEAT = "/internal/v1/workers/heartbeat"
PATH_HOP = "/internal/v1/hops"
PATH_EVENT = "/internal/v1/events"
PATH_RESULT = "/internal/v1/results"
PATH_POLL = "/internal/v1/poll"
# Workers open no HTTP port: the gateway answers their long-poll with new prefill requests and cancels,
# so the only ports a worker listens on are the hand-over control port and the transfer data port.


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = SCHEMA_VERSION


class Load(_Msg):
    """A worker's load as it reports it in every heartbeat."""

    queued: int = Field(ge=0)  # received (or submitted), not started
    inflight: int = Field(ge=0)  # computing now
    held: int = Field(ge=0)  # finished here, waiting to hand over downstream
    free_slots: int = Field(ge=0)  # free receive slots (receiver roles); capacity left for prefill
    capacity: int = Field(ge=1)  # most requests it accepts at once (queued + inflight)
    slots_in_use: int = Field(default=0, ge=0)  # live slots of its staging buffer (0 when idle: no leak)


class Register(_Msg):
    worker_id: str = Field(min_length=1, max_length=128)
    role: Literal["prefill", "denoise", "decode"]
    deployment: str
    revision: str
    family: str
    control_url: str  # host:port of the worker's hand-over control listener (logs; workers serve no HTTP)
    handover: dict[str, Any]  # what an upstream sender needs to reach this worker's receiver
    load: Load


class Heartbeat(_Msg):
    worker_id: str
    load: Load


class RegisterReply(_Msg):
    heartbeat_interval_s: float
    known: bool  # False when the gateway did not know this worker (first start, or it was dropped)


class HopRequest(_Msg):
    """A worker finished `from_role` for a request and asks whom to hand it to (late binding)."""

    request_id: str
    attempt: int
    worker_id: str
    from_role: Literal["prefill", "denoise"]
    stage_seconds: float | None = None  # compute time of the stage just finished (first ask only)
    failed_worker: str | None = None  # the last grant that refused (busy) or could not be reached
    failure: Literal["busy", "unavailable"] | None = None
    wait_s: float = Field(default=5.0, ge=0.0, le=60.0)  # long-poll: how long the gateway may hold the ask


class HopGrant(_Msg):
    worker_id: str
    control_url: str
    handover: dict[str, Any]
    deadline: float


class StageTiming(_Msg):
    """Where one stage of one request spent its time on the worker that ran it (seconds, bytes).

    Sent with the stage's `handed` event (prefill, denoise) or with the result (decode), and with
    `failed` as far as it got. Every field but `role` is optional: None = not measured / not reached.
    """

    role: Literal["prefill", "denoise", "decode"]  # the stage that did the work (not the receiving role)
    #: arrival at this worker (hand-over complete, or submit received) -> compute start
    queue_seconds: float | None = Field(default=None, ge=0.0)
    #: wall time of the batch that computed it (includes PNG/MP4 encoding for decode)
    compute_seconds: float | None = Field(default=None, ge=0.0)
    #: decode with encode threads: this request's PNG/MP4 encoding alone (part of compute_seconds)
    encode_seconds: float | None = Field(default=None, ge=0.0)
    batch_size: int | None = Field(default=None, ge=1)
    #: the outgoing hand-over that succeeded (prefill -> denoise, denoise -> decode)
    handover_bytes: int | None = Field(default=None, ge=0)
    handover_seconds: float | None = Field(default=None, ge=0.0)  # staging copy, then offer -> ack
    handover_write_seconds: float | None = Field(default=None, ge=0.0)  # the backend write alone
    #: compute end -> start of the hand-over that succeeded: next-hop asks, busy or unreachable receivers
    handover_wait_seconds: float | None = Field(default=None, ge=0.0)
    handover_attempts: int | None = Field(default=None, ge=1)  # receivers tried (1 = the first took it)
    to_worker: str | None = None  # the receiver that took it


class StageEvent(_Msg):
    request_id: str
    attempt: int
    worker_id: str
    role: Literal["prefill", "denoise", "decode"]
    event: Literal["started", "handed", "failed", "dropped"]  # handed: pushed into the next role's worker
    queued_seconds: float | None = None
    transfer_bytes: int | None = None
    transfer_seconds: float | None = None
    reason: str | None = None  # failed: machine-readable reason (e.g. invalid_params, worker_error)
    message: str | None = None
    param: str | None = None
    timing: StageTiming | None = None  # handed / failed: the sending worker's breakdown of its stage


class Submit(_Msg):
    """Gateway -> prefill worker (in a PollReply): start a request."""

    request_id: str
    attempt: int
    deadline: float
    revision: str
    params: dict[str, Any]


class Cancel(_Msg):
    request_id: str
    attempt: int  # this attempt and every earlier one are void (a restart re-uses the request id)
    reason: str = "cancelled"


class Poll(_Msg):
    """Worker -> gateway long-poll: 'anything for me?' (new prefill requests, cancels)."""

    worker_id: str
    wait_s: float = Field(default=2.0, ge=0.0, le=30.0)


class PollReply(_Msg):
    known: bool  # False: the gateway does not know this worker (it must register again)
    submits: list[Submit] = Field(default_factory=list)
    cancels: list[Cancel] = Field(default_factory=list)


class ResultHeader(_Msg):
    """Decode -> gateway (msgpack, with the media bytes beside it under key `media`)."""

    request_id: str
    attempt: int
    worker_id: str
    media_type: str
    stage_seconds: float
    scalars: dict[str, Any] = Field(default_factory=dict)
    timing: StageTiming | None = None  # decode's queue wait, compute seconds, batch size
