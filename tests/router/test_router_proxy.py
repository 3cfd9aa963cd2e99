"""The router in front of fake engines (real HTTP servers): pass-through, retries, failover, limits, keys."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import aiohttp
import openai
import pytest
from router_fake_engine import FakeEngine
from yarl import URL

from kubellm.router.app import RouterServer
from kubellm.router.config import RouterConfig
from kubellm.routing import RoutingPolicy


async def until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def cfg(*engines: FakeEngine, **kw) -> RouterConfig:
    base = dict(
        host="127.0.0.1",
        port=0,
        backends=[e.url for e in engines],
        models=["m"],
        policy=RoutingPolicy.ROUND_ROBIN,
        health_interval=0.2,
        queue_timeout=2.0,
        debug_headers=True,
        retry_backoff=0.001,
    )
    base.update(kw)
    return RouterConfig(**base)


@pytest.fixture
async def engines():
    es = [await FakeEngine(f"e{i}").start() for i in range(2)]
    yield es
    for e in es:
        await e.kill()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def read_sse(resp: aiohttp.ClientResponse) -> list[str]:
    events = []
    async for line in resp.content:
        line = line.strip()
        if line.startswith(b"data: "):
            events.append(line[6:].decode())
    return events


async def post_json(http: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict, dict]:
    async with http.post(url, json=body) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_chat_and_completions_pass_through_json_and_sse(engines, http):
    async with RouterServer(cfg(*engines)) as r:
        async with http.post(f"{r.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
            data = await resp.json()
            assert data["choices"][0]["message"]["content"].startswith("e")
            assert resp.headers["X-Request-Id"]
        async with http.post(f"{r.url}/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = await read_sse(resp)
        assert events[-1] == "[DONE]" and len(events) == 4
        served = {e.name: len(e.received) for e in engines}
        assert served == {"e0": 1, "e1": 1}  # round robin


async def test_models_aggregate_configured_and_served(engines, http):
    engines[1].model = "other"
    async with RouterServer(cfg(*engines, models=["m", "scaled-to-zero"])) as r:
        await r.router.health.probe_all()
        async with http.get(f"{r.url}/v1/models") as resp:
            ids = [m["id"] for m in (await resp.json())["data"]]
        assert ids == ["m", "other", "scaled-to-zero"]
        async with http.post(f"{r.url}/v1/chat/completions", json={**CHAT, "model": "other"}) as resp:
            assert resp.status == 200 and resp.headers["X-Kubellm-Backend"] == engines[1].url


async def test_unknown_model_is_404_in_openai_shape(engines, http):
    async with RouterServer(cfg(*engines)) as r:
        status, _, data = await post_json(http, f"{r.url}/v1/chat/completions", {**CHAT, "model": "nope"})
    assert status == 404
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["code"] == "model_not_found"


async def test_models_carry_max_model_len_and_one_can_be_retrieved(engines):
    """The shortest context of the replicas serving a model (a request that fits it fits wherever routed)."""
    engines[0].max_model_len, engines[1].max_model_len = 4096, 2048
    async with RouterServer(cfg(*engines)) as r:
        await r.router.health.probe_all()
        client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="none", max_retries=0)
        assert [(m.id, m.model_extra["max_model_len"]) for m in (await client.models.list()).data] == [("m", 2048)]
        card = await client.models.retrieve("m")
        assert card.id == "m" and card.model_extra["max_model_len"] == 2048
        with pytest.raises(openai.NotFoundError) as e:
            await client.models.retrieve("gpt-9")
        assert e.value.body["code"] == "model_not_found" and "gpt-9" in e.value.body["message"]


@pytest.mark.parametrize(
    "method, path, status, allow",
    [
        ("GET", "/v1/nothing", 404, None),
        ("GET", "/v1/chat/completions", 405, "POST"),
        ("DELETE", "/v1/models", 405, "GET"),
    ],
)
async def test_unknown_routes_and_wrong_methods_are_openai_errors(engines, http, method, path, status, allow):
    async with RouterServer(cfg(*engines)) as r, http.request(method, r.url + path) as resp:
        assert resp.status == status and resp.content_type == "application/json"
        err = (await resp.json())["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert method in err["message"] and path in err["message"]
        if allow:
            assert allow in resp.headers["Allow"] and allow in err["message"]


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
async def test_a_body_not_sent_as_json_is_refused(engines, http, content_type):
    async with (
        RouterServer(cfg(*engines)) as r,
        http.post(
            f"{r.url}/v1/chat/completions", data=json.dumps(CHAT), headers={"Content-Type": content_type}
        ) as resp,
    ):
        assert resp.status == 415
        err = (await resp.json())["error"]
        assert err["code"] == "unsupported_content_type" and content_type in err["message"]
    assert not engines[0].received and not engines[1].received


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'{"messages": []}', 400, "invalid_value"),
        (b'{"model": 5}', 400, "invalid_value"),
        (b'{"model": "m", "stream": "yes please"}', 400, "invalid_value"),
        (b"\xff\xfe{", 400, "invalid_json"),
    ],
)
async def test_malformed_requests_get_clear_400s(engines, http, body, status, code):
    async with (
        RouterServer(cfg(*engines)) as r,
        http.post(f"{r.url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}) as resp,
    ):
        assert resp.status == status
        assert (await resp.json())["error"]["code"] == code
    assert not engines[0].received and not engines[1].received


async def test_body_and_header_limits(engines, http):
    async with RouterServer(cfg(*engines, max_body_bytes=1000, max_header_bytes=2048)) as r:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
        async with http.post(f"{r.url}/v1/chat/completions", json=big) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "body_too_large"
        async with http.post(f"{r.url}/v1/chat/completions", json=CHAT, headers={"X-Big": "y" * 4000}) as resp:
            assert resp.status in (400, 431)
        async with http.post(f"{r.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200


async def test_api_keys(engines, http):
    async with RouterServer(cfg(*engines, api_keys=["k1", "k2"])) as r:
        url = f"{r.url}/v1/chat/completions"
        async with http.post(url, json=CHAT) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
        async with http.post(url, json=CHAT, headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with http.post(url, json=CHAT, headers={"Authorization": "Bearer k2"}) as resp:
            assert resp.status == 200
        async with http.get(f"{r.url}/health") as resp:  # probes need no key
            assert resp.status == 200
    # the client's key is not forwarded to the engines
    assert all("Authorization" not in b for e in engines for b in e.received)


async def test_retry_on_5xx_and_connect_error_before_first_byte(engines, http):
    engines[0].fail_status = 503
    async with RouterServer(cfg(*engines, health_interval=30)) as r:
        for _ in range(4):
            async with http.post(f"{r.url}/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
                assert resp.headers["X-Kubellm-Backend"] == engines[1].url
        engines[0].fail_status = None
        await engines[1].kill()  # refused connections: retried on e0, e1 ejected at once
        for _ in range(3):
            async with http.post(f"{r.url}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
                assert resp.status == 200
                assert (await read_sse(resp))[-1] == "[DONE]"
        assert not r.router.registry.backends[engines[1].url].healthy


async def test_the_query_string_reaches_the_replica_with_its_bytes_unchanged(engines, http):
    """A routed POST is forwarded to its full target: path and query string, percent-escapes as the client sent
    them, on plain and streamed requests, with and without a query (which must not leak into the next request)."""
    async with RouterServer(cfg(*engines)) as r:
        for target, stream in (("/v1/chat/completions?foo=bar", False), ("/v1/completions?a=1&b=%2Fx%20y", True),
                               ("/v1/chat/completions", False), ("/v1/chat/completions?", False)):  # fmt: skip
            body = {**CHAT, "stream": stream} if "chat" in target else {"model": "m", "prompt": "x", "stream": stream}
            async with http.post(URL(f"{r.url}{target}", encoded=True), json=body) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
    seen = [t for e in engines for t in e.targets]
    assert sorted(seen) == sorted(
        ["/v1/chat/completions?foo=bar", "/v1/completions?a=1&b=%2Fx%20y", "/v1/chat/completions",
         "/v1/chat/completions"]
    )  # fmt: skip


async def test_4xx_is_passed_through_without_retry(engines, http):
    engines[0].fail_status = engines[1].fail_status = 400
    async with RouterServer(cfg(*engines)) as r, http.post(f"{r.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 400
    assert len(engines[0].received) + len(engines[1].received) == 1


async def test_all_replicas_failing_returns_their_error(engines, http):
    engines[0].fail_status = engines[1].fail_status = 503
    async with RouterServer(cfg(*engines, max_retries=3)) as r:
        status, _, _ = await post_json(http, f"{r.url}/v1/chat/completions", CHAT)
    assert status == 503
    assert len(engines[0].received) == len(engines[1].received) == 1  # each replica tried once


async def test_replica_dying_mid_stream_ends_with_sse_error_event(engines, http):
    for e in engines:
        e.die_after_chunks, e.n_chunks = 2, 5
    async with RouterServer(cfg(*engines)) as r:
        resp = await http.post(f"{r.url}/v1/chat/completions", json={**CHAT, "stream": True})
        assert resp.status == 200
        events = await asyncio.wait_for(read_sse(resp), 5)
    assert len(events) == 3
    assert json.loads(events[-1])["error"]["code"] == "upstream_died"


async def test_client_disconnect_cancels_upstream(engines, http):
    for e in engines:
        e.n_chunks, e.chunk_interval = 100, 0.05
    async with RouterServer(cfg(*engines)) as r:
        resp = await http.post(f"{r.url}/v1/chat/completions", json={**CHAT, "stream": True})
        await resp.content.readline()
        resp.close()  # the client goes away mid-stream
        for _ in range(100):
            if sum(e.cancelled for e in engines) == 1:
                break
            await asyncio.sleep(0.02)
        assert sum(e.cancelled for e in engines) == 1
        assert all(e.in_flight == 0 for e in engines)
        # and a non-streaming request cancelled while the engine is still prefilling
        for e in engines:
            e.first_chunk_delay = 5
        task = asyncio.create_task(http.post(f"{r.url}/v1/chat/completions", json=CHAT))
        await until(lambda: sum(e.in_flight for e in engines) == 1)  # reached an engine, which is still prefilling
        task.cancel()
        for _ in range(100):
            if sum(e.cancelled for e in engines) == 2:
                break
            await asyncio.sleep(0.02)
        assert sum(e.cancelled for e in engines) == 2
        assert all(b.in_flight == 0 for b in r.router.registry.backends.values())


async def test_dead_replica_leaves_rotation_and_rejoins(engines, http):
    async with RouterServer(cfg(*engines, health_interval=0.1, unhealthy_threshold=1)) as r:
        reg = r.router.registry
        await engines[0].kill()
        for _ in range(50):
            if not reg.backends[engines[0].url].healthy:
                break
            await asyncio.sleep(0.05)
        assert not reg.backends[engines[0].url].healthy
        for _ in range(4):
            async with http.post(f"{r.url}/v1/chat/completions", json=CHAT) as resp:
                assert resp.headers["X-Kubellm-Backend"] == engines[1].url
        await engines[0].restart()
        for _ in range(50):
            if reg.backends[engines[0].url].healthy:
                break
            await asyncio.sleep(0.05)
        seen = set()
        for _ in range(4):
            async with http.post(f"{r.url}/v1/chat/completions", json=CHAT) as resp:
                seen.add(resp.headers["X-Kubellm-Backend"])
        assert seen == {engines[0].url, engines[1].url}


async def test_health_probe_failure_ejects_without_traffic(engines, http):
    async with RouterServer(cfg(*engines, health_interval=0.05, unhealthy_threshold=2)) as r:
        backend = r.router.registry.backends[engines[0].url]
        engines[0].health_status = 503
        await until(lambda: not backend.healthy)
        engines[0].health_status = 200
        await until(lambda: backend.healthy)
        text = await (await http.get(f"{r.url}/metrics")).text()
        assert f'kubellm_router_backend_healthy{{backend="{engines[0].url}"}} 1.0' in text


async def test_circuit_breaker_opens_after_repeated_failures(engines, http):
    engines[0].fail_status = 500
    c = cfg(*engines, breaker_threshold=2, breaker_cooldown=60, health_interval=30)
    async with RouterServer(c) as r:
        for _ in range(6):
            async with http.post(f"{r.url}/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
        assert len(engines[0].received) == 2  # then the breaker kept it out
        assert not r.router.registry.backends[engines[0].url].takes_requests(time.monotonic())


async def test_scale_from_zero_queues_then_serves(http):
    e = FakeEngine("late")
    async with RouterServer(cfg(backends=[], models=["m"], queue_timeout=5)) as r:
        task = asyncio.create_task(http.post(f"{r.url}/v1/chat/completions", json=CHAT))
        for _ in range(50):
            text = await (await http.get(f"{r.url}/metrics")).text()
            if 'kubellm_router_queued_requests{model="m"} 1.0' in text:
                break
            await asyncio.sleep(0.02)
        assert 'kubellm_router_queued_requests{model="m"} 1.0' in text
        await e.start()
        from kubellm.router.backends import EndpointInfo

        r.router.registry.set_endpoints([EndpointInfo(e.url)])
        resp = await asyncio.wait_for(task, 5)
        assert resp.status == 200
        text = await (await http.get(f"{r.url}/metrics")).text()
        assert 'kubellm_router_queued_requests{model="m"} 0.0' in text
    await e.kill()


async def test_queue_timeout_is_503_with_retry_after_never_404(http):
    async with RouterServer(cfg(backends=[], models=["m"], queue_timeout=0.2)) as r:
        status, headers, data = await post_json(http, f"{r.url}/v1/chat/completions", CHAT)
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert data["error"]["code"] == "no_replica"


async def test_saturated_replicas_queue_requests(engines, http):
    for e in engines:
        e.first_chunk_delay = 0.3
    async with RouterServer(cfg(*engines, max_inflight_per_backend=1, queue_timeout=5)) as r:
        t0 = time.monotonic()
        resps = await asyncio.gather(*(http.post(f"{r.url}/v1/chat/completions", json=CHAT) for _ in range(4)))
        assert all(x.status == 200 for x in resps)
        assert time.monotonic() - t0 >= 0.55  # two waves
        assert all(e.max_in_flight == 1 for e in engines)


async def test_time_to_first_chunk_on_kept_alive_connection(engines, http):
    for e in engines:
        e.n_chunks, e.chunk_interval = 2, 0.2  # the second chunk comes much later: only the first is timed
    async with RouterServer(cfg(*engines)) as r:
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn) as client:
            samples = []
            for _ in range(12):
                t0 = time.perf_counter()
                async with client.post(
                    f"{r.url}/v1/completions", json={"model": "m", "prompt": "x", "stream": True}
                ) as resp:
                    await resp.content.readline()
                    samples.append(time.perf_counter() - t0)
                    await resp.read()
        assert statistics.median(samples[2:]) < 0.010, samples


async def test_metrics_names(engines, http):
    async with RouterServer(cfg(*engines)) as r:
        async with http.post(f"{r.url}/v1/chat/completions", json=CHAT) as resp:
            await resp.read()
        text = await (await http.get(f"{r.url}/metrics")).text()
    for name in (
        "kubellm_router_requests_total",
        "kubellm_router_request_duration_seconds_bucket",
        "kubellm_router_time_to_first_byte_seconds_bucket",
        "kubellm_router_in_flight_requests",
        "kubellm_router_routing_decisions_total",
        "kubellm_router_backend_healthy",
        "kubellm_router_discovery_events_total",
        "kubellm_router_kv_event_seq",
    ):
        assert name in text, name
    assert f'kubellm_router_requests_total{{backend="{engines[0].url}",code="200",model="m"}}' in text or (
        f'kubellm_router_requests_total{{backend="{engines[1].url}",code="200",model="m"}}' in text
    )


async def test_openapi_lists_the_routed_endpoints(engines, http):
    async with RouterServer(cfg(*engines)) as r, http.get(f"{r.url}/openapi.json") as resp:
        spec = await resp.json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])


async def test_session_affinity_by_header_and_user_field(engines, http):
    async with RouterServer(cfg(*engines, policy=RoutingPolicy.SESSION)) as r:
        url = f"{r.url}/v1/chat/completions"
        for key in ("alice", "bob", "carol"):
            seen = set()
            for _ in range(3):
                async with http.post(url, json=CHAT, headers={"X-Session-Id": key}) as resp:
                    seen.add(resp.headers["X-Kubellm-Backend"])
                async with http.post(url, json={**CHAT, "user": key}) as resp:
                    seen.add(resp.headers["X-Kubellm-Backend"])
            assert len(seen) == 1, key


async def test_clients_cannot_choose_the_upstream(engines, http):
    evil = await FakeEngine("evil").start()
    try:
        async with RouterServer(cfg(*engines)) as r:
            headers = {"Host": evil.url[7:], "X-Kubellm-Backend": evil.url, "X-Forwarded-Host": evil.url[7:]}
            for _ in range(4):
                async with http.post(f"{r.url}/v1/chat/completions", json=CHAT, headers=headers) as resp:
                    assert resp.status == 200
        assert not evil.received
    finally:
        await evil.kill()


async def test_a_thousand_concurrent_streams(engines):
    """All 1000 streams are open through the router at once: each engine holds its streams before the first chunk
    until every one has arrived, so what is asserted does not depend on how fast a loaded machine sends them."""
    release = asyncio.Event()
    for e in engines:
        e.first_chunk_gate, e.n_chunks, e.chunk_interval = release, 4, 0.05
    async with RouterServer(cfg(*engines)) as r, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        ended_early: list[int] = []

        async def one(i: int) -> bool:
            body = {"model": "m", "messages": [{"role": "user", "content": f"x{i}"}], "stream": True}
            async with s.post(f"{r.url}/v1/chat/completions", json=body) as resp:
                ok = resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")
            if not release.is_set():
                ended_early.append(i)
            return ok

        streams = asyncio.gather(*(one(i) for i in range(1000)))
        try:
            await until(lambda: sum(e.in_flight for e in engines) == 1000 or bool(ended_early), timeout=240)
            assert not ended_early, f"{len(ended_early)} streams ended before the engines let any through"
            assert [e.in_flight for e in engines] == [500, 500], "every stream is held open at its engine at once"
        finally:
            release.set()  # also on a failure, so no stream is left waiting
        results = await asyncio.wait_for(streams, 240)
    assert all(results)
    assert [len(e.received) for e in engines] == [500, 500]
    assert [e.completed for e in engines] == [500, 500]


async def test_unknown_model_names_never_become_metric_labels(engines, http):
    async with RouterServer(cfg(*engines)) as r:
        for i in range(3):
            await post_json(http, f"{r.url}/v1/chat/completions", {**CHAT, "model": f"random-{i}"})
        text = await (await http.get(f"{r.url}/metrics")).text()
    assert "random-" not in text


async def test_output_constraints_reach_the_engine_unchanged(engines, http):
    """[structured-outputs]: the prompt is unaffected, so the router forwards every constraint spelling as sent."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    bodies = [
        {
            **CHAT,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}},
        },
        {**CHAT, "structured_outputs": {"regex": "[a-z]+", "whitespace_pattern": " ?"}},
        {"model": "m", "prompt": "x", "guided_choice": ["yes", "no"], "guided_decoding_backend": "guidance"},
    ]
    async with RouterServer(cfg(*engines)) as r:
        for body in bodies:
            path = "completions" if "prompt" in body else "chat/completions"
            status, _, _ = await post_json(http, f"{r.url}/v1/{path}", body)
            assert status == 200
    received = [b for e in engines for b in e.received]
    assert sorted(received, key=json.dumps) == sorted(bodies, key=json.dumps)
