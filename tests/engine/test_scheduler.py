"""The scheduler: continuous batching, chunked prefill under the token budget, preemption, and failure
of a request that can never fit — all without a model (pure logic over token ids)."""

from __future__ import annotations

from kubellm.engine.kv_cache_manager import KVCacheManager
from kubellm.engine.request import Request, RequestStatus
from kubellm.engine.sampling_params import SamplingParams
from kubellm.engine.scheduler import Scheduler


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, policy="fcfs") -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=1000, policy=policy)


def add(s: Scheduler, rid: str, n_prompt: int, priority: int = 0, start: int = 0) -> Request:
    req = Request(rid, list(range(start, start + n_prompt)), SamplingParams(max_tokens=100), max_tokens=100,
                  block_size=s.kv.block_size, priority=priority, arrival_time=float(len(s.requests)))  # fmt: skip
    s.add_request(req)
    return req


def step(s: Scheduler, next_token: int = 7):
    """One step: schedule, pretend to compute, append a token to every request that sampled."""
    out = s.schedule()
    for req in s.update_after_step(out):
        req.append_output_token(next_token)
    return out


def test_decodes_and_prefill_chunks_share_the_token_budget():
    s = make_scheduler(budget=10)
    a = add(s, "a", 6)
    out = step(s)
    assert [len(x.token_ids) for x in out.batch.seqs] == [6]
    b = add(s, "b", 20, start=100)
    out = step(s)
    # a decodes one token; b gets the rest of the budget as its first chunk
    assert [(x.request_id, len(x.token_ids)) for x in out.batch.seqs] == [("a", 1), ("b", 9)]
    assert not out.batch.seqs[1].needs_logits
    out = step(s)
    assert [(x.request_id, len(x.token_ids)) for x in out.batch.seqs] == [("a", 1), ("b", 9)]
    out = step(s)
    assert [(x.request_id, len(x.token_ids), x.needs_logits) for x in out.batch.seqs] == [
        ("a", 1, True),
        ("b", 2, True),
    ]
    assert a.num_computed_tokens == 9 and len(b.output_token_ids) == 1


def test_chunks_cover_the_prompt_exactly_once():
    s = make_scheduler(budget=7)
    req = add(s, "a", 30)
    seen = []
    while not req.output_token_ids:
        out = step(s)
        seen.extend(out.batch.seqs[0].token_ids)
    assert seen == req.prompt_token_ids


def test_max_num_seqs_bounds_the_running_set():
    s = make_scheduler(max_num_seqs=2, budget=100)
    for i in range(4):
        add(s, str(i), 5, start=100 * i)
    step(s)
    assert s.num_running == 2 and s.num_waiting == 2


def test_preemption_when_blocks_run_out_then_recompute_from_the_cached_prefix():
    s = make_scheduler(num_blocks=6, block_size=4, budget=100)
    a = add(s, "a", 8)
    b = add(s, "b", 8, start=50)
    step(s)  # a: 2 blocks + b: 2 blocks (+ both append a token)
    for _ in range(12):
        step(s)
    assert s.num_preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0  # the newest is preempted
    # b comes back and finds its prefix cached (until evicted), and always finishes its prompt again
    while b.status != RequestStatus.RUNNING:
        s.finish_request("a", RequestStatus.FINISHED_STOPPED)
        step(s)
    assert b.num_computed_tokens > 0


def test_priority_policy_admits_and_keeps_higher_priority_first():
    s = make_scheduler(max_num_seqs=1, budget=100, policy="priority")
    add(s, "low", 4, priority=5)
    add(s, "high", 4, priority=0, start=10)
    out = step(s)
    assert out.batch.seqs[0].request_id == "high"


def test_a_prompt_larger_than_the_pool_fails_alone():
    s = make_scheduler(num_blocks=4, block_size=4, budget=100)
    big = add(s, "big", 40)
    ok = add(s, "ok", 5, start=100)
    out = step(s)
    assert out.failed == [big] and big.status == RequestStatus.FINISHED_ERROR and "pool" in big.error
    assert [x.request_id for x in out.batch.seqs] == ["ok"] and ok.output_token_ids == [7]


def test_a_request_that_outgrows_the_pool_alone_fails_with_a_clear_error():
    s = make_scheduler(num_blocks=3, block_size=4, budget=100)
    req = add(s, "a", 10)
    failed = []
    for _ in range(10):
        failed += step(s).failed
    assert failed == [req] and "too small" in req.error
    assert s.kv.num_used_blocks == 0


def test_abort_frees_blocks_at_once():
    s = make_scheduler()
    add(s, "a", 20)
    step(s)
    assert s.kv.num_used_blocks > 0
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_used_blocks == 0 and not s.has_unfinished()


def test_no_deadlock_under_heavy_contention():
    s = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=8, budget=16)
    reqs = [add(s, str(i), 6 + i % 5, start=10 * i) for i in range(12)]
    for _ in range(2000):
        out = step(s)
        for r in list(s.running):
            if len(r.output_token_ids) >= 6:
                s.finish_request(r.request_id, RequestStatus.FINISHED_LENGTH)
        if not s.has_unfinished():
            break
        assert out.batch.seqs or s.waiting, "a step with nothing to do while work remains"
    assert not s.has_unfinished()
    assert all(len(r.output_token_ids) >= 6 for r in reqs)
    assert s.kv.num_used_blocks == 0
