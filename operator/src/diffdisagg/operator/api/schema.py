"""The OpenAPI v3 schemas (with CEL rules) of both CRDs: the one source of truth for `crds/`.

`crdgen` turns these dicts into the CRD YAML; `tests/operator/test_crd_drift.py` fails when the
committed YAML differs. Every property's description starts with the field name; every CEL rule's
message names the field it is about. Bounds (maxLength, maxItems, maxProperties) are there so that
the API server can estimate the CEL rules' cost.
"""

from __future__ import annotations

from typing import Any

from diffdisagg.operator import contract as c

Schema = dict[str, Any]

FAMILIES = ("flux", "sd3", "wan")
VENDORS = ("nvidia", "ascend", "cpu")
BACKENDS = ("tcp", "mooncake")
PROTOCOLS = ("tcp", "rdma", "ascend")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
# one pod's devices: 16 is more than any single node we target carries (8 GPUs, 8-16 NPUs); one worker
# never spans nodes, so a larger value could only be a typo that leaves the pod Pending forever
MAX_DEVICES_PER_POD = 16
MAX_ENCODE_THREADS = 64
DEFAULT_SHM_SIZE_LIMIT = "8Gi"
# an extended resource name <domain>/<name>: nvidia.com/gpu, nvidia.com/gpu.shared, huawei.com/Ascend910-2c
RESOURCE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"

_NAME_MAX = 253
_STR_MAX = 1024
_MAP_MAX = 64
_LIST_MAX = 64
# the API server's resource.Quantity grammar
_NUM = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
_QUANTITY = rf"^(\+|-)?{_NUM}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUM}))?$"


# --- small builders ------------------------------------------------------------------------------
def _s(desc: str, **kw: Any) -> Schema:
    return {"type": "string", "description": desc, "maxLength": kw.pop("maxLength", _STR_MAX), **kw}


def _i(desc: str, **kw: Any) -> Schema:
    return {"type": "integer", "description": desc, **kw}


def _b(desc: str, **kw: Any) -> Schema:
    return {"type": "boolean", "description": desc, **kw}


def _obj(
    desc: str, props: dict[str, Schema], required: list[str] | None = None, rules: list[Schema] | None = None
) -> Schema:
    out: Schema = {"type": "object", "description": desc, "properties": props}
    if required:
        out["required"] = required
    if rules:
        out["x-kubernetes-validations"] = rules
    return out


def _map(desc: str) -> Schema:
    return {
        "type": "object",
        "description": desc,
        "maxProperties": _MAP_MAX,
        "additionalProperties": {"type": "string", "maxLength": _STR_MAX},
    }


def _list(desc: str, items: Schema, max_items: int = _LIST_MAX, **kw: Any) -> Schema:
    return {"type": "array", "description": desc, "maxItems": max_items, "items": items, **kw}


def _rule(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> Schema:
    out: Schema = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def _quantity_map(desc: str) -> Schema:
    return {
        "type": "object",
        "description": desc,
        "maxProperties": _MAP_MAX,
        "additionalProperties": {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "pattern": _QUANTITY,
        },
    }


# --- shared pieces -------------------------------------------------------------------------------
def _tolerations(prefix: str) -> Schema:
    item = _obj(
        "toleration: one pod toleration (core/v1 Toleration).",
        {
            "key": _s(
                "key: the taint key the toleration applies to; empty with operator Exists matches all.",
                maxLength=_NAME_MAX,
            ),
            "operator": _s("operator: Exists or Equal (default Equal).", enum=["Exists", "Equal"]),
            "value": _s("value: the taint value the toleration matches (operator Equal).", maxLength=63),
            "effect": _s(
                "effect: NoSchedule, PreferNoSchedule or NoExecute; empty matches all.",
                enum=["", "NoSchedule", "PreferNoSchedule", "NoExecute"],
            ),
            "tolerationSeconds": _i(
                "tolerationSeconds: how long a NoExecute taint is tolerated.", format="int64"
            ),
        },
    )
    return _list(f"{prefix}tolerations: tolerations added to the pods.", item)


def _resources(prefix: str) -> Schema:
    return _obj(
        f"{prefix}resources: compute resources of the container (accelerator devices are added by the "
        "operator from spec.accelerator or the role's accelerator.resourceName; do not list them here).",
        {
            "requests": _quantity_map("requests: minimum resources, e.g. cpu: 2, memory: 16Gi."),
            "limits": _quantity_map("limits: maximum resources."),
        },
    )


def _env(prefix: str) -> Schema:
    key_ref = {
        "name": _s("name: name of the referenced object.", maxLength=_NAME_MAX),
        "key": _s("key: key inside the referenced object.", maxLength=_NAME_MAX),
        "optional": _b("optional: whether the reference may be missing."),
    }
    item = _obj(
        "env: one environment variable.",
        {
            "name": _s("name: the variable name.", maxLength=_NAME_MAX, minLength=1),
            "value": _s("value: the literal value.", maxLength=32768),
            "valueFrom": _obj(
                "valueFrom: take the value from a Secret or ConfigMap key.",
                {
                    "secretKeyRef": _obj("secretKeyRef: a key of a Secret.", key_ref, ["name", "key"]),
                    "configMapKeyRef": _obj(
                        "configMapKeyRef: a key of a ConfigMap.", key_ref, ["name", "key"]
                    ),
                },
                rules=[
                    _rule(
                        "has(self.secretKeyRef) != has(self.configMapKeyRef)",
                        "env.valueFrom: set exactly one of secretKeyRef or configMapKeyRef",
                    )
                ],
            ),
        },
        ["name"],
        rules=[_rule("!(has(self.value) && has(self.valueFrom))", "env: set value or valueFrom, not both")],
    )
    return _list(
        f"{prefix}env: extra environment variables of the container. Names starting with "
        f"{c.ENV_PREFIX} are reserved for the operator.",
        item,
        **{
            "x-kubernetes-validations": [
                _rule("self.all(e, self.exists_one(f, f.name == e.name))", "env: names must be unique"),
                _rule(
                    f"self.all(e, !e.name.startsWith('{c.ENV_PREFIX}'))",
                    f"env: names starting with {c.ENV_PREFIX} are set by the operator and may not be "
                    "overridden",
                ),
            ]
        },
    )


def _pod_template(prefix: str) -> Schema:
    return _obj(
        f"{prefix}podTemplate: the pod-template fields a user may override (a small, well-defined subset).",
        {
            "annotations": _map("annotations: extra pod annotations."),
            "labels": _map(
                "labels: extra pod labels; keys under diffdisagg.io/ and app.kubernetes.io/ are reserved."
            ),
            "nodeSelector": _map(
                "nodeSelector: extra node selector, merged over spec.accelerator.nodeSelector."
            ),
            "tolerations": _tolerations(""),
            "priorityClassName": _s("priorityClassName: the pods' priority class.", maxLength=_NAME_MAX),
        },
        rules=[
            _rule(
                "!has(self.labels) || self.labels.all(k, !k.startsWith('diffdisagg.io/') "
                "&& !k.startsWith('app.kubernetes.io/'))",
                "podTemplate.labels: keys under diffdisagg.io/ and app.kubernetes.io/ are reserved for the "
                "operator",
                ".labels",
            )
        ],
    )


def _behavior_rules() -> Schema:
    policy = _obj(
        "policy: one scaling policy.",
        {
            "type": _s("type: Pods or Percent.", enum=["Pods", "Percent"]),
            "value": _i("value: the amount of change the policy allows per period (must be > 0).", minimum=1),
            "periodSeconds": _i(
                "periodSeconds: the window the policy holds over (1..1800).", minimum=1, maximum=1800
            ),
        },
        ["type", "value", "periodSeconds"],
    )
    return {
        "stabilizationWindowSeconds": _i(
            "stabilizationWindowSeconds: seconds of past recommendations considered (0..3600).",
            minimum=0,
            maximum=3600,
        ),
        "selectPolicy": _s("selectPolicy: Max, Min or Disabled.", enum=["Max", "Min", "Disabled"]),
        "policies": _list("policies: the scaling policies.", policy, max_items=8),
    }


def _autoscaling() -> Schema:
    return _obj(
        "autoscaling: scale the role on its queue depth. When enabled, the operator creates a "
        "DiffusionRoleScaler <name>-<role> and an autoscaling/v2 HPA on the External metric "
        f"{c.METRIC_QUEUE_DEPTH}; the role's inline replicas are then ignored.",
        {
            "enabled": _b("enabled: whether the role is autoscaled (default false).", default=False),
            "hpa": _b(
                "hpa: whether the operator creates the HPA (default true). false leaves the "
                "DiffusionRoleScaler to an autoscaler you run, e.g. a KEDA ScaledObject targeting it "
                "(two HPAs must never drive one scaler); the scaler starts at minReplicas.",
                default=True,
            ),
            "minReplicas": _i(
                "minReplicas: lowest replica count the HPA may set (default 1; at least 1).",
                minimum=1,
                default=1,
            ),
            "maxReplicas": _i("maxReplicas: highest replica count the HPA may set.", minimum=1),
            "targetQueueDepthPerReplica": {
                "type": "number",
                "description": "targetQueueDepthPerReplica: queued requests per replica the HPA aims for "
                "(AverageValue target; default 1).",
                "exclusiveMinimum": True,
                "minimum": 0,
                "default": 1,
            },
            "behavior": _obj(
                "behavior: HPA scaling behavior (autoscaling/v2 HorizontalPodAutoscalerBehavior).",
                {
                    "scaleUp": _obj("scaleUp: rules for scaling up.", _behavior_rules()),
                    "scaleDown": _obj("scaleDown: rules for scaling down.", _behavior_rules()),
                },
            ),
        },
        rules=[
            _rule(
                "!self.enabled || (has(self.hpa) && !self.hpa) || has(self.maxReplicas)",
                "autoscaling.maxReplicas is required when autoscaling.enabled is true (unless hpa is false)",
                ".maxReplicas",
            ),
            _rule(
                "!has(self.maxReplicas) || !has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
                "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
                ".minReplicas",
            ),
        ],
    )


def _role(role: str) -> Schema:
    p = ""
    return _obj(
        f"{role}: the {role} role's worker pool (one pod = one worker).",
        {
            "image": _s(f"{p}image: the worker image of the {role} role.", minLength=1),
            "replicas": _i(
                f"{p}replicas: number of {role} workers (default 1; ignored when autoscaled).", minimum=0
            ),
            "resources": _resources(p),
            "env": _env(p),
            "podTemplate": _pod_template(p),
            "autoscaling": _autoscaling(),
            "accelerator": _role_accelerator(role),
            **(
                {
                    "encodeThreads": _i(
                        "encodeThreads: threads of each decode worker that encode the PNG / MP4 on the CPU "
                        "while the device decodes the next batch (default 2; 0 = inline on the compute "
                        "thread, the device idle meanwhile). Give the decode container CPU to match.",
                        minimum=0,
                        maximum=MAX_ENCODE_THREADS,
                    )
                }
                if role == c.ROLE_DECODE
                else {}
            ),
        },
        ["image"],
    )


def _role_accelerator(role: str) -> Schema:
    return _obj(
        f"accelerator: the {role} role's own device resource, overriding spec.accelerator.resourceName for "
        "this role only (not with vendor cpu): e.g. a GPU the device plugin shares by time-slicing or MPS, "
        "or an Ascend vNPU; spec.accelerator's other fields still apply.",
        {
            "resourceName": _s(
                f"resourceName: extended resource the {role} pods request instead of "
                "spec.accelerator.resourceName or the vendor default, e.g. nvidia.com/gpu.shared or "
                "huawei.com/Ascend910-2c; the count is unchanged (devicesPerPod for denoise, else 1).",
                maxLength=_NAME_MAX,
                pattern=RESOURCE_NAME_PATTERN,
            ),
        },
        ["resourceName"],
    )


# --- DiffusionDisaggDeployment ---------------------------------------------------------------------
def _model() -> Schema:
    return _obj(
        "model: the diffusion model every role loads (local weights only; nothing is downloaded).",
        {
            "family": _s("family: the pipeline family: flux, sd3 or wan.", enum=list(FAMILIES)),
            "path": _s(
                "path: the model directory (HF layout) inside the container, e.g. /models/flux.",
                pattern="^/",
                minLength=2,
            ),
            "volume": _obj(
                "volume: where the weights come from; mounted read-only into every worker.",
                {
                    "mountPath": _s(
                        "mountPath: where the volume is mounted in the container.", pattern="^/", minLength=2
                    ),
                    "persistentVolumeClaim": _obj(
                        "persistentVolumeClaim: an existing claim holding the weights.",
                        {"claimName": _s("claimName: the claim's name.", maxLength=_NAME_MAX, minLength=1)},
                        ["claimName"],
                    ),
                    "hostPath": _obj(
                        "hostPath: a directory on the node holding the weights.",
                        {"path": _s("path: the directory on the node.", pattern="^/")},
                        ["path"],
                    ),
                },
                ["mountPath"],
                rules=[
                    _rule(
                        "has(self.persistentVolumeClaim) != has(self.hostPath)",
                        "model.volume: set exactly one of persistentVolumeClaim or hostPath",
                    )
                ],
            ),
        },
        ["family", "path"],
        rules=[
            _rule(
                "!has(self.volume) || self.path.startsWith(self.volume.mountPath)",
                "model.path must lie under model.volume.mountPath",
                ".path",
            )
        ],
    )


def _accelerator() -> Schema:
    return _obj(
        "accelerator: which devices the workers (not the gateway) get.",
        {
            "vendor": _s("vendor: nvidia, ascend or cpu.", enum=list(VENDORS)),
            "resourceName": _s(
                "resourceName: extended resource to request, overriding the vendor default "
                "(nvidia.com/gpu, huawei.com/Ascend910), e.g. huawei.com/ascend-1980.",
                maxLength=_NAME_MAX,
                pattern=RESOURCE_NAME_PATTERN,
            ),
            "devicesPerPod": _i(
                "devicesPerPod: devices of each denoise pod (default 1, at most "
                f"{MAX_DEVICES_PER_POD}): the denoise worker then runs as that many ranks, one device each "
                "(context or CFG parallel). Prefill and decode pods always get one device: their models "
                "would only be replicated on every rank, gaining neither speed nor memory.",
                minimum=1,
                maximum=MAX_DEVICES_PER_POD,
                default=1,
            ),
            "shmSizeLimit": {
                "description": "shmSizeLimit: size limit of the in-memory /dev/shm given to denoise pods "
                f"with devicesPerPod > 1, for the ranks' collectives (default {DEFAULT_SHM_SIZE_LIMIT}; "
                "counts against the pod's memory).",
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                "x-kubernetes-int-or-string": True,
                "pattern": _QUANTITY,
            },
            "nodeSelector": _map("nodeSelector: node labels the worker pods must match."),
            "tolerations": _tolerations(""),
            "hccnConfHostPath": _s(
                "hccnConfHostPath: (ascend) host file mounted read-only at /etc/hccn.conf.", pattern="^/"
            ),
        },
        ["vendor"],
        rules=[
            _rule(
                "self.vendor != 'cpu' || !has(self.resourceName)",
                "accelerator.resourceName cannot be set when accelerator.vendor is cpu",
                ".resourceName",
            ),
            _rule(
                "self.vendor == 'ascend' || !has(self.hccnConfHostPath)",
                "accelerator.hccnConfHostPath is only valid when accelerator.vendor is ascend",
                ".hccnConfHostPath",
            ),
        ],
    )


def _transfer() -> Schema:
    return _obj(
        "transfer: how tensors move between roles (default: the tcp backend).",
        {
            "backend": _s(
                "backend: tcp (default, needs nothing) or mooncake.", enum=list(BACKENDS), default="tcp"
            ),
            "protocol": _s(
                "protocol: mooncake's transport: tcp, rdma or ascend; required for mooncake.",
                enum=list(PROTOCOLS),
            ),
            "rdmaDevices": _list(
                "rdmaDevices: RDMA NIC names for mooncake's rdma protocol, e.g. mlx5_0.",
                _s("rdmaDevice: one RDMA device name.", maxLength=63, minLength=1),
                max_items=16,
            ),
            "rdmaResource": _s(
                "rdmaResource: extended resource requesting the RDMA NIC (default rdma/hca "
                "with protocol rdma; empty string requests none).",
                maxLength=_NAME_MAX,
            ),
            "bufferBytes": _i(
                "bufferBytes: size of each worker's registered staging buffer in bytes "
                "(default 268435456, at least 1 MiB).",
                format="int64",
                minimum=1048576,
            ),
            "portRange": _obj(
                "portRange: fixed port range of mooncake's RPC/handshake ports (default 15000-15063), "
                "named by the NetworkPolicy.",
                {
                    "min": _i("min: first port.", minimum=1024, maximum=65535),
                    "max": _i("max: last port.", minimum=1024, maximum=65535),
                },
                ["min", "max"],
                rules=[
                    _rule(
                        "self.min <= self.max",
                        "transfer.portRange.min must not exceed transfer.portRange.max",
                        ".min",
                    )
                ],
            ),
        },
        rules=[
            _rule(
                "!has(self.backend) || self.backend != 'mooncake' || has(self.protocol)",
                "transfer.protocol is required when transfer.backend is mooncake",
                ".protocol",
            ),
            _rule(
                "(has(self.backend) && self.backend == 'mooncake') || !has(self.protocol) || "
                "self.protocol == 'tcp'",
                "transfer.protocol rdma or ascend needs transfer.backend mooncake",
                ".protocol",
            ),
            _rule(
                "!has(self.rdmaDevices) || (has(self.protocol) && self.protocol == 'rdma')",
                "transfer.rdmaDevices is only valid with transfer.protocol rdma",
                ".rdmaDevices",
            ),
            _rule(
                "!has(self.rdmaResource) || (has(self.protocol) && self.protocol == 'rdma')",
                "transfer.rdmaResource is only valid with transfer.protocol rdma",
                ".rdmaResource",
            ),
            _rule(
                "!has(self.portRange) || (has(self.backend) && self.backend == 'mooncake')",
                "transfer.portRange is only valid with transfer.backend mooncake",
                ".portRange",
            ),
        ],
    )


def _gateway() -> Schema:
    return _obj(
        "gateway: the HTTP entry point (OpenAI-compatible API; no accelerator).",
        {
            "image": _s("image: the gateway image.", minLength=1),
            "replicas": _i(
                "replicas: gateway replicas: 0 or 1 (default 1) until video job state is shared.",
                minimum=0,
                default=1,
            ),
            "serviceType": _s(
                "serviceType: type of the gateway Service (default ClusterIP).",
                enum=list(SERVICE_TYPES),
                default="ClusterIP",
            ),
            "apiKeySecret": _obj(
                "apiKeySecret: Secret holding the client API key the gateway checks (none: open).",
                {
                    "name": _s("name: the Secret's name.", maxLength=_NAME_MAX, minLength=1),
                    "key": _s(
                        "key: the key in the Secret (default api-key).",
                        maxLength=_NAME_MAX,
                        default="api-key",
                    ),
                },
                ["name"],
            ),
            "resources": _resources(""),
            "env": _env(""),
            "podTemplate": _pod_template(""),
        },
        ["image"],
        rules=[
            _rule(
                "self.replicas <= 1",
                "gateway.replicas must be 0 or 1 until video job state is shared between gateways",
                ".replicas",
            )
        ],
    )


def ddd_spec_schema() -> Schema:
    roles = {r: _role(r) for r in c.STAGE_ROLES}
    return _obj(
        "spec: the desired disaggregated diffusion deployment.",
        {
            "model": _model(),
            "accelerator": _accelerator(),
            "transfer": _transfer(),
            "gateway": _gateway(),
            "roles": _obj(
                "roles: the three worker pools: prefill, denoise and decode.", roles, list(c.STAGE_ROLES)
            ),
        },
        ["model", "accelerator", "gateway", "roles"],
        rules=[
            _rule(
                "!has(self.transfer) || !has(self.transfer.protocol) || self.transfer.protocol != 'ascend' "
                "|| self.accelerator.vendor == 'ascend'",
                "transfer.protocol ascend needs accelerator.vendor ascend",
                ".transfer.protocol",
            ),
            *(
                _rule(
                    f"self.accelerator.vendor != 'cpu' || !has(self.roles.{r}.accelerator)",
                    f"roles.{r}.accelerator.resourceName cannot be set when accelerator.vendor is cpu",
                    f".roles.{r}.accelerator.resourceName",
                )
                for r in c.STAGE_ROLES
            ),
        ],
    )


def _pool_status(desc: str) -> Schema:
    return _obj(
        desc,
        {
            "desired": _i("desired: replicas the operator asked for."),
            "ready": _i("ready: replicas that are ready."),
            "updated": _i("updated: replicas running the current revision."),
            "summary": _s("summary: ready/desired, for printing.", maxLength=32),
            "autoscaled": _b("autoscaled: whether a DiffusionRoleScaler drives the replicas."),
        },
    )


def _conditions() -> Schema:
    cond = _obj(
        "condition: one observation of the deployment's state.",
        {
            "type": _s("type: Ready, Progressing, Degraded or ScalersReady.", maxLength=316),
            "status": _s("status: True, False or Unknown.", enum=["True", "False", "Unknown"]),
            "reason": _s("reason: CamelCase reason of the last transition.", maxLength=1024),
            "message": _s("message: human-readable detail.", maxLength=32768),
            "lastTransitionTime": {
                "type": "string",
                "format": "date-time",
                "description": "lastTransitionTime: when status last changed.",
            },
            "observedGeneration": _i(
                "observedGeneration: the spec generation the condition is about.", format="int64", minimum=0
            ),
        },
        ["type", "status"],
    )
    return _list(
        "conditions: Ready, Progressing, Degraded and ScalersReady.",
        cond,
        max_items=8,
        **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


def ddd_status_schema() -> Schema:
    gateway = _pool_status("gateway: the gateway's replicas and endpoint.")
    gateway["properties"]["endpoint"] = _s("endpoint: URL clients use to reach the gateway.")
    return _obj(
        "status: what the operator observed (no phase: read the conditions).",
        {
            "observedGeneration": _i(
                "observedGeneration: the spec generation last reconciled.", format="int64"
            ),
            "revision": _s("revision: hash of the pod-shaping spec the workers run.", maxLength=63),
            "conditions": _conditions(),
            "roles": _obj(
                "roles: per-role replica counts.",
                {r: _pool_status(f"{r}: the {r} pool's replica counts.") for r in c.STAGE_ROLES},
            ),
            "gateway": gateway,
            "kopf": {
                "type": "object",
                "description": "kopf: the operator framework's small progress record (internal).",
                "x-kubernetes-preserve-unknown-fields": True,
            },
        },
    )


def ddd_printer_columns() -> list[Schema]:
    cols: list[Schema] = [
        {"name": "Family", "type": "string", "jsonPath": ".spec.model.family"},
        {"name": "Vendor", "type": "string", "jsonPath": ".spec.accelerator.vendor"},
    ]
    for r in c.STAGE_ROLES:
        cols.append(
            {
                "name": r.capitalize(),
                "type": "string",
                "jsonPath": f".status.roles.{r}.summary",
                "description": f"ready/desired {r} workers",
            }
        )
    cols += [
        {"name": "Gateway", "type": "string", "jsonPath": ".status.gateway.summary"},
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Revision", "type": "string", "jsonPath": ".status.revision", "priority": 1},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.gateway.endpoint", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return cols


# --- DiffusionRoleScaler ---------------------------------------------------------------------------
def drs_spec_schema() -> Schema:
    return _obj(
        "spec: the replica count the HPA (or kubectl scale) wants for one role; the operator copies it "
        "to the role's Deployment and never writes it after creation.",
        {
            "replicas": _i("replicas: desired workers of the role (written through /scale).", minimum=0),
            "deployment": _s(
                "deployment: name of the owning DiffusionDisaggDeployment.", maxLength=_NAME_MAX, minLength=1
            ),
            "role": _s("role: the scaled role: prefill, denoise or decode.", enum=list(c.STAGE_ROLES)),
        },
        ["deployment", "role"],
        rules=[
            _rule(
                "self.deployment == oldSelf.deployment && self.role == oldSelf.role",
                "spec.deployment and spec.role are immutable",
                reason="FieldValueForbidden",
            )
        ],
    )


def drs_status_schema() -> Schema:
    return _obj(
        "status: what the operator observed of the role's workers.",
        {
            "replicas": _i("replicas: current workers of the role (from its Deployment)."),
            "readyReplicas": _i("readyReplicas: ready workers of the role."),
            "selector": _s(
                "selector: label selector of the role's pods (for the HPA, via /scale).", maxLength=_STR_MAX
            ),
            "observedGeneration": _i(
                "observedGeneration: the scaler generation last copied to the Deployment.", format="int64"
            ),
        },
    )


def drs_printer_columns() -> list[Schema]:
    return [
        {"name": "Deployment", "type": "string", "jsonPath": ".spec.deployment"},
        {"name": "Role", "type": "string", "jsonPath": ".spec.role"},
        {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
        {"name": "Current", "type": "integer", "jsonPath": ".status.replicas"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
