"""The scheduler: continuous batching, chunked prefill under the token budget, preemption, and failure
of a request that can never fit — all without a model (pure logic over token ids)."""

from __future__ import annotations

from kubellm.engine.kv_cache_manager import KVCacheManager
from kubellm.engine.request import Request, RequestStatus
from kubellm.engine.sampling_params import SamplingParams
from kubellm.engine.scheduler import Scheduler


def sample(req: Request, token_id: int) -> None:
    """A sampled token reaches the request as in the engine: a placeholder at launch, its value at read-back."""
    req.append_placeholder()
    req.resolve_placeholder(token_id)


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
        sample(req, next_token)
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


def run_to_completion(s: Scheduler, max_tokens: int) -> int:
    """Step until every request has max_tokens outputs; returns the tokens computed (recomputes included)."""
    computed = 0
    while s.has_unfinished():
        out = s.schedule()
        computed += out.batch.num_tokens
        for req in s.update_after_step(out):
            sample(req, 7)
            if len(req.output_token_ids) >= max_tokens:
                s.finish_request(req.request_id, RequestStatus.FINISHED_LENGTH)
    return computed


def add_batch(s: Scheduler, n: int, prompt: int, max_tokens: int) -> None:
    for i in range(n):
        req = Request(f"r{i}", list(range(i * 1000, i * 1000 + prompt)), SamplingParams(max_tokens=max_tokens),
                      max_tokens=max_tokens, block_size=s.kv.block_size, arrival_time=float(i))  # fmt: skip
        s.add_request(req)


def test_a_growth_reserve_admits_only_what_can_finish_without_preemption():
    """10 requests of 16 prompt + 16 output tokens (8 blocks of 4 each) into 40 blocks: admitting while blocks
    last takes all 10 prompts, then preempts and recomputes; reserving the running requests' next 16 tokens
    admits 5, which finish, then the rest: no preemption, no token computed twice."""
    greedy = make_scheduler(num_blocks=40, block_size=4, max_num_seqs=16, budget=1000)
    add_batch(greedy, 10, 16, 16)
    greedy_computed = run_to_completion(greedy, 16)
    assert greedy.num_preemptions > 0 and greedy_computed > 10 * 32 - 10  # something was computed twice

    reserved = make_scheduler(num_blocks=40, block_size=4, max_num_seqs=16, budget=1000)
    reserved.growth_reserve_tokens = 16
    add_batch(reserved, 10, 16, 16)
    first = reserved.schedule()
    assert len(first.requests) == 5  # 5 x (4 prompt + 4 growth blocks) = the whole pool
    for req in reserved.update_after_step(first):
        sample(req, 7)
    assert run_to_completion(reserved, 16) + first.batch.num_tokens == 10 * (16 + 15)  # each token once
    assert reserved.num_preemptions == 0


def test_the_growth_reserve_never_holds_back_a_request_when_nothing_runs():
    s = make_scheduler(num_blocks=8, block_size=4, budget=1000)
    s.growth_reserve_tokens = 1000  # more than the pool: still the first request is admitted
    add_batch(s, 1, 16, 16)
    assert len(s.schedule().requests) == 1


def test_a_preempted_request_waits_ahead_of_those_never_admitted():
    """vLLM's order too: the victim (the newest running request) goes back to the front of the waiting queue,
    so it resumes before requests that arrived after it."""
    s = make_scheduler(num_blocks=6, block_size=4, budget=100)
    a = add(s, "a", 8)
    b = add(s, "b", 8, start=50)
    step(s)
    c = add(s, "c", 8, start=100)  # arrives while a and b run; the pool (6 blocks) has no room for it
    for _ in range(20):
        out = step(s)
        if out.preempted:
            break
    assert out.preempted == [b] and a.num_preemptions == 0
    assert [r.request_id for r in out.requests] == ["a"]
    assert list(s.waiting) == [b, c]
    s.finish_request("a", RequestStatus.FINISHED_LENGTH)
    out = step(s)
    assert out.requests[0] is b
