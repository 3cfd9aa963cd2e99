"""Kubernetes discovery against an emulated API server (KMock): watch, re-list, readiness, other services."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import web
from router_fake_engine import FakeEngine

from kubellm.router.app import RouterServer
from kubellm.router.backends import BackendRegistry
from kubellm.router.config import RouterConfig
from kubellm.router.discovery.kubernetes import KubernetesDiscovery, ResourceExpired, endpoints_from_slices
from kubellm.router.metrics import RouterMetrics

NS, SVC = "llm", "engines"
BASE = "/apis/discovery.k8s.io/v1/namespaces/llm/endpointslices"


def slice_(name: str, port: int, ready=True, terminating=False, service=SVC, addr="127.0.0.1") -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [addr], "conditions": {"ready": ready, "terminating": terminating}}],
    }


def test_endpoints_from_slices_filters_and_reads_conditions():
    slices = [
        slice_("a", 8000),
        slice_("b", 8001, ready=False),
        slice_("c", 8002, ready=False, terminating=True),
        slice_("d", 8003, service="someone-else"),
        {**slice_("e", 8004), "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8004}]},
        {**slice_("f", 8005), "endpoints": [{"addresses": ["10.0.0.9"], "conditions": {}}]},  # nil ready = ready
    ]
    eps = {e.url: e for e in endpoints_from_slices(slices, SVC, {}, port_name="http")}
    assert set(eps) == {
        "http://127.0.0.1:8000",
        "http://127.0.0.1:8001",
        "http://127.0.0.1:8002",
        "http://127.0.0.1:8004",
        "http://10.0.0.9:8005",
    }
    assert eps["http://127.0.0.1:8000"].ready and not eps["http://127.0.0.1:8001"].ready
    assert eps["http://127.0.0.1:8002"].terminating and not eps["http://127.0.0.1:8002"].ready
    assert eps["http://10.0.0.9:8005"].ready
    v6 = {**slice_("g", 8006, addr="fd00::1"), "addressType": "IPv6"}
    assert endpoints_from_slices([v6], SVC, {})[0].url == "http://[fd00::1]:8006"


def test_watch_error_410_asks_for_relist():
    d = KubernetesDiscovery(BackendRegistry([], RouterMetrics()), "http://x", NS, SVC)
    with pytest.raises(ResourceExpired):
        d.apply_watch_event({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}})


@pytest.fixture
def emu(kmock):
    kmock.resources["discovery.k8s.io/v1/endpointslices"] = kmock.ResourceInfo(
        kind="EndpointSlice", namespaced=True, verbs={"get", "list", "watch", "create", "update", "patch", "delete"}
    )
    return kmock


async def until(pred, timeout: float = 3.0) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def test_discovery_follows_endpointslices(emu):
    a, b = await FakeEngine("a").start(), await FakeEngine("b").start()
    api = str(emu.url).rstrip("/")
    relist = 1.0
    config = RouterConfig(
        host="127.0.0.1", port=0, models=["m"], discovery="kubernetes", kube_api=api, namespace=NS, service=SVC,
        relist_period=relist, health_interval=30, debug_headers=True,
    )  # fmt: skip
    try:
        async with RouterServer(config) as r, aiohttp.ClientSession() as http:
            reg = r.router.registry

            def routable() -> set[str]:
                return {x.url for x in reg.routable("m")[0]}

            assert routable() == set()
            await http.post(api + BASE, json=slice_("slice-a", a.port))
            await http.post(api + BASE, json=slice_("other", b.port, service="not-ours"))
            await until(lambda: routable() == {a.url})
            async with http.post(f"{r.url}/v1/chat/completions", json={"model": "m", "messages": []}) as resp:
                assert resp.status == 200 and resp.headers["X-Kubellm-Backend"] == a.url

            # not ready -> no requests; ready again -> back
            await http.patch(f"{api}{BASE}/slice-a", json=slice_("slice-a", a.port, ready=False))
            await until(lambda: routable() == set())
            await http.patch(f"{api}{BASE}/slice-a", json=slice_("slice-a", a.port))
            await until(lambda: routable() == {a.url})
            # terminating -> no new requests (it stays known while in-flight requests finish)
            await http.patch(f"{api}{BASE}/slice-a", json=slice_("slice-a", a.port, ready=False, terminating=True))
            await until(lambda: routable() == set())
            assert reg.backends[a.url].terminating
            # deleted -> gone
            await http.delete(f"{api}{BASE}/slice-a")
            await until(lambda: a.url not in reg.backends)

            # a watch that drops a DELETE: the re-list converges within the period
            await http.post(api + BASE, json=slice_("slice-b", b.port))
            await until(lambda: routable() == {b.url})
            key = next(k for k in emu.objects if k[2] == "slice-b")
            emu.objects[key].delete()  # removed from the store, no DELETED event on the watch stream
            elapsed = await until(lambda: b.url not in reg.backends, timeout=relist + 2.0)
            assert elapsed <= relist + 0.5
            assert routable() == set()
            text = await (await http.get(f"{r.url}/metrics")).text()
            assert 'kubellm_router_discovery_events_total{kind="relist"}' in text
    finally:
        await a.kill()
        await b.kill()


async def test_410_gone_relists_at_once():
    """A real API server answers an expired resourceVersion with a 410 ERROR event; we re-list and go on."""
    lists, watches = [], []

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "true":
            lists.append(time.monotonic())
            items = [slice_("s", 8000 + len(lists))]
            return web.json_response({"metadata": {"resourceVersion": str(len(lists))}, "items": items})
        watches.append(request.query.get("resourceVersion"))
        resp = web.StreamResponse()
        await resp.prepare(request)
        if len(watches) == 1:
            err = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}
            await resp.write(json.dumps(err).encode() + b"\n")
            return resp
        await asyncio.sleep(10)
        return resp

    app = web.Application()
    app.router.add_get(BASE, handler)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    reg = BackendRegistry([], RouterMetrics())
    d = KubernetesDiscovery(reg, f"http://127.0.0.1:{port}", NS, SVC, relist_period=30)
    await d.start()
    task = asyncio.create_task(d.run())
    try:
        await until(lambda: len(lists) >= 2, timeout=3)
        assert watches[0] == "1"  # the watch resumed from the list's resourceVersion
        assert set(reg.backends) == {"http://127.0.0.1:8002"}  # the re-list replaced the view
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()
