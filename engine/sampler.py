"""Batched sampling over float32 logits [B, V] with per-request parameters, in torch only (CPU and CUDA).

Order of operations (vLLM's): logprobs from the raw logits; then min_tokens masking and penalties (these
change the argmax, so greedy rows see them); greedy rows take the argmax; random rows go on through
temperature, top_k, top_p, min_p and are drawn by inverse CDF with one uniform number per row. A request with
a seed draws its number from its own generator, so its tokens depend only on its seed and its own history,
never on which batch it sits in. On CUDA, unseeded rows without top_k/top_p/min_p (plain temperature
sampling, the common case) take an exponential race instead, argmax p_i / E_i with float64-resolution noise:
on CUDA one fused kernel over the logits (engine/sampling_kernels.py, Philox noise keyed by a seed drawn from
a host generator), else torch ops with float64 noise from the shared generator. (On CPU that draw needs V random
numbers per row and costs more than the scan: 87 ms for 64 x 49k logits, against ~25 ms for a float64 cumsum.)

Logprobs are "raw": log_softmax of the model's logits before penalties and temperature — vLLM's default
`logprobs_mode="raw_logprobs"` — so they describe the model, not the sampling transform.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch

from kubellm.engine import sampling_kernels
from kubellm.engine.sampling_params import SamplingParams
from kubellm.engine.token_bitmask import TokenBitmask, apply_token_bitmask
from kubellm.engine.transfer import to_device_async, to_host_async, wait_event

_TOP_P_CANDIDATES = 256  # top_p heads of real LLM distributions almost always fit; others fall back to a sort
# Devices where unseeded rows without top_k/top_p/min_p sample by exponential race instead of the inverse CDF:
# on a GPU the noise costs one memory pass, less than a float64 scan; on a CPU drawing 128k numbers a row is
# slower than the scan (tests add "cpu" to check the race's distribution).
RACE_DEVICES: set[str] = {"cuda"}
_RACE_CHUNK_ROWS = 128  # float64 noise of 128 x 128k = 128 MB at a time


@dataclass
class SamplingState:
    """What the sampler needs of one request. The engine keeps one per sequence for its whole life (also
    across preemption), so a seeded generator's stream continues from step to step; `output_token_ids` may
    be the request's live list."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # None: the sampler's shared generator
    _prompt_tensor: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def prompt_tensor(self) -> torch.Tensor:
        """The prompt ids as a CPU tensor, built once: the repetition penalty needs them every step."""
        if self._prompt_tensor is None:
            self._prompt_tensor = torch.tensor(list(self.prompt_token_ids), dtype=torch.long)
        return self._prompt_tensor

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> SamplingState:
        """A state with its own generator seeded from `params.seed`, when a seed is given.

        The generator lives on the CPU whatever `device` says (kept for callers that pass it): the sampler
        draws one number per row, cheaper on the CPU than a kernel launch per row, and a seed then gives the
        same draws on every device."""
        del device
        generator = None
        if params.seed is not None and not params.is_greedy:
            generator = torch.Generator()
            generator.manual_seed(params.seed)
        return cls(params, prompt_token_ids, output_token_ids if output_token_ids is not None else [], generator)


@dataclass
class TokenLogprobs:
    """Logprob of the sampled token, its 1-based rank in the vocabulary, and the top-k alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # (token_id, logprob), best first; len = params.logprobs


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where the request did not ask for logprobs


@dataclass
class PendingSample:
    """A step's draws still on the device. `token_ids` feeds the next step's inputs without a host round
    trip (async scheduling); `result()` waits for the copy to the host and builds the SamplerOutput."""

    token_ids: torch.Tensor  # int64 [B] on the logits' device
    num_rows: int
    params: Sequence[SamplingParams]
    lp_rows: list[int]
    _host: list[torch.Tensor | None]  # token ids, then the logprob tensors, on the host (maybe still copying)
    _ready: torch.cuda.Event | None

    def result(self) -> SamplerOutput:
        if self._ready is not None:
            wait_event(self._ready)
        token_ids = self._host[0].tolist()
        logprobs: list[TokenLogprobs | None] = [None] * self.num_rows
        if self.lp_rows:
            chosen, ranks, top_vals, top_ids = (t.tolist() if t is not None else None for t in self._host[1:])
            for j, row in enumerate(self.lp_rows):
                k = self.params[row].logprobs or 0
                top = list(zip(top_ids[j][:k], top_vals[j][:k], strict=True)) if k and top_ids and top_vals else []
                logprobs[row] = TokenLogprobs(token_ids[row], chosen[j], ranks[j], top)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


class Sampler:
    """Stateless apart from the shared generator used by requests without a seed."""

    def __init__(self, eos_token_ids: Collection[int] = (), seed: int | None = None) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._race_seeds = torch.Generator()  # host-side: the fused race kernel's per-call Philox seeds
        if seed is None:
            self._race_seeds.seed()
        else:
            self._race_seeds.manual_seed(seed)

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The shared generator on `device` (one per device, seeded from the engine seed when given)."""
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def __call__(
        self,
        logits: torch.Tensor,
        states: Sequence[SamplingState],
        eos_token_ids: Collection[int] | None = None,
        token_bitmask: TokenBitmask | None = None,
    ) -> SamplerOutput:
        """Sample one token per row of `logits` [B, V] (float32); row i belongs to `states[i]`."""
        return self.sample(logits, states, eos_token_ids, token_bitmask).result()

    def sample(
        self,
        logits: torch.Tensor,
        states: Sequence[SamplingState],
        eos_token_ids: Collection[int] | None = None,
        token_bitmask: TokenBitmask | None = None,
    ) -> PendingSample:
        """Queue the draws on the logits' device and start copying them back; no host sync on the common
        paths (greedy, plain temperature, seeded rows, logprobs), so the next step can be scheduled while
        the GPU still works. Only min_tokens' count of each row's outputs is read, not their values: rows
        with penalties need their real history, and the engine schedules them synchronously.

        `token_bitmask` (structured outputs) disallows tokens of some rows before anything else, in place on
        float32 `logits`: as in vLLM, logprobs then describe the constrained distribution."""
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(states)} sampling states")
        eos = self.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
        raw = logits.float()
        if token_bitmask is not None:
            apply_token_bitmask(raw, token_bitmask)
        params = [s.params for s in states]
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(raw[lp_rows], dim=-1) if lp_rows else None

        x = _apply_min_tokens(raw, states, eos)
        x = _apply_penalties(x, states)

        greedy = [p.is_greedy for p in params]
        device = x.device
        if all(greedy):
            sampled = x.argmax(dim=-1)
        elif not any(greedy):  # all random: no gather/scatter of [B, V] rows
            sampled = self._sample_random(x, params, states)
        else:
            sampled = torch.empty(len(states), dtype=torch.long, device=device)
            g_idx = to_device_async([i for i, g in enumerate(greedy) if g], torch.long, device)
            r_rows = [i for i, g in enumerate(greedy) if not g]
            r_idx = to_device_async(r_rows, torch.long, device)
            sampled[g_idx] = x[g_idx].argmax(dim=-1)
            sampled[r_idx] = self._sample_random(x[r_idx], [params[i] for i in r_rows], [states[i] for i in r_rows])

        lp_tensors: list[torch.Tensor | None] = []
        if raw_logprobs is not None:
            lp_tensors = _logprob_tensors(raw_logprobs, sampled[lp_rows], params, lp_rows)
        host, ready = to_host_async([sampled, *lp_tensors])
        return PendingSample(sampled, len(states), params, lp_rows, host, ready)

    def _sample_random(
        self, x: torch.Tensor, params: Sequence[SamplingParams], states: Sequence[SamplingState]
    ) -> torch.Tensor:
        """Draw rows of (penalised) logits `x` that sample at random. Rows without top_k/top_p/min_p and
        without a seed take the exponential race on devices in RACE_DEVICES (noise from the shared
        generator); the rest the inverse-CDF draw, so a seeded row's stream never depends on its batch."""
        race = [
            p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0.0 and s.generator is None
            for p, s in zip(params, states, strict=True)
        ]
        if x.device.type not in RACE_DEVICES or not any(race):
            return self._draw(_probs_after_filters(x, params), states)
        if all(race):
            return self._race_logits(x, params)
        out = torch.empty(len(states), dtype=torch.long, device=x.device)
        for flag in (True, False):
            rows = [i for i, r in enumerate(race) if r == flag]
            idx = to_device_async(rows, torch.long, x.device)
            sub = [params[i] for i in rows]
            if flag:
                out[idx] = self._race_logits(x[idx], sub)
            else:
                out[idx] = self._draw(_probs_after_filters(x[idx], sub), [states[i] for i in rows])
        return out

    def _race_logits(self, x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """The race on (penalised) logits: one fused kernel on CUDA (engine/sampling_kernels.py), else the
        torch ops over the tempered softmax."""
        if sampling_kernels.enabled(x):
            temps = to_device_async([p.temperature for p in params], torch.float32, x.device)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self._race_seeds))
            out = sampling_kernels.race(x.float().contiguous(), temps, seed)
            if out is not None:
                return out
        return self._race(_probs_after_filters(x, params))

    def _race(self, weights: torch.Tensor) -> torch.Tensor:
        """Exponential race: argmax of weight / Exponential(1) noise picks token i with probability
        w_i / sum(w), with no scan over the vocabulary (a GPU draws the noise at memory speed). The noise is
        drawn in float64 so that tiny weights keep their share (float32 uniforms stop at 2^-24), then
        rounded to float32 and kept above 0; rows go in chunks to bound the float64 temporary."""
        gen = self.generator_for(weights.device)
        tiny = torch.finfo(torch.float32).tiny
        out = torch.empty(weights.shape[0], dtype=torch.long, device=weights.device)
        for lo in range(0, weights.shape[0], _RACE_CHUNK_ROWS):
            w = weights[lo : lo + _RACE_CHUNK_ROWS]
            noise = torch.empty(w.shape, dtype=torch.float64, device=w.device).exponential_(generator=gen)
            out[lo : lo + w.shape[0]] = (w / noise.to(torch.float32).clamp_min_(tiny)).argmax(dim=-1)
        return out

    def _draw(self, weights: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Inverse-CDF draw, one uniform per row: seeded rows take theirs from their own generator, the rest
        share one batched draw from the sampler's generator. The CDF is summed in float64 so even tokens of
        probability ~1e-9 keep their share."""
        device, n = weights.device, weights.shape[0]
        u = torch.empty(n, dtype=torch.float64, device=device)
        shared = [i for i, s in enumerate(states) if s.generator is None]
        if shared:
            gen = self.generator_for(device)
            u[to_device_async(shared, torch.long, device)] = torch.rand(
                len(shared), dtype=torch.float64, device=device, generator=gen
            )
        seeded = [i for i, s in enumerate(states) if s.generator is not None]
        if seeded:
            own = [_uniform(states[i].generator) for i in seeded]
            u[to_device_async(seeded, torch.long, device)] = to_device_async(own, torch.float64, device)
        cdf = weights.double().cumsum(dim=-1)
        # (1 - u) lies in (0, 1]: the target is never 0, so a zero-weight token (a flat CDF step) is never hit.
        target = ((1.0 - u) * cdf[:, -1]).unsqueeze(1)
        return torch.searchsorted(cdf, target).squeeze(1).clamp_max_(weights.shape[1] - 1)


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand(1, dtype=torch.float64, device=generator.device, generator=generator))


def _apply_min_tokens(logits: torch.Tensor, states: Sequence[SamplingState], eos: Collection[int]) -> torch.Tensor:
    """Forbid stop tokens (EOS unless ignore_eos, and stop_token_ids) until min_tokens outputs exist."""
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(states):
        if len(s.output_token_ids) < s.params.min_tokens:
            for t in s.params.all_stop_token_ids(eos):
                if 0 <= t < logits.shape[1]:
                    rows.append(i)
                    cols.append(t)
    if not rows:
        return logits
    out = logits.clone()
    out[to_device_async(rows, torch.long, out.device), to_device_async(cols, torch.long, out.device)] = float("-inf")
    return out


def _apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (HF/vLLM: divide positive logits, multiply negative
    ones), then frequency (per occurrence) and presence (once) penalties over output tokens (OpenAI).
    Touches only the (row, token) pairs that occur: dense [B, V] masks cost ~200 ms per step on CPU."""
    rows = [i for i, s in enumerate(states) if s.params.has_penalties]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[1]
    out = logits.clone()

    def _keys(row_ids: list[int], prompts: bool) -> torch.Tensor:
        """Flat row * vocab + token keys, one per occurrence of an output (and prompt) token. Built on the
        CPU with one tensor per kind (per-row tensors cost ~10 us each), moved to the device in one copy."""
        outs = [states[i].output_token_ids for i in row_ids]
        parts = [torch.tensor(list(chain.from_iterable(outs)), dtype=torch.long)]
        lengths = [len(o) for o in outs]
        ids = list(row_ids)
        if prompts:
            parts += [states[i].prompt_tensor() for i in row_ids]
            lengths += [len(states[i].prompt_token_ids) for i in row_ids]
            ids += row_ids
        r = torch.repeat_interleave(torch.tensor(ids) * vocab, torch.tensor(lengths))
        return (r + torch.cat(parts)).to(device)

    rep_rows = [i for i in rows if states[i].params.repetition_penalty != 1.0]
    if rep_rows:
        keys = torch.unique(_keys(rep_rows, prompts=True))
        r, t = keys // vocab, keys % vocab
        penalty = torch.tensor([s.params.repetition_penalty for s in states], dtype=out.dtype, device=device)[r]
        vals = out[r, t]
        out[r, t] = torch.where(vals > 0, vals / penalty, vals * penalty)

    out_rows = [i for i in rows if states[i].params.frequency_penalty or states[i].params.presence_penalty]
    if out_rows:
        keys = _keys(out_rows, prompts=False)
        freq = torch.tensor([s.params.frequency_penalty for s in states], dtype=out.dtype, device=device)
        pres = torch.tensor([s.params.presence_penalty for s in states], dtype=out.dtype, device=device)
        r, t = keys // vocab, keys % vocab
        out.index_put_((r, t), -freq[r], accumulate=True)
        keys = torch.unique(keys)
        r, t = keys // vocab, keys % vocab
        out[r, t] -= pres[r]
    return out


def _probs_after_filters(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top_k, top_p, min_p (each only where a row uses it); returns per-row weights
    proportional to the final sampling distribution."""
    temps = {p.temperature for p in params}
    if temps == {1.0}:
        x = logits
    elif len(temps) == 1:  # one temperature for the batch: a scalar, no host-to-device copy
        x = logits / temps.pop()
    else:
        x = logits / to_device_async([p.temperature for p in params], logits.dtype, logits.device)[:, None]
    x = _apply_top_k_top_p(x, params)
    probs = x.softmax(dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = to_device_async([p.min_p for p in params], probs.dtype, probs.device)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs  # not renormalised after min_p: the draw scales by each row's total


def _apply_top_k_top_p(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Keep the k highest logits (ties broken by position in topk's order), then the smallest head of
    the remaining distribution whose mass reaches top_p. A full sort of the vocabulary is slow (0.3 s for
    64 x 49k on CPU), so candidates come from topk: max(top_k) of them when every row has a top_k, else
    _TOP_P_CANDIDATES; only rows whose top_p head does not fit among those fall back to a full sort. On CUDA
    finding those rows would be a host read (a sync per step), so every top_p row without a top_k is sorted:
    a GPU sorts a 128k vocabulary in microseconds per row."""
    vocab = x.shape[1]
    rows = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
    if not rows:
        return x
    device = x.device
    row_idx = to_device_async(rows, torch.long, device)
    sub = x[row_idx]
    ks = [min(params[i].top_k, vocab) for i in rows]  # 0: no top_k
    ps = [params[i].top_p for i in rows]
    has_k = to_device_async([k > 0 for k in ks], torch.bool, device)
    n_cand = max(ks) if all(ks) else min(vocab, max(_TOP_P_CANDIDATES, *ks))
    vals, idx = sub.topk(n_cand, dim=-1)  # sorted, highest first
    pos = torch.arange(n_cand, device=device)
    k_t = to_device_async([k if k > 0 else vocab for k in ks], torch.long, device)
    vals = vals.masked_fill(pos >= k_t.unsqueeze(1), float("-inf"))
    incomplete: list[int] = []
    if any(p < 1.0 for p in ps):
        # Each candidate's probability in its row's distribution after top_k (all of the vocabulary if none).
        log_norm = vals.logsumexp(dim=-1)
        if not all(ks):
            log_norm = torch.where(has_k, log_norm, sub.logsumexp(dim=-1))
        probs = (vals - log_norm.unsqueeze(1)).exp()
        cum = probs.cumsum(dim=-1)
        # top_p = 1 rows get a threshold above any cumulative sum, so rounding never trims their tail.
        p_t = to_device_async([p if p < 1.0 else 2.0 for p in ps], x.dtype, device).unsqueeze(1)
        drop = (cum - probs) >= p_t  # the mass before this token already reaches top_p
        drop[:, 0] = False
        vals = vals.masked_fill(drop, float("-inf"))
        if _host_reads_are_cheap(device):
            short = ~has_k & (cum[:, -1:] < p_t).squeeze(1)  # the head runs past the candidates
            incomplete = short.nonzero().squeeze(1).tolist()
        else:  # reading `short` back would stall async scheduling every step: sort every such row instead
            incomplete = [j for j, (k, p) in enumerate(zip(ks, ps, strict=True)) if k == 0 and p < 1.0]
    out = torch.full_like(sub, float("-inf")).scatter_(1, idx, vals)
    if incomplete:
        inc = to_device_async(incomplete, torch.long, device)
        out[inc] = _full_sort_top_p(sub[inc], to_device_async([ps[j] for j in incomplete], x.dtype, device))
    x = x.clone()
    x[row_idx] = out
    return x


def _host_reads_are_cheap(device: torch.device) -> bool:
    """On CPU a tensor read costs nothing extra; on CUDA it waits for every queued kernel."""
    return device.type != "cuda"


def _full_sort_top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    drop[:, 0] = False
    return torch.full_like(x, float("-inf")).scatter_(1, order, sorted_x.masked_fill(drop, float("-inf")))


def _logprob_tensors(
    logprobs: torch.Tensor, sampled: torch.Tensor, params: Sequence[SamplingParams], rows: Sequence[int]
) -> list[torch.Tensor | None]:
    """Sampled token's logprob and rank (1 + number of strictly better tokens), and the top-k values and ids
    (k = the largest request among `rows`), all still on the device."""
    chosen = logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
    ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
    max_k = max(params[r].logprobs or 0 for r in rows)
    if max_k <= 0:
        return [chosen, ranks, None, None]
    top_vals, top_ids = logprobs.topk(max_k, dim=-1)
    return [chosen, ranks, top_vals, top_ids]
