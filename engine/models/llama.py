"""The one Llama-family forward: Llama 2/3 (incl. llama3 rope scaling), Mistral, SmolLM2, Qwen2, Qwen3, and the
mixture-of-experts members Qwen3-MoE, Qwen2-MoE and Mixtral (their sparse layers' feed-forward is models/moe.py).

Tokens arrive packed ([T], sequence after sequence), so there is no batch axis and no padding: attention is
the only op that cares where one sequence ends, and the attention backend owns that. q/k/v and gate/up are
fused into one matmul each at load time (fewer, larger GEMMs; the layout the GPU path wants too).
With tp_size > 1 each rank holds whole heads and a slice of the MLP and vocab (see engine/parallel.py);
at tp_size 1 the modules are the plain ones and no collective runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.engine import parallel
from kubellm.engine.attention.base import AttentionBackend
from kubellm.engine.loader.fp8_weights import Fp8Tensor
from kubellm.engine.model_config import ROPE_FREQ_FACTORS, ModelConfig

from . import fp8_linear, fused
from .causal_lm import CausalLM, CheckpointReader, new_param, new_weight
from .fp8_linear import Fp8Params, fp8_forward, fp8_silu_mul_forward
from .moe import MoeTerms, SparseMoE, load_moe_weights

# Checkpoint entries that carry no parameters of ours (old HF checkpoints saved rope buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = new_param((size,), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled(x):  # CUDA: one Triton kernel instead of seven
            out = fused.rms_norm(x, self.weight, self.eps)
            if out is not None:
                return out
        # Normalise in float32 and scale in the model dtype, as the reference implementation does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def add_norm(norm: RMSNorm, x: torch.Tensor | MoeTerms, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """residual + x, and its norm: one fused kernel on CUDA (two ops fewer per block at small batch). x MoeTerms:
    a MoE layer's unsummed outputs (SparseMoE.forward_unreduced), summed by the same kernel."""
    if isinstance(x, MoeTerms):
        p = x.parts
        summed = fused.sum_add_rms_norm(p, residual, norm.weight, norm.eps, x.extra) if fused.enabled(p) else None
        if summed is not None:
            return summed
        x = x.total()  # the torch.sum (and add) the MoE layer would have run
    if fused.enabled(x):
        out = fused.add_rms_norm(x, residual, norm.weight, norm.eps)
        if out is not None:
            return out
    residual = residual + x
    return residual, norm(residual)


def decoder_stack(
    layers: nn.ModuleList,
    final_norm: RMSNorm,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_caches: list[torch.Tensor],
    attn: object,
) -> torch.Tensor:
    """The pre-norm residual stack of attention and MLP blocks over embeddings `h`, each residual add fused with the
    next block's norm; returns the final-normed hidden states. Shared by the model families whose layers have
    `input_layernorm`, `self_attn(i, x, cos, sin, kv_cache, attn)`, `post_attention_layernorm` and `mlp`."""
    x = layers[0].input_layernorm(h)
    for i, layer in enumerate(layers):
        # h: the residual stream; x: its norm, the next block's input
        h, x = add_norm(layer.post_attention_layernorm, layer.self_attn(i, x, cos, sin, kv_caches[i], attn), h)
        next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else final_norm
        mlp = layer.mlp
        h, x = add_norm(next_norm, mlp.forward_unreduced(x) if isinstance(mlp, SparseMoE) else mlp(x), h)
    return x


class Linear(nn.Module):
    # The GEMM; the model runner swaps in models/gemv.linear under tensor parallelism (faster on shards).
    matmul = staticmethod(F.linear)

    def __init__(self, in_f: int, out_f: int, bias: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = new_weight((out_f, in_f), dtype, device)
        self.bias = new_param((out_f,), dtype, device) if bias else None
        self.fp8: Fp8Params | None = None  # set by load_fp8: the weight is float8_e4m3fn, scaled by these

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is not None:
            return fp8_forward(x, self.weight, self.fp8, self.bias)
        return self.matmul(x, self.weight, self.bias)

    def load_fp8(self, t: Fp8Tensor) -> None:
        fp8_linear.hold(self, t)


def rope_inv_freq(config: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse rotary frequencies [head_dim/2] in float32, after the configured rope scaling."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = config.rope_type
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling.get("original_max_position_embeddings", config.max_position_embeddings))
        wavelen = 2 * math.pi / inv
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = torch.where(medium, smoothed, scaled)
    if freq_factors is not None:
        inv = inv / freq_factors.float().cpu()
    return inv


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the HF (rotate-half) layout; x [T, H, D], cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _out_linear(in_f: int, out_f: int, bias: bool, dtype: torch.dtype, device: torch.device, tp_size: int) -> nn.Module:
    """o_proj / down_proj: row-parallel (all-reduced) under tensor parallelism, a plain Linear otherwise."""
    cls = parallel.RowParallelLinear if tp_size > 1 else Linear
    return cls(in_f, out_f, bias, dtype, device)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, tp_size: int = 1):
        super().__init__()
        c = config
        # this rank's heads: tp_size divides both head counts (parallel.check_tp_size)
        self.num_heads, self.num_kv_heads = c.num_attention_heads // tp_size, c.num_key_value_heads // tp_size
        self.head_dim = c.head_dim
        self.q_size, self.kv_size = c.q_size // tp_size, c.kv_size // tp_size
        self.qkv_proj = Linear(c.hidden_size, self.q_size + 2 * self.kv_size, c.attention_bias, dtype, device)
        self.o_proj = _out_linear(self.q_size, c.hidden_size, c.attention_out_bias, dtype, device, tp_size)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device) if c.qk_norm else None

    def forward(
        self,
        layer_idx: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        norm: fused.QkNorm | None = None  # Qwen3's per-head q/k norms, when the rotary kernel applies them
        if self.q_norm is not None and self.k_norm is not None:
            # CUDA: folded into the rotary kernel below (torch: ~8 kernels each); only this file's RMSNorm (a
            # subclass's norm, as Gemma's (1 + w) rounded once, computes something else)
            if fused.qk_norm_enabled(q) and type(self.q_norm) is RMSNorm and type(self.k_norm) is RMSNorm:
                norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
            else:
                q, k = self.q_norm(q), self.k_norm(k)
        if fused.enabled(q):  # CUDA: rotary and the KV write in one kernel, where the backend lets the model write
            slots = attn.paged_slots(layer_idx)
            q_roped = fused.rope_cache(q, k, v, cos, sin, kv_cache, slots, norm) if slots is not None else None
            if q_roped is not None:
                return self.o_proj(attn.forward_written(layer_idx, q_roped, kv_cache).reshape(t, self.q_size))
        roped = fused.rope(q, k, cos, sin, norm) if fused.enabled(q) else None
        if roped is None and norm is not None:  # the rotary kernel declined: the norms on their own, then rotary
            q, k = self.q_norm(q), self.k_norm(k)
            roped = fused.rope(q, k, cos, sin) if fused.enabled(q) else None
        q, k = roped if roped is not None else (rotate(q, cos, sin), rotate(k, cos, sin))
        out = attn.forward(layer_idx, q, k, v, kv_cache)
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    """SiLU-gated MLP. `intermediate_size` overrides the config's (a MoE shared expert); `reduce=False` leaves the
    down projection's tensor-parallel partial sums for the caller to all-reduce (the MoE block does it once)."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        tp_size: int = 1,
        intermediate_size: int | None = None,
        reduce: bool = True,
    ):
        super().__init__()
        self.intermediate = (intermediate_size or config.intermediate_size) // tp_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.intermediate, config.mlp_bias, dtype, device)
        down_tp = tp_size if reduce else 1
        self.down_proj = _out_linear(self.intermediate, config.hidden_size, config.mlp_bias, dtype, device, down_tp)

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP of x; plus `add` when given (a MoE block's routed output beside its shared expert): on CUDA the
        sum is the down GEMM's epilogue (addmm, one kernel fewer) where the down projection is a plain GEMM."""
        gate_up = self.gate_up_proj(x)
        down = self.down_proj
        if isinstance(down, Linear) and down.fp8 is not None:  # FP8 (CUDA): SiLU-and-mul may quantize for the GEMM
            out = fp8_silu_mul_forward(gate_up, down.weight, down.fp8, down.bias)
            return out if add is None else add + out
        act = fused.silu_mul(gate_up) if fused.enabled(gate_up) else None
        if act is None:
            gate, up = gate_up.split(self.intermediate, dim=-1)
            act = F.silu(gate) * up
        if add is None:
            return down(act)
        if _addmm_applies(down, act, add):
            return torch.addmm(add, act, down.weight.t())
        return add + down(act)


def _addmm_applies(down: nn.Module, act: torch.Tensor, add: torch.Tensor) -> bool:
    """Whether `add + down(act)` may run as one addmm: CUDA, a plain Linear (no bias, no FP8, cuBLAS's GEMM, not
    the tensor-parallel GEMV or a row-parallel layer), operands of one dtype. Its sum is rounded once, not twice."""
    return (
        add.is_cuda
        and type(down) is Linear
        and down.fp8 is None
        and down.bias is None
        and down.matmul is F.linear
        and act.dtype == add.dtype == down.weight.dtype
        and add.shape == (act.shape[0], down.weight.shape[0])
    )


def feed_forward(config: ModelConfig, layer: int, dtype: torch.dtype, device: torch.device, tp_size: int) -> nn.Module:
    """Layer `layer`'s feed-forward: the dense MLP, or the mixture of experts (with its shared expert, if any)."""
    if not config.layer_is_sparse(layer):
        return MLP(config, dtype, device, tp_size)
    shared = None
    if config.shared_expert_intermediate_size:
        shared = MLP(config, dtype, device, tp_size, config.shared_expert_intermediate_size, reduce=False)
    return SparseMoE(config, dtype, device, tp_size, shared)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, tp_size: int = 1, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Attention(config, dtype, device, tp_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = feed_forward(config, layer, dtype, device, tp_size)


class LlamaForCausalLM(CausalLM):
    norm_types = (RMSNorm,)

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        super().__init__(config, dtype, device, tp_rank, tp_size)
        device = torch.device(device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, dtype, device, tp_size, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.register_buffer("inv_freq", rope_inv_freq(config).to(device), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        """input_ids/positions [T] (packed sequences) -> final-normed hidden states [T, H].
        `attn.begin_step` must already have planned this step."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        return decoder_stack(self.layers, self.norm, self.embed(input_ids), cos, sin, kv_caches, attn)

    # -- weights -------------------------------------------------------------------------------------------

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Take HF-named tensors; fuse q/k/v and gate/up; share storage where dtype and device already match.
        Under tensor parallelism keep this rank's shard of each split tensor, reading only that slice when the
        mapping can (`parallel.read_slice`); the caller's full tensors stay untouched."""
        r = CheckpointReader(weights, self.config, self.tp_rank, self.tp_size)
        self.load_embeddings(r)
        r.put(self.norm.weight, r.take("model.norm.weight"), "model.norm.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}"
            for name in ("input_layernorm", "post_attention_layernorm"):
                r.put(getattr(layer, name).weight, r.take(f"{p}.{name}.weight"), f"{p}.{name}.weight")
            attn = layer.self_attn
            if attn.q_norm is not None and attn.k_norm is not None:
                for name in ("q_norm", "k_norm"):
                    r.put(getattr(attn, name).weight, r.take(f"{p}.self_attn.{name}.weight"), f"{p}.self_attn.{name}")
            r.load_attention(attn, p)
            if isinstance(layer.mlp, SparseMoE):
                load_moe_weights(r, layer.mlp, p)
            else:
                r.load_mlp(layer.mlp, f"{p}.mlp")
        if ROPE_FREQ_FACTORS in weights:
            r.used.add(ROPE_FREQ_FACTORS)
            self.inv_freq = rope_inv_freq(self.config, weights[ROPE_FREQ_FACTORS]).to(self.inv_freq.device)
        r.finish(_IGNORED_SUFFIXES)
        self.tie_head()
