"""Batched sampling over float32 logits [B, V] with per-request parameters, in torch only (CPU and CUDA).

Order of operations (vLLM's): logprobs from the raw logits; then min_tokens masking and penalties (these
change the argmax, so greedy rows see them); greedy rows take the argmax; random rows go on through
temperature, top_k, top_p, min_p and are drawn with an exponential race (argmax p_i / E_i with E_i ~ Exp(1),
which picks i with probability p_i). A request with a seed draws its E_i from its own generator, one row at
a time, so its tokens depend only on its seed and its own history, never on which batch it sits in.

Logprobs are "raw": log_softmax of the model's logits before penalties and temperature — vLLM's default
`logprobs_mode="raw_logprobs"` — so they describe the model, not the sampling transform.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from kubellm.engine.sampling_params import SamplingParams

_TINY = torch.finfo(torch.float32).tiny  # floor for exponential draws: 0 would make p/E a NaN or inf


@dataclass
class SamplingState:
    """What the sampler needs of one request. The engine keeps it for the request's lifetime so the seeded
    generator's stream continues from step to step (and restarts identically when the request is recomputed
    only if the engine rebuilds the state)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # None: the sampler's shared generator

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> SamplingState:
        """A state with its own generator seeded from `params.seed` (on `device`), when a seed is given."""
        generator = None
        if params.seed is not None and not params.is_greedy:
            generator = torch.Generator(device=device)
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


class Sampler:
    """Stateless apart from the shared generator used by requests without a seed."""

    def __init__(self, eos_token_ids: Collection[int] = (), seed: int | None = None) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

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
    ) -> SamplerOutput:
        """Sample one token per row of `logits` [B, V] (float32); row i belongs to `states[i]`."""
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(states)} sampling states")
        eos = self.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
        raw = logits.float()
        params = [s.params for s in states]

        logprobs: list[TokenLogprobs | None] = [None] * len(states)
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(raw[lp_rows], dim=-1) if lp_rows else None

        x = _apply_min_tokens(raw, states, eos)
        x = _apply_penalties(x, states)

        greedy = [p.is_greedy for p in params]
        if all(greedy):
            sampled = x.argmax(dim=-1)
        else:
            sampled = torch.empty(len(states), dtype=torch.long, device=x.device)
            g_rows = [i for i, g in enumerate(greedy) if g]
            r_rows = [i for i, g in enumerate(greedy) if not g]
            if g_rows:
                idx = torch.tensor(g_rows, device=x.device)
                sampled[idx] = x[idx].argmax(dim=-1)
            idx = torch.tensor(r_rows, device=x.device)
            probs = _probs_after_filters(x[idx], [params[i] for i in r_rows])
            sampled[idx] = self._draw(probs, [states[i] for i in r_rows])

        token_ids = sampled.tolist()
        if raw_logprobs is not None:
            for row, lp in zip(lp_rows, _gather_logprobs(raw_logprobs, sampled[lp_rows], params, lp_rows), strict=True):
                logprobs[row] = lp
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def _draw(self, probs: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Exponential race per row: seeded rows draw from their own generator one by one; the rest share
        one batched draw from the sampler's generator."""
        noise = torch.empty_like(probs)
        shared = [i for i, s in enumerate(states) if s.generator is None]
        if shared:
            gen = self.generator_for(probs.device)
            draw = torch.empty((len(shared), probs.shape[1]), device=probs.device).exponential_(generator=gen)
            noise[torch.tensor(shared, device=probs.device)] = draw
        for i, s in enumerate(states):
            if s.generator is not None:
                g = s.generator
                noise[i] = torch.empty(probs.shape[1], device=g.device).exponential_(generator=g).to(probs.device)
        return (probs / noise.clamp_min_(_TINY)).argmax(dim=-1)


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
    out[torch.tensor(rows, device=out.device), torch.tensor(cols, device=out.device)] = float("-inf")
    return out


def _apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (HF/vLLM: divide positive logits, multiply negative
    ones); frequency (per occurrence) and presence (once) penalties over output tokens only (OpenAI)."""
    rows = [i for i, s in enumerate(states) if s.params.has_penalties]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[1]
    sub = logits[torch.tensor(rows, device=device)]
    n = len(rows)

    def _index(token_lists: list[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        r = [j for j, toks in enumerate(token_lists) for _ in range(len(toks))]
        c = [t for toks in token_lists for t in toks]
        return torch.tensor(r, dtype=torch.long, device=device), torch.tensor(c, dtype=torch.long, device=device)

    out_r, out_c = _index([states[i].output_token_ids for i in rows])
    counts = torch.zeros((n, vocab), dtype=sub.dtype, device=device)
    counts.index_put_((out_r, out_c), torch.ones_like(out_c, dtype=sub.dtype), accumulate=True)

    rep = torch.tensor([states[i].params.repetition_penalty for i in rows], dtype=sub.dtype, device=device)
    if bool((rep != 1.0).any()):
        pr_r, pr_c = _index([states[i].prompt_token_ids for i in rows])
        seen = counts > 0
        seen[pr_r, pr_c] = True
        rep = rep.unsqueeze(1)
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalised, sub)
    freq = torch.tensor([states[i].params.frequency_penalty for i in rows], dtype=sub.dtype, device=device)
    pres = torch.tensor([states[i].params.presence_penalty for i in rows], dtype=sub.dtype, device=device)
    sub = sub - freq.unsqueeze(1) * counts - pres.unsqueeze(1) * (counts > 0).to(sub.dtype)

    out = logits.clone()
    out[torch.tensor(rows, device=device)] = sub
    return out


def _probs_after_filters(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top_k, top_p, min_p (each only when some row uses it); returns per-row weights
    proportional to the final sampling distribution."""
    device, vocab = logits.device, logits.shape[1]
    temp = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    x = logits / temp.unsqueeze(1)

    use_k = any(p.top_k > 0 for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    if use_k or use_p:
        sorted_x, order = x.sort(dim=-1, descending=True)
        if use_k:
            k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=device)
            kth = sorted_x.gather(1, (k - 1).unsqueeze(1))
            sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))  # ties at the k-th value stay
        if use_p:
            # top_p = 1 rows get a threshold above any cumulative sum, so rounding never trims their tail.
            top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], dtype=x.dtype, device=device)
            sorted_probs = sorted_x.softmax(dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop = mass_before >= top_p.unsqueeze(1)  # keep the smallest head whose mass reaches top_p
            drop[:, 0] = False
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.empty_like(x).scatter_(1, order, sorted_x)

    probs = x.softmax(dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=device)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs  # not renormalised after min_p: the exponential race is scale-invariant per row


def _gather_logprobs(
    logprobs: torch.Tensor, sampled: torch.Tensor, params: Sequence[SamplingParams], rows: Sequence[int]
) -> list[TokenLogprobs]:
    """Sampled token's logprob and rank (1 + number of strictly better tokens), and the top-k pairs."""
    chosen = logprobs.gather(1, sampled.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    max_k = max(params[r].logprobs or 0 for r in rows)
    top_vals, top_ids = logprobs.topk(max_k, dim=-1) if max_k > 0 else (None, None)
    chosen_l, ranks_l, sampled_l = chosen.squeeze(1).tolist(), ranks.tolist(), sampled.tolist()
    top_vals_l = top_vals.tolist() if top_vals is not None else None
    top_ids_l = top_ids.tolist() if top_ids is not None else None
    result = []
    for j, r in enumerate(rows):
        k = params[r].logprobs or 0
        top = list(zip(top_ids_l[j][:k], top_vals_l[j][:k], strict=True)) if k and top_ids_l and top_vals_l else []
        result.append(TokenLogprobs(token_id=sampled_l[j], logprob=chosen_l[j], rank=ranks_l[j], top=top))
    return result
