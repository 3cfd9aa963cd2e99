"""Structured outputs: constraints compiled into grammars, one matcher per sequence, and the token bitmask of a step.

The grammar engine sits behind two small protocols (`GrammarBackend` compiles, `GrammarMatcher` follows one
sequence); `LLGuidanceBackend` implements them with llguidance (JSON Schema, regex, Lark and GBNF grammars).
`StructuredOutputManager` is what the engine and the server use: it compiles through a cache keyed by the
constraint's source (so a schema sent on every request compiles once), bounds the source's size, and fills the
bitmask of a batch's constrained rows on the host, in parallel over rows (llguidance's thread pool).

`MaskPrefetcher` takes that fill off the engine thread's path: once a step's sampling is queued, one worker thread
waits for its tokens, advances the grammars over them and fills the next step's masks, while the engine thread
returns its outputs, schedules the next batch and queues its forward. The next step's sampling then finds its masks
ready (or computes only the rows the worker could not foresee: new requests, resumed ones).

Bitmask layout (llguidance's and vLLM's): int32 words, bit `t % 32` of word `t // 32` set when token t is
allowed; a row of all ones (-1) allows everything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np

from kubellm.engine.sampling_params import StructuredOutputsParams
from kubellm.engine.token_bitmask import TokenBitmask, bitmask_words

logger = logging.getLogger(__name__)

MAX_SOURCE_BYTES = 64 * 1024  # a schema, regex or grammar longer than this is refused (400) before compiling
CACHE_SIZE = 512  # compiled grammars kept, least recently used dropped first
MAX_ERROR_CHARS = 600  # llguidance's messages can quote a whole grammar
# Lineages per fill thread when KUBELLM_GRAMMAR_ROOTS is 0 (the default), and their cap (see _LLGuidanceGrammar).
LINEAGES_PER_THREAD = 4
MAX_LINEAGES = 128
# An idle lineage is freed once idle this long (KUBELLM_GRAMMAR_LINEAGE_IDLE_S): a schema's next burst within it
# finds its lineages built (a burst's sequences take their state at their first fill, from the lineages built by then).
LINEAGE_IDLE_S = 60.0
SWEEP_INTERVAL_S = 1.0  # the manager trims its cached grammars' idle lineages at most this often (on a compile)


class GrammarError(ValueError):
    """The constraint cannot be compiled (invalid schema, regex or grammar, or over a size limit)."""


class GrammarMatcher(Protocol):
    """Follows one sequence through its grammar."""

    position: int  # tokens accepted so far: a prefetched mask is valid only at the position it was filled for

    def accept_token(self, token_id: int) -> bool:
        """Advance over a kept token; False when the grammar does not allow it (the matcher is then in error)."""
        ...

    def is_terminated(self) -> bool:
        """Nothing but the end of the sequence is allowed now."""
        ...


class CompiledGrammar(Protocol):
    def new_matcher(self) -> GrammarMatcher: ...


class GrammarBackend(Protocol):
    vocab_size: int

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Raises GrammarError naming the problem."""
        ...

    def fill_bitmask(self, matchers: Sequence[tuple[GrammarMatcher, int]], bitmask: np.ndarray) -> None:
        """Write each matcher's allowed tokens into row `index` of `bitmask` (int32 [B, words])."""
        ...

    def consume_tokens(self, pairs: Sequence[tuple[GrammarMatcher, int]]) -> list[bool]:
        """Advance each matcher over its token in one call (the GIL released, in parallel over rows); per pair,
        whether the grammar allowed it (see GrammarMatcher.accept_token)."""
        ...

    def terminated(self, matchers: Sequence[GrammarMatcher]) -> list[bool]:
        """Per matcher, GrammarMatcher.is_terminated (one call for a step's rows)."""
        ...

    def prepare(self, matchers: Sequence[GrammarMatcher]) -> Any:
        """What consume_prepared needs of these matchers, made once for the steps that feed the same rows."""
        ...

    def consume_prepared(
        self, prepared: Any, matchers: Sequence[GrammarMatcher], tokens: Sequence[int]
    ) -> list[tuple[bool, bool]]:
        """consume_tokens over matchers[j] and tokens[j] (`prepared`: prepare(matchers)); per row (accepted,
        terminated), as StructuredOutputManager.advance answers."""
        ...

    def fill_plan(self, matchers: Sequence[GrammarMatcher]) -> Any:
        """What fill_planned needs to write matchers[j]'s mask into row j: built once for a set of rows, so a step
        whose rows are the previous step's, in the same order, reuses it (MaskPrefetcher)."""
        ...

    def fill_planned(self, plan: Any, bitmask: np.ndarray) -> None:
        """fill_bitmask over the rows of a fill_plan: row j of `bitmask` gets the plan's matchers[j]'s mask."""
        ...

    def close(self) -> None:
        """Stop background threads (waiting for their work)."""
        ...


# ---- llguidance ------------------------------------------------------------------------------------------


class _LLGuidanceMatcher:
    """One sequence's matcher. Made without its llguidance state: that is copied from a lineage of its grammar when
    first needed (its first fill or token), so a burst of requests that all arrive before their grammar's extra
    lineages are built still spreads over them once they are."""

    def __init__(self, grammar: _LLGuidanceGrammar, matcher: Any = None, lineage: _Lineage | None = None):
        self._grammar = grammar
        self._matcher = matcher
        self.lineage = lineage  # the start matcher its state was copied from (None: not yet copied)
        self.position = 0

    @property
    def matcher(self) -> Any:
        """The llguidance matcher, copied from the least-loaded lineage built when first asked for."""
        if self._matcher is None:
            self._matcher, self.lineage = self._grammar.start_state()
        return self._matcher

    def copy(self) -> _LLGuidanceMatcher:
        """A matcher in this one's state, of its lineage (benchmarks fill copies to time one state twice)."""
        state = self.matcher.deep_copy()
        assert self.lineage is not None
        return self._grammar.adopt(state, self.lineage)

    def accept_token(self, token_id: int) -> bool:
        self.position += 1
        return bool(self.matcher.consume_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_stopped())

    def __del__(self) -> None:
        grammar = getattr(self, "_grammar", None)  # (absent when __init__ failed)
        if grammar is not None:
            grammar.release(self.lineage)


class _Lineage:
    """One independently built start matcher ("root") of a grammar and how many live matchers copy it. llguidance's
    LLMatcher.deep_copy shares the parser's lexer (its lazily built DFA) between a matcher and its copies, behind one
    mutex that a mask fill holds for its whole token-trie walk: copies of one root fill their masks one at a time,
    whatever the thread pool's size (measured with llguidance 1.9.1: 64 copies of one root, 2 threads as slow as 1;
    the same rows over 2 roots, 1.9x). Matchers of different lineages share nothing."""

    __slots__ = ("built_on", "idle_since", "index", "live", "root")

    def __init__(self, root: Any, index: int, now: float):
        self.root = root
        self.index = index
        self.live = 0  # matchers copied from it, still alive
        self.idle_since: float | None = now  # when live last fell to 0 (None: in use)
        self.built_on = threading.current_thread().name


class _LLGuidanceGrammar:
    """A compiled grammar: up to `max_lineages` lineages (_Lineage) that sequences copy, each the least-loaded one's
    when it first needs its state; a fill hands llguidance its rows sorted by lineage, so the pool's threads, which
    take contiguous runs of rows, seldom meet on one lineage's lock. A lineage costs a full grammar build (~0.4-1.1
    ms for small schemas, tens of ms for the largest accepted): the first is the compile's; the others are built by
    the backend's builder threads (`spawn`), never by the thread that asks for a matcher (the engine's), and only as
    many as the grammar has live sequences: a grammar used by one request at a time keeps one. A lineage idle for
    `keep_idle_s` is freed while the grammar holds more than twice as many lineages as live sequences (`trim`: on a
    release, and from the manager's periodic sweep), so an idle cached grammar comes down to one and the cache's
    memory is bounded by the lineages live sequences use (twice as many at most), plus one per cached grammar."""

    def __init__(
        self,
        root: Any,
        build: Callable[[], Any],
        max_lineages: int,
        spawn: Callable[[Callable[[], None]], Future[None]],
        keep_idle_s: float | None = LINEAGE_IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`keep_idle_s`: how long an idle lineage is kept (None: for as long as the grammar is cached)."""
        self._lock = threading.RLock()  # (re-entrant: a matcher's __del__ may run while this thread holds it)
        self._clock = clock
        self.keep_idle_s = keep_idle_s
        self._lineages = [_Lineage(root, 0, clock())]
        self._built = 1  # lineages ever built (each one's index)
        self._build = build
        self._spawn = spawn
        self.max_lineages = max(1, max_lineages)
        self.demand = 0  # live matchers, with or without their state yet
        self._pending = 0  # lineage builds queued or running
        self._settled = threading.Condition(self._lock)
        self.build_errors = 0
        self.lineages_freed = 0  # idle lineages dropped (trim) or builds no longer wanted when done

    @property
    def lineages(self) -> list[_Lineage]:
        with self._lock:
            return list(self._lineages)

    def settle(self, timeout_s: float) -> int:
        """Wait until no lineage build is queued or running (benchmarks, before timing); the lineages built."""
        with self._settled:
            self._settled.wait_for(lambda: self._pending == 0, timeout_s)
            return len(self._lineages)

    def new_matcher(self) -> _LLGuidanceMatcher:
        with self._lock:
            self.demand += 1
            want = min(self.max_lineages, self.demand)
            while not self.build_errors and len(self._lineages) + self._pending < want:
                try:
                    build = self._spawn(self._add_lineage)
                except RuntimeError:  # no builder (the backend closed, or no thread could start): serve on those built
                    logger.warning("structured outputs: no builder thread for another start matcher", exc_info=True)
                    self.build_errors += 1
                    break
                self._pending += 1
                build.add_done_callback(self._dropped_build)
            return _LLGuidanceMatcher(self)

    def start_state(self) -> tuple[Any, _Lineage]:
        """A copy of the least-loaded lineage's start matcher, counted live in that lineage."""
        with self._lock:
            lineage = min(self._lineages, key=lambda x: x.live)
            lineage.live += 1
            lineage.idle_since = None
            return lineage.root.deep_copy(), lineage

    def adopt(self, state: Any, lineage: _Lineage) -> _LLGuidanceMatcher:
        with self._lock:
            self.demand += 1
            lineage.live += 1
            lineage.idle_since = None
            return _LLGuidanceMatcher(self, state, lineage)

    def release(self, lineage: _Lineage | None) -> None:
        """A matcher is gone (its lineage idle from now if it was its last), then `trim`."""
        with self._lock:
            self.demand -= 1
            now = self._clock()
            if lineage is not None:
                lineage.live -= 1
                if lineage.live == 0:
                    lineage.idle_since = now
            self._trim(now)

    def trim(self) -> int:
        """Free lineages idle for keep_idle_s while the grammar holds more than twice as many lineages as live
        sequences (never the last one): a demand that moves by a few sequences neither frees nor rebuilds any, and a
        burst that comes back within keep_idle_s finds its lineages. The lineages freed."""
        with self._lock:
            return self._trim(self._clock())

    def _trim(self, now: float) -> int:
        excess = len(self._lineages) - max(1, 2 * self.demand)
        if excess <= 0 or self.keep_idle_s is None:
            return 0
        keep = self.keep_idle_s
        idle = [x for x in self._lineages if x.idle_since is not None and now - x.idle_since >= keep][:excess]
        if len(idle) == len(self._lineages):  # (never all: one stays to start sequences from)
            idle.pop()
        for x in idle:
            self._lineages.remove(x)
        self.lineages_freed += len(idle)
        return len(idle)

    def _dropped_build(self, build: Future[None]) -> None:
        """A queued build the builder dropped unrun (the backend closed): no longer pending."""
        if build.cancelled():
            with self._lock:
                self._pending -= 1
                self._settled.notify_all()

    def _add_lineage(self) -> None:
        """On a builder thread: one more lineage (llguidance builds with the GIL released)."""
        try:
            root = self._build()
            ok = not root.is_error()
        except Exception:  # (a grammar that compiled once builds again; never let a builder thread die on one)
            logger.exception("structured outputs: building another start matcher failed")
            ok = False
        with self._lock:
            self._pending -= 1
            if not ok:
                self.build_errors += 1
            elif self.keep_idle_s is None or len(self._lineages) < min(self.max_lineages, max(1, self.demand)):
                # (no keep, KUBELLM_GRAMMAR_LINEAGE_IDLE_S=0: kept as before lineages were freed; new_matcher never
                # queues past max_lineages)
                self._lineages.append(_Lineage(root, self._built, self._clock()))
                self._built += 1
            else:  # the sequences that wanted it are gone
                self.lineages_freed += 1
            self._settled.notify_all()


class LLGuidanceBackend:
    """llguidance over the model's own tokenizer (its tokenizer.json) and vocabulary size (the LM head's rows,
    which may exceed the tokenizer's: those ids are never allowed)."""

    def __init__(
        self,
        tokenizer_json: str,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        num_threads: int = 0,
        num_roots: int = 0,
        lineage_idle_s: float = LINEAGE_IDLE_S,
    ):
        """`num_threads`: the mask fill's thread pool (0: one per usable CPU, at most 32); `num_roots`: the most
        lineages (independently built start matchers, _LLGuidanceGrammar) per grammar (0: LINEAGES_PER_THREAD per
        fill thread, at most MAX_LINEAGES; 1: one, every sequence of a grammar sharing one lexer lock);
        `lineage_idle_s`: how long an idle lineage is kept (0: for as long as its grammar is cached)."""
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(
            llguidance_tokenizer_json(tokenizer_json), n_vocab=vocab_size, eos_token=list(eos_token_ids)
        )
        if not num_threads:  # every CPU this process may use (affinity, cgroup quota), at most 32: the thread that
            from kubellm.engine.model_runner import available_cpus  # asks for the fill sleeps until it is done

            num_threads = min(32, available_cpus())
        self.num_threads = num_threads
        self.num_roots = num_roots or min(MAX_LINEAGES, LINEAGES_PER_THREAD * num_threads)
        self.lineage_idle_s: float | None = lineage_idle_s if lineage_idle_s > 0 else None
        self._executor = llguidance.LLExecutor(num_threads)
        self._builder: ThreadPoolExecutor | None = None  # builds grammars' extra lineages, started on first need
        self.num_builders = max(1, num_threads // 4)
        self._builder_lock = threading.Lock()
        self._closed = False  # close() ran: no builder is started again
        logger.info("structured outputs: llguidance fills token masks on %d thread(s)", num_threads)
        self._limits = llguidance.LLParserLimits(verbose_errors=False)

    def grammar_text(self, spec: StructuredOutputsParams) -> str:
        """The llguidance grammar for a constraint (cheap: the expensive part is building the matcher)."""
        llg = self._llg
        kind = spec.kind
        if kind in ("json", "json_object"):
            schema: Any = json.loads(spec.source) if kind == "json" else {"type": "object"}
            options: dict[str, Any] = {"whitespace_flexible": False}
            if spec.whitespace_pattern is not None:
                options = {"whitespace_pattern": spec.whitespace_pattern}
            try:
                return llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
            except ValueError as e:
                raise GrammarError(f"invalid JSON schema: {e}") from None
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.source)
        if kind == "choice":
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice or ()))
        try:
            return llg.grammar_from("grammar", spec.source)  # Lark, or GBNF converted to Lark
        except ValueError as e:
            raise GrammarError(f"invalid grammar: {e}") from None

    def compile(self, spec: StructuredOutputsParams) -> _LLGuidanceGrammar:
        text = self.grammar_text(spec)

        def build() -> Any:
            return self._llg.LLMatcher(self.tokenizer, text, log_level=0, limits=self._limits)

        matcher = build()
        if matcher.is_error():
            raise GrammarError(f"invalid {_KIND_NAMES[spec.kind]}: {_short(matcher.get_error())}")
        return _LLGuidanceGrammar(matcher, build, self.num_roots, self._spawn, self.lineage_idle_s)

    def _spawn(self, job: Callable[[], None]) -> Future[None]:
        """Run `job` on a builder thread (a quarter as many as fill threads: a burst of requests wants its grammar's
        lineages within a step or two; a build never waits on a fill or a fill on a build). RuntimeError once
        closed."""
        with self._builder_lock:
            if self._closed:
                raise RuntimeError("the structured-outputs backend is closed")
            if self._builder is None:
                self._builder = ThreadPoolExecutor(self.num_builders, thread_name_prefix="kubellm-grammar-build")
            return self._builder.submit(job)

    def close(self) -> None:
        with self._builder_lock:
            self._closed = True
            builder, self._builder = self._builder, None
        if builder is not None:
            builder.shutdown(wait=True, cancel_futures=True)  # (a build running finishes; queued ones are dropped)

    def consume_tokens(self, pairs: Sequence[tuple[GrammarMatcher, int]]) -> list[bool]:
        """llguidance's consume_token_par: one call for the whole step, run on the fill's pool with the GIL
        released, where a Python loop of consume_token calls holds the GIL ~2.5 us a row (0.6-0.8 ms at 256 rows,
        measured on the 2-core CI host): the engine thread runs Python meanwhile instead of waiting for it."""
        if not pairs:
            return []
        states = [(_raw(m), t) for m, t in pairs]
        for m, _ in pairs:
            m.position += 1
        if len(states) == 1:  # (llguidance's own single-row case, without the pool)
            return [bool(states[0][0].consume_token(states[0][1]))]
        return [bool(ok) for ok in self._executor.consume_token_par(states)]

    def terminated(self, matchers: Sequence[GrammarMatcher]) -> list[bool]:
        """is_stopped straight on llguidance's matchers: a fifth of the GIL-held time of is_terminated per row."""
        return [_raw(m).is_stopped() for m in matchers]

    def prepare(self, matchers: Sequence[GrammarMatcher]) -> list[Any]:
        """The llguidance matchers themselves (a wrapper's never changes once made)."""
        return [_raw(m) for m in matchers]

    def consume_prepared(
        self, prepared: list[Any], matchers: Sequence[GrammarMatcher], tokens: Sequence[int]
    ) -> list[tuple[bool, bool]]:
        """consume_tokens and terminated without a Python call per row to reach each llguidance matcher."""
        for m in matchers:
            m.position += 1
        if len(prepared) == 1:
            oks = [bool(prepared[0].consume_token(tokens[0]))]
        else:
            oks = self._executor.consume_token_par(list(zip(prepared, tokens, strict=True)))
        return [(bool(ok), not ok or state.is_stopped()) for ok, state in zip(oks, prepared, strict=True)]

    def fill_bitmask(self, matchers: Sequence[tuple[GrammarMatcher, int]], bitmask: np.ndarray) -> None:
        """One call into llguidance's pool, the GIL released throughout. The rows go sorted by lineage: rayon hands
        each thread a contiguous run, so two threads meet on one lineage's lock only where their runs border."""
        if not matchers:
            return
        states = [(_raw(m), row, id(m.lineage)) for m, row in matchers]  # type: ignore[attr-defined]
        states.sort(key=_LINEAGE_OF_STATE)
        self._fill_pairs([(state, row) for state, row, _ in states], bitmask)

    def fill_plan(self, matchers: Sequence[GrammarMatcher]) -> list[tuple[Any, int]]:
        """(llguidance matcher, row) pairs in fill_bitmask's order (by lineage)."""
        return [(state, row) for state, row, _ in sorted(
            [(_raw(m), j, id(m.lineage)) for j, m in enumerate(matchers)],  # type: ignore[attr-defined]
            key=_LINEAGE_OF_STATE,
        )]  # fmt: skip

    def fill_planned(self, plan: list[tuple[Any, int]], bitmask: np.ndarray) -> None:
        if plan:
            self._fill_pairs(plan, bitmask)

    def _fill_pairs(self, pairs: list[tuple[Any, int]], bitmask: np.ndarray) -> None:
        assert bitmask.dtype == np.int32 and bitmask.flags["C_CONTIGUOUS"] and bitmask.ndim == 2
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.ctypes.data, bitmask.shape[1] * 4, bitmask.shape[0])


_LINEAGE_OF_STATE = operator.itemgetter(2)


def _raw(m: Any) -> Any:
    """An _LLGuidanceMatcher's llguidance matcher, without the property call once it exists (the per-row calls of a
    step hold the GIL)."""
    state = m._matcher
    return state if state is not None else m.matcher


def llguidance_tokenizer_json(tokenizer_json: str) -> str:
    """The tokenizer as llguidance must see it to know each token's bytes. llguidance reads a byte-level BPE's
    tokens through its decoder, and recognises one only by a plain ByteLevel decoder; the GGUF loader writes a
    decoder sequence that also serves other vocabularies, through which llguidance would take "Ġ" for the
    bytes of a space. A tokenizer whose pre-tokenizer is byte-level gets the plain decoder; others pass as is."""
    spec = json.loads(tokenizer_json)
    if not _has_byte_level(spec.get("pre_tokenizer")) or (spec.get("decoder") or {}).get("type") == "ByteLevel":
        return tokenizer_json
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return json.dumps(spec)


def _has_byte_level(pre_tokenizer: Any) -> bool:
    if not isinstance(pre_tokenizer, dict):
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre_tokenizer.get("pretokenizers") or ())


_KIND_NAMES = {
    "json": "JSON schema",
    "json_object": "JSON object constraint",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "..."


# ---- the manager ------------------------------------------------------------------------------------------


@dataclass
class CompileStats:
    compiles: int = 0  # cache misses that compiled
    cache_hits: int = 0


@dataclass
class FillStats:
    """The token-mask fills so far (benchmarks read the difference over a run)."""

    calls: int = 0
    rows: int = 0
    seconds: float = 0.0  # wall time inside the fills, on whichever thread ran them
    prefetched_rows: int = 0  # rows whose mask a step found filled ahead by the MaskPrefetcher
    waited_seconds: float = 0.0  # the engine thread's waits for the prefetcher (0 while it keeps ahead)
    batched_accepts: int = 0  # rows advanced through one call per step (KUBELLM_GRAMMAR_BATCH_ACCEPT)
    whole_steps: int = 0  # steps that took the prefetched masks whole (KUBELLM_GRAMMAR_STEP_REUSE)
    reused_plans: int = 0  # prefetcher steps that filled through the previous step's plan (the same rows)
    steady_steps: int = 0  # prefetcher steps that fed the previous step's rows without looking at each row
    # The prefetcher's steps, phase by phase (wall time on its thread, GIL waits included): waiting for the step's
    # tokens, feeding them to the grammars, filling the masks (the GIL released inside llguidance, then taken back).
    worker_steps: int = 0
    worker_tokens_seconds: float = 0.0
    worker_accept_seconds: float = 0.0
    worker_fill_seconds: float = 0.0

    def snapshot(self) -> FillStats:
        return dataclasses.replace(self)


@dataclass
class PrefetchedMasks:
    """What the prefetcher did with one step's tokens: each grammar's outcome (accepted, terminated) under its
    row's key, and the masks of the grammars still running, valid at the positions they were filled for."""

    outcomes: dict[Any, tuple[bool, bool]]
    words: np.ndarray  # int32 [len(matchers), words]
    matchers: list[GrammarMatcher]  # row j of words is matchers[j]'s (kept alive, so their ids stay unique)
    positions: list[int] = field(default_factory=list)
    # KUBELLM_GRAMMAR_STEP_REUSE: the backend's fill plan of `matchers` (the next step reuses it when its rows are
    # these, in order) and, with KUBELLM_GRAMMAR_DIRECT_MASKS, the pinned tensor of `words`' memory (a
    # PinnedBitmaskBuffers buffer the step's sampling copies as is). None: the step took the plain path.
    plan: Any = None
    pinned: Any = None
    layout: StepRows | None = None  # the step's rows as laid out (KUBELLM_GRAMMAR_STEP_REUSE), for the next step
    _index: dict[int, int] | None = None

    def __post_init__(self) -> None:
        self.positions = [m.position for m in self.matchers]

    def row_of(self, matcher: GrammarMatcher) -> int | None:
        """The row of words holding `matcher`'s mask at its current position; None: none was filled for it."""
        if self._index is None:  # (built on first need: the steady state asks `holds` instead)
            self._index = {id(m): j for j, m in enumerate(self.matchers)}
        j = self._index.get(id(matcher))
        return j if j is not None and self.positions[j] == matcher.position else None

    def holds_rows(self, matchers: Sequence[GrammarMatcher]) -> bool:
        """Whether matchers[j] is the matcher of row j of words, for every j (and there is no other row)."""
        mine = self.matchers
        return len(matchers) == len(mine) and all(map(operator.is_, matchers, mine))

    def holds(self, matchers: Sequence[GrammarMatcher]) -> bool:
        """Whether row j of words is matchers[j]'s mask at its current position, for every j (and no other row):
        a step whose constrained rows are the ones the prefetcher filled, in order (the steady state)."""
        return self.holds_rows(matchers) and [m.position for m in matchers] == self.positions


class StructuredOutputManager:
    """Compiles constraints through a cache and builds a step's bitmask. Thread-safe: the server compiles on
    worker threads (so a slow compile never stalls the engine loop) and the engine thread then finds the
    grammar cached. The backend is built on first use: an engine that never sees a constraint never imports
    llguidance or wraps the tokenizer (~0.6 s)."""

    def __init__(
        self,
        backend_factory: Callable[[], GrammarBackend],
        *,
        max_source_bytes: int = MAX_SOURCE_BYTES,
        cache_size: int = CACHE_SIZE,
        on_compile: Callable[[float], None] | None = None,
    ):
        self._factory = backend_factory
        self._backend: GrammarBackend | None = None
        self._backend_error: str | None = None
        self.max_source_bytes = max_source_bytes
        self.cache_size = cache_size
        self.on_compile = on_compile  # seconds of each compile (a metrics histogram observes it)
        self.stats = CompileStats()
        self.fill_stats = FillStats()
        self._cache: OrderedDict[tuple, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._backend_lock = threading.Lock()
        self.sweep_interval_s = SWEEP_INTERVAL_S
        self._next_sweep = 0.0

    @property
    def backend(self) -> GrammarBackend:
        """The grammar engine, built on first use; GrammarError (every time) when it cannot serve this model,
        e.g. a tokenizer whose tokens' bytes llguidance cannot tell."""
        if self._backend is None:
            with self._backend_lock:
                if self._backend is None and self._backend_error is None:
                    try:
                        self._backend = self._factory()
                    except (ValueError, RuntimeError) as e:
                        self._backend_error = f"structured outputs are not available for this model's tokenizer: {e}"
                if self._backend is None:
                    raise GrammarError(self._backend_error)
        return self._backend

    def check_size(self, spec: StructuredOutputsParams) -> None:
        size = len(spec.source.encode()) + len((spec.whitespace_pattern or "").encode())
        if size > self.max_source_bytes:
            raise GrammarError(
                f"the {_KIND_NAMES[spec.kind]} is {size} bytes long; at most {self.max_source_bytes} are accepted"
            )

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar of `spec`, from the cache when it was compiled before; GrammarError otherwise."""
        key = spec.key
        self._sweep()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                return hit
        self.check_size(spec)
        start = time.perf_counter()
        compiled = self.backend.compile(spec)  # concurrent compiles of one key may race: both results are equal
        seconds = time.perf_counter() - start
        if self.on_compile is not None:
            self.on_compile(seconds)
        with self._lock:
            self.stats.compiles += 1
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def new_matcher(self, spec: StructuredOutputsParams) -> GrammarMatcher:
        return self.compile(spec).new_matcher()

    def _sweep(self) -> None:
        """Trim the cached grammars' idle lineages (_LLGuidanceGrammar.trim), at most every sweep_interval_s: a
        grammar no request uses any more has no release left to trim it. Runs on whichever thread compiles (the
        server's request threads, a cache hit included), never on a schedule of its own."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_interval_s
        with self._lock:
            grammars = list(self._cache.values())
        for grammar in grammars:
            trim = getattr(grammar, "trim", None)
            if trim is not None:
                trim()

    def close(self) -> None:
        """Stop the backend's threads, if it was ever built."""
        if self._backend is not None:
            self._backend.close()

    def advance(self, pairs: Sequence[tuple[GrammarMatcher, int]], batched: bool) -> list[tuple[bool, bool]]:
        """Feed each matcher its kept token; per pair (accepted, terminated). `batched`
        (KUBELLM_GRAMMAR_BATCH_ACCEPT): one backend call for all rows, the GIL released (GrammarBackend.consume_tokens);
        otherwise one accept_token call per row."""
        if not pairs:
            return []
        backend = self.backend
        if batched:
            oks = backend.consume_tokens(pairs)
            self.fill_stats.batched_accepts += len(pairs)
        else:
            oks = [m.accept_token(t) for m, t in pairs]
        ended = backend.terminated([m for m, _ in pairs])  # (a matcher in error ends too, whatever it says)
        return [(ok, not ok or end) for ok, end in zip(oks, ended, strict=True)]

    def fill(self, matchers: Sequence[GrammarMatcher]) -> np.ndarray:
        """The masks of `matchers`, row j for matchers[j] (int32 [len, words]); filled by llguidance's thread pool
        with the GIL released."""
        backend = self.backend
        words = np.empty((len(matchers), bitmask_words(backend.vocab_size)), dtype=np.int32)  # every row is written
        self._fill_rows(backend, [(m, j) for j, m in enumerate(matchers)], words)
        return words

    def fill_ahead(
        self,
        matchers: Sequence[GrammarMatcher],
        plan: Any = None,
        out: Callable[[int], tuple[np.ndarray, Any]] | None = None,
    ) -> tuple[np.ndarray, Any, Any]:
        """The prefetcher's fill under KUBELLM_GRAMMAR_STEP_REUSE: `matchers`' masks through `plan` (the backend's
        fill_plan of exactly these matchers in this order, reused from the previous step; None: made now) into a
        new array, or into `out(rows)` (KUBELLM_GRAMMAR_DIRECT_MASKS: the next step's pinned buffer). Returns
        (words, the pinned tensor of their memory or None, the plan)."""
        backend = self.backend
        width = bitmask_words(backend.vocab_size)
        if not matchers:
            return np.empty((0, width), np.int32), None, []
        pinned = None
        if out is None:
            words = np.empty((len(matchers), width), dtype=np.int32)  # every row is written
        else:
            words, pinned = out(len(matchers))
            _check_buffer(words, len(matchers), width)
        if plan is None:
            plan = backend.fill_plan(matchers)
        start = time.perf_counter()
        backend.fill_planned(plan, words)
        self._count_fill(len(matchers), time.perf_counter() - start)
        return words, pinned, plan

    def bitmask(
        self,
        matchers: Sequence[GrammarMatcher | None],
        prefetched: PrefetchedMasks | None = None,
        out: Callable[[int], tuple[np.ndarray, Any]] | None = None,
    ) -> TokenBitmask | None:
        """The bitmask of one step's constrained rows (None when no row has a matcher): rows without one are
        left out and pay nothing. Rows `prefetched` holds at their matcher's position are copied from it; the rest
        are filled now. `out(rows)`: where to write (an int32 [rows, words] array and the pinned tensor of the same
        memory, PinnedBitmaskBuffers.take); every row is written whole."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        backend = self.backend
        width = bitmask_words(backend.vocab_size)
        if prefetched is not None and prefetched.plan is not None:  # KUBELLM_GRAMMAR_STEP_REUSE
            live = cast(  # (every entry a matcher)
                "Sequence[GrammarMatcher]", matchers if len(rows) == len(matchers) else [matchers[i] for i in rows]
            )
            if prefetched.holds(live):  # the steady state: every row prefetched, in order
                self.fill_stats.prefetched_rows += len(rows)
                self.fill_stats.whole_steps += 1
                if out is None or prefetched.pinned is not None:  # a new array, or the pinned buffer it was filled
                    return TokenBitmask(rows, prefetched.words, prefetched.pinned)  # in: handed over as is
                words, pinned = out(len(rows))
                _check_buffer(words, len(rows), width)
                words[:] = prefetched.words
                return TokenBitmask(rows, words, pinned)
        pinned = None
        if out is None:
            words = np.full((len(rows), width), -1, dtype=np.int32)
        else:
            words, pinned = out(len(rows))
            _check_buffer(words, len(rows), width)
        missing: list[tuple[GrammarMatcher, int]] = []
        dst, src = [], []
        for j, r in enumerate(rows):
            matcher = matchers[r]
            assert matcher is not None
            hit = prefetched.row_of(matcher) if prefetched is not None else None
            if hit is None:
                missing.append((matcher, j))
            else:
                dst.append(j)
                src.append(hit)
        if dst:
            assert prefetched is not None
            n = len(dst)
            if dst[-1] - dst[0] == n - 1 and src == list(range(src[0], src[0] + n)):  # (dst ascends: one run)
                words[dst[0] : dst[0] + n] = prefetched.words[src[0] : src[0] + n]  # the steady state: ~3x cheaper
            else:
                words[dst] = prefetched.words[src]
            self.fill_stats.prefetched_rows += len(dst)
        self._fill_rows(backend, missing, words)
        return TokenBitmask(rows, words, pinned)

    def _fill_rows(
        self, backend: GrammarBackend, rows: Sequence[tuple[GrammarMatcher, int]], words: np.ndarray
    ) -> None:
        if not rows:
            return
        start = time.perf_counter()
        backend.fill_bitmask(rows, words)
        self._count_fill(len(rows), time.perf_counter() - start)

    def _count_fill(self, rows: int, seconds: float) -> None:
        stats = self.fill_stats
        stats.calls += 1  # (two threads never fill at once: the engine waits for its prefetcher first)
        stats.rows += rows
        stats.seconds += seconds


def _check_buffer(words: np.ndarray, rows: int, width: int) -> None:
    if words.shape != (rows, width) or words.dtype != np.int32:
        raise ValueError(f"a bitmask buffer of {words.shape} {words.dtype} for {rows} rows")


@dataclass(slots=True)
class GrammarRow:
    """One sampled row of a step, as the prefetcher sees it."""

    key: Any  # names the row's sequence in PrefetchedMasks.outcomes (the engine: its request id)
    matcher: GrammarMatcher
    dropped: Callable[[], bool]  # true when the engine will drop this row's token (its request finished meanwhile)
    passthrough: Collection[int]  # tokens the grammar never sees (EOS: the engine ends the request on them)


@dataclass
class StepRows:
    """A step's rows as the prefetcher lays them out once for every following step with the same rows (the same
    GrammarRow objects in the same order: KUBELLM_GRAMMAR_STEP_REUSE makes each sequence's once)."""

    rows: list[GrammarRow | None]  # a copy (kept alive, so the identity check below means what it says)
    index: list[int] | None  # where the constrained rows are in `rows` (None: every row is)
    keys: list[Any]
    matchers: list[GrammarMatcher]
    passthrough: Collection[int] | None  # the constrained rows' common passthrough (None: theirs differ)
    prepared: Any = None  # the backend's prepare(matchers), made at the first batched steady step

    @classmethod
    def of(cls, rows: Sequence[GrammarRow | None]) -> StepRows:
        constrained = [row for row in rows if row is not None]
        index = None if len(constrained) == len(rows) else [i for i, row in enumerate(rows) if row is not None]
        common = constrained[0].passthrough if constrained else None
        same = all(row.passthrough is common or row.passthrough == common for row in constrained)
        keys, matchers = [r.key for r in constrained], [r.matcher for r in constrained]
        return cls(list(rows), index, keys, matchers, common if same else None)

    def same(self, rows: Sequence[GrammarRow | None]) -> bool:
        return len(rows) == len(self.rows) and all(map(operator.is_, rows, self.rows))


def advance_and_fill(
    manager: StructuredOutputManager,
    rows: Sequence[GrammarRow | None],
    tokens: Callable[[], Sequence[int]],
    batched: bool = False,
    *,
    reuse: bool = False,
    previous: PrefetchedMasks | None = None,
    out: Callable[[int], tuple[np.ndarray, Any]] | None = None,
    finished: Callable[[], Sequence[bool]] | None = None,
) -> PrefetchedMasks:
    """Wait for a step's sampled tokens (`tokens()`, row order), feed each constrained row's token to its grammar,
    unless the engine drops it, and fill the masks of the grammars that go on: what the engine thread would do at
    the start of the next step's sampling, done ahead. `batched`: the accepts in one call that releases the GIL
    (StructuredOutputManager.advance). `finished`: per row of `rows`, whether the engine drops its token, in one
    call (None: each row's `dropped`). `reuse` (KUBELLM_GRAMMAR_STEP_REUSE): the rows laid out once (StepRows) and
    the fill through a plan, both the `previous` step's when its rows are this step's (the steady state: no row
    dropped, no token passed through, then no per-row Python but the accepts' own), the masks filled into
    `out(rows)` when given (KUBELLM_GRAMMAR_DIRECT_MASKS); the result then carries its plan, which lets the next
    step's bitmask take the masks whole (StructuredOutputManager.bitmask)."""
    start = time.perf_counter()
    ids = tokens()
    flags = finished() if finished is not None else None
    got = time.perf_counter()
    layout = None
    if reuse:
        same = previous is not None and previous.layout is not None and previous.layout.same(rows)
        layout = previous.layout if same else StepRows.of(rows)  # type: ignore[union-attr]
    if layout is not None and layout.passthrough is not None and flags is not None:
        index = layout.index
        step_ids = ids if index is None else [ids[i] for i in index]
        dropped = any(flags) if index is None else any([flags[i] for i in index])
        if not dropped and not any(map(layout.passthrough.__contains__, step_ids)):
            if batched:  # (StructuredOutputManager.advance's batched call, without its per-row lists)
                backend = manager.backend
                if layout.prepared is None:
                    layout.prepared = backend.prepare(layout.matchers)
                results = backend.consume_prepared(layout.prepared, layout.matchers, step_ids)
                manager.fill_stats.batched_accepts += len(step_ids)
            else:
                results = manager.advance(list(zip(layout.matchers, step_ids, strict=True)), batched)
            manager.fill_stats.steady_steps += 1
            return _fill_ahead(manager, start, got, layout, layout.keys, layout.matchers, results, previous, out)
    if flags is None:
        kept = [
            (row, token)
            for row, token in zip(rows, ids, strict=True)
            if row is not None and not row.dropped() and token not in row.passthrough
        ]
    else:
        kept = [
            (row, token)
            for row, token, drop in zip(rows, ids, flags, strict=True)
            if row is not None and not drop and token not in row.passthrough
        ]
    results = manager.advance([(row.matcher, token) for row, token in kept], batched)
    if layout is not None:
        keys, matchers = [row.key for row, _ in kept], [row.matcher for row, _ in kept]
        return _fill_ahead(manager, start, got, layout, keys, matchers, results, previous, out)
    outcomes = {row.key: outcome for (row, _), outcome in zip(kept, results, strict=True)}
    live = [row.matcher for (row, _), (_, ended) in zip(kept, results, strict=True) if not ended]
    accepted_at = time.perf_counter()
    words = manager.fill(live) if live else np.empty((0, bitmask_words(manager.backend.vocab_size)), np.int32)
    _count_worker(manager, start, got, accepted_at)
    return PrefetchedMasks(outcomes, words, live)


def _fill_ahead(
    manager: StructuredOutputManager,
    start: float,
    got: float,
    layout: StepRows,
    keys: list[Any],
    matchers: list[GrammarMatcher],
    results: list[tuple[bool, bool]],
    previous: PrefetchedMasks | None,
    out: Callable[[int], tuple[np.ndarray, Any]] | None,
) -> PrefetchedMasks:
    """advance_and_fill's end under KUBELLM_GRAMMAR_STEP_REUSE: the outcomes, then the masks of the grammars that go
    on, through the previous step's plan when they are its rows."""
    outcomes = dict(zip(keys, results, strict=True))
    if any([ended for _, ended in results]):
        live = [m for m, (_, ended) in zip(matchers, results, strict=True) if not ended]
    else:
        live = matchers
    accepted_at = time.perf_counter()
    same = previous is not None and previous.plan is not None and previous.holds_rows(live)
    manager.fill_stats.reused_plans += same
    words, pinned, plan = manager.fill_ahead(live, previous.plan if same else None, out)  # type: ignore[union-attr]
    _count_worker(manager, start, got, accepted_at)
    return PrefetchedMasks(outcomes, words, live, plan=plan, pinned=pinned, layout=layout)


def _count_worker(manager: StructuredOutputManager, start: float, got: float, accepted_at: float) -> None:
    stats = manager.fill_stats
    stats.worker_steps += 1
    stats.worker_tokens_seconds += got - start
    stats.worker_accept_seconds += accepted_at - got
    stats.worker_fill_seconds += time.perf_counter() - accepted_at


class MaskPrefetcher:
    """One worker thread running `advance_and_fill` for the step just queued. Its caller must not touch the
    grammars of a submitted step until it has taken the result (Future.result): the worker advances them.

    `switch_interval` (seconds; None: leave it): the interpreter's GIL switch interval while the worker runs, set
    when its thread starts and put back on close. The worker's Python parts (the accepts, taking the GIL back after
    llguidance's fill) wait for the engine thread to drop the GIL, up to one interval (5 ms by default) each time."""

    def __init__(self, manager: StructuredOutputManager, switch_interval: float | None = None):
        self.manager = manager
        self.switch_interval = switch_interval
        self._pool: ThreadPoolExecutor | None = None
        self._saved_interval: float | None = None

    def submit(
        self,
        rows: Sequence[GrammarRow | None],
        tokens: Callable[[], Sequence[int]],
        batched: bool = False,
        *,
        reuse: bool = False,
        previous: PrefetchedMasks | None = None,
        out: Callable[[int], tuple[np.ndarray, Any]] | None = None,
        finished: Callable[[], Sequence[bool]] | None = None,
    ) -> Future[PrefetchedMasks]:
        """Start `advance_and_fill` on the worker. `batched` (KUBELLM_GRAMMAR_BATCH_ACCEPT): the step's grammars
        advance in one call that releases the GIL, so the worker's only Python is short bookkeeping between calls.
        `reuse`, `previous`, `out`, `finished`: see advance_and_fill (KUBELLM_GRAMMAR_STEP_REUSE and
        KUBELLM_GRAMMAR_DIRECT_MASKS);
        `out` is called on the worker, so the caller takes no buffer from it until it has taken this result."""
        if self._pool is None:
            if self.switch_interval is not None and self.switch_interval > 0:
                self._saved_interval = sys.getswitchinterval()
                sys.setswitchinterval(self.switch_interval)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kubellm-grammar")
        return self._pool.submit(
            advance_and_fill,
            self.manager,
            rows,
            tokens,
            batched,
            reuse=reuse,
            previous=previous,
            out=out,
            finished=finished,
        )

    def take(self, future: Future[PrefetchedMasks]) -> PrefetchedMasks:
        """The worker's result (its exception, if it raised), counting the time the caller waited for it."""
        start = time.perf_counter()
        try:
            return future.result()
        finally:
            self.manager.fill_stats.waited_seconds += time.perf_counter() - start

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._saved_interval is not None:
            sys.setswitchinterval(self._saved_interval)
            self._saved_interval = None


def llguidance_manager(
    tokenizer_json: str,
    vocab_size: int,
    eos_token_ids: Sequence[int],
    num_threads: int = 0,
    num_roots: int = 0,
    lineage_idle_s: float = LINEAGE_IDLE_S,
    **kwargs: Any,
) -> StructuredOutputManager:
    """The manager an engine uses: llguidance over the model's tokenizer (`num_threads`: the fill's pool, 0: one per
    usable CPU; `num_roots`: the most lineages per grammar, 0: LINEAGES_PER_THREAD per fill thread;
    `lineage_idle_s`: how long an idle lineage is kept, 0: as long as its grammar is cached)."""
    return StructuredOutputManager(
        lambda: LLGuidanceBackend(tokenizer_json, vocab_size, eos_token_ids, num_threads, num_roots, lineage_idle_s),
        **kwargs,
    )
