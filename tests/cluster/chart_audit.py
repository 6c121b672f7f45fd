"""RBAC least privilege, measured: what a ServiceAccount did (from the apiserver's audit log) against what
a chart granted it (its Role/ClusterRole rules), both as sets of (apiGroup, resource[/subresource], verb).

Pure functions over parsed JSON; the chart tests feed them the plane's audit log and `kubectl get` output.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Permission = tuple[str, str, str]  # (apiGroup, resource or resource/subresource, verb)


@dataclass(frozen=True)
class AuditRequest:
    """One resource request of the audit log (non-resource URLs such as /apis discovery are not kept)."""

    audit_id: str
    username: str
    verb: str
    api_group: str
    resource: str  # "deployments" or "diffusiondisaggdeployments/status"
    namespace: str | None
    code: int | None
    decision: str | None  # the authorizer's: "allow" | "forbid"


def read_audit(path: Path, offset: int = 0) -> Iterator[AuditRequest]:
    """Resource requests logged after byte `offset`, one per audit ID (a watch logs ResponseStarted and
    ResponseComplete: the later stage wins, it carries the final response code)."""
    seen: dict[str, AuditRequest] = {}
    with path.open("rb") as f:
        f.seek(offset)
        for raw in f:
            try:
                ev = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line being written right now
            ref = ev.get("objectRef")
            if not ref or not ref.get("resource"):
                continue
            resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            seen[ev["auditID"]] = AuditRequest(
                audit_id=ev["auditID"],
                username=ev.get("user", {}).get("username", ""),
                verb=ev["verb"],
                api_group=ref.get("apiGroup", ""),
                resource=resource,
                namespace=ref.get("namespace"),
                code=(ev.get("responseStatus") or {}).get("code"),
                decision=(ev.get("annotations") or {}).get("authorization.k8s.io/decision"),
            )
    yield from seen.values()


def used_permissions(requests: Iterable[AuditRequest], username: str) -> set[Permission]:
    """Every permission `username`'s requests needed. A server-side apply (verb patch) that created its object
    answers 201 and was also authorized for `create` inside the same request, which the audit log does not
    list separately: count it as both."""
    used: set[Permission] = set()
    for r in requests:
        if r.username != username:
            continue
        used.add((r.api_group, r.resource, r.verb))
        if r.verb == "patch" and r.code == 201:
            used.add((r.api_group, r.resource, "create"))
    return used


def denied(requests: Iterable[AuditRequest], username: str) -> set[Permission]:
    """Requests of `username` that RBAC refused (the authorizer's decision; a 403 for a terminating
    namespace is not one)."""
    return {
        (r.api_group, r.resource, r.verb)
        for r in requests
        if r.username == username and r.decision == "forbid"
    }


def granted_permissions(rules: Iterable[dict[str, Any]]) -> set[Permission]:
    """Expand PolicyRules into permissions. Wildcards and resourceNames are refused outright: a
    least-privilege chart has no use for them, and they would make the comparison meaningless."""
    out: set[Permission] = set()
    for rule in rules:
        assert not rule.get("nonResourceURLs"), f"non-resource rule in the chart: {rule}"
        assert not rule.get("resourceNames"), f"resourceNames make grants conditional: {rule}"
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    assert "*" not in (group, resource, verb), f"wildcard in the chart's RBAC: {rule}"
                    out.add((group, resource, verb))
    return out


def fmt(perms: Iterable[Permission]) -> str:
    return (
        "\n".join(f"  {verb:<8} {group or 'core'}/{resource}" for group, resource, verb in sorted(perms))
        or "  -"
    )
