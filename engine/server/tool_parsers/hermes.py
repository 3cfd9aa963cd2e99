"""`hermes`: Hermes/Qwen2.5/Qwen3 calls, `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`."""

from __future__ import annotations

import json
import re
from typing import Any

from .base import CallHeader, MarkedCallParser, ParsedCall, json_object

# `{"name": "<name>", "arguments": ` up to the object's opening brace (which must have arrived): the streamable
# shape (also llama3_json's, with "parameters"). Other key orders, escaped names or arguments written as a string
# are parsed whole once the call's object is.
NAME_THEN_ARGUMENTS = re.compile(r'\s*\{\s*"name"\s*:\s*("[^"\\]+")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


def name_and_arguments(obj: dict[str, Any] | None, args_keys: tuple[str, ...]) -> tuple[str, dict[str, Any]] | None:
    """A `{"name": ..., "arguments": {...}}` object's name and arguments, or None when it is not a call.

    Arguments written as a JSON string holding an object are accepted too, as some fine-tunes do.
    """
    if obj is None or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):
        args = json_object(args)
    if not isinstance(args, dict):
        return None
    return obj["name"], args


class HermesToolParser(MarkedCallParser):
    name = "hermes"
    call_begin = "<tool_call>"
    call_end = "</tool_call>"
    arguments_closer = re.compile(r"\s*\}\s*")

    def call_header(self, body: str) -> CallHeader | None:
        m = NAME_THEN_ARGUMENTS.match(body)
        return None if m is None else CallHeader(json.loads(m.group(1)), None, m.end())

    def parse_call(self, body: str) -> list[ParsedCall] | None:
        call = name_and_arguments(json_object(body), ("arguments", "parameters"))
        return None if call is None else [(call[0], call[1], None)]
