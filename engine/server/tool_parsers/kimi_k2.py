"""`kimi_k2`: Kimi-K2 calls in a section, each with the id the model writes (`functions.NAME:INDEX`).

<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>
{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>
"""

from __future__ import annotations

import re

from .base import CallHeader, MarkedCallParser, ParsedCall, json_object

ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
_HEADER = re.compile(r"\s*((?:[\w\-]+\.)?([\w\-.]+?):\d+)\s*")
_OBJECT_NEXT = re.compile(r"\s*(?=\{)")


class KimiK2ToolParser(MarkedCallParser):
    name = "kimi_k2"
    section_begin = "<|tool_calls_section_begin|>"
    section_end = "<|tool_calls_section_end|>"
    call_begin = "<|tool_call_begin|>"
    call_end = "<|tool_call_end|>"

    def call_header(self, body: str) -> CallHeader | None:
        header, sep, rest = body.partition(ARGUMENT_BEGIN)
        m = _HEADER.fullmatch(header)
        gap = _OBJECT_NEXT.match(rest) if sep else None
        if m is None or gap is None:
            return None
        return CallHeader(m.group(2), m.group(1), len(header) + len(sep) + gap.end())

    def parse_call(self, body: str) -> list[ParsedCall] | None:
        header, sep, args_text = body.partition(ARGUMENT_BEGIN)
        m = _HEADER.fullmatch(header)
        args = json_object(args_text)
        if not sep or m is None or args is None:
            return None
        return [(m.group(2), args, m.group(1))]
