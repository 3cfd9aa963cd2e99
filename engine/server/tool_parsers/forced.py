"""Calls the request forced (`tool_choice` required or a named function), generated as constrained JSON.

The output was constrained to the JSON these parsers read (see chat_tools.forced_calls_schema), so it needs no
model-specific markers: a named choice's output is the arguments object itself, and `required` gives an array of
`{"name": ..., "parameters": {...}}`, as vLLM generates them.
"""

from __future__ import annotations

from typing import Any

from .base import JsonExtent, ParsedDelta, ToolCallDelta, ToolParser, json_object
from .hermes import name_and_arguments


class NamedCallParser(ToolParser):
    """The whole output is one call's arguments: the header goes out at once and the arguments stream as written."""

    name = "named"

    def __init__(self, function: str, tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(tools, **kwargs)
        self.function = function
        self._call_id: str | None = None

    def _advance(self, final: bool) -> None:
        if self._call_id is None:
            self._call_id = self._make_id()
            self._n_calls = 1
            self._out.tool_calls.append(ToolCallDelta(index=0, id=self._call_id, name=self.function))
        if self._buf:
            self._out.tool_calls.append(ToolCallDelta(index=0, arguments=self._buf))
            self._buf = ""


class RequiredCallsParser(ToolParser):
    """A JSON array of calls: each call goes out as soon as its object is complete."""

    name = "required"

    def __init__(self, tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(tools, **kwargs)
        self._state = "open"
        self._extent = JsonExtent()

    def finish(self) -> ParsedDelta:
        if self._state == "item" and self._buf and not self._n_calls:
            self._buf = "[" + self._buf  # cut off before its first call: the text as the model wrote it
        return super().finish()

    def _advance(self, final: bool) -> None:
        while True:
            head = self._buf.lstrip()
            if self._state == "open":
                if not head:
                    return
                if not head.startswith("["):
                    self._state = "text"
                    continue
                self._buf, self._state = head[1:], "item"
            elif self._state == "item":
                if not self._extent.started:
                    head = head.lstrip(",").lstrip()
                    if head.startswith("]"):
                        self._buf, self._state = head[1:], "text"
                        continue
                    if not head:
                        self._buf = ""
                        return
                    if not head.startswith("{"):
                        self._state = "text"
                        continue
                    self._buf = head
                end = self._extent.end(self._buf)
                if end is None:
                    return  # finish() returns an unfinished call as text
                call = name_and_arguments(json_object(self._buf[:end]), ("parameters", "arguments"))
                if call is None:
                    self._state = "text"
                    continue
                self._emit_call(*call)
                self._buf, self._extent = self._buf[end:], JsonExtent()
            else:
                self._emit_content(self._buf)
                self._buf = ""
                return
