"""`llama3_json`: Llama 3.1+/3.2 JSON calls, the whole answer being `{"name": ..., "parameters": {...}}` objects.

The model answers with calls only when its output opens with `<|python_tag|>` or `{`; several calls are
separated by `;`. Anything else, and anything after a part that is not a call, is content.
"""

from __future__ import annotations

import json

from .base import JsonExtent, ToolParser, json_object
from .hermes import NAME_THEN_ARGUMENTS, name_and_arguments

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._state = "start"
        self._extent = JsonExtent()

    def _advance(self, final: bool) -> None:
        while True:
            if self._state == "start":
                head = self._buf.lstrip()
                if head.startswith(PYTHON_TAG):
                    self._buf = head[len(PYTHON_TAG) :]
                    self._state = "calls"
                elif head.startswith("{"):
                    self._buf = head
                    self._state = "calls"
                elif not final and (not head or PYTHON_TAG.startswith(head)):
                    return  # cannot tell yet
                else:
                    self._state = "plain"
            elif self._state == "calls":
                if not self._extent.started:
                    self._buf = self._buf.lstrip().lstrip(";").lstrip()
                    if not self._buf:
                        return
                    if not self._buf.startswith("{"):
                        self._state = "plain"
                        continue
                header = NAME_THEN_ARGUMENTS.match(self._buf) if self.stream_arguments else None
                if header is not None:  # streamed: the header now, the parameters as they come
                    self._open_streamed_call(json.loads(header.group(1)))
                    self._buf = self._buf[header.end() :]
                    self._extent = JsonExtent()
                    self._state = "arguments"
                    continue
                end = self._extent.end(self._buf)
                if end is None:
                    return  # finish() returns an unfinished object as content
                call = name_and_arguments(json_object(self._buf[:end]), ("parameters", "arguments"))
                if call is None:
                    self._state = "plain"
                    continue
                self._emit_call(*call)
                self._buf = self._buf[end:]
                self._extent = JsonExtent()
            elif self._state == "arguments":
                status = self._feed_arguments()
                if status == "open":
                    return  # cut off mid-parameters (final): what was sent stands
                self._state = "after arguments" if status == "done" else "raw arguments"
            elif self._state == "after arguments":  # the call object's closing brace, then `;` or the end
                head = self._buf.lstrip()
                if not head:
                    return
                self._after_call = True
                if head.startswith("}"):
                    self._buf = head[1:]
                    self._state = "calls"
                else:
                    self._state = "plain"
            elif self._state == "raw arguments":  # not JSON after all: the rest is the call's text as written
                self._emit_arguments(self._buf)
                self._buf = ""
                return
            else:
                self._emit_content(self._buf)
                self._buf = ""
                return
