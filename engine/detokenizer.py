"""Incremental detokenizer: token ids in, streamable text deltas out, with stop strings cut exactly.

Decoding one token at a time is wrong in two ways: byte-level tokens can split a UTF-8 character (each half
decodes to U+FFFD), and SentencePiece-style decoders change a token's text depending on what precedes it
(leading-space stripping). So we decode a short sliding window — `prefix` tokens whose text is already out,
then the unread tokens — and emit the text the unread tokens add (the technique of vLLM and HF's
TextStreamer). A trailing U+FFFD means "character not complete yet": it is withheld until it completes.
Cost per token is two decodes of the small window, never the whole output.

Stop strings: text is released only when it can no longer become part of a stop string, so a streaming
client never sees text that is later cut. With `min_tokens` (vLLM's rule) a stop string must end in text that
a token after the first min_tokens added: one inside that text is kept as ordinary text, one that begins there
and ends later still stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 6  # prompt tokens decoded ahead of the output so its first token gets its real spacing
_MAX_PENDING_TOKENS = 32  # beyond this the trailing U+FFFD is garbage, not a split character: release it


@dataclass
class DetokenizerUpdate:
    text_delta: str
    stop_string: str | None = None  # the stop string that ended the text, when one did


class IncrementalDetokenizer:
    """Feed generated token ids with `add_token`; call `finish()` when the request ends for the rest.

    The engine should not feed the token id that stopped the request (EOS or a stop_token_id) unless it wants
    that token's text in the output.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._special_ids = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
        self._stop = [s for s in (stop or []) if s]
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._num_tokens = 0  # token ids fed, special ones included (they count toward min_tokens)

        context = [t for t in prompt_token_ids if not (skip_special_tokens and t in self._special_ids)]
        self._window: list[int] = context[-_PROMPT_CONTEXT:]  # tokens from the prefix offset on
        self._read = len(self._window)  # window index where the unread tokens start
        self._prefix_text: str | None = None  # decode(window[:read]), cached until the window moves
        self._window_emitted = 0  # chars of this window's new text already appended to _text

        self._text = ""  # decoded output so far (truncated at a stop string)
        self._emitted = 0  # chars of _text released in deltas
        self.stop_string: str | None = None
        self.finished = False

    @property
    def output_text(self) -> str:
        """The text released so far: exactly the concatenation of all deltas."""
        return self._text[: self._emitted]

    def add_token(self, token_id: int) -> DetokenizerUpdate:
        return self.add_tokens((token_id,))

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizerUpdate:
        """Several tokens at once (one decode of the window): for callers that need the text only at the end."""
        if self.finished or self.stop_string is not None or not token_ids:
            return DetokenizerUpdate("", self.stop_string)
        exempt = self._min_tokens - self._num_tokens
        if 0 < exempt < len(token_ids):  # the batch crosses min_tokens: its head's text must not end a stop
            head = self.add_tokens(token_ids[:exempt])
            tail = self.add_tokens(token_ids[exempt:])
            return DetokenizerUpdate(head.text_delta + tail.text_delta, tail.stop_string)
        before = len(self._text)
        self._num_tokens += len(token_ids)
        self._window.extend(t for t in token_ids if not (self._skip_special and t in self._special_ids))
        self._text += self._decode_new(flush=False)
        return self._release(self._stop_search_from(before), final=False)

    def finish(self) -> DetokenizerUpdate:
        """The request ended: decode what is pending (an incomplete character becomes U+FFFD, as a full
        decode would show it) and release the text held back for a possible stop string."""
        if self.finished or self.stop_string is not None:
            self.finished = True
            return DetokenizerUpdate("", self.stop_string)
        before = len(self._text)
        self._text += self._decode_new(flush=True)
        self.finished = True
        return self._release(self._stop_search_from(before), final=True)

    def _stop_search_from(self, before: int) -> int:
        """Where the text a stop string may end in starts: the text of the first min_tokens tokens ends none."""
        return len(self._text) if self._num_tokens <= self._min_tokens else before

    def _decode_new(self, flush: bool) -> str:
        """Text the unread window tokens add, minus a trailing incomplete character (unless flushing)."""
        if self._read == len(self._window):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._window[: self._read])
        new = self._decode(self._window)[len(self._prefix_text) :]
        incomplete = len(new) - len(new.rstrip(_REPLACEMENT))
        pending = len(self._window) - self._read
        if flush or incomplete == 0 or pending > _MAX_PENDING_TOKENS:
            delta = new[self._window_emitted :]
            # Slide: the unread tokens become the prefix of the next window.
            self._window = self._window[self._read :]
            self._read = len(self._window)
            self._prefix_text = None
            self._window_emitted = 0
            return delta
        # Hold back the whole trailing run: byte-fallback decoders turn every byte of an undecodable run
        # into U+FFFD, so the run may be one character in the making.
        ready = len(new) - incomplete
        delta = new[self._window_emitted : ready] if ready > self._window_emitted else ""
        self._window_emitted = max(self._window_emitted, ready)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""

    def _release(self, before: int, final: bool) -> DetokenizerUpdate:
        """Cut at the first stop string that the new text completes; else release all text that cannot
        be the start of a stop string (all of it when final)."""
        end = len(self._text)
        if self._stop:
            best: tuple[int, str] | None = None
            if end > before:
                # Only a stop that ends in the new text counts (text before it may hold one that min_tokens
                # exempted). The stop that completes first wins (as if text arrived one char at a time); then
                # the earliest.
                for s in self._stop:
                    idx = self._text.find(s, max(0, before - len(s) + 1))
                    if idx != -1 and (best is None or (idx + len(s), idx) < (best[0] + len(best[1]), best[0])):
                        best = (idx, s)
            if best is not None:
                idx, s = best
                self._text = self._text[: idx + len(s) if self._include_stop else idx]
                self.stop_string = s
                end = len(self._text)
            elif not final:
                end -= self._partial_stop_suffix()
        end = max(end, self._emitted)
        delta = self._text[self._emitted : end]
        self._emitted = end
        return DetokenizerUpdate(delta, self.stop_string)

    def _partial_stop_suffix(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        text = self._text
        for n in range(min(self._max_stop_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(len(s) > n and s.startswith(tail) for s in self._stop):
                return n
        return 0
