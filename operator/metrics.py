"""The operator's own Prometheus metrics (names from kubellm.metric_names) and its /metrics + /healthz server."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from kubellm import metric_names as mn


class OperatorMetrics:
    """One registry per operator instance, so tests can run several operators in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["namespace", "name"]
        self.desired = Gauge(mn.OPERATOR_DESIRED_REPLICAS, "engine replicas the operator wants", labels,
                             registry=self.registry)  # fmt: skip
        self.ready = Gauge(mn.OPERATOR_READY_REPLICAS, "engine replicas ready", labels, registry=self.registry)
        self.scaling = Counter(
            mn.OPERATOR_SCALING_DECISIONS,
            "autoscaling decisions by reason",
            [*labels, "reason"],
            registry=self.registry,
        )
        self.errors = Counter(mn.OPERATOR_RECONCILE_ERRORS, "failed reconciles", labels, registry=self.registry)
        self.duration = Histogram(
            mn.OPERATOR_RECONCILE_DURATION,
            "time of one reconcile",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

    def forget(self, namespace: str, name: str) -> None:
        for g in (self.desired, self.ready):
            try:
                g.remove(namespace, name)
            except KeyError:
                pass

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def start_server(metrics: OperatorMetrics, host: str, port: int) -> web.AppRunner:
    async def handle_metrics(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", handle_health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
