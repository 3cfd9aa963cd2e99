"""Kubernetes discovery: a Service's EndpointSlices, watched, with a periodic full re-list.

The watch gives changes within milliseconds; the re-list every `relist_period` replaces the whole view, so a
DELETE the watch missed cannot keep a dead pod in rotation longer than that period. A 410 Gone (expired
resourceVersion) re-lists at once. Only Ready endpoints take requests; Terminating ones get no new requests
(their in-flight requests finish). Slices are filtered by service label and selector client-side too, so a
server that ignores label selectors cannot leak another service's pods in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from kubellm.router.backends import BackendRegistry, EndpointInfo
from kubellm.router.config import RouterConfig

log = logging.getLogger("kubellm.router.discovery")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SERVICE_LABEL = "kubernetes.io/service-name"


class ResourceExpired(Exception):
    """The API server answered 410 Gone: our resourceVersion is too old; re-list."""


def endpoints_from_slices(
    slices: Iterable[dict[str, Any]],
    service: str | None,
    selector: dict[str, str],
    port_name: str | None = None,
) -> list[EndpointInfo]:
    """The endpoints of the slices that belong to our service (filtered here, whatever the server did)."""
    found: dict[str, EndpointInfo] = {}
    for s in slices:
        labels = (s.get("metadata") or {}).get("labels") or {}
        if service and labels.get(SERVICE_LABEL) != service:
            continue
        if any(labels.get(k) != v for k, v in selector.items()):
            continue
        ports = [p for p in s.get("ports") or [] if p.get("port")]
        if port_name:
            ports = [p for p in ports if p.get("name") == port_name]
        if not ports:
            continue
        port = ports[0]["port"]
        v6 = s.get("addressType") == "IPv6"
        for ep in s.get("endpoints") or []:
            addrs = ep.get("addresses") or []
            if not addrs:
                continue
            cond = ep.get("conditions") or {}
            terminating = bool(cond.get("terminating", False))
            ready = cond.get("ready") is not False and not terminating  # nil means ready (API semantics)
            host = f"[{addrs[0]}]" if v6 else addrs[0]
            info = EndpointInfo(url=f"http://{host}:{port}", ready=ready, terminating=terminating)
            prev = found.get(info.url)
            if prev is None or (info.ready and not prev.ready):
                found[info.url] = info
    return list(found.values())


class KubernetesDiscovery:
    def __init__(
        self,
        registry: BackendRegistry,
        api: str,
        namespace: str,
        service: str | None,
        selector: dict[str, str] | None = None,
        token_file: str | None = None,
        ca_file: str | None = None,
        relist_period: float = 30.0,
        port_name: str | None = None,
    ):
        if not service and not selector:
            raise ValueError("kubernetes discovery needs --service or --selector")
        self.registry = registry
        self.api = api.rstrip("/")
        self.namespace = namespace
        self.service = service
        self.selector = dict(selector or {})
        self.token_file = token_file
        self.ca_file = ca_file
        self.relist_period = relist_period
        self.port_name = port_name
        self.slices: dict[str, dict[str, Any]] = {}
        self.resource_version: str | None = None
        self.relists = 0
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, config: RouterConfig, registry: BackendRegistry) -> KubernetesDiscovery:
        api, ca, token = config.kube_api, None, config.kube_token_file
        if api is None:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise ValueError("not in a cluster (KUBERNETES_SERVICE_HOST unset); pass --kube-api URL")
            api = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
            ca, token = str(SA_DIR / "ca.crt"), token or str(SA_DIR / "token")
        namespace = config.namespace
        if namespace is None:
            ns_file = SA_DIR / "namespace"
            namespace = ns_file.read_text().strip() if ns_file.is_file() else "default"
        return cls(
            registry,
            api,
            namespace,
            config.service,
            config.selector,
            token,
            ca,
            config.relist_period,
            config.endpoint_port_name,
        )

    # --- HTTP ------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        h = {"Accept": "application/json"}
        if self.token_file:
            h["Authorization"] = "Bearer " + Path(self.token_file).read_text().strip()  # re-read: tokens rotate
        return h

    def _url(self, **params: str) -> str:
        selector = dict(self.selector)
        if self.service:
            selector[SERVICE_LABEL] = self.service
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in selector.items()), **params}
        return f"{self.api}/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices?{urlencode(query)}"

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            ctx: ssl.SSLContext | bool = True
            if self.ca_file and Path(self.ca_file).is_file():
                ctx = ssl.create_default_context(cafile=self.ca_file)
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))
        return self._session

    # --- state -----------------------------------------------------------------------------------
    def _publish(self) -> None:
        self.registry.set_endpoints(
            endpoints_from_slices(self.slices.values(), self.service, self.selector, self.port_name)
        )

    def apply_watch_event(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        meta = obj.get("metadata") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise ResourceExpired(obj.get("message", "410 Gone"))
            raise RuntimeError(f"watch error: {obj}")
        if meta.get("resourceVersion"):
            self.resource_version = meta["resourceVersion"]
        if kind == "BOOKMARK":
            return
        name = meta.get("name")
        if not name:
            return
        if kind == "DELETED":
            self.slices.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self.slices[name] = obj
        self.registry.metrics.discovery_events.labels("watch_" + str(kind).lower()).inc()
        self._publish()

    async def relist(self) -> None:
        session = await self._get_session()
        async with session.get(self._url(), headers=self._headers(), timeout=aiohttp.ClientTimeout(total=10)) as r:
            if r.status != 200:
                raise RuntimeError(f"listing EndpointSlices failed: HTTP {r.status}: {(await r.text())[:200]}")
            data = await r.json(content_type=None)
        self.slices = {s["metadata"]["name"]: s for s in data.get("items") or [] if s.get("metadata", {}).get("name")}
        self.resource_version = (data.get("metadata") or {}).get("resourceVersion")
        self.relists += 1
        self.registry.metrics.discovery_events.labels("relist").inc()
        self._publish()

    async def watch_until(self, deadline: float) -> None:
        """Follow the watch from our resourceVersion until the deadline (re-opening it if it ends early)."""
        session = await self._get_session()
        while (remaining := deadline - time.monotonic()) > 0:
            params = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": str(max(1, int(remaining)))}
            if self.resource_version:
                params["resourceVersion"] = self.resource_version
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
            async with session.get(self._url(**params), headers=self._headers(), timeout=timeout) as r:
                if r.status == 410:
                    raise ResourceExpired("410 Gone")
                if r.status != 200:
                    raise RuntimeError(f"watching EndpointSlices failed: HTTP {r.status}")
                buf = b""
                async for chunk in r.content.iter_any():
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            self.apply_watch_event(json.loads(line))

    # --- loop ------------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.relist()
        except Exception as e:  # the run loop keeps trying; the router still serves (and queues)
            log.warning("initial EndpointSlice list failed: %s", e)

    async def run(self) -> None:
        backoff = 0.5
        need_list = self.relists == 0
        try:
            while True:
                try:
                    if need_list:
                        await self.relist()
                    need_list = True
                    deadline = time.monotonic() + self.relist_period
                    try:
                        await asyncio.wait_for(self.watch_until(deadline), self.relist_period)
                    except TimeoutError:
                        pass
                    backoff = 0.5
                except ResourceExpired:
                    log.info("EndpointSlice watch expired (410); re-listing")
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("EndpointSlice discovery: %s; retrying in %.1fs", e, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
        finally:
            if self._session:
                await self._session.close()
