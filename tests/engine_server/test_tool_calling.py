"""Tool calling through the server with the official openai client: tools in the chat template, the model's
output through the parser named by --tool-call-parser (and --reasoning-parser), streamed and not.

`tool_choice: auto` runs against a transcript-replaying model (replay_model.py) so that the exact text the parser
sees is known; the expected messages are written out here by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from replay_model import replay_engine
from server_harness import ServerThread

from kubellm.engine.server.api_server import ServerSettings
from kubellm.engine.server.chat_tools import ChatParsingConfig

HERMES_TEMPLATE = Path(__file__).parents[2] / "examples" / "tool_chat_template_hermes.jinja"
MODEL = "replay"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
        },
    },
]

CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
CALL_TOKYO = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call>'
TRANSCRIPTS = {
    "case-one-call": "Let me check the forecast.\n" + CALL_PARIS,
    "case-two-calls": CALL_PARIS + "\n" + CALL_TOKYO,
    "case-malformed": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
    "case-thinking": "<think>\nThe user wants the weather: call get_weather.\n</think>\n\n" + CALL_PARIS,
    "case-plain": "It is sunny in Paris <b>today</b>.",
}


@pytest.fixture(scope="module")
def replay_server():
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        served_model_names=[MODEL],
        chat_parsing=ChatParsingConfig(
            tool_call_parser="hermes", reasoning_parser="qwen3", enable_auto_tool_choice=True
        ),
    )
    st = ServerThread(lambda: replay_engine(TRANSCRIPTS, HERMES_TEMPLATE.read_text()), settings).start()
    yield st
    st.stop()


@pytest.fixture(scope="module")
def client(replay_server):
    c = openai.OpenAI(base_url=replay_server.url + "/v1", api_key="none", max_retries=0)
    yield c
    c.close()


def _ask(case: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the weather in Paris? ({case})"}]


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def _streamed(client: openai.OpenAI, **kwargs):
    """The completion the openai client's stream helper rebuilds from the chunks."""
    with client.chat.completions.stream(model=MODEL, **kwargs) as stream:
        return stream.get_final_completion()


@pytest.mark.parametrize(
    ("case", "content", "calls", "reasoning", "finish"),
    [
        (
            "case-one-call",
            "Let me check the forecast.\n",
            [("get_weather", {"city": "Paris", "days": 2})],
            None,
            "tool_calls",
        ),
        (
            "case-two-calls",
            None,
            [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "Asia/Tokyo"})],
            None,
            "tool_calls",
        ),
        (
            "case-thinking",
            None,
            [("get_weather", {"city": "Paris", "days": 2})],
            "\nThe user wants the weather: call get_weather.\n",
            "tool_calls",
        ),
        ("case-plain", "It is sunny in Paris <b>today</b>.", [], None, "stop"),
    ],
)
def test_auto_tool_choice_parses_the_model_output_streamed_and_not(client, case, content, calls, reasoning, finish):
    whole = client.chat.completions.create(model=MODEL, messages=_ask(case), tools=TOOLS)
    choice = whole.choices[0]
    assert choice.message.content == content
    assert _calls(choice.message) == calls
    assert (choice.message.model_extra or {}).get("reasoning_content") == reasoning
    assert choice.finish_reason == finish
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls or [])

    streamed = _streamed(client, messages=_ask(case), tools=TOOLS).choices[0]
    assert streamed.message.content == content
    assert _calls(streamed.message) == calls
    assert [c.function.arguments for c in streamed.message.tool_calls or []] == [
        c.function.arguments for c in choice.message.tool_calls or []
    ]
    assert streamed.finish_reason == finish


def test_stream_deltas_are_shaped_as_openai_sends_them(client):
    """The call's header first (index, id, type, name, empty arguments), then its arguments in pieces as they are
    generated, joining into the non-streamed response's arguments exactly."""
    chunks = list(client.chat.completions.create(model=MODEL, messages=_ask("case-one-call"), tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    text = "".join(d.content or "" for d in deltas)
    assert text == "Let me check the forecast.\n"
    call_deltas = [tc for d in deltas for tc in d.tool_calls or []]
    first, *rest = call_deltas
    header = (first.index, first.type, first.function.name, first.function.arguments)
    assert header == (0, "function", "get_weather", "")
    assert first.id and all(tc.index == 0 and tc.id is None and tc.function.name is None for tc in rest)
    pieces = [tc.function.arguments for tc in rest]
    whole = client.chat.completions.create(model=MODEL, messages=_ask("case-one-call"), tools=TOOLS)
    assert "".join(pieces) == whole.choices[0].message.tool_calls[0].function.arguments
    assert json.loads("".join(pieces)) == {"city": "Paris", "days": 2}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_arguments_reach_the_client_while_the_call_is_still_being_generated(client, replay_server):
    """`tool_choice: auto`, streamed: with the model stopped in the middle of the call's arguments, the client
    already has the call's header and the arguments written so far; the rest follows once the model goes on."""
    upto = 'Let me check the forecast.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    release = replay_server.engine.runner.hold("case-one-call", upto)
    try:
        stream = client.chat.completions.create(model=MODEL, messages=_ask("case-one-call"), tools=TOOLS, stream=True)
        chunks = iter(stream)
        names, arguments = [], ""
        while '"Par' not in arguments:  # a positive event: the client's read times out if it never comes
            for tc in next(chunks).choices[0].delta.tool_calls or []:
                names += [tc.function.name] if tc.function.name else []
                arguments += tc.function.arguments or ""
        assert names == ["get_weather"] and arguments.startswith('{"city": "Par')
        assert arguments != '{"city": "Paris", "days": 2}', "sent before the model wrote the rest"
    finally:
        release.set()
    for chunk in chunks:
        deltas = chunk.choices[0].delta.tool_calls if chunk.choices else None
        arguments += "".join(tc.function.arguments or "" for tc in deltas or [])
    assert arguments == '{"city": "Paris", "days": 2}'


def test_a_malformed_call_is_content_whole_and_the_call_sent_so_far_streamed(client):
    """Non-streamed, the call whose object is not closed is returned as the text it is. Streamed, its header and
    arguments went out before that could be known, so the stream carries the call as far as it was sent."""
    whole = client.chat.completions.create(model=MODEL, messages=_ask("case-malformed"), tools=TOOLS).choices[0]
    assert (whole.message.content, _calls(whole.message), whole.finish_reason) == (
        TRANSCRIPTS["case-malformed"],
        [],
        "stop",
    )
    streamed = _streamed(client, messages=_ask("case-malformed"), tools=TOOLS).choices[0]
    assert streamed.message.content is None
    assert _calls(streamed.message) == [("get_weather", {"city": "Paris"})]
    assert streamed.finish_reason == "tool_calls"


def test_reasoning_streams_separately_from_content(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=_ask("case-thinking"), tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta.model_extra or {} for c in chunks if c.choices]
    assert (
        "".join(d.get("reasoning_content") or "" for d in deltas) == "\nThe user wants the weather: call get_weather.\n"
    )
    assert "".join(d.get("reasoning") or "" for d in deltas) == "\nThe user wants the weather: call get_weather.\n"


def test_tool_choice_none_returns_the_text_unparsed(client):
    whole = client.chat.completions.create(model=MODEL, messages=_ask("case-one-call"), tools=TOOLS, tool_choice="none")
    assert whole.choices[0].message.content == TRANSCRIPTS["case-one-call"]
    assert not whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "stop"


def test_parallel_tool_calls_false_keeps_the_first_call(client):
    kwargs = {"messages": _ask("case-two-calls"), "tools": TOOLS, "parallel_tool_calls": False}
    whole = client.chat.completions.create(model=MODEL, **kwargs)
    assert _calls(whole.choices[0].message) == [("get_weather", {"city": "Paris", "days": 2})]
    assert _calls(_streamed(client, **kwargs).choices[0].message) == [("get_weather", {"city": "Paris", "days": 2})]


def test_max_tokens_mid_call_returns_the_text_as_content(client, replay_server):
    prefix = "Let me check the forecast.\n"
    renderer = replay_server.engine.renderer
    budget = len(renderer.encode(prefix + CALL_PARIS, add_special_tokens=False)) - 5
    whole = client.chat.completions.create(model=MODEL, messages=_ask("case-one-call"), tools=TOOLS, max_tokens=budget)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith(prefix + '<tool_call>\n{"name": "get_weather"')
    assert len(choice.message.content) < len(prefix + CALL_PARIS)


def test_the_served_chat_template_is_the_one_given_so_routers_render_with_it(replay_server):
    info = httpx.get(replay_server.url + "/v1/tokenizer_info").json()
    assert info["chat_template"] == HERMES_TEMPLATE.read_text()


def test_tool_history_is_rendered_by_the_template(replay_server):
    call = {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [
        {"role": "user", "content": "Weather in Oslo? (case-plain)"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_7", "content": '{"temp_c": -3}'},
    ]
    ids = httpx.post(replay_server.url + "/tokenize", json={"messages": messages, "tools": TOOLS}).json()["tokens"]
    text = httpx.post(replay_server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp_c": -3}\n</tool_response>' in text


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "name"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "more than once: get_weather"),
    ],
)
def test_bad_tool_requests_get_a_400_naming_the_field(client, body, param, message):
    kwargs = {"tools": TOOLS, **body}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_ask("case-plain"), **kwargs)
    assert e.value.body["param"] == param or param in e.value.body["message"]
    assert message in e.value.body["message"]


def test_an_answer_sent_back_in_the_history_is_accepted_and_rendered(client, replay_server):
    answer = client.chat.completions.create(model=MODEL, messages=_ask("case-thinking"), tools=TOOLS).choices[0]
    call = answer.message.tool_calls[0]
    history = [
        *_ask("case-thinking"),
        answer.message.model_dump(exclude_none=True),  # as clients append it: reasoning, tool_calls and all
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    r = httpx.post(replay_server.url + "/tokenize", json={"messages": history, "tools": TOOLS})
    assert r.status_code == 200, r.text
    text = httpx.post(replay_server.url + "/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text


def test_each_of_n_choices_is_parsed_on_its_own(client):
    kwargs = {"messages": _ask("case-one-call"), "tools": TOOLS, "n": 2}
    whole = client.chat.completions.create(model=MODEL, **kwargs)
    streamed = _streamed(client, **kwargs)
    for choices in (whole.choices, streamed.choices):
        assert [c.index for c in choices] == [0, 1]
        for c in choices:
            assert c.message.content == "Let me check the forecast.\n"
            assert _calls(c.message) == [("get_weather", {"city": "Paris", "days": 2})]
            assert c.finish_reason == "tool_calls"


def test_history_arguments_nested_too_deep_to_parse_are_rendered_as_sent(replay_server):
    deep = "[" * 100_000 + "]" * 100_000
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": deep}}
    messages = [
        {"role": "user", "content": "Weather? (case-plain)"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    r = httpx.post(replay_server.url + "/tokenize", json={"messages": messages, "tools": TOOLS}, timeout=60)
    assert r.status_code == 200, r.text[:300]


def test_an_answer_cut_while_reasoning_has_reasoning_and_no_content(client):
    kwargs = {"messages": _ask("case-thinking"), "tools": TOOLS, "max_tokens": 4}
    whole = client.chat.completions.create(model=MODEL, **kwargs).choices[0]
    assert whole.finish_reason == "length" and whole.message.content is None
    reasoning = whole.message.model_extra["reasoning"]
    assert reasoning and "\nThe user wants the weather: call get_weather.\n".startswith(reasoning)
    # the stream helper refuses length-cut answers, so the chunks are read as they come
    chunks = [c for c in client.chat.completions.create(model=MODEL, stream=True, **kwargs) if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    assert all(d.content is None for d in deltas)
    assert "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas) == reasoning
    assert chunks[-1].choices[0].finish_reason == "length"
