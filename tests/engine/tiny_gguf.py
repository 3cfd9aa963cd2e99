"""Write tiny random HF checkpoints as GGUF files the way llama.cpp's converter does (F32 tensors, Q/K rows
permuted for llama-arch rope, SmolLM2's byte-level BPE vocabulary), so GGUF loading of Llama, Qwen2 and
Qwen3 can be checked against transformers' own GGUF loader, and that of the MoE models (stacked `ffn_*_exps`
experts) against the same checkpoint's safetensors. Test-only."""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np
import torch

_GGUF_ARCH = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3-moe": "qwen3moe", "qwen2-moe": "qwen2moe",
    "mixtral": "llama",
}  # fmt: skip
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF->GGUF Q/K row permutation (rotate-half pairs -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str, block_names: dict[str, str] = _BLOCK_NAMES) -> str:
    """llama.cpp's tensor name for an HF one; `block_names` maps a block's module path (Gemma's has more norms)."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in top:
        return top[hf]
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.{i}.{module...}.{weight|bias}
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{block_names[module]}.{parts[-1]}"


def add_shape(w: gguf.GGUFWriter, c, head_dim: int) -> None:
    """The model-shape metadata every architecture's GGUF carries, from an HF config."""
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)


def shrink_vocab(tokens: list[str], merges: list[str], types: list[int], size: int):
    """The first `size` tokens of a byte-level BPE vocabulary and the merges that stay inside it: still a valid
    BPE (every byte symbol sits in the first few hundred ids), and fast to load."""
    kept = set(tokens[:size])
    inside = []
    for m in merges:
        a, b = m.split(" ", 1)
        if a in kept and b in kept and a + b in kept:
            inside.append(m)
    return tokens[:size], inside, types[:size]


def gguf_tensors(name: str, arr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """llama.cpp's tensor(s) for one HF tensor of a model's state_dict (transformers 5 stacks experts:
    gate_up_proj [E, 2I, H] becomes ffn_gate_exps and ffn_up_exps [E, I, H]; the shared expert's gate a vector)."""
    if name.endswith(".experts.gate_up_proj"):
        blk = f"blk.{name.split('.')[2]}"
        gate, up = np.split(arr, 2, axis=1)
        return [(f"{blk}.ffn_gate_exps.weight", gate.copy()), (f"{blk}.ffn_up_exps.weight", up.copy())]
    if name.endswith(".experts.down_proj"):
        return [(f"blk.{name.split('.')[2]}.ffn_down_exps.weight", arr)]
    if name.endswith("shared_expert_gate.weight"):
        return [(gguf_name(name), arr.reshape(-1))]
    return [(gguf_name(name), arr)]


def add_experts(w: gguf.GGUFWriter, c) -> None:
    """MoE metadata as llama.cpp's converter writes it."""
    experts = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None)
    if not experts:
        return
    w.add_expert_count(experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    if getattr(c, "moe_intermediate_size", None):
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if getattr(c, "shared_expert_intermediate_size", None):
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)


@functools.cache
def source_vocab(path: str) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of a GGUF's byte-level BPE vocabulary, read once per file (~10 s for SmolLM2's)."""
    fields = gguf.GGUFReader(path).fields
    return tuple(fields[f"tokenizer.ggml.{key}"].contents() for key in ("tokens", "merges", "token_type"))  # type: ignore[return-value]


def write_tiny_gguf(kind: str, hf_config, state: dict[str, torch.Tensor], vocab_source: Path, out: Path) -> Path:
    arch = _GGUF_ARCH[kind]
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(out), arch)
    add_shape(w, c, head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    add_experts(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(arch)
    tokens, merges, types = shrink_vocab(*source_vocab(str(vocab_source)), c.vocab_size)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{{ messages[0]['content'] }}")
    for name, tensor in state.items():
        arr = tensor.detach().float().numpy().copy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            arr = llama_cpp_permute(arr, heads)
        for gguf_tensor, part in gguf_tensors(name, arr):
            w.add_tensor(gguf_tensor, part)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
