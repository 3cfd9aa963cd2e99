"""Prefix-aware routing end to end over real HTTP: precise (KV events), bounded load, approximate fallback.

The fake engines tokenize with the tokenizer they serve at /v1/tokenizer_info and hash blocks with the shared
core, exactly as the engine's prefix cache does, and publish `stored`/`removed` events.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter

import aiohttp
import pytest
from router_fake_engine import FakeEngine, word_tokenizer_info, words

from kubellm.router.app import RouterServer
from kubellm.router.config import RouterConfig

TOK = word_tokenizer_info()


def cfg(engines, **kw) -> RouterConfig:
    base = dict(
        host="127.0.0.1", port=0, backends=[e.url for e in engines], models=["m"], health_interval=0.2,
        debug_headers=True,
    )  # fmt: skip
    base.update(kw)
    return RouterConfig(**base)


async def until(pred, timeout: float = 3.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def chat(system: str, user: str) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


async def route(http, router, body, path="/v1/chat/completions") -> tuple[str, str]:
    async with http.post(router.url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["X-Kubellm-Backend"], resp.headers["X-Kubellm-Route"]


@pytest.fixture
async def pair():
    es = [await FakeEngine(n, tokenizer=TOK).start() for n in ("a", "b")]
    yield es
    for e in es:
        await e.kill()


async def test_precise_mode_follows_the_replicas_cache(pair):
    a, b = pair
    system = words(0, 320)  # ~20 blocks of 16 tokens
    async with RouterServer(cfg(pair)) as r, aiohttp.ClientSession() as http:
        idx = r.router.index
        slot = {x.url: x.slot for x in r.router.registry.backends.values()}
        await until(lambda: idx.is_precise(slot[a.url]) and idx.is_precise(slot[b.url]))
        # warm the prefix on B directly, not through the router
        async with http.post(b.url + "/v1/chat/completions", json=chat(system, "w1 w2")) as resp:
            assert resp.status == 200
        await until(lambda: len(idx.replica(slot[b.url])) >= 20)
        for i in range(6):
            backend, reason = await route(http, r, chat(system, words(1000 + i, 5)))
            assert (backend, reason) == (b.url, "prefix_hit")
        # B's cache loses it: the router stops preferring B ...
        b.clear()
        await until(lambda: len(idx.replica(slot[b.url])) == 0)
        # ... and follows it to A once A holds it (warmed directly again)
        async with http.post(a.url + "/v1/chat/completions", json=chat(system, "w3")) as resp:
            assert resp.status == 200
        await until(lambda: len(idx.replica(slot[a.url])) >= 20)
        for i in range(4):
            assert await route(http, r, chat(system, words(1100 + i, 5))) == (a.url, "prefix_hit")
        # completions with a text prompt hash the same way
        async with http.post(b.url + "/v1/completions", json={"model": "m", "prompt": words(500, 64)}) as resp:
            assert resp.status == 200
        await until(lambda: len(idx.replica(slot[b.url])) >= 4)
        backend, _ = await route(http, r, {"model": "m", "prompt": words(500, 64) + " w9"}, "/v1/completions")
        assert backend == b.url
        text = await (await http.get(r.url + "/metrics")).text()
        assert 'kubellm_router_routing_decisions_total{policy="prefix",reason="prefix_hit"}' in text
        assert "kubellm_router_prefix_match_ratio_bucket" in text


async def test_hot_prefix_spreads_within_bound():
    engines = [await FakeEngine(f"e{i}", tokenizer=TOK).start() for i in range(4)]
    for e in engines:
        e.first_chunk_delay = 0.4
    c, n = 1.25, 40
    try:
        async with RouterServer(cfg(engines, balance_factor=c, load_floor=0)) as r, aiohttp.ClientSession() as http:
            system = words(0, 320)
            results = await asyncio.gather(*(route(http, r, chat(system, words(i, 3))) for i in range(n)))
        counts = Counter(backend for backend, _ in results)
        assert len(counts) == 4
        assert max(e.max_in_flight for e in engines) <= math.ceil(c * n / 4)
        assert any(reason == "load_spill" for _, reason in results)
    finally:
        for e in engines:
            await e.kill()


async def test_approximate_mode_routes_affinely_without_events():
    engines = [await FakeEngine(f"e{i}", tokenizer=TOK, kv_events=False).start() for i in range(3)]
    try:
        async with RouterServer(cfg(engines, kv_events=False)) as r, aiohttp.ClientSession() as http:
            homes: dict[int, set[str]] = {}
            for rnd in range(4):
                for tenant in range(6):
                    backend, _ = await route(http, r, chat(words(tenant * 300, 200), words(rnd * 7 + tenant, 4)))
                    homes.setdefault(tenant, set()).add(backend)
            assert all(len(h) == 1 for h in homes.values()), homes
            assert len(set().union(*homes.values())) >= 2  # tenants were spread, not piled on one replica
            assert not any(r.router.index.is_precise(b.slot) for b in r.router.registry.backends.values())
    finally:
        for e in engines:
            await e.kill()


async def test_engine_without_tokenizer_still_routes_affinely_by_text():
    engines = [await FakeEngine(f"e{i}").start() for i in range(2)]
    try:
        async with RouterServer(cfg(engines, kv_events=False)) as r, aiohttp.ClientSession() as http:
            first, _ = await route(http, r, chat("x" * 2000, "hello"))
            for i in range(3):
                assert (await route(http, r, chat("x" * 2000, f"other {i}")))[0] == first
    finally:
        for e in engines:
            await e.kill()


def decisions(metrics_text: str) -> dict[str, float]:
    pattern = r'^kubellm_router_routing_decisions_total\{policy="prefix",reason="([a-z_]+)"\} ([0-9.eE+-]+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, metrics_text, re.MULTILINE)}


async def test_short_shared_head_does_not_pull_but_a_long_shared_prefix_does(pair):
    """B holds one block every prompt starts with (here `<|system|>` + 14 words + `<|user|>`, like a chat
    template's head) and a tenant's 320-word system prompt. Unrelated 300-word questions behind the head spread
    over both replicas as `short_match`; questions behind the long prompt follow it to B as `prefix_hit`."""
    a, b = pair
    head, tenant = words(0, 14), words(600, 320)
    async with RouterServer(cfg(pair)) as r, aiohttp.ClientSession() as http:
        idx = r.router.index
        slot = {x.url: x.slot for x in r.router.registry.backends.values()}
        await until(lambda: idx.is_precise(slot[a.url]) and idx.is_precise(slot[b.url]))
        for system in (head, tenant):  # warm both on B directly, not through the router
            async with http.post(b.url + "/v1/chat/completions", json=chat(system, words(1900, 300))) as resp:
                assert resp.status == 200
        await until(lambda: len(idx.replica(slot[b.url])) >= 19 + 38)
        unrelated = [await route(http, r, chat(head, words(100 + 37 * i, 300))) for i in range(6)]
        assert {reason for _, reason in unrelated} == {"short_match"}
        assert Counter(backend for backend, _ in unrelated) == {a.url: 3, b.url: 3}  # by footprint, in turn
        for i in range(6):
            assert await route(http, r, chat(tenant, words(1200 + 5 * i, 4))) == (b.url, "prefix_hit")
        text = await (await http.get(r.url + "/metrics")).text()
        assert decisions(text) == {"short_match": 6.0, "prefix_hit": 6.0}


async def test_approximate_mode_does_not_pile_unrelated_prompts_on_the_first_replica():
    """Without KV events the router knows only what it sent: after the first prompt, one replica "holds" the
    shared head. Counting that as affinity sent every later prompt there until the load bound spilled it."""
    engines = [await FakeEngine(f"e{i}", tokenizer=TOK, kv_events=False).start() for i in range(3)]
    try:
        async with RouterServer(cfg(engines, kv_events=False)) as r, aiohttp.ClientSession() as http:
            head = words(0, 14)
            routed = [await route(http, r, chat(head, words(100 + 37 * i, 300))) for i in range(9)]
            assert Counter(backend for backend, _ in routed) == {e.url: 3 for e in engines}
            assert Counter(reason for _, reason in routed) == {"no_match": 1, "short_match": 8}
            text = await (await http.get(r.url + "/metrics")).text()
            assert decisions(text) == {"no_match": 1.0, "short_match": 8.0}
    finally:
        for e in engines:
            await e.kill()


async def test_threshold_zero_restores_any_match_affinity(pair):
    """--prefix-min-match-ratio 0 --prefix-min-match-tokens 0: one shared block is enough to follow."""
    a, b = pair
    head = words(0, 14)
    config = cfg(pair, prefix_min_match_ratio=0.0, prefix_min_match_tokens=0)
    async with RouterServer(config) as r, aiohttp.ClientSession() as http:
        idx = r.router.index
        slot = {x.url: x.slot for x in r.router.registry.backends.values()}
        await until(lambda: idx.is_precise(slot[a.url]) and idx.is_precise(slot[b.url]))
        async with http.post(b.url + "/v1/chat/completions", json=chat(head, words(1900, 300))) as resp:
            assert resp.status == 200
        await until(lambda: len(idx.replica(slot[b.url])) >= 19)
        for i in range(4):
            assert await route(http, r, chat(head, words(100 + 37 * i, 300))) == (b.url, "prefix_hit")


async def test_route_only_names_the_pick_without_sending(pair):
    """With --debug-headers, X-Kubellm-Route-Only: 1 answers 204 with the replica the router would pick (what
    bench/router.py compares between router replicas); nothing reaches a replica. Without debug headers it is an
    ordinary request."""
    a, b = pair
    system = words(0, 320)
    async with RouterServer(cfg(pair)) as r, aiohttp.ClientSession() as http:
        idx = r.router.index
        slot = {x.url: x.slot for x in r.router.registry.backends.values()}
        await until(lambda: idx.is_precise(slot[a.url]) and idx.is_precise(slot[b.url]))
        async with http.post(b.url + "/v1/chat/completions", json=chat(system, "w1")) as resp:
            assert resp.status == 200
        await until(lambda: len(idx.replica(slot[b.url])) >= 20)
        received = len(a.received) + len(b.received)
        only = {"X-Kubellm-Route-Only": "1"}
        # over one kept-alive connection (what bench/router.py's probes use): the 204 has no body and no
        # Content-Length, and the client reads it as ended, not waiting for a body until the connection closes
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one:
            for _ in range(3):
                async with asyncio.timeout(5):
                    async with one.post(r.url + "/v1/chat/completions", json=chat(system, "w2"), headers=only) as resp:
                        assert resp.status == 204 and "Content-Length" not in resp.headers
                        assert await resp.read() == b""
                        assert (resp.headers["X-Kubellm-Backend"], resp.headers["X-Kubellm-Route"]) == (
                            b.url,
                            "prefix_hit",
                        )
            assert r.http is not None and len(r.http.connections) == 1
        assert len(a.received) + len(b.received) == received
        assert r.router.registry.backends[b.url].in_flight == 0
    async with RouterServer(cfg(pair, debug_headers=False)) as r, aiohttp.ClientSession() as http:
        async with http.post(r.url + "/v1/chat/completions", json=chat(system, "w3"), headers=only) as resp:
            assert resp.status == 200 and "X-Kubellm-Backend" not in resp.headers
        assert len(a.received) + len(b.received) == received + 1
