"""Gemma 3 (text): Gemma3ForCausalLM, from HF safetensors or llama.cpp GGUF (the 270M/1B text models).

What differs from the Llama-family forward in llama.py, and how it is done here:
- embeddings are scaled by sqrt(hidden_size) (the scale rounded to the model dtype first, as transformers does);
- RMSNorm multiplies by (1 + w), all in float32, rounded once at the end; the norm weights stay float32 (1 + w
  in bf16 would lose w's low bits); GGUF stores 1 + w, the loader hands us HF's w;
- four norms per block: input, post-attention (before the residual add), pre- and post-feed-forward;
- q/k norms (the Gemma norm), attention scale query_pre_attn_scalar^-1/2, head_dim not hidden/heads;
- GELU (tanh approximation) gated MLP;
- sliding layers (5 of every 6) attend to the last `sliding_window` keys and use a local rope base (10k), the
  global layers rope_theta (1M) with the configured rope scaling; the attention backend gets the window per
  layer (ModelConfig.attention_windows), the model picks each layer's cos/sin;
- tied LM head; no logit soft-capping (Gemma 3 has none; configs that set it are refused in ModelConfig).
q/k/v and gate/up are fused at load time as in llama.py, and its Attention/Linear/tensor-parallel pieces are
reused as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.engine.attention.base import AttentionBackend
from kubellm.engine.model_config import FULL, SLIDING, ModelConfig

from .causal_lm import CausalLM, CheckpointReader, check_shape, new_param
from .llama import MLP, Attention, rope_inv_freq


class GemmaRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w) in float32, rounded to x's dtype once. `weight` holds 1 + w."""

    def __init__(self, size: int, eps: float, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = new_param((size,), torch.float32, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).to(x.dtype)

    def load(self, hf_weight: torch.Tensor) -> None:
        """From the checkpoint's w (HF convention: the multiplier is 1 + w)."""
        self.weight.data = (1.0 + hf_weight.float()).to(self.weight.device)


class Gemma3Attention(Attention):
    """llama.py's attention (fused qkv, q/k norm, rope, backend call, o_proj) with Gemma's q/k norms."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, tp_size: int = 1):
        super().__init__(config, dtype, device, tp_size)
        self.q_norm = GemmaRMSNorm(config.head_dim, config.rms_norm_eps, device)
        self.k_norm = GemmaRMSNorm(config.head_dim, config.rms_norm_eps, device)


class GeluMLP(MLP):
    """gelu_tanh(gate) * up, then down (llama.py's fused gate_up layout and tensor-parallel split)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, tp_size: int = 1):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps, device)
        self.self_attn = Gemma3Attention(config, dtype, device, tp_size)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps, device)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps, device)
        self.mlp = GeluMLP(config, dtype, device, tp_size)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps, device)


_LAYER_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


class Gemma3ForCausalLM(CausalLM):
    norm_types = (GemmaRMSNorm,)

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
            Gemma3DecoderLayer(config, dtype, device, tp_size) for _ in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, device)
        # sliding layers: the local rope base, no scaling; global layers: rope_theta with the configured scaling
        local = dataclasses.replace(config, rope_theta=config.rope_local_theta or config.rope_theta, rope_scaling=None)
        self.register_buffer("inv_freq", rope_inv_freq(config).to(device), persistent=False)
        self.register_buffer("inv_freq_local", rope_inv_freq(local).to(device), persistent=False)
        # a layer's type picks its rope base, whether or not its window can bind at this context length
        self.sliding = [t == SLIDING for t in (config.layer_types or [FULL] * config.num_hidden_layers)]
        # sqrt(hidden) rounded to the model dtype first, as transformers' scaled embedding does
        self.embed_scale = float(torch.tensor(config.hidden_size**0.5, dtype=dtype))

    def _cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        """input_ids/positions [T] (packed sequences) -> final-normed hidden states [T, H]."""
        rope_global = self._cos_sin(positions, self.inv_freq)
        rope_local = self._cos_sin(positions, self.inv_freq_local)
        h = self.embed(input_ids) * self.embed_scale
        for i, layer in enumerate(self.layers):
            cos, sin = rope_local if self.sliding[i] else rope_global
            x = layer.self_attn(i, layer.input_layernorm(h), cos, sin, kv_caches[i], attn)
            h = h + layer.post_attention_layernorm(x)
            x = layer.mlp(layer.pre_feedforward_layernorm(h))
            h = h + layer.post_feedforward_layernorm(x)
        return self.norm(h)

    # -- weights -------------------------------------------------------------------------------------------

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """HF-named tensors (norm weights in HF's w convention); q/k/v and gate/up fused; this rank's shards
        under tensor parallelism (see causal_lm.CheckpointReader)."""
        r = CheckpointReader(weights, self.config, self.tp_rank, self.tp_size)

        def norm(module: GemmaRMSNorm, name: str) -> None:
            tensor = r.take(name)
            check_shape(tensor, tuple(module.weight.shape), name)
            module.load(tensor)

        self.load_embeddings(r)
        norm(self.norm, "model.norm.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}"
            for n in _LAYER_NORMS:
                norm(getattr(layer, n), f"{p}.{n}.weight")
            norm(layer.self_attn.q_norm, f"{p}.self_attn.q_norm.weight")
            norm(layer.self_attn.k_norm, f"{p}.self_attn.k_norm.weight")
            r.load_attention_and_mlp(layer, p)
        r.finish()
        self.tie_head()
