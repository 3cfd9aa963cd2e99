"""`glm45`: GLM-4.5/4.6 calls, a name then key/value pairs.

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    </tool_call>

Values are plain text, typed by the tool's parameter schema (see `convert_parameter`).
"""

from __future__ import annotations

import re
from typing import Any

from .base import CallHeader, MarkedCallParser, ParsedCall, convert_parameter

_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
_FIRST_PAIR = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


class Glm45ToolParser(MarkedCallParser):
    name = "glm45"
    call_begin = "<tool_call>"
    call_end = "</tool_call>"

    def parameters_header(self, body: str) -> CallHeader | None:
        first = body.find("<arg_key>")
        name = body[:first].strip()
        if first < 0 or not name or "<" in name or "\n" in name:
            return None
        return CallHeader(name, None, first)

    def parameter_at(self, function: str, text: str) -> tuple[str, Any, int] | None:
        m = _FIRST_PAIR.match(text)
        if m is None:
            return None
        key = m.group(1).strip()
        return key, convert_parameter(m.group(2), self.parameter_schema(function, key)), m.end()

    def parse_call(self, body: str) -> list[ParsedCall] | None:
        first = body.find("<arg_key>")
        name = (body if first < 0 else body[:first]).strip()
        if not name or "<" in name or "\n" in name:
            return None
        args = {}
        rest = "" if first < 0 else body[first:]
        pos = 0
        for p in _PAIR.finditer(rest):
            if rest[pos : p.start()].strip():
                return None
            key = p.group(1).strip()
            args[key] = convert_parameter(p.group(2), self.parameter_schema(name, key))
            pos = p.end()
        if rest[pos:].strip():
            return None
        return [(name, args, None)]
