"""DeepSeek-V2/V3 (and Moonlight) on the torch reference path: multi-head latent attention (MLA) and DeepSeek's
mixture of experts.

MLA caches one latent per token per layer: the normed compressed KV (kv_lora_rank) and the shared rotary key
(qk_rope_head_dim), one row of kv_lora_rank + qk_rope_head_dim in a latent-only paged pool (engine/attention/mla.py),
so prefix caching and block hashes work unchanged. Attention runs absorbed (for prefill chunks too unless the engine
setting mla_upproject_min_tokens sends long chunks up-projected, see engine/attention/mla.py): W_UK is
folded into the query (each head's nope query mapped into latent space), the backend attends the heads' latent and
roped queries against the one cached latent row per token (multi-query attention; flashinfer's MLA kernel on CUDA,
the torch reference elsewhere), and W_UV maps the attended latent back to each head's values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.engine import symm_all_reduce
from kubellm.engine.attention.mla import LatentAttention, MLASplit
from kubellm.engine.model_config import ModelConfig, rope_inv_freq_and_scale

from . import fused
from .causal_lm import CausalLM, CheckpointReader, new_param
from .llama import MLP, Linear, RMSNorm, _out_linear, decoder_stack
from .moe import MoeTerms, SparseMoE, load_moe_weights
from .moe import experts_impl as moe_impl

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# MLA projections that may hold FP8 weights; kv_b_proj is absorbed into the attention (its weight is read as
# W_UK / W_UV views), so it loads in the model dtype
_FP8_CAPABLE = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj")
# How tensor parallelism splits the attention weights (rows by head, o_proj's input by head); the rest is replicated.
_ATTENTION_SPLITS = {
    "q_proj.weight": "col",
    "q_b_proj.weight": "col",
    "kv_b_proj.weight": "col",
    "o_proj.weight": "row",
}


def deepseek_topk(router_logits: torch.Tensor, config: ModelConfig, correction_bias: torch.Tensor | None):
    """DeepSeek routing: softmax (V2) or sigmoid (V3) scores; experts chosen among the `topk_group` best of
    `n_group` groups (a group scored by its best expert, or with sigmoid by its two best biased scores); the
    chosen experts' unbiased scores, renormalised when norm_topk_prob (sigmoid only, as transformers does), times
    routed_scaling_factor. Returns (weights [T, k] float32, ids [T, k] int32)."""
    c = config
    logits = router_logits.float()
    e, k = logits.shape[-1], c.num_experts_per_tok
    if c.moe_scoring == "sigmoid":
        scores = logits.sigmoid()
        choice = scores + correction_bias.float() if correction_bias is not None else scores
        group_score = choice.view(-1, c.n_group, e // c.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        fill = float("-inf")
    else:
        scores = logits.softmax(dim=-1)
        choice = scores
        group_score = choice.view(-1, c.n_group, e // c.n_group).max(dim=-1).values if c.n_group > 1 else None
        fill = 0.0
    if group_score is not None and c.n_group > 1:
        groups = torch.topk(group_score, k=c.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_score).scatter_(1, groups, 1.0).bool()
        keep = keep.unsqueeze(-1).expand(-1, c.n_group, e // c.n_group).reshape(-1, e)
        choice = choice.masked_fill(~keep, fill)
    ids = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if c.moe_scoring == "sigmoid" and c.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * c.routed_scaling_factor, ids.to(torch.int32)


class DeepseekMoE(SparseMoE):
    """The shared [moe] layer (stacked experts, ungated shared experts) with DeepSeek's router."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, tp_size: int = 1):
        shared = MLP(config, dtype, device, tp_size, config.shared_expert_intermediate_size, reduce=False)
        super().__init__(config, dtype, device, tp_size, shared if config.shared_expert_intermediate_size else None)
        self.config = config
        self.e_score_correction_bias = (
            new_param((config.num_experts,), torch.float32, device) if config.moe_scoring == "sigmoid" else None
        )

    def replicated_parameters(self) -> list[nn.Parameter]:
        extra = [self.e_score_correction_bias] if self.e_score_correction_bias is not None else []
        return [*super().replicated_parameters(), *extra]

    def forward_unreduced(self, x: torch.Tensor) -> torch.Tensor | MoeTerms:
        """`forward` with the sum left to the next norm kernel where the layer may defer it (SparseMoE's
        forward_unreduced): the routed experts' k terms and the shared experts' output (its down GEMM alone)."""
        experts, weights, ids = self._route(x)
        if not self.can_defer_sum(x, experts):
            return self._combine(x, self.routed_experts(experts, x, weights, ids))
        out = self.routed_experts(experts, x, weights, ids, reduce=False)
        if out.dim() == 2:  # the down_sum path summed them in its GEMM
            return self._combine(x, out)
        return MoeTerms(out, self.shared_expert(x) if self.shared_expert is not None else None)

    @property
    def plain_softmax_routing(self) -> bool:
        """Softmax scores with no group limit in effect (DeepSeek-V2-Lite: one group): DeepSeek's routing is then
        the plain softmax top-k (never renormalised under softmax), which the shared layer runs as one kernel."""
        c = self.config
        return c.moe_scoring == "softmax" and (c.n_group <= 1 or c.topk_group >= c.n_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts, weights, ids = self._route(x)
        return self._combine(x, self.routed_experts(experts, x, weights, ids))

    def _route(self, x: torch.Tensor) -> tuple[Callable, torch.Tensor, torch.Tensor]:
        """(the experts implementation, routing weights [T, k] float32, expert ids [T, k] int32)."""
        # Router logits in float32. The plain softmax top-k and the experts run on the shared layer's kernels
        # (fused_moe's Triton kernels on CUDA, the torch references elsewhere).
        topk, experts = moe_impl(x)
        logits = F.linear(x.float(), self.gate.float())  # the gate is float32 once loaded: no copy
        if self.plain_softmax_routing:
            weights, ids = topk(logits, self.config.num_experts_per_tok, False)
            if self.config.routed_scaling_factor != 1.0:
                weights = weights * self.config.routed_scaling_factor
        else:  # grouped and/or sigmoid routing: one Triton kernel on CUDA, deepseek_topk (its reference) elsewhere
            c = self.config
            sigmoid = c.moe_scoring == "sigmoid"
            gated = None
            if fused.enabled(x):
                gated = fused.grouped_topk(
                    logits, c.num_experts_per_tok, c.n_group, c.topk_group, sigmoid, self.e_score_correction_bias,
                    sigmoid and c.norm_topk_prob, c.routed_scaling_factor,
                )  # fmt: skip
            weights, ids = gated if gated is not None else deepseek_topk(logits, c, self.e_score_correction_bias)
        return experts, weights, ids

    def _combine(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum `out` plus the shared experts' output, all-reduced under tensor parallelism."""
        if self.shared_expert is not None:  # the sum folded into the shared down GEMM where it can be
            out = self.shared_expert(x, add=out)
        if self.tp_size > 1:  # routed and shared partial sums of this rank's intermediate slices, reduced once
            out = symm_all_reduce.all_reduce(out)
        return out


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's layout); cos/sin [T, 1, D/2]."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout; cos/sin [T, 1, D/2]."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


class MLAttention(nn.Module):
    """Under tensor parallelism each rank holds whole heads (q, kv_b and o_proj split by head); the latent
    projection and the latent cache are replicated."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, tp_size: int = 1):
        super().__init__()
        c = config
        self.c = c
        self.num_heads = c.num_attention_heads // tp_size
        self.qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, c.attention_bias, dtype, device)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype, device)
            self.q_b_proj = Linear(c.q_lora_rank, self.num_heads * self.qk_head_dim, False, dtype, device)
            self.q_proj = None
        else:
            self.q_proj = Linear(c.hidden_size, self.num_heads * self.qk_head_dim, False, dtype, device)
        self.kv_a_proj_with_mqa = Linear(
            c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, c.attention_bias, dtype, device
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps, dtype, device)
        kv_b_rows = self.num_heads * (c.qk_nope_head_dim + c.v_head_dim)
        self.kv_b_proj = Linear(c.kv_lora_rank, kv_b_rows, False, dtype, device)
        self.o_proj = _out_linear(
            self.num_heads * c.v_head_dim, c.hidden_size, c.attention_bias, dtype, device, tp_size
        )

    def forward(
        self, layer_idx: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
        attn: LatentAttention,
    ) -> torch.Tensor:  # fmt: skip
        c, t, h = self.c, x.shape[0], self.num_heads
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(t, h, self.qk_head_dim).split((c.qk_nope_head_dim, c.qk_rope_head_dim), dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split((c.kv_lora_rank, c.qk_rope_head_dim), dim=-1)
        split = attn.mla_split
        # CUDA: the latent's norm, the rotary embedding and the latent cache write in one kernel (a split step too:
        # its up-projected rows read their context, the new tokens' rows included, back from the pool)
        slots = attn.paged_slots(layer_idx) if fused.enabled(x) else None
        written = self._rope_into_cache(q_rope, k_rope, latent, cos, sin, kv_cache, slots)
        if written is not None:  # the roped query; the latent rows are in the cache
            q_rope = written
        else:
            latent = self.kv_a_layernorm(latent)
            roped = fused.mla_rope(q_rope, k_rope, cos, sin, c.rope_interleave) if fused.enabled(x) else None
            if roped is None:
                rot = rotate_pairs if c.rope_interleave else rotate_half
                roped = rot(q_rope, cos, sin), rot(k_rope[:, None, :], cos, sin)[:, 0]
            q_rope, k_rope = roped
        if split is not None:  # long prefill chunks up-projected (engine/attention/mla.py), the rest absorbed
            values = self._split_attention(
                layer_idx, q_nope, q_rope, latent, k_rope, kv_cache, attn, split, written=written is not None
            )
            return self.o_proj(values.reshape(t, h * c.v_head_dim))
        w_kv = self.kv_b_proj.weight.view(h, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w_kv[:, : c.qk_nope_head_dim], w_kv[:, c.qk_nope_head_dim :]
        # Batched over heads on strided views (no copies): W_UK absorbed into the query, [t, h, lora] as a view of
        # [h, t, lora] (the kernels take the row and head strides); W_UV after attention, on the output's layout.
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
        if written is not None:
            out = attn.attend_absorbed(layer_idx, q_latent, q_rope, kv_cache)
        else:
            out = attn.forward_mla(layer_idx, q_latent, q_rope, latent, k_rope, kv_cache)
        if x.is_cuda and t > 1:  # cuBLAS writes [t, h, v] through its strides: no copy before o_proj
            values = out.new_empty((t, h, c.v_head_dim))
            torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2), out=values.transpose(0, 1))
            return self.o_proj(values.view(t, h * c.v_head_dim))
        values = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2))  # [h, t, v]; at t = 1 the reshape is a view
        return self.o_proj(values.transpose(0, 1).reshape(t, h * c.v_head_dim))

    def _rope_into_cache(
        self, q_rope: torch.Tensor, k_rope: torch.Tensor, latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        kv_cache: torch.Tensor, slots: torch.Tensor | None,
    ) -> torch.Tensor | None:  # fmt: skip
        """The roped query after fused.mla_rope_cache wrote this step's latent rows, or None where it declined
        (or the backend writes them: no slots)."""
        if slots is None:
            return None
        norm = self.kv_a_layernorm
        return fused.mla_rope_cache(
            q_rope, k_rope, latent, norm.weight, norm.eps, cos, sin, self.c.rope_interleave, kv_cache, slots
        )

    def _split_attention(
        self, layer_idx: int, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
        kv_cache: torch.Tensor, attn: LatentAttention, split: MLASplit, written: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        """Per-head values [t, h, v] of a step whose split sends some prefill chunks up-projected: every new latent
        is cached first (here, or already by the fused rope + cache kernel: `written`, latent and k_rope then
        unused); absorbed rows attend as forward_mla does; the up rows' contexts (cached + new latents, gathered
        from the pool) go through kv_b_proj to K_nope and V, the shared rope key is appended to every head,
        and the chunks' full queries attend over them causally. The up-projected K/V are transient, one layer at a
        time, context tokens x heads x (2 nope + rope + 2 v) at most (mla.upproject_temp_bytes, which the start-up
        memory profile reserves for the step bound mla_upproject_max_context_tokens); the absorbed rows'
        temporaries are freed before they are made."""
        c, h = self.c, self.num_heads
        nope, r = c.qk_nope_head_dim, c.kv_lora_rank
        if not written:
            attn.write_latents(latent, k_rope, kv_cache)
        a = split.absorbed_rows
        values = None
        if a is not None:
            values = q_nope.new_empty((q_nope.shape[0], h, c.v_head_dim))
            values[a] = self._absorbed_values(layer_idx, q_nope[a], q_rope[a], kv_cache, attn)
        context = kv_cache.view(-1, kv_cache.shape[-1]).index_select(0, split.context_slots)  # [S, r + rope]
        kv = self.kv_b_proj(context[:, :r]).view(-1, h, nope + c.v_head_dim)
        k = torch.cat((kv[..., :nope], context[:, None, r:].expand(-1, h, c.qk_rope_head_dim)), dim=-1)
        if values is None:  # every row up-projected, in step order (up_rows is 0..t-1): no gather, no scatter
            return attn.attend_upprojected(layer_idx, torch.cat((q_nope, q_rope), dim=-1), k, kv[..., nope:])
        u = split.up_rows
        values[u] = attn.attend_upprojected(layer_idx, torch.cat((q_nope[u], q_rope[u]), dim=-1), k, kv[..., nope:])
        return values

    def _absorbed_values(
        self, layer_idx: int, q_nope: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, attn: LatentAttention
    ) -> torch.Tensor:
        """Per-head values [t, h, v] of a split's absorbed rows (their latents already written)."""
        c, h, nope = self.c, self.num_heads, self.c.qk_nope_head_dim
        w_kv = self.kv_b_proj.weight.view(h, nope + c.v_head_dim, c.kv_lora_rank)
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_kv[:, :nope]).transpose(0, 1)
        out = attn.attend_absorbed(layer_idx, q_latent, q_rope, kv_cache)
        return torch.bmm(out.transpose(0, 1), w_kv[:, nope:].transpose(1, 2)).transpose(0, 1)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, layer: int, tp_size: int = 1):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = MLAttention(config, dtype, device, tp_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        sparse = config.layer_is_sparse(layer)
        self.mlp: nn.Module = (
            DeepseekMoE(config, dtype, device, tp_size) if sparse else MLP(config, dtype, device, tp_size)
        )


class DeepseekForCausalLM(CausalLM):
    """DeepseekV2ForCausalLM / DeepseekV3ForCausalLM."""

    norm_types = (RMSNorm,)

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
        tp_rank: int = 0, tp_size: int = 1,
    ):  # fmt: skip
        device = torch.device(device)
        super().__init__(config, dtype, device, tp_rank, tp_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, dtype, device, i, tp_size) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        inv_freq, self.rope_scale = rope_inv_freq_and_scale(config, config.qk_rope_head_dim)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], attn: LatentAttention
    ) -> torch.Tensor:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos = (freqs.cos() * self.rope_scale).to(self.dtype)[:, None, :]
        sin = (freqs.sin() * self.rope_scale).to(self.dtype)[:, None, :]
        return decoder_stack(self.layers, self.norm, self.embed(input_ids), cos, sin, kv_caches, attn)

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """HF-named tensors, per-expert or stacked experts; MTP layers (index >= num_hidden_layers) ignored."""
        n = self.config.num_hidden_layers
        mtp = tuple(f"model.layers.{i}." for i in range(n, n + 8))
        # the mapping itself, not a filtered copy: lazy reads stay lazy and an FP8 view stays one
        r = CheckpointReader(weights, self.config, self.tp_rank, self.tp_size)
        self.load_embeddings(r)
        r.put(self.norm.weight, r.take("model.norm.weight"), "model.norm.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}"
            for name in ("input_layernorm", "post_attention_layernorm"):
                r.put(getattr(layer, name).weight, r.take(f"{p}.{name}.weight"), f"{p}.{name}.weight")
            attn = layer.self_attn
            for name, param in list(attn.named_parameters()):
                full = f"{p}.self_attn.{name}"
                module = name.removesuffix(".weight")
                if module in _FP8_CAPABLE:  # FP8 on CUDA when the checkpoint holds it so
                    r.put_linear(
                        getattr(attn, module), f"{p}.self_attn.{module}", (), _ATTENTION_SPLITS.get(name, ""), full
                    )
                else:
                    r.put(param, r.take(full, _ATTENTION_SPLITS.get(name, "")), full)
            if isinstance(layer.mlp, DeepseekMoE):
                moe = layer.mlp
                shared, moe.shared_expert = moe.shared_expert, None
                load_moe_weights(r, moe, p)
                moe.gate.data = moe.gate.data.float()  # router logits are float32: cast once, not every step
                moe.shared_expert = shared
                if shared is not None:
                    r.load_mlp(shared, f"{p}.mlp.shared_experts")
                if moe.e_score_correction_bias is not None:
                    name = f"{p}.mlp.gate.e_score_correction_bias"
                    r.put(moe.e_score_correction_bias, r.take(name), name)
                    moe.e_score_correction_bias.data = moe.e_score_correction_bias.data.float()
            else:
                r.load_mlp(layer.mlp, f"{p}.mlp")
        r.finish(_IGNORED_SUFFIXES, ignored_prefixes=mtp)
        self.tie_head()
