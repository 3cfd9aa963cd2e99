"""Sampler: exact distributions on fixed logits (statistical, fixed seeds), greedy and top_k=1, seeded
reproducibility across batch compositions, min_tokens, penalties and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from kubellm.engine.sampler import Sampler, SamplingState
from kubellm.engine.sampling_params import SamplingParams

LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]
V = len(LOGITS)
N = 20_000
# 4.5 standard deviations of a frequency at p = 0.5 over N draws: a correct sampler fails with p < 1e-5,
# and the draws are seeded, so the outcome is fixed anyway.
TOL = 4.5 * math.sqrt(0.25 / N)


def softmax(xs: list[float]) -> list[float]:
    m = max(x for x in xs if x != -math.inf)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
    s = sum(e)
    return [v / s for v in e]


def draw(params: SamplingParams, logits: list[float] = LOGITS, n: int = N, **state) -> list[float]:
    """Frequencies of each token over n unseeded rows sampled in one batch."""
    sampler = Sampler(eos_token_ids=state.pop("eos", ()), seed=1234)
    batch = torch.tensor([logits], dtype=torch.float32).expand(n, -1).contiguous()
    states = [SamplingState(params, state.get("prompt", []), list(state.get("output", []))) for _ in range(n)]
    out = sampler(batch, states)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=len(logits))
    return (counts.double() / n).tolist()


def assert_matches(freq: list[float], expected: list[float]) -> None:
    assert abs(sum(expected) - 1.0) < 1e-9
    for tok, (f, p) in enumerate(zip(freq, expected, strict=True)):
        if p == 0.0:
            assert f == 0.0, f"token {tok} has probability 0 but was drawn at frequency {f}"
        else:
            assert abs(f - p) < TOL, f"token {tok}: frequency {f:.4f}, expected {p:.4f}\n{freq}\n{expected}"


def keep(probs: list[float], kept: set[int]) -> list[float]:
    total = sum(probs[i] for i in kept)
    return [p / total if i in kept else 0.0 for i, p in enumerate(probs)]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature(temperature):
    assert_matches(draw(SamplingParams(temperature=temperature)), softmax([x / temperature for x in LOGITS]))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k(k):
    expected = keep(softmax([x / 0.8 for x in LOGITS]), set(range(k)))  # LOGITS are sorted
    assert_matches(draw(SamplingParams(temperature=0.8, top_k=k)), expected)


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p(top_p):
    probs = softmax(LOGITS)
    kept, mass = set(), 0.0
    for i in sorted(range(V), key=lambda i: -probs[i]):  # the smallest head reaching top_p
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    assert_matches(draw(SamplingParams(top_p=top_p)), keep(probs, kept))


def nucleus(probs: list[float], top_p: float) -> set[int]:
    """The smallest head of `probs` whose mass reaches top_p."""
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return kept


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_top_p_without_host_reads_sorts_and_gives_the_same_distribution(monkeypatch, top_p):
    """The CUDA path (no host read to find rows whose head outgrows the candidates), run on CPU: the same
    distributions, with and without a top_k beside top_p."""
    from kubellm.engine import sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "_host_reads_are_cheap", lambda device: False)
    probs = softmax(LOGITS)
    assert_matches(draw(SamplingParams(top_p=top_p)), keep(probs, nucleus(probs, top_p)))
    top3 = keep(probs, {0, 1, 2})  # LOGITS are sorted: top_k=3 keeps tokens 0..2
    assert_matches(draw(SamplingParams(top_p=top_p, top_k=3)), keep(top3, nucleus(top3, top_p)))


@pytest.mark.parametrize("min_p", [0.1, 0.3, 0.7])
def test_min_p(min_p):
    probs = softmax(LOGITS)
    kept = {i for i, p in enumerate(probs) if p >= min_p * max(probs)}
    assert_matches(draw(SamplingParams(min_p=min_p)), keep(probs, kept))


def test_filters_compose_in_order_temperature_top_k_top_p_min_p():
    probs = softmax([x / 1.5 for x in LOGITS])
    kept = set(range(6))  # top_k=6
    head = keep(probs, kept)
    running, top = 0.0, set()
    for i in range(V):  # top_p=0.85 over the top-k renormalised distribution
        if head[i] == 0.0:
            break
        top.add(i)
        running += head[i]
        if running >= 0.85:
            break
    after_p = keep(head, top)
    final = {i for i in top if after_p[i] >= 0.4 * max(after_p)}  # min_p=0.4 last
    assert final != top  # min_p really removes something here
    assert top != kept  # and top_p removes something after top_k
    params = SamplingParams(temperature=1.5, top_k=6, top_p=0.85, min_p=0.4)
    assert_matches(draw(params), keep(probs, final))


def test_repetition_presence_frequency_penalties():
    prompt, output = [0, 5], [1, 1, 2]
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2)
    x = list(LOGITS)
    for t in set(prompt) | set(output):  # HF/vLLM: divide positive logits, multiply negative ones
        x[t] = x[t] / 1.5 if x[t] > 0 else x[t] * 1.5
    for t in set(output):  # OpenAI: per occurrence and once
        x[t] -= 0.3 * output.count(t) + 0.2
    assert_matches(draw(params, prompt=prompt, output=output), softmax(x))


def test_negative_presence_penalty_encourages_repeats():
    params = SamplingParams(presence_penalty=-2.0)
    x = list(LOGITS)
    x[7] += 2.0
    assert_matches(draw(params, output=[7, 7]), softmax(x))


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    params = SamplingParams(min_tokens=2, stop_token_ids=[3])
    probs = softmax(LOGITS)
    assert_matches(draw(params, eos=[0], output=[9]), keep(probs, set(range(V)) - {0, 3}))
    assert_matches(draw(params, eos=[0], output=[9, 9]), probs)  # reached: nothing masked
    ignore = SamplingParams(min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    assert_matches(draw(ignore, eos=[0], output=[]), keep(probs, set(range(V)) - {3}))


def test_greedy_takes_argmax_of_penalised_logits():
    sampler = Sampler(eos_token_ids=[0])
    logits = torch.tensor([LOGITS])
    assert sampler(logits, [SamplingState(SamplingParams(temperature=0), [])]).token_ids == [0]
    penalised = SamplingState(SamplingParams(temperature=0, repetition_penalty=2.0), [0], [])
    assert sampler(logits, [penalised]).token_ids == [1]  # 2.0 / 2 = 1.0 < 1.5
    masked = SamplingState(SamplingParams(temperature=0, min_tokens=1), [])
    assert sampler(logits, [masked]).token_ids == [1]  # EOS (0) masked until one token exists


def _random_logits(step: int, rows: int, vocab: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(rows, vocab, generator=g) * 3


def test_top_k_one_equals_greedy():
    sampler = Sampler(seed=0)
    logits = _random_logits(0, 64)
    prompt = list(range(10))
    greedy = [SamplingState(SamplingParams(temperature=0, repetition_penalty=1.3), prompt) for _ in range(64)]
    top1 = [
        SamplingState.create(SamplingParams(temperature=1.7, top_k=1, repetition_penalty=1.3, seed=i), prompt)
        for i in range(32)
    ] + [SamplingState(SamplingParams(temperature=0.9, top_k=1, repetition_penalty=1.3), prompt) for _ in range(32)]
    expected = logits.clone()
    expected[:, :10] = torch.where(expected[:, :10] > 0, expected[:, :10] / 1.3, expected[:, :10] * 1.3)
    assert sampler(logits, greedy).token_ids == expected.argmax(-1).tolist()
    assert sampler(logits, top1).token_ids == expected.argmax(-1).tolist()


def _run(states_by_step, rows_of_interest, steps: int, sampler: Sampler) -> dict[int, list[int]]:
    """Decode `steps` tokens; each row's logits depend only on (step, row id), as a model's would."""
    produced: dict[int, list[int]] = {r: [] for r in rows_of_interest}
    for step in range(steps):
        row_ids, states = zip(*states_by_step, strict=True)
        table = _random_logits(step, 64)
        logits = table[list(row_ids)]
        out = sampler(logits, list(states))
        for rid, st, tok in zip(row_ids, states, out.token_ids, strict=True):
            st.output_token_ids.append(tok)
            if rid in produced:
                produced[rid].append(tok)
    return produced


def test_seeded_requests_reproduce_across_batch_compositions():
    def params(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_p=0.95, top_k=50, presence_penalty=0.5, seed=seed)

    alone = {}
    for rid, seed in [(3, 11), (7, 22)]:
        alone.update(_run([(rid, SamplingState.create(params(seed), [1, 2]))], [rid], 12, Sampler(seed=0)))
    # Same requests inside a larger batch, in another order, next to unseeded, greedy and other seeded rows.
    mixed = [
        (0, SamplingState(SamplingParams(temperature=0.8), [1])),
        (7, SamplingState.create(params(22), [1, 2])),
        (1, SamplingState(SamplingParams(temperature=0), [1])),
        (5, SamplingState.create(SamplingParams(seed=5, min_p=0.1), [4])),
        (3, SamplingState.create(params(11), [1, 2])),
        (2, SamplingState(SamplingParams(top_k=3, repetition_penalty=1.2), [9])),
    ]
    together = _run(mixed, [3, 7], 12, Sampler(seed=99))
    assert together == alone
    assert alone[3] != alone[7]
    again = _run([(3, SamplingState.create(params(12), [1, 2]))], [3], 12, Sampler(seed=0))
    assert again[3] != alone[3]  # another seed, another sequence


def test_unseeded_requests_follow_the_sampler_seed():
    logits = _random_logits(0, 16)
    a = Sampler(seed=5)(logits, [SamplingState(SamplingParams(), []) for _ in range(16)]).token_ids
    b = Sampler(seed=5)(logits, [SamplingState(SamplingParams(), []) for _ in range(16)]).token_ids
    assert a == b


def test_seeded_rows_have_the_exact_distribution():
    n = 4000
    batch = torch.tensor([LOGITS]).expand(n, -1).contiguous()
    states = [SamplingState.create(SamplingParams(temperature=0.7, seed=s), []) for s in range(n)]
    counts = torch.bincount(torch.tensor(Sampler()(batch, states).token_ids), minlength=V)
    expected = softmax([x / 0.7 for x in LOGITS])
    for f, p in zip((counts.double() / n).tolist(), expected, strict=True):
        assert abs(f - p) < 4.5 * math.sqrt(0.25 / n)


def test_logprobs_are_raw_log_softmax():
    logits = _random_logits(3, 6, vocab=50)
    states = [
        SamplingState(SamplingParams(temperature=0, logprobs=5), []),
        SamplingState(SamplingParams(temperature=0.3, logprobs=0, repetition_penalty=2.0), [1, 2, 3]),
        SamplingState(SamplingParams(temperature=1.2, top_k=4), []),  # no logprobs asked
        SamplingState.create(SamplingParams(temperature=1.0, logprobs=20, seed=1), []),
        SamplingState(SamplingParams(min_tokens=2, logprobs=2), [], []),
        SamplingState(SamplingParams(top_p=0.5, logprobs=1), []),
    ]
    out = Sampler(eos_token_ids=[int(logits[4].argmax())], seed=0)(logits, states)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs[2] is None
    for row in (0, 1, 3, 4, 5):
        lp = out.logprobs[row]
        tok = out.token_ids[row]
        assert lp is not None and lp.token_id == tok
        assert lp.logprob == pytest.approx(ref[row, tok].item(), abs=1e-5)
        assert lp.rank == int((ref[row] > ref[row, tok]).sum()) + 1
        k = states[row].params.logprobs
        assert len(lp.top) == k
        top_vals, top_ids = ref[row].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_vals.tolist(), abs=1e-5)
    assert out.logprobs[0].rank == 1 and out.logprobs[0].top[0][0] == out.token_ids[0]
    assert out.logprobs[4].rank > 1  # the masked EOS was the argmax; the logprobs still describe the model


def test_input_logits_not_modified():
    logits = _random_logits(4, 3)
    before = logits.clone()
    states = [
        SamplingState(SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, logprobs=3), [1], [2, 2]),
        SamplingState(SamplingParams(min_tokens=3, temperature=0), [], []),
        SamplingState(SamplingParams(top_k=2, top_p=0.5, min_p=0.2), []),
    ]
    Sampler(eos_token_ids=[0], seed=0)(logits, states)
    assert torch.equal(logits, before)


def test_masked_logits_and_oversized_top_k():
    logits = torch.full((1, V), float("-inf"))
    logits[0, 4] = 0.0
    logits[0, 6] = 0.0
    params = SamplingParams(top_k=1000, top_p=0.99, min_p=0.5, logprobs=2)
    out = Sampler(seed=0)(logits.expand(200, -1).contiguous(), [SamplingState(params, []) for _ in range(200)])
    assert set(out.token_ids) == {4, 6}
    assert out.logprobs[0].logprob == pytest.approx(math.log(0.5))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="sampling states"):
        Sampler()(torch.zeros(2, 5), [SamplingState(SamplingParams(), [])])


@pytest.mark.gpu
def test_cuda_matches_its_own_seeded_runs_and_greedy():
    dev = torch.device("cuda")
    logits = _random_logits(0, 32, vocab=4096).to(dev)
    greedy = [SamplingState(SamplingParams(temperature=0, logprobs=3), []) for _ in range(32)]
    out = Sampler()(logits, greedy)
    assert out.token_ids == logits.argmax(-1).tolist()

    def seeded():
        return [SamplingState.create(SamplingParams(top_p=0.9, seed=i), [], device=dev) for i in range(32)]

    assert Sampler()(logits, seeded()).token_ids == Sampler()(logits, seeded()).token_ids


@pytest.fixture
def race_on_cpu(monkeypatch):
    """The exponential race (CUDA's path for plain unseeded rows) on the CPU."""
    import kubellm.engine.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "RACE_DEVICES", {"cpu", "cuda"})


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_race_has_the_exact_distribution(race_on_cpu, temperature):
    assert_matches(draw(SamplingParams(temperature=temperature)), softmax([x / temperature for x in LOGITS]))


def test_race_never_draws_masked_tokens_and_applies_penalties(race_on_cpu):
    logits = [1.0, 1.0, -math.inf, 0.0, 1.0, 1.0, 1.0, 1.0]
    freq = draw(SamplingParams(temperature=1.0, min_tokens=2, presence_penalty=1.0), logits, output=[4], eos=[0])
    assert_matches(freq, softmax([-math.inf, 1.0, -math.inf, 0.0, 0.0, 1.0, 1.0, 1.0]))


def test_race_small_probabilities_and_masked_tokens():
    """A token of probability ~1% next to a dominant one gets its share; zero-weight tokens never win."""
    import kubellm.engine.sampler as sampler_mod

    n = 200_000
    logits = torch.tensor([[0.0, -math.log(100.0)] + [-math.inf] * 6]).expand(n, -1).contiguous()
    out = sampler_mod.Sampler(seed=3)._race(torch.softmax(logits, dim=-1))
    assert int((out >= 2).sum()) == 0
    assert abs(float((out == 1).double().mean()) - 1 / 101) < 4.5 * math.sqrt(0.01 / n)


def test_race_mixed_batch_keeps_seeded_rows_reproducible(race_on_cpu):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    seeded = SamplingParams(temperature=1.0, seed=7)

    def run(batch_params):
        states = [SamplingState.create(p, []) for p in batch_params]
        return Sampler(seed=1)(logits[: len(states)], states).token_ids

    alone = [run([seeded])[0] for _ in range(2)]
    mixed = run([seeded, SamplingParams(temperature=1.0), SamplingParams(temperature=0.0), SamplingParams(top_p=0.5)])
    assert alone[0] == alone[1] == mixed[0]
    assert mixed[2] == int(logits[2].argmax())


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_fused_race_on_cuda_has_the_exact_distribution(temperature):
    """The one-kernel race (engine/sampling_kernels.py) draws softmax(x / T) and never a masked token, across
    the kernel's column blocks (the mass sits at both ends of a 128k vocabulary)."""
    from kubellm.engine import sampling_kernels

    vocab, n = 128_256, N
    logits = torch.full((vocab,), -math.inf)
    positions = [3, 1500, 70_000, 128_255, 64_000, 100_001, 7, 99]
    for pos, x in zip(positions, LOGITS, strict=True):
        logits[pos] = x
    batch = logits.to("cuda").expand(n, -1).contiguous()
    temps = torch.full((n,), temperature, device="cuda")
    out = sampling_kernels.race(batch, temps, seed=11)
    assert out is not None, "the fused race kernel did not run"
    counts = torch.bincount(out.cpu(), minlength=vocab)
    assert int(counts.sum()) == n and int(counts[positions].sum()) == n, "a masked token was drawn"
    assert_matches((counts[positions].double() / n).tolist(), softmax([x / temperature for x in LOGITS]))


@pytest.mark.gpu
def test_fused_race_gives_rare_tokens_their_share_and_follows_its_seed():
    from kubellm.engine import sampling_kernels

    n = 200_000
    logits = torch.tensor([[0.0, -math.log(1e4)] + [-math.inf] * 6], device="cuda").expand(n, -1).contiguous()
    ones = torch.ones(n, device="cuda")
    out = sampling_kernels.race(logits, ones, seed=5)
    rare = float((out == 1).double().mean())
    assert abs(rare - 1 / 10001) < 4.5 * math.sqrt(1e-4 / n) and int((out >= 2).sum()) == 0
    assert torch.equal(out, sampling_kernels.race(logits, ones, seed=5))
    assert not torch.equal(out, sampling_kernels.race(logits, ones, seed=6))
