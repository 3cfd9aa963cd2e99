"""Prompt -> the engine's block hashes, without model files: the router fetches the engine's tokenizer and
chat template from GET /v1/tokenizer_info and uses the shared core's renderer and block hash, so its
hashes equal the ones the engine's prefix cache (and its KV events) carry, bit for bit.

Until a tokenizer is available (or when rendering fails) the router hashes the prompt's text in fixed-size
character blocks under another domain: good enough for the approximate index's affinity, never confused
with token-block hashes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import xxhash

from kubellm.block_hash import DEFAULT_BLOCK_SIZE, hash_blocks
from kubellm.prompt import PromptRenderer, TokenizerInfo
from kubellm.router.request_body import dumps

log = logging.getLogger("kubellm.router.tokenization")

TEXT_BLOCK_CHARS = 64
TEXT_BLOCK_TOKENS = TEXT_BLOCK_CHARS // 4  # what a text block stands for in tokens (~4 characters a token)
_TEXT_DOMAIN = b"kubellm-text/1|"
_REFETCH_AFTER = 10.0  # seconds between attempts to fetch a tokenizer that was not available


@dataclass
class PromptKey:
    hashes: list[int]
    exact: bool  # token-block hashes as the engine computes them (else text-block hashes)
    block_tokens: int = DEFAULT_BLOCK_SIZE  # tokens per block (for text blocks, an estimate)


def text_block_hashes(text: str, extra: str = "", block_chars: int = TEXT_BLOCK_CHARS) -> list[int]:
    """Chained 128-bit hashes of the text's full `block_chars`-byte blocks: each block's hash is seeded with the
    low 64 bits of the previous one (one call per block, no concatenation)."""
    h = xxhash.xxh3_128_intdigest(_TEXT_DOMAIN + extra.encode())
    out = []
    data = memoryview(text.encode("utf-8", "surrogatepass"))
    digest, mask = xxhash.xxh3_128_intdigest, _LOW64
    for start in range(0, len(data) - block_chars + 1, block_chars):
        h = digest(data[start : start + block_chars], h & mask)
        out.append(h)
    return out


_LOW64 = (1 << 64) - 1


class SegmentCache:
    """Tokenizes text piecewise between special added tokens, caching the pieces.

    A Hugging Face tokenizer splits its input on added tokens first and encodes the pieces between them
    independently, so encoding piece by piece gives the same ids. Chat templates put special tokens between
    messages, so the repeated part of a conversation (the system prompt, earlier turns) is a cache hit and only
    the new turn is tokenized: the router's main per-request cost under the prefix policy. Used only when the
    tokenizer's added tokens have no strip/single-word rules and a self-check on the live tokenizer agrees.
    """

    MIN_CACHED_CHARS = 256

    def __init__(self, renderer: PromptRenderer, max_entries: int = 2048):
        self.renderer = renderer
        self.max_entries = max_entries
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        tok = renderer.tokenizer
        added = tok.get_added_tokens_decoder()
        self.enabled = bool(added) and all(
            not (a.lstrip or a.rstrip or a.single_word or a.normalized) for a in added.values()
        )
        self._ids = {a.content: i for i, a in added.items()}
        contents = sorted(self._ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(c) for c in contents) + ")") if contents else None
        if self.enabled:
            sample = "".join(f"{c} hello  world\n\t é {c}x" for c in contents[:8]) + " tail  "
            self.enabled = self.encode(sample) == tok.encode(sample, add_special_tokens=False).ids
            self._cache.clear()

    def encode(self, text: str) -> list[int]:
        if not self.enabled or self._split is None:
            return self.renderer.encode(text, add_special_tokens=False)
        out: list[int] = []
        tok, cache = self.renderer.tokenizer, self._cache
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:
                out.append(self._ids[piece])
            elif piece:
                ids = cache.get(piece)
                if ids is None:
                    ids = tok.encode(piece, add_special_tokens=False).ids
                    if len(piece) >= self.MIN_CACHED_CHARS:
                        cache[piece] = ids
                        if len(cache) > self.max_entries:
                            cache.popitem(last=False)
                else:
                    cache.move_to_end(piece)
                out.extend(ids)
        return out


def prompt_token_ids(
    renderer: PromptRenderer, kind: str, body: dict[str, Any], segments: SegmentCache | None = None
) -> list[int] | None:
    """The token ids the engine will compute for this request (the core's one prompt path on the request's own
    JSON), or None when it cannot be known. Raises what the template raises for a conversation it rejects."""
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        kwargs = body.get("chat_template_kwargs")
        tools = body.get("tools")
        return renderer.chat_token_ids(
            messages,
            bool(body.get("add_generation_prompt", True)),
            continue_final_message=bool(body.get("continue_final_message", False)),
            chat_template_kwargs=kwargs if isinstance(kwargs, dict) else None,
            tools=tools if isinstance(tools, list) else None,
            encode=segments.encode if segments is not None else None,
        )
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0] if not isinstance(prompt[0], int) else prompt
    if isinstance(prompt, str):
        return renderer.encode(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))
    if isinstance(prompt, list) and all(isinstance(t, int) and 0 <= t <= _MAX_TOKEN_ID for t in prompt):
        return prompt  # (ids no vocabulary has are the engine's to refuse; they hash as text here)
    return None


def prompt_text(kind: str, body: dict[str, Any]) -> str:
    if kind == "chat":
        return dumps(body.get("messages"))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else dumps(prompt)


class PromptHasher:
    """Per model: a renderer built from a replica's tokenizer info, and the block size its KV events use."""

    def __init__(self, fetch_info: Callable[[str], Awaitable[TokenizerInfo | None]]):
        self._fetch_info = fetch_info
        self._renderers: dict[str, PromptRenderer] = {}
        self._segments: dict[str, SegmentCache] = {}
        self._loading: dict[str, asyncio.Task[PromptRenderer | None]] = {}
        self._failed_at: dict[str, float] = {}
        self.block_sizes: dict[str, int] = {}

    def prefetch(self, model: str) -> None:
        """Start loading a model's tokenizer in the background (when a replica serving it turns healthy)."""
        if model not in self._renderers and model not in self._loading and not self._recently_failed(model):
            self._loading[model] = asyncio.get_running_loop().create_task(self._load(model))

    def settled(self, model: str) -> bool:
        """The model's tokenizer is loaded, or its loading ended without one (none is in progress)."""
        return model in self._renderers or model not in self._loading

    def _recently_failed(self, model: str) -> bool:
        return time.monotonic() - self._failed_at.get(model, -1e9) < _REFETCH_AFTER

    async def renderer(self, model: str) -> PromptRenderer | None:
        r = self._renderers.get(model)
        if r is not None:
            return r
        self.prefetch(model)
        task = self._loading.get(model)
        return await asyncio.shield(task) if task is not None else None

    async def _load(self, model: str) -> PromptRenderer | None:
        try:
            info = await self._fetch_info(model)
            if info is None:
                self._failed_at[model] = time.monotonic()
                return None
            # building a tokenizer from a multi-MB tokenizer.json takes a while: keep the event loop free
            r = await asyncio.to_thread(PromptRenderer, info)
            self._segments[model] = await asyncio.to_thread(SegmentCache, r)
            self._renderers[model] = r
            log.info("tokenizer for model %s loaded from a replica", model)
            return r
        except Exception as e:  # any failure leaves us on text hashing, retried later
            log.warning("tokenizer for %s unavailable: %s", model, e)
            self._failed_at[model] = time.monotonic()
            return None
        finally:
            self._loading.pop(model, None)

    async def token_ids(self, model: str, kind: str, body: dict[str, Any]) -> list[int] | None:
        """The prompt token ids the engine will compute for this request: the input of the router's block hashes.
        None while the model's tokenizer is unknown, or when the template rejects the conversation (that error
        is the engine's to report; routing only loses affinity)."""
        renderer = await self.renderer(model)
        if renderer is None:
            return None
        try:
            if _size_hint(kind, body) > _THREAD_ABOVE_CHARS:  # a long prompt: tokenize off the event loop
                return await asyncio.to_thread(prompt_token_ids, renderer, kind, body)
            return prompt_token_ids(renderer, kind, body, self._segments.get(model))
        except Exception as e:
            log.debug("could not render prompt for routing: %s", e)
            return None

    async def key(self, model: str, kind: str, body: dict[str, Any]) -> PromptKey:
        extra = body.get("cache_salt") or ""
        extra = extra if isinstance(extra, str) else ""
        ids = await self.token_ids(model, kind, body)
        if ids is not None:
            bs = self.block_sizes.get(model, DEFAULT_BLOCK_SIZE)
            return PromptKey(hash_blocks(ids, bs, extra), True, bs)
        return PromptKey(text_block_hashes(prompt_text(kind, body), extra), False, TEXT_BLOCK_TOKENS)


_THREAD_ABOVE_CHARS = 32_000
_MAX_TOKEN_ID = 2**32 - 1  # block hashes pack ids as uint32


def _size_hint(kind: str, body: dict[str, Any]) -> int:
    if kind == "chat":
        msgs = body.get("messages")
        if isinstance(msgs, list):
            return sum(
                len(m.get("content") or "") for m in msgs if isinstance(m, dict) and isinstance(m.get("content"), str)
            )
        return 0
    p = body.get("prompt")
    return len(p) if isinstance(p, str) else 0
