"""Tiny random-weight Llama-family checkpoints saved the way Hugging Face saves them, plus helpers that run
our ModelRunner on them. Test-only: transformers is the reference here, never a runtime dependency."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from kubellm.engine.attention import AttentionMetadata
from kubellm.engine.config import EngineConfig
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq
from kubellm.engine.model_runner import ModelRunner

TINY_VOCAB = 320
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,  # larger than the default so logits are far from uniform
    bos_token_id=1,
    eos_token_id=2,
)


# Mixture-of-experts kinds: between them they vary the expert count, top-k, renormalisation, the shared expert
# and dense layers among the sparse ones (mlp_only_layers, decoder_sparse_step).
MOE_KINDS = ("qwen3-moe", "qwen2-moe", "mixtral")
# DeepSeek kinds (multi-head latent attention): between them q_lora on/off, softmax and sigmoid gating (with a random
# e_score_correction_bias), group-limited top-k, shared experts, a dense first layer, YaRN with mscale, both rope
# layouts. v_head_dim differs from qk_nope_head_dim so a swapped split cannot pass.
DEEPSEEK_KINDS = ("deepseek-v2", "deepseek-v3")
_DEEPSEEK = dict(
    num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
    first_k_dense_replace=1, n_group=4, topk_group=2,
)  # fmt: skip
_YARN = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, mscale=0.707,
    mscale_all_dim=0.707, beta_fast=32, beta_slow=1,
)  # fmt: skip


def tiny_hf_config(kind: str):
    """transformers configs covering every feature of the one forward."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    if kind == "llama":
        return LlamaConfig(**_COMMON, rope_theta=10000.0)
    if kind == "llama3":  # llama3 rope scaling, tied embeddings, biases everywhere, head_dim != hidden/heads
        return LlamaConfig(
            **_COMMON,
            head_dim=32,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            rope_theta=500000.0,
        )
    if kind == "qwen2":
        return Qwen2Config(**_COMMON, rope_theta=1000000.0)
    if kind == "qwen3":
        return Qwen3Config(**_COMMON, head_dim=24, attention_bias=True)
    if kind == "mistral":
        return MistralConfig(**_COMMON, sliding_window=None)
    if kind == "mistral-window":  # an 8-token attention window, far shorter than the test sequences
        return MistralConfig(**_COMMON, sliding_window=8)
    if kind == "qwen3-moe":  # 8 experts, top-2 renormalised; layer 1 of 3 stays dense (mlp_only_layers)
        common = _COMMON | dict(num_hidden_layers=3)
        return Qwen3MoeConfig(
            **common, head_dim=24, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            norm_topk_prob=True, mlp_only_layers=[1],
        )  # fmt: skip
    if kind == "qwen2-moe":  # 6 experts, top-3 not renormalised, gated shared expert; layer 0 dense (sparse step 2)
        return Qwen2MoeConfig(
            **_COMMON, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
            shared_expert_intermediate_size=48, decoder_sparse_step=2,
        )  # fmt: skip
    if kind == "mixtral":  # 4 experts of intermediate_size, top-2 (always renormalised)
        return MixtralConfig(**_COMMON | dict(intermediate_size=48), num_local_experts=4, num_experts_per_tok=2)
    if kind == "deepseek-v2":  # plain query projection, softmax + group_limited_greedy, no renormalisation, YaRN
        return DeepseekV2Config(
            **_COMMON | _DEEPSEEK, q_lora_rank=None, topk_method="group_limited_greedy", routed_scaling_factor=1.5,
            rope_parameters=_YARN | dict(mscale=1.0, mscale_all_dim=0.8),  # cos/sin scaled by mscale's ratio
        )  # fmt: skip
    if kind == "deepseek-v3":  # q_lora, sigmoid + correction bias (noaux_tc), renormalised, rotate-half rope
        return DeepseekV3Config(
            **_COMMON | _DEEPSEEK, q_lora_rank=24, routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_interleave=False, rope_parameters=dict(_YARN),
        )  # fmt: skip
    raise ValueError(kind)


def tiny_tokenizer() -> Tokenizer:
    """A word-level tokenizer over a made-up vocabulary with chat special tokens at ids 0-3."""
    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    words = [f"w{i}" for i in range(TINY_VOCAB - len(specials) - 4)] + ["user", "assistant", "system", "\n"]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials[1:3])
    return tok


def save_tiny_model(kind: str, path: Path, seed: int = 0, shard_size: str | None = None, config=None) -> Path:
    """Random weights (seeded) saved with save_pretrained as safetensors, with a tokenizer and generation config.
    `config`: a transformers config to use instead of `kind`'s (its vocabulary must be TINY_VOCAB)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config or tiny_hf_config(kind), dtype=torch.float32)
    for layer in getattr(model.model, "layers", []):  # DeepSeek-V3's routing bias starts at zero: make it matter
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(getattr(gate, "e_score_correction_bias", None), torch.Tensor):
            gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape) * 0.5)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    GenerationConfig(bos_token_id=1, eos_token_id=[2, 3], temperature=0.7, top_p=0.9, do_sample=True).save_pretrained(
        path
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer(), bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """transformers' teacher-forced logits [T, V] for one sequence."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def make_runner(loaded, num_blocks: int = 64, block_size: int = 16, **config) -> ModelRunner:
    """`config`: more EngineConfig settings."""
    runner = ModelRunner(loaded, EngineConfig(device="cpu", block_size=block_size, **config))
    runner.allocate_kv_cache(num_blocks)
    return runner


def full_pass_logits(runner: ModelRunner, ids: list[int], block_ids: list[int] | None = None) -> torch.Tensor:
    """Logits at every position of one prefill, through the same backend path as execute()."""
    blocks = block_ids if block_ids is not None else list(range(-(-len(ids) // runner.block_size)))
    batch = ForwardBatch([ScheduledSeq("full", list(ids), 0, blocks, True)])
    meta = AttentionMetadata.from_batch(batch, runner.block_size)
    with torch.inference_mode():
        runner.attn.begin_step(meta)
        hidden = runner.model(torch.tensor(ids), meta.positions, runner.kv_caches, runner.attn)
        return runner.model.compute_logits(hidden)


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
