"""The worker side of the operator/worker contract: env var names, ports, labels and metric names.

The operator keeps its own copy in `diffdisagg.operator.contract` (it must not import the worker, which
pulls in torch); `tests/contract/` proves the two copies agree. Change a name here only together with the
operator's copy. This module imports nothing but the standard library.
"""

from __future__ import annotations

from typing import Final

# --- environment variables the operator writes and the worker / gateway read ------------------------
ENV_ROLE: Final = "DIFFDISAGG_ROLE"
ENV_PLATFORM: Final = "DIFFDISAGG_PLATFORM"
ENV_MODEL_FAMILY: Final = "DIFFDISAGG_MODEL_FAMILY"
ENV_MODEL_PATH: Final = "DIFFDISAGG_MODEL_PATH"
ENV_REVISION: Final = "DIFFDISAGG_REVISION"
ENV_DEPLOYMENT: Final = "DIFFDISAGG_DEPLOYMENT"
ENV_GATEWAY_URL: Final = "DIFFDISAGG_GATEWAY_URL"
ENV_TOKEN_FILE: Final = "DIFFDISAGG_TOKEN_FILE"
ENV_API_KEY_FILE: Final = "DIFFDISAGG_API_KEY_FILE"
ENV_POD_IP: Final = "DIFFDISAGG_POD_IP"
ENV_TRANSFER_BACKEND: Final = "DIFFDISAGG_TRANSFER_BACKEND"
ENV_TRANSFER_PROTOCOL: Final = "DIFFDISAGG_TRANSFER_PROTOCOL"
ENV_RDMA_DEVICES: Final = "DIFFDISAGG_RDMA_DEVICES"
ENV_BUFFER_BYTES: Final = "DIFFDISAGG_BUFFER_BYTES"
ENV_CONTROL_PORT: Final = "DIFFDISAGG_CONTROL_PORT"
ENV_TRANSFER_PORT: Final = "DIFFDISAGG_TRANSFER_PORT"
ENV_TRANSFER_PORT_MIN: Final = "DIFFDISAGG_TRANSFER_PORT_MIN"
ENV_TRANSFER_PORT_MAX: Final = "DIFFDISAGG_TRANSFER_PORT_MAX"
ENV_DEVICES_PER_POD: Final = "DIFFDISAGG_DEVICES_PER_POD"
ENV_ENCODE_THREADS: Final = "DIFFDISAGG_ENCODE_THREADS"  # decode: media encoding threads (0 = inline)

ENV_VARS: Final = (
    ENV_ROLE,
    ENV_PLATFORM,
    ENV_MODEL_FAMILY,
    ENV_MODEL_PATH,
    ENV_REVISION,
    ENV_DEPLOYMENT,
    ENV_GATEWAY_URL,
    ENV_TOKEN_FILE,
    ENV_API_KEY_FILE,
    ENV_POD_IP,
    ENV_TRANSFER_BACKEND,
    ENV_TRANSFER_PROTOCOL,
    ENV_RDMA_DEVICES,
    ENV_BUFFER_BYTES,
    ENV_CONTROL_PORT,
    ENV_TRANSFER_PORT,
    ENV_TRANSFER_PORT_MIN,
    ENV_TRANSFER_PORT_MAX,
    ENV_DEVICES_PER_POD,
    ENV_ENCODE_THREADS,
)


# --- allowed values -------------------------------------------------------------------------------
ROLE_PREFILL: Final = "prefill"
ROLE_DENOISE: Final = "denoise"
ROLE_DECODE: Final = "decode"
ROLE_GATEWAY: Final = "gateway"
STAGE_ROLES: Final = (ROLE_PREFILL, ROLE_DENOISE, ROLE_DECODE)  # in pipeline order
ROLES: Final = (*STAGE_ROLES, ROLE_GATEWAY)
PLATFORMS: Final = ("cpu", "cuda", "npu")
TRANSFER_BACKENDS: Final = ("tcp", "mooncake")
TRANSFER_PROTOCOLS: Final = ("tcp", "rdma", "ascend")

# --- ports ----------------------------------------------------------------------------------------
GATEWAY_HTTP_PORT: Final = 8000
DEFAULT_CONTROL_PORT: Final = 8100
DEFAULT_TRANSFER_PORT: Final = 8200
DEFAULT_TRANSFER_PORT_MIN: Final = 15000
DEFAULT_TRANSFER_PORT_MAX: Final = 15063

# --- HTTP paths -----------------------------------------------------------------------------------
PATH_HEALTH: Final = "/health"
PATH_READY: Final = "/ready"
PATH_METRICS: Final = "/metrics"

# --- labels ---------------------------------------------------------------------------------------
LABEL_DEPLOYMENT: Final = "diffdisagg.io/deployment"
LABEL_ROLE: Final = "diffdisagg.io/role"
LABEL_APP_NAME: Final = "app.kubernetes.io/name"
LABEL_APP_NAME_VALUE: Final = "diffdisagg"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"  # value: the role
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_MANAGED_BY_VALUE: Final = "diffdisagg-operator"

# --- metrics (exported by the gateway, which sees every hop; see docs/serving.md) -------------------
METRIC_QUEUE_DEPTH: Final = "diffdisagg_queue_depth"  # gauge {deployment, role}: the autoscaling signal
METRIC_INFLIGHT: Final = "diffdisagg_inflight"  # gauge {deployment, role}
METRIC_STAGE_SECONDS: Final = "diffdisagg_stage_seconds"  # histogram {deployment, role}
METRIC_TRANSFER_BYTES: Final = "diffdisagg_transfer_bytes_total"  # counter {deployment, role}
METRIC_TRANSFER_SECONDS: Final = "diffdisagg_transfer_seconds"  # histogram {deployment, role}
METRIC_FREE_SLOTS: Final = "diffdisagg_free_slots"  # gauge {deployment, role}
METRIC_REQUEST_SECONDS: Final = "diffdisagg_request_seconds"  # histogram {deployment, endpoint}
METRIC_REQUEST_ERRORS: Final = "diffdisagg_request_errors_total"  # counter {deployment, reason}
METRIC_LABEL_DEPLOYMENT: Final = "deployment"
METRIC_LABEL_ROLE: Final = "role"
METRIC_LABEL_REASON: Final = "reason"

METRICS: Final = (
    METRIC_QUEUE_DEPTH,
    METRIC_INFLIGHT,
    METRIC_STAGE_SECONDS,
    METRIC_TRANSFER_BYTES,
    METRIC_TRANSFER_SECONDS,
    METRIC_FREE_SLOTS,
    METRIC_REQUEST_SECONDS,
    METRIC_REQUEST_ERRORS,
)

# Workers open no HTTP port (the gateway answers their long-polls), so they export no /metrics of their
# own: each one's load report (queued, inflight, held, free_slots, slots_in_use) appears on the gateway
# as `diffdisagg_worker_load{deployment,role,worker,kind}` beside the per-role totals above.
METRIC_WORKER_LOAD: Final = "diffdisagg_worker_load"
