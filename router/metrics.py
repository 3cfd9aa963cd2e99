"""The router's Prometheus metrics (names from kubellm.metric_names), one registry per router instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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

    def forget_backend(self, backend: str) -> None:
        for g in (self.in_flight, self.backend_healthy, self.kv_event_seq):
            try:
                g.remove(backend)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
