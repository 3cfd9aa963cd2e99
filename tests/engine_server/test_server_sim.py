"""The server around the real LLMEngine with `--device sim` (real scheduler, KV cache manager and prefix
cache; a timing model instead of compute): batching, KV accounting, events and multi-replica `kubellm up`
checked in seconds."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest
from kv_lines import next_seq_event
from server_harness import ServerThread, wait_until_streams_run_together
from test_server_local_stack import _start_up, _stop

from kubellm import metric_names as mn
from kubellm.block_hash import hash_blocks, to_hex
from kubellm.engine.config import EngineConfig
from kubellm.engine.server.api_server import ServerSettings

MODEL = "sim-model"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@pytest.fixture(scope="module")
def sim_server():
    from kubellm.engine.llm_engine import LLMEngine

    config = EngineConfig(device="sim", served_model_name=MODEL, num_gpu_blocks_override=512)
    settings = ServerSettings(host="127.0.0.1", port=0, served_model_names=[MODEL])
    st = ServerThread(lambda: LLMEngine(config), settings, max_waiting=1024).start()
    yield st
    st.stop()


async def _scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return await r.text()


def _success(text: str, reason: str) -> float:
    """vllm:request_success_total for one finish reason."""
    for line in text.splitlines():
        if line.startswith(mn.REQUEST_SUCCESS + "_total{") and f'finished_reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0  # prometheus-client shows a labelled child only once it has been counted


async def test_64_streams_batched_on_the_real_scheduler(sim_server):
    client = openai.AsyncOpenAI(base_url=sim_server.url + "/v1", api_key="x", max_retries=0)
    finished_before = _success(await _scrape(sim_server.url), "length")
    await wait_until_streams_run_together(sim_server.url, MODEL, 64, at_least=16)

    async def one(i: int) -> int:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=32, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        n = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                assert chunk.choices[0].finish_reason == "length"
            n += 1
        return n

    counts = await asyncio.gather(*(one(i) for i in range(64)))
    assert all(c > 1 for c in counts)
    text = await _scrape(sim_server.url)
    assert _metric(text, mn.KV_CACHE_BLOCKS_USED) == 0
    assert _success(text, "length") - finished_before == 64


async def test_disconnect_frees_real_kv_blocks(sim_server):
    url = sim_server.url
    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "x " * 100, "max_tokens": 5000, "stream": True, "ignore_eos": True}
        resp = await s.post(url + "/v1/completions", json=body)
        await resp.content.readline()
        assert _metric(await _scrape(url), mn.KV_CACHE_BLOCKS_USED) >= 6
        resp.close()
    deadline = time.monotonic() + 5
    while _metric(await _scrape(url), mn.KV_CACHE_BLOCKS_USED) > 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_kv_events_match_the_shared_block_hash(sim_server):
    url = sim_server.url
    engine = sim_server.engine
    prompt = f"a prompt for the sim engine {time.time()} " * 4
    ids = engine.renderer.encode(prompt)
    async with aiohttp.ClientSession() as s, s.get(url + "/v1/kv_events") as r:
        snap = await next_seq_event(r.content)
        assert snap.type == "snapshot" and snap.block_size == 16
        async with s.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}) as d:
            assert d.status == 200
        expected = [to_hex(h) for h in hash_blocks(ids, 16)]
        stored: list[str] = []
        seq = snap.seq
        while set(expected) - set(stored):
            ev = await next_seq_event(r.content, 5)
            assert ev.seq == seq + 1
            seq = ev.seq
            if ev.type == "stored":
                stored += ev.hashes
    async with aiohttp.ClientSession() as s, s.get(url + "/v1/kv_events") as r:
        snap2 = await next_seq_event(r.content)
        assert snap2.epoch == snap.epoch and set(expected) <= set(snap2.hashes) and snap2.seq >= seq


async def test_queue_bound_gives_429_under_real_load(sim_server):
    eng = sim_server.server.async_engine
    old = eng.max_waiting_requests
    eng.max_waiting_requests = 4
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "y " * 3000, "max_tokens": 1}  # long prefills: requests queue up
            resps = await asyncio.gather(*(s.post(sim_server.url + "/v1/completions", json=body) for _ in range(40)))
            codes = sorted(r.status for r in resps)
            limited = [r for r in resps if r.status == 429]
            assert limited and all(r.headers.get("Retry-After") for r in limited), codes
            assert 200 in codes
            for r in resps:
                r.release()
    finally:
        eng.max_waiting_requests = old


def test_up_with_two_sim_replicas_behind_the_router():
    from kubellm.local_stack import router_available

    assert router_available(), "the router part must be installed in the test environment"
    proc, base_url = _start_up("--device", "sim", "--replicas", "2")
    try:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=2, timeout=60)
        for _ in range(4):
            out = client.chat.completions.create(
                model="smollm2-135m-instruct", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert out.choices[0].message.content
    finally:
        assert _stop(proc) == 0


def test_cache_salt_separates_prefix_caches(sim_server):
    client = openai.OpenAI(base_url=sim_server.url + "/v1", api_key="x", max_retries=0)
    prompt = f"salted prompt {time.time()} " * 8

    def cached(salt: str | None) -> int:
        extra = {"cache_salt": salt} if salt else {}
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body=extra)
        return out.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-a") > 0
    assert cached("tenant-b") == 0
    assert cached(None) == 0
