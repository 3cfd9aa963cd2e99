"""Load a GGUF file: metadata -> ModelConfig, tensors dequantized (gguf package) and renamed to HF names,
tokenizer and chat template from the metadata. No conversion step for the user, no transformers at run time.

llama.cpp's converter permutes the rows of Q and K for llama-arch models (its rope pairs adjacent dims; HF's
rotates halves); we undo that here so one HF-layout forward serves both formats.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from kubellm.engine.model_config import ModelConfig, UnsupportedModelError
from kubellm.engine.models.llama import ROPE_FREQ_FACTORS
from kubellm.prompt import TokenizerInfo

from .errors import ModelLoadError
from .gguf_tokenizer import GGUFVocab, build_tokenizer_json
from .loaded import LoadedModel

GGUF_MAGIC = b"GGUF"
# general.architecture -> HF architecture; arches whose Q/K llama.cpp permuted are listed in _PERMUTED.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_PERMUTED = {"llama", "mistral"}
_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": ROPE_FREQ_FACTORS,
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def is_gguf_file(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def hf_tensor_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K row permutation: per head, rows (pairs interleaved) -> (halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class _Metadata:
    def __init__(self, reader: GGUFReader, source: str):
        self.reader, self.source = reader, source

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self.source}: GGUF metadata lacks {key!r}")
        return value


def open_reader(path: Path) -> GGUFReader:
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on malformed files
        raise ModelLoadError(f"corrupt or truncated GGUF file {path}: {e}") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise ModelLoadError(f"truncated GGUF file {path}: tensor {t.name} runs past the end of the file")
    return reader


def gguf_model_config(meta: _Metadata, tensor_names: set[str], vocab_size: int) -> ModelConfig:
    arch = str(meta.require("general.architecture"))
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r} in {meta.source}; kubellm supports GGUF architectures: "
            f"{', '.join(_ARCHITECTURES)}"
        )
    heads = int(meta.require(f"{arch}.attention.head_count"))
    hidden = int(meta.require(f"{arch}.embedding_length"))
    rope_scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type and scaling_type != "none":
        rope_scaling = {"rope_type": str(scaling_type), "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            rope_scaling["original_max_position_embeddings"] = int(original)
    bias = "blk.0.attn_q.bias" in tensor_names
    eos_ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in eos_ids:
            eos_ids.append(int(value))
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        vocab_size=int(meta.get(f"{arch}.vocab_size") or vocab_size),
        hidden_size=hidden,
        intermediate_size=int(meta.require(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(meta.require(f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=bias,
        attention_out_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
    )


def read_weights(reader: GGUFReader, arch: str, config: ModelConfig, dtype: torch.dtype, source: str):
    weights: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            raise ModelLoadError(f"{source}: GGUF tensor {t.name!r} has no place in a {config.architecture}")
        try:
            array = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"{source}: cannot dequantize tensor {t.name} ({t.tensor_type.name}): {e}") from e
        if not array.flags.writeable or array.dtype != np.float32:  # f32 tensors come back as read-only mmap views
            array = array.astype(np.float32, copy=True)
        tensor = torch.from_numpy(array)
        if arch in _PERMUTED and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads
            tensor = unpermute_rope_rows(tensor, heads)
        weights[name] = tensor.to(dtype).contiguous()
    return weights


def read_tokenizer_info(meta: _Metadata, arch: str, config: ModelConfig) -> TokenizerInfo:
    tokens = [str(t) for t in meta.require("tokenizer.ggml.tokens")]
    vocab = GGUFVocab(
        model=str(meta.require("tokenizer.ggml.model")),
        tokens=tokens,
        merges=[str(m) for m in meta.get("tokenizer.ggml.merges", [])],
        token_types=[int(t) for t in meta.get("tokenizer.ggml.token_type", [])],
        unk_token_id=meta.get("tokenizer.ggml.unknown_token_id"),
    )

    def token(i: int | None) -> str | None:
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    return TokenizerInfo(
        tokenizer_json=build_tokenizer_json(vocab, arch, meta.source),
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=token(config.bos_token_id),
        eos_token=token(config.eos_token_ids[0] if config.eos_token_ids else None),
        add_bos_token=bool(add_bos) if add_bos is not None else vocab.model == "llama",
        model_max_length=config.max_position_embeddings,
    )


def load_gguf(path: Path, dtype: torch.dtype, name: str, load_weights: bool = True) -> LoadedModel:
    reader = open_reader(path)
    meta = _Metadata(reader, str(path))
    names = {t.name for t in reader.tensors}
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config = gguf_model_config(meta, names, len(tokens))
    arch = str(meta.require("general.architecture"))
    tokenizer_info = read_tokenizer_info(meta, arch, config)
    weights = read_weights(reader, arch, config, dtype, str(path)) if load_weights else {}
    return LoadedModel(config, weights, tokenizer_info, generation_config={}, name=name, path=str(path))
