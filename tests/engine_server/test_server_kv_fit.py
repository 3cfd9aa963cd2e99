"""max_model_len against the KV pool (vLLM's rule): a request that can never fit is refused before it decodes
a token, instead of decoding until the pool runs out and losing its output. On `--device sim` (the real
scheduler and KV cache manager, no compute), with the embedded model's config (8192 positions)."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest
from server_harness import ServerThread

from kubellm import metric_names as mn
from kubellm.engine.config import EngineConfig
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.server.api_server import ServerSettings

MODEL = "fit-model"
BLOCKS = 8  # x 16 tokens: a 128-token pool
POOL = BLOCKS * 16


def _engine(**kw) -> LLMEngine:
    return LLMEngine(EngineConfig(device="sim", served_model_name=MODEL, num_gpu_blocks_override=BLOCKS, **kw))


def test_the_models_length_is_lowered_to_the_pool_with_a_log_line(caplog):
    caplog.set_level(logging.WARNING, logger="kubellm")
    eng = _engine()
    assert eng.model_config.max_position_embeddings == 8192
    assert eng.max_model_len == POOL
    assert f"max_model_len lowered from the model's 8192 to {POOL}" in caplog.text


def test_an_explicit_length_that_cannot_fit_refuses_to_start_naming_the_largest_that_fits():
    with pytest.raises(ValueError, match=f"max_model_len 4096 does not fit the KV cache, which holds {POOL} tokens; "
                       f"the largest max_model_len that fits is {POOL}"):  # fmt: skip
        _engine(max_model_len=4096)
    assert _engine(max_model_len=100).max_model_len == 100  # one that fits is kept


def _generated_tokens(server: ServerThread) -> float:
    text = httpx.get(server.url + "/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith(mn.GENERATION_TOKENS + "_total{"))
    return float(line.rsplit(" ", 1)[1])


@pytest.fixture(scope="module")
def small_pool_server():
    settings = ServerSettings(host="127.0.0.1", port=0, served_model_names=[MODEL])
    st = ServerThread(_engine, settings).start()
    yield st
    st.stop()


def test_a_request_that_can_never_fit_is_refused_before_decoding(small_pool_server):
    url = small_pool_server.url
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    assert [m.model_extra["max_model_len"] for m in client.models.list()] == [POOL]  # what clients are told
    messages = [{"role": "user", "content": "Tell me a long story."}]
    n_prompt = httpx.post(url + "/tokenize", json={"model": MODEL, "messages": messages}).json()["count"]
    assert 0 < n_prompt < POOL - 16
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=POOL, stream=stream)
        err = e.value.body
        assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        assert f"maximum context length is {POOL} tokens" in err["message"]
        assert (
            f"you requested {n_prompt + POOL} tokens ({n_prompt} in the prompt, {POOL} for the completion)"
            in (err["message"])
        )
    # a request that fits runs, and it alone accounts for every generated token: the refused ones decoded none
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 7
    assert _generated_tokens(small_pool_server) == 7
    # without max_tokens the request gets what is left of the context, and finishes with "length" there
    out = client.chat.completions.create(model=MODEL, messages=messages, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == POOL - n_prompt and out.choices[0].finish_reason == "length"
