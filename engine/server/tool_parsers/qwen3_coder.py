"""`qwen3_coder`: Qwen3-Coder's XML-style calls.

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Parameter values are plain text, typed by the tool's parameter schema (see `convert_parameter`).
"""

from __future__ import annotations

import re
from typing import Any

from .base import CallHeader, MarkedCallParser, ParsedCall, convert_parameter

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)
_FUNCTION_OPEN = re.compile(r"\s*<function=([^>\n]+)>")
_FIRST_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


def _strip_one_newline(value: str) -> str:
    """The template writes one newline after the opening and before the closing tag; they are not the value."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


class Qwen3CoderToolParser(MarkedCallParser):
    name = "qwen3_coder"
    call_begin = "<tool_call>"
    call_end = "</tool_call>"
    parameters_closer = re.compile(r"\s*</function>\s*")

    def parameters_header(self, body: str) -> CallHeader | None:
        m = _FUNCTION_OPEN.match(body)
        return None if m is None or not m.group(1).strip() else CallHeader(m.group(1).strip(), None, m.end())

    def parameter_at(self, function: str, text: str) -> tuple[str, Any, int] | None:
        m = _FIRST_PARAMETER.match(text)
        if m is None:
            return None
        key = m.group(1).strip()
        return key, convert_parameter(_strip_one_newline(m.group(2)), self.parameter_schema(function, key)), m.end()

    def parse_call(self, body: str) -> list[ParsedCall] | None:
        m = _FUNCTION.fullmatch(body)
        if m is None:
            return None
        name, inner = m.group(1).strip(), m.group(2)
        args = {}
        pos = 0
        for p in _PARAMETER.finditer(inner):
            if inner[pos : p.start()].strip():
                return None  # stray text between parameters: not a call we can trust
            key = p.group(1).strip()
            args[key] = convert_parameter(_strip_one_newline(p.group(2)), self.parameter_schema(name, key))
            pos = p.end()
        if inner[pos:].strip() or not name:
            return None
        return [(name, args, None)]
