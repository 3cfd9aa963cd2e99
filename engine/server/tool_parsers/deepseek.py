"""`deepseek_v3` and `deepseek_v31`: DeepSeek's calls in a section, with full-width bars in the markers.

V3:   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
      ```json
      {"city": "Paris"}
      ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>
V3.1: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>
      <｜tool▁calls▁end｜>
"""

from __future__ import annotations

import re

from .base import CallHeader, MarkedCallParser, ParsedCall, json_object

TOOL_SEP = "<\uff5ctool\u2581sep\uff5c>"
_V3_CALL = re.compile(r"\s*function" + re.escape(TOOL_SEP) + r"([^\n]+)\n```(?:json)?\n(.*)\n```\s*", re.DOTALL)
_V3_HEADER = re.compile(r"\s*function" + re.escape(TOOL_SEP) + r"([^\n]+)\n```(?:json)?\n\s*(?=\{)")
_V31_HEADER = re.compile(r"\s*([^\n]+?)\s*" + re.escape(TOOL_SEP) + r"\s*(?=\{)")


class _DeepSeekMarkers(MarkedCallParser):
    section_begin = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
    section_end = "<\uff5ctool\u2581calls\u2581end\uff5c>"
    call_begin = "<\uff5ctool\u2581call\u2581begin\uff5c>"
    call_end = "<\uff5ctool\u2581call\u2581end\uff5c>"


class DeepSeekV3ToolParser(_DeepSeekMarkers):
    name = "deepseek_v3"
    arguments_closer = re.compile(r"\s*```\s*")

    def call_header(self, body: str) -> CallHeader | None:
        m = _V3_HEADER.match(body)
        return None if m is None or not m.group(1).strip() else CallHeader(m.group(1).strip(), None, m.end())

    def parse_call(self, body: str) -> list[ParsedCall] | None:
        m = _V3_CALL.fullmatch(body)
        args = None if m is None else json_object(m.group(2))
        if m is None or args is None or not m.group(1).strip():
            return None
        return [(m.group(1).strip(), args, None)]


class DeepSeekV31ToolParser(_DeepSeekMarkers):
    name = "deepseek_v31"

    def call_header(self, body: str) -> CallHeader | None:
        m = _V31_HEADER.match(body)
        return None if m is None or not m.group(1).strip() else CallHeader(m.group(1).strip(), None, m.end())

    def parse_call(self, body: str) -> list[ParsedCall] | None:
        name, sep, args_text = body.partition(TOOL_SEP)
        args = json_object(args_text)
        if not sep or args is None or not name.strip() or "\n" in name.strip():
            return None
        return [(name.strip(), args, None)]
