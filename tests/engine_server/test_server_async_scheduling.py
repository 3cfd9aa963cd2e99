"""`kubellm serve --async-scheduling` (the default on GPUs) through the official openai client on the embedded
SmolLM2 (CPU): concurrent streams equal their non-streamed greedy answers, stop strings cut exactly, and a client
that disconnects mid-stream gets its KV blocks freed although a step of its request may still be in flight."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from server_harness import http_get

from kubellm import metric_names as mn

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Count from one to five.", "Say hi."]


@pytest.fixture(scope="module")
def serve_args():
    return ("--device", "cpu", "--async-scheduling", "--max-num-seqs", "32")


def _blocks_used(serve_process) -> float:
    for line in http_get(serve_process.url + "/metrics")[1].splitlines():
        if line.startswith(mn.KV_CACHE_BLOCKS_USED + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(mn.KV_CACHE_BLOCKS_USED)


async def test_concurrent_streams_equal_their_non_streamed_answers(async_openai_client):
    async def ask(question: str, stream: bool) -> str:
        kw = dict(model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0)
        if not stream:
            return (await async_openai_client.chat.completions.create(**kw)).choices[0].message.content
        parts = []
        async for chunk in await async_openai_client.chat.completions.create(**kw, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)

    streamed = await asyncio.gather(*(ask(q, True) for q in QUESTIONS * 2))
    plain = await asyncio.gather(*(ask(q, False) for q in QUESTIONS))
    assert streamed == plain * 2
    assert "Paris" in plain[0]
    cut = await async_openai_client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"]
    )
    assert cut.choices[0].finish_reason == "stop" and " 7" not in cut.choices[0].text
    assert cut.choices[0].text.startswith(" 5, 6,")


async def test_disconnect_mid_stream_frees_blocks(serve_process):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(serve_process.url + "/v1/completions", json=body)
        assert resp.status == 200
        await resp.content.readline()
        assert _blocks_used(serve_process) > 0
        resp.close()
    deadline = time.monotonic() + 10
    while _blocks_used(serve_process) > 0:
        assert time.monotonic() < deadline, "KV blocks not freed after the client disconnected"
        await asyncio.sleep(0.05)
