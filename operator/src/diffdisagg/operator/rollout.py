"""Pure: the deployment revision, a hash of everything that shapes a pod.

Replica counts, autoscaling and the gateway's Service type are left out: changing them must not
restart a single worker. Everything else (images, env, resources, model, accelerator and the roles'
accelerator overrides, transfer, pod-template overrides) is in, and the revision is deployment-wide on
purpose — workers of different revisions refuse to hand over to each other, so a new denoise image must
roll every role.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from diffdisagg.operator.api.types import DDDSpec, RoleSpec

REVISION_LENGTH = 10


def _role_shape(role: RoleSpec) -> dict:
    out = dataclasses.asdict(role.container)
    # only when set, so that deployments without a per-role resource keep their revision (no restart)
    if role.resource_name is not None:
        out["accelerator"] = {"resourceName": role.resource_name}
    if role.encode_threads is not None:
        out["encodeThreads"] = role.encode_threads
    return out


def revision(spec: DDDSpec) -> str:
    shaped = {
        "model": dataclasses.asdict(spec.model),
        "accelerator": dataclasses.asdict(spec.accelerator),
        "transfer": dataclasses.asdict(spec.transfer),
        "gateway": dataclasses.asdict(spec.gateway.container)
        | {"apiKey": [spec.gateway.api_key_secret, spec.gateway.api_key_key]},
        "roles": {r.name: _role_shape(r) for r in spec.roles},
    }
    blob = json.dumps(shaped, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:REVISION_LENGTH]
