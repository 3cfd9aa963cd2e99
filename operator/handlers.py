"""kopf wiring: registers handlers on a given registry, so tests run each operator on a fresh one.

create/update/resume → full reconcile (with garbage collection of children no longer rendered);
timer → the same reconcile (drift repair, health) plus autoscaling; delete → drop in-memory state (the
children go with their owner references; kopf removes our finalizer when the handler returns).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from kubellm.operator.kube import KubeClient
from kubellm.operator.metrics import OperatorMetrics, start_server
from kubellm.operator.reconcile import OperatorConfig, Reconciler
from kubellm.operator.spec import GROUP, PLURAL, VERSION

FINALIZER = f"{GROUP}/finalizer"
LoginFn = Callable[..., Any]


def default_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else kubeconfig (through the official client when installed)."""
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    return kopf.login_via_client(**kwargs)


@dataclass
class Runtime:
    """What one operator instance holds; handlers close over it."""

    config: OperatorConfig
    login: LoginFn = default_login
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = None  # None: no metrics server (tests read `metrics` directly)
    scanning: bool = True
    client: KubeClient = field(default_factory=KubeClient)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    reconciler: Reconciler | None = None
    _runner: Any = None

    def __post_init__(self) -> None:
        self.reconciler = Reconciler(self.client, self.config, self.metrics)


def configure_settings(settings: kopf.OperatorSettings, scanning: bool = True) -> None:
    """Keep kopf's bookkeeping in our annotations (status holds only what users read)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.posting.loggers = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.scanning.disabled = not scanning
    settings.execution.max_workers = 4


def register(registry: kopf.OperatorRegistry, rt: Runtime) -> None:
    reconciler = rt.reconciler
    assert reconciler is not None
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_settings(settings, rt.scanning)
        if rt.metrics_port is not None:
            rt._runner = await start_server(rt.metrics, rt.metrics_host, rt.metrics_port)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        if rt._runner is not None:
            await rt._runner.cleanup()
        await reconciler.close()
        await rt.client.close()

    @kopf.on.login(registry=registry, errors=kopf.ErrorsMode.IGNORED)
    def login(**kwargs: Any) -> Any:
        info = rt.login(**kwargs)
        if info is not None:
            rt.client.connect(info)
        return info

    def sink(body: kopf.Body) -> Callable[[str, str, str], None]:
        def post(type_: str, reason: str, message: str) -> None:
            kopf.event(body, type=type_, reason=reason, message=message[:1000])

        return post

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry)
    async def apply(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        delta = await reconciler.reconcile(body, sink(body), gc=True, autoscale=False)
        if delta:
            patch.status.update(delta)

    @kopf.on.delete(*resource, registry=registry)
    async def delete(body: kopf.Body, **_: Any) -> None:
        reconciler.forget(body["metadata"]["namespace"], body["metadata"]["name"])

    @kopf.timer(*resource, registry=registry, interval=rt.config.interval, initial_delay=rt.config.interval)
    async def tick(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        if body.get("metadata", {}).get("deletionTimestamp"):
            return
        delta = await reconciler.reconcile(body, sink(body), gc=False, autoscale=True)
        if delta:
            patch.status.update(delta)
