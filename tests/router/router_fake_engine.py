"""A small real HTTP server speaking the engine's HTTP shape, for the router's own tests.

It serves /health, /v1/models, /metrics, /v1/completions and /v1/chat/completions (JSON and SSE),
/v1/tokenizer_info and /v1/kv_events (NDJSON, GUIDE §2). With a tokenizer it hashes each prompt exactly as
the engine's prefix cache does (shared core) and emits `stored` events, so the router's precise mode is
exercised end to end. `kill()` aborts every open connection, like a crashed pod.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web
from tokenizers import Tokenizer, models, pre_tokenizers

from kubellm.block_hash import hash_blocks, to_hex
from kubellm.kv_events import (
    AllBlocksClearedEvent,
    BlockRemovedEvent,
    BlockStoredEvent,
    LoadEvent,
    SnapshotEvent,
    encode_event,
)
from kubellm.prompt import PromptRenderer, TokenizerInfo

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def word_tokenizer_info(n_words: int = 2000) -> TokenizerInfo:
    """A word-level tokenizer (w0 … wN plus chat markers): one token per whitespace-separated word."""
    vocab = {"[UNK]": 0, "<|system|>": 1, "<|user|>": 2, "<|assistant|>": 3}
    for i in range(n_words):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TokenizerInfo(tokenizer_json=tok.to_str(), chat_template=CHAT_TEMPLATE)


def words(start: int, n: int) -> str:
    return " ".join(f"w{(start + i) % 2000}" for i in range(n))


class FakeEngine:
    def __init__(
        self,
        name: str,
        model: str = "m",
        tokenizer: TokenizerInfo | None = None,
        kv_events: bool = True,
        block_size: int = 16,
        capacity_blocks: int = 100_000,
        max_model_len: int = 4096,
    ):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.renderer = PromptRenderer(tokenizer) if tokenizer else None
        self.kv_events = kv_events
        self.kv_event_requests = 0  # GET /v1/kv_events answered, streams and 404s alike
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self.max_model_len = max_model_len
        self.cached: dict[int, None] = {}
        self.epoch = uuid.uuid4().hex
        self.seq = 0
        self.subscribers: list[asyncio.Queue[bytes | None]] = []
        self.subscriptions = 0
        # behaviour knobs
        self.first_chunk_delay = 0.0
        self.first_chunk_gate: asyncio.Event | None = None  # when set: streams wait for it before their first chunk
        self.chunk_interval = 0.0
        self.n_chunks = 3
        self.die_after_chunks: int | None = None
        self.fail_status: int | None = None
        self.health_status = 200
        self.max_running = 1_000_000  # requests beyond this count as waiting (queued) in load lines
        self.snapshot_delay = 0.0  # seconds before a new subscriber gets its snapshot (a large cache)
        self.load_lines = True  # emit `load` lines on the KV-event stream when in_flight changes
        # observations
        self.received: list[dict[str, Any]] = []
        self.targets: list[str] = []  # path and query string of each generate request, as received
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0
        self.completed = 0
        self._transports: set[Any] = set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self, port: int | None = None) -> FakeEngine:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/tokenizer_info", self._tokenizer_info)
        app.router.add_get("/v1/kv_events", self._kv_events)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port if port is not None else self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def kill(self) -> None:
        """Crash: drop every connection (streams die mid-way) and stop listening."""
        for t in list(self._transports):
            t.abort()
        for q in self.subscribers:
            q.put_nowait(None)
        if self.runner:
            await self.runner.cleanup()
            self.runner = None

    async def restart(self) -> None:
        self.cached.clear()
        self.epoch, self.seq = uuid.uuid4().hex, 0
        self.subscribers = []
        await self.start(self.port)

    # --- KV cache ----------------------------------------------------------------------------------
    def _emit(self, event: Any) -> None:
        line = encode_event(event)
        for q in self.subscribers:
            q.put_nowait(line)

    def load(self) -> LoadEvent:
        running = min(self.in_flight, self.max_running)
        return LoadEvent(running=running, waiting=self.in_flight - running, free_blocks=self.capacity_blocks)

    def _load_changed(self) -> None:
        if self.load_lines:
            self._emit(self.load())

    def store(self, hashes: list[int]) -> None:
        new = [h for h in hashes if h not in self.cached]
        for h in hashes:
            self.cached.pop(h, None)
            self.cached[h] = None
        if new:
            self.seq += 1
            self._emit(BlockStoredEvent(seq=self.seq, parent=None, hashes=[to_hex(h) for h in new]))
        evicted = []
        while len(self.cached) > self.capacity_blocks:
            h = next(iter(self.cached))
            del self.cached[h]
            evicted.append(h)
        if evicted:
            self.remove(evicted, already=True)

    def remove(self, hashes: list[int], already: bool = False) -> None:
        if not already:
            hashes = [h for h in hashes if self.cached.pop(h, 0) is None]
        if hashes:
            self.seq += 1
            self._emit(BlockRemovedEvent(seq=self.seq, hashes=[to_hex(h) for h in hashes]))

    def clear(self) -> None:
        self.cached.clear()
        self.seq += 1
        self._emit(AllBlocksClearedEvent(seq=self.seq))

    def prompt_hashes(self, path: str, body: dict[str, Any]) -> list[int]:
        if self.renderer is None:
            return []
        if path.endswith("chat/completions"):
            ids = self.renderer.chat_token_ids(body["messages"])
        else:
            ids = self.renderer.encode(body["prompt"])
        return hash_blocks(ids, self.block_size)

    # --- handlers ----------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status, text="ok")

    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "max_model_len": self.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def _metrics(self, request: web.Request) -> web.Response:
        text = (
            f'vllm:num_requests_running{{model_name="{self.model}"}} {self.in_flight}\n'
            f'vllm:num_requests_waiting{{model_name="{self.model}"}} 0.0\n'
            f'kubellm:kv_cache_blocks_total{{model_name="{self.model}"}} {self.capacity_blocks}\n'
        )
        return web.Response(text=text)

    async def _tokenizer_info(self, request: web.Request) -> web.Response:
        if self.tokenizer is None:
            return web.json_response({"error": {"message": "no tokenizer"}}, status=404)
        return web.Response(body=self.tokenizer.model_dump_json(), content_type="application/json")

    async def _kv_events(self, request: web.Request) -> web.StreamResponse:
        self.kv_event_requests += 1
        if not self.kv_events:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.subscribers.append(q)
        self.subscriptions += 1
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        self._transports.add(request.transport)
        await asyncio.sleep(self.snapshot_delay)
        snap = SnapshotEvent(
            epoch=self.epoch, seq=self.seq, block_size=self.block_size, hashes=[to_hex(h) for h in self.cached]
        )
        try:
            await resp.write(encode_event(snap))
            if self.load_lines:
                await resp.write(encode_event(self.load()))
            while (line := await q.get()) is not None:
                await resp.write(line)
        finally:
            if q in self.subscribers:
                self.subscribers.remove(q)
        return resp

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self._transports.add(request.transport)
        body = await request.json()
        self.received.append(body)
        self.targets.append(request.raw_path)
        if self.fail_status:
            return web.json_response({"error": {"message": "injected", "type": "x"}}, status=self.fail_status)
        if body.get("model") != self.model:
            return web.json_response({"error": {"message": "unknown model", "type": "not_found"}}, status=404)
        chat = request.path.endswith("chat/completions")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._load_changed()
        try:
            self.store(self.prompt_hashes(request.path, body))
            rid = request.headers.get("X-Request-Id", uuid.uuid4().hex)
            if not body.get("stream"):
                await asyncio.sleep(self.first_chunk_delay + self.chunk_interval * self.n_chunks)
                text = " ".join([self.name] * self.n_chunks)
                choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                self.completed += 1
                return web.json_response(
                    {
                        "id": rid,
                        "object": "chat.completion" if chat else "text_completion",
                        "created": int(time.time()),
                        "model": self.model,
                        "choices": [choice],
                        "usage": {"prompt_tokens": 1, "completion_tokens": self.n_chunks, "total_tokens": 4},
                    },
                    headers={"X-Request-Id": rid},
                )
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Request-Id": rid})
            await resp.prepare(request)
            if self.first_chunk_gate is not None:
                await self.first_chunk_gate.wait()
            await asyncio.sleep(self.first_chunk_delay)
            for i in range(self.n_chunks):
                if self.die_after_chunks is not None and i >= self.die_after_chunks:
                    request.transport.abort()  # type: ignore[union-attr]
                    return resp
                if i:
                    await asyncio.sleep(self.chunk_interval)
                piece = self.name + " "
                choice = {"index": 0, "finish_reason": "stop" if i == self.n_chunks - 1 else None, "logprobs": None}
                choice.update({"delta": {"content": piece}} if chat else {"text": piece})
                obj = "chat.completion.chunk" if chat else "text_completion"
                chunk = {"id": rid, "object": obj, "created": 0, "model": self.model, "choices": [choice]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            self.completed += 1
            return resp
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
            self._load_changed()
