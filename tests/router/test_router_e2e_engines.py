"""End to end: the official openai client → `kubellm router` → real `kubellm serve` replicas.

Two replicas on the embedded model (CPU) check the OpenAI surface; simulated replicas (`--device sim`: the
same scheduler, KV cache manager, KV events and server, with a timing model instead of the model's compute)
check precise prefix routing on the engine's own KV events, and failover under load.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import time
import urllib.request

import openai
import pytest
from router_procs import Proc, http_get

from kubellm.builtin_models import DEFAULT_MODEL

pytestmark = pytest.mark.slow

MODEL = DEFAULT_MODEL
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def router_args(engines: list[Proc], *extra: str) -> list[str]:
    args = ["router", "--model", MODEL, "--debug-headers", "--health-interval", "0.3", "--log-level", "warning"]
    for e in engines:
        args += ["--backend", e.url]
    return [*args, *extra]


@pytest.fixture(scope="module")
def real_stack():
    engines = [
        Proc(
            f"real{i}",
            [
                "serve",
                "--max-model-len",
                "1536",
                "--max-num-seqs",
                "8",
                "--num-gpu-blocks-override",
                "112",
                "--log-level",
                "warning",
            ],
        )
        for i in range(2)
    ]
    for e in engines:
        e.start()
    router = None
    try:
        for e in engines:
            e.wait_ready(300)
        router = Proc("router", router_args(engines)).start().wait_ready(30)
        yield engines, router
    finally:
        for p in [router, *engines]:
            if p:
                p.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_openai_client_through_router_to_real_replicas(real_stack):
    _, router = real_stack
    c = client(router.url)
    assert MODEL in [m.id for m in c.models.list().data]
    chat = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    streamed = "".join(
        (ch.choices[0].delta.content or "") if ch.choices else ""
        for ch in c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, stream=True)
    )
    assert streamed == chat.choices[0].message.content
    comp = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    text = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
        )
    )
    assert text == comp.choices[0].text and comp.choices[0].text
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=2)
    card = c.models.retrieve(MODEL)  # the replicas' context length, as the engines report it
    assert card.model_extra["max_model_len"] == 1536
    assert [m.model_extra["max_model_len"] for m in c.models.list().data if m.id == MODEL] == [1536]
    with pytest.raises(openai.BadRequestError) as e:  # refused as OpenAI does, whoever answers
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": None}], max_tokens=2)
    assert e.value.body["param"] == "messages.0.content"


def _engine_kv_seq(engine: Proc) -> int:
    """The seq of the engine's latest KV event: its /v1/kv_events stream opens with a snapshot carrying it."""
    with urllib.request.urlopen(engine.url + "/v1/kv_events", timeout=5) as r:
        return int(json.loads(r.readline())["seq"])


def _router_caught_up(router: Proc, *engines: Proc) -> None:
    """Wait until the router has applied every KV event these engines have published so far."""
    for e in engines:
        target, deadline = _engine_kv_seq(e), time.monotonic() + 30
        pattern = rf'kubellm_router_kv_event_seq\{{backend="{re.escape(e.url)}"\}} ([0-9.e+-]+)'
        while True:
            m = re.search(pattern, http_get(router.url + "/metrics")[1])
            if m and float(m.group(1)) >= target:
                break
            assert time.monotonic() < deadline, f"the router did not catch up with {e.url}'s KV events"
            time.sleep(0.02)


def _routes_to(router: Proc, msgs: list[dict], target: Proc) -> None:
    for q in ("What is 2+2?", "Name a colour.", "Say hi."):
        raw = client(router.url).chat.completions.with_raw_response.create(
            model=MODEL, messages=[*msgs, {"role": "user", "content": q}], max_tokens=1
        )
        assert raw.headers["x-kubellm-backend"] == target.url
        assert raw.headers["x-kubellm-route"] == "prefix_hit"


@pytest.fixture(scope="module")
def sim_pair():
    """Two simulated replicas with a small KV pool (so a long prompt evicts), behind a prefix router."""
    args = ["serve", "--device", "sim", "--num-gpu-blocks-override", "128", "--max-model-len", "2048"]
    engines = [Proc(f"simp{i}", [*args, "--log-level", "warning"]) for i in range(2)]
    for e in engines:
        e.start()
    router = None
    try:
        for e in engines:
            e.wait_ready(120)
        router = Proc("router-prefix", router_args(engines)).start().wait_ready(30)
        yield engines, router
    finally:
        for p in [router, *engines]:
            if p:
                p.stop()


def test_precise_prefix_routing_on_engine_kv_events(sim_pair):
    """The engine's own KV cache manager and KV events (sim device: same scheduler, cache and server)."""
    (a, b), router = sim_pair
    system = "You are a meticulous assistant. " + " ".join(f"Rule {i}: answer briefly and politely." for i in range(60))
    msgs = [{"role": "system", "content": system}]
    # warm the prefix on B directly, not through the router: the router learns it from B's KV events
    client(b.url).chat.completions.create(
        model=MODEL, messages=[*msgs, {"role": "user", "content": "Hi"}], max_tokens=1
    )
    _router_caught_up(router, b)
    _routes_to(router, msgs, b)
    # B's small KV pool evicts the prefix when a long unrelated prompt runs there
    filler = " ".join(f"Item {i} is a number." for i in range(212))  # ~1800 tokens of a 2048-token pool
    client(b.url).completions.create(model=MODEL, prompt=filler, max_tokens=1)
    # A now holds it (warmed directly): the router stops preferring B and follows the cache to A
    client(a.url).chat.completions.create(
        model=MODEL, messages=[*msgs, {"role": "user", "content": "Yo"}], max_tokens=1
    )
    _router_caught_up(router, a, b)
    _routes_to(router, msgs, a)


def _one_stream(url: str, i: int) -> str:
    c = client(url)
    try:
        n = 0
        for ch in c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=60,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            n += bool(ch.choices and ch.choices[0].delta.content)
        return "ok"
    except openai.APIError as e:
        return "stream_error" if "upstream_died" in json.dumps(getattr(e, "body", None) or {}) else f"error {e!r}"


def _healthy(router: Proc, backend: str) -> bool:
    _, text = http_get(router.url + "/metrics")
    m = re.search(rf'kubellm_router_backend_healthy\{{backend="{re.escape(backend)}"\}} ([0-9.]+)', text)
    return bool(m and float(m.group(1)) == 1.0)


def _running(engine: Proc) -> float:
    _, text = http_get(engine.url + "/metrics")
    m = re.search(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_failover_when_a_replica_dies_mid_load(sim_pair):
    engines, _ = sim_pair
    router = Proc("router-failover", router_args(engines, "--policy", "least_load")).start().wait_ready(30)
    try:
        _failover(engines, router)
    finally:
        router.stop()


def _failover(engines: list[Proc], router: Proc) -> None:
    victim = engines[0]
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_one_stream, router.url, i) for i in range(16)]
        deadline = time.monotonic() + 30
        while _running(victim) < 1:  # the crash must catch requests mid-stream
            assert time.monotonic() < deadline, "no request reached the victim"
            time.sleep(0.02)
        victim.kill()
        futures += [pool.submit(_one_stream, router.url, 100 + i) for i in range(12)]  # arrive after the crash
        results = [f.result(timeout=60) for f in futures]  # nothing hangs
    assert all(r in ("ok", "stream_error") for r in results), [(i, r) for i, r in enumerate(results) if r != "ok"]
    assert results[16:] == ["ok"] * 12  # requests not yet streaming went elsewhere and succeeded
    assert results.count("ok") >= 20
    deadline = time.monotonic() + 10
    while _healthy(router, victim.url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _healthy(router, victim.url)
    # it comes back on the same address and rejoins the rotation
    victim.start().wait_ready(120)
    deadline = time.monotonic() + 10
    while not _healthy(router, victim.url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _healthy(router, victim.url)
    seen = set()
    for i in range(9):
        raw = client(router.url).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"after {i}"}], max_tokens=2
        )
        seen.add(raw.headers["x-kubellm-backend"])
    assert victim.url in seen
