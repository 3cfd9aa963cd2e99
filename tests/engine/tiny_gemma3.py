"""Tiny random Gemma 3 checkpoints: a Hugging Face directory (safetensors, config.json) and a GGUF file written as
llama.cpp's converter writes Gemma 3 (norm weights stored as 1 + w, no Q/K permutation, Q8_0 embedding, the real
Gemma SentencePiece vocabulary cut to its first tokens). transformers is the reference for both. Test-only."""

from __future__ import annotations

from pathlib import Path

import gguf
import torch
from tiny_gguf import add_shape, gguf_name

from kubellm.engine.loader.gguf_reader import GGUFFile

_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_gemma3_config(**overrides):
    """A small Gemma3TextConfig; defaults exercise what GGUF can express (head_dim = query_pre_attn_scalar = 256,
    the default every-6th-layer-global pattern, local rope base 10k, an 8-token window)."""
    from transformers import Gemma3TextConfig

    args = dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=8,
        max_position_embeddings=256,
        initializer_range=0.1,
        rms_norm_eps=1e-6,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    args.update(overrides)
    return Gemma3TextConfig(**args)


def random_gemma3(config, seed: int = 0):
    """Gemma3ForCausalLM with random weights, norm weights included (transformers initialises them to 0, i.e. a
    multiplier of exactly 1, which would hide a missing or doubled `1 +`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    return model


def save_tiny_gemma3_dir(model, path: Path) -> Path:
    from tiny_models import tiny_tokenizer
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(path, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer(), bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return path


def write_tiny_gemma3_gguf(model, vocab_source: Path, out: Path) -> Path:
    """`model` (a random Gemma3ForCausalLM) as llama.cpp's converter writes a Gemma 3 GGUF."""
    c = model.config
    src = GGUFFile(vocab_source).fields
    n = c.vocab_size
    w = gguf.GGUFWriter(str(out), "gemma3")
    add_shape(w, c, c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(c.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(src["tokenizer.ggml.tokens"][:n])
    w.add_token_scores(src["tokenizer.ggml.scores"][:n])
    w.add_token_types(src["tokenizer.ggml.token_type"][:n])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied
            continue
        arr = tensor.detach().float().numpy().copy()
        if name.endswith("norm.weight"):
            arr = arr + 1.0  # llama.cpp stores Gemma's (1 + w)
        if name == "model.embed_tokens.weight":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name(name, _BLOCK_NAMES), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name(name, _BLOCK_NAMES), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
