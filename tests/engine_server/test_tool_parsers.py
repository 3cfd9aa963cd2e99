"""Tool-call parsers against transcripts in each model's own output format.

Each transcript is what the model writes (per its published chat template); the expected content and calls are
written out by hand for the non-streamed message. Every transcript is also streamed in many different cuts: the
rebuilt message is the same for every cut, and equals the non-streamed one wherever the calls are well-formed (a
streamed call's arguments go out before its end is known, so a broken one cannot be turned back into content).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parser_splits import all_splits

from kubellm.engine.server.chat_output import parse_stream
from kubellm.engine.server.chat_tools import ToolPlan, forced_calls_schema
from kubellm.engine.server.tool_parsers import TOOL_PARSERS, ParsedMessage, ToolParser
from kubellm.engine.server.tool_parsers.forced import NamedCallParser, RequiredCallsParser
from kubellm.engine.server.tool_parsers.json_stream import JsonObjectStream

DS_CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
DS_CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
DS_CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
DS_CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
DS_SEP = "<\uff5ctool\u2581sep\uff5c>"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
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
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "filter": {"type": "object"}, "note": {"type": "string"}},
            },
        },
    },
]

NESTED = {"filter": {"tags": ["a", "b"], "range": {"min": 1, "max": 2.5}, "ok": True, "none": None}}
TRICKY = 'He said "hi" \\ — 東京 🌧 {not json}'


@dataclass
class Case:
    parser: str
    label: str
    text: str
    content: str | None
    calls: list[tuple[str, dict[str, Any]]]
    ids: list[str] | None = None  # ids the model itself writes (Kimi-K2); otherwise the parser's own
    streamed_as_whole: bool = True  # False: a broken call streamed as far as it went (test_streamed_broken_calls)


def _cases() -> list[Case]:
    c: list[Case] = []
    # hermes (Qwen2.5 / Qwen3 template: one JSON object per <tool_call> block)
    c += [
        Case(
            "hermes",
            "single",
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
            None,
            [("get_weather", {"city": "Paris"})],
        ),
        Case(
            "hermes",
            "parallel after text",
            "Let me check both.\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>',
            "Let me check both.\n",
            [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Tokyo"})],
        ),
        Case(
            "hermes",
            "nested json, unicode and escaped quotes",
            '<tool_call>\n{"name": "search", "arguments": {"filter": {"tags": ["a", "b"], "range": {"min": 1, '
            '"max": 2.5}, "ok": true, "none": null}, "note": "He said \\"hi\\" \\\\ — 東京 🌧 {not json}"}}'
            "\n</tool_call>",
            None,
            [("search", {**NESTED, "note": TRICKY})],
        ),
        Case(
            "hermes",
            "cut by max_tokens mid-call",
            'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"ci',
            'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"ci',
            [],
            streamed_as_whole=False,
        ),
        Case(
            "hermes",
            "malformed json is content, the good call after it still parses",
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\nDone.',
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>\nDone.',
            [("get_weather", {"city": "Rome"})],
            streamed_as_whole=False,
        ),
        Case("hermes", "plain answer", "The capital of France is Paris.", "The capital of France is Paris.", []),
        Case(
            "hermes",
            "a call without a name is content",
            '<tool_call>\n{"arguments": {}}\n</tool_call>',
            '<tool_call>\n{"arguments": {}}\n</tool_call>',
            [],
        ),
    ]
    # qwen3_coder (Qwen3-Coder template: <function=NAME> with <parameter=KEY> blocks, values as plain text)
    c += [
        Case(
            "qwen3_coder",
            "single",
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
            "</parameter>\n</function>\n</tool_call>",
            None,
            [("get_weather", {"city": "Paris", "days": 3})],
        ),
        Case(
            "qwen3_coder",
            "parallel after text",
            "I'll look these up.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "</function>\n</tool_call>\n<tool_call>\n<function=search>\n<parameter=query>\nbest café\n</parameter>\n"
            "</function>\n</tool_call>",
            "I'll look these up.\n",
            [("get_weather", {"city": "Paris"}), ("search", {"query": "best café"})],
        ),
        Case(
            "qwen3_coder",
            "nested json, unicode and quotes (string parameters stay text)",
            "<tool_call>\n<function=search>\n<parameter=filter>\n"
            '{"tags": ["a", "b"], "range": {"min": 1, "max": 2.5}, "ok": true, "none": null}\n</parameter>\n'
            '<parameter=note>\nHe said "hi" \\ — 東京 🌧 {not json}\n</parameter>\n<parameter=query>\n42\n'
            "</parameter>\n</function>\n</tool_call>",
            None,
            [("search", {**NESTED, "note": TRICKY, "query": "42"})],
        ),
        Case(
            "qwen3_coder",
            "cut by max_tokens mid-call",
            "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
            "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
            [],
            streamed_as_whole=False,
        ),
        Case(
            "qwen3_coder",
            "malformed (parameter never closed)",
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
            [],
            streamed_as_whole=False,
        ),
    ]
    # glm45 (GLM-4.5 template: name, then <arg_key>/<arg_value> pairs)
    c += [
        Case(
            "glm45",
            "single",
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
            None,
            [("get_weather", {"city": "北京", "days": 2})],
        ),
        Case(
            "glm45",
            "parallel after text",
            "Checking two cities.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
            "</tool_call>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Tokyo</arg_value>\n</tool_call>",
            "Checking two cities.\n",
            [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})],
        ),
        Case(
            "glm45",
            "nested json, unicode and quotes",
            "<tool_call>search\n<arg_key>filter</arg_key>\n<arg_value>"
            '{"tags": ["a", "b"], "range": {"min": 1, "max": 2.5}, "ok": true, "none": null}</arg_value>\n'
            '<arg_key>note</arg_key>\n<arg_value>He said "hi" \\ — 東京 🌧 {not json}</arg_value>\n</tool_call>',
            None,
            [("search", {**NESTED, "note": TRICKY})],
        ),
        Case(
            "glm45",
            "cut by max_tokens mid-call",
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_val",
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_val",
            [],
            streamed_as_whole=False,
        ),
        Case(
            "glm45",
            "malformed (key without value)",
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n</tool_call>",
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n</tool_call>",
            [],
            streamed_as_whole=False,
        ),
    ]
    # kimi_k2 (section of calls, ids written by the model)
    kb, ke = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
    cb, ab, ce = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
    c += [
        Case(
            "kimi_k2",
            "single",
            f'{kb}{cb}functions.get_weather:0{ab}{{"city": "Paris"}}{ce}{ke}',
            None,
            [("get_weather", {"city": "Paris"})],
            ["functions.get_weather:0"],
        ),
        Case(
            "kimi_k2",
            "parallel after text",
            f'Let me check.{kb}{cb}functions.get_weather:0{ab}{{"city": "Paris"}}{ce}'
            f'{cb}functions.search:1{ab}{{"query": "rain"}}{ce}{ke}',
            "Let me check.",
            [("get_weather", {"city": "Paris"}), ("search", {"query": "rain"})],
            ["functions.get_weather:0", "functions.search:1"],
        ),
        Case(
            "kimi_k2",
            "nested json, unicode and escaped quotes",
            f"{kb}{cb}functions.search:0{ab}"
            + json.dumps({**NESTED, "note": TRICKY}, ensure_ascii=False)
            + f"{ce}{ke}",
            None,
            [("search", {**NESTED, "note": TRICKY})],
            ["functions.search:0"],
        ),
        Case(
            "kimi_k2",
            "cut by max_tokens mid-call",
            f'Hmm.{kb}{cb}functions.get_weather:0{ab}{{"city": "Pa',
            f'Hmm.{cb}functions.get_weather:0{ab}{{"city": "Pa',
            [],
            streamed_as_whole=False,
        ),
        Case(
            "kimi_k2",
            "malformed arguments",
            f'{kb}{cb}functions.get_weather:0{ab}{{"city": Paris}}{ce}{ke}',
            f'{cb}functions.get_weather:0{ab}{{"city": Paris}}{ce}',
            [],
            streamed_as_whole=False,
        ),
    ]
    # deepseek_v3 (function<sep>NAME then a fenced json block)
    c += [
        Case(
            "deepseek_v3",
            "single",
            f'{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}get_weather\n```json\n{{"city": "Paris"}}\n```'
            f"{DS_CALL_END}{DS_CALLS_END}",
            None,
            [("get_weather", {"city": "Paris"})],
        ),
        Case(
            "deepseek_v3",
            "parallel after text",
            f'I will check.\n\n{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}get_weather\n```json\n{{"city": "Paris"}}'
            f'\n```{DS_CALL_END}\n{DS_CALL_BEGIN}function{DS_SEP}search\n```json\n{{"query": "rain"}}\n```'
            f"{DS_CALL_END}{DS_CALLS_END}",
            "I will check.\n\n",
            [("get_weather", {"city": "Paris"}), ("search", {"query": "rain"})],
        ),
        Case(
            "deepseek_v3",
            "nested json, unicode and escaped quotes",
            f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}search\n```json\n"
            + json.dumps({**NESTED, "note": TRICKY}, ensure_ascii=False, indent=2)
            + f"\n```{DS_CALL_END}{DS_CALLS_END}",
            None,
            [("search", {**NESTED, "note": TRICKY})],
        ),
        Case(
            "deepseek_v3",
            "cut by max_tokens mid-call",
            f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}get_weather\n```json\n{{",
            f"{DS_CALL_BEGIN}function{DS_SEP}get_weather\n```json\n{{",
            [],
            streamed_as_whole=False,
        ),
        Case(
            "deepseek_v3",
            "malformed (no json fence)",
            f'{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}get_weather\n{{"city": "Paris"}}'
            f"{DS_CALL_END}{DS_CALLS_END}",
            f'{DS_CALL_BEGIN}function{DS_SEP}get_weather\n{{"city": "Paris"}}{DS_CALL_END}',
            [],
        ),
    ]
    # deepseek_v31 (NAME<sep>JSON)
    c += [
        Case(
            "deepseek_v31",
            "single",
            f'{DS_CALLS_BEGIN}{DS_CALL_BEGIN}get_weather{DS_SEP}{{"city": "Paris"}}{DS_CALL_END}{DS_CALLS_END}',
            None,
            [("get_weather", {"city": "Paris"})],
        ),
        Case(
            "deepseek_v31",
            "parallel after text",
            f'Checking.{DS_CALLS_BEGIN}{DS_CALL_BEGIN}get_weather{DS_SEP}{{"city": "Paris"}}{DS_CALL_END}'
            f'{DS_CALL_BEGIN}search{DS_SEP}{{"query": "rain"}}{DS_CALL_END}{DS_CALLS_END}',
            "Checking.",
            [("get_weather", {"city": "Paris"}), ("search", {"query": "rain"})],
        ),
        Case(
            "deepseek_v31",
            "nested json, unicode and escaped quotes",
            f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}search{DS_SEP}"
            + json.dumps({**NESTED, "note": TRICKY}, ensure_ascii=False)
            + f"{DS_CALL_END}{DS_CALLS_END}",
            None,
            [("search", {**NESTED, "note": TRICKY})],
        ),
        Case(
            "deepseek_v31",
            "cut by max_tokens mid-call",
            f'{DS_CALLS_BEGIN}{DS_CALL_BEGIN}get_weather{DS_SEP}{{"city": "Pa',
            f'{DS_CALL_BEGIN}get_weather{DS_SEP}{{"city": "Pa',
            [],
            streamed_as_whole=False,
        ),
        Case(
            "deepseek_v31",
            "malformed (no separator)",
            f'{DS_CALLS_BEGIN}{DS_CALL_BEGIN}get_weather{{"city": "Paris"}}{DS_CALL_END}{DS_CALLS_END}',
            f'{DS_CALL_BEGIN}get_weather{{"city": "Paris"}}{DS_CALL_END}',
            [],
        ),
    ]
    # llama3_json (the whole answer is JSON calls, optionally after <|python_tag|>, separated by ';')
    c += [
        Case(
            "llama3_json",
            "single",
            '{"name": "get_weather", "parameters": {"city": "Paris"}}',
            None,
            [("get_weather", {"city": "Paris"})],
        ),
        Case(
            "llama3_json",
            "parallel after the python tag",
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"name": "search", "parameters": {"query": "rain"}}',
            None,
            [("get_weather", {"city": "Paris"}), ("search", {"query": "rain"})],
        ),
        Case(
            "llama3_json",
            "text first: all content",
            'Sure! {"name": "get_weather", "parameters": {"city": "Paris"}}',
            'Sure! {"name": "get_weather", "parameters": {"city": "Paris"}}',
            [],
        ),
        Case(
            "llama3_json",
            "nested json, unicode and escaped quotes",
            json.dumps({"name": "search", "parameters": {**NESTED, "note": TRICKY}}, ensure_ascii=False),
            None,
            [("search", {**NESTED, "note": TRICKY})],
        ),
        Case(
            "llama3_json",
            "cut by max_tokens mid-call",
            '{"name": "get_weather", "parameters": {"city": "Par',
            '{"name": "get_weather", "parameters": {"city": "Par',
            [],
            streamed_as_whole=False,
        ),
        Case(
            "llama3_json",
            "a JSON answer that is not a call is content",
            '{"answer": 42, "unit": "}"}',
            '{"answer": 42, "unit": "}"}',
            [],
        ),
    ]
    # mistral (v11+: [TOOL_CALLS]NAME[ARGS]{...}; v3-v7: [TOOL_CALLS][{...}, ...])
    c += [
        Case(
            "mistral",
            "single (v11)",
            '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
            None,
            [("get_weather", {"city": "Paris"})],
        ),
        Case(
            "mistral",
            "parallel after text (v11)",
            'Let me see.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]search[ARGS]{"query": "rain"}',
            "Let me see.",
            [("get_weather", {"city": "Paris"}), ("search", {"query": "rain"})],
        ),
        Case(
            "mistral",
            "parallel (v3 array)",
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
            '{"name": "search", "arguments": {"query": "rain"}}]',
            None,
            [("get_weather", {"city": "Paris"}), ("search", {"query": "rain"})],
        ),
        Case(
            "mistral",
            "nested json, unicode and escaped quotes",
            "[TOOL_CALLS]search[ARGS]" + json.dumps({**NESTED, "note": TRICKY}, ensure_ascii=False),
            None,
            [("search", {**NESTED, "note": TRICKY})],
        ),
        Case(
            "mistral",
            "cut by max_tokens mid-call",
            'OK.[TOOL_CALLS]get_weather[ARGS]{"city": "Pa',
            'OK.[TOOL_CALLS]get_weather[ARGS]{"city": "Pa',
            [],
            streamed_as_whole=False,
        ),
        Case(
            "mistral",
            "malformed, then a good call",
            '[TOOL_CALLS]get weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}',
            '[TOOL_CALLS]get weather[ARGS]{"city": "Paris"}',
            [("get_weather", {"city": "Rome"})],
        ),
    ]
    return c


CASES = _cases()


def _parser(name: str) -> ToolParser:
    """The parser of a stream (arguments streamed where the format allows), with predictable call ids."""
    counter = itertools.count()
    return TOOL_PARSERS[name](TOOLS, make_id=lambda: f"call_{next(counter)}")


def _whole(name: str, text: str) -> ParsedMessage:
    """The non-streamed message: calls only whole."""
    parser = _parser(name)
    parser.stream_arguments = False
    return parse_stream(parser, [text])


def test_every_vllm_parser_name_is_registered() -> None:
    assert set(TOOL_PARSERS) == {
        "hermes",
        "qwen3_coder",
        "kimi_k2",
        "deepseek_v3",
        "deepseek_v31",
        "glm45",
        "llama3_json",
        "mistral",
    }


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parser}: {c.label}" for c in CASES])
def test_whole_output(case: Case) -> None:
    msg = _whole(case.parser, case.text)
    assert msg.content == case.content
    assert [(t.name, json.loads(t.arguments)) for t in msg.tool_calls] == case.calls
    if case.ids is not None:
        assert [t.id for t in msg.tool_calls] == case.ids
    else:
        assert len({t.id for t in msg.tool_calls}) == len(msg.tool_calls)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parser}: {c.label}" for c in CASES])
def test_streamed_equals_whole_for_every_split(case: Case) -> None:
    streamed = parse_stream(_parser(case.parser), [case.text])
    assert (streamed == _whole(case.parser, case.text)) is case.streamed_as_whole
    n = 0
    for label, chunks in all_splits(case.text):
        assert parse_stream(_parser(case.parser), chunks) == streamed, label
        n += 1
    assert n > 57


def test_streamed_broken_calls_keep_what_was_sent() -> None:
    """Streamed, a call is out once its name is: cut off, its arguments are what was generated; with the closing
    brace of its object missing, it is still the call its arguments made; not JSON after all, the rest of its
    arguments is the model's own text."""
    cut = parse_stream(_parser("hermes"), ['Checking.<tool_call>\n{"name": "get_weather", "arguments": {"ci'])
    assert (cut.content, [(t.name, t.arguments) for t in cut.tool_calls]) == ("Checking.", [("get_weather", '{"ci')])
    unclosed = next(c for c in CASES if c.label.startswith("malformed json is content"))
    msg = parse_stream(_parser("hermes"), [unclosed.text])
    assert (msg.content, [(t.name, json.loads(t.arguments)) for t in msg.tool_calls]) == (
        "Done.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})],
    )
    quoted = parse_stream(_parser("hermes"), ['<tool_call>\n{"name": "f", "arguments": {\'a\': 1}}\n</tool_call>'])
    assert (quoted.content, [(t.name, t.arguments) for t in quoted.tool_calls]) == (None, [("f", "{'a': 1}}\n")])


@pytest.mark.parametrize(
    ("parser", "text", "marker_start"),
    [
        ("hermes", "Let me check <b>bold</b> first.", "<tool_"),
        ("qwen3_coder", "One moment, <i>please</i>.", "<tool"),
        ("glm45", "Looking <up>.", "<tool_ca"),
        ("kimi_k2", "Sure <|thing|>.", "<|tool_calls_sec"),
        ("deepseek_v3", "Sure <｜other｜>.", "<\uff5ctool\u2581ca"),
        ("deepseek_v31", "Sure.", "<\uff5c"),
        ("mistral", "Fine [TOOL] done.", "[TOOL_"),
    ],
)
def test_text_streams_as_soon_as_it_cannot_start_a_marker(parser: str, text: str, marker_start: str) -> None:
    p = _parser(parser)
    out = p.feed(text + marker_start)
    assert out.content == text  # all of the text, none of the marker's beginning
    assert out.tool_calls == []


def test_a_call_streams_its_header_once_named_then_its_arguments_as_they_come() -> None:
    p = _parser("hermes")
    assert p.feed('<tool_call>\n{"name": "get_wea').tool_calls == []
    assert p.feed('ther", "arguments": ').tool_calls == [], "the arguments' object has not begun"
    out = [p.feed(piece).tool_calls for piece in ['{"ci', 'ty":"Par', 'is",', '"days":', "3", "}}\n", "</tool_call>"]]
    assert [[(d.index, d.id, d.name, d.arguments) for d in ds] for ds in out] == [
        [(0, "call_0", "get_weather", ""), (0, None, None, '{"ci')],
        [(0, None, None, 'ty": "Par')],  # re-spelt as the whole call spells it
        [(0, None, None, 'is", ')],
        [(0, None, None, '"days": ')],
        [],  # a number goes out once it has ended
        [(0, None, None, "3}")],
        [],
    ]
    whole = _whole(
        "hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris","days":3}}\n</tool_call>'
    )
    assert "".join(d.arguments for ds in out for d in ds) == whole.tool_calls[0].arguments


def test_a_call_not_shaped_name_then_arguments_object_still_streams_whole() -> None:
    p = _parser("hermes")
    assert p.feed('<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n').tool_calls == []
    assert [(d.name, d.arguments) for d in p.feed("</tool_call>").tool_calls] == [
        ("get_weather", ""),
        (None, '{"city": "Paris"}'),
    ]


def test_llama3_json_waits_for_the_first_character_before_deciding() -> None:
    p = _parser("llama3_json")
    assert p.feed("  ").content == ""
    assert p.feed("Hi").content == "  Hi"


# ---- forced calls (tool_choice required / named): the output is JSON constrained by forced_calls_schema ----

REQUIRED_OUTPUT = (
    '[{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}, '
    '{"name": "search", "parameters": {"filter": {"tags": ["a"]}, "note": "He said \\"hi\\" 東京"}}]'
)


def _forced(kind: str) -> ToolParser:
    counter = itertools.count()
    make_id = lambda: f"call_{next(counter)}"  # noqa: E731
    return (
        NamedCallParser("get_weather", TOOLS, make_id=make_id)
        if kind == "named"
        else RequiredCallsParser(TOOLS, make_id=make_id)
    )


def test_named_choice_streams_the_header_first_then_the_arguments_as_written() -> None:
    p = _forced("named")
    first = p.feed('{"city": "Pa')
    assert [(d.index, d.id, d.name, d.arguments) for d in first.tool_calls] == [
        (0, "call_0", "get_weather", ""),
        (0, None, None, '{"city": "Pa'),
    ]
    assert [(d.id, d.arguments) for d in p.feed('ris"}').tool_calls] == [(None, 'ris"}')]
    assert p.finish().tool_calls == []
    whole = parse_stream(_forced("named"), ['{"city": "Paris"}'])
    assert (whole.content, [(t.name, t.arguments) for t in whole.tool_calls]) == (
        None,
        [("get_weather", '{"city": "Paris"}')],
    )
    for label, chunks in all_splits('{"city": "Paris", "days": 3}'):
        assert parse_stream(_forced("named"), chunks) == parse_stream(
            _forced("named"), ['{"city": "Paris", "days": 3}']
        ), label


def test_required_choice_emits_each_call_when_its_object_closes() -> None:
    p = _forced("required")
    first_end = REQUIRED_OUTPUT.index("}}") + 2
    out = p.feed(REQUIRED_OUTPUT[: first_end - 1])
    assert out.tool_calls == []
    out = p.feed(REQUIRED_OUTPUT[first_end - 1 : first_end])
    assert [(d.name, d.arguments and json.loads(d.arguments)) for d in out.tool_calls] == [
        ("get_weather", ""),
        (None, {"city": "Paris", "days": 2}),
    ]
    whole = parse_stream(_forced("required"), [REQUIRED_OUTPUT])
    assert whole.content is None
    assert [(t.name, json.loads(t.arguments)) for t in whole.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("search", {"filter": {"tags": ["a"]}, "note": 'He said "hi" 東京'}),
    ]
    for label, chunks in all_splits(REQUIRED_OUTPUT):
        assert parse_stream(_forced("required"), chunks) == whole, label
    first_cut = REQUIRED_OUTPUT[:30]  # max_tokens inside the first call: the text as written
    assert parse_stream(_forced("required"), [first_cut]).content == first_cut
    cut = parse_stream(_forced("required"), [REQUIRED_OUTPUT[:-20]])  # max_tokens inside the second call
    assert [t.name for t in cut.tool_calls] == ["get_weather"]
    assert cut.content == REQUIRED_OUTPUT[REQUIRED_OUTPUT.index('{"name": "search"') : -20]


def test_forced_calls_schema_accepts_exactly_the_calls_the_tools_allow() -> None:
    plan = ToolPlan("required", TOOLS)
    schema = forced_calls_schema(plan)
    jsonschema.validate(json.loads(REQUIRED_OUTPUT), schema)
    for bad in (
        [],
        [{"name": "nope", "parameters": {}}],
        [{"name": "get_weather", "parameters": {"days": 2}}],  # city is required
        [{"name": "get_weather", "parameters": {"city": "Paris"}, "extra": 1}],
        {"name": "get_weather", "parameters": {"city": "Paris"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = forced_calls_schema(ToolPlan("required", TOOLS, parallel=False))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(REQUIRED_OUTPUT), single)
    assert forced_calls_schema(ToolPlan("named", TOOLS, function="search")) == TOOLS[1]["function"]["parameters"]
    assert forced_calls_schema(ToolPlan("auto", TOOLS)) is None


DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser goes (it raises RecursionError)


@pytest.mark.parametrize(
    ("parser", "opening", "closing"),
    [
        ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": ', "}}\n</tool_call>"),
        ("mistral", "[TOOL_CALLS][", "]"),
        ("llama3_json", '{"name": "f", "parameters": {"a": ', "}}"),
    ],
)
def test_nesting_too_deep_to_parse_is_content_not_an_error(parser: str, opening: str, closing: str) -> None:
    text = opening + DEEP + closing
    msg = _whole(parser, text)
    assert (msg.content, msg.tool_calls) == (text, [])
    parse_stream(_parser(parser), [text])  # streamed (hermes streams the arguments) it is no error either


def test_a_parameter_value_too_deep_to_parse_stays_text() -> None:
    text = f"<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>{DEEP}</arg_value>\n</tool_call>"
    msg = parse_stream(_parser("glm45"), [text])
    assert [(t.name, json.loads(t.arguments)) for t in msg.tool_calls] == [("f", {"a": DEEP})]


# ---- the re-spelling of streamed arguments -------------------------------------------------------------------

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    obj=st.dictionaries(st.text(max_size=6), _JSON_VALUES, max_size=5),
    spelling=st.sampled_from([{}, {"indent": 2}, {"separators": (",", ":")}, {"ensure_ascii": False}]),
    cuts=st.lists(st.integers(min_value=1, max_value=7), max_size=200),
)
def test_streamed_arguments_concatenate_to_the_whole_calls_spelling(obj, spelling, cuts) -> None:
    """However a model spells the arguments object and however the text is cut, the pieces streamed join into
    exactly the arguments a non-streamed response carries: json.dumps of the parsed object."""
    text = json.dumps(obj, **spelling) + "}\n</tool_call>"
    stream, pieces, pos = JsonObjectStream(), [], 0
    for size in [*cuts, len(text)]:
        piece, used = stream.feed(text[pos : pos + size])
        pieces.append(piece)
        pos += used
        if stream.done:
            break
    assert stream.done and not stream.failed
    assert text[pos:] == "}\n</tool_call>", "the object ends where its closing brace is"
    assert "".join(pieces) == json.dumps(obj, ensure_ascii=False)


@pytest.mark.parametrize(
    ("parser", "opening", "closing"),
    [
        ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": ', "}\n</tool_call>"),
        ("kimi_k2", "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
         "<|tool_call_argument_begin|>", "<|tool_call_end|><|tool_calls_section_end|>"),
        ("deepseek_v3", f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}get_weather\n```json\n",
         f"\n```{DS_CALL_END}{DS_CALLS_END}"),
        ("deepseek_v31", f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}get_weather{DS_SEP}", f"{DS_CALL_END}{DS_CALLS_END}"),
        ("llama3_json", '{"name": "get_weather", "parameters": ', "}"),
        ("mistral", "[TOOL_CALLS]get_weather[ARGS]", ""),
    ],
)  # fmt: skip
def test_json_argument_formats_stream_arguments_before_the_call_ends(parser: str, opening: str, closing: str) -> None:
    p = _parser(parser)
    first = p.feed(opening + '{"city": "Pa').tool_calls
    assert [(d.index, d.name, d.arguments) for d in first] == [(0, "get_weather", ""), (0, None, '{"city": "Pa')]
    rest = p.feed('ris", "days": 2}' + closing).tool_calls + p.finish().tool_calls
    assert "".join(d.arguments for d in first + rest) == '{"city": "Paris", "days": 2}'
    assert all(d.id is None and d.name is None for d in rest)


@pytest.mark.parametrize(
    ("parser", "opening", "first", "second", "closing"),
    [
        ("qwen3_coder", "<tool_call>\n<function=get_weather>\n", "<parameter=city>\nParis\n</parameter>\n",
         "<parameter=days>\n3\n</parameter>\n", "</function>\n</tool_call>"),
        ("glm45", "<tool_call>get_weather\n", "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n",
         "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n", "</tool_call>"),
    ],
)  # fmt: skip
def test_xml_style_formats_stream_each_parameter_once_it_is_whole(parser, opening, first, second, closing) -> None:
    p = _parser(parser)
    out = p.feed(opening + first + second[:12]).tool_calls
    assert [(d.index, d.name, d.arguments) for d in out] == [(0, "get_weather", ""), (0, None, '{"city": "Paris"')]
    rest = p.feed(second[12:]).tool_calls
    assert [d.arguments for d in rest] == [', "days": 3'], "typed by the tool's schema: an integer"
    end = p.feed(closing).tool_calls + p.finish().tool_calls
    assert [d.arguments for d in end] == ["}"]
    assert _whole(parser, opening + first + second + closing).tool_calls[0].arguments == '{"city": "Paris", "days": 3}'
