"""Ways to cut a model's output into stream deltas, for checking that streamed parsing equals whole parsing.

Text is cut into pseudo-tokens the way a BPE tokenizer would roughly cut it (words, runs of spaces, single
punctuation marks), with every special marker one token, as the models' tokenizers make them.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator

SPECIAL_MARKERS = [
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<\uff5ctool\u2581calls\u2581begin\uff5c>",
    "<\uff5ctool\u2581calls\u2581end\uff5c>",
    "<\uff5ctool\u2581call\u2581begin\uff5c>",
    "<\uff5ctool\u2581call\u2581end\uff5c>",
    "<\uff5ctool\u2581sep\uff5c>",
    "<|python_tag|>",
    "[TOOL_CALLS]",
    "[ARGS]",
]
_SPECIAL = re.compile("|".join(re.escape(m) for m in sorted(SPECIAL_MARKERS, key=len, reverse=True)))
_PIECE = re.compile(r"\w+|\s+|[^\w\s]", re.UNICODE)


def pseudo_tokens(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    for m in _SPECIAL.finditer(text):
        tokens += _PIECE.findall(text[pos : m.start()])
        tokens.append(m.group())
        pos = m.end()
    tokens += _PIECE.findall(text[pos:])
    assert "".join(tokens) == text
    return tokens


def _join(tokens: list[str], cuts: list[int]) -> list[str]:
    bounds = [0, *cuts, len(tokens)]
    return ["".join(tokens[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


def all_splits(text: str) -> Iterator[tuple[str, list[str]]]:
    """(label, chunks): fixed chunks of 1..7 tokens, 50 seeded random splits, and every cut within 3 tokens of a
    special marker or of the output's start (at every character of those tokens)."""
    tokens = pseudo_tokens(text)
    for k in range(1, 8):
        yield f"every {k} tokens", _join(tokens, list(range(k, len(tokens), k)))
    for seed in range(50):
        rng = random.Random(seed)
        cuts, pos = [], 0
        while True:
            pos += rng.randint(1, 6)
            if pos >= len(tokens):
                break
            cuts.append(pos)
        yield f"random split seed {seed}", _join(tokens, cuts)
    starts = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens) + 1)]
    # The output's start is a marker site too: llama3_json decides there whether the answer is calls.
    sites = [0] + [i for i, tok in enumerate(tokens) if tok in SPECIAL_MARKERS]
    for i in sites:
        lo, hi = max(0, i - 3), min(len(tokens), i + 4)
        for c in range(starts[lo], starts[hi] + 1):
            yield f"cut at char {c} near token {i} {tokens[i]!r}", [text[:c], text[c:]]
