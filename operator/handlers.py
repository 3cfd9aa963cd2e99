"""kopf wiring: registers handlers on a given registry, so tests run each operator on a fresh one.

create/update/resume → full reconcile (with garbage collection of children no longer rendered); a periodic
pass → the same reconcile (drift repair, health) plus autoscaling; delete → drop in-memory state (the children
go with their owner references).

No finalizer, so `kubectl delete llmd` completes while the operator is down: kopf puts one on every object that
a timer or a required delete handler serves. The delete handler is optional (it only forgets in-memory state),
and the periodic pass is the operator's own task over a kopf index (which drops deleted objects by itself).
With peering (several operator replicas) the pass is a kopf timer instead, because kopf pauses timers on the
standby replicas; that costs the finalizer, and deletion then waits for a running replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from kubellm.operator.events import EventPoster
from kubellm.operator.kube import Kind, KubeClient
from kubellm.operator.metrics import OperatorMetrics, start_server
from kubellm.operator.reconcile import OperatorConfig, Reconciler
from kubellm.operator.spec import GROUP, PLURAL, VERSION

FINALIZER = f"{GROUP}/finalizer"  # only with peering (see above)
LLMD = Kind(f"{GROUP}/{VERSION}", "LLMDeployment", PLURAL)
LoginFn = Callable[..., Any]
log = logging.getLogger("kubellm.operator")


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
    peering: bool = False  # several operator replicas: the periodic pass is a kopf timer (see the module doc)
    client: KubeClient = field(default_factory=KubeClient)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    reconciler: Reconciler | None = None
    events: EventPoster | None = None
    _runner: Any = None
    _periodic: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.reconciler = Reconciler(self.client, self.config, self.metrics)
        self.events = EventPoster(self.client)


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
    reconciler, events = rt.reconciler, rt.events
    assert reconciler is not None and events is not None
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, llmdeployments: kopf.Index, **_: Any) -> None:
        configure_settings(settings, rt.scanning)
        if rt.metrics_port is not None:
            rt._runner = await start_server(rt.metrics, rt.metrics_host, rt.metrics_port)
        if not rt.peering:
            rt._periodic = asyncio.create_task(periodic_pass(rt, llmdeployments), name="kubellm periodic pass")

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        if rt._periodic is not None:
            rt._periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rt._periodic
        if rt._runner is not None:
            await rt._runner.cleanup()
        await events.flush()
        await reconciler.close()
        await rt.client.close()

    @kopf.on.login(registry=registry, errors=kopf.ErrorsMode.IGNORED)
    def login(**kwargs: Any) -> Any:
        info = rt.login(**kwargs)
        if info is not None:
            rt.client.connect(info)
        return info

    @kopf.index(*resource, registry=registry, id="llmdeployments")
    def llmdeployments(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Any]:
        """Every LLMDeployment as last seen: what the periodic pass walks."""
        return {(namespace, name): copy.deepcopy(dict(body))}

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry)
    async def apply(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        delta = await reconciler.reconcile(body, _sink(events, body), gc=True, autoscale=False)
        if delta:
            patch.status.update(delta)

    @kopf.on.delete(*resource, registry=registry, optional=True)
    async def delete(body: kopf.Body, **_: Any) -> None:
        reconciler.forget(body["metadata"]["namespace"], body["metadata"]["name"])

    if rt.peering:

        @kopf.timer(*resource, registry=registry, interval=rt.config.interval, initial_delay=rt.config.interval)
        async def tick(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
            delta = await periodic_reconcile(rt, body)
            if delta:
                patch.status.update(delta)


def _sink(events: EventPoster, body: Mapping[str, Any]) -> Callable[[str, str, str], None]:
    def post(type_: str, reason: str, message: str) -> None:
        events.post(body, type_, reason, message)

    return post


async def periodic_reconcile(rt: Runtime, body: Mapping[str, Any]) -> dict[str, Any]:
    """Drift repair, health and autoscaling for one LLMDeployment; returns the status keys that changed."""
    assert rt.reconciler is not None and rt.events is not None
    if body.get("metadata", {}).get("deletionTimestamp"):
        return {}
    return await rt.reconciler.reconcile(body, _sink(rt.events, body), gc=False, autoscale=True)


async def periodic_pass(rt: Runtime, index: kopf.Index) -> None:
    """Every `interval` seconds, reconcile each indexed LLMDeployment and patch its status; forget the state of
    those the index no longer holds (deleted while no delete handler ran). One object's failure is logged (and
    counted by the reconciler) without stopping the others."""
    assert rt.reconciler is not None
    while True:
        await asyncio.sleep(rt.config.interval)
        live = {key: next(iter(store)) for key, store in list(index.items()) if store}
        for (namespace, name), body in live.items():
            try:
                delta = await periodic_reconcile(rt, body)
                if delta:
                    await rt.client.patch_status(LLMD, namespace, name, delta)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("periodic reconcile of %s/%s failed: %s", namespace, name, e)
        indexed = {key for key, store in list(index.items()) if store}  # read now: a new CR may have arrived
        for key in rt.reconciler.tracked_keys() - indexed:
            rt.reconciler.forget(*key)
