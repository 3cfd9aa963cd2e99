"""The scheduler simulation (bench/sched_sim.py) counts what a policy costs under a tight KV pool: its counts are
checked here against what small lockstep workloads must give, derived by hand, not from the simulator."""

from __future__ import annotations

from bench.sched_sim import simulate
from bench.workloads import EngineSettings, Workload

SETTINGS = EngineSettings()  # block 16, max_num_seqs 1024, 16384 tokens a step: neither limit binds below


def test_a_lockstep_workload_preempts_exactly_the_requests_that_cannot_finish_together():
    """20 requests of 32 prompt + 400 output tokens all start at once; at the end each holds 431 tokens = 27
    blocks, so a 329-block pool finishes 12 together (324 blocks) and each of the other 8 is preempted once,
    when the pool fills, recomputing its prompt and outputs so far."""
    w = Workload("t", requests=20, prompt_len=32, max_tokens=400, seed=5)
    r = simulate("ours", w, pool_blocks=329, settings=SETTINGS)
    assert (r.preemptions, r.requests_preempted) == (8, 8)
    assert r.peak_running == 20
    # every position up to the last sampled token is computed once, plus what preemption threw away
    assert r.tokens_computed == 20 * (32 + 399) + r.tokens_recomputed
    # each victim lost at least its prompt and the outputs made while all 20 fit (329 blocks / 20 = 16 blocks each)
    assert r.tokens_recomputed >= 8 * 16 * 16


def test_our_growth_reserve_avoids_the_preemptions_of_vllms_admission_on_short_outputs():
    """(a)-like: 30 requests of 64 prompt + 32 output tokens need 6 blocks each at the end; 120 blocks hold 20.
    vLLM's policy (modelled) admits while the prompts fit and preempts as they grow; ours reserves the running
    requests' growth (128 tokens covers all 32 outputs), admits 20, and never computes a token twice."""
    w = Workload("t", requests=30, prompt_len=64, max_tokens=32, seed=6)
    ours = simulate("ours", w, pool_blocks=120, settings=SETTINGS)
    vllm = simulate("vllm-v1-model", w, pool_blocks=120, settings=SETTINGS)
    assert ours.preemptions == 0 and ours.tokens_recomputed == 0
    assert ours.tokens_computed == 30 * (64 + 31)
    assert vllm.preemptions > 0 and vllm.tokens_recomputed > 0
