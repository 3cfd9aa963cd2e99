"""The pieces of structured outputs on their own: constraint parameters, the grammar manager (llguidance over
the real SmolLM2 tokenizer), and the bitmask applied to logits and in the sampler."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from kubellm.engine.sampler import Sampler, SamplingState
from kubellm.engine.sampling_params import SamplingParams, StructuredOutputsParams
from kubellm.engine.structured_output import (
    GrammarError,
    GrammarRow,
    LLGuidanceBackend,
    MaskPrefetcher,
    _LLGuidanceGrammar,
    advance_and_fill,
    llguidance_manager,
)
from kubellm.engine.token_bitmask import TokenBitmask, apply_token_bitmask

VOCAB = 49152
EOS = 2


@pytest.fixture(scope="module")
def manager(smollm2):
    return llguidance_manager(smollm2.tokenizer_info.tokenizer_json, smollm2.config.vocab_size, [EOS])


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return Tokenizer.from_str(smollm2.tokenizer_info.tokenizer_json)


def test_exactly_one_constraint_and_clear_errors():
    with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar or json_object"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match=r"structured_outputs\.json.*not valid JSON"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(ValueError, match="must be an object"):
        StructuredOutputsParams(json=[1, 2])
    with pytest.raises(ValueError, match=r"choice.*non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match=r"choice.*non-empty"):
        StructuredOutputsParams(choice=["a", ""])
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})  # type: ignore[arg-type]


def test_every_request_spelling_becomes_one_constraint():
    from kubellm.engine.server.protocol import ChatCompletionRequest, CompletionRequest

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}

    def completion(**extra):
        return CompletionRequest.model_validate_json(json.dumps({"prompt": "x", **extra})).constraint()

    def chat(**extra):
        body = {"messages": [{"role": "user", "content": "x"}], **extra}
        return ChatCompletionRequest.model_validate_json(json.dumps(body)).constraint()

    json_schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    assert chat(response_format=json_schema) == (StructuredOutputsParams(json=schema), "response_format")
    assert completion(response_format={"type": "json_object"}) == (
        StructuredOutputsParams(json_object=True),
        "response_format",
    )
    assert chat(response_format={"type": "text"}) is None
    assert completion(structured_outputs={"json": schema}) == (
        StructuredOutputsParams(json=schema),
        "structured_outputs",
    )
    assert completion(guided_json=json.dumps(schema), guided_whitespace_pattern=" ") == (
        StructuredOutputsParams(json=schema, whitespace_pattern=" "),
        "guided_json",
    )
    assert chat(guided_regex="a+") == (StructuredOutputsParams(regex="a+"), "guided_regex")
    assert completion(guided_choice=["a", "b"])[0].choice == ("a", "b")
    assert chat(guided_grammar='root ::= "a"')[0].kind == "grammar"
    with pytest.raises(ValueError, match="give one output constraint per request"):
        completion(guided_regex="a", structured_outputs={"regex": "b"})


def test_schema_key_keeps_property_order_and_ignores_formatting():
    a = StructuredOutputsParams(json={"type": "object", "properties": {"b": {}, "a": {}}})
    b = StructuredOutputsParams(json='{"type": "object",\n "properties": {"b": {}, "a": {}}}')
    assert a.key == b.key
    assert a.source.index('"b"') < a.source.index('"a"')
    assert StructuredOutputsParams(json=a.json, whitespace_pattern=" ?").key != a.key


def test_every_token_has_its_true_bytes_for_the_grammar(smollm2, tokenizer):
    """llguidance must see a space where the tokenizer decodes one (byte-level BPE writes it as 'Ġ')."""
    backend = LLGuidanceBackend(smollm2.tokenizer_info.tokenizer_json, VOCAB, [EOS])
    checked = 0
    for token in range(VOCAB):
        text = tokenizer.decode([token], skip_special_tokens=False)
        if "\ufffd" in text:  # a fragment of a multi-byte character
            continue
        assert backend.tokenizer.decode_bytes([token]) == text.encode(), token
        checked += 1
    assert checked > 40_000


def _allowed(manager, matcher) -> set[int]:
    return set(manager.bitmask([matcher]).allowed(0, VOCAB).tolist())


def test_compile_is_cached_by_source_and_errors_name_the_problem(manager):
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "integer"}}})
    before = manager.stats.compiles
    first = manager.compile(spec)
    assert manager.compile(StructuredOutputsParams(json=json.dumps(json.loads(spec.source)))) is first
    assert manager.stats.compiles == before + 1
    with pytest.raises(GrammarError, match=r"invalid JSON schema.*/defs/x"):
        manager.compile(StructuredOutputsParams(json={"properties": {"a": {"$ref": "#/defs/x"}}}))
    with pytest.raises(GrammarError, match=r"(?s)invalid regex.*unclosed group"):
        manager.compile(StructuredOutputsParams(regex="a(b"))
    with pytest.raises(GrammarError, match="invalid grammar"):
        manager.compile(StructuredOutputsParams(grammar="start: undefined_rule"))
    huge = {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(5000)}}
    with pytest.raises(GrammarError, match=r"JSON schema is \d+ bytes long; at most 65536"):
        manager.compile(StructuredOutputsParams(json=huge))


def test_a_tokenizer_llguidance_cannot_read_is_a_clear_error_every_time():
    from kubellm.engine.random_model import synthetic_tokenizer_info

    info = synthetic_tokenizer_info(64)  # word-level, no decoder: the tokens' bytes are unknown
    manager = llguidance_manager(info.tokenizer_json, 64, [2])
    for _ in range(2):
        with pytest.raises(GrammarError, match="not available for this model's tokenizer"):
            manager.compile(StructuredOutputsParams(regex="a"))


def test_matcher_masks_follow_the_grammar(manager, tokenizer):
    m = manager.new_matcher(StructuredOutputsParams(json={"type": "object"}))
    first = _allowed(manager, m)
    assert first and all(tokenizer.decode([t]).startswith("{") for t in first)
    assert EOS not in first
    for t in tokenizer.encode('{"a":1}').ids:
        assert m.accept_token(t)
    assert m.is_terminated()
    assert _allowed(manager, m) == {EOS}, "a complete object admits only the end"
    choice = manager.new_matcher(StructuredOutputsParams(choice=["yes", "no"]))
    allowed = {tokenizer.decode([t]) for t in _allowed(manager, choice)}
    assert allowed and allowed <= {"y", "ye", "yes", "n", "no"}
    # GBNF is accepted as well as Lark
    gbnf = manager.new_matcher(StructuredOutputsParams(grammar='root ::= "ab" [0-9]'))
    assert {tokenizer.decode([t]) for t in _allowed(manager, gbnf)} <= {"a", "ab"}


def test_json_has_no_free_whitespace_unless_a_pattern_allows_it(manager, tokenizer):
    space = tokenizer.encode(" ").ids[0]
    tight = manager.new_matcher(StructuredOutputsParams(json={"type": "object"}))
    loose = manager.new_matcher(StructuredOutputsParams(json={"type": "object"}, whitespace_pattern=" ?"))
    for m in (tight, loose):
        assert m.accept_token(tokenizer.encode("{").ids[0])
    assert space not in _allowed(manager, tight)
    assert space in _allowed(manager, loose)


@pytest.mark.parametrize("batched", [False, True], ids=["row-by-row", "batched"])
def test_prefetcher_advances_the_grammars_and_its_masks_serve_only_their_position(manager, tokenizer, batched):
    """What the engine's worker thread does with a step's tokens: each kept token fed to its grammar, outcomes
    under the row's key, a dropped row and an EOS left alone, a refused token reported, and masks equal to those
    filled afterwards, used only while the grammar stays where it was filled; the same with the accepts in one call
    (KUBELLM_GRAMMAR_BATCH_ACCEPT)."""
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    brace = tokenizer.encode("{").ids[0]
    live, dropped, ended, done, refused = (manager.new_matcher(spec) for _ in range(5))
    for t in tokenizer.encode('{"a":').ids:
        assert done.accept_token(t)
    rows = [
        GrammarRow("live", live, lambda: False, {EOS}),
        None,  # an unconstrained row
        GrammarRow("dropped", dropped, lambda: True, {EOS}),
        GrammarRow("ended", ended, lambda: False, {EOS}),
        GrammarRow("done", done, lambda: False, {EOS}),
        GrammarRow("refused", refused, lambda: False, {EOS}),
    ]
    seven_brace = tokenizer.encode("7}").ids
    tokens = [brace, 5, brace, EOS, seven_brace[0], tokenizer.encode("x").ids[0]]
    accepts_before = manager.fill_stats.batched_accepts
    prefetcher = MaskPrefetcher(manager)
    try:
        result = prefetcher.take(prefetcher.submit(rows, lambda: tokens, batched))
    finally:
        prefetcher.close()
    assert set(result.outcomes) == {"live", "done", "refused"}, "dropped rows and EOS never reach a grammar"
    assert result.outcomes["live"] == (True, False) and result.outcomes["done"] == (True, False)
    assert result.outcomes["refused"] == (False, True), "an object cannot start with x"
    assert manager.fill_stats.batched_accepts - accepts_before == (3 if batched else 0)
    assert (live.position, dropped.position, ended.position) == (1, 0, 0)
    expected = manager.bitmask([live, done])
    stats_before = manager.fill_stats.snapshot()
    got = manager.bitmask([None, live, done], result)
    assert got.rows == [1, 2]
    assert np.array_equal(got.words, expected.words), "prefetched masks equal masks filled now"
    assert manager.fill_stats.prefetched_rows == stats_before.prefetched_rows + 2
    assert manager.fill_stats.rows == stats_before.rows, "nothing was filled again"
    assert live.accept_token(int(expected.allowed(0, VOCAB)[0]))  # it moves on: its prefetched mask is stale
    assert result.row_of(live) is None and result.row_of(done) is not None
    assert np.array_equal(manager.bitmask([live], result).words, manager.bitmask([live]).words)


def test_step_reuse_hands_masks_over_whole_only_for_the_same_rows_at_their_positions(manager, tokenizer):
    """KUBELLM_GRAMMAR_STEP_REUSE: the prefetcher fills through a plan that the next step reuses when its rows are
    the same matchers in the same order (into the given buffer with KUBELLM_GRAMMAR_DIRECT_MASKS), and bitmask()
    takes the masks whole only when the step's constrained rows are exactly those, at the positions they were
    filled for; any other batch gets, row by row, the masks filled now."""
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    a, b, c = (manager.new_matcher(spec) for _ in range(3))
    for m, text in ((a, '{"a":'), (b, "{")):
        for t in tokenizer.encode(text).ids:
            assert m.accept_token(t)
    rows = [GrammarRow(k, m, lambda: False, {EOS}) for k, m in (("a", a), ("b", b), ("c", c))]

    def ids(*texts: str) -> list[int]:
        return [tokenizer.encode(t).ids[0] for t in texts]

    first = advance_and_fill(manager, rows, lambda: ids("1", '"', "{"), batched=True, reuse=True)
    assert first.plan is not None and first.pinned is None
    fresh = manager.bitmask([a, b, c])
    assert len({r.tobytes() for r in fresh.words}) == 3, "three states: a misplaced row shows"
    before = manager.fill_stats.snapshot()
    whole = manager.bitmask([a, b, c], first)
    assert whole.words is first.words and np.array_equal(whole.words, fresh.words), "handed over, no copy"
    assert manager.fill_stats.whole_steps == before.whole_steps + 1 and manager.fill_stats.rows == before.rows
    buffer = np.full((4, fresh.words.shape[1]), 0x55555555, np.int32)
    copied = manager.bitmask([a, b, c], first, lambda n: (buffer[:n], None))  # pinned masks, filled by the engine
    assert np.shares_memory(copied.words, buffer) and np.array_equal(copied.words, fresh.words)
    for batch in ([c, b, a], [a, b], [a, None, b, c]):  # other rows or order: row by row; an unconstrained row
        got, want = manager.bitmask(batch, first), manager.bitmask(batch)  # between them: whole again
        assert got.rows == want.rows and np.array_equal(got.words, want.words), batch
    assert manager.fill_stats.whole_steps == before.whole_steps + 3

    marker = object()  # the pinned tensor of `buffer`'s memory, on a GPU host
    second = advance_and_fill(
        manager, rows, lambda: ids("2", "a", '"'), batched=True, reuse=True, previous=first,
        out=lambda n: (buffer[:n], marker),
    )  # fmt: skip
    assert second.plan is first.plan and manager.fill_stats.reused_plans == before.reused_plans + 1
    assert np.shares_memory(second.words, buffer) and second.pinned is marker
    fresh = manager.bitmask([a, b, c])
    direct = manager.bitmask([a, b, c], second, lambda n: (np.zeros((n, 9), np.int32), None))
    assert direct.words is second.words and direct.pinned is marker, "the buffer it was filled in, as is"
    assert np.array_equal(direct.words, fresh.words)
    assert a.accept_token(ids("3")[0])  # a moves on: its mask is stale, the step is no longer whole
    stale = manager.fill_stats.snapshot()
    got = manager.bitmask([a, b, c], second)
    after = manager.fill_stats
    assert (after.whole_steps, after.rows, after.prefetched_rows) == (
        stale.whole_steps, stale.rows + 1, stale.prefetched_rows + 2
    ), "a filled now, b and c from the prefetcher"  # fmt: skip
    assert np.array_equal(got.words, manager.bitmask([a, b, c]).words)

    # the steady state: the same rows, none dropped (`finished`, one call), no EOS: fed without a look at each row
    steady = manager.fill_stats.steady_steps
    batched, positions = manager.fill_stats.batched_accepts, [m.position for m in (a, b, c)]
    third = advance_and_fill(
        manager, rows, lambda: ids("4", '"', "a"), True, reuse=True, previous=second, finished=lambda: [False] * 3
    )
    assert manager.fill_stats.steady_steps == steady + 1 and third.layout is second.layout
    assert manager.fill_stats.batched_accepts == batched + 3
    assert [m.position for m in (a, b, c)] == [p + 1 for p in positions], "each fed once (the batched call)"
    assert third.outcomes == {"a": (True, False), "b": (True, False), "c": (True, False)}
    assert np.array_equal(manager.bitmask([a, b, c], third).words, manager.bitmask([a, b, c]).words)
    # an EOS or a dropped row leaves the steady state: that row's grammar is not fed
    for tokens, finished, fed in (
        (ids("5", ":") + [EOS], [False] * 3, "ab"),
        (ids("6", "1", '"'), [True, False, False], "bc"),
    ):
        before = (a.position, b.position, c.position)
        step = advance_and_fill(
            manager, rows, lambda t=tokens: t, reuse=True, previous=third, finished=lambda f=finished: f
        )
        assert manager.fill_stats.steady_steps == steady + 1 and set(step.outcomes) == set(fed)
        assert all(outcome == (True, False) for outcome in step.outcomes.values())
        assert [p - q for p, q in zip((a.position, b.position, c.position), before, strict=True)] == [
            int(k in fed) for k in "abc"
        ]
        assert np.array_equal(manager.bitmask(step.matchers, step).words, manager.bitmask(step.matchers).words)
        third = step

    rows[1] = GrammarRow("b", b, lambda: True, {EOS})  # b's request finished: other rows, a new plan (c: '{"a"')
    last = advance_and_fill(manager, rows, lambda: ids("7", '"', ":"), reuse=True, previous=third)
    assert last.matchers == [a, c] and last.plan is not third.plan and last.layout is not third.layout
    assert np.array_equal(manager.bitmask([a, c], last).words, manager.bitmask([a, c]).words)


def _wait_for(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_sequences_spread_over_lineages_that_agree(smollm2, tokenizer):
    """Each live sequence of a grammar gets a lineage (an independently built start matcher) of its own up to the
    bound (0: 4 per fill thread), built on the builder threads; a sequence takes its state from the least-loaded
    lineage when it first needs it, and every lineage follows the grammar alike."""
    tj = smollm2.tokenizer_info.tokenizer_json
    manager = llguidance_manager(tj, VOCAB, [EOS], num_threads=3)
    assert manager.backend.num_roots == 12, "0 (the default): 4 lineages per fill thread"
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}})
    grammar = manager.compile(spec)
    assert len(grammar.lineages) == 1, "a compile builds one"
    matchers = [manager.new_matcher(spec) for _ in range(7)]
    _wait_for(lambda: len(grammar.lineages) == 7, "7 lineages for 7 live sequences")
    assert all(lin.built_on.startswith("kubellm-grammar-build") for lin in grammar.lineages[1:])
    text = tokenizer.encode('{"a":"xy').ids
    for m in matchers:
        for t in text:
            assert m.accept_token(t)
    assert len({id(m.lineage) for m in matchers}) == 7, "each sequence on a lineage of its own"
    mask = manager.bitmask(matchers)
    assert all(np.array_equal(mask.words[0], row) for row in mask.words[1:])
    assert EOS not in set(mask.allowed(0, VOCAB).tolist())
    del matchers, m
    assert grammar.demand == 0 and all(lin.live == 0 for lin in grammar.lineages), "a dropped sequence is released"
    again = manager.new_matcher(spec)
    again.accept_token(text[0])
    assert len(grammar.lineages) == 7, "no build while built lineages are idle (kept for a minute by default)"

    one = llguidance_manager(tj, VOCAB, [EOS], num_threads=3, num_roots=1)  # KUBELLM_GRAMMAR_ROOTS=1
    single = [one.new_matcher(spec) for _ in range(5)]
    for m in single:
        m.accept_token(text[0])
    assert len(one.compile(spec).lineages) == 1 and one.backend._builder is None
    reference = manager.bitmask([again]).words[0]
    assert all(np.array_equal(row, reference) for row in one.bitmask(single).words)


class _FakeRoot:
    """A start matcher as _LLGuidanceGrammar sees one (the lineage bookkeeping needs no real grammar)."""

    def deep_copy(self) -> _FakeRoot:
        return _FakeRoot()

    def is_error(self) -> bool:
        return False


def _fake_grammar(max_lineages: int, keep_idle_s: float | None, clock) -> tuple[_LLGuidanceGrammar, list]:
    """A grammar whose lineage builds wait in `queued` until the test runs them."""
    queued: list = []

    def spawn(job):
        future: Future[None] = Future()
        queued.append((job, future))
        return future

    return _LLGuidanceGrammar(_FakeRoot(), _FakeRoot, max_lineages, spawn, keep_idle_s, clock), queued


def _run_builds(queued: list) -> None:
    while queued:
        job, future = queued.pop(0)
        job()
        future.set_result(None)


def test_idle_lineages_are_freed_after_their_keep_down_to_twice_the_live_sequences_and_one():
    """A burst builds a lineage per sequence (up to the bound); a lineage idle for keep_idle_s is freed while the
    grammar holds more than twice as many as it has live sequences, down to one when none is live; one used again
    is not idle; a build that finishes after the sequences that wanted it ended is dropped; with no keep (0 in
    KUBELLM_GRAMMAR_LINEAGE_IDLE_S) none is freed."""
    now = [0.0]
    grammar, queued = _fake_grammar(8, 10.0, lambda: now[0])
    burst = [grammar.new_matcher() for _ in range(10)]
    assert len(queued) == 7, "8 lineages wanted: the compile's and 7 builds"
    _run_builds(queued)
    assert all(m.matcher is not None for m in burst)  # each takes its state from the least-loaded lineage
    assert len(grammar.lineages) == 8 and sorted(lin.live for lin in grammar.lineages) == [1] * 6 + [2] * 2
    burst.sort(key=lambda m: m.lineage.live)  # the 6 sequences alone on their lineage first
    del burst[:7]  # 3 live: 6 lineages idle, 2 too many
    assert grammar.demand == 3 and len(grammar.lineages) == 8, "idle for less than keep_idle_s: kept"
    now[0] = 9.9
    assert grammar.trim() == 0 and len(grammar.lineages) == 8
    now[0] = 10.0
    assert grammar.trim() == 2 and len(grammar.lineages) == 6, "twice the 3 live sequences"
    assert sum(lin.live for lin in grammar.lineages) == 3
    reused = grammar.new_matcher()
    assert reused.matcher is not None and reused.lineage.live == 1, "an idle lineage taken again"
    now[0] = 30.0
    burst.clear()  # 1 live (reused): its lineage stays, the others idle since 0 or 30
    assert len(grammar.lineages) == 3 and reused.lineage in grammar.lineages
    now[0] = 40.0
    del reused  # none live
    assert len(grammar.lineages) == 1, "an idle grammar keeps one lineage"
    assert grammar.lineages_freed == 7 and not queued
    again = grammar.new_matcher()
    assert again.matcher is not None and not queued, "it still serves, one sequence on its one lineage"

    late, queued = _fake_grammar(8, 10.0, lambda: now[0])
    wanted = [late.new_matcher() for _ in range(4)]
    assert len(queued) == 3
    del wanted  # they end before their lineages are built
    _run_builds(queued)
    assert len(late.lineages) == 1 and late.lineages_freed == 3 and late.settle(0.0) == 1

    kept, queued = _fake_grammar(8, None, lambda: now[0])
    burst = [kept.new_matcher() for _ in range(4)]
    _run_builds(queued)
    assert all(m.matcher is not None for m in burst)
    burst.clear()
    now[0] = 1e9
    assert kept.trim() == 0 and len(kept.lineages) == 4, "no keep: kept while cached"


def test_with_no_keep_a_build_that_finishes_late_is_kept_as_before():
    """KUBELLM_GRAMMAR_LINEAGE_IDLE_S=0 is the kill switch of lineage freeing ("kept for as long as the grammar is
    cached, as before"): a lineage build that finishes after the sequences that wanted it ended is kept too, as it
    was before lineages were freed, so a burst that comes back finds it."""
    grammar, queued = _fake_grammar(8, None, lambda: 0.0)
    wanted = [grammar.new_matcher() for _ in range(4)]
    assert len(queued) == 3
    del wanted  # they end before their lineages are built
    _run_builds(queued)
    assert len(grammar.lineages) == 4 and grammar.lineages_freed == 0
    assert sorted(lin.index for lin in grammar.lineages) == [0, 1, 2, 3]


def test_the_manager_frees_the_idle_lineages_of_a_grammar_no_request_uses(smollm2):
    """A grammar whose requests all ended has no release left to trim it: any later compile (of any constraint)
    sweeps the cache's grammars and frees lineages idle past KUBELLM_GRAMMAR_LINEAGE_IDLE_S."""
    manager = llguidance_manager(
        smollm2.tokenizer_info.tokenizer_json, VOCAB, [EOS], num_threads=2, lineage_idle_s=0.05
    )
    manager.sweep_interval_s = 0.0
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"c": {"type": "boolean"}}})
    grammar = manager.compile(spec)
    held = [manager.new_matcher(spec) for _ in range(4)]
    assert grammar.settle(30.0) == 4
    assert all(m.matcher is not None for m in held)
    del held
    other = StructuredOutputsParams(regex="[0-9]+")
    _wait_for(lambda: manager.compile(other) is not None and len(grammar.lineages) == 1, "the idle lineages freed")
    assert grammar.lineages_freed == 3


def test_closing_the_backend_drops_queued_builds_and_starts_no_more(smollm2, tokenizer):
    """close() drops the lineage builds still queued: they stop counting as pending (settle() returns at once), the
    build running finishes, and a sequence that arrives afterwards is served on the lineages built, with no builder
    started again."""
    manager = llguidance_manager(smollm2.tokenizer_info.tokenizer_json, VOCAB, [EOS], num_threads=3)  # one builder
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"b": {"type": "integer"}}})
    grammar = manager.compile(spec)
    started, release = threading.Event(), threading.Event()
    build = grammar._build

    def held_build():
        started.set()
        assert release.wait(30), "the test never released the build"
        return build()

    grammar._build = held_build
    matchers = [manager.new_matcher(spec) for _ in range(4)]  # 3 builds wanted: 1 runs, 2 wait in the queue
    assert started.wait(30)
    closer = threading.Thread(target=manager.backend.close)
    closer.start()
    _wait_for(lambda: grammar._pending == 1, "the two queued builds dropped")
    release.set()
    closer.join(30)
    assert not closer.is_alive()
    assert grammar.settle(0.0) == 2, "the root and the build that was running"
    late = manager.new_matcher(spec)
    assert late.accept_token(tokenizer.encode('{"b":').ids[0])
    assert manager.backend._builder is None and grammar._pending == 0
    del matchers


def test_masks_of_rows_on_many_lineages_land_in_their_rows(smollm2, tokenizer):
    """The fill hands llguidance its rows sorted by lineage: each mask must still land in its own row, equal to the
    mask of the same state on a single lineage."""
    tj = smollm2.tokenizer_info.tokenizer_json
    many = llguidance_manager(tj, VOCAB, [EOS], num_threads=2)
    one = llguidance_manager(tj, VOCAB, [EOS], num_threads=2, num_roots=1)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "yy"]}}}
    spec = StructuredOutputsParams(json=schema)
    prefixes = ['{"a":', "{", '{"a":12,"b":"', '{"a":1', "", '{"b":"y', '{"a":3,']
    held = [many.new_matcher(spec) for _ in prefixes]
    _wait_for(lambda: len(many.compile(spec).lineages) == len(prefixes), "a lineage per sequence")
    rows_many, rows_one = [], []
    for prefix in prefixes:
        for manager, rows in ((many, rows_many), (one, rows_one)):
            m = manager.new_matcher(spec)
            for t in tokenizer.encode(prefix).ids:
                assert m.accept_token(t), prefix
            rows.append(m)
    assert len({id(m.lineage) for m in rows_many}) > 1
    got = many.bitmask([None, *rows_many])
    want = one.bitmask([None, *rows_one])
    assert got.rows == want.rows == list(range(1, len(prefixes) + 1))
    assert np.array_equal(got.words, want.words)
    assert len({row.tobytes() for row in got.words}) > 3, "the states differ, so a misplaced row would show"
    del held


def test_a_failing_token_source_surfaces_on_the_engine_thread(manager):
    def broken() -> list[int]:
        raise RuntimeError("tensor-parallel step failed")

    m = manager.new_matcher(StructuredOutputsParams(json={"type": "object"}))
    prefetcher = MaskPrefetcher(manager)
    try:
        future = prefetcher.submit([GrammarRow("r", m, lambda: False, {EOS})], broken)
        with pytest.raises(RuntimeError, match="tensor-parallel step failed"):
            prefetcher.take(future)
    finally:
        prefetcher.close()
    assert m.position == 0


def _random_mask(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-(2**31), 2**31, size=(rows, VOCAB // 32), dtype=np.int64).astype(np.int32)


def test_apply_token_bitmask_matches_a_bit_by_bit_reference():
    logits = torch.randn(5, VOCAB)
    words = _random_mask(2, 0)
    expected = logits.clone()
    for j, row in enumerate([1, 3]):
        for t in range(VOCAB):
            if not (int(words[j, t // 32]) >> (t % 32)) & 1:
                expected[row, t] = float("-inf")
    apply_token_bitmask(logits, TokenBitmask([1, 3], words))
    assert torch.equal(logits, expected)


def test_sampler_draws_only_allowed_tokens_and_leaves_other_rows_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB) * 3
    allowed = np.zeros((3, VOCAB // 32), dtype=np.int32)
    picks = [[5, 77, 40000], [1], [123, 124, 125, 126, 30000]]
    for j, toks in enumerate(picks):
        for t in toks:
            allowed[j, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_p=0.5, logprobs=1),
        SamplingParams(temperature=1.0, top_k=5),
    ]
    states = [SamplingState.create(p, [1, 2, 3]) for p in params]
    unmasked = Sampler(seed=0)(logits.clone(), states)
    rows = [0, 2, 4]
    for _ in range(20):
        out = Sampler(seed=1)(logits.clone(), states, token_bitmask=TokenBitmask(rows, allowed))
        for j, row in enumerate(rows):
            assert out.token_ids[row] in picks[j]
        assert out.token_ids[3] == unmasked.token_ids[3] == int(logits[3].argmax())  # unconstrained: unchanged
        assert out.logprobs[0].token_id == out.token_ids[0] and out.logprobs[0].logprob > -1e9
        assert all(t in picks[0] for t, _ in out.logprobs[0].top)


def test_a_bitmask_written_into_a_given_buffer_overwrites_every_row(manager, tokenizer):
    """KUBELLM_GRAMMAR_PINNED_MASKS hands bitmask() a reused buffer (PinnedBitmaskBuffers on CUDA): whatever an earlier
    step left in it, every constrained row comes out whole, prefetched rows and rows filled now alike."""
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    ms = [manager.new_matcher(spec) for _ in range(3)]
    for t in tokenizer.encode('{"a":').ids:
        assert ms[1].accept_token(t)
    prefetched = advance_and_fill(
        manager, [GrammarRow("k", ms[2], lambda: False, {EOS})], lambda: [tokenizer.encode("{").ids[0]]
    )
    expected = manager.bitmask([ms[0], None, ms[1], ms[2]], prefetched)
    stale = np.full((8, expected.words.shape[1]), 0x55555555, np.int32)
    marker = object()
    got = manager.bitmask([ms[0], None, ms[1], ms[2]], prefetched, lambda rows: (stale[:rows], marker))
    assert got.rows == expected.rows == [0, 2, 3] and got.pinned is marker
    assert np.shares_memory(got.words, stale) and np.array_equal(got.words, expected.words)
    with pytest.raises(ValueError, match="bitmask buffer"):
        manager.bitmask([ms[0]], None, lambda rows: (np.zeros((rows, 3), np.int32), None))


def test_prefetched_rows_land_in_their_rows_in_any_order(manager, tokenizer):
    """bitmask() copies prefetched masks as one slice when they form one run in order, row by row otherwise: either
    way each row's mask is its own matcher's, equal to the mask filled now."""
    spec = StructuredOutputsParams(
        json={"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x"]}}}
    )
    a, b, c, fresh = (manager.new_matcher(spec) for _ in range(4))
    for m, text in ((a, '{"a":'), (b, '{"b":'), (c, "")):
        for t in tokenizer.encode(text).ids:
            assert m.accept_token(t)
    # the prefetcher's step: each advanced by one more token, masks in the order c, a, b
    rows = [GrammarRow(k, m, lambda: False, {EOS}) for k, m in (("c", c), ("a", a), ("b", b))]
    step = [tokenizer.encode(s).ids[0] for s in ("{", "1", '"')]
    prefetched = advance_and_fill(manager, rows, lambda: step)
    assert all(outcome == (True, False) for outcome in prefetched.outcomes.values())
    for batch in ([a, b, c], [None, c, a], [fresh, a, b], [b, None, c, a]):
        got = manager.bitmask(batch, prefetched)
        want = manager.bitmask(batch)
        assert got.rows == want.rows and np.array_equal(got.words, want.words), batch
    assert len({r.tobytes() for r in manager.bitmask([a, b, c]).words}) == 3, "the states differ: a misplaced row shows"


@pytest.mark.parametrize("batched", [True, False])
def test_steady_state_a_rejected_token_ends_its_row_and_the_others_go_on(manager, tokenizer, batched):
    """KUBELLM_GRAMMAR_STEP_REUSE's steady path (the same rows, none dropped, no EOS) with a token one grammar rejects
    (a raw newline inside a JSON key): that row's outcome is (rejected, ended), so the engine stops its request, and
    its mask is not among the filled ones; the next step, without it, leaves the steady layout and fills the rest
    as a fill from scratch does."""
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    a, b, c = (manager.new_matcher(spec) for _ in range(3))
    rows = [GrammarRow(k, m, lambda: False, {EOS}) for k, m in (("a", a), ("b", b), ("c", c))]

    def step(texts, previous=None, step_rows=rows):
        ids = [tokenizer.encode(t).ids[0] for t in texts]
        none = [False] * len(ids)
        return advance_and_fill(
            manager, step_rows, lambda: ids, batched, reuse=True, previous=previous, finished=lambda: none
        )

    first = step(["{", "{", "{"])
    second = step(['"', '"', '"'], first)
    steady = manager.fill_stats.steady_steps
    third = step(["a", "\n", "a"], second)
    assert manager.fill_stats.steady_steps == steady + 1 and third.layout is second.layout
    assert third.outcomes == {"a": (True, False), "b": (False, True), "c": (True, False)}
    assert third.matchers == [a, c]
    assert np.array_equal(manager.bitmask([a, c], third).words, manager.bitmask([a, c]).words)
    fourth = step(['"', "x", '"'], third, [rows[0], None, rows[2]])  # b's request stopped: its row is gone
    assert fourth.outcomes == {"a": (True, False), "c": (True, False)} and fourth.layout is not third.layout
    assert np.array_equal(manager.bitmask([a, None, c], fourth).words, manager.bitmask([a, None, c]).words)
