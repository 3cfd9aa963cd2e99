"""The prefix index: KV-event state machine, precise/pending/approximate matching, and memory bounds."""

from __future__ import annotations

import sys
from collections import OrderedDict

import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kubellm.block_hash import hash_blocks, to_hex
from kubellm.kv_events import AllBlocksClearedEvent, BlockRemovedEvent, BlockStoredEvent, SnapshotEvent
from kubellm.router.prefix_index import ApplyResult, ApproxIndex, PreciseIndex, PrefixIndex, leading_held


def hx(hashes):
    return [to_hex(h) for h in hashes]


def prompt(i: int, n_blocks: int = 8, shared: int = 0) -> list[int]:
    """Block hashes of a prompt: `shared` leading blocks common to all, the rest unique to i."""
    tokens = [7] * (16 * shared) + [i % 50_000 + 1000 + k for k in range(16 * (n_blocks - shared))]
    return hash_blocks(tokens)


def test_snapshot_then_deltas():
    idx = PreciseIndex()
    a, b = prompt(1, 4), prompt(2, 4)
    assert idx.apply(SnapshotEvent(epoch="e1", seq=10, block_size=16, hashes=hx(a))) is ApplyResult.OK
    assert idx.live and len(idx) == 4
    assert idx.apply(BlockStoredEvent(seq=11, parent=None, hashes=hx(b))) is ApplyResult.OK
    assert len(idx) == 8
    assert idx.apply(BlockRemovedEvent(seq=12, hashes=hx(a[2:]))) is ApplyResult.OK
    assert set(idx.blocks) == set(a[:2]) | set(b)
    assert idx.apply(AllBlocksClearedEvent(seq=13)) is ApplyResult.OK
    assert len(idx) == 0 and idx.live


def test_gap_in_seq_drops_state_and_asks_for_resync():
    idx = PreciseIndex()
    idx.apply(SnapshotEvent(epoch="e1", seq=0, block_size=16, hashes=hx(prompt(1, 4))))
    assert idx.apply(BlockStoredEvent(seq=2, parent=None, hashes=hx(prompt(2, 2)))) is ApplyResult.RESYNC
    assert not idx.live and len(idx) == 0
    # events without a snapshot first are not trusted either
    assert idx.apply(BlockStoredEvent(seq=3, parent=None, hashes=[])) is ApplyResult.RESYNC
    # a new snapshot (new epoch after a restart) starts over
    assert idx.apply(SnapshotEvent(epoch="e2", seq=0, block_size=16, hashes=[])) is ApplyResult.OK
    assert idx.live and idx.epoch == "e2"


def test_precise_index_is_bounded_by_replica_capacity_over_100k_prompts():
    idx = PreciseIndex(capacity=4096)
    idx.apply(SnapshotEvent(epoch="e", seq=0, block_size=16, hashes=[]))
    for i in range(100_000):
        idx.apply(BlockStoredEvent(seq=i + 1, parent=None, hashes=hx(prompt(i, 2)[-1:])))
        assert len(idx) <= 4096
    assert len(idx) == 4096
    idx.set_capacity(100)
    assert len(idx) == 100


SHARED = hash_blocks([7] * 32)


def fast_prompt(i: int) -> list[int]:
    """8 blocks: 2 shared, 6 unique 128-bit values (cheap stand-ins for chained hashes)."""
    return SHARED + [((i * 8 + k) * 0x9E3779B97F4A7C15F39CC0605CEDC835) % (1 << 128) for k in range(6)]


def test_approx_index_stays_within_its_bound_over_100k_unique_prompts():
    bound = 50_000
    approx = ApproxIndex(bound)
    for i in range(100_000):
        approx.record(i % 4, fast_prompt(i))
        assert len(approx) <= bound
    assert len(approx) == bound
    lru = approx._lru
    used = sys.getsizeof(lru) + sum(sys.getsizeof(k) for k in lru)
    assert used < 20 * 1024 * 1024, used  # ~200 bytes per entry, not hundreds of MB
    assert approx.match(99_999 % 4, fast_prompt(99_999)) == 8
    assert approx.match(5 % 4, fast_prompt(5)) == 2  # its unique blocks were evicted; the shared ones stay hot


def test_footprint_counts_distinct_blocks_per_replica_and_shrinks_with_eviction():
    approx = ApproxIndex(10)
    approx.record(0, prompt(1, 4))
    approx.record(0, prompt(1, 4))  # the same blocks again: no growth
    approx.record(1, prompt(2, 3))
    assert (approx.footprint(0), approx.footprint(1), approx.footprint(2)) == (4, 3, 0)
    approx.record(2, prompt(3, 6))  # 13 entries > 10: replica 0's three oldest blocks leave the LRU
    assert (approx.footprint(0), approx.footprint(1), approx.footprint(2)) == (1, 3, 6)
    assert sum(approx.footprint(s) for s in range(3)) == len(approx)


def test_approx_lru_keeps_hot_prefix():
    approx = ApproxIndex(100)
    hot = prompt(0, 4)
    for i in range(1, 500):
        approx.record(1, hot)
        approx.record(2, prompt(i, 4))
    assert approx.match(1, hot) == 4


def test_prefix_index_precise_pending_and_fallback():
    idx = PrefixIndex(approx_size=1000, use_events=True)
    p = prompt(1, 6)
    # no stream yet: approximate (what the router sent)
    idx.on_send(0, p[:3])
    assert idx.match(0, p) == 3
    idx.on_done(0, p[:3])
    assert idx.match(0, p) == 3
    # a live stream makes replica 0 precise: its (empty) cache wins over our record
    idx.replica(0).apply(SnapshotEvent(epoch="e", seq=0, block_size=16, hashes=[]))
    assert idx.is_precise(0) and idx.match(0, p) == 0
    # in-flight requests count as pending until the engine reports the blocks
    idx.on_send(0, p[:5])
    assert idx.match(0, p) == 5
    idx.on_done(0, p[:5])
    assert idx.match(0, p) == 0 and not idx.pending
    idx.replica(0).apply(BlockStoredEvent(seq=1, parent=None, hashes=hx(p[:4])))
    assert idx.match(0, p) == 4
    idx.replica(0).apply(BlockRemovedEvent(seq=2, parent=None, hashes=hx(p[1:2])))
    assert idx.match(0, p) == 1  # a hole ends the prefix
    idx.drop_replica(0)
    assert not idx.is_precise(0)


def test_events_off_uses_approximate_only():
    idx = PrefixIndex(approx_size=1000, use_events=False)
    idx.replica(0).apply(SnapshotEvent(epoch="e", seq=0, block_size=16, hashes=[]))
    p = prompt(3, 4)
    idx.on_send(0, p)
    idx.on_done(0, p)
    assert idx.match(0, p) == 4


def test_pending_blocks_stay_while_any_request_holding_them_runs():
    idx = PrefixIndex(approx_size=1000, use_events=True)
    idx.replica(0).apply(SnapshotEvent(epoch="e", seq=0, block_size=16, hashes=[]))
    p, q = prompt(5, 6), prompt(5, 3)  # q is p's first three blocks
    idx.on_send(0, p)
    idx.on_send(0, q)
    idx.on_done(0, p)
    assert idx.match(0, p) == 3  # q still runs: its blocks are still on their way into the cache
    idx.on_done(0, q)
    assert idx.match(0, p) == 0 and not idx.pending


def test_match_all_gives_every_replicas_leading_match_in_one_call():
    """match_all (one call per request for all candidates) answers, for each replica, the leading blocks it holds:
    precise replicas (live event stream: cached or pending blocks), approximate ones (what was sent there), a
    replica never seen, and the empty prompt. Expected values from what this test itself placed where."""
    import random

    rng = random.Random(5)
    idx = PrefixIndex(approx_size=100_000, use_events=True)
    prompts = [prompt(i, n_blocks=12, shared=rng.choice([0, 4, 8])) for i in range(40)]
    held: dict[int, set[int]] = {s: set() for s in range(6)}
    for s in (0, 1):  # live streams: a snapshot of some prompts' first blocks, and one request's pending blocks
        cached = [h for p in prompts[s * 10 : s * 10 + 5] for h in p[: rng.randint(1, 12)]]
        idx.replica(s).apply(SnapshotEvent(epoch="e", seq=0, block_size=16, hashes=hx(cached)))
        idx.on_send(s, prompts[s * 10 + 5])
        held[s].update(cached, prompts[s * 10 + 5])
    for s in (2, 3, 4):  # no event stream: the router's record of its sends
        for p in rng.sample(prompts, 8):
            part = p[: rng.randint(1, 12)]
            idx.on_send(s, part)
            held[s].update(part)

    def leading(hs: set[int], p: list[int]) -> int:
        n = 0
        while n < len(p) and p[n] in hs:
            n += 1
        return n

    slots = [0, 1, 2, 3, 4, 5]  # (5: never seen)
    matched = 0
    for p in prompts:
        expect = [leading(held[s], p) for s in slots]
        assert idx.match_all(slots, p) == expect
        matched += sum(expect)
    assert matched > 100  # (the prompts do meet held blocks)
    assert idx.match_all(slots, []) == [0] * 6 and idx.match_all([], prompts[0]) == []


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 11), st.integers(1, 10)), min_size=1, max_size=60),
    bound=st.integers(1, 40),
)
def test_approx_match_equals_the_walk_over_a_plain_lru_model(ops, bound):
    """The approximate index under eviction, against a plain model written here: an LRU of (replica, block) pairs,
    bounded by `bound`, in which recording a prompt's first n blocks touches them deepest first. In the model, what a
    replica holds of any prompt is a prefix of it (the head is evicted last), and the index's probing match (first
    block, guess, binary search) must equal the model's block-by-block walk for every replica and prompt, alone and
    in match_all, with the footprints the model counts. Prompts share heads of 0, 2 or 5 blocks (a family tree)."""
    prompts = [prompt(i, n_blocks=10, shared=(0, 2, 5)[i % 3]) for i in range(12)]
    approx = ApproxIndex(bound)
    idx = PrefixIndex(approx_size=bound, use_events=False)
    model: OrderedDict[tuple[int, int], None] = OrderedDict()
    for slot, i, n in ops:
        part = prompts[i][:n]
        approx.record(slot, part)
        idx.on_send(slot, part)
        for h in reversed(part):
            model.pop((slot, h), None)
            model[(slot, h)] = None
        while len(model) > bound:
            model.popitem(last=False)
    slots = [0, 1, 2, 3, 4]
    for p in prompts:
        expect = []
        for s in slots:
            held = [(s, h) in model for h in p]
            m = held.index(False) if False in held else len(held)
            assert not any(held[m:]), "the model itself holds a prompt's block without its prefix"
            expect.append(m)
            assert approx.match(s, p) == m
        assert idx.match_all(slots, p) == expect
        assert idx.match_all(slots[::-1], p) == expect[::-1]  # (another order: other guesses)
    assert [approx.footprint(s) for s in slots] == [sum(1 for k in model if k[0] == s) for s in slots]


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 40),
    m=st.integers(0, 40),
    guesses=st.lists(st.integers(0, 45), max_size=5),
    salt=st.integers(0, 2**64 - 1),
)
def test_leading_held_finds_the_held_prefix_whatever_it_guesses(n, m, guesses, salt):
    """Whatever lengths match_all passes on as guesses (right, wrong, out of range, repeated, in any order), the probe
    answers the length of the held prefix, as walking the blocks one by one does."""
    hashes = [xxhash.xxh3_64_intdigest(b"%d" % i) for i in range(n)]
    m = min(m, n)
    held = {h ^ salt for h in hashes[:m]}
    assert leading_held(held, salt, hashes, guesses) == m
