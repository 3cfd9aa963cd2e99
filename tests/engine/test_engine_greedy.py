"""The engine's greedy output equals transformers' token for token on the embedded SmolLM2 — alone,
batched among 32 requests of different lengths, with prefix caching off, with 7-token prefill chunks,
and under a KV pool small enough to force preemption."""

from __future__ import annotations

import dataclasses

import pytest
from greedy_reference import assert_greedy_equal, reference_greedy

from kubellm.engine.config import EngineConfig
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.outputs import OutputAssembler, OutputKind
from kubellm.engine.sampling_params import SamplingParams

MAX_NEW = 20
TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
    "Les élèves étudient le français et l'histoire à l'école",
    "Water boils at a temperature of",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors."},
    ],
]


@pytest.fixture(scope="module")
def loaded(smollm2_loaded):
    return smollm2_loaded


@pytest.fixture(scope="module")
def engine(loaded):
    return make_engine(loaded)


def make_engine(loaded, **overrides) -> LLMEngine:
    cfg = EngineConfig(model="smollm2-135m-instruct", device="cpu", **overrides)
    return LLMEngine(cfg, loaded=loaded)


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    r = engine.renderer
    return [r.encode(p) for p in TEXT_PROMPTS] + [r.chat_token_ids(c) for c in CHATS]


@pytest.fixture(scope="module")
def references(smollm2_hf_model, prompts):
    return [reference_greedy(smollm2_hf_model, p, MAX_NEW) for p in prompts]


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = MAX_NEW) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in prompts]
    done = {}
    whole = OutputAssembler()
    while engine.has_unfinished_requests():
        for out in map(whole.add, engine.step()):
            if out.finished:
                assert out.error is None, out.error
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


def check_all(outs, references, label):
    for i, (ours, (ref, logits)) in enumerate(zip(outs, references, strict=True)):
        assert_greedy_equal(ours, ref, logits, f"{label} prompt {i}")


def filler_prompts(engine, n: int) -> list[list[int]]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [engine.renderer.encode(" ".join(words[: 1 + (i * 7) % 12]) * (1 + i % 4)) for i in range(n)]


def test_each_prompt_alone_matches_transformers(engine, prompts, references):
    outs = [run(engine, [p])[0] for p in prompts]
    check_all(outs, references, "alone")


def test_chat_answer_names_paris(engine, prompts, references):
    text = engine.renderer.decode(references[len(TEXT_PROMPTS)][0])
    assert "Paris" in text


def test_batched_among_32_requests_of_different_lengths(engine, prompts, references):
    batch = prompts + filler_prompts(engine, 32 - len(prompts))
    outs = run(engine, batch)
    check_all(outs[: len(prompts)], references, "batched")


def test_prefix_caching_off(loaded, prompts, references):
    eng = make_engine(loaded, enable_prefix_caching=False)
    check_all(run(eng, prompts), references, "no-prefix-cache")
    assert eng.stats().prefix_hits == 0


def test_seven_token_prefill_chunks(loaded, prompts, references):
    eng = make_engine(loaded, max_num_batched_tokens=7)
    check_all(run(eng, prompts), references, "7-token chunks")


def test_small_pool_forces_preemption_and_outputs_hold(loaded, prompts, references):
    longest = max(len(p) for p in prompts) + MAX_NEW
    # no growth reserve: it exists to avoid preemption, and this test is about preemption's correctness
    eng = make_engine(loaded, num_gpu_blocks_override=-(-longest // 16) + 3, kv_growth_reserve_tokens=0)
    outs = run(eng, prompts)
    assert eng.stats().num_preemptions > 0, "the pool was meant to be small enough to preempt"
    check_all(outs, references, "preemption")
    assert eng.stats().blocks_used == 0


def test_repeated_long_prompt_hits_the_prefix_cache(engine):
    prompt = engine.renderer.encode("The history of the Roman Empire spans many centuries. " * 12)
    params = SamplingParams(temperature=0.0, max_tokens=2)
    first = second = None
    whole = OutputAssembler()
    for attempt in range(2):
        rid = engine.add_request(None, prompt, params)
        while engine.has_unfinished_requests():
            for out in map(whole.add, engine.step()):
                if out.finished and out.request_id == rid:
                    first, second = (out, second) if attempt == 0 else (first, out)
    full_block_tokens = len(prompt) // 16 * 16
    assert second.num_cached_tokens >= full_block_tokens - 16
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_engine_config_round_trip_is_a_dataclass():
    assert dataclasses.is_dataclass(EngineConfig())


def test_final_only_outputs_carry_the_same_text_as_streamed_ones(loaded, prompts):
    """With FINAL_ONLY outputs the detokenizer runs once at the end instead of per token (no stop strings):
    the finished outputs equal the assembled deltas, EOS excluded from the text, multi-byte characters intact."""
    results = []
    for kind in (OutputKind.DELTA, OutputKind.FINAL_ONLY):
        engine = make_engine(loaded)
        engine.output_kind = kind
        params = SamplingParams(temperature=0.0, max_tokens=24)
        ids = [engine.add_request(None, p, params) for p in prompts]
        done = {}
        whole = OutputAssembler()
        while engine.has_unfinished_requests():
            for out in map(whole.add, engine.step()):
                assert out.finished or kind is OutputKind.DELTA
                if out.finished:
                    done[out.request_id] = [(c.text, c.token_ids, c.finish_reason) for c in out.outputs]
        results.append([done[i] for i in ids])
    assert results[0] == results[1]
    assert {r[0][2] for r in results[0]} == {"stop", "length"}


def test_streamed_outputs_are_deltas_that_add_up_to_the_final_output(loaded, prompts):
    """Each streamed output carries only what is new since the request's previous one (vLLM's DELTA mode):
    stepping synchronously that is at most one token, with its logprob; the deltas concatenated equal the
    FINAL_ONLY output of the same requests, stop strings and logprobs included."""
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1, stop=[" the"])
    whole: dict[str, list] = {}
    for kind in (OutputKind.FINAL_ONLY, OutputKind.DELTA):
        engine = make_engine(loaded)
        engine.output_kind = kind
        ids = [engine.add_request(f"{kind.value}-{i}", p, params) for i, p in enumerate(prompts)]
        got = {rid: [[], "", [], None] for rid in ids}
        while engine.has_unfinished_requests():
            for out in engine.step():
                (c,) = out.outputs
                if kind is OutputKind.DELTA:
                    assert len(c.token_ids) <= 1 and len(c.logprobs) == len(c.token_ids)
                acc = got[out.request_id]
                acc[0] += c.token_ids
                acc[1] += c.text
                acc[2] += [sorted(lp) for lp in c.logprobs]
                acc[3] = c.finish_reason
        whole[kind.value] = [got[rid] for rid in ids]
    assert whole["delta"] == whole["final_only"]
    assert {w[3] for w in whole["delta"]} >= {"stop"}, "a stop string ended at least one request"
