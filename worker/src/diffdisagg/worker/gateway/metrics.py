"""The gateway's Prometheus metrics (names from `diffdisagg.worker.contract`).

Queue depth, in-flight and free slots are computed from the dispatcher's request table and the registry
at scrape time (a custom collector), so they can never drift from the truth; latencies, stage and
transfer times and errors are ordinary histograms and counters. One private CollectorRegistry per
gateway, so tests can run several gateways in one process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from diffdisagg.worker import contract as c
from diffdisagg.worker.gateway.dispatch import Dispatcher, Observers

_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _TableCollector(Collector):
    def __init__(self, deployment: str, dispatcher: Dispatcher) -> None:
        self.deployment = deployment
        self.d = dispatcher

    def collect(self) -> Iterator[Metric]:
        labels = [c.METRIC_LABEL_DEPLOYMENT, c.METRIC_LABEL_ROLE]
        depth = GaugeMetricFamily(
            c.METRIC_QUEUE_DEPTH,
            "Requests whose next stage is the role and that have not started it: in the gateway queue, "
            "held upstream (receiver busy), or queued in a worker of the role",
            labels=labels,
        )
        where = GaugeMetricFamily(
            "diffdisagg_queue_waiting",
            "Breakdown of diffdisagg_queue_depth by place (gateway | upstream | worker)",
            labels=[*labels, "place"],
        )
        inflight = GaugeMetricFamily(c.METRIC_INFLIGHT, "Requests being computed by the role", labels=labels)
        free = GaugeMetricFamily(
            c.METRIC_FREE_SLOTS, "Free receive slots reported by the role's live workers", labels=labels
        )
        live = GaugeMetricFamily("diffdisagg_live_workers", "Live workers per role", labels=labels)
        for role in c.STAGE_ROLES:
            key = [self.deployment, role]
            depth.add_metric(key, self.d.queue_depth(role))
            for place, n in self.d.waiting_by_place(role).items():
                where.add_metric([*key, place], n)
            inflight.add_metric(key, self.d.inflight(role))
            workers = self.d.registry.live(role)
            free.add_metric(key, sum(w.load.free_slots for w in workers))
            live.add_metric(key, len(workers))
        load = GaugeMetricFamily(
            "diffdisagg_worker_load",
            "Each live worker's own report (queued | inflight | held | free_slots | slots_in_use)",
            labels=[*labels, "worker", "kind"],
        )
        for w in self.d.registry.live():
            for kind in ("queued", "inflight", "held", "free_slots", "slots_in_use"):
                load.add_metric([self.deployment, w.role, w.worker_id, kind], getattr(w.load, kind))
        yield from (depth, where, inflight, free, live, load)


class GatewayMetrics:
    def __init__(self, deployment: str) -> None:
        self.deployment = deployment
        self.registry = CollectorRegistry(auto_describe=True)
        dl = [c.METRIC_LABEL_DEPLOYMENT]
        role = [*dl, c.METRIC_LABEL_ROLE]
        self.stage = Histogram(
            c.METRIC_STAGE_SECONDS,
            "Compute time of one stage of one request",
            role,
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.transfer_bytes = Counter(
            c.METRIC_TRANSFER_BYTES.removesuffix("_total"),
            "Bytes handed over into the role's workers",
            role,
            registry=self.registry,
        )
        self.transfer_seconds = Histogram(
            c.METRIC_TRANSFER_SECONDS,
            "Hand-over time into the role's workers (offer to loaded)",
            role,
            buckets=_TRANSFER_BUCKETS,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            c.METRIC_REQUEST_SECONDS,
            "Gateway latency of a generation request (arrival to answer)",
            [*dl, "endpoint"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            c.METRIC_REQUEST_ERRORS.removesuffix("_total"),
            "Requests answered with an error, by reason",
            [*dl, c.METRIC_LABEL_REASON],
            registry=self.registry,
        )

    def attach(self, dispatcher: Dispatcher) -> None:
        self.registry.register(_TableCollector(self.deployment, dispatcher))

    def observers(self) -> Observers:
        d = self.deployment
        return Observers(
            stage=lambda role, s: self.stage.labels(d, role).observe(s),
            transfer=self._observe_transfer,
            error=lambda reason: self.errors.labels(d, reason).inc(),
        )

    def _observe_transfer(self, role: str, nbytes: int, seconds: float) -> None:
        self.transfer_bytes.labels(self.deployment, role).inc(nbytes)
        self.transfer_seconds.labels(self.deployment, role).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
