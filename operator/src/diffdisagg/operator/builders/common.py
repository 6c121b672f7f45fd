"""Pure: names, labels and ownerReferences shared by every child of a DiffusionDisaggDeployment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffdisagg.operator import contract as c
from diffdisagg.operator.api import names as n
from diffdisagg.operator.api.types import DDDSpec

Json = dict[str, Any]

TOKEN_KEY = "token"
TOKEN_DIR = "/var/run/diffdisagg/token"
API_KEY_DIR = "/var/run/diffdisagg/api-key"
CONFIG_DIR = "/etc/diffdisagg"
CONFIG_FILE = "pipeline.json"


@dataclass(frozen=True)
class Owner:
    """The DiffusionDisaggDeployment being rendered (identity + parsed spec + revision)."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: DDDSpec
    revision: str


def child_name(owner: Owner, suffix: str) -> str:
    return f"{owner.name}-{suffix}"


def token_secret_name(owner: Owner) -> str:
    return child_name(owner, "token")


def config_map_name(owner: Owner) -> str:
    return child_name(owner, "config")


def network_policy_name(owner: Owner) -> str:
    return child_name(owner, "workers")


def gateway_url(owner: Owner) -> str:
    return f"http://{child_name(owner, c.ROLE_GATEWAY)}.{owner.namespace}.svc:{c.GATEWAY_HTTP_PORT}"


def selector_labels(owner: Owner, role: str) -> dict[str, str]:
    """Immutable selector of a role's pods (never contains the revision)."""
    return {c.LABEL_DEPLOYMENT: owner.name, c.LABEL_ROLE: role}


def selector_string(owner: Owner, role: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(owner, role).items())


def labels(owner: Owner, role: str | None = None) -> dict[str, str]:
    out = {
        c.LABEL_APP_NAME: c.LABEL_APP_NAME_VALUE,
        c.LABEL_MANAGED_BY: c.LABEL_MANAGED_BY_VALUE,
        c.LABEL_DEPLOYMENT: owner.name,
    }
    if role:
        out[c.LABEL_COMPONENT] = role
        out[c.LABEL_ROLE] = role
    return out


def owner_reference(owner: Owner) -> Json:
    return {
        "apiVersion": n.API_VERSION,
        "kind": n.DDD_KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(owner: Owner, name: str, role: str | None = None) -> Json:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, role),
        "ownerReferences": [owner_reference(owner)],
    }
