"""Random-weight models built in memory on the target device, for benchmarks and GPU tests (no download).

Weights are generated when the model asks for them (`RandomWeights` is a lazy Mapping), straight on the
device, so an 8B model never exists twice: not on the host, not as a second copy beside the fused q/k/v and
gate/up tensors the model builds at load time. A word-level tokenizer over made-up words covers the vocabulary,
so the engine detokenizes as it would for a real model.

Each 2-D weight is defined as chunks of CHUNK rows (columns for o_proj/down_proj, the dimensions tensor
parallelism splits), each drawn from its own seed, so a tensor-parallel rank generates only the chunks its slice
needs (`read_slice`) and still gets exactly the numbers of the full tensor. `RandomRecipe` is what a worker
process needs to rebuild the same weights on its own device: no file, nothing pickled but a few numbers.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from kubellm.engine.loader import parse_dtype
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

# Qwen3-30B-A3B (and Qwen3-Coder-30B-A3B-Instruct): 48 layers, every one a mixture of 128 experts, 8 active.
QWEN3_30B_A3B = ModelConfig(
    architecture="Qwen3MoeForCausalLM",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,  # the dense MLP width (no layer is dense in this model)
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=40960,
    qk_norm=True,
    bos_token_id=151643,
    eos_token_ids=[151645],
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=True,
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
    """Hugging Face names and shapes of a Llama-family checkpoint without biases; q/k norms where the config has
    them; sparse layers' experts in transformers 5's stacked layout (fewer, larger tensors to draw)."""
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
        if c.kv_lora_rank:
            shapes.update(_mla_shapes(c, f"{p}.self_attn"))
        else:
            shapes[f"{p}.self_attn.q_proj.weight"] = (c.q_size, c.hidden_size)
            shapes[f"{p}.self_attn.k_proj.weight"] = (c.kv_size, c.hidden_size)
            shapes[f"{p}.self_attn.v_proj.weight"] = (c.kv_size, c.hidden_size)
            shapes[f"{p}.self_attn.o_proj.weight"] = (c.hidden_size, c.q_size)
        if c.qk_norm:
            shapes[f"{p}.self_attn.q_norm.weight"] = (c.head_dim,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (c.head_dim,)
        if c.layer_is_sparse(i):
            shapes.update(_moe_shapes(c, f"{p}.mlp"))
            continue
        shapes[f"{p}.mlp.gate_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[f"{p}.mlp.up_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[f"{p}.mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
    return shapes


def _mla_shapes(c: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """DeepSeek's multi-head latent attention: query (plain, or through q_lora), latent down-projection with the
    rope key, its norm, the per-head up-projection kv_b (nope keys and values), o_proj."""
    h, heads = c.hidden_size, c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if c.q_lora_rank:
        shapes[f"{p}.q_a_proj.weight"] = (c.q_lora_rank, h)
        shapes[f"{p}.q_a_layernorm.weight"] = (c.q_lora_rank,)
        shapes[f"{p}.q_b_proj.weight"] = (heads * qk, c.q_lora_rank)
    else:
        shapes[f"{p}.q_proj.weight"] = (heads * qk, h)
    shapes[f"{p}.kv_a_proj_with_mqa.weight"] = (c.kv_lora_rank + c.qk_rope_head_dim, h)
    shapes[f"{p}.kv_a_layernorm.weight"] = (c.kv_lora_rank,)
    shapes[f"{p}.kv_b_proj.weight"] = (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
    shapes[f"{p}.o_proj.weight"] = (h, heads * c.v_head_dim)
    return shapes


def _moe_shapes(c: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    e, h, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
    shapes = {
        f"{p}.gate.weight": (e, h),
        f"{p}.experts.gate_up_proj": (e, 2 * i, h),
        f"{p}.experts.down_proj": (e, h, i),
    }
    s = c.shared_expert_intermediate_size
    shared = "shared_experts" if c.kv_lora_rank else "shared_expert"  # DeepSeek's name, Qwen2-MoE's
    if s:
        shapes[f"{p}.{shared}.gate_proj.weight"] = (s, h)
        shapes[f"{p}.{shared}.up_proj.weight"] = (s, h)
        shapes[f"{p}.{shared}.down_proj.weight"] = (h, s)
    if c.moe_scoring == "sigmoid":  # DeepSeek-V3's routing bias
        shapes[f"{p}.gate.e_score_correction_bias"] = (e,)
    if c.shared_expert_gated:
        shapes[f"{p}.shared_expert_gate.weight"] = (1, h)
    return shapes


CHUNK = 1024  # rows (or columns) per independently seeded piece of a weight
_COLUMN_CHUNKED = ("o_proj.weight", "down_proj.weight")  # row-parallel layers: split along the input dimension


class RandomWeights(Mapping[str, torch.Tensor]):
    """Seeded normal weights made on access: norms are ones, embeddings N(0, embed_std), the rest N(0, std).
    The same (seed, name) gives the same tensor on the same device type; the CPU and CUDA streams differ."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        seed: int = 0,
        std: float = 0.02,
        embed_std: float = 0.02,
    ):
        self.config = config
        self.shapes = weight_shapes(config)
        self.dtype, self.device, self.seed = dtype, torch.device(device), seed
        self.std, self.embed_std = std, embed_std

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]  # KeyError for names the model does not have
        dim = chunk_dim(name, shape)
        return self.read_slice(name, dim, 0, shape[dim])

    def __contains__(self, name: object) -> bool:  # Mapping's default would draw the tensor to find out
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """[start, stop) along `dim`: only the chunks it overlaps are drawn when `dim` is the chunked one."""
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype, device=self.device).narrow(dim, start, stop - start)
        along = chunk_dim(name, shape)
        if dim != along:  # not how tensor parallelism splits this weight: draw it whole, then cut
            return self.read_slice(name, along, 0, shape[along]).narrow(dim, start, stop - start).clone()
        out_shape = list(shape)
        out_shape[dim] = stop - start
        out = torch.empty(out_shape, dtype=self.dtype, device=self.device)
        for k in range(start // CHUNK, -(-stop // CHUNK)):
            lo, hi = k * CHUNK, min((k + 1) * CHUNK, shape[dim])
            chunk = self.chunk(name, k, hi - lo)
            a, b = max(lo, start), min(hi, stop)
            out.narrow(dim, a - start, b - a).copy_(chunk.narrow(dim, a - lo, b - a))
        return out

    def chunk(self, name: str, k: int, length: int) -> torch.Tensor:
        """Chunk k of weight `name` (`length` rows or columns along its chunk dimension), from its own seed."""
        shape = list(self.shapes[name])
        shape[chunk_dim(name, self.shapes[name])] = length
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + zlib.crc32(f"{name}#{k}".encode()))
        std = self.embed_std if "embed_tokens" in name or name == "lm_head.weight" else self.std
        return torch.empty(shape, dtype=self.dtype, device=self.device).normal_(0.0, std, generator=gen)

    def recipe(self, name: str = "random") -> RandomRecipe:
        dtype = str(self.dtype).removeprefix("torch.")
        return RandomRecipe(self.config, dtype, self.device.type, self.seed, self.std, self.embed_std, name)


def chunk_dim(name: str, shape: tuple[int, ...]) -> int:
    """The dimension a weight is drawn in chunks along: columns of the row-parallel layers, rows otherwise (for
    stacked experts [E, ...]: the expert axis, so a tensor-parallel slice of them is drawn whole, then cut)."""
    return 1 if len(shape) == 2 and name.endswith(_COLUMN_CHUNKED) else 0


@dataclass(frozen=True)
class RandomRecipe:
    """How to rebuild a random-weight model in another process (tensor-parallel workers): the same config, dtype,
    seed and scales give the same numbers on the same kind of device (cpu, or cuda of one GPU model)."""

    config: ModelConfig
    dtype: str
    device_type: str  # where the numbers are drawn: "cpu" or "cuda" (each rank draws on its own GPU)
    seed: int = 0
    std: float = 0.02
    embed_std: float = 0.02
    name: str = "random"

    def load(self, device: torch.device) -> LoadedModel:
        """The model, its weights drawn lazily on `device` (whose type must be this recipe's)."""
        if device.type != self.device_type:
            raise ValueError(f"random weights were drawn on {self.device_type}; drawing them on {device} differs")
        return random_loaded_model(
            self.config, parse_dtype(self.dtype), device, self.seed, self.std, self.embed_std, self.name
        )


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
    """A LoadedModel whose weights are generated lazily on `device` as the model runner loads them; its
    `recipe` lets tensor-parallel workers draw the same weights themselves."""
    weights = RandomWeights(config, dtype, device, seed, std, embed_std)
    return LoadedModel(
        config=config,
        weights=weights,  # type: ignore[arg-type]
        tokenizer_info=synthetic_tokenizer_info(config.vocab_size),
        generation_config={},
        name=name,
        path="",
        recipe=weights.recipe(name),
    )
