"""Random-weight models built in memory on the target device, for benchmarks and GPU tests (no download).

Weights are generated when the model asks for them (`RandomWeights` is a lazy Mapping), straight on the
device, so an 8B model never exists twice: not on the host, not as a second copy beside the fused q/k/v and
gate/up tensors the model builds at load time. A word-level tokenizer over made-up words covers the vocabulary,
so the engine detokenizes as it would for a real model.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from kubellm.engine.loader.loaded import LoadedModel
from kubellm.engine.model_config import ModelConfig
from kubellm.prompt import TokenizerInfo

LLAMA_3_1_8B = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    max_position_embeddings=131072,
    bos_token_id=128000,
    eos_token_ids=[128001, 128008, 128009],
)

SMOLLM2_135M = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_ids=[2],
)


def weight_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face names and shapes of a Llama-family checkpoint without biases or q/k norms."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (c.hidden_size,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (c.hidden_size,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (c.q_size, c.hidden_size)
        shapes[f"{p}.self_attn.k_proj.weight"] = (c.kv_size, c.hidden_size)
        shapes[f"{p}.self_attn.v_proj.weight"] = (c.kv_size, c.hidden_size)
        shapes[f"{p}.self_attn.o_proj.weight"] = (c.hidden_size, c.q_size)
        shapes[f"{p}.mlp.gate_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[f"{p}.mlp.up_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[f"{p}.mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
    return shapes


class RandomWeights(Mapping[str, torch.Tensor]):
    """Seeded normal weights made on access: norms are ones, embeddings N(0, embed_std), the rest N(0, std).
    The same (seed, name) gives the same tensor on the same device; the CPU and CUDA streams differ."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        seed: int = 0,
        std: float = 0.02,
        embed_std: float = 0.02,
    ):
        self.shapes = weight_shapes(config)
        self.dtype, self.device, self.seed = dtype, torch.device(device), seed
        self.std, self.embed_std = std, embed_std

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]  # KeyError for names the model does not have
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        std = self.embed_std if "embed_tokens" in name or name == "lm_head.weight" else self.std
        return torch.empty(shape, dtype=self.dtype, device=self.device).normal_(0.0, std, generator=gen)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def synthetic_tokenizer_info(vocab_size: int) -> TokenizerInfo:
    """A word-level tokenizer with one made-up word per id ("t0", "t1", ...); id 1 is BOS and id 2 is EOS."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TokenizerInfo(tokenizer_json=tok.to_str(), bos_token="t1", eos_token="t2")


def random_loaded_model(
    config: ModelConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    seed: int = 0,
    std: float = 0.02,
    embed_std: float = 0.02,
    name: str = "random",
) -> LoadedModel:
    """A LoadedModel whose weights are generated lazily on `device` as the model runner loads them."""
    return LoadedModel(
        config=config,
        weights=RandomWeights(config, dtype, device, seed, std, embed_std),  # type: ignore[arg-type]
        tokenizer_info=synthetic_tokenizer_info(config.vocab_size),
        generation_config={},
        name=name,
        path="",
    )
