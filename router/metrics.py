"""The router's Prometheus metrics (names from kubellm.metric_names), one registry per router instance.

With `--workers N` every worker keeps its own registry; whichever worker answers GET /metrics asks the others
for their samples (`snapshot`) and serves the merge (`render_merged`): counters and histograms add up, each
gauge merges by its own rule (in-flight and queued requests add up; a backend is healthy if any worker can use
it; a KV-event seq shows the least advanced worker, -1 if any has no live stream).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from kubellm import metric_names as mn

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(mn.ROUTER_REQUESTS, "Requests routed", ["model", "backend", "code"], registry=r)
        self.duration = Histogram(
            mn.ROUTER_REQUEST_DURATION, "Request duration", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttfb = Histogram(
            mn.ROUTER_TTFT, "Time to the first byte sent to the client", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge(mn.ROUTER_IN_FLIGHT, "Requests in flight per backend", ["backend"], registry=r)
        self.queued = Gauge(mn.ROUTER_QUEUED, "Requests waiting for a replica", ["model"], registry=r)
        self.decisions = Counter(mn.ROUTER_ROUTING_DECISIONS, "Routing decisions", ["policy", "reason"], registry=r)
        self.match_ratio = Histogram(
            mn.ROUTER_PREFIX_MATCH_RATIO, "Matched prefix blocks / prompt blocks", buckets=_RATIO_BUCKETS, registry=r
        )
        self.retries = Counter(mn.ROUTER_RETRIES, "Retries to another replica", ["model"], registry=r)
        self.backend_healthy = Gauge(
            mn.ROUTER_BACKEND_HEALTHY, "1 if the backend takes requests", ["backend"], registry=r
        )
        self.discovery_events = Counter(mn.ROUTER_DISCOVERY_EVENTS, "Discovery events", ["kind"], registry=r)
        self.kv_event_seq = Gauge(
            mn.ROUTER_KV_EVENT_SEQ, "Seq of the last KV event applied (-1: no live stream)", ["backend"], registry=r
        )

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), memoized: prometheus-client's own lookup is a visible share of a request's cost.
        Only for counters and histograms (their children live as long as the registry)."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def forget_backend(self, backend: str) -> None:
        for g in (self.in_flight, self.backend_healthy, self.kv_event_seq):
            try:
                g.remove(backend)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> list[dict[str, Any]]:
        """This registry's families as JSON-able data (what one worker sends another)."""
        return [
            {
                "name": fam.name,
                "doc": fam.documentation,
                "type": fam.type,
                "samples": [[s.name, s.labels, s.value] for s in fam.samples],
            }
            for fam in self.registry.collect()
        ]


GAUGE_MERGE: dict[str, Callable[[Iterable[float]], float]] = {
    mn.ROUTER_IN_FLIGHT: sum,
    mn.ROUTER_QUEUED: sum,
    mn.ROUTER_BACKEND_HEALTHY: max,
    mn.ROUTER_KV_EVENT_SEQ: min,
}


def merge_snapshots(snapshots: Iterable[list[dict[str, Any]]]) -> list[Metric]:
    """Families of several workers merged into one view (see the module docstring for the rules)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for snap in snapshots:
        for fam in snap:
            if fam["name"] not in families:
                families[fam["name"]] = Metric(fam["name"], fam["doc"], fam["type"])
                values[fam["name"]] = {}
            per_sample = values[fam["name"]]
            for name, labels, value in fam["samples"]:
                per_sample.setdefault((name, tuple(sorted(labels.items()))), []).append(float(value))
    for fname, fam in families.items():
        for (name, labels), vals in values[fname].items():
            if fam.type == "gauge":
                merged = GAUGE_MERGE.get(fname, sum)(vals)
            elif name.endswith("_created"):
                merged = min(vals)
            else:
                merged = sum(vals)
            fam.add_sample(name, dict(labels), merged)
    return list(families.values())


class _Families:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render_merged(snapshots: Iterable[list[dict[str, Any]]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merge_snapshots(snapshots)))  # type: ignore[arg-type]
    return generate_latest(registry)
