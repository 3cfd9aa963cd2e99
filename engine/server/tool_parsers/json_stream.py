"""A JSON object re-spelt as it streams in, for tool-call arguments sent piece by piece (as vLLM streams them).

Each token goes out once it is complete, spelt as `json.dumps(..., ensure_ascii=False)` spells it (", " and ": "
between items, strings re-escaped, numbers and literals as Python reads and writes them back). So the pieces of a
well-formed object concatenate to exactly what dumping the parsed whole gives, which is what a non-streamed
response carries, however the text was cut into deltas. Only duplicate keys differ (the whole keeps the last).
"""

from __future__ import annotations

import json

_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_SCALAR = set("0123456789+-.eE") | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class JsonObjectStream:
    """Feed text that starts with a JSON object; `feed` returns the re-spelt output so far and how much of the text
    the object took. `done` once the object closed; `failed` once the text cannot be JSON (then `unread` is the
    text it had taken but not written out)."""

    def __init__(self) -> None:
        self.done = False
        self.failed = False
        self.unread = ""
        self._depth = 0
        self._in_string = False
        self._escape: str | None = None  # the escape being read, after its backslash
        self._high_surrogate: str | None = None  # a \uD800-\uDBFF escape waiting for its low half
        self._scalar = ""  # a number or literal being read

    def feed(self, text: str) -> tuple[str, int]:
        out: list[str] = []
        for used, c in enumerate(text):
            if self.done or self.failed:
                return "".join(out), used
            if self._in_string:
                self._string_char(c, out)
            else:
                self._structural_char(c, out)
        return "".join(out), len(text)

    def _fail(self, pending: str) -> None:
        self.failed = True
        self.unread = pending

    def _flush_surrogate(self, out: list[str]) -> None:
        """A high surrogate not followed by its low half is a character of its own, as json reads it."""
        if self._high_surrogate is not None:
            out.append(json.dumps(self._high_surrogate, ensure_ascii=False)[1:-1])
            self._high_surrogate = None

    def _char(self, ch: str, out: list[str]) -> None:
        self._flush_surrogate(out)
        out.append(json.dumps(ch, ensure_ascii=False)[1:-1])

    def _string_char(self, c: str, out: list[str]) -> None:
        if self._escape is None:
            if c == "\\":
                self._escape = ""
            elif c == '"':
                self._flush_surrogate(out)
                self._in_string = False
                out.append('"')
            elif c < " ":
                self._fail(c)  # a raw control character is not JSON
            else:
                self._char(c, out)
            return
        self._escape += c
        if self._escape[0] != "u":
            escape, self._escape = self._escape, None
            if escape not in _ESCAPES:
                self._fail("\\" + escape)
            else:
                self._char(_ESCAPES[escape], out)
            return
        if len(self._escape) < 5:
            return
        digits, self._escape = self._escape[1:], None
        try:
            code = int(digits, 16)
        except ValueError:
            self._fail("\\u" + digits)
            return
        if 0xD800 <= code < 0xDC00:
            self._flush_surrogate(out)
            self._high_surrogate = chr(code)
        elif 0xDC00 <= code < 0xE000 and self._high_surrogate is not None:
            pair = (self._high_surrogate + chr(code)).encode("utf-16", "surrogatepass").decode("utf-16")
            self._high_surrogate = None
            self._char(pair, out)
        else:
            self._char(chr(code), out)

    def _structural_char(self, c: str, out: list[str]) -> None:
        if c in _SCALAR and self._depth > 0:
            self._scalar += c
            return
        if self._scalar:
            try:
                value = json.loads(self._scalar)
            except ValueError:
                self._fail(self._scalar + c)
                return
            out.append(json.dumps(value))
            self._scalar = ""
        if c in " \t\r\n":
            return
        if self._depth == 0 and c != "{":
            self._fail(c)
            return
        if c == '"':
            self._in_string = True
            out.append('"')
        elif c in "{[":
            self._depth += 1
            out.append(c)
        elif c in "}]":
            self._depth -= 1
            out.append(c)
            self.done = self._depth == 0
        elif c == ",":
            out.append(", ")
        elif c == ":":
            out.append(": ")
        else:
            self._fail(c)
