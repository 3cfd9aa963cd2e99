"""The server's OpenAI semantics against a fake engine: fast, deterministic, independent of model speed."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time

import aiohttp
import openai
import pytest
from kv_lines import next_seq_event

from kubellm import metric_names as mn
from kubellm.kv_events import LoadEvent, decode_event


@pytest.fixture(scope="module")
def client(fake_server):
    return openai.OpenAI(base_url=fake_server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture
def aclient(fake_server):
    return openai.AsyncOpenAI(base_url=fake_server.url + "/v1", api_key="none", max_retries=0)


def test_models_health_version(fake_server, client):
    assert [m.id for m in client.models.list().data] == ["fake-model"]
    import urllib.request

    with urllib.request.urlopen(fake_server.url + "/health") as r:
        assert r.status == 200
    with urllib.request.urlopen(fake_server.url + "/version") as r:
        assert "version" in json.loads(r.read())


def test_retrieve_one_model(client):
    """GET /v1/models/{id}, as `client.models.retrieve` asks for it; an unknown id is OpenAI's 404."""
    card = client.models.retrieve("fake-model")
    assert card.id == "fake-model" and card.object == "model" and card.model_extra["max_model_len"] == 512
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found" and "gpt-9" in e.value.body["message"]


def test_completion_stream_equals_non_stream(client):
    kw = dict(model="fake-model", prompt="Hello there", max_tokens=12, temperature=0)
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens == len(b"Hello there")
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_prompt_forms_n_echo(client):
    out = client.completions.create(model="fake-model", prompt=["ab", "cd"], max_tokens=3, n=2, echo=True)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text.startswith("ab") and out.choices[2].text.startswith("cd")
    ids = client.completions.create(model="fake-model", prompt=[104, 105], max_tokens=2)
    assert ids.usage.prompt_tokens == 2
    multi = client.completions.create(model="fake-model", prompt=[[104, 105], [106]], max_tokens=2, stream=False)
    assert len(multi.choices) == 2


def test_completion_stream_multi_prompt_and_usage(client):
    chunks = list(
        client.completions.create(
            model="fake-model",
            prompt=["x", "yy"],
            max_tokens=4,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert sorted(texts) == [0, 1, 2, 3] and all(len(t) == 4 for t in texts.values())
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].choices == []


def test_seed_reproducible_and_logprobs(client):
    kw = dict(model="fake-model", prompt="seeded", max_tokens=8, temperature=1.0, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    lp = client.completions.create(model="fake-model", prompt="lp", max_tokens=3, logprobs=2).choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == [0, 1, 2]


def test_stop_string(client):
    full = client.completions.create(model="fake-model", prompt="stop test", max_tokens=10, temperature=0)
    text = full.choices[0].text
    stop = text[3:5]
    out = client.completions.create(model="fake-model", prompt="stop test", max_tokens=10, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.index(stop)]


def test_cached_tokens_on_repeated_prompt(client):
    prompt = "a long prompt that repeats itself " * 3
    client.completions.create(model="fake-model", prompt=prompt, max_tokens=1)
    again = client.completions.create(model="fake-model", prompt=prompt, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens - 4


def test_chat_non_stream_and_stream(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model="fake-model", messages=msgs, max_completion_tokens=6, seed=1)
    assert full.choices[0].message.role == "assistant" and len(full.choices[0].message.content) == 6
    assert full.id.startswith("chatcmpl-")
    chunks = list(
        client.chat.completions.create(
            model="fake-model", messages=msgs, max_tokens=6, seed=1, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_logprobs_and_n(client):
    out = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        n=2,
        logprobs=True,
        top_logprobs=3,
        temperature=0.7,
        seed=5,
    )
    assert len(out.choices) == 2
    content = out.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 3 and content[0].logprob == -0.25


def test_chat_text_content_parts(client):
    out = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}], max_tokens=2
    )
    assert out.choices[0].message.content


async def test_async_client_stream(aclient):
    stream = await aclient.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "async"}], max_tokens=5, stream=True
    )
    text = ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert len(text) == 5
    full = await aclient.completions.create(model="fake-model", prompt="async", max_tokens=3)
    assert len(full.choices[0].text) == 3


async def test_concurrent_streams_all_complete(fake_server, aclient):
    async def one(i: int) -> str:
        s = await aclient.completions.create(model="fake-model", prompt=f"p{i}", max_tokens=8, stream=True)
        return "".join([c.choices[0].text async for c in s if c.choices])

    results = await asyncio.gather(*(one(i) for i in range(64)))
    assert all(len(r) == 8 for r in results)
    assert len(fake_server.engine.thread_ids) == 1, "every engine call happens on the one engine thread"


def test_request_id_echoed(fake_server):
    import urllib.request

    body = json.dumps({"prompt": "rid", "max_tokens": 1}).encode()
    req = urllib.request.Request(
        fake_server.url + "/v1/completions", body, {"Content-Type": "application/json", "X-Request-Id": "abc-123"}
    )
    with urllib.request.urlopen(req) as r:
        assert r.headers["X-Request-Id"] == "abc-123"
        assert json.loads(r.read())["id"] == "cmpl-abc-123"
    req = urllib.request.Request(fake_server.url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        assert len(r.headers["X-Request-Id"]) >= 16


def test_tokenize_detokenize_and_tokenizer_info(fake_server):
    import urllib.request

    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(
            fake_server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read())

    tok = post("/tokenize", {"prompt": "héllo"})
    assert tok["count"] == len("héllo".encode()) and tok["max_model_len"] == 512
    assert post("/detokenize", {"tokens": tok["tokens"]})["prompt"] == "héllo"
    chat = post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert chat["count"] > 2
    with urllib.request.urlopen(fake_server.url + "/v1/tokenizer_info") as r:
        info = json.loads(r.read())
    from kubellm.prompt import PromptRenderer, TokenizerInfo

    renderer = PromptRenderer(TokenizerInfo(**info))
    assert renderer.chat_token_ids([{"role": "user", "content": "hi"}]) == chat["tokens"]


def test_openapi_describes_endpoints(fake_server):
    import urllib.request

    with urllib.request.urlopen(fake_server.url + "/openapi.json") as r:
        raw = r.read()
    spec = json.loads(raw)
    assert b"GUIDE.md" not in raw  # users have no such file: the description stands alone
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"):
        assert path in spec["paths"]
    assert "ChatCompletionRequest" in spec["components"]["schemas"]


def test_metrics_names(fake_server, client):
    import urllib.request

    client.completions.create(model="fake-model", prompt="metrics", max_tokens=2)
    with urllib.request.urlopen(fake_server.url + "/metrics") as r:
        text = r.read().decode()
    counters = {mn.PREFIX_CACHE_QUERIES, mn.PREFIX_CACHE_HITS, mn.NUM_PREEMPTIONS, mn.PROMPT_TOKENS}
    counters |= {mn.GENERATION_TOKENS, mn.REQUEST_SUCCESS}
    for name in mn.ENGINE_METRICS:
        exposed = name + "_total" if name in counters else name
        assert f"\n{exposed}" in text or f"\n{exposed}_bucket" in text, name
        assert 'model_name="fake-model"' in text
    assert f'{mn.REQUEST_SUCCESS}_total{{finished_reason="length",model_name="fake-model"}}' in text
    assert f"{mn.TIME_TO_FIRST_TOKEN}_count" in text and 'block_size="4"' in text
    assert 'cache_dtype="auto"' in text  # vLLM's label: fp8 under --kv-cache-dtype fp8


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def _scrape(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return _metric(await r.text(), name)


async def test_disconnect_aborts_and_frees_blocks(fake_server):
    url = fake_server.url
    body = {"prompt": "disconnect me", "max_tokens": 400, "stream": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(url + "/v1/completions", json=body)
        assert resp.status == 200
        await resp.content.readline()
        assert await _scrape(url, mn.KV_CACHE_BLOCKS_USED) > 0
        resp.close()  # client goes away mid-stream
    deadline = time.monotonic() + 5
    while await _scrape(url, mn.KV_CACHE_BLOCKS_USED) > 0:
        assert time.monotonic() < deadline, "blocks were not freed after the disconnect"
        await asyncio.sleep(0.02)
    assert fake_server.server.async_engine.num_in_flight == 0
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/completions", json={"prompt": "after", "max_tokens": 2}) as r,
    ):
        assert r.status == 200


async def test_non_stream_disconnect_aborts(fake_server):
    url = fake_server.url
    async with aiohttp.ClientSession() as s:
        task = asyncio.ensure_future(s.post(url + "/v1/completions", json={"prompt": "slow", "max_tokens": 450}))
        deadline = time.monotonic() + 10
        while fake_server.server.async_engine.num_in_flight != 1:
            assert time.monotonic() < deadline, "the request never reached the engine"
            await asyncio.sleep(0.01)
        task.cancel()
    deadline = time.monotonic() + 5
    while fake_server.server.async_engine.num_in_flight:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_queue_full_answers_429_with_retry_after(fake_server):
    eng = fake_server.server.async_engine
    old = eng.max_waiting_requests
    eng.max_waiting_requests = 0
    try:
        async with aiohttp.ClientSession() as s, s.post(fake_server.url + "/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "1"
            assert (await r.json())["error"]["code"] == "queue_full"
    finally:
        eng.max_waiting_requests = old


async def test_kv_events_snapshot_then_stored(fake_server):
    url = fake_server.url
    async with aiohttp.ClientSession() as s, s.get(url + "/v1/kv_events") as r:
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        snap = await next_seq_event(r.content)
        assert snap.type == "snapshot" and snap.block_size == 4
        prompt = f"kv events {time.time()} unique prompt"
        async with s.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}) as done:
            assert done.status == 200
        ev = await next_seq_event(r.content, 5)
        assert ev.type == "stored" and ev.seq == snap.seq + 1
        from kubellm.block_hash import hash_blocks, to_hex

        ids = fake_server.engine.renderer.encode(prompt)
        assert ev.hashes == [to_hex(h) for h in hash_blocks(ids, 4)] and ev.parent is None
    # a fresh subscriber's snapshot includes them, at the latest seq
    async with aiohttp.ClientSession() as s, s.get(url + "/v1/kv_events") as r:
        snap2 = await next_seq_event(r.content)
        assert snap2.epoch == snap.epoch and snap2.seq >= ev.seq and set(ev.hashes) <= set(snap2.hashes)


def test_api_key(fake_server, client):
    settings = fake_server.server.settings
    settings.api_key = "s3cret"
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            client.models.list()
        assert e.value.body["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=fake_server.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data
        import urllib.request

        with urllib.request.urlopen(fake_server.url + "/health") as r:  # probes need no key
            assert r.status == 200
    finally:
        settings.api_key = None


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert e.value.body["param"] == "model"


def test_engine_calls_single_thread(fake_server):
    assert len(fake_server.engine.thread_ids) == 1
    assert threading.get_ident() not in fake_server.engine.thread_ids


async def test_kv_events_carry_load_lines_without_seq_at_most_every_50ms(fake_server):
    """GUIDE section 2: `load` lines when (running, waiting, free_blocks) change, rate-limited, outside the seq."""
    url = fake_server.url
    loads: list[tuple[float, LoadEvent]] = []
    seqs: list[int] = []

    async def follow(r: aiohttp.ClientResponse) -> None:
        while True:
            ev = decode_event(await r.content.readline())
            if isinstance(ev, LoadEvent):
                loads.append((time.monotonic(), ev))
            else:
                seqs.append(ev.seq)

    async with aiohttp.ClientSession() as s, s.get(url + "/v1/kv_events") as r:
        snap = decode_event(await r.content.readline())
        assert snap.type == "snapshot"
        first = decode_event(await r.content.readline())  # a new subscriber learns the load at once
        assert isinstance(first, LoadEvent) and first.running == 0 and first.waiting == 0 and first.free_blocks > 0
        follower = asyncio.create_task(follow(r))
        body = {"prompt": f"load lines {time.time()}", "max_tokens": 40, "stream": True}
        t0 = time.monotonic()
        streams = [await s.post(url + "/v1/completions", json=body) for _ in range(6)]
        deadline = time.monotonic() + 5
        while not any(ev.running >= 1 for _, ev in loads):
            assert time.monotonic() < deadline, "no load line showed the running requests"
            await asyncio.sleep(0.01)
        assert any(ev.free_blocks < first.free_blocks for _, ev in loads)
        for resp in streams:
            await resp.read()
            resp.release()
        busy = time.monotonic() - t0
        # once idle, the last change is sent even though no further step happens
        deadline = time.monotonic() + 2
        while not (loads and loads[-1][1].running == 0 and loads[-1][1].waiting == 0):
            assert time.monotonic() < deadline, f"the idle load never arrived: {loads[-3:]}"
            await asyncio.sleep(0.01)
        follower.cancel()
    # the engine's state changed at every step, yet the lines are rate-limited to one per 50 ms (+ the idle one)
    assert 2 <= len(loads) <= (time.monotonic() - t0) / 0.05 + 2, (len(loads), busy)
    # no load line consumed a seq number: the stored events follow the snapshot's seq without a gap
    assert seqs and seqs == list(range(snap.seq + 1, snap.seq + 1 + len(seqs)))
    assert all(a[1] != b[1] for a, b in itertools.pairwise(loads)), "a load line repeated an unchanged load"
