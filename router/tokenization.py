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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import xxhash

from kubellm.block_hash import DEFAULT_BLOCK_SIZE, hash_blocks
from kubellm.prompt import PromptRenderer, TokenizerInfo
from kubellm.router.request_body import dumps_bytes

log = logging.getLogger("kubellm.router.tokenization")

# The approximate key's block, in UTF-8 bytes of the prompt (~4 a token: 256 stand for ~64 tokens). Router-internal:
# only the router's own record of its sends is keyed by it (GUIDE.md §2's token blocks are what engines and KV events
# use), so its size trades nothing but the key's resolution against its cost. Every block costs a digest and an LRU
# touch per request (~0.5 us live, in Python); 64 gave a 2 kB chat ~33 of them, ~36 us of a routed request's CPU
# (docs/router.md, seventh round); 256 gives 8, and a shared head is still found to within ~64 tokens, finer than the
# prefix policy's own floor (--prefix-min-match-tokens 64). `kubellm router --text-block-chars` sets it.
TEXT_BLOCK_CHARS = 256
CHARS_PER_TOKEN = 4  # what a text block stands for in tokens, for the policy's minimum match in tokens
_TEXT_DOMAIN = b"kubellm-text/2|"
_REFETCH_AFTER = 10.0  # seconds between attempts to fetch a tokenizer that was not available
# Text to tokenize (what the segment cache does not already hold) longer than this is tokenized in a worker thread:
# the Rust tokenizer releases the GIL, so the event loop keeps serving meanwhile (bench/router.py tokenize measures
# the loop's CPU per prompt). Routing stays one step after hashing (pick and record with no await between), so
# requests whose hashing finishes out of order still see each other's placements: a shared new prefix follows
# whichever of them was placed first, and no hit is lost.
OFFLOAD_ABOVE_CHARS = 1024


@dataclass
class PromptKey:
    hashes: list[int]
    exact: bool  # token-block hashes as the engine computes them (else text-block hashes)
    block_tokens: int = DEFAULT_BLOCK_SIZE  # tokens per block (for text blocks, an estimate)


def text_block_hashes(text: str, extra: str = "", block_chars: int = TEXT_BLOCK_CHARS) -> list[int]:
    """Chained 64-bit hashes of the text's full `block_chars`-byte blocks: each block's xxh3_64 is seeded with the
    previous hash (one call per block, no concatenation). Blocks are sliced from bytes, not a memoryview: a 64-byte
    copy costs less than a view's creation (~30% of this function on a 2 kB prompt).

    Router-internal: these hashes only ever meet the router's own record of its sends (the approximate index and its
    pending blocks), never an engine's KV events or another router process, so their definition is this module's to
    change. 64 bits, not the token blocks' 128 (GUIDE.md §2): a 64-bit digest, its seed and the index keys made from
    it cost about half as much per block (bench/router.py stages), and a false match among the approximate index's
    200k entries is a ~1e-9 event that costs one cache miss, not a wrong answer. The domain differs from
    hash_blocks' root, so a text hash is never taken for a token-block hash."""
    return bytes_block_hashes(text.encode("utf-8", "surrogatepass"), extra, block_chars)


def bytes_block_hashes(data: bytes, extra: str = "", block_chars: int = TEXT_BLOCK_CHARS) -> list[int]:
    """text_block_hashes of text already encoded as UTF-8 (the router's serializer writes bytes: no decode and
    re-encode of the prompt on the hot path)."""
    h = xxhash.xxh3_64_intdigest(_TEXT_DOMAIN + extra.encode())
    out = []
    digest = xxhash.xxh3_64_intdigest
    for start in range(0, len(data) - block_chars + 1, block_chars):
        h = digest(data[start : start + block_chars], h)
        out.append(h)
    return out


class TextBlockHasher:
    """bytes_block_hashes with the chat history's blocks cached: a conversation sends its earlier messages again with
    every turn (and a tenant's system prompt heads all its conversations), so the blocks that lie wholly before the
    last message are looked up in chunks of `chunk_blocks` blocks (~CHUNK_CHARS bytes), one digest of the chunk's
    bytes (seeded with the chain's hash before it) instead of a digest per block. The last message, new with every
    turn, is hashed block by block and never cached (a chat of 12 turns, ~11 kB, at 64-byte blocks: 43 -> 19 us hot).
    The hashes are bytes_block_hashes' own, bit for bit (a chunk's entry is the chain it computed from that hash):
    only the cost changes. Bounded: `max_chunks` entries, least recently used dropped."""

    CHUNK_CHARS = 1024

    def __init__(self, max_chunks: int = 1024, block_chars: int = TEXT_BLOCK_CHARS):
        if block_chars < 1:
            raise ValueError(f"text blocks need at least 1 byte, got {block_chars}")
        self.max_chunks = max_chunks
        self.block_chars = block_chars
        self.chunk_blocks = max(1, self.CHUNK_CHARS // block_chars)
        # a history shorter than two chunks is hashed block by block: one chunk's lookup saves a few digests at best,
        # less than finding where the last message starts costs (a 2 kB chat: 5.2 -> 4.2 us hot)
        self.min_history = 2 * block_chars * self.chunk_blocks
        self.block_tokens = max(1, block_chars // CHARS_PER_TOKEN)
        self._chunks: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._roots: dict[str, int] = {}  # extra (cache_salt) -> the chain's first seed

    def _root(self, extra: str) -> int:
        h = self._roots.get(extra)
        if h is None:
            h = xxhash.xxh3_64_intdigest(_TEXT_DOMAIN + extra.encode())
            if len(self._roots) >= 1024:  # (cache salts are per tenant: a few; never unbounded)
                self._roots.clear()
            self._roots[extra] = h
        return h

    def hashes(self, data: bytes, extra: str = "", history: int = 0) -> list[int]:
        """bytes_block_hashes(data, extra), the blocks within data[:history] (the earlier messages) from the cache."""
        bc = self.block_chars
        h = self._root(extra)
        out: list[int] = []
        digest = xxhash.xxh3_64_intdigest
        start = 0
        step = bc * self.chunk_blocks
        if history >= self.min_history:
            chunks = self._chunks
            chunk_key = xxhash.xxh3_128_intdigest
            while start + step <= history:
                chunk = data[start : start + step]
                key = chunk_key(chunk, h)
                got = chunks.get(key)
                if got is None:
                    blocks = []
                    for i in range(0, step, bc):
                        h = digest(chunk[i : i + bc], h)
                        blocks.append(h)
                    chunks[key] = tuple(blocks)
                    while len(chunks) > self.max_chunks:
                        chunks.popitem(last=False)
                    out += blocks
                else:
                    chunks.move_to_end(key)
                    out += got
                    h = got[-1]
                start += step
        for i in range(start, len(data) - bc + 1, bc):
            h = digest(data[i : i + bc], h)
            out.append(h)
        return out

    def key(self, kind: str, body: dict[str, Any], extra: str) -> PromptKey:
        """The text-block key of a request (its prompt_bytes hashed), the chat history's blocks from the cache."""
        if kind == "chat":
            messages = body.get("messages")
            data = dumps_bytes(messages)
            history = 0
            if len(data) >= self.min_history and isinstance(messages, list) and messages:
                last = messages[-1]
                content = last.get("content") if isinstance(last, dict) else None
                # (the history is at most the bytes before the last message's text: skip what cannot reach the bound)
                if not isinstance(content, str) or len(data) - len(content) >= self.min_history:
                    # where the last message starts: its compact JSON is the same bytes standalone as inside the list
                    history = len(data) - 1 - len(dumps_bytes(last))
            return PromptKey(self.hashes(data, extra, history), False, self.block_tokens)
        return PromptKey(self.hashes(prompt_bytes(kind, body), extra), False, self.block_tokens)

    def __len__(self) -> int:
        return len(self._chunks)


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
        parts, misses = self.lookup(text)
        return self.fill(parts, encode_pieces(self.renderer, misses))

    def lookup(self, text: str) -> tuple[list[str | list[int]], list[str]]:
        """The text's pieces in order: cached ids where known, else the piece itself (also listed in `misses`, each
        once) for `fill` once encoded. Only the event loop's thread touches the cache (no lock needed)."""
        assert self._split is not None
        parts: list[str | list[int]] = []
        misses: dict[str, None] = {}
        cache = self._cache
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:
                parts.append([self._ids[piece]])
            elif piece:
                ids = cache.get(piece)
                if ids is None:
                    parts.append(piece)
                    misses[piece] = None
                else:
                    cache.move_to_end(piece)
                    parts.append(ids)
        return parts, list(misses)

    def fill(self, parts: list[str | list[int]], encoded: dict[str, list[int]]) -> list[int]:
        out: list[int] = []
        cache = self._cache
        for part in parts:
            if isinstance(part, str):
                ids = encoded[part]
                if len(part) >= self.MIN_CACHED_CHARS and part not in cache:
                    cache[part] = ids
                    if len(cache) > self.max_entries:
                        cache.popitem(last=False)
                out.extend(ids)
            else:
                out.extend(part)
        return out


def encode_pieces(renderer: PromptRenderer, pieces: list[str]) -> dict[str, list[int]]:
    """Plain encodings of text pieces (no special tokens added); safe in a worker thread (the Rust tokenizer
    releases the GIL while it encodes)."""
    tok = renderer.tokenizer
    return {p: tok.encode(p, add_special_tokens=False).ids for p in pieces}


def prompt_source(renderer: PromptRenderer, kind: str, body: dict[str, Any]) -> tuple[str, bool] | list[int] | None:
    """What the engine will tokenize for this request: (text, add_special_tokens), token ids the request gives
    itself, or None when it cannot be known. Renders a chat's template (Python, on the caller's thread). Raises
    what the template raises for a conversation it rejects."""
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        kwargs = body.get("chat_template_kwargs")
        tools = body.get("tools")
        text = renderer.render_chat(
            messages,
            bool(body.get("add_generation_prompt", True)),
            continue_final_message=bool(body.get("continue_final_message", False)),
            chat_template_kwargs=kwargs if isinstance(kwargs, dict) else None,
            tools=tools if isinstance(tools, list) else None,
        )
        return text, False  # the template writes the BOS itself where the model wants one
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0] if not isinstance(prompt[0], int) else prompt
    if isinstance(prompt, str):
        return prompt, bool(body.get("add_special_tokens", True))
    if isinstance(prompt, list) and all(isinstance(t, int) and 0 <= t <= _MAX_TOKEN_ID for t in prompt):
        return prompt  # (ids no vocabulary has are the engine's to refuse; they hash as text here)
    return None


def prompt_token_ids(
    renderer: PromptRenderer, kind: str, body: dict[str, Any], segments: SegmentCache | None = None
) -> list[int] | None:
    """The token ids the engine will compute for this request (the core's one prompt path on the request's own
    JSON), or None when it cannot be known. Raises what the template raises for a conversation it rejects."""
    src = prompt_source(renderer, kind, body)
    if src is None or isinstance(src, list):
        return src
    text, special = src
    if kind == "chat" and segments is not None:
        return segments.encode(text)
    return renderer.encode(text, add_special_tokens=special)


def prompt_text(kind: str, body: dict[str, Any]) -> str:
    return prompt_bytes(kind, body).decode("utf-8", "surrogatepass")


def prompt_bytes(kind: str, body: dict[str, Any]) -> bytes:
    """What the text-block hashes cover, as UTF-8: a chat's messages as compact JSON, a completion's prompt text (the
    first one of a list), anything else as compact JSON."""
    if kind == "chat":
        return dumps_bytes(body.get("messages"))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]
    return prompt.encode("utf-8", "surrogatepass") if isinstance(prompt, str) else dumps_bytes(prompt)


class PromptHasher:
    """Per model: a renderer built from a replica's tokenizer info, and the block size its KV events use. With
    `tokenizer=False` it never fetches one: every key is text blocks (the approximate index alone; bench/router.py
    routing measures that mode's hit rate with `--router-arg "--tokenizer off"`)."""

    def __init__(
        self,
        fetch_info: Callable[[str], Awaitable[TokenizerInfo | None]],
        offload_above_chars: int | None = OFFLOAD_ABOVE_CHARS,
        threads: int = 2,
        text_block_chars: int = TEXT_BLOCK_CHARS,
        tokenizer: bool = True,
    ):
        self._fetch_info = fetch_info
        self.use_tokenizer = tokenizer
        self._renderers: dict[str, PromptRenderer] = {}
        self._segments: dict[str, SegmentCache] = {}
        self._loading: dict[str, asyncio.Task[PromptRenderer | None]] = {}
        self._failed_at: dict[str, float] = {}
        self.block_sizes: dict[str, int] = {}
        self.offload_above_chars = offload_above_chars  # None: tokenize everything on the event loop
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self.text = TextBlockHasher(block_chars=text_block_chars)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="kubellm-tokenize")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def prefetch(self, model: str) -> None:
        """Start loading a model's tokenizer in the background (when a replica serving it turns healthy)."""
        if (
            self.use_tokenizer
            and model not in self._renderers
            and model not in self._loading
            and not self._recently_failed(model)
        ):
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
            limit = self.offload_above_chars
            if limit is not None and _size_hint(kind, body) > _THREAD_ABOVE_CHARS:  # a huge prompt: all of it
                return await asyncio.get_running_loop().run_in_executor(
                    self._executor(), prompt_token_ids, renderer, kind, body
                )
            src = prompt_source(renderer, kind, body)  # (rendering a template is Python: here, on the loop)
            if src is None or isinstance(src, list):
                return src
            text, special = src
            segments = self._segments.get(model) if kind == "chat" else None
            if segments is not None and segments.enabled:
                parts, misses = segments.lookup(text)
                if limit is not None and sum(len(m) for m in misses) > limit:
                    encoded = await asyncio.get_running_loop().run_in_executor(
                        self._executor(), encode_pieces, renderer, misses
                    )
                else:
                    encoded = encode_pieces(renderer, misses)
                return segments.fill(parts, encoded)
            if limit is not None and len(text) > limit:
                return await asyncio.get_running_loop().run_in_executor(
                    self._executor(), renderer.encode, text, special
                )
            return renderer.encode(text, add_special_tokens=special)
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
        return self.text.key(kind, body, extra)

    def text_key_now(self, model: str, kind: str, body: dict[str, Any]) -> PromptKey | None:
        """The key `key` would give, without a coroutine, when it is sure to be text blocks (the model's tokenizer is
        neither loaded nor loading, and its last fetch failed recently: no fetch to start); else None (await `key`).
        Against engines that serve no tokenizer this is every request, and the awaits cost a visible share of it."""
        if self.use_tokenizer and (
            model in self._renderers or model in self._loading or not self._recently_failed(model)
        ):
            return None
        extra = body.get("cache_salt") or ""
        return self.text.key(kind, body, extra if isinstance(extra, str) else "")


_THREAD_ABOVE_CHARS = 32_000  # rendering too goes to the thread above this
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
