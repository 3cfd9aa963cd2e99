"""Readiness, graceful drain (what a Kubernetes rolling update needs) and engine failure, on a fake engine."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest
from server_fakes import FakeEngine
from server_harness import ServerThread, http_get

from kubellm.engine.server.api_server import ServerSettings


def _settings(grace: float = 10.0) -> ServerSettings:
    return ServerSettings(host="127.0.0.1", port=0, served_model_names=["fake-model"], shutdown_grace_period=grace)


async def _read_stream(resp: aiohttp.ClientResponse) -> tuple[str, str | None]:
    text, reason = "", None
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for ch in chunk.get("choices", []):
            text += ch.get("text", "")
            reason = ch.get("finish_reason") or reason
    return text, reason


@pytest.fixture
def slow_server():
    st = ServerThread(lambda: FakeEngine(step_time=0.01), _settings()).start()
    yield st
    st.stop()


async def test_drain_finishes_in_flight_and_refuses_new(slow_server):
    url = slow_server.url
    async with aiohttp.ClientSession() as s:
        resp = await s.post(url + "/v1/completions", json={"prompt": "long", "max_tokens": 60, "stream": True})
        assert resp.status == 200
        await resp.content.readline()
        drain = slow_server.submit(slow_server.server.drain())
        deadline = time.monotonic() + 10
        while http_get(url + "/health")[0] != 503:
            assert time.monotonic() < deadline, "/health did not turn 503 while draining"
            time.sleep(0.01)
        async with s.post(url + "/v1/completions", json={"prompt": "new", "max_tokens": 1}) as r2:
            assert r2.status == 503 and "Retry-After" in r2.headers
            assert (await r2.json())["error"]["code"] == "draining"
        text, reason = await _read_stream(resp)
        assert reason == "length" and text
        drain.result(10)


async def test_grace_period_over_aborts(slow_server):
    url = slow_server.url
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 400, "stream": True},
        )
        assert resp.status == 200
        await resp.content.readline()
        slow_server.submit(slow_server.server.drain(grace_period=0.2))
        reason = None
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                for ch in json.loads(line[6:]).get("choices", []):
                    reason = ch.get("finish_reason") or reason
        assert reason == "abort"
    assert slow_server.server.async_engine.num_in_flight == 0


async def test_non_stream_aborted_by_grace_period(slow_server):
    url = slow_server.url
    async with aiohttp.ClientSession() as s:
        import asyncio

        task = asyncio.ensure_future(s.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 400}))
        deadline = time.monotonic() + 10
        while slow_server.server.async_engine.num_in_flight < 1:  # the request runs before the drain starts
            assert time.monotonic() < deadline, "the request never reached the engine"
            await asyncio.sleep(0.01)
        slow_server.submit(slow_server.server.drain(grace_period=0.1))
        resp = await task
        body = await resp.json()
        assert resp.status == 200 and body["choices"][0]["finish_reason"] == "abort"
        assert 0 < body["usage"]["completion_tokens"] < 400


async def test_engine_failure_fails_requests_and_health():
    st = ServerThread(lambda: FakeEngine(step_time=0.01), _settings()).start()
    try:
        async with aiohttp.ClientSession() as s:
            resp = await s.post(st.url + "/v1/completions", json={"prompt": "x", "max_tokens": 200, "stream": True})
            await resp.content.readline()
            st.engine.fail_next_step = True
            body = (await resp.read()).decode()
            assert '"code":"engine_dead"' in body.replace(" ", "") and body.rstrip().endswith("[DONE]")
            assert http_get(st.url + "/health")[0] == 503
            async with s.post(st.url + "/v1/completions", json={"prompt": "x"}) as r:
                assert r.status == 503
    finally:
        st.stop()


def test_health_is_503_while_loading_then_200():
    gate = {"go": False}

    def factory():
        while not gate["go"]:
            time.sleep(0.01)
        return FakeEngine()

    st = ServerThread(factory, _settings())
    st._thread.start()
    st.call(st.server.start_http())
    fut = st.submit(st.server.start_engine())
    try:
        code, body = http_get(st.url + "/health")
        assert code == 503 and "loading" in body
        code, body = http_get(st.url + "/v1/models")
        assert code == 503 and json.loads(body)["error"]["code"] == "not_ready"
        gate["go"] = True
        fut.result(10)
        assert http_get(st.url + "/health")[0] == 200
    finally:
        gate["go"] = True
        st.stop()


def test_engine_that_fails_to_load_is_reported():
    def factory():
        raise ValueError("corrupt weights file")

    st = ServerThread(factory, _settings())
    st._thread.start()
    try:
        with pytest.raises(ValueError, match="corrupt"):
            st.call(st.server.start())
    finally:
        st.stop()
