"""Bounded load across router replicas: each router sees only its own requests, the engine's `load` lines the
whole count (GUIDE section 2), and the policy decides on the combination."""

from __future__ import annotations

import asyncio

import aiohttp
from router_fake_engine import FakeEngine, word_tokenizer_info, words

from kubellm.kv_events import LoadEvent
from kubellm.router.app import RouterServer
from kubellm.router.backends import EndpointInfo
from kubellm.router.config import RouterConfig
from kubellm.router.engine_load import EngineLoad, combined_load
from kubellm.router.policies.base import RouteRequest

TOK = word_tokenizer_info()


def test_without_a_load_line_the_router_sees_its_own_requests_and_the_probed_queue():
    view = combined_load(local_in_flight=3, local_answering=2, probed_waiting=4, engine=None)
    assert (view.in_flight, view.answering, view.waiting) == (3, 2, 4)


def test_a_load_line_adds_other_routers_requests_and_ours_since():
    # the engine held 10 (running 7, queued 3) when we had 2 there; we sent 3 more since
    line = EngineLoad(running=7, waiting=3, free_blocks=100, local_in_flight_then=2)
    view = combined_load(local_in_flight=5, local_answering=1, probed_waiting=0, engine=line)
    assert view.in_flight == 13
    assert view.answering == 13 - 4  # not answering: ours without a first byte (4) cover the engine's 3 queued
    assert view.waiting == 0  # already inside in_flight
    # ours that finished since the line leave the count
    assert combined_load(0, 0, 0, EngineLoad(7, 3, 100, 2)).in_flight == 8
    # never below our own count (a line older than our sends, or another replica's restart)
    assert combined_load(6, 6, 0, EngineLoad(0, 0, 100, 0)).in_flight == 6


def cfg(engines, **kw) -> RouterConfig:
    base = dict(host="127.0.0.1", port=0, backends=[e.url for e in engines], models=["m"], health_interval=0.2,
                debug_headers=True, balance_factor=1.25, load_floor=0)  # fmt: skip
    base.update(kw)
    return RouterConfig(**base)


def chat(system: str, user: str) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


async def until(pred, timeout: float = 5.0, what: str = "condition") -> None:
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def _route(http: aiohttp.ClientSession, url: str, body: dict) -> tuple[str, str]:
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["X-Kubellm-Backend"], resp.headers["X-Kubellm-Route"]


async def test_a_router_spills_from_a_replica_that_other_routers_overloaded():
    """Router B holds nothing in flight; the load on A's cache holder comes from elsewhere (another router's share,
    sent here straight to the engine). Only A's load lines tell B, and B's bounded-load rule spills."""
    a, b = [await FakeEngine(n, tokenizer=TOK).start() for n in ("a", "b")]
    system = words(0, 320)
    others: list[asyncio.Task] = []
    try:
        async with RouterServer(cfg([a, b])) as r, aiohttp.ClientSession() as http:
            reg, idx = r.router.registry, r.router.index
            slot = {x.url: x.slot for x in reg.backends.values()}
            await until(lambda: idx.is_precise(slot[a.url]) and idx.is_precise(slot[b.url]), what="event streams")
            async with http.post(a.url + "/v1/chat/completions", json=chat(system, "w1")) as resp:
                assert resp.status == 200
            await until(lambda: len(idx.replica(slot[a.url])) >= 20, what="A's cached prefix")
            assert await _route(http, r.url, chat(system, "w2 w3")) == (a.url, "prefix_hit")  # idle: follow the cache

            # another router's share: 10 requests on A, one running, nine queued, none answered yet
            a.max_running, a.first_chunk_delay = 1, 30.0
            body = {**chat(words(3000, 8), "x"), "stream": True}
            others = [asyncio.create_task(http.post(a.url + "/v1/chat/completions", json=body)) for _ in range(10)]
            backend_a = reg.backends[a.url]
            await until(
                lambda: backend_a.engine_load is not None and backend_a.engine_load.waiting == 9, what="A's load line"
            )
            assert backend_a.in_flight == 0  # this router sent none of them
            assert await _route(http, r.url, chat(system, "w4 w5")) == (b.url, "load_spill")
    finally:
        for t in others:
            t.cancel()
        for e in (a, b):
            await e.kill()


async def test_without_load_lines_the_router_only_sees_its_own_share():
    """The control of the test above: the same overload, the engine sends no load lines, the router follows the
    cache into the queue (what active-active routers did before load lines)."""
    a, b = [await FakeEngine(n, tokenizer=TOK).start() for n in ("a", "b")]
    for e in (a, b):
        e.load_lines = False
    system = words(0, 320)
    others: list[asyncio.Task] = []
    try:
        async with RouterServer(cfg([a, b], health_interval=30)) as r, aiohttp.ClientSession() as http:
            reg, idx = r.router.registry, r.router.index
            slot = {x.url: x.slot for x in reg.backends.values()}
            await until(lambda: idx.is_precise(slot[a.url]) and idx.is_precise(slot[b.url]), what="event streams")
            async with http.post(a.url + "/v1/chat/completions", json=chat(system, "w1")) as resp:
                assert resp.status == 200
            await until(lambda: len(idx.replica(slot[a.url])) >= 20, what="A's cached prefix")
            a.max_running, a.first_chunk_delay = 1, 30.0
            body = {**chat(words(3000, 8), "x"), "stream": True}
            others = [asyncio.create_task(http.post(a.url + "/v1/chat/completions", json=body)) for _ in range(10)]
            await until(lambda: a.in_flight == 10, what="the other router's requests on A")
            assert reg.backends[a.url].engine_load is None
            a.first_chunk_delay = 0.0  # (the ten keep waiting; this router's request is answered at once)
            assert await _route(http, r.url, chat(system, "w4 w5")) == (a.url, "prefix_hit")
    finally:
        for t in others:
            t.cancel()
        for e in (a, b):
            await e.kill()


def test_load_event_is_not_part_of_the_seq_numbering():
    assert "seq" not in LoadEvent.model_fields


async def test_a_load_line_that_arrives_after_its_replica_left_is_ignored():
    """A replica's event stream is stopped by a task scheduled when discovery removes it, so one more load line can
    be delivered after the removal. It must leave no trace: the prefix rule keeps reading the live backends in place
    (choose_index) instead of building a row per replica for every request from then on."""
    r = RouterServer(cfg([])).router
    reg = r.registry
    reg.set_endpoints([EndpointInfo("http://a:1"), EndpointInfo("http://b:1")])
    gone = reg.backends["http://b:1"]
    reg.set_endpoints([EndpointInfo("http://a:1")])
    assert gone.removed
    r._on_load(gone, LoadEvent(running=3, waiting=1, free_blocks=10))  # (the late line, as the subscriber hands it)

    def rows_path(*args: object) -> None:
        raise AssertionError("the row path was taken though no live replica sends load lines")

    r.policy.choose_row = rows_path  # type: ignore[method-assign]
    picked = r._try_pick(RouteRequest("m", num_blocks=0, block_tokens=16), [], [])
    assert picked is not None and picked[0] is reg.backends["http://a:1"]
