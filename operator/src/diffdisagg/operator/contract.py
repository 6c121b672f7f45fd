"""The operator's side of the operator ↔ worker contract: env var names, ports, labels, metric names.

The worker keeps its own copy in `diffdisagg.worker.contract` (the operator must never import the
worker: it would pull in torch). The constant names are the same on both sides, and
`tests/contract/test_env_names.py` proves that names and values agree. Only names and defaults live
here — what the operator writes into them is decided in `builders/`.
"""

from __future__ import annotations

from typing import Final

# --- environment variables the operator writes and the worker / gateway read ----------------------
ENV_ROLE: Final = "DIFFDISAGG_ROLE"  # prefill | denoise | decode | gateway
ENV_PLATFORM: Final = "DIFFDISAGG_PLATFORM"  # cpu | cuda | npu
ENV_MODEL_FAMILY: Final = "DIFFDISAGG_MODEL_FAMILY"
ENV_MODEL_PATH: Final = "DIFFDISAGG_MODEL_PATH"
ENV_REVISION: Final = "DIFFDISAGG_REVISION"
ENV_DEPLOYMENT: Final = "DIFFDISAGG_DEPLOYMENT"
ENV_GATEWAY_URL: Final = "DIFFDISAGG_GATEWAY_URL"
ENV_TOKEN_FILE: Final = "DIFFDISAGG_TOKEN_FILE"
ENV_API_KEY_FILE: Final = "DIFFDISAGG_API_KEY_FILE"
ENV_POD_IP: Final = "DIFFDISAGG_POD_IP"
ENV_TRANSFER_BACKEND: Final = "DIFFDISAGG_TRANSFER_BACKEND"  # tcp | mooncake
ENV_TRANSFER_PROTOCOL: Final = "DIFFDISAGG_TRANSFER_PROTOCOL"  # tcp | rdma | ascend
ENV_RDMA_DEVICES: Final = "DIFFDISAGG_RDMA_DEVICES"  # comma-separated
ENV_BUFFER_BYTES: Final = "DIFFDISAGG_BUFFER_BYTES"
ENV_CONTROL_PORT: Final = "DIFFDISAGG_CONTROL_PORT"
ENV_TRANSFER_PORT: Final = "DIFFDISAGG_TRANSFER_PORT"  # tcp backend only
ENV_TRANSFER_PORT_MIN: Final = "DIFFDISAGG_TRANSFER_PORT_MIN"  # mooncake only
ENV_TRANSFER_PORT_MAX: Final = "DIFFDISAGG_TRANSFER_PORT_MAX"  # mooncake only
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
ENV_PREFIX: Final = "DIFFDISAGG_"  # reserved for the operator in user-supplied env (CRD rule)

# --- what the containers run -------------------------------------------------------------------
# Workers: `args` only, so the worker image's ENTRYPOINT (which makes the platform's native libraries
# findable) still wraps it; the role comes from DIFFDISAGG_ROLE, so one image serves every role. The
# gateway image has no wrapper: its command is set in full. tests/contract/test_render_then_run.py
# runs exactly these.
WORKER_ARGS: Final = ("python", "-m", "diffdisagg.worker")
GATEWAY_COMMAND: Final = ("python", "-m", "diffdisagg.worker.gateway")
SHM_PATH: Final = "/dev/shm"  # in-memory emptyDir of multi-device pods (the ranks' collectives)

# --- allowed values ------------------------------------------------------------------------------
ROLE_PREFILL: Final = "prefill"
ROLE_DENOISE: Final = "denoise"
ROLE_DECODE: Final = "decode"
ROLE_GATEWAY: Final = "gateway"
STAGE_ROLES: Final = (ROLE_PREFILL, ROLE_DENOISE, ROLE_DECODE)  # in pipeline order
ROLES: Final = (*STAGE_ROLES, ROLE_GATEWAY)
PLATFORMS: Final = ("cpu", "cuda", "npu")
TRANSFER_BACKENDS: Final = ("tcp", "mooncake")
TRANSFER_PROTOCOLS: Final = ("tcp", "rdma", "ascend")

# --- ports ---------------------------------------------------------------------------------------
GATEWAY_HTTP_PORT: Final = 8000
DEFAULT_CONTROL_PORT: Final = 8100
DEFAULT_TRANSFER_PORT: Final = 8200
DEFAULT_TRANSFER_PORT_MIN: Final = 15000
DEFAULT_TRANSFER_PORT_MAX: Final = 15063

# --- HTTP paths (gateway probes) -----------------------------------------------------------------
PATH_HEALTH: Final = "/health"
PATH_READY: Final = "/ready"
PATH_METRICS: Final = "/metrics"

# --- labels --------------------------------------------------------------------------------------
LABEL_DEPLOYMENT: Final = "diffdisagg.io/deployment"
LABEL_ROLE: Final = "diffdisagg.io/role"
LABEL_APP_NAME: Final = "app.kubernetes.io/name"
LABEL_APP_NAME_VALUE: Final = "diffdisagg"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"  # value: the role
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_MANAGED_BY_VALUE: Final = "diffdisagg-operator"

# --- metrics (the HPA scales on the first one, exported by the gateway) --------------------------
METRIC_QUEUE_DEPTH: Final = "diffdisagg_queue_depth"
METRIC_INFLIGHT: Final = "diffdisagg_inflight"
METRIC_STAGE_SECONDS: Final = "diffdisagg_stage_seconds"
METRIC_TRANSFER_BYTES: Final = "diffdisagg_transfer_bytes_total"
METRIC_TRANSFER_SECONDS: Final = "diffdisagg_transfer_seconds"
METRIC_FREE_SLOTS: Final = "diffdisagg_free_slots"
METRIC_REQUEST_SECONDS: Final = "diffdisagg_request_seconds"
METRIC_REQUEST_ERRORS: Final = "diffdisagg_request_errors_total"
METRIC_LABEL_DEPLOYMENT: Final = "deployment"  # the HPA's External metric selector keys
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
