"""Reasoning in think tags, `<think>…</think>`, split from the answer as text streams in.

One state machine serves every model: what differs is whether the output starts inside the reasoning (the model
may omit `<think>`, or the chat template wrote it into the prompt) and which markers also end it (Kimi-K2 may go
straight to its tool-call section). The answer's leading whitespace after `</think>` is not content.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..tool_parsers.base import ParsedDelta, find_first, held_suffix_len


@dataclass(frozen=True)
class ThinkStyle:
    start: str = "<think>"
    end: str = "</think>"
    implicit_ends: tuple[str, ...] = ()  # markers that end reasoning and belong to the answer


class ThinkTagParser:
    def __init__(self, style: ThinkStyle, starts_in_reasoning: bool):
        self.style = style
        self._starts_in_reasoning = starts_in_reasoning
        self._state = "opening"
        self._buf = ""
        self._strip_answer = False

    def feed(self, text: str) -> ParsedDelta:
        self._buf += text
        return self._advance(final=False)

    def finish(self) -> ParsedDelta:
        out = self._advance(final=True)
        return out

    def _answer(self, out: ParsedDelta, text: str) -> None:
        if self._strip_answer:
            text = text.lstrip()
            if not text:
                return
            self._strip_answer = False
        out.content += text

    def _advance(self, final: bool) -> ParsedDelta:
        out = ParsedDelta()
        s = self.style
        while True:
            if self._state == "opening":
                if self._buf.startswith(s.start):
                    self._buf = self._buf[len(s.start) :]
                    self._state = "reasoning"
                elif not final and s.start.startswith(self._buf):
                    return out  # may still become the opening tag
                else:
                    self._state = "reasoning" if self._starts_in_reasoning else "answer"
            elif self._state == "reasoning":
                hit = find_first(self._buf, (s.end, *s.implicit_ends))
                if hit is None:
                    keep = 0 if final else held_suffix_len(self._buf, (s.end, *s.implicit_ends))
                    out.reasoning += self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep :]
                    return out
                i, marker = hit
                out.reasoning += self._buf[:i]
                self._buf = self._buf[i + len(marker) :] if marker == s.end else self._buf[i:]
                self._strip_answer = marker == s.end
                self._state = "answer"
            else:
                self._answer(out, self._buf)
                self._buf = ""
                return out
