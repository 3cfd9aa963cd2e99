"""Forced tool choices on the real embedded model: `kubellm serve --chat-template <Hermes-style tools template>`,
the official openai client. `required` and a named function constrain the output to the tools' parameter
schemas, so every call's arguments validate, sampled or not, streamed or not; `auto` goes through the hermes
parser on real model output when the request constrains that output to a call."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

HERMES_TEMPLATE = Path(__file__).parents[2] / "examples" / "tool_chat_template_hermes.jinja"

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Tokyo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city"],
    "additionalProperties": False,  # as strict tools declare them: the model cannot ramble into extra keys
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 24}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather forecast for a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a zone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTIONS = ["What's the weather in Paris for the next 3 days?", "What time is it in Tokyo right now?"]


@pytest.fixture(scope="module")
def serve_args():
    return (
        "--device", "cpu", "--max-num-seqs", "8", "--served-model-name", "smollm2",
        "--chat-template", str(HERMES_TEMPLATE), "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    )  # fmt: skip


def _ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def _valid_calls(choice) -> list[tuple[str, str]]:
    calls = choice.message.tool_calls or []
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [(c.function.name, c.function.arguments) for c in calls]


def test_required_always_returns_calls_that_validate(openai_client):
    for seed, question in enumerate(QUESTIONS):  # sampled, so each seed takes its own path through the schema
        kwargs = {"messages": _ask(question), "tools": TOOLS, "tool_choice": "required", "max_tokens": 80}
        whole = openai_client.chat.completions.create(model="smollm2", temperature=1.0, seed=seed, **kwargs).choices[0]
        calls = _valid_calls(whole)
        assert calls and whole.finish_reason == "tool_calls" and whole.message.content is None
        with openai_client.chat.completions.stream(model="smollm2", temperature=1.0, seed=seed, **kwargs) as stream:
            streamed = stream.get_final_completion().choices[0]
        assert _valid_calls(streamed) == calls
        assert streamed.finish_reason == "tool_calls"


def test_named_choice_returns_one_call_of_that_function(openai_client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    for seed, question in enumerate(QUESTIONS[:1]):
        kwargs = {"messages": _ask(question), "tools": TOOLS, "tool_choice": choice, "max_tokens": 80}
        whole = openai_client.chat.completions.create(model="smollm2", temperature=1.0, seed=seed, **kwargs).choices[0]
        calls = _valid_calls(whole)
        assert [name for name, _ in calls] == ["get_time"]
        with openai_client.chat.completions.stream(model="smollm2", temperature=1.0, seed=seed, **kwargs) as stream:
            assert _valid_calls(stream.get_final_completion().choices[0]) == calls


def test_required_without_parallel_calls_returns_one(openai_client):
    whole = openai_client.chat.completions.create(
        model="smollm2",
        messages=_ask("Weather in Oslo and the time in Tokyo?"),
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    ).choices[0]
    assert len(_valid_calls(whole)) == 1


def test_auto_parses_real_model_output_constrained_to_a_call(openai_client):
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
    whole = openai_client.chat.completions.create(
        model="smollm2",
        messages=_ask("Weather in Oslo?"),
        tools=TOOLS,
        max_tokens=60,
        extra_body={"structured_outputs": {"choice": [call_text]}},
    ).choices[0]
    assert _valid_calls(whole) == [("get_weather", '{"city": "Oslo", "days": 2}')]
    assert whole.message.content is None and whole.finish_reason == "tool_calls"


def test_forced_choice_with_another_output_constraint_is_a_400(openai_client):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(
            model="smollm2",
            messages=_ask("Weather?"),
            tools=TOOLS,
            tool_choice="required",
            response_format={"type": "json_object"},
        )
    assert e.value.body["param"] == "response_format" and "forced tool_choice" in e.value.body["message"]
