"""`ModelConfig`: the architecture facts the engine needs, read from a HF config.json or from GGUF metadata.

One Llama-family forward serves the Llama-like architectures; what differs between them (qkv bias, q/k norm,
rope scaling, tied embeddings, mixture-of-experts feed-forward layers) is spelled out here as plain fields so the
model code never looks at names.
Gemma 3 has its own forward (models/gemma3.py); the facts the engine around it needs (attention scale, which
layers slide, the local rope base) are plain fields too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# The architectures the one Llama-family forward implements, as HF `architectures` names them.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "MixtralForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
)
MOE_ARCHITECTURES: tuple[str, ...] = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM")
# Multi-head latent attention and DeepSeek's mixture of experts (models/deepseek.py).
MLA_ARCHITECTURES: tuple[str, ...] = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
# Architectures people ask for that are not implemented yet, and what is missing (named in the refusal).
MISSING_FEATURES = {
    "Qwen3NextForCausalLM": "hybrid linear attention (Gated DeltaNet layers between the full-attention ones)",
    "KimiK25ForConditionalGeneration": (
        "Kimi-K2.5's checkpoint layout (the language model inside KimiK25ForConditionalGeneration, beside the "
        "vision tower) and its INT4 weights; its DeepSeek-V3 language architecture itself runs on CPU"
    ),
}
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")  # yarn: DeepSeek only
# model_type -> architecture, for configs that lack an `architectures` list.
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
SLIDING, FULL = "sliding_attention", "full_attention"  # layer_types entries (transformers' names)
# GGUF files of Llama 3.x carry rope frequency factors as a tensor instead of rope_scaling metadata; the loader
# names it so and the model takes it (here, not in models/llama.py, so the loader need not import the models).
ROPE_FREQ_FACTORS = "model.rotary_emb.freq_factors"


class UnsupportedModelError(ValueError):
    """The model's architecture (or a feature of it) is not one the engine implements."""


def unsupported_architecture(arch: str) -> UnsupportedModelError:
    missing = f" (kubellm lacks {MISSING_FEATURES[arch]})" if arch in MISSING_FEATURES else ""
    return UnsupportedModelError(
        f"unsupported model architecture {arch!r}{missing}; kubellm supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None or {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2; Llama with attention_bias)
    attention_out_bias: bool = False  # o_proj carries a bias (Llama/Qwen3 with attention_bias, not Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # each query attends to the last W keys (on every layer unless layer_types)
    layer_types: list[str] | None = None  # per layer SLIDING or FULL (Gemma 3); None: every layer alike
    hidden_act: str = "silu"  # "gelu_pytorch_tanh" (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power (Gemma); None: head_dim's
    rope_local_theta: float | None = None  # rope base of the sliding layers (Gemma 3); rope_theta is the others'
    # Mixture of experts (0 experts: every layer dense). A sparse layer routes each token to `num_experts_per_tok`
    # of `num_experts` SiLU-gated MLPs of width `moe_intermediate_size`; the dense layers use intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one always-on expert beside the routed ones (0: none)
    shared_expert_gated: bool = False  # its output scaled by sigmoid(x . w) per token (Qwen2-MoE; DeepSeek: not)
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 and i is not in mlp_only_layers
    mlp_only_layers: list[int] = field(default_factory=list)
    # DeepSeek (MLA_ARCHITECTURES): latent attention widths (q_lora_rank 0: a plain query projection) and routing.
    # The KV cache holds one latent row per token of width head_dim = kv_lora_rank + qk_rope_head_dim
    # (num_key_value_heads 1; engine/attention/mla.py).
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True  # rotary dims in interleaved pairs (DeepSeek) rather than rotate-half
    moe_scoring: str = "softmax"  # "softmax" (V2) or "sigmoid" with e_score_correction_bias (V3)
    n_group: int = 1  # experts are picked among the topk_group best of n_group groups
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise unsupported_architecture(self.architecture)
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise UnsupportedModelError(
                    f"layer_types names {len(self.layer_types)} layers, the model has {self.num_hidden_layers}"
                )
            unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
            if unknown:
                raise UnsupportedModelError(
                    f"unsupported attention layer types {unknown}; supported: {SLIDING}, {FULL}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UnsupportedModelError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and num_experts={self.num_experts}"
            )
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise UnsupportedModelError("a mixture-of-experts config needs moe_intermediate_size > 0")
        if self.decoder_sparse_step < 1:
            raise UnsupportedModelError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        rope_type = self.rope_type
        if rope_type == "yarn" and self.architecture not in MLA_ARCHITECTURES:
            raise UnsupportedModelError(
                f"rope scaling type 'yarn' is implemented for DeepSeek models only, not {self.architecture}"
            )
        if self.architecture in MLA_ARCHITECTURES and self.num_experts and self.num_experts % self.n_group:
            raise UnsupportedModelError(f"n_group={self.n_group} does not divide n_routed_experts={self.num_experts}")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type") or self.rope_scaling.get("type") or "default")

    @property
    def attention_scale(self) -> float:
        if self.architecture in MLA_ARCHITECTURES:
            scale = float(self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
            mscale_all_dim = float((self.rope_scaling or {}).get("mscale_all_dim") or 0)
            if self.rope_type != "default" and mscale_all_dim:
                scale *= yarn_mscale(float(self.rope_scaling["factor"]), mscale_all_dim) ** 2  # type: ignore[index]
            return scale
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_is_sliding(self, layer: int) -> bool:
        if not self.sliding_window:
            return False
        return self.layer_types is None or self.layer_types[layer] == SLIDING

    def attention_windows(self, max_len: int) -> int | list[int | None] | None:
        """What the attention backend takes as `sliding_window`, for contexts of up to `max_len` tokens: None
        when no window can bind, W when every layer has the same window W, else one entry per layer (None:
        full attention). A window as long as the context changes nothing, so it is dropped."""
        window = self.sliding_window if self.sliding_window and self.sliding_window < max_len else None
        if window is None:
            return None
        per_layer = [window if self.layer_is_sliding(i) else None for i in range(self.num_hidden_layers)]
        return window if all(w == window for w in per_layer) else per_layer

    def layer_is_sparse(self, layer: int) -> bool:
        """Whether layer `layer`'s feed-forward is the mixture of experts (transformers' rule for Qwen2/3-MoE)."""
        return (
            self.num_experts > 0 and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read a transformers config.json (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters` style)."""
        arch = _architecture(cfg)
        if arch not in SUPPORTED_ARCHITECTURES:  # before any feature check: name what is missing for this one
            raise unsupported_architecture(arch)
        if arch == "Gemma3ForCausalLM":
            return cls._from_gemma3_config(cfg)
        if arch in MLA_ARCHITECTURES:
            return cls._from_deepseek_config(cfg, arch)
        experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)
        if experts and arch not in MOE_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{arch} with {experts} experts is not supported; kubellm runs mixture of experts for "
                f"{', '.join(MOE_ARCHITECTURES)}"
            )
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"unsupported activation {act!r} in {arch}; kubellm implements silu")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope_theta, rope_scaling = _rope(cfg)
        attention_bias = bool(cfg.get("attention_bias", False))
        is_qwen2 = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
        mistral_like = arch in ("MistralForCausalLM", "MixtralForCausalLM")  # one window on every layer
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", mistral_like) else None
        if sliding and not mistral_like:
            # Qwen2/Qwen3 window only some layers (max_window_layers / layer_types): not implemented.
            raise UnsupportedModelError(f"{arch} with use_sliding_window=true (per-layer windows) is not supported")
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("qkv_bias", True)) if is_qwen2 else attention_bias,
            attention_out_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=token_id_list(cfg.get("eos_token_id")),
            sliding_window=int(sliding) if sliding else None,
            **(_moe_fields(cfg, arch, experts) if experts else {}),
        )

    @classmethod
    def _from_deepseek_config(cls, cfg: dict[str, Any], arch: str) -> ModelConfig:
        """transformers' DeepseekV2Config / DeepseekV3Config (config.json of the V2, V3, R1, Moonlight families)."""
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"unsupported activation {act!r} in {arch}; kubellm implements silu")
        v3 = arch == "DeepseekV3ForCausalLM"
        experts = int(cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        if not experts:
            raise UnsupportedModelError(f"{arch} config names no routed experts (n_routed_experts)")
        freq = int(cfg.get("moe_layer_freq") or 1)
        if freq != 1:
            raise UnsupportedModelError(f"{arch} with moe_layer_freq={freq} is not supported (only 1)")
        scoring = "sigmoid" if v3 else str(cfg.get("scoring_func") or "softmax")
        topk_method = cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        if (v3 and topk_method != "noaux_tc") or (not v3 and topk_method not in ("greedy", "group_limited_greedy")):
            raise UnsupportedModelError(f"{arch} with topk_method={topk_method!r} is not supported")
        if scoring not in ("softmax", "sigmoid") or (not v3 and scoring != "softmax"):
            raise UnsupportedModelError(f"{arch} with scoring_func={scoring!r} is not supported")
        grouped = v3 or topk_method == "group_limited_greedy"
        heads = int(cfg["num_attention_heads"])
        kv_lora, rope_dim = int(cfg.get("kv_lora_rank") or 512), int(cfg.get("qk_rope_head_dim") or 64)
        rope_theta, rope_scaling = _rope(cfg)
        layers = int(cfg["num_hidden_layers"])
        first_dense = int(cfg.get("first_k_dense_replace") or 0)
        moe_inter = int(cfg.get("moe_intermediate_size") or 1407)
        shared = int(cfg.get("n_shared_experts") or 0)
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            head_dim=kv_lora + rope_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            attention_out_bias=bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=token_id_list(cfg.get("eos_token_id")),
            num_experts=experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 1),
            moe_intermediate_size=moe_inter,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=moe_inter * shared,
            shared_expert_gated=False,
            mlp_only_layers=list(range(first_dense)),
            q_lora_rank=int(cfg.get("q_lora_rank") or 0),
            kv_lora_rank=kv_lora,
            qk_nope_head_dim=int(cfg.get("qk_nope_head_dim") or 128),
            qk_rope_head_dim=rope_dim,
            v_head_dim=int(cfg.get("v_head_dim") or 128),
            rope_interleave=bool(cfg.get("rope_interleave", True)) if v3 else True,
            moe_scoring=scoring,
            n_group=int(cfg.get("n_group") or 1) if grouped else 1,
            topk_group=int(cfg.get("topk_group") or 1) if grouped else 1,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
        )

    @classmethod
    def _from_gemma3_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """transformers' Gemma3TextConfig (config.json of a Gemma3ForCausalLM), v4 or v5 style."""
        arch = "Gemma3ForCausalLM"
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if cfg.get(key) is not None:
                raise UnsupportedModelError(f"{arch} with {key}={cfg[key]} is not supported")
        if cfg.get("use_bidirectional_attention"):
            raise UnsupportedModelError(f"{arch} with use_bidirectional_attention (an encoder) is not supported")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedModelError(
                f"unsupported activation {act!r} in {arch}; kubellm implements gelu_pytorch_tanh"
            )
        layers = int(cfg.get("num_hidden_layers", 26))
        layer_types = cfg.get("layer_types")
        if not layer_types:
            pattern = int(cfg.get("sliding_window_pattern", 6))
            layer_types = gemma3_layer_types(layers, pattern)
        params = cfg.get("rope_parameters")
        if isinstance(params, dict) and FULL in params:  # v5: one rope dict per layer type
            full, local = dict(params[FULL] or {}), dict(params.get(SLIDING) or {})
            rope_theta = float(full.pop("rope_theta", 1_000_000.0))
            local_theta = float(local.get("rope_theta", 10_000.0))
            if (local.get("rope_type") or "default") != "default":
                raise UnsupportedModelError(f"{arch}: rope scaling on the sliding layers is not supported")
            rope_scaling = full if (full.get("rope_type") or full.get("type") or "default") != "default" else None
        else:
            rope_theta, rope_scaling = _rope(cfg | {"rope_theta": cfg.get("rope_theta", 1_000_000.0)})
            local_theta = float(cfg.get("rope_local_base_freq", 10_000.0))
        heads = int(cfg.get("num_attention_heads", 8))
        sliding = cfg.get("sliding_window", 4096)
        return cls(
            architecture=arch,
            vocab_size=int(cfg.get("vocab_size", 262_208)),
            hidden_size=int(cfg.get("hidden_size", 2304)),
            intermediate_size=int(cfg.get("intermediate_size", 9216)),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or 256),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 131_072)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            attention_out_bias=bool(cfg.get("attention_bias", False)),
            qk_norm=True,
            bos_token_id=cfg.get("bos_token_id", 2),
            eos_token_ids=token_id_list(cfg.get("eos_token_id", 1)),
            sliding_window=int(sliding) if sliding else None,
            layer_types=[str(t) for t in layer_types],
            hidden_act="gelu_pytorch_tanh",
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
            rope_local_theta=local_theta,
        )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq_and_scale(config: ModelConfig, dim: int) -> tuple[Any, float]:
    """YaRN (or plain) inverse frequencies [dim/2] float32 for a rotary width `dim`, and the factor cos/sin are
    scaled by (DeepSeek's mscale / mscale_all_dim ratio under YaRN, else 1)."""
    import torch  # the config module is imported by torch-free code; only the models call this

    base = config.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_type == "default":
        return inv, 1.0
    if config.rope_type != "yarn":
        raise UnsupportedModelError(f"{config.architecture}: rope scaling {config.rope_type!r} is not supported")
    s = config.rope_scaling or {}
    factor = float(s["factor"])
    mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
    if s.get("attention_factor") is not None:
        scale = float(s["attention_factor"])
    elif mscale and mscale_all:
        scale = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all))
    else:
        scale = yarn_mscale(factor)
    old_ctx = float(s.get("original_max_position_embeddings") or config.max_position_embeddings)
    fast, slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # high frequencies keep their rotation, low ones are interpolated by `factor`
    inv = (inv / factor) * (1 - extrapolate) + inv * extrapolate
    return inv, scale


def _moe_fields(cfg: dict[str, Any], arch: str, experts: int) -> dict[str, Any]:
    """The mixture-of-experts fields of a Qwen2-MoE / Qwen3-MoE / Mixtral config.json. Mixtral's experts are
    intermediate_size wide, every layer is sparse and the top-k weights are always renormalised."""
    if arch == "MixtralForCausalLM":
        return dict(
            num_experts=experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
            moe_intermediate_size=int(cfg["intermediate_size"]),
            norm_topk_prob=True,
        )
    shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    return dict(
        num_experts=experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 1)),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=shared,
        shared_expert_gated=shared > 0,  # Qwen2-MoE's shared expert always has its sigmoid gate
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        mlp_only_layers=[int(i) for i in cfg.get("mlp_only_layers") or []],
    )


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> list[str]:
    """Gemma 3's interleave: every `pattern`-th layer is global, the others slide (transformers' and llama.cpp's
    default when a checkpoint does not list them)."""
    return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]


def token_id_list(value: Any) -> list[int]:
    """HF writes eos_token_id as an int, a list of ints, or null."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if archs:
        return str(archs[0])
    model_type = cfg.get("model_type")
    if model_type in _MODEL_TYPE_TO_ARCH:
        return _MODEL_TYPE_TO_ARCH[model_type]
    raise unsupported_architecture(str(model_type or "<config.json names no architecture or model_type>"))


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from either config style."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return theta, None
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    return theta, scaling
