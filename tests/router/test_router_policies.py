"""Policies are pure functions of (request, candidates): unit tests and bounded-load properties."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from kubellm.router.policies import (
    Candidate,
    LeastLoadPolicy,
    PrefixPolicy,
    RoundRobinPolicy,
    RouteRequest,
    SessionPolicy,
    load_cap,
    make_policy,
    within_bound,
)
from kubellm.routing import RoutingPolicy

REQ = RouteRequest("m")
PROMPT = RouteRequest("m", num_blocks=100)  # a 1600-token prompt (16-token blocks)


def cands(*loads: int, matched: tuple[int, ...] = (), footprints: tuple[int, ...] = ()) -> list[Candidate]:
    matched = matched or (0,) * len(loads)
    footprints = footprints or (0,) * len(loads)
    return [
        Candidate(f"r{i}", in_flight=load, matched_blocks=m, footprint=f)
        for i, (load, m, f) in enumerate(zip(loads, matched, footprints, strict=True))
    ]


def test_enum_names_are_the_cli_and_crd_values():
    assert [p.value for p in RoutingPolicy] == ["round_robin", "least_load", "session", "prefix"]
    assert isinstance(make_policy("prefix"), PrefixPolicy)
    assert isinstance(make_policy(RoutingPolicy.SESSION), SessionPolicy)


def test_round_robin_cycles_in_stable_order():
    p = RoundRobinPolicy()
    picks = [p.choose(REQ, cands(0, 0, 0)).key for _ in range(6)]
    assert picks == ["r0", "r1", "r2", "r0", "r1", "r2"]


def test_least_load_counts_in_flight_and_engine_waiting():
    p = LeastLoadPolicy()
    cs = cands(3, 1, 2)
    assert p.choose(REQ, cs).key == "r1"
    cs[1].waiting = 5
    assert p.choose(REQ, cs).key == "r2"


def test_least_load_spreads_ties():
    p = LeastLoadPolicy()
    assert len({p.choose(REQ, cands(0, 0, 0)).key for _ in range(6)}) == 3


def test_session_affinity_is_stable_and_spills_when_over_bound():
    p = SessionPolicy(1.25)
    req = RouteRequest("m", session_key="alice")
    home = p.choose(req, cands(0, 0, 0, 0)).key
    assert all(p.choose(req, cands(1, 1, 1, 1)).key == home for _ in range(5))
    loads = [2, 2, 2, 2]
    loads[int(home[1])] = 9
    d = p.choose(req, cands(*loads))
    assert d.key != home and d.reason == "load_spill"
    # a departing replica moves only its own sessions (rendezvous hashing)
    keys = [f"user{i}" for i in range(200)]
    before = {k: p.choose(RouteRequest("m", session_key=k), cands(0, 0, 0, 0)).key for k in keys}
    after = {k: p.choose(RouteRequest("m", session_key=k), cands(0, 0, 0)).key for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "r3")


def test_session_without_key_falls_back_to_least_load():
    d = SessionPolicy().choose(RouteRequest("m"), cands(2, 0, 1))
    assert d.key == "r1" and d.reason == "no_session"


def test_prefix_prefers_longest_match_then_least_loaded():
    p = PrefixPolicy(1.25)
    d = p.choose(PROMPT, cands(1, 1, 1, matched=(40, 90, 60)))
    assert (d.key, d.reason, d.matched_blocks) == ("r1", "prefix_hit", 90)
    d = p.choose(PROMPT, cands(2, 1, 3, matched=(0, 0, 0)))
    assert (d.key, d.reason) == ("r1", "no_match")
    d = p.choose(PROMPT, cands(2, 1, 3, matched=(50, 50, 0)))
    assert (d.key, d.reason) == ("r1", "prefix_hit")


def test_new_working_set_goes_to_the_smallest_footprint():
    p = PrefixPolicy(1.25, load_floor=8)
    cs = cands(0, 3, 1, footprints=(900, 100, 400))
    d = p.choose(PROMPT, cs)
    assert (d.key, d.reason) == ("r1", "no_match")  # the least cached work beats the least in flight
    cs[0].matched_blocks = 40
    assert p.choose(PROMPT, cs).key == "r0"  # a match worth following wins over footprint
    cs[1].in_flight = 9  # r1 over the floor and the bound: the smallest footprint among those within it
    cs[0].matched_blocks = 0
    assert p.choose(PROMPT, cs).key == "r2"


def test_new_working_sets_spread_by_size_not_count():
    """48 tenants' first prompts, every fourth one four times longer, placed as the router records them (nothing
    in flight, so load cannot tell replicas apart): cached work ends within one prompt of even, where taking
    turns would stack every long prompt on one replica."""
    p = PrefixPolicy(1.25, load_floor=8)
    cs = cands(0, 0, 0, 0)
    for tenant in range(48):
        d = p.choose(PROMPT, cs)
        next(x for x in cs if x.key == d.key).footprint += 512 if tenant % 4 == 0 else 128
    footprints = [c.footprint for c in cs]
    assert max(footprints) - min(footprints) <= 512, footprints


def test_a_short_shared_template_head_does_not_pull_a_request():
    """Every chat prompt starts with the template's system/role tokens (one 16-token block here). The replica
    that holds only that block saves a millisecond of prefill, not worth stacking unrelated prompts on it: the
    prompt is placed as a new working set (smallest footprint), and the decision says why."""
    p = PrefixPolicy(1.25, load_floor=16)
    cs = cands(3, 0, 0, 0, matched=(1, 0, 0, 0), footprints=(56, 56, 0, 56))
    d = p.choose(RouteRequest("m", num_blocks=56), cs)
    assert (d.key, d.reason, d.matched_blocks) == ("r2", "short_match", 0)


def test_uniform_prompts_sharing_only_the_head_spread_like_round_robin():
    """500 random 56-block prompts that share one head block, placed one after another with nothing in flight:
    each replica gets a quarter. Counting the head as affinity sent all but the first to one replica."""
    for policy, even in ((PrefixPolicy(1.25, load_floor=16), True),
                         (PrefixPolicy(1.25, 16, min_match_ratio=0, min_match_tokens=0), False)):  # fmt: skip
        cs = cands(0, 0, 0, 0)
        placed: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for _ in range(500):
            d = policy.choose(RouteRequest("m", num_blocks=56), cs)
            placed[d.key] += 1
            reasons[d.reason] += 1
            chosen = next(x for x in cs if x.key == d.key)
            chosen.footprint += 55 + (chosen.matched_blocks == 0)  # its own 55 blocks, and the head once
            chosen.matched_blocks = 1  # it now holds the head
        if even:
            assert sorted(placed.values()) == [125, 125, 125, 125]
            assert reasons == {"no_match": 1, "short_match": 499}
        else:
            assert sorted(placed.values()) == [500] and reasons == {"no_match": 1, "prefix_hit": 499}


def test_a_long_shared_prefix_does_pull_a_request():
    """A tenant's 1600-token system prompt on r2, with this turn's 400 new tokens behind it: r2 takes the
    request although it is the busiest and holds the most, as long as it is within the bound."""
    p = PrefixPolicy(1.25, load_floor=16)
    cs = cands(1, 0, 6, 2, matched=(1, 1, 100, 1), footprints=(300, 200, 900, 100))
    d = p.choose(RouteRequest("m", num_blocks=125), cs)
    assert (d.key, d.reason, d.matched_blocks) == ("r2", "prefix_hit", 100)


def test_the_threshold_is_a_fraction_of_the_prompt_and_a_number_of_tokens():
    p = PrefixPolicy(1.25, load_floor=16, min_match_ratio=0.3, min_match_tokens=64)
    assert p.min_match_blocks(RouteRequest("m", num_blocks=100)) == 30  # 30% of a 100-block prompt
    assert p.min_match_blocks(RouteRequest("m", num_blocks=5)) == 4  # 64 tokens of 16-token blocks
    assert p.min_match_blocks(RouteRequest("m", num_blocks=5, block_tokens=32)) == 2
    assert p.min_match_blocks(RouteRequest("m", num_blocks=10, block_tokens=256)) == 3
    for matched, reason in ((29, "short_match"), (30, "prefix_hit")):
        d = p.choose(PROMPT, cands(1, 0, matched=(matched, 0)))
        assert (d.key, d.reason) == ("r0" if reason == "prefix_hit" else "r1", reason)
    for matched, reason in ((3, "short_match"), (4, "prefix_hit")):
        d = p.choose(RouteRequest("m", num_blocks=5), cands(1, 0, matched=(matched, 0)))
        assert (d.key, d.reason) == ("r0" if reason == "prefix_hit" else "r1", reason)
    any_match = PrefixPolicy(1.25, min_match_ratio=0, min_match_tokens=0)
    assert any_match.min_match_blocks(PROMPT) == 1
    assert any_match.choose(PROMPT, cands(1, 0, matched=(1, 0))).reason == "prefix_hit"


def test_a_worthwhile_match_on_a_replica_over_the_bound_is_a_spill_not_a_short_match():
    p = PrefixPolicy(1.25)
    d = p.choose(PROMPT, cands(9, 1, 1, 1, matched=(80, 10, 0, 0)))  # cap 4: r0 holds 80 blocks but is full
    assert d.key != "r0" and d.reason == "load_spill"


def test_prefix_spills_when_holder_exceeds_bound():
    p = PrefixPolicy(1.25)
    # total after = 9 -> cap = ceil(1.25 * 9 / 4) = 3; r0 holds 5 and the prefix
    d = p.choose(PROMPT, cands(5, 1, 1, 1, matched=(80, 0, 40, 0)))
    assert (d.key, d.reason, d.matched_blocks) == ("r2", "load_spill", 40)


def test_bound_binds_only_on_a_replica_with_a_request_waiting_for_its_first_byte():
    p = PrefixPolicy(1.25, load_floor=8)
    cs = cands(12, 4, 4, 4, matched=(100, 0, 0, 0))  # cap = max(8, ceil(1.25 * 25 / 4)) = 8; r0 holds 12
    cs[0].answering = 12  # all of r0's requests are streaming: it keeps up, the cache hit stays
    assert p.choose(PROMPT, cs).key == "r0"
    cs[0].answering = 11  # one waits (queued or in prefill): the bound applies and the prompt spills
    d = p.choose(PROMPT, cs)
    assert d.key != "r0" and d.reason == "load_spill"


def test_hot_prefix_spreads_within_c_times_mean():
    """One hot prefix, requests arriving and never finishing: every load stays within ceil(c × mean)."""
    for c in (1.0, 1.25, 2.0):
        p = PrefixPolicy(c)
        cs = cands(0, 0, 0, 0, matched=(90, 0, 0, 0))
        for _ in range(200):
            d = p.choose(PROMPT, cs)
            chosen = next(x for x in cs if x.key == d.key)
            chosen.in_flight += 1
            chosen.matched_blocks = 90  # it now holds the prefix too
            total = sum(x.in_flight for x in cs)
            assert max(x.in_flight for x in cs) <= math.ceil(c * total / len(cs))


@given(
    loads=st.lists(st.integers(0, 50), min_size=1, max_size=8),
    matched=st.lists(st.integers(0, 40), min_size=8, max_size=8),
    c=st.floats(1.0, 3.0),
)
def test_prefix_choice_always_within_bound(loads, matched, c):
    """Whatever the loads and matches of a 40-block prompt: the pick is within the bound; a match below the
    threshold (12 blocks: 0.3 of the prompt) never decides; at or above it, the longest eligible one wins."""
    cs = cands(*loads, matched=tuple(matched[: len(loads)]))
    p = PrefixPolicy(c)
    req = RouteRequest("m", num_blocks=40)
    need = p.min_match_blocks(req)
    assert need == 12
    d = p.choose(req, cs)
    chosen = next(x for x in cs if x.key == d.key)
    cap = load_cap(cs, c)
    assert chosen.in_flight + 1 <= cap or chosen.in_flight == min(loads)
    eligible = within_bound(cs, c)
    assert chosen in eligible
    worth = [x.matched_blocks for x in eligible if x.matched_blocks >= need]
    best = max(x.matched_blocks for x in cs)
    if worth:
        assert d.matched_blocks == max(worth)
        assert d.reason == ("prefix_hit" if max(worth) == best else "load_spill")
    elif best >= need:
        assert d.reason == "load_spill"  # the only replicas worth following are over the bound
    else:
        assert d.reason == ("short_match" if best else "no_match")


@given(n=st.integers(1, 8), requests=st.integers(1, 300))
def test_round_robin_is_fair(n, requests):
    p = RoundRobinPolicy()
    counts = Counter(p.choose(REQ, cands(*([0] * n))).key for _ in range(requests))
    assert max(counts.values()) - min(counts.get(f"r{i}", 0) for i in range(n)) <= 1


def test_prefix_policy_with_one_replica_names_the_reason_by_the_match_threshold():
    """One candidate (a one-replica model): no choice, and the reason follows the minimum match (3 of 10 blocks
    with ratio 0.25 and no token floor): 3+ is a hit, 1-2 a short match, 0 no match; whatever its load."""
    p = PrefixPolicy(balance_factor=1.5, min_match_ratio=0.25, min_match_tokens=0)
    req = RouteRequest("m", num_blocks=10)
    want = {0: "no_match", 1: "short_match", 2: "short_match", 3: "prefix_hit", 10: "prefix_hit"}
    for matched, reason in want.items():
        for load in (0, 50):
            d = p.choose(req, cands(load, matched=(matched,)))
            assert (d.key, d.reason, d.matched_blocks) == ("r0", reason, matched)


def _reference_prefix_choice(
    req: RouteRequest, cs: list[Candidate], turn: int, c: float, floor: int, ratio: float, tokens: int
) -> tuple[str, str, int]:
    """The prefix rule as docs/router.md states it, written plainly: (replica, reason, matched blocks)."""
    need = max(1, -(-tokens // req.block_tokens), math.ceil(ratio * req.num_blocks - 1e-9))

    def earned(x: Candidate) -> int:
        return x.matched_blocks if x.matched_blocks >= need else 0

    if len(cs) == 1:
        m = cs[0].matched_blocks
        return cs[0].key, "prefix_hit" if m >= need else "short_match" if m else "no_match", m
    cap = max(1, floor, math.ceil(c * (sum(x.in_flight for x in cs) + 1) / len(cs)))
    eligible = [x for x in cs if x.in_flight + 1 <= cap or x.answering >= x.in_flight]
    if not eligible:
        eligible = [min(cs, key=lambda x: x.in_flight)]
    k = turn % len(eligible)
    rotated = eligible[k:] + eligible[:k]
    ranked = sorted(
        range(len(rotated)),
        key=lambda i: (-earned(rotated[i]), 0 if earned(rotated[i]) else rotated[i].footprint,
                       rotated[i].in_flight + rotated[i].waiting, i),
    )  # fmt: skip
    pick = rotated[ranked[0]]
    best = max(earned(x) for x in cs)
    if earned(pick) < best:
        reason = "load_spill"
    elif earned(pick):
        reason = "prefix_hit"
    else:
        reason = "short_match" if any(x.matched_blocks for x in cs) else "no_match"
    return pick.key, reason, pick.matched_blocks


@given(
    rows=st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(0, 8), st.integers(0, 30), st.integers(0, 500)),
        min_size=1,
        max_size=12,
    ),
    blocks=st.integers(0, 60),
    c=st.sampled_from([1.0, 1.25, 2.0]),
    floor=st.sampled_from([0, 4, 16]),
    ratio=st.sampled_from([0.0, 0.3, 0.9]),
    tokens=st.sampled_from([0, 64, 300]),
    turns=st.integers(0, 30),
)
def test_prefix_choice_equals_the_plainly_written_rule(rows, blocks, c, floor, ratio, tokens, turns):
    """The policy (written for speed: it runs for every replica of every request) decides exactly as the rule does
    written plainly: same replica, same reason, same matched blocks, ties rotating the same way; with the answering
    counts and engine queues, footprints and thresholds all varied."""
    cs = [
        Candidate(f"r{i}", in_flight=inf, answering=min(ans, inf), waiting=w, matched_blocks=m, footprint=f)
        for i, (inf, ans, w, m, f) in enumerate(rows)
    ]
    req = RouteRequest("m", num_blocks=blocks)
    p = PrefixPolicy(c, floor, ratio, tokens)
    p._turn = turns
    got = p.choose(req, cs)
    assert (got.key, got.reason, got.matched_blocks) == _reference_prefix_choice(
        req, cs, turns + 1, c, floor, ratio, tokens
    )


def test_choose_row_returns_the_row_choose_picks_with_its_payload():
    """The router's hot path hands candidates over as rows (plain tuples carrying its backend): every policy answers
    with the row of the replica `choose` would pick, its reason and matched blocks, for the same state."""
    state = [("r0", 3, 1, 0, 0, 40), ("r1", 1, 0, 2, 6, 10), ("r2", 0, 0, 0, 2, 0)]
    req = RouteRequest("m", session_key="user-7", num_blocks=8, block_tokens=16)
    for name in ("round_robin", "least_load", "session", "prefix"):
        by_choose, by_row = make_policy(name, 1.5, 0, 0.5, 0), make_policy(name, 1.5, 0, 0.5, 0)
        for _ in range(4):
            d = by_choose.choose(req, [Candidate(*s) for s in state])
            row, reason, matched = by_row.choose_row(req, [(*s, f"payload of {s[0]}") for s in state])
            assert (row[0], row[6], reason, matched) == (d.key, f"payload of {d.key}", d.reason, d.matched_blocks)


@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 12),
            st.integers(0, 12),
            st.integers(0, 4),
            st.integers(0, 12) | st.sampled_from([0, 12]),  # (ties on the longest match, earned or not)
            st.integers(0, 50) | st.integers(0, 2),  # (ties on the footprint)
        ),
        min_size=1,
        max_size=10,
    ),
    spread=st.sampled_from([1, 12]),  # 1: even loads, every replica within the bound (choose_index's tie path)
    blocks=st.integers(0, 14),
    c=st.sampled_from([1.0, 1.25, 2.0]),
    floor=st.sampled_from([0, 4]),
    ratio=st.sampled_from([0.0, 0.3, 0.9]),
    tokens=st.sampled_from([0, 64]),
    turns=st.integers(0, 30),
)
def test_choose_index_picks_what_choose_row_picks(rows, spread, blocks, c, floor, ratio, tokens, turns):
    """The router's pick without rows (choose_index over its backends, the matches and a footprint lookup) picks the
    replica choose_row picks, with its reason and match, and leaves the tie rotation where choose_row leaves it; it
    reads a footprint only where no replica it compares holds an earned match (as the rule does). The draws make
    ties (longest match, footprint, load) and all-within-the-bound states common, not rare."""
    rows = [(min(inf, spread), *rest) for inf, *rest in rows]
    state = [(f"r{i}", inf, min(ans, inf), w, m, f, i) for i, (inf, ans, w, m, f) in enumerate(rows)]
    req = RouteRequest("m", num_blocks=blocks, block_tokens=16)
    full, fast = PrefixPolicy(c, floor, ratio, tokens), PrefixPolicy(c, floor, ratio, tokens)
    full._turn = fast._turn = turns
    row, reason, matched = full.choose_row(req, state)
    loads = [Candidate(r[0], r[1], r[2], r[3]) for r in state]  # (no match or footprint on them: passed apart)
    matches = [r[4] for r in state]
    read: list[int] = []

    def footprint(i: int) -> int:
        read.append(i)
        return state[i][5]

    i, why = fast.choose_index(req, loads, matches, footprint)
    assert (state[i], why, matches[i]) == (row, reason, matched)
    assert fast._turn == full._turn
    need = fast.min_match_blocks(req)
    assert all(matches[j] < need for j in read)  # footprints only decide among replicas with no earned match


def test_choose_index_cases():
    """The sole holder within the bound, a tie rotated, the holder over the bound spilled, and a lone replica."""
    p = PrefixPolicy(1.25, 0, 0.5, 0)
    req = RouteRequest("m", num_blocks=8, block_tokens=16)
    idle = [Candidate(f"r{i}") for i in range(4)]
    assert p.choose_index(req, idle, [0, 7, 3, 2], lambda i: 0) == (1, "prefix_hit") and p._turn == 1
    assert p.choose_index(req, idle, [0, 7, 7, 2], lambda i: 0) == (2, "prefix_hit")  # a tie: the rotation decides
    assert p.choose_index(req, idle, [0, 7, 7, 2], lambda i: 0) == (1, "prefix_hit")
    assert p.choose_index(req, idle, [0, 2, 1, 0], lambda i: [5, 1, 0, 9][i]) == (2, "short_match")  # too short
    busy = [Candidate("r0", 0), Candidate("r1", 8), Candidate("r2", 0), Candidate("r3", 0)]
    assert p.choose_index(req, busy, [0, 7, 5, 0], lambda i: 0) == (2, "load_spill")
    turn = p._turn
    assert p.choose_index(req, [Candidate("r0", 50)], [9], lambda i: 0) == (0, "prefix_hit") and p._turn == turn
    # two holders, the less loaded one exactly at the cap (ceil(5/3) = 2) and not answering: it may not take it
    tight = PrefixPolicy(1.0, 0, 0.5, 0)
    at_cap = [Candidate("r0", 2), Candidate("r1", 1, waiting=5), Candidate("r2", 0)]
    assert tight.choose_index(req, at_cap, [8, 8, 0], lambda i: 0) == (1, "prefix_hit")
