"""`LLMEngine`: the step loop joining scheduler, model runner, sampler and detokenizer.

Single-threaded by design: the server's async loop owns one engine thread that calls add/abort/step.
A request with n > 1 fans out into n child sequences (sharing their prompt blocks through the prefix
cache) whose results are gathered back under the parent's id.

Async scheduling (on by default on CUDA): a step queues its forward and sampling on the GPU and returns the
tokens of the *previous* step, so the host's work (reading tokens back, stop checks, detokenizing, outputs,
scheduling and planning the next batch) overlaps the GPU's. A request's newest token is then a PLACEHOLDER
the model runner fills on the device from the previous step's sampled ids (under tensor parallelism rank 0
broadcasts them to the workers, stream-ordered). The price: a request that stops
on EOS or a stop string has already been scheduled for one more step, whose token is dropped. Requests with
penalties need their real token history to sample, so while any is live the engine steps synchronously.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from kubellm.builtin_models import resolve_model
from kubellm.engine.config import EngineConfig
from kubellm.engine.detokenizer import IncrementalDetokenizer
from kubellm.engine.forward_batch import TokenFill
from kubellm.engine.kv_cache_manager import KVCacheManager, KVEvent
from kubellm.engine.loader import load_tokenizer
from kubellm.engine.outputs import (
    CompletionOutput,
    EngineStats,
    Logprob,
    OutputKind,
    RequestMetrics,
    RequestOutput,
)
from kubellm.engine.request import PLACEHOLDER, Request, RequestStatus
from kubellm.engine.sampler import Sampler, SamplingState
from kubellm.engine.sampling_params import SamplingParams, TokenStop, generation_config_defaults
from kubellm.engine.scheduler import Scheduler, SchedulerOutput
from kubellm.engine.step_runner import ReadyTokens, StepResult, StepRunner
from kubellm.engine.structured_output import (
    GrammarMatcher,
    GrammarRow,
    MaskPrefetcher,
    PrefetchedMasks,
    StructuredOutputManager,
    llguidance_manager,
)
from kubellm.engine.token_bitmask import PinnedBitmaskBuffers, bitmask_words
from kubellm.prompt import PromptRenderer

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 256 * 1024 * 1024


@dataclass(eq=False)
class _Sequence:
    """Engine-side companions of one scheduled sequence: its detokenizer, logprobs and generator."""

    request: Request
    parent_id: str
    index: int
    detokenizer: IncrementalDetokenizer
    sampling_state: SamplingState
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    untexted: list[int] = field(default_factory=list)  # tokens for the detokenizer, fed at the end (final-only)
    grammar: GrammarMatcher | None = None  # structured outputs: advanced over every token the engine keeps
    grammar_row: GrammarRow | None = None  # the prefetcher's view of it, made once (KUBELLM_GRAMMAR_STEP_REUSE)
    # delta outputs: how much of the request's tokens and logprobs earlier outputs carried, and the text since
    sent_tokens: int = 0
    sent_logprobs: int = 0
    new_text: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    children: list[_Sequence] = field(default_factory=list)
    error: str | None = None


@dataclass(eq=False)
class _StepInFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    requests: list[Request]  # the requests that sample this step, in row order
    sampled: StepResult
    rows: dict[str, int] = field(default_factory=dict)  # request id -> row of its token
    grammar: Future[PrefetchedMasks] | None = None  # the prefetcher advancing this step's grammars (it owns them)
    constrained: bool = False  # some row has a grammar (a step without one never looks at grammars when read back)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: Any = None):
        """`loaded` (a LoadedModel) skips loading from disk: several engines can share one set of weights."""
        self.config = config
        start = time.perf_counter()
        model_path = resolve_model(config.model)
        self.runner: StepRunner
        if config.device == "sim":
            from kubellm.engine.sim_runner import SimModelRunner, load_sim_model

            loaded = loaded or load_sim_model(model_path)
            self.runner = SimModelRunner(loaded, config)
        elif config.tensor_parallel_size > 1:
            from kubellm.engine.loader import load_model
            from kubellm.engine.tp_worker import TPModelRunner

            loaded = loaded or load_model(model_path, dtype=config.dtype, lazy=True)  # rank 0 reads its shards only
            self.runner = TPModelRunner(loaded, config)
        else:
            from kubellm.engine.loader import load_model
            from kubellm.engine.model_runner import ModelRunner

            # lazy: each tensor is read as the model takes it, so stacking MoE experts (or fusing q/k/v) never holds
            # a second copy of the checkpoint in host memory
            loaded = loaded or load_model(model_path, dtype=config.dtype, lazy=True)
            self.runner = ModelRunner(loaded, config)
        self.model_config = loaded.config
        self.generation_config: dict[str, Any] = dict(loaded.generation_config or {})
        self.tokenizer_info = loaded.tokenizer_info
        if config.tokenizer:
            self.tokenizer_info = load_tokenizer(config.tokenizer, self.model_config)
        template = config.chat_template if config.chat_template is not None else self.tokenizer_info.chat_template
        self.tokenizer_info = self.tokenizer_info.model_copy(
            update={"chat_template": template, "chat_template_content_format": config.chat_template_content_format}
        )
        self.renderer = PromptRenderer(self.tokenizer_info)
        self.model_name = config.served_model_name or loaded.name
        model_len = self.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        self.eos_token_ids = frozenset(self._eos_ids())

        try:
            num_blocks = self._num_kv_blocks()
            self.max_model_len = self._fit_max_model_len(num_blocks * config.block_size)
            self.runner.allocate_kv_cache(num_blocks)
        except BaseException:
            self.close()  # tensor-parallel workers must not outlive a failed start
            raise
        self._kv_events: list[KVEvent] = []
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, self._kv_events.append)
        self.scheduler = Scheduler(
            self.kv,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            policy=config.scheduling_policy,
            growth_reserve_tokens=config.kv_growth_reserve_tokens,
            long_prefill_token_threshold=config.long_prefill_token_threshold,
        )
        self.sampler = Sampler(eos_token_ids=self.eos_token_ids, seed=config.seed)
        self.structured_outputs: StructuredOutputManager = llguidance_manager(
            self.tokenizer_info.tokenizer_json,
            self.model_config.vocab_size,
            sorted(self.eos_token_ids),
            num_threads=config.grammar_threads,
            num_roots=config.grammar_roots,
            lineage_idle_s=config.grammar_lineage_idle_s,
        )
        self.async_scheduling = self._resolve_async_scheduling(config)
        # KUBELLM_GRAMMAR_PREFETCH: under async scheduling, a worker thread feeds each step's tokens to the grammars
        # and fills the next step's masks while this thread schedules and queues the next forward (off: this thread
        # does both before sampling). Read at each step: a benchmark may flip it between runs.
        self.grammar_prefetch = config.grammar_prefetch
        # KUBELLM_GRAMMAR_BATCH_ACCEPT: a step's grammars advance in one llguidance call that releases the GIL (on the
        # prefetcher's thread or this one). Read at each step, as grammar_prefetch is.
        self.grammar_batch_accept = config.grammar_batch_accept
        # KUBELLM_GRAMMAR_STEP_REUSE / KUBELLM_GRAMMAR_DIRECT_MASKS (with the prefetcher): see EngineConfig. Read at
        # each step, as grammar_prefetch is.
        self.grammar_step_reuse = config.grammar_step_reuse
        self.grammar_direct_masks = config.grammar_direct_masks
        self._previous_masks: PrefetchedMasks | None = None  # the masks the last sampling took (their fill plan)
        self._prefetcher = MaskPrefetcher(  # its thread starts on first use
            self.structured_outputs, config.grammar_switch_interval_ms / 1e3 or None
        )
        self._prefetched: PrefetchedMasks | None = None  # the last step read back's, for the sampling after it
        self._mask_buffers = (  # KUBELLM_GRAMMAR_PINNED_MASKS: masks filled straight into pinned memory (CUDA)
            PinnedBitmaskBuffers(bitmask_words(self.model_config.vocab_size))
            if config.grammar_pinned_masks and self.runner.device.type == "cuda"
            else None
        )
        from kubellm.engine import sampling_kernels  # compile the CUDA sampling kernel now, not on a request

        sampling_kernels.warm_up(self.runner.device, self.model_config.vocab_size)
        self._in_flight: _StepInFlight | None = None
        self._num_exact_history = 0  # live sequences whose sampling reads their token values (penalties)
        # DELTA: step() returns, for every request that got a token, what is new (what streaming needs);
        # FINAL_ONLY: offline callers get each request once, whole, when it finishes, and skip the rest.
        self.output_kind = OutputKind.DELTA
        self._parents: dict[str, _Parent] = {}
        self._seqs: dict[str, _Sequence] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.last_step_tokens = 0
        self.startup_seconds = time.perf_counter() - start
        logger.info(
            "engine ready: model=%s device=%s kv_blocks=%d (%d tokens) max_model_len=%d in %.1fs",
            self.model_name, config.device, num_blocks, num_blocks * config.block_size, self.max_model_len,
            self.startup_seconds,
        )  # fmt: skip

    def close(self) -> None:
        """Release what outlives the object otherwise: tensor-parallel worker processes (a no-op at TP 1), the
        grammar prefetcher's thread."""
        prefetcher = getattr(self, "_prefetcher", None)  # (close() also runs on a failed start, before it exists)
        if prefetcher is not None:
            prefetcher.close()  # waits for a step the worker may still be on
        structured = getattr(self, "structured_outputs", None)
        if structured is not None:
            structured.close()  # its builder thread may be building a grammar's extra lineage
        self.runner.close()

    # ---- set-up helpers ----------------------------------------------------------------------
    def _eos_ids(self) -> list[int]:
        ids = list(self.model_config.eos_token_ids or [])
        gen_eos = self.generation_config.get("eos_token_id")
        if isinstance(gen_eos, int):
            ids.append(gen_eos)
        elif isinstance(gen_eos, list):
            ids.extend(gen_eos)
        if self.renderer.eos_token_id is not None:
            ids.append(self.renderer.eos_token_id)
        return sorted(set(ids))

    def _resolve_async_scheduling(self, config: EngineConfig) -> bool:
        """auto: on for a CUDA model runner that can fill placeholder tokens (the GPU then runs while the host
        works; also at tensor parallel, whose workers receive each step's sampled ids); off on CPU, where
        nothing runs concurrently, and for the simulated runner."""
        capable = self.runner.supports_token_fill
        if config.async_scheduling is None:
            return capable and self.runner.device.type == "cuda"
        if config.async_scheduling and not capable:
            raise ValueError("async scheduling needs a model runner that fills placeholder tokens (not sim)")
        return config.async_scheduling

    def _fit_max_model_len(self, pool_tokens: int) -> int:
        """One request of max_model_len tokens must fit the KV pool, or it would decode until the pool runs out
        and then fail, losing its output. As vLLM does: an explicit --max-model-len that cannot fit refuses to
        start, naming the largest that fits; the model's own length is clamped to the pool, with a log line."""
        if self.max_model_len <= pool_tokens:
            return self.max_model_len
        on_gpu = getattr(getattr(self.runner, "device", None), "type", None) == "cuda"
        more = "--gpu-memory-utilization or --kv-cache-memory-bytes" if on_gpu else "--kv-cache-memory-bytes"
        if self.config.max_model_len is not None:
            raise ValueError(
                f"max_model_len {self.max_model_len} does not fit the KV cache, which holds {pool_tokens} tokens; "
                f"the largest max_model_len that fits is {pool_tokens}. Lower --max-model-len, or give the KV "
                f"cache more memory ({more})"
            )
        logger.warning(
            "max_model_len lowered from the model's %d to %d: that is what the KV cache holds (give it more "
            "memory with %s)",
            self.max_model_len, pool_tokens, more,
        )  # fmt: skip
        return pool_tokens

    def _num_kv_blocks(self) -> int:
        if self.config.num_gpu_blocks_override:
            return self.config.num_gpu_blocks_override
        per_block = self.runner.kv_cache_bytes_per_block()
        budget = self.config.kv_cache_memory_bytes or self.runner.available_kv_cache_bytes()
        if budget is None:
            budget = CPU_DEFAULT_KV_BYTES
        return max(1, budget // per_block)

    def default_sampling_params(self) -> dict[str, Any]:
        """Sampling defaults from the model's generation_config.json (none with generation_config='vllm'):
        what the server fills a request's omitted fields with, and what offline `make_sampling_params` starts
        from."""
        if self.config.generation_config == "vllm":
            return {}
        return generation_config_defaults(self.generation_config)

    def make_sampling_params(self, **overrides: Any) -> SamplingParams:
        """Explicit values win; fields left as None take the model's defaults."""
        return SamplingParams.from_defaults(self.default_sampling_params(), **overrides)

    # ---- requests ----------------------------------------------------------------------------
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
        """Queue a request; raises ValueError naming the problem (the request is then not queued)."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        n_prompt = len(prompt_token_ids)
        if n_prompt >= self.max_model_len:
            raise ValueError(
                f"the prompt is {n_prompt} tokens long, but this model's maximum context length is "
                f"{self.max_model_len} tokens (prompt plus at least one generated token)"
            )
        if params.structured_outputs is not None:
            self.structured_outputs.compile(params.structured_outputs)  # GrammarError (a ValueError) names the problem
        arrival = arrival_time or time.time()
        room = self.max_model_len - n_prompt
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        parent = _Parent(request_id, prompt, list(prompt_token_ids), params, RequestMetrics(arrival_time=arrival))
        for index in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = replace(params, seed=params.seed + index)
            child_id = request_id if params.n == 1 else f"{index}_{request_id}"
            req = Request(
                request_id=child_id,
                prompt_token_ids=list(prompt_token_ids),
                params=child_params,
                max_tokens=max_tokens,
                eos_token_ids=self.eos_token_ids,
                arrival_time=arrival,
                priority=priority,
                cache_salt=cache_salt,
                block_size=self.config.block_size,
            )
            seq = _Sequence(
                request=req,
                parent_id=request_id,
                index=index,
                detokenizer=IncrementalDetokenizer(
                    self.renderer.tokenizer,
                    req.prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=list(params.stop or []),
                    include_stop_str_in_output=params.include_stop_str_in_output,
                    min_tokens=params.min_tokens,
                ),
                sampling_state=SamplingState.create(
                    child_params, req.prompt_token_ids, req.output_token_ids, device=self.runner.device
                ),
                logprobs=[] if params.logprobs is not None else None,
                grammar=(  # the simulated runner's made-up tokens follow no grammar: validated, not enforced
                    self.structured_outputs.new_matcher(params.structured_outputs)
                    if params.structured_outputs is not None and self.runner.samples_logits
                    else None
                ),
            )
            parent.children.append(seq)
            self._seqs[child_id] = seq
            if child_params.has_penalties:
                self._num_exact_history += 1
        self._parents[request_id] = parent
        for seq in parent.children:
            self.scheduler.add_request(seq.request)
        self.prompt_tokens_total += n_prompt * params.n
        return request_id

    def abort_request(self, request_id: str | list[str]) -> list[RequestOutput]:
        """Abort at once, freeing KV blocks; returns the aborted requests' final outputs."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        outs = []
        for rid in ids:
            parent = self._parents.get(rid)
            if parent is None:
                continue
            for seq in parent.children:
                if not seq.request.status.is_finished:
                    self._finish(seq.request, RequestStatus.FINISHED_ABORTED)
            outs.append(self._finish_parent_if_done(parent, force=True))
        return [o for o in outs if o is not None]

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one batch; return the outputs of the tokens read back this call (this step's
        when stepping synchronously, the previous step's under async scheduling)."""
        touched: dict[str, _Parent] = {}
        overlap = self.async_scheduling and self._num_exact_history == 0
        if not overlap:
            self._read_back(touched)  # the batch below must see every token's real value
        sched = self.scheduler.schedule()
        for req in sched.failed:
            req.drop_pending()
            if req.params.has_penalties:
                self._num_exact_history -= 1
            seq = self._seqs[req.request_id]
            parent = self._parents[seq.parent_id]
            parent.error = req.error
            touched[parent.request_id] = parent
        launched = None
        self.last_step_tokens = sched.batch.num_tokens  # what this step computes (the server's metrics read it)
        if not sched.is_empty:
            now = time.time()
            for req in sched.requests:
                parent = self._parents[self._seqs[req.request_id].parent_id]
                if parent.metrics.first_scheduled_time is None:
                    parent.metrics.first_scheduled_time = now
            launched = self._launch(sched, touched, prefetch=overlap)
        self._read_back(touched)  # the previous step's tokens, while the GPU runs the one just launched
        self._in_flight = launched
        if not overlap:
            self._read_back(touched)
        outputs = []
        for parent in touched.values():
            out = self._finish_parent_if_done(parent)
            if out is None and self.output_kind is OutputKind.DELTA:
                out = self._make_output(parent, finished=False)
            if out is not None:
                outputs.append(out)
        return outputs

    def _launch(self, sched: SchedulerOutput, touched: dict[str, _Parent], prefetch: bool = False) -> _StepInFlight:
        """Queue the batch's forward and its sampling; every sampling request gets a PLACEHOLDER token. Rows with
        a grammar sample once the previous step's tokens are read back and fed to the grammars (`touched`
        collects their outputs): the runner calls `sample` after queueing the forward, so that read-back
        overlaps the GPU's forward. With `prefetch` (async scheduling), the prefetcher then starts on this step's
        tokens: the next step's sampling finds its grammars advanced and its masks filled."""
        fill = self._token_fill(sched)
        seqs = [self._seqs[s.request_id] for s in sched.batch.seqs if s.needs_logits]  # the logits' rows
        constrained = any(s.grammar is not None for s in seqs)
        reqs = self.scheduler.update_after_step(sched)  # bookkeeping only: the batch is already built

        def sample(logits) -> StepResult:
            if not seqs:
                return ReadyTokens([])
            bitmask = None
            if constrained:
                self._read_back(touched)  # the grammars must have seen every token before this one
                # A request finished meanwhile samples unmasked (its grammar may be complete); its token is dropped.
                matchers = [s.grammar if not s.request.status.is_finished else None for s in seqs]
                buffers = self._mask_buffers
                bitmask = self.structured_outputs.bitmask(
                    matchers, self._prefetched, buffers.take if buffers is not None else None
                )
            self._previous_masks, self._prefetched = self._prefetched, None
            return self.sampler.sample(logits, [s.sampling_state for s in seqs], token_bitmask=bitmask)

        sampled = self.runner.execute(sched.batch, fill, sample)
        if not reqs:
            return _StepInFlight([], sampled)
        for req in reqs:
            req.append_placeholder()
            if len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len:
                req.awaiting_final = True  # this token ends it: never schedule past it
        grammar = self._prefetch(reqs, sampled) if prefetch else None
        return _StepInFlight(reqs, sampled, {r.request_id: i for i, r in enumerate(reqs)}, grammar, constrained)

    def _prefetch(self, reqs: list[Request], sampled: StepResult) -> Future[PrefetchedMasks] | None:
        """Start the prefetcher on a launched step whose rows include a grammar (None: off, or no grammar)."""
        previous, self._previous_masks = self._previous_masks, None
        if not self.grammar_prefetch:
            return None
        reuse = self.grammar_step_reuse
        rows: list[GrammarRow | None] = []
        for req in reqs:
            seq = self._seqs[req.request_id]
            if seq.grammar is None or req.status.is_finished:
                rows.append(None)
            elif reuse and seq.grammar_row is not None:
                rows.append(seq.grammar_row)
            else:
                row = GrammarRow(req.request_id, seq.grammar, _finished_check(req), req.eos_token_ids)
                if reuse:
                    seq.grammar_row = row
                rows.append(row)
        if not any(rows):
            return None
        buffers = self._mask_buffers
        direct = reuse and self.grammar_direct_masks and buffers is not None
        return self._prefetcher.submit(
            rows,
            lambda: sampled.result().token_ids,
            self.grammar_batch_accept,
            reuse=reuse,
            previous=previous if reuse else None,
            out=buffers.take if direct else None,  # type: ignore[union-attr]
            finished=(lambda: [r.status.is_finished for r in reqs]) if reuse else None,  # (each row's `dropped`)
        )

    def _token_fill(self, sched: SchedulerOutput) -> TokenFill | None:
        """Where the batch's PLACEHOLDER tokens come from: the in-flight step's sampled ids on the device."""
        prev = self._in_flight
        if prev is None or not prev.rows:
            return None
        seq_indices, rows = [], []
        for i, seq in enumerate(sched.batch.seqs):
            if seq.token_ids[-1] == PLACEHOLDER:
                seq_indices.append(i)
                rows.append(prev.rows[seq.request_id])
        if not seq_indices:
            return None
        return TokenFill(prev.sampled.token_ids, seq_indices, rows)

    def _read_back(self, touched: dict[str, _Parent]) -> None:
        """Wait for the in-flight step's tokens and apply them (stop checks, detokenizer, outputs)."""
        step, self._in_flight = self._in_flight, None
        if step is None or not step.requests:
            return
        outcomes = None
        if step.grammar is not None:  # the prefetcher fed these tokens to the grammars: its outcomes stand
            self._prefetched = self._prefetcher.take(step.grammar)
            outcomes = self._prefetched.outcomes
        out = step.sampled.result()
        if outcomes is None and self.grammar_batch_accept and step.constrained:
            outcomes = self._advance_grammars(step.requests, out.token_ids)
        for req, token, lp in zip(step.requests, out.token_ids, out.logprobs, strict=True):
            if req.status.is_finished:  # aborted, or stopped by the token before this one
                continue
            self._append_token(req, token, lp, touched, outcomes)

    def _advance_grammars(self, reqs: list[Request], tokens: list[int]) -> dict[str, tuple[bool, bool]] | None:
        """KUBELLM_GRAMMAR_BATCH_ACCEPT without the prefetcher: the step's kept tokens fed to their grammars in one
        call, before the rows are applied (each row's outcome is what _append_token would have had from its own
        accept: a row's token is dropped only when its request finished before this step's tokens were read)."""
        pairs, keys = [], []
        for req, token in zip(reqs, tokens, strict=True):
            if req.status.is_finished or token in req.eos_token_ids:  # (a finished request may have left _seqs)
                continue
            grammar = self._seqs[req.request_id].grammar
            if grammar is not None:
                pairs.append((grammar, token))
                keys.append(req.request_id)
        if not pairs:
            return None
        return dict(zip(keys, self.structured_outputs.advance(pairs, batched=True), strict=True))

    def _append_token(
        self,
        req: Request,
        token: int,
        lp,
        touched: dict[str, _Parent],
        grammar_outcomes: dict[str, tuple[bool, bool]] | None = None,
    ) -> None:
        seq = self._seqs[req.request_id]
        parent = self._parents[seq.parent_id]
        touched[parent.request_id] = parent
        now = time.time()
        if parent.metrics.first_token_time is None:
            parent.metrics.first_token_time = now
        parent.metrics.last_token_time = now
        if req.resolve_placeholder(token) and req.status == RequestStatus.RUNNING:
            self.kv.commit_computed(req)  # a block whose last token was in flight can enter the prefix cache
        self.generation_tokens_total += 1
        grammar_done = False
        if seq.grammar is not None and token not in req.eos_token_ids:
            outcome = grammar_outcomes.get(req.request_id) if grammar_outcomes is not None else None
            if outcome is None:  # not prefetched: feed the grammar here
                accepted = seq.grammar.accept_token(token)
                outcome = (accepted, not accepted or seq.grammar.is_terminated())
            if outcome[0]:
                grammar_done = outcome[1]
            else:  # cannot happen while the mask holds; a matcher in error would mask every token, so stop here
                logger.error("request %s: token %d rejected by its grammar; stopping it", req.request_id, token)
                grammar_done = True
        if seq.logprobs is not None and lp is not None:
            seq.logprobs.append(self._logprob_entry(lp))
            seq.cumulative_logprob += lp.logprob
        params = req.params
        n_out = req.num_resolved_outputs
        status: RequestStatus | None = None
        stop = params.token_stop(token, n_out, req.eos_token_ids)
        if stop is TokenStop.EOS:
            status = RequestStatus.FINISHED_STOPPED
        elif stop is TokenStop.STOP_TOKEN:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
        elif self.output_kind is OutputKind.FINAL_ONLY and not params.stop:  # nobody reads the text before the end
            seq.untexted.append(token)
            if grammar_done:
                status = RequestStatus.FINISHED_STOPPED
            elif n_out >= req.max_tokens or req.num_resolved_tokens >= self.max_model_len:
                status = RequestStatus.FINISHED_LENGTH
        else:
            if seq.untexted:
                seq.new_text.append(seq.detokenizer.add_tokens(seq.untexted).text_delta)
                seq.untexted.clear()
            update = seq.detokenizer.add_token(token)
            seq.new_text.append(update.text_delta)
            if update.stop_string is not None:  # (the detokenizer honours none before min_tokens outputs)
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, update.stop_string
            elif grammar_done:  # the constraint is complete: only the end of the sequence could follow
                status = RequestStatus.FINISHED_STOPPED
            elif n_out >= req.max_tokens or req.num_resolved_tokens >= self.max_model_len:
                status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self._finish(req, status)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Free the request's blocks at once; a token of it still in flight is dropped when it arrives."""
        self.scheduler.finish_request(req.request_id, status)
        req.status = status
        req.drop_pending()
        if req.params.has_penalties:
            self._num_exact_history -= 1

    def _logprob_entry(self, lp) -> dict[int, Logprob]:
        """The sampled token and the top alternatives; tokens a constraint forbade (logprob -inf) are none."""
        entry = {lp.token_id: Logprob(lp.logprob, lp.rank, self.renderer.decode([lp.token_id], False))}
        top = [(tid, value) for tid, value in lp.top if value != float("-inf")]
        for tid, value in top:
            if tid not in entry:
                entry[tid] = Logprob(value, None, self.renderer.decode([tid], False))
        for rank, (tid, _) in enumerate(top, start=1):
            entry[tid].rank = rank
        return entry

    # ---- outputs -----------------------------------------------------------------------------
    def _make_output(self, parent: _Parent, finished: bool) -> RequestOutput:
        """DELTA: each completion carries what is new since the last output; FINAL_ONLY: all of it."""
        delta = self.output_kind is OutputKind.DELTA
        completions = []
        for seq in parent.children:
            req = seq.request
            resolved = req.num_resolved_outputs
            if delta:
                text = "".join(seq.new_text)
                seq.new_text.clear()
                token_ids = req.output_token_ids[seq.sent_tokens : resolved]
                logprobs = seq.logprobs[seq.sent_logprobs :] if seq.logprobs is not None else None
                seq.sent_tokens = resolved
                seq.sent_logprobs = len(seq.logprobs) if seq.logprobs is not None else 0
            else:
                seq.new_text.clear()
                text, token_ids, logprobs = seq.detokenizer.output_text, req.output_token_ids[:resolved], seq.logprobs
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=token_ids,
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                    logprobs=logprobs,
                    finish_reason=_finish_reason(req.status),
                    stop_reason=req.stop_reason,
                )
            )
        first = parent.children[0].request
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=max(first.num_cached_tokens, 0),
            error=parent.error,
            metrics=parent.metrics,
        )

    def _finish_parent_if_done(self, parent: _Parent, force: bool = False) -> RequestOutput | None:
        done = force or parent.error is not None or all(s.request.status.is_finished for s in parent.children)
        if not done:
            return None
        if parent.error is not None:
            for seq in parent.children:
                if not seq.request.status.is_finished:
                    self._finish(seq.request, RequestStatus.FINISHED_ABORTED)
        for seq in parent.children:
            seq.new_text.append(seq.detokenizer.add_tokens(seq.untexted).text_delta)
            seq.new_text.append(seq.detokenizer.finish().text_delta)
            self._seqs.pop(seq.request.request_id, None)
        self._parents.pop(parent.request_id, None)
        parent.metrics.finished_time = time.time()
        return self._make_output(parent, finished=True)

    # ---- observability -----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=self.kv.usage,
            blocks_used=self.kv.num_used_blocks,
            blocks_total=self.kv.num_blocks,
            prefix_queries=self.kv.stats.queries,
            prefix_hits=self.kv.stats.hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
        )

    def cached_block_hashes(self) -> list[int]:
        return self.kv.cached_block_hashes()

    def drain_kv_events(self) -> list[KVEvent]:
        events = list(self._kv_events)
        self._kv_events.clear()
        return events

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()


def _finish_reason(status: RequestStatus) -> str | None:
    if status == RequestStatus.FINISHED_ERROR:
        return "abort"
    return status.value if status.is_finished else None


def _finished_check(req: Request) -> Callable[[], bool]:
    """For the prefetcher's thread: whether the engine has finished `req` (it then drops the request's tokens)."""
    return lambda: req.status.is_finished
