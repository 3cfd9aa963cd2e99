"""The streaming interface every tool-call parser shares, and the pieces they are built from.

A parser is fed text deltas and returns `ParsedDelta`s (content and tool-call deltas); `finish()` flushes it when
the output ends. A message is the deltas merged (`merge_deltas`), and it is the same for every way the text is
split into deltas. Text outside calls streams as soon as it cannot be part of a marker.

Non-streamed (`stream_arguments` off, `ChatOutputParser.parse_whole`), a call is emitted only once its closing
marker has arrived and its body parses, so a malformed or truncated call is returned as content. Streamed, as vLLM
streams calls: a format that can tell where a call's name ends and its JSON arguments begin (`call_header`) sends
the header as soon as the name is known, then the arguments piece by piece as generated, re-spelt as the whole
call would spell them (json_stream.py); XML-style formats (`parameters_header`, `parameter_at`) send each parameter
once whole. So a well-formed call streams into exactly the non-streamed message, but a call that then turns out
malformed or is cut off cannot be taken back: the stream keeps what was sent (for the rest of a broken object,
the model's own text).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .json_stream import JsonObjectStream


@dataclass
class ToolCallDelta:
    """One OpenAI `delta.tool_calls[]` entry: the first for a call has id, type and name; later ones add arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def extend(self, other: ParsedDelta) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


@dataclass
class ParsedMessage:
    """A whole assistant turn: what the non-streamed response carries."""

    content: str | None
    reasoning: str | None
    tool_calls: list[ToolCall]


def merge_deltas(deltas: Iterable[ParsedDelta]) -> ParsedMessage:
    """Rebuild a message from deltas the way OpenAI clients do: calls keyed by index, arguments concatenated."""
    content, reasoning = [], []
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        content.append(d.content)
        reasoning.append(d.reasoning)
        for tc in d.tool_calls:
            call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = call["id"] or (tc.id or "")
            call["name"] = call["name"] or (tc.name or "")
            call["arguments"] += tc.arguments
    return ParsedMessage(
        content="".join(content) or None,
        reasoning="".join(reasoning) or None,
        tool_calls=[ToolCall(**calls[i]) for i in sorted(calls)],
    )


def random_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def held_suffix_len(buf: str, markers: Iterable[str]) -> int:
    """Length of the longest end of `buf` that could still grow into one of `markers` (so must not be emitted yet)."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:k]):
                best = k
                break
    return best


def find_first(buf: str, markers: Iterable[str]) -> tuple[int, str] | None:
    """Earliest occurrence of any marker (the longer one on a tie)."""
    found: tuple[int, str] | None = None
    for m in markers:
        i = buf.find(m)
        if i >= 0 and (found is None or i < found[0] or (i == found[0] and len(m) > len(found[1]))):
            found = (i, m)
    return found


def json_object(text: str) -> dict[str, Any] | None:
    """`text` parsed as a JSON object, or None when it is not one."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes is no call either
        return None
    return value if isinstance(value, dict) else None


def dump_arguments(args: dict[str, Any]) -> str:
    return json.dumps(args, ensure_ascii=False)


def _schema_types(schema: dict[str, Any] | None) -> set[str]:
    if not schema:
        return set()
    t = schema.get("type")
    types = set(t) if isinstance(t, list) else {t} if isinstance(t, str) else set()
    for alt in schema.get("anyOf", []) + schema.get("oneOf", []):
        types |= _schema_types(alt)
    return types


def convert_parameter(raw: str, schema: dict[str, Any] | None) -> Any:
    """A parameter value written as plain text (XML-style formats) turned into its JSON value.

    A parameter whose schema allows only strings stays text; anything else is read as JSON when it parses
    (numbers, booleans, objects), and kept as text otherwise.
    """
    types = _schema_types(schema)
    if types and types <= {"string"}:
        return raw
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw


class ToolParser:
    """Base of all tool-call parsers: buffering, id assignment and the content/call emitters.

    Subclasses implement `_advance(final)`, consuming `self._buf` as far as it can be decided; `final` is true when
    no more text will come, so whatever is left must be settled.
    """

    name: ClassVar[str]

    def __init__(self, tools: list[dict[str, Any]] | None = None, make_id: Callable[[], str] = random_call_id):
        self.functions: dict[str, dict[str, Any]] = {}
        for t in tools or []:
            fn = t.get("function", t)
            self.functions[fn["name"]] = fn
        self._make_id = make_id
        self._buf = ""
        self._out = ParsedDelta()
        self._n_calls = 0
        self._after_call = False
        self.stream_arguments = True  # off: whole calls only (the non-streamed response)
        self._arguments = JsonObjectStream()  # the streamed call's arguments, once its header has gone out

    def feed(self, text: str) -> ParsedDelta:
        self._buf += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> ParsedDelta:
        self._advance(final=True)
        if self._buf:  # whatever a subclass could not place is text the model wrote
            self._emit_content(self._buf)
            self._buf = ""
        return self._take()

    @property
    def calls_emitted(self) -> int:
        return self._n_calls

    def _take(self) -> ParsedDelta:
        out, self._out = self._out, ParsedDelta()
        return out

    def _emit_content(self, text: str) -> None:
        if self._after_call:  # the whitespace models put between and after calls is not content
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        self._out.content += text

    def _emit_call(self, name: str, arguments: dict[str, Any], call_id: str | None = None) -> None:
        self._emit_call_header(name, call_id)
        self._emit_arguments(dump_arguments(arguments))
        self._after_call = True

    def _emit_call_header(self, name: str, call_id: str | None = None) -> None:
        """A new call's first delta: index, id and name (its arguments follow in `_emit_arguments`)."""
        self._out.tool_calls.append(ToolCallDelta(index=self._n_calls, id=call_id or self._make_id(), name=name))
        self._n_calls += 1

    def _open_streamed_call(self, name: str, call_id: str | None = None) -> None:
        """Send a call's header now; its arguments object follows at the buffer's start (`_feed_arguments`)."""
        self._emit_call_header(name, call_id)
        self._arguments = JsonObjectStream()

    def _feed_arguments(self) -> str:
        """Stream what the buffer adds to the open call's arguments: "done" once the object closed (the buffer
        then holds what follows it), "failed" when it cannot be JSON (the buffer then starts with the text it
        could not take), else "open" (the buffer is used up)."""
        piece, used = self._arguments.feed(self._buf)
        self._emit_arguments(piece)
        self._buf = self._buf[used:]
        if self._arguments.done:
            return "done"
        if self._arguments.failed:
            self._buf = self._arguments.unread + self._buf
            return "failed"
        return "open"

    def _emit_arguments(self, text: str) -> None:
        """More of the current call's arguments, joined to this delta's last piece of them when there is one."""
        if not text:
            return
        last = self._out.tool_calls[-1] if self._out.tool_calls else None
        if last is not None and last.index == self._n_calls - 1 and last.id is None:
            last.arguments += text
        else:
            self._out.tool_calls.append(ToolCallDelta(index=self._n_calls - 1, arguments=text))

    def _advance(self, final: bool) -> None:
        raise NotImplementedError

    def parameter_schema(self, function: str, parameter: str) -> dict[str, Any] | None:
        props = self.functions.get(function, {}).get("parameters", {}).get("properties", {})
        return props.get(parameter)


ParsedCall = tuple[str, dict[str, Any], str | None]  # name, arguments, id the model wrote (or None)


@dataclass(frozen=True)
class CallHeader:
    """What precedes a call's JSON arguments: its name, the id the model wrote (or None), and where in the call's
    body the arguments object starts."""

    name: str
    call_id: str | None
    arguments_at: int


class MarkedCallParser(ToolParser):
    """Formats whose calls sit between begin/end markers, optionally inside a begin/end section.

    Subclasses set the markers and `parse_call(body)`, which returns the calls in one call body or None when the
    body is malformed (it is then returned as content, markers included).
    """

    call_begin: ClassVar[str]
    call_end: ClassVar[str]
    section_begin: ClassVar[str | None] = None
    section_end: ClassVar[str | None] = None

    def __init__(self, tools: list[dict[str, Any]] | None = None, make_id: Callable[[], str] = random_call_id):
        super().__init__(tools, make_id)
        self._state = "content"
        self._call_name = ""  # the call whose parameters stream (XML-style formats)
        self._parameters_sent = 0

    # What may stand between a streamed call's arguments and its end marker (e.g. hermes' closing brace); any
    # other text there is content.
    arguments_closer: ClassVar[re.Pattern[str]] = re.compile(r"\s*")

    def parse_call(self, body: str) -> list[ParsedCall] | None:
        raise NotImplementedError

    def call_header(self, body: str) -> CallHeader | None:
        """The header of a call whose body begins with `body`, once the body shows it and that a JSON object
        follows; None while it cannot tell, and for good when the call is not one name and one object (it is then
        parsed whole at its end marker). Formats that do not stream their arguments keep this default."""
        return None

    # XML-style formats (parameters as tagged text) stream one whole parameter at a time instead.
    parameters_closer: ClassVar[re.Pattern[str]] = re.compile(r"\s*")  # between the last parameter and the end

    def parameters_header(self, body: str) -> CallHeader | None:
        """Like `call_header`, for a call whose parameters follow its name as tagged text (`arguments_at`: where
        the first parameter begins)."""
        return None

    def parameter_at(self, function: str, text: str) -> tuple[str, Any, int] | None:
        """The parameter that `text` begins with (after white space), once its closing tag has arrived: its name,
        its value typed by the tool's schema, and where it ends; None otherwise."""
        return None

    def _outside(self) -> str:
        return "section" if self.section_begin else "content"

    def _advance(self, final: bool) -> None:
        while True:
            if self._state == "content":
                opener = self.section_begin or self.call_begin
                i = self._buf.find(opener)
                if i < 0:
                    keep = 0 if final else held_suffix_len(self._buf, [opener])
                    self._emit_content(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return
                self._emit_content(self._buf[:i])
                self._buf = self._buf[i + len(opener) :]
                self._state = "section" if self.section_begin else "call"
            elif self._state == "section":
                assert self.section_end is not None
                hit = find_first(self._buf, [self.call_begin, self.section_end])
                if hit is None:
                    if final:
                        self._emit_content(self._buf.strip())
                        self._buf = ""
                    return
                i, marker = hit
                self._emit_content(self._buf[:i].strip())  # only stray text, never the gaps between calls
                self._buf = self._buf[i + len(marker) :]
                self._state = "call" if marker == self.call_begin else "content"
            elif self._state == "arguments":
                if not self._stream_arguments(final):
                    return
            elif self._state == "raw arguments":
                if not self._stream_raw_arguments(final):
                    return
            elif self._state == "after arguments":
                if not self._close_streamed_call(final):
                    return
            elif self._state == "parameters":
                if not self._stream_parameters(final):
                    return
            else:  # inside a call
                header = self.call_header(self._buf) if self.stream_arguments else None
                if header is not None:
                    self._open_streamed_call(header.name, header.call_id)
                    self._buf = self._buf[header.arguments_at :]
                    self._state = "arguments"
                    continue
                header = self.parameters_header(self._buf) if self.stream_arguments else None
                if header is not None:
                    self._emit_call_header(header.name, header.call_id)
                    self._buf = self._buf[header.arguments_at :]
                    self._call_name, self._parameters_sent = header.name, 0
                    self._state = "parameters"
                    continue
                i = self._buf.find(self.call_end)
                if i < 0:
                    if final:  # cut off mid-call (max_tokens): the text is all the caller gets
                        self._emit_content(self.call_begin + self._buf)
                        self._buf = ""
                    return
                body = self._buf[:i]
                self._buf = self._buf[i + len(self.call_end) :]
                self._state = self._outside()
                calls = self.parse_call(body)
                if calls is None:
                    self._emit_content(self.call_begin + body + self.call_end)
                else:
                    for name, args, call_id in calls:
                        self._emit_call(name, args, call_id)

    def _stream_arguments(self, final: bool) -> bool:
        """Send what the buffer adds to the current call's arguments; True when the state moved on."""
        status = self._feed_arguments()
        if status == "done":
            self._state = "after arguments"
            return True
        if status == "failed":  # not JSON after all: the rest of the call goes out as the model wrote it
            self._state = "raw arguments"
            return True
        if final:  # cut off mid-arguments: what was sent stands
            self._state = self._outside()
        return False

    def _stream_raw_arguments(self, final: bool) -> bool:
        i = self._buf.find(self.call_end)
        if i < 0:
            keep = 0 if final else held_suffix_len(self._buf, [self.call_end])
            self._emit_arguments(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            if final:
                self._state = self._outside()
            return False
        self._emit_arguments(self._buf[:i])
        self._buf = self._buf[i + len(self.call_end) :]
        self._after_call = True
        self._state = self._outside()
        return True

    def _stream_parameters(self, final: bool) -> bool:
        """Send each parameter once whole, as the next piece of the JSON arguments; at the end marker close the
        object (text there other than the format's closer is content). True when the state moved on."""
        end = self._buf.find(self.call_end)
        param = self.parameter_at(self._call_name, self._buf)
        if param is not None and (end < 0 or param[2] <= end):
            key, value, used = param
            lead = "{" if not self._parameters_sent else ", "
            self._emit_arguments(
                f"{lead}{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}"
            )
            self._parameters_sent += 1
            self._buf = self._buf[used:]
            return True
        if end < 0 and not final:
            return False
        between = self._buf if end < 0 else self._buf[:end]
        self._buf = "" if end < 0 else self._buf[end + len(self.call_end) :]
        if end >= 0:  # cut off (final, no end marker): what was sent stands, unclosed
            self._emit_arguments("}" if self._parameters_sent else "{}")
        self._after_call = True
        if not self.parameters_closer.fullmatch(between):
            self._emit_content(between)
        self._state = self._outside()
        return end >= 0

    def _close_streamed_call(self, final: bool) -> bool:
        """Between a streamed call's arguments and its end marker: the format's closer is dropped, anything
        else is content."""
        i = self._buf.find(self.call_end)
        if i < 0 and not final:
            return False
        between = self._buf if i < 0 else self._buf[:i]
        self._buf = "" if i < 0 else self._buf[i + len(self.call_end) :]
        self._after_call = True
        if not self.arguments_closer.fullmatch(between):
            self._emit_content(between)
        self._state = self._outside()
        return i >= 0


class JsonExtent:
    """Finds where a JSON object or array that starts at a buffer's position 0 ends, scanning each char once."""

    def __init__(self) -> None:
        self._pos = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    @property
    def started(self) -> bool:
        return self._pos > 0

    def end(self, buf: str) -> int | None:
        """Index just past the value's closing bracket, or None while it is still open."""
        while self._pos < len(buf):
            c = buf[self._pos]
            self._pos += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return self._pos
        return None
