"""One reconcile of one LLMDeployment: validate, render, apply what differs, read health, autoscale, status.

Independent of kopf (handlers.py adapts it), so the same code runs from create/update/resume handlers
and from the periodic timer. A second run over an unchanged world sends no writes: apply plans compare
first, and the status patch holds only changed keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from kubellm.operator import apply as ap
from kubellm.operator import render as rd
from kubellm.operator import status as st
from kubellm.operator.autoscaler import Autoscaler, Decision, Policy, Sample
from kubellm.operator.kube import KINDS, ApiError, KubeClient, kind_of
from kubellm.operator.metrics import OperatorMetrics
from kubellm.operator.metrics_scrape import fetch_all, parse_engine_metrics, parse_router_queued
from kubellm.operator.spec import LLMDeploymentSpec, SpecError, parse_spec

log = logging.getLogger("kubellm.operator")

# type, reason, message -> posts a Kubernetes Event on the LLMDeployment
EventSink = Callable[[str, str, str], None]

GC_KINDS = [KINDS[k] for k in KINDS if k[1] != "Pod"]
SERVICE_MONITOR = KINDS[("monitoring.coreos.com/v1", "ServiceMonitor")]
DEPLOYMENT = KINDS[("apps/v1", "Deployment")]
POD = KINDS[("v1", "Pod")]


def _now_iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class OperatorConfig:
    render: rd.RenderOptions = field(default_factory=rd.RenderOptions)
    interval: float = 15.0  # timer period: drift repair, health, autoscaling
    scrape_timeout: float = 2.0
    service_monitor_recheck: float = 300.0
    clock: Callable[[], float] = time.time


@dataclass
class _Tracked:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    scaler: Autoscaler | None = None
    last_event: tuple[str, str] | None = None


def _policy(spec: LLMDeploymentSpec) -> Policy:
    a = spec.autoscaling
    return Policy(
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        target_waiting=a.target_waiting_requests,
        target_kv=a.target_kv_cache_usage,
        scale_up_window_s=a.scale_up_stabilization_seconds,
        scale_down_delay_s=a.scale_down_delay_seconds,
    )


def _port(pod: Mapping[str, Any], container: str, default: int) -> int:
    for c in pod.get("spec", {}).get("containers") or []:
        if c.get("name") == container:
            for p in c.get("ports") or []:
                if p.get("name") == "http":
                    return int(p.get("containerPort", default))
    return default


class Reconciler:
    def __init__(self, client: KubeClient, config: OperatorConfig, metrics: OperatorMetrics) -> None:
        self.client = client
        self.config = config
        self.metrics = metrics
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self._sm_checked: tuple[float, bool] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._warned_unreachable = False

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    def forget(self, namespace: str, name: str) -> None:
        self._tracked.pop((namespace, name), None)
        self.metrics.forget(namespace, name)

    def tracked_keys(self) -> set[tuple[str, str]]:
        """(namespace, name) of every LLMDeployment this reconciler holds state for."""
        return set(self._tracked)

    async def _service_monitor_available(self) -> bool:
        now = self.config.clock()
        if self._sm_checked is None or now - self._sm_checked[0] > self.config.service_monitor_recheck:
            try:
                ok = await self.client.serves(SERVICE_MONITOR)
            except ApiError:
                ok = False
            self._sm_checked = (now, ok)
        return self._sm_checked[1]

    async def reconcile(
        self, body: Mapping[str, Any], events: EventSink, *, gc: bool, autoscale: bool
    ) -> dict[str, Any]:
        """Bring children in line with `body`; returns the status keys that changed (empty: nothing to write)."""
        meta = body.get("metadata", {})
        key = (meta["namespace"], meta["name"])
        tracked = self._tracked.setdefault(key, _Tracked())
        async with tracked.lock:
            started = time.perf_counter()
            try:
                return await self._reconcile(body, tracked, events, gc=gc, autoscale=autoscale)
            except Exception:
                self.metrics.errors.labels(*key).inc()
                raise
            finally:
                self.metrics.duration.observe(time.perf_counter() - started)

    async def _reconcile(
        self, body: Mapping[str, Any], tracked: _Tracked, events: EventSink, *, gc: bool, autoscale: bool
    ) -> dict[str, Any]:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        generation = int(meta.get("generation") or 0)
        old_status = dict(body.get("status") or {})
        now = self.config.clock()
        owner = rd.Owner(name=name, namespace=namespace, uid=meta.get("uid", ""))

        try:
            spec = parse_spec(name, body.get("spec"))
        except SpecError as e:
            message = f"invalid LLMDeployment: {e}"
            self._event_once(tracked, events, "Warning", "InvalidSpec", message)
            observed = st.Observed(
                generation=generation, desired_replicas=0, engine=None, router=None, spec_error=message
            )
            return self._status_delta(observed, old_status, now, keep_children=True)[1]
        if tracked.last_event and tracked.last_event[0] == "InvalidSpec":
            tracked.last_event = None  # fixed: a later relapse deserves a new Event

        sm_served = await self._service_monitor_available()
        opts = dataclasses.replace(self.config.render, service_monitor_available=sm_served)

        names = rd.Names.of(name)
        engine = await self.client.get(DEPLOYMENT, namespace, names.engine)
        replicas = self._replicas(spec, tracked, engine, now)
        rendered = rd.render(spec, owner, opts, replicas)
        current: dict[tuple[str, str], dict[str, Any]] = {}
        apply_error: str | None = None
        for manifest in rendered.manifests:
            mkind = kind_of(manifest)
            mname = manifest["metadata"]["name"]
            if mkind == DEPLOYMENT and mname == names.engine:
                existing = engine
            else:
                existing = await self.client.get(mkind, namespace, mname)
            try:
                current[(manifest["kind"], mname)] = await self._apply(manifest, existing, namespace)
            except (ApiError, _Conflict) as e:
                apply_error = str(e)
                self.metrics.errors.labels(namespace, name).inc()
                log.warning("%s/%s: %s", namespace, name, e)
        if gc:
            await self._collect_garbage(owner, rendered)

        pods = await self.client.list(POD, namespace, {rd.LABEL_LLMD: name})
        engine_pods = [p for p in pods if p.get("metadata", {}).get("labels", {}).get(rd.LABEL_COMPONENT) == "engine"]
        router_pods = [p for p in pods if p.get("metadata", {}).get("labels", {}).get(rd.LABEL_COMPONENT) == "router"]

        decision: Decision | None = None
        if autoscale and spec.autoscaling.enabled and tracked.scaler is not None and apply_error is None:
            sample = await self._sample(spec, engine_pods, router_pods, now)
            decision = tracked.scaler.observe(sample)
            if decision is not None:
                rendered = rd.render(spec, owner, opts, decision.replicas)
                dep = next(m for m in rendered.manifests if m["kind"] == "Deployment")
                current[("Deployment", names.engine)] = await self._apply(
                    dep, current.get(("Deployment", names.engine)), namespace
                )
                self.metrics.scaling.labels(namespace, name, decision.reason).inc()
                events("Normal", decision.reason, decision.message)
                log.info("%s/%s scaled: %s (%s)", namespace, name, decision.message, decision.reason)
        desired = decision.replicas if decision else replicas
        self.metrics.desired.labels(namespace, name).set(desired)

        engine_now = current.get(("Deployment", names.engine))
        ready = int(((engine_now or {}).get("status") or {}).get("readyReplicas", 0) or 0)
        self.metrics.ready.labels(namespace, name).set(ready)
        observed = st.Observed(
            generation=generation,
            desired_replicas=desired,
            engine=engine_now,
            router=current.get(("Deployment", names.router)),
            engine_pods=tuple(engine_pods),
            endpoint=rendered.endpoint,
            selector=rendered.selector,
            model=rendered.model_name,
            apply_error=apply_error,
            last_scale_time=_now_iso(now) if decision else None,
            last_scale_reason=f"{decision.reason}: {decision.message}" if decision else None,
        )
        new_status, delta = self._status_delta(observed, old_status, now)
        degraded = st.condition(new_status, "Degraded")
        if degraded and degraded.get("status") == "True":
            self._event_once(
                tracked, events, "Warning", degraded.get("reason", "Degraded"), degraded.get("message", "")
            )
        return delta

    def _replicas(self, spec: LLMDeploymentSpec, tracked: _Tracked, engine: dict[str, Any] | None, now: float) -> int:
        """Engine replicas to render: spec.replicas, or the autoscaler's count (seeded from the live Deployment)."""
        if not spec.autoscaling.enabled:
            tracked.scaler = None
            return spec.replicas
        if tracked.scaler is None:
            live = (engine or {}).get("spec", {}).get("replicas")
            seed = rd.desired_engine_replicas(spec, int(live) if live is not None else None)
            tracked.scaler = Autoscaler(_policy(spec), seed, now)
        else:
            tracked.scaler.reconfigure(_policy(spec))
            tracked.scaler.current = rd.desired_engine_replicas(spec, tracked.scaler.current)
        return tracked.scaler.current

    async def _apply(self, manifest: dict[str, Any], existing: dict[str, Any] | None, namespace: str) -> dict[str, Any]:
        plan = ap.plan(manifest, existing)
        mkind, mname = kind_of(manifest), manifest["metadata"]["name"]
        if plan.action == "none":
            assert existing is not None
            return existing
        if plan.action == "conflict":
            raise _Conflict(plan.reason)
        assert plan.body is not None
        if plan.action == "create":
            log.info("creating %s %s/%s", manifest["kind"], namespace, mname)
            try:
                return await self.client.create(mkind, namespace, plan.body)
            except ApiError as e:
                if e.status != 409:
                    raise
                # created meanwhile (a restart racing its own earlier run): converge through a patch
                existing = await self.client.get(mkind, namespace, mname)
                return await self._apply(manifest, existing, namespace)
        log.info("patching %s %s/%s", manifest["kind"], namespace, mname)
        return await self.client.patch(mkind, namespace, mname, plan.body)

    async def _collect_garbage(self, owner: rd.Owner, rendered: rd.Rendered) -> None:
        """Delete children we made earlier but no longer render (e.g. NetworkPolicy switched off)."""
        wanted = {(m["kind"], m["metadata"]["name"]) for m in rendered.manifests}
        for kind in GC_KINDS:
            sm_served = bool(self._sm_checked and self._sm_checked[1])
            if kind is SERVICE_MONITOR and not sm_served:
                continue  # the CRD is absent: there is nothing to list
            try:
                items = await self.client.list(kind, owner.namespace, {rd.LABEL_LLMD: owner.name})
            except ApiError as e:
                if e.status in (403, 404):
                    continue
                raise
            for item in items:
                iname = item["metadata"]["name"]
                if ap.controller_uid(item) == owner.uid and (kind.kind, iname) not in wanted:
                    log.info("deleting %s %s/%s: no longer rendered", kind.kind, owner.namespace, iname)
                    await self.client.delete(kind, owner.namespace, iname)

    async def _sample(
        self, spec: LLMDeploymentSpec, engine_pods: list[dict[str, Any]], router_pods: list[dict[str, Any]], now: float
    ) -> Sample:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        model = spec.model.name

        def urls(pods: list[dict[str, Any]], container: str, default: int) -> list[str]:
            return [
                f"http://{p['status']['podIP']}:{_port(p, container, default)}/metrics"
                for p in pods
                if st.pod_ready(p) and (p.get("status") or {}).get("podIP")
            ]

        engine_urls = urls(engine_pods, "engine", rd.ENGINE_PORT)
        router_urls = urls(router_pods, "router", rd.ROUTER_PORT)
        engine_texts = await fetch_all(self._http, engine_urls, self.config.scrape_timeout)
        router_texts = await fetch_all(self._http, router_urls, self.config.scrape_timeout)
        self._warn_if_unreachable([*engine_urls, *router_urls], [*engine_texts, *router_texts])
        loads = [parse_engine_metrics(t, model) for t in engine_texts if t is not None]
        queued = sum(parse_router_queued(t, model) for t in router_texts if t is not None)
        return Sample(
            t=now,
            ready=len(loads),
            waiting=sum(x.waiting for x in loads),
            running=sum(x.running for x in loads),
            kv_usage=(sum(x.kv_usage for x in loads) / len(loads)) if loads else 0.0,
            router_queued=queued,
        )

    def _warn_if_unreachable(self, urls: list[str], texts: list[str | None]) -> None:
        """Once per process: every ready pod's /metrics went unanswered -- what an operator outside the cluster
        sees, as pod IPs are not routable from there. Autoscaling then holds replicas where they are."""
        if self._warned_unreachable or not urls or any(t is not None for t in texts):
            return
        self._warned_unreachable = True
        log.warning(
            "no ready pod answered its /metrics (e.g. %s): autoscaling has no load signal and holds replicas. "
            "An operator running outside the cluster cannot reach pod IPs; run it in the cluster (the Helm chart)",
            urls[0],
        )

    def _status_delta(
        self, observed: st.Observed, old_status: dict[str, Any], now: float, keep_children: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        new = st.build_status(observed, old_status, _now_iso(now))
        if keep_children:
            # an invalid update must not make a running deployment's numbers vanish
            for k in ("replicas", "readyReplicas", "desiredReplicas", "selector", "endpoint", "model"):
                if k in old_status:
                    new[k] = old_status[k]
        return new, {k: v for k, v in new.items() if old_status.get(k) != v}

    @staticmethod
    def _event_once(tracked: _Tracked, events: EventSink, type_: str, reason: str, message: str) -> None:
        """Post an Event when this problem is new, not on every timer tick."""
        if tracked.last_event == (reason, message):
            return
        tracked.last_event = (reason, message)
        events(type_, reason, message)


class _Conflict(Exception):
    pass
