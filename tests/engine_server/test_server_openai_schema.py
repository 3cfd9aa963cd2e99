"""The server's JSON against OpenAI's published schema (openai-openapi's CreateChatCompletionResponse and
CreateCompletionResponse, which the `openai` client's pydantic types mirror): every field we send is one the
schema declares (or one of vLLM's documented extensions), chat logprobs carry `refusal: null` beside `content`,
and `system_fingerprint` is a string or absent, never null. Also vLLM's `return_token_ids`."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Union, get_args, get_origin

import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

# Fields vLLM adds to OpenAI's responses (kubellm follows vLLM): documented in vLLM's OpenAI-compatible server.
VLLM_EXTENSIONS = {"stop_reason", "prompt_token_ids", "token_ids"}


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation (Optional[...], List[...], unions) can hold."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (list, Union) or type(annotation).__name__ == "UnionType":
        return [m for arg in get_args(annotation) for m in _models_in(arg)]
    return []


def undeclared_fields(value: Any, model: type[BaseModel], path: str = "") -> list[str]:
    """Paths of keys in `value` that `model` (an openai type) does not declare, recursively, vLLM's extensions
    excepted."""
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in undeclared_fields(v, model, f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    found = []
    for key, v in value.items():
        info = model.model_fields.get(key)
        if info is None:
            if key not in VLLM_EXTENSIONS:
                found.append(f"{path}.{key}")
            continue
        for sub in _models_in(info.annotation)[:1]:
            found += undeclared_fields(v, sub, f"{path}.{key}")
    return found


def _check_fingerprint(body: dict[str, Any]) -> None:
    assert "system_fingerprint" not in body or isinstance(body["system_fingerprint"], str), body


def test_chat_response_follows_the_schema(fake_server):
    status, raw = _post(
        fake_server.url + "/v1/chat/completions",
        {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "logprobs": True,
         "top_logprobs": 2},
    )  # fmt: skip
    assert status == 200, raw
    body = json.loads(raw)
    assert undeclared_fields(body, ChatCompletion) == []
    _check_fingerprint(body)
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None and len(logprobs["content"]) == 3
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].logprobs.refusal is None and "refusal" in parsed.choices[0].logprobs.model_fields_set


def test_chat_stream_chunks_follow_the_schema(fake_server):
    status, raw = _post(
        fake_server.url + "/v1/chat/completions",
        {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "logprobs": True,
         "stream": True, "stream_options": {"include_usage": True}},
    )  # fmt: skip
    assert status == 200, raw
    lines = [ln[6:] for ln in raw.decode().split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(ln) for ln in lines[:-1]]
    with_logprobs = [c for c in chunks if c["choices"] and c["choices"][0].get("logprobs")]
    assert len(with_logprobs) >= 1
    for chunk in chunks:
        assert undeclared_fields(chunk, ChatCompletionChunk) == []
        _check_fingerprint(chunk)
    for chunk in with_logprobs:
        assert chunk["choices"][0]["logprobs"]["refusal"] is None


def test_completion_response_follows_the_schema(fake_server):
    status, raw = _post(
        fake_server.url + "/v1/completions", {"model": "fake-model", "prompt": "ab", "max_tokens": 3, "logprobs": 1}
    )
    assert status == 200, raw
    body = json.loads(raw)
    assert undeclared_fields(body, Completion) == []
    _check_fingerprint(body)
    Completion.model_validate(body)


def test_undeclared_fields_finds_a_stray_key():
    """The checker itself: a key OpenAI's type lacks, nested in a list of choices, is reported."""
    body = {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "mood": "good"}}]}
    assert undeclared_fields(body, ChatCompletion) == [".choices[0].message.mood"]


def test_return_token_ids(fake_server):
    client = openai.OpenAI(base_url=fake_server.url + "/v1", api_key="none", max_retries=0)
    out = client.completions.create(
        model="fake-model", prompt=[104, 105], max_tokens=3, extra_body={"return_token_ids": True}
    )
    choice = out.choices[0].model_extra
    assert choice["prompt_token_ids"] == [104, 105] and len(choice["token_ids"]) == 3
    status, raw = _post(fake_server.url + "/detokenize", {"model": "fake-model", "tokens": choice["token_ids"]})
    assert status == 200 and json.loads(raw)["prompt"] == out.choices[0].text

    chat = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    assert len(chat.model_extra["prompt_token_ids"]) == chat.usage.prompt_tokens > 0
    assert len(chat.choices[0].model_extra["token_ids"]) == chat.usage.completion_tokens == 4

    plain = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert "prompt_token_ids" not in plain.model_extra and "token_ids" not in plain.choices[0].model_extra
