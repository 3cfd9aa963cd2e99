"""Every malformed request gets its status and OpenAI's error body, never a 500, and the server keeps serving."""

from __future__ import annotations

import json
import urllib.request

import pytest

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]

# (name, method, path, raw body or JSON-able, expected status, expected param or None, headers)
CASES: list[tuple[str, str, str, object, int, str | None]] = [
    ("truncated json", "POST", COMP, b'{"prompt": "x", "max_tok', 400, None),
    ("invalid utf-8", "POST", COMP, b'{"prompt": "\xff\xfe"}', 400, None),
    ("body not an object", "POST", COMP, b'["prompt"]', 400, None),
    ("empty body", "POST", COMP, b"", 400, None),
    ("NaN literal", "POST", COMP, b'{"prompt": "x", "temperature": NaN}', 400, None),
    ("missing prompt", "POST", COMP, {"max_tokens": 1}, 400, "prompt"),
    ("prompt wrong type", "POST", COMP, {"prompt": 12}, 400, "prompt"),
    ("empty prompt list", "POST", COMP, {"prompt": []}, 400, "prompt"),
    ("empty prompt string", "POST", COMP, {"prompt": ""}, 400, "prompt"),
    ("negative token id", "POST", COMP, {"prompt": [1, -2]}, 400, "prompt"),
    ("token id out of vocab", "POST", COMP, {"prompt": [10**9]}, 400, "prompt"),
    ("temperature as string", "POST", COMP, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("temperature too high", "POST", COMP, {"prompt": "x", "temperature": 5}, 400, "temperature"),
    ("top_p zero", "POST", COMP, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("n zero", "POST", COMP, {"prompt": "x", "n": 0}, 400, "n"),
    ("max_tokens zero", "POST", COMP, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens float", "POST", COMP, {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ("max_tokens beyond context", "POST", COMP, {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("prompt over max_model_len", "POST", COMP, {"prompt": "y" * 600, "max_tokens": 1}, 400, "prompt"),
    ("logprobs too many", "POST", COMP, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("unknown field", "POST", COMP, {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("suffix unsupported", "POST", COMP, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("best_of > n", "POST", COMP, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("stream as string", "POST", COMP, {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("empty stop string", "POST", COMP, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (
        "stream_options without stream",
        "POST",
        COMP,
        {"prompt": "x", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    ("logit_bias unsupported", "POST", COMP, {"prompt": "x", "logit_bias": {"1": 2.0}}, 400, "logit_bias"),
    ("unknown model", "POST", COMP, {"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ("missing messages", "POST", CHAT, {"max_tokens": 1}, 400, "messages"),
    (
        "chat_template_kwargs setting messages",
        "POST",
        CHAT,
        {"messages": MSGS, "chat_template_kwargs": {"messages": []}},
        400,
        "chat_template_kwargs",
    ),
    (
        "return_token_ids streaming",
        "POST",
        CHAT,
        {"messages": MSGS, "stream": True, "return_token_ids": True},
        400,
        "return_token_ids",
    ),
    ("empty messages", "POST", CHAT, {"messages": []}, 400, "messages"),
    ("bad role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("content wrong type", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("user content null", "POST", CHAT, {"messages": [{"role": "user", "content": None}]}, 400, "messages.0.content"),
    ("user content missing", "POST", CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    (
        "system content null",
        "POST",
        CHAT,
        {"messages": [{"role": "system", "content": None}, *MSGS]},
        400,
        "messages.0.content",
    ),
    (
        "image part",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages.0.content.0",
    ),
    (
        "unknown message field",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": "x", "mood": "happy"}]},
        400,
        "messages.0.mood",
    ),
    (
        "tools auto without --enable-auto-tool-choice",
        "POST",
        CHAT,
        {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "tool_choice",
    ),
    ("tool_choice unknown", "POST", CHAT, {"messages": MSGS, "tool_choice": "sometimes"}, 400, "tool_choice"),
    (
        "json response_format",
        "POST",
        CHAT,
        {"messages": MSGS, "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    ("top_logprobs without logprobs", "POST", CHAT, {"messages": MSGS, "top_logprobs": 2}, 400, "top_logprobs"),
    (
        "top_logprobs too many",
        "POST",
        CHAT,
        {"messages": MSGS, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
    ),
    (
        "max_completion_tokens negative",
        "POST",
        CHAT,
        {"messages": MSGS, "max_completion_tokens": -1},
        400,
        "max_completion_tokens",
    ),
    ("presence_penalty out of range", "POST", CHAT, {"messages": MSGS, "presence_penalty": 3}, 400, "presence_penalty"),
    ("repetition_penalty zero", "POST", CHAT, {"messages": MSGS, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("chat unknown field", "POST", CHAT, {"messages": MSGS, "temperatur": 1}, 400, "temperatur"),
    ("tokenize both inputs", "POST", "/tokenize", {"prompt": "x", "messages": MSGS}, 400, None),
    ("detokenize bad ids", "POST", "/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
    ("unknown route", "GET", "/v1/nothing", None, 404, None),
    ("wrong method", "GET", COMP, None, 405, None),
]


def _send(url: str, method: str, path: str, body: object, headers: dict[str, str] | None = None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.mark.parametrize(("name", "method", "path", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_malformed_request(fake_server, name, method, path, body, status, param):
    code, _, raw = _send(fake_server.url, method, path, body)
    assert code == status, raw
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain; charset=utf-8"])
def test_a_body_not_sent_as_json_is_refused(fake_server, content_type):
    """`curl -d` without `-H 'Content-Type: application/json'` sends a form: refused as OpenAI does."""
    req = urllib.request.Request(
        fake_server.url + CHAT, data=json.dumps({"messages": MSGS}).encode(), headers={"Content-Type": content_type}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 415
    err = json.loads(e.value.read())["error"]
    assert err["code"] == "unsupported_content_type" and err["type"] == "invalid_request_error"
    assert content_type.split(";")[0] in err["message"] and "Content-Type: application/json" in err["message"]


def test_an_assistant_turn_may_omit_its_content(fake_server):
    messages = [*MSGS, {"role": "assistant", "content": None}, {"role": "user", "content": "again"}]
    code, _, raw = _send(fake_server.url, "POST", CHAT, {"messages": messages, "max_tokens": 2})
    assert code == 200, raw


def test_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_huge_body_is_413(fake_server):
    big = {"prompt": "x" * (9 * 1024 * 1024)}
    code, _, raw = _send(fake_server.url, "POST", COMP, big)
    assert code == 413
    assert json.loads(raw)["error"]["code"] == "request_too_large"


def test_server_keeps_serving_after_bad_input(fake_server):
    code, _, raw = _send(fake_server.url, "POST", COMP, {"prompt": "still alive", "max_tokens": 2})
    assert code == 200 and json.loads(raw)["choices"][0]["text"]


def test_engine_refusal_is_400_also_when_streaming(fake_server):
    for stream in (False, True):
        code, _, raw = _send(fake_server.url, "POST", COMP, {"prompt": "REFUSE this", "stream": stream})
        assert code == 400, raw
        assert "refused" in json.loads(raw)["error"]["message"]
