"""Pure: the pipeline ConfigMap and the inter-role token Secret.

The Secret is create-only (see `render.CREATE_ONLY_KINDS`): its token is generated once by the
reconcile and never rotated by it — rotating would cut every in-flight hand-over.
"""

from __future__ import annotations

import json

from diffdisagg.operator import contract as c
from diffdisagg.operator.builders.common import (
    CONFIG_FILE,
    TOKEN_KEY,
    Json,
    Owner,
    child_name,
    config_map_name,
    gateway_url,
    metadata,
    token_secret_name,
)


def pipeline_config(owner: Owner) -> Json:
    spec = owner.spec
    t = spec.transfer
    return {
        "version": 1,
        "deployment": owner.name,
        "namespace": owner.namespace,
        "revision": owner.revision,
        "model": {"family": spec.model.family, "path": spec.model.path},
        "gateway": {"url": gateway_url(owner)},
        "roles": {
            r.name: {
                "service": f"{child_name(owner, r.name)}.{owner.namespace}.svc",
                "controlPort": c.DEFAULT_CONTROL_PORT,
            }
            for r in spec.roles
        },
        "transfer": {
            "backend": t.backend,
            "protocol": t.protocol,
            "bufferBytes": t.buffer_bytes,
            "portRange": [t.port_min, t.port_max] if t.mooncake else None,
        },
    }


def config_map(owner: Owner) -> Json:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, config_map_name(owner)),
        "data": {CONFIG_FILE: json.dumps(pipeline_config(owner), indent=2, sort_keys=True)},
    }


def token_secret(owner: Owner, token: str) -> Json:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(owner, token_secret_name(owner)),
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }
