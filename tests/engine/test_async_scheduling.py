"""Async scheduling (the next step is scheduled and launched before the previous step's tokens are read back)
gives exactly what synchronous stepping gives: the same tokens, text, finish reasons, logprobs and prefix
cache, with EOS, stop strings, stop token ids, length limits, seeds, n > 1, aborts and preemption. On CPU
nothing actually runs concurrently, but every piece of the bookkeeping (placeholder tokens filled from the
previous step's sampled ids, a stopped request's extra step dropped, blocks freed once) runs as on a GPU."""

from __future__ import annotations

import pytest

from kubellm.engine.config import EngineConfig
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.loader import load_model
from kubellm.engine.outputs import OutputAssembler
from kubellm.engine.request import PLACEHOLDER
from kubellm.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir("llama")))


def make_engine(loaded, async_scheduling: bool, **overrides) -> LLMEngine:
    cfg = EngineConfig(
        model=loaded.path, device="cpu", generation_config="vllm", async_scheduling=async_scheduling, **overrides
    )
    return LLMEngine(cfg, loaded=loaded)


def prompts(n: int) -> list[list[int]]:
    return [[1] + [(7 * i + 13 * j) % 300 + 10 for j in range(3 + (i * 5) % 40)] for i in range(n)]


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]], abort_after: dict[str, int] | None = None):
    """Submit everything, step to the end; abort_after: request id -> step after which it is aborted."""
    abort_after = abort_after or {}
    ids = [engine.add_request(f"r{i}", p, params) for i, (p, params) in enumerate(requests)]
    final = {}
    steps = 0
    whole = OutputAssembler()
    while engine.has_unfinished_requests():
        for out in map(whole.add, engine.step()):
            assert all(t != PLACEHOLDER for c in out.outputs for t in c.token_ids)
            if out.finished:
                final[out.request_id] = out
        steps += 1
        for rid, at in abort_after.items():
            if at == steps:
                for out in map(whole.add, engine.abort_request(rid)):
                    final[out.request_id] = out
    assert engine.kv.num_used_blocks == 0, "every block is back in the free queue"
    return [final[i] for i in ids]


def summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, _lps(c.logprobs)) for c in o.outputs] for o in outs]


def _lps(logprobs):
    if logprobs is None:
        return None
    return [{t: (round(lp.logprob, 5), lp.rank) for t, lp in step.items()} for step in logprobs]


def both(loaded, requests, **overrides):
    sync = run(make_engine(loaded, False, **overrides), requests)
    engine = make_engine(loaded, True, **overrides)
    assert engine.async_scheduling
    return summary(sync), summary(run(engine, requests)), engine


def test_greedy_batch_with_eos_and_length_limits_equals_synchronous(loaded):
    reqs = [(p, SamplingParams(temperature=0.0, max_tokens=5 + i % 17)) for i, p in enumerate(prompts(24))]
    # The random model rarely says its EOS: make its most frequent greedy token the EOS of both engines.
    probe = run(make_engine(loaded, False), [(p, SamplingParams(temperature=0.0, max_tokens=8)) for p, _ in reqs])
    tokens = [t for o in probe for t in o.outputs[0].token_ids[1:]]
    eos = frozenset({max(set(tokens), key=tokens.count)})
    results = []
    for overlap in (False, True):
        engine = make_engine(loaded, overlap)
        engine.eos_token_ids = eos
        results.append(summary(run(engine, reqs)))
    assert results[0] == results[1]
    reasons = {c[2] for o in results[0] for c in o}
    assert reasons == {"stop", "length"}, "the workload exercises both EOS and length finishes"


def test_stop_strings_stop_token_ids_and_min_tokens_equal_synchronous(loaded):
    reqs = []
    for i, p in enumerate(prompts(12)):
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=i % 2 == 0, min_tokens=i % 4)
        if i % 3 == 0:
            params = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[p[-1] % 300 + 10, 17, 42])
        elif i % 3 == 1:
            params = SamplingParams(temperature=0.0, max_tokens=30, stop=["a", "e"], min_tokens=i % 5)
        reqs.append((p, params))
    sync, overlapped, _ = both(loaded, reqs)
    assert sync == overlapped


def test_seeded_sampling_with_logprobs_and_n_equals_synchronous(loaded):
    reqs = [
        (p, SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=12, logprobs=3, n=1 + i % 2))
        for i, p in enumerate(prompts(10))
    ]
    sync, overlapped, _ = both(loaded, reqs)
    assert sync == overlapped


def test_penalties_step_synchronously_and_equal_synchronous(loaded):
    reqs = [
        (p, SamplingParams(temperature=0.0, max_tokens=15, repetition_penalty=1.3 if i % 2 else 1.0))
        for i, p in enumerate(prompts(8))
    ]
    sync, overlapped, engine = both(loaded, reqs)
    assert sync == overlapped
    assert engine._num_exact_history == 0, "finished penalty requests release the synchronous mode"


def test_preemption_under_a_small_pool_equals_synchronous(loaded):
    reqs = [(p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)) for p in prompts(12)]
    small = {"num_gpu_blocks_override": 24, "kv_growth_reserve_tokens": 0}  # no reserve: preemption is the point
    sync = make_engine(loaded, False, **small)
    overlapped = make_engine(loaded, True, **small)
    a, b = run(sync, reqs), run(overlapped, reqs)
    assert summary(a) == summary(b)
    assert overlapped.scheduler.num_preemptions > 0, "the pool is small enough to preempt"


def test_generated_blocks_enter_the_prefix_cache_as_with_synchronous_steps(loaded):
    reqs = [(p, SamplingParams(temperature=0.0, max_tokens=37, ignore_eos=True)) for p in prompts(6)]
    sync, overlapped = make_engine(loaded, False), make_engine(loaded, True)
    run(sync, reqs)
    run(overlapped, reqs)
    assert sorted(sync.cached_block_hashes()) == sorted(overlapped.cached_block_hashes())


def test_abort_while_a_step_is_in_flight_frees_blocks_and_spares_the_others(loaded):
    reqs = [(p, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)) for p in prompts(6)]
    alone = summary(run(make_engine(loaded, False), reqs))
    engine = make_engine(loaded, True)
    outs = run(engine, reqs, abort_after={"r2": 3, "r4": 1})
    got = summary(outs)
    for i in (0, 1, 3, 5):
        assert got[i] == alone[i]
    for i in (2, 4):
        assert outs[i].outputs[0].finish_reason == "abort"
        tokens = outs[i].outputs[0].token_ids
        assert tokens == alone[i][0][0][: len(tokens)], "an aborted request's tokens are a prefix of its full run"


def test_async_scheduling_is_off_by_default_on_cpu_and_refused_for_the_simulated_device(loaded):
    assert not LLMEngine(EngineConfig(model=loaded.path, device="cpu"), loaded=loaded).async_scheduling
    with pytest.raises(ValueError, match="async scheduling"):
        LLMEngine(EngineConfig(model=loaded.path, device="sim", async_scheduling=True))
