"""Reasoning parsers, alone and in front of a tool-call parser, whole and streamed in many cuts."""

from __future__ import annotations

import itertools
import json

import pytest
from parser_splits import all_splits

from kubellm.engine.server.chat_output import ChatOutputParser, parse_stream
from kubellm.engine.server.reasoning_parsers import REASONING_PARSERS, make_reasoning_parser
from kubellm.engine.server.tool_parsers import TOOL_PARSERS

QWEN3_THINKING_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
QWEN3_NO_THINK_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
PLAIN_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

# (reasoning parser, prompt, chat_template_kwargs, tool parser or None, output, reasoning, content, calls)
CASES = [
    (
        "deepseek_r1",
        "",
        None,
        None,
        "<think>\nThe user greets.\n</think>\n\nHello!",
        "\nThe user greets.\n",
        "Hello!",
        [],
    ),
    ("deepseek_r1", "", None, None, "No opening tag here.</think>Hello!", "No opening tag here.", "Hello!", []),
    ("deepseek_r1", "", None, None, "<think>Cut off while still thinking", "Cut off while still thinking", None, []),
    ("qwen3", QWEN3_THINKING_PROMPT, None, None, "Greeting.\n</think>\n\nHi there!", "Greeting.\n", "Hi there!", []),
    ("qwen3", PLAIN_PROMPT, None, None, "<think>\nHmm.\n</think>\n\nHi!", "\nHmm.\n", "Hi!", []),
    (
        "qwen3",
        PLAIN_PROMPT,
        None,
        None,
        "Hi! 1 < 2 </think> is text here.",
        None,
        "Hi! 1 < 2 </think> is text here.",
        [],
    ),
    ("qwen3", QWEN3_NO_THINK_PROMPT, None, None, "Hi!", None, "Hi!", []),
    ("glm45", PLAIN_PROMPT, None, None, "<think>Plan.</think>\nAnswer.", "Plan.", "Answer.", []),
    ("kimi_k2", "", None, None, "<think>Plan it.</think>Done.", "Plan it.", "Done.", []),
    ("kimi_k2", "", {"thinking": False}, None, "<think>not parsed</think>", None, "<think>not parsed</think>", []),
    ("deepseek_v3", "", None, None, "<think>x</think>y", None, "<think>x</think>y", []),
    ("deepseek_v3", "", {"thinking": True}, None, "x</think>y", "x", "y", []),
    # with tools: reasoning is never parsed for calls
    (
        "qwen3",
        QWEN3_THINKING_PROMPT,
        None,
        "hermes",
        'I could write <tool_call>\n{"name": "fake", "arguments": {}}\n</tool_call> but should not.\n</think>\n\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        'I could write <tool_call>\n{"name": "fake", "arguments": {}}\n</tool_call> but should not.\n',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "kimi_k2",
        "",
        None,
        "kimi_k2",
        "Need the weather.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>',
        "Need the weather.",
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "deepseek_r1",
        "",
        None,
        "deepseek_v31",
        "<think>Use the tool.</think>Checking.<\uff5ctool\u2581calls\u2581begin\uff5c>"
        "<\uff5ctool\u2581call\u2581begin\uff5c>"
        'get_weather<\uff5ctool\u2581sep\uff5c>{"city": "Oslo"}<\uff5ctool\u2581call\u2581end\uff5c>'
        "<\uff5ctool\u2581calls\u2581end\uff5c>",
        "Use the tool.",
        "Checking.",
        [("get_weather", {"city": "Oslo"})],
    ),
]


def _parser(reasoning: str, prompt: str, kwargs: dict | None, tools: str | None) -> ChatOutputParser:
    counter = itertools.count()
    tool_parser = TOOL_PARSERS[tools](None, make_id=lambda: f"call_{next(counter)}") if tools else None
    return ChatOutputParser(make_reasoning_parser(reasoning, prompt, kwargs), tool_parser)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}+{c[3]}: {c[4][:30]!r}" for c in CASES])
def test_whole_and_streamed(case: tuple) -> None:
    name, prompt, kwargs, tools, text, reasoning, content, calls = case
    whole = parse_stream(_parser(name, prompt, kwargs, tools), [text])
    assert (whole.reasoning, whole.content) == (reasoning, content)
    assert [(t.name, json.loads(t.arguments)) for t in whole.tool_calls] == calls
    for label, chunks in all_splits(text):
        assert parse_stream(_parser(name, prompt, kwargs, tools), chunks) == whole, label


def test_reasoning_streams_before_the_end_tag_arrives() -> None:
    p = _parser("deepseek_r1", "", None, None)
    assert p.feed("<think>Step one. ").reasoning == "Step one. "
    out = p.feed("Step two.</thi")
    assert (out.reasoning, out.content) == ("Step two.", "")
    out = p.feed("nk>Answer")
    assert (out.reasoning, out.content) == ("", "Answer")


def test_names_and_unknown_name() -> None:
    assert set(REASONING_PARSERS) == {"deepseek_r1", "deepseek_v3", "qwen3", "glm45", "kimi_k2"}
    with pytest.raises(ValueError, match="unknown reasoning parser 'nope'"):
        make_reasoning_parser("nope")
