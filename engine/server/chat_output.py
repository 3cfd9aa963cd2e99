"""Splits a chat completion's text into reasoning, content and tool calls, streamed or whole.

Reasoning is split off first, and only the answer goes to the tool-call parser: reasoning is never parsed for calls.
"""

from __future__ import annotations

from collections.abc import Iterable

from .reasoning_parsers import ThinkTagParser
from .tool_parsers import ParsedDelta, ParsedMessage, ToolParser, merge_deltas


class ChatOutputParser:
    def __init__(
        self, reasoning: ThinkTagParser | None = None, tools: ToolParser | None = None, max_calls: int | None = None
    ):
        self.reasoning = reasoning
        self.tools = tools
        self.max_calls = max_calls  # parallel_tool_calls false: calls after the first are dropped

    def feed(self, text: str) -> ParsedDelta:
        return self._route(self.reasoning.feed(text) if self.reasoning else ParsedDelta(content=text), final=False)

    def finish(self) -> ParsedDelta:
        return self._route(self.reasoning.finish() if self.reasoning else ParsedDelta(), final=True)

    def _route(self, split: ParsedDelta, final: bool) -> ParsedDelta:
        if self.tools is None:
            return split
        out = ParsedDelta(reasoning=split.reasoning)
        out.extend(self.tools.feed(split.content) if split.content else ParsedDelta())
        if final:
            out.extend(self.tools.finish())
        if self.max_calls is not None:
            out.tool_calls = [d for d in out.tool_calls if d.index < self.max_calls]
        return out

    def parse_whole(self, text: str) -> ParsedMessage:
        """The non-streamed message: calls only whole (a malformed or cut-off one is content)."""
        if self.tools is not None:
            self.tools.stream_arguments = False
        return parse_stream(self, [text])


def parse_stream(parser: ChatOutputParser | ToolParser, chunks: Iterable[str]) -> ParsedMessage:
    """Feed every chunk, finish, and merge: the message a client rebuilds from the stream."""
    deltas = [parser.feed(c) for c in chunks]
    deltas.append(parser.finish())
    return merge_deltas(deltas)
