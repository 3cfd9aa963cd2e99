"""Fair routing for mixture-of-experts benchmarks on random weights, and a count of the experts a step hits.

Why (issue #22, read from vLLM 0.26.0's code): `load_format="dummy"` fills every floating parameter with
uniform(-1e-3, 1e-3) (model_loader/weight_utils.py `initialize_single_dummy_weight`, seed 1234 per parameter), RMSNorm
weights included. With every projection that small, each layer's attention and MLP output is ~1e-6 or less, below
bfloat16's resolution next to the ~6e-4 embedding row, so the residual stream stays the token's embedding; the
router's input is RMSNorm(embedding) x a norm weight of ~6e-4, and its bf16 logits are ~1.5e-5. DeepSeek-V2/V3
route through `GroupedTopKRouter` (deepseek_v2.py builds FusedMoE with use_grouped_topk=True; softmax routing is
kept there as RoutingMethodType.Default), whose `grouped_topk` takes `torch.softmax(gating_output)` of the bf16
logits in bf16: 1/64 x (1 + ~1e-5) rounds to exactly 1/64 for every expert (bf16 keeps 8 bits), every score ties,
and torch.topk picks the same k experts for every token. The fused MoE then reads those k experts' weights and no
others: vLLM's batch-256 decode GEMMs (3.95 ms on an H200) ran below the time to read every expert once (~6.8 ms).
Qwen3-MoE routes through `FusedTopKRouter` (ops.topk_softmax, which computes the softmax in float32 from the bf16
logits): its ties are broken per token, so its routing spreads, but still decided by the current token alone.

The fix (`reinit_routing`): after vLLM's dummy load, the weights that decide routing follow our random model's
distribution (engine/random_model.py: norms ones, embeddings N(0, 0.02), the rest N(0, 0.02)): every RMSNorm
weight set to one, the token embedding and each router gate (and DeepSeek-V3's score-correction bias) drawn
N(0, std). Nothing else changes: the experts' and attention's weights keep vLLM's values (a GEMM's time does not
depend on them; vLLM's MLA keeps derived copies of kv_b_proj that a re-draw would leave stale). The change is in
place (same storage), so vLLM's compiled graphs and captured CUDA graphs read the new values.

`watch_routing` counts the distinct experts each MoE layer hits in the steps run inside it, for our engine (SparseMoE's
`routed_experts`, which receives the expert ids) and vLLM (each FusedMoE router's `select_experts`, which returns
them). Python wrappers only see eager forwards: CUDA-graph replays run no Python, so the count is taken on a step
too large for the graphs (a prefill step).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

STD = 0.02  # engine/random_model.py's defaults: RandomWeights(std=0.02, embed_std=0.02)
EMBED_STD = 0.02


def routing_kind(name: str, shape: tuple[int, ...]) -> str | None:
    """Which routing-deciding weight a parameter is, by its name (vLLM's and Hugging Face's agree here): "norm" (an
    RMSNorm weight, 1-D), "embed" (the token embedding), "gate" (a MoE router [E, H]), "gate_bias" (DeepSeek-V3's
    e_score_correction_bias [E]); None for everything else (experts, attention, dense MLPs, lm_head, gates of
    shared experts, which scale an output and route nothing)."""
    if name.endswith("norm.weight") and len(shape) == 1:
        return "norm"
    if name.endswith("embed_tokens.weight") and len(shape) == 2:
        return "embed"
    if name.endswith(".gate.weight") and ".mlp." in f".{name}" and len(shape) == 2:  # (mlp.gate, or mlp.experts.gate)
        return "gate"
    if name.endswith("e_score_correction_bias") and len(shape) == 1:
        return "gate_bias"
    return None


@torch.no_grad()
def reinit_routing(
    model: torch.nn.Module, std: float = STD, embed_std: float = EMBED_STD, seed: int = 0
) -> dict[str, Any]:
    """Set `model`'s routing-deciding weights (routing_kind) in place to our random model's distribution: norms to
    one, embedding N(0, embed_std), gates and gate biases N(0, std), each drawn on its own device from a seed of
    (seed, name). Returns what it did: per kind the parameter count and a few names, for the benchmark's report."""
    if std <= 0 or embed_std <= 0:
        raise ValueError(f"std and embed_std must be > 0, got {std}, {embed_std}")
    done: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        kind = routing_kind(name, tuple(p.shape))
        if kind is None or not torch.is_floating_point(p):
            continue
        if kind == "norm":
            p.fill_(1.0)
        else:
            _draw(p, embed_std if kind == "embed" else std, seed * 1_000_003 + zlib.crc32(name.encode()))
        done.setdefault(kind, []).append(name)
    return {
        "std": std,
        "embed_std": embed_std,
        "counts": {k: len(v) for k, v in sorted(done.items())},
        "examples": {k: v[:2] for k, v in sorted(done.items())},
    }


DRAW_ELEMENTS = 1 << 24  # float32 values drawn at a time (64 MiB): the peer holds little memory beyond its KV pool


def _draw(p: torch.Tensor, std: float, seed: int) -> None:
    """p <- N(0, std), drawn in float32 on p's device and cast, in pieces of whole rows of at most DRAW_ELEMENTS
    values (a 150k x 2048 embedding would otherwise need a 1.2 GB float32 temporary), piece k from seed + k."""
    if not p.is_contiguous():  # (vLLM's parameters are; drawn whole otherwise)
        gen = torch.Generator(device=p.device)
        gen.manual_seed(seed)
        p.copy_(torch.empty(p.shape, dtype=torch.float32, device=p.device).normal_(0.0, std, generator=gen))
        return
    rows = p.shape[0] if p.dim() else 1
    per_row = max(1, p.numel() // max(rows, 1))
    step = max(1, DRAW_ELEMENTS // per_row)
    flat = p.view(rows, per_row) if p.dim() else p.view(1, 1)
    for k, lo in enumerate(range(0, rows, step)):
        gen = torch.Generator(device=p.device)
        gen.manual_seed(seed + k)
        piece = flat[lo : lo + step]
        piece.copy_(torch.empty(piece.shape, dtype=torch.float32, device=p.device).normal_(0.0, std, generator=gen))


def expected_experts_hit(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts `tokens` tokens hit when each picks `top_k` distinct experts uniformly at random: an expert
    is missed by one token with probability 1 - k/E, by all of them with (1 - k/E)^T."""
    if num_experts < 1 or not 0 < top_k <= num_experts or tokens < 0:
        raise ValueError(f"need 0 < top_k <= num_experts and tokens >= 0, got {top_k}, {num_experts}, {tokens}")
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


@dataclass
class RoutingWatch:
    """Distinct experts hit per MoE layer (module name -> bool [E] on the device) and the routed rows seen."""

    num_experts: int
    hit: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def record(self, layer: str, ids: torch.Tensor) -> None:
        if ids.numel() == 0:
            return
        seen = torch.bincount(ids.reshape(-1).long(), minlength=self.num_experts)[: self.num_experts] > 0
        self.hit[layer] = seen | self.hit[layer] if layer in self.hit else seen
        self.rows[layer] = self.rows.get(layer, 0) + int(ids.shape[0])

    def summary(self, top_k: int) -> dict[str, Any]:
        return summarize_hits({k: int(v.sum()) for k, v in self.hit.items()}, self.rows, self.num_experts, top_k)


def summarize_hits(hits: dict[str, int], rows: dict[str, int], num_experts: int, top_k: int) -> dict[str, Any]:
    """Per-layer distinct experts hit, as min / median / max over the layers, beside what spread routing would hit
    with the same rows (expected_experts_hit); `layers` 0 when no MoE layer ran eagerly."""
    if not hits:
        return {"layers": 0, "num_experts": num_experts, "top_k": top_k}
    counts = sorted(hits.values())
    tokens = max(rows.values())
    return {
        "layers": len(counts),
        "num_experts": num_experts,
        "top_k": top_k,
        "rows": tokens,
        "min": counts[0],
        "median": counts[len(counts) // 2],
        "max": counts[-1],
        "spread_expectation": round(expected_experts_hit(num_experts, top_k, tokens), 1),
        "per_layer": [hits[k] for k in hits],
    }


def hits_line(who: str, s: dict[str, Any] | None) -> str:
    """One line for a log or a report: what `summarize_hits` found, or why there is nothing."""
    if not s:
        return f"{who}: experts hit not measured"
    if s.get("error"):
        return f"{who}: experts hit not measured ({s['error']})"
    if not s.get("layers"):
        return f"{who}: no MoE layer ran eagerly in the counted step (nothing to count)"
    return (
        f"{who}: experts hit per MoE layer in one step of {s['rows']} tokens: min {s['min']} / median {s['median']} /"
        f" max {s['max']} of {s['num_experts']} (top-{s['top_k']}; spread routing would hit ~{s['spread_expectation']})"
    )


def _wrap(owner: Any, attr: str, make: Callable[[Callable[..., Any]], Callable[..., Any]], undo: list) -> None:
    orig = getattr(owner, attr)
    had_own = attr in vars(owner)
    setattr(owner, attr, make(orig))
    undo.append((owner, attr, orig, had_own))


def _ours(watch: RoutingWatch, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(orig: Callable[..., Any]) -> Callable[..., Any]:
        def routed_experts(experts: Any, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, **kw: Any) -> Any:
            watch.record(name, ids)
            return orig(experts, x, weights, ids, **kw)

        return routed_experts

    return make


def _theirs(watch: RoutingWatch, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(orig: Callable[..., Any]) -> Callable[..., Any]:
        def select_experts(*args: Any, **kwargs: Any) -> Any:
            out = orig(*args, **kwargs)
            watch.record(name, out[1])  # (topk_weights, topk_ids)
            return out

        return select_experts

    return make


def routing_sites(model: torch.nn.Module) -> Iterable[tuple[str, Any, str, str]]:
    """(layer name, object, method, whose) of every place a MoE layer's expert ids pass: our SparseMoE's
    `routed_experts(experts, x, weights, ids)`, or a vLLM FusedMoE router's `select_experts` (on the layer, or on
    its runner), each once."""
    seen: set[int] = set()
    for name, m in model.named_modules():
        if callable(getattr(m, "routed_experts", None)) and hasattr(m, "w13"):
            yield name, m, "routed_experts", "ours"
            continue
        for holder in (m, getattr(m, "runner", None)):
            router = getattr(holder, "router", None)
            if router is not None and callable(getattr(router, "select_experts", None)) and id(router) not in seen:
                seen.add(id(router))
                yield name, router, "select_experts", "theirs"


@contextmanager
def watch_routing(model: torch.nn.Module, num_experts: int) -> Iterator[RoutingWatch]:
    """While inside: every eager MoE forward of `model` records the experts it routed to (RoutingWatch); on leaving,
    the wrapped methods are as they were."""
    watch = RoutingWatch(num_experts)
    undo: list[tuple[Any, str, Any, bool]] = []
    try:
        for name, owner, attr, whose in list(routing_sites(model)):
            _wrap(owner, attr, (_ours if whose == "ours" else _theirs)(watch, name), undo)
        yield watch
    finally:
        for owner, attr, orig, had_own in reversed(undo):
            if had_own:
                setattr(owner, attr, orig)
            else:
                delattr(owner, attr)


def moe_shape(cfg: dict[str, Any]) -> tuple[int, int] | None:
    """(routed experts, experts per token) of a Hugging Face config dict, None for a dense model."""
    e = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts")
    k = cfg.get("num_experts_per_tok")
    return (int(e), int(k)) if e and k else None
