"""A fake LLMEngine with the real engine's interface, for fast tests of the server's own logic.

Byte-level tokenizer (every text round-trips), a ChatML-like template, deterministic "generation" (greedy:
a function of the prompt and position; seeded: a function of the seed), one token per running request per
step, paged-block accounting and KV events computed with the shared block hash. The acceptance tests run
against the real engine on the embedded model; these keep protocol, error, streaming, disconnect, 429 and
drain tests quick and independent of model speed.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from kubellm.block_hash import hash_blocks
from kubellm.engine.config import EngineConfig
from kubellm.engine.outputs import CompletionOutput, EngineStats, Logprob, RequestMetrics, RequestOutput
from kubellm.engine.sampling_params import SamplingParams
from kubellm.engine.server.served_engine import ServedEngine
from kubellm.prompt import PromptRenderer, TokenizerInfo

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LETTERS = "abcdefghijklmnopqrstuvwxyz "


def _byte_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


@dataclass
class _Req:
    rid: str
    prompt: str | None
    prompt_ids: list[int]
    params: Any
    metrics: RequestMetrics
    priority: int
    outs: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    stop_reasons: list[Any] = field(default_factory=list)
    logprobs: list[list[dict[int, Logprob]] | None] = field(default_factory=list)
    rngs: list[random.Random] = field(default_factory=list)
    cached: int = 0
    sent: list[tuple[int, int]] = field(default_factory=list)  # per completion: tokens and text chars already output


class FakeEngine:
    def __init__(self, config: EngineConfig | None = None, step_time: float = 0.002, max_model_len: int = 512):
        self.config = config or EngineConfig(model="fake", served_model_name="fake-model", block_size=4)
        tok = _byte_tokenizer()
        self.tokenizer_info = TokenizerInfo(
            tokenizer_json=tok.to_str(), chat_template=TEMPLATE, eos_token="<|im_end|>", model_max_length=max_model_len
        )
        self.renderer = PromptRenderer(self.tokenizer_info)
        self.max_model_len = max_model_len
        self.model_name = self.config.model_name
        self.step_time = step_time
        self.blocks_total = self.config.num_gpu_blocks_override or 1024
        self.letter_ids = [self.renderer.encode(c, False)[0] for c in LETTERS]
        self._running: dict[str, _Req] = {}
        self._waiting: list[_Req] = []
        self._cached: set[int] = set()
        self._events: list[tuple[str, list[int], int | None]] = []
        self.s = EngineStats(0, 0, 0.0, 0, self.blocks_total, 0, 0, 0, 0, 0)
        self.thread_ids: set[int] = set()
        self.fail_next_step = False
        self.last_step_tokens = 0

    def _touch(self) -> None:
        import threading

        self.thread_ids.add(threading.get_ident())

    @property
    def vocab_size(self) -> int:
        return self.renderer.tokenizer.get_vocab_size(True)

    def default_sampling_params(self) -> dict[str, Any]:
        return {"temperature": 0.0}

    def add_request(
        self,
        request_id: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prompt: str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str = "",
    ) -> str:
        self._touch()
        request_id = request_id or f"fake-{time.monotonic_ns()}"
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt is {len(prompt_token_ids)} tokens long, over max_model_len")
        if "REFUSE" in (prompt or ""):
            raise ValueError("the engine refused this prompt")
        r = _Req(
            request_id, prompt, list(prompt_token_ids), params, RequestMetrics(arrival_time or time.time()), priority
        )
        for i in range(params.n):
            r.outs.append([])
            r.texts.append("")
            r.reasons.append(None)
            r.stop_reasons.append(None)
            r.logprobs.append([] if params.logprobs is not None else None)
            r.sent.append((0, 0))
            seed = None if params.seed is None else params.seed + i
            r.rngs.append(random.Random(seed) if seed is not None else random.Random())
        self._waiting.append(r)
        self.s.prompt_tokens += len(prompt_token_ids) * params.n
        return request_id

    def abort_request(self, request_id: str | list[str]) -> list[RequestOutput]:
        self._touch()
        if isinstance(request_id, list):
            return [out for rid in request_id for out in self.abort_request(rid)]
        r = self._running.pop(request_id, None)
        if r is None:
            r = next((w for w in self._waiting if w.rid == request_id), None)
            if r is None:
                return []
            self._waiting.remove(r)
        for i in range(len(r.reasons)):
            r.reasons[i] = r.reasons[i] or "abort"
        r.metrics.finished_time = time.time()
        return [self._output(r, True)]

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting)

    def _admit(self) -> None:
        bs = self.config.block_size
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            r = self._waiting.pop(0)
            hashes = hash_blocks(r.prompt_ids, bs)
            hit = 0
            for h in hashes:
                if h not in self._cached:
                    break
                hit += 1
            r.cached = hit * bs
            self.s.prefix_queries += len(r.prompt_ids)
            self.s.prefix_hits += r.cached
            new = [h for h in hashes[hit:]]
            if new:
                parent = hashes[hit - 1] if hit else None
                self._events.append(("stored", new, parent))
                self._cached.update(new)
            r.metrics.first_scheduled_time = time.time()
            self._running[r.rid] = r

    def _next_token(self, r: _Req, i: int) -> int:
        p = r.params
        pos = len(r.outs[i])
        if p.temperature == 0:
            k = (sum(r.prompt_ids) + 7 * pos) % len(self.letter_ids)
        else:
            k = r.rngs[i].randrange(len(self.letter_ids))
        return self.letter_ids[k]

    def step(self) -> list[RequestOutput]:
        self._touch()
        if self.fail_next_step:
            raise RuntimeError("injected engine failure")
        self._admit()
        time.sleep(self.step_time)
        outs = []
        now = time.time()
        self.last_step_tokens = 0
        for rid, r in list(self._running.items()):
            for i in range(len(r.outs)):
                if r.reasons[i] is not None:
                    continue
                self.last_step_tokens += 1  # one decode token per running completion
                t = self._next_token(r, i)
                r.outs[i].append(t)
                self.s.generation_tokens += 1
                r.texts[i] = self.renderer.decode(r.outs[i])
                lps = r.logprobs[i]
                if lps is not None and r.params.logprobs is not None:
                    entry = {t: Logprob(-0.25, 1, self.renderer.decode([t]))}
                    for j, alt in enumerate(x for x in self.letter_ids if x != t):
                        if j >= r.params.logprobs - 1:
                            break
                        entry[alt] = Logprob(-3.0 - j, j + 2, self.renderer.decode([alt]))
                    lps.append(entry)
                for s in r.params.stop or []:
                    if s in r.texts[i]:
                        r.texts[i] = r.texts[i][: r.texts[i].index(s)]
                        r.reasons[i], r.stop_reasons[i] = "stop", s
                        break
                if r.reasons[i] is None and len(r.outs[i]) >= r.params.max_tokens:
                    r.reasons[i] = "length"
            if r.metrics.first_token_time is None:
                r.metrics.first_token_time = now
            r.metrics.last_token_time = now
            done = all(x is not None for x in r.reasons)
            if done:
                del self._running[rid]
                r.metrics.finished_time = now
            outs.append(self._output(r, done))
        return outs

    def _output(self, r: _Req, finished: bool) -> RequestOutput:
        """A delta, as the real engine streams: what each completion got since the previous output. Until it
        finishes, text that could still begin a stop string is held back, as the real detokenizer does."""
        comps = []
        hold = max((len(s) - 1 for s in r.params.stop or []), default=0)
        for i in range(len(r.outs)):
            tokens, chars = r.sent[i]
            lps = r.logprobs[i]
            end = len(r.texts[i]) if r.reasons[i] is not None else max(chars, len(r.texts[i]) - hold)
            comps.append(
                CompletionOutput(
                    index=i,
                    text=r.texts[i][chars:end],
                    token_ids=r.outs[i][tokens:],
                    logprobs=lps[tokens:] if lps is not None else None,
                    finish_reason=r.reasons[i],
                    stop_reason=r.stop_reasons[i],
                )
            )
            r.sent[i] = (len(r.outs[i]), end)
        return RequestOutput(r.rid, r.prompt, r.prompt_ids, comps, finished, r.cached, None, r.metrics)

    def stats(self) -> EngineStats:
        bs = self.config.block_size
        used = sum(-(-(len(r.prompt_ids) + max(len(o) for o in r.outs)) // bs) for r in self._running.values())
        self.s.blocks_used = used
        self.s.kv_usage = used / self.blocks_total
        self.s.num_running = len(self._running)
        self.s.num_waiting = len(self._waiting)
        return EngineStats(**vars(self.s))

    def cached_block_hashes(self) -> list[int]:
        return sorted(self._cached)

    def drain_kv_events(self) -> list[tuple[str, list[int], int | None]]:
        ev, self._events = self._events, []
        return ev

    def close(self) -> None:
        """Nothing to release."""


def _conforms(engine: FakeEngine) -> ServedEngine:
    return engine  # the type checker holds the fake to the server's engine interface
