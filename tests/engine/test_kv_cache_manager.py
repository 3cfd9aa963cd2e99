"""The KV cache manager: block accounting, prefix cache hits, LRU eviction and KV events."""

from __future__ import annotations

from kubellm.block_hash import hash_blocks
from kubellm.engine.kv_cache_manager import KVCacheManager
from kubellm.engine.request import Request
from kubellm.engine.sampling_params import SamplingParams


def sample(req: Request, token_id: int) -> None:
    """A sampled token reaches the request as in the engine: a placeholder at launch, its value at read-back."""
    req.append_placeholder()
    req.resolve_placeholder(token_id)


def make_request(rid: str, tokens: list[int], block_size: int = 4) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=8), max_tokens=8, block_size=block_size)


def run_prefill(kv: KVCacheManager, req: Request) -> int:
    """Schedule the whole prompt at once, as the scheduler would; returns the cached-token count."""
    cached = kv.find_cached_prefix(req)
    req.num_computed_tokens = len(cached) * kv.block_size
    assert kv.allocate(req, req.num_tokens - req.num_computed_tokens, cached)
    req.num_computed_tokens = req.num_tokens
    kv.commit_computed(req)
    return len(cached) * kv.block_size


def test_allocation_counts_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    req = make_request("a", list(range(10)))
    run_prefill(kv, req)
    assert len(kv.block_ids("a")) == 3
    assert kv.num_used_blocks == 3 and kv.usage == 0.3
    kv.free(req)
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 10


def test_allocation_fails_without_side_effects_when_the_pool_is_short():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    req = make_request("a", list(range(12)))
    assert not kv.allocate(req, 12)
    assert kv.num_free_blocks == 2 and kv.block_ids("a") == []


def test_repeated_prompt_hits_the_prefix_cache_leaving_the_last_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    tokens = list(range(16))  # exactly 4 full blocks
    run_prefill(kv, make_request("a", tokens))
    b = make_request("b", tokens)
    hit = run_prefill(kv, b)
    assert hit == 12  # the last block is recomputed so the last token has logits
    assert kv.block_ids("b")[:3] == kv.block_ids("a")[:3]
    assert kv.blocks[kv.block_ids("a")[0]].ref_count == 2
    assert kv.stats.hits == 0  # lookups are recorded by the scheduler, not by find_cached_prefix


def test_freed_cached_blocks_are_reused_by_a_later_request_with_the_same_prefix():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(9)))
    run_prefill(kv, a)
    kv.free(a)
    b = make_request("b", list(range(8)) + [99, 98])
    assert run_prefill(kv, b) == 8


def test_eviction_is_lru_and_emits_removed_events():
    events = []
    kv = KVCacheManager(num_blocks=4, block_size=4, on_event=events.append)
    a = make_request("a", list(range(8)) + [1])  # 2 full blocks + 1 partial
    run_prefill(kv, a)
    assert events[0] == ("stored", hash_blocks(a.prompt_token_ids, 4), None)
    kv.free(a)
    # The unhashed partial block is reused first; the cached ones are evicted head-last.
    c = make_request("c", list(range(100, 116)))
    run_prefill(kv, c)
    removed = [h for kind, hs, _ in events if kind == "removed" for h in hs]
    a_hashes = hash_blocks(a.prompt_token_ids, 4)
    assert removed == [a_hashes[1], a_hashes[0]]
    assert kv.cached_block_hashes() == hash_blocks(c.prompt_token_ids, 4)


def test_stored_event_carries_the_parent_of_a_continuation():
    events = []
    kv = KVCacheManager(num_blocks=8, block_size=4, on_event=events.append)
    req = make_request("a", list(range(6)))
    run_prefill(kv, req)  # one full block
    for t in (6, 7):
        sample(req, t)
    assert kv.allocate(req, 1)
    req.num_computed_tokens = 8
    kv.commit_computed(req)
    hashes = hash_blocks(list(range(8)), 4)
    assert events == [("stored", [hashes[0]], None), ("stored", [hashes[1]], hashes[0])]


def test_prefix_caching_off_never_hits_and_emits_nothing():
    events = []
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False, on_event=events.append)
    run_prefill(kv, make_request("a", list(range(12))))
    assert run_prefill(kv, make_request("b", list(range(12)))) == 0
    assert events == []


def test_salt_separates_caches():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(12)))
    run_prefill(kv, a)
    b = make_request("b", list(range(12)))
    b.cache_salt = "tenant-2"
    assert run_prefill(kv, b) == 0


def test_reset_prefix_cache_only_when_idle():
    events = []
    kv = KVCacheManager(num_blocks=8, block_size=4, on_event=events.append)
    a = make_request("a", list(range(8)))
    run_prefill(kv, a)
    assert not kv.reset_prefix_cache()
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.cached_block_hashes() == [] and events[-1] == ("cleared", [], None)
