"""The Grafana dashboard (docs/grafana/diffdisagg-dashboard.json) asks only for what the gateway exports.

Every metric a panel query or template variable names, and every label it selects on or groups by, is
checked against the sample names and label names of a real gateway's `/metrics` text (the gateway is the
one scrape target: it exports every diffdisagg_* series, workers export none). The gateway is built
in-process and driven through its own observers, registry and request table, so each labelled family has
at least one sample to read the labels off. The only series not ours are the HPA replica counts from
kube-state-metrics, listed below with the labels the dashboard may use (checked too, and matched against
the operator's child naming: the HPA of role R of deployment D is named `D-R`).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from diffdisagg.worker import contract
from diffdisagg.worker.control.messages import Load, Register
from diffdisagg.worker.gateway.app import Gateway
from diffdisagg.worker.gateway.config import GatewayConfig

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "diffdisagg-dashboard.json"

#: Series from kube-state-metrics (not ours), with the labels the dashboard may use on them.
EXTERNAL = {
    "kube_horizontalpodautoscaler_status_desired_replicas": {"namespace", "horizontalpodautoscaler"},
    "kube_horizontalpodautoscaler_spec_max_replicas": {"namespace", "horizontalpodautoscaler"},
}
_FUNCS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile", "label_values",
    "clamp_min", "topk", "bottomk", "abs", "delta", "deriv", "avg_over_time", "max_over_time", "vector",
}  # fmt: skip
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, from a gateway's rendered /metrics with every family populated."""

    async def render() -> str:
        gw = Gateway(GatewayConfig(deployment="dep", token=b"t" * 32))
        for i, role in enumerate(contract.STAGE_ROLES):
            gw.registry.register(
                Register(
                    worker_id=f"w{i}",
                    role=role,
                    deployment="dep",
                    revision=gw.cfg.revision,
                    family=gw.cfg.family,
                    control_url="",
                    handover={"host": "127.0.0.1", "port": 1},
                    load=Load(queued=0, inflight=0, held=0, free_slots=2, capacity=2),
                )
            )
        obs = gw.metrics.observers()
        obs.stage("denoise", 0.5)
        obs.transfer("denoise", 1024, 0.01)
        obs.error("worker_lost")
        gw.metrics.request_seconds.labels("dep", "images").observe(1.0)
        return gw.metrics.render().decode()

    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(asyncio.run(render())):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def _queries(dash: dict) -> list[str]:
    qs = []
    for p in dash["panels"]:
        qs += [t["expr"] for t in p.get("targets", [])]
        for inner in p.get("panels", []):  # collapsed rows keep their panels inside
            qs += [t["expr"] for t in inner.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            qs.append(q["query"] if isinstance(q, dict) else q)
    return qs


def parse(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """(metric -> labels in its own selector, labels in by()/without()/label_values()) of one query."""
    grouping: set[str] = set()
    m = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", expr)
    if m:
        return {m.group(1): {m.group(2)}}, set()
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may contain anything
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors ([$__rate_interval], [5m])
    for lst in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        grouping |= {x.strip() for x in lst.split(",") if x.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    metrics: dict[str, set[str]] = {}
    for name, sel in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", text):
        metrics.setdefault(name, set()).update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", sel))
    text = re.sub(r"\{[^}]*\}", " ", text)
    for tok in _IDENT.finditer(text):
        name = tok.group(0)
        following = text[tok.end() :].lstrip()[:1]
        if (
            name in _KEYWORDS
            or name in _FUNCS
            or following == "("
            or text[tok.start() - 1 : tok.start()] == "$"
        ):
            continue
        metrics.setdefault(name, set())
    return metrics, grouping


def test_dashboard_names_only_exported_metrics_and_labels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ours = exported()
    queries = _queries(dash)
    assert len(queries) >= 10, queries
    problems = []
    seen: set[str] = set()
    for expr in queries:
        metrics, grouping = parse(expr)
        assert metrics, f"no metric found in {expr!r}"
        for name, labels in metrics.items():
            seen.add(name)
            allowed = EXTERNAL.get(name) if name not in ours else ours[name]
            if allowed is None:
                problems.append(f"{name!r} is not exported by the gateway: {expr}")
                continue
            if extra := labels - allowed:
                problems.append(f"{name!r} has no label(s) {sorted(extra)}: {expr}")
            if extra := grouping - allowed:
                problems.append(f"grouping by {sorted(extra)} but {name!r} has no such label: {expr}")
    assert not problems, "\n".join(problems)
    # the panels the issue asks for are there
    for name in (
        contract.METRIC_QUEUE_DEPTH,
        contract.METRIC_STAGE_SECONDS + "_bucket",
        contract.METRIC_TRANSFER_BYTES,
        contract.METRIC_TRANSFER_SECONDS + "_bucket",
        contract.METRIC_FREE_SLOTS,
        contract.METRIC_REQUEST_ERRORS,
        contract.METRIC_REQUEST_SECONDS + "_count",
        "diffdisagg_live_workers",
    ):
        assert name in seen, f"the dashboard shows no {name}"


def test_role_variable_and_hpa_names_match_the_contract() -> None:
    dash = json.loads(DASHBOARD.read_text())
    role = next(v for v in dash["templating"]["list"] if v["name"] == "role")
    assert tuple(role["query"].split(",")) == contract.STAGE_ROLES
    from diffdisagg.operator.builders.common import child_name

    class _Owner:
        name = "mydep"

    # the dashboard selects the HPA as "$deployment-$role": the operator's name for it
    hpa_exprs = [q for q in _queries(dash) if "kube_horizontalpodautoscaler" in q]
    assert hpa_exprs and all('horizontalpodautoscaler="$deployment-$role"' in q for q in hpa_exprs)
    assert child_name(_Owner(), "denoise") == "mydep-denoise"  # type: ignore[arg-type]


def test_the_parser_catches_a_wrong_name_and_label() -> None:
    """The check above can fail: a misspelt metric and a label the gateway does not put on it."""
    ours = exported()
    metrics, grouping = parse(
        'sum by (pod) (rate(diffdisagg_stage_second_bucket{deployment="$deployment"}[5m]))'
    )
    assert "diffdisagg_stage_second_bucket" in metrics and "diffdisagg_stage_second_bucket" not in ours
    assert grouping == {"pod"} and "pod" not in ours["diffdisagg_stage_seconds_bucket"]
    metrics, _ = parse('diffdisagg_queue_depth{deployment="x", worker="w"}')
    assert metrics["diffdisagg_queue_depth"] - ours["diffdisagg_queue_depth"] == {"worker"}
