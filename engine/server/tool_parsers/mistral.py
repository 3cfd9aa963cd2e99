"""`mistral`: Mistral's calls after a `[TOOL_CALLS]` token, in either of its two formats.

Older tokenizers (v3-v7): `[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]`
Newer ones (v11+):       `[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}`, one `[TOOL_CALLS]` per call.
Call ids are 9 letters and digits, as Mistral's chat templates require of the ids sent back.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

from .base import JsonExtent, ToolParser, held_suffix_len, json_object
from .hermes import name_and_arguments

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"[\w\-.]+")
_ALPHANUM = string.ascii_letters + string.digits


def mistral_call_id() -> str:
    return "".join(secrets.choice(_ALPHANUM) for _ in range(9))


class MistralToolParser(ToolParser):
    name = "mistral"

    def __init__(self, tools: list[dict[str, Any]] | None = None, make_id=mistral_call_id) -> None:
        super().__init__(tools, make_id)
        self._state = "content"
        self._extent = JsonExtent()
        self._raw = ""  # the call's text so far, returned as content if it turns out malformed
        self._name = ""

    def _malformed(self) -> None:
        """The text since `[TOOL_CALLS]` is not a call: it is content, and the rest is scanned afresh."""
        self._emit_content(TOOL_CALLS + self._raw)
        self._raw = ""
        self._state = "content"

    def _take_json(self, final: bool) -> str | None:
        """The JSON value at the buffer's start once it is complete; None to wait (or, if final, malformed)."""
        end = self._extent.end(self._buf)
        if end is None:
            if final:
                self._raw += self._buf
                self._buf = ""
                self._malformed()
            return None
        text, self._buf = self._buf[:end], self._buf[end:]
        self._raw += text
        return text

    def _advance(self, final: bool) -> None:
        while True:
            if self._state == "content":
                i = self._buf.find(TOOL_CALLS)
                if i < 0:
                    keep = 0 if final else held_suffix_len(self._buf, [TOOL_CALLS])
                    self._emit_content(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return
                self._emit_content(self._buf[:i])
                self._buf = self._buf[i + len(TOOL_CALLS) :]
                self._state, self._raw = "opened", ""
            elif self._state in ("opened", "args"):
                head = self._buf.lstrip()
                if not head:
                    if final:
                        self._malformed()
                    return
                self._raw += self._buf[: len(self._buf) - len(head)]
                self._buf = head
                self._extent = JsonExtent()
                if self._state == "opened":
                    self._state = "array" if head.startswith("[") else "name"
                elif head.startswith("{") and self.stream_arguments:  # streamed: the header now, the rest as it comes
                    self._open_streamed_call(self._name)
                    self._state = "arguments"
                elif head.startswith("{"):
                    self._state = "args_json"
                else:
                    self._malformed()
            elif self._state == "arguments":
                status = self._feed_arguments()
                if status == "open":
                    return  # cut off mid-arguments (final): what was sent stands
                self._after_call = status == "done"
                self._state = "content" if status == "done" else "raw arguments"
            elif self._state == "raw arguments":  # not JSON after all: the text as written, up to a next call
                i = self._buf.find(TOOL_CALLS)
                keep = 0 if final else held_suffix_len(self._buf, [TOOL_CALLS])
                end = i if i >= 0 else len(self._buf) - keep
                self._emit_arguments(self._buf[:end])
                self._buf = self._buf[end:]
                if i < 0:
                    return
                self._after_call = True
                self._state = "content"
            elif self._state == "array":
                text = self._take_json(final)
                if text is None:
                    return
                calls = self._array_calls(text)
                if calls is None:
                    self._malformed()
                    continue
                for name, args in calls:
                    self._emit_call(name, args)
                self._state = "content"
            elif self._state == "name":
                i = self._buf.find(ARGS)
                if i < 0:
                    pending = self._buf[: len(self._buf) - held_suffix_len(self._buf, [ARGS])]
                    if final or (pending and not _NAME.fullmatch(pending)):
                        self._malformed()
                        continue
                    return
                if not _NAME.fullmatch(self._buf[:i]):
                    self._malformed()
                    continue
                self._name = self._buf[:i]
                self._raw += self._buf[: i + len(ARGS)]
                self._buf = self._buf[i + len(ARGS) :]
                self._state = "args"
            else:  # v11 arguments: one JSON object
                text = self._take_json(final)
                if text is None:
                    return
                arguments = json_object(text)
                if arguments is None:
                    self._malformed()
                    continue
                self._emit_call(self._name, arguments)
                self._state = "content"

    @staticmethod
    def _array_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
        try:
            items = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(items, list) or not items:
            return None
        calls = [name_and_arguments(item if isinstance(item, dict) else None, ("arguments",)) for item in items]
        return None if any(c is None for c in calls) else calls  # type: ignore[return-value]
