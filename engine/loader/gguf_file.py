"""Load a GGUF file: metadata -> ModelConfig, tensors dequantized (gguf package) and renamed to HF names,
tokenizer and chat template from the metadata. No conversion step for the user, no transformers at run time.

Mixture-of-experts files (qwen3moe, qwen2moe, and Mixtral as llama with experts) hold each layer's experts as
stacked `ffn_{gate,up,down}_exps` tensors; gate and up are joined into transformers 5's `experts.gate_up_proj`.

llama.cpp's converter permutes the rows of Q and K for llama-arch models (its rope pairs adjacent dims; HF's
rotates halves); we undo that here so one HF-layout forward serves both formats. For Gemma 3 it stores every
RMSNorm weight as 1 + w; we hand the model HF's w (as transformers' GGUF loader does).

Metadata is parsed by our own reader (gguf_reader.py: ~40x faster than gguf.GGUFReader on a 262k-token
vocabulary); tensors are dequantized by the `gguf` package, Q8_0 by a torch equivalent (same numbers, ~4x faster
on the 167M-element Gemma 3 embedding).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from kubellm.engine.model_config import ROPE_FREQ_FACTORS, ModelConfig, UnsupportedModelError, gemma3_layer_types
from kubellm.prompt import TokenizerInfo

from .errors import ModelLoadError
from .gguf_reader import GGUFFile, GGUFTensor
from .gguf_tokenizer import GEMMA_CHAT_TEMPLATE, GGUFVocab, build_tokenizer_json
from .loaded import LoadedModel

GGUF_MAGIC = b"GGUF"
# general.architecture -> HF architecture; arches whose Q/K llama.cpp permuted are listed in _PERMUTED.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
}
# llama.cpp writes Mixtral as "llama" with experts; whether top-k weights are renormalised is fixed per arch there
# (unless the file says, as newer converters do with expert_weights_norm).
_MOE_ARCHITECTURES = {"llama": "MixtralForCausalLM"}
_MOE_RENORMALIZE = {"llama": True, "qwen3moe": True, "qwen2moe": False}
_PERMUTED = {"llama", "mistral"}
_NORM_PLUS_ONE = {"gemma3"}  # arches whose norm weights llama.cpp stores as 1 + w
# Gemma 3's chat turns end with <end_of_turn>: an end of generation as in its generation_config.json
# (eos_token_id [1, 106]) and llama.cpp's vocab, though the GGUF names only <eos>.
_EXTRA_EOS = {"gemma3": ("<end_of_turn>",)}
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
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Stacked experts: gate and up ([E, I, H] each) become halves of gate_up_proj [E, 2I, H]; down is down_proj.
_STACKED_EXPERTS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
# Gemma 3's sandwich norms: ffn_norm is the pre-feed-forward norm there, not Llama's post-attention norm.
_GEMMA3_BLOCK = _BLOCK | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_MAPS = {"gemma3": _GEMMA3_BLOCK}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def is_gguf_file(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    block = _BLOCK_MAPS.get(arch, _BLOCK)
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in block:
        return f"model.layers.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K row permutation: per head, rows (pairs interleaved) -> (halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class _Metadata:
    def __init__(self, reader: GGUFFile, source: str):
        self.reader, self.source = reader, source

    def get(self, key: str, default: Any = None) -> Any:
        value = self.reader.fields.get(key)
        return default if value is None else value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self.source}: GGUF metadata lacks {key!r}")
        return value


def open_reader(path: Path) -> GGUFFile:
    try:
        reader = GGUFFile(path)
    except Exception as e:  # GGUFFormatError, or OS/struct errors on malformed files
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
    if arch in _EXTRA_EOS:
        tokens = meta.get("tokenizer.ggml.tokens") or []
        for text in _EXTRA_EOS[arch]:
            if text in tokens and tokens.index(text) not in eos_ids:
                eos_ids.append(tokens.index(text))
    extra = _gemma3_fields(meta, arch, hidden, heads) if arch == "gemma3" else _moe_fields(meta, arch, tensor_names)
    architecture = _ARCHITECTURES[arch]
    if extra.get("num_experts") and arch in _MOE_ARCHITECTURES:
        architecture = _MOE_ARCHITECTURES[arch]
    return ModelConfig(
        architecture=architecture,
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
        **extra,
    )


def _moe_fields(meta: _Metadata, arch: str, tensor_names: set[str]) -> dict[str, Any]:
    """Expert counts and widths from the metadata; which layers are sparse from the tensors (a layer with a router
    `ffn_gate_inp` is), so dense layers among sparse ones need no key of their own."""
    experts = int(meta.get(f"{arch}.expert_count") or 0)
    if not experts:
        return {}
    if arch not in _MOE_RENORMALIZE:
        raise UnsupportedModelError(f"{meta.source}: GGUF architecture {arch!r} with experts is not supported")
    layers = int(meta.require(f"{arch}.block_count"))
    width = meta.get(f"{arch}.expert_feed_forward_length") or meta.require(f"{arch}.feed_forward_length")
    shared = int(meta.get(f"{arch}.expert_shared_feed_forward_length") or 0)
    norm = meta.get(f"{arch}.expert_weights_norm")
    return {
        "num_experts": experts,
        "num_experts_per_tok": int(meta.require(f"{arch}.expert_used_count")),
        "moe_intermediate_size": int(width),
        "norm_topk_prob": bool(norm) if norm is not None else _MOE_RENORMALIZE[arch],
        "shared_expert_intermediate_size": shared,
        "shared_expert_gated": shared > 0 and any(n.endswith(".ffn_gate_inp_shexp.weight") for n in tensor_names),
        "mlp_only_layers": [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names],
    }


def _gemma3_fields(meta: _Metadata, arch: str, hidden: int, heads: int) -> dict[str, Any]:
    """What Gemma 3's GGUF leaves implicit, as llama.cpp fills it in: which layers slide (every 6th is global,
    unless the file lists them), the local rope base (10k), and the attention scale (head_dim, except the 27B
    model's hidden/heads)."""
    layers = int(meta.require(f"{arch}.block_count"))
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer llama.cpp: one flag per layer, true = sliding
        if len(pattern) != layers:
            raise ModelLoadError(f"{meta.source}: sliding_window_pattern lists {len(pattern)} layers, not {layers}")
        layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        layer_types = gemma3_layer_types(layers, int(pattern) if pattern else 6)
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    window = meta.get(f"{arch}.attention.sliding_window")
    return {
        "layer_types": layer_types,
        "sliding_window": int(window) if window else None,
        "hidden_act": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": float(hidden // heads if layers == 62 else head_dim),
        "rope_local_theta": float(meta.get(f"{arch}.rope.freq_base_swa", 10_000.0)),
    }


def dequantize_tensor(t: GGUFTensor) -> torch.Tensor:
    """A GGUF tensor as float32 [numpy dimension order], a fresh writable tensor."""
    if t.tensor_type == GGMLQuantizationType.Q8_0:
        # blocks of 34 bytes: float16 scale d, 32 int8 values q -> d * q (what gguf.quants computes, in torch)
        blocks = torch.from_numpy(np.array(t.data, copy=True).reshape(-1, 34))
        scale = blocks[:, :2].contiguous().view(torch.float16).float()
        values = blocks[:, 2:].contiguous().view(torch.int8).float()
        return values.mul_(scale).reshape(*t.data.shape[:-1], t.data.shape[-1] // 34 * 32)
    array = dequantize(t.data, t.tensor_type)
    if not array.flags.writeable or array.dtype != np.float32:  # f32 tensors come back as read-only mmap views
        array = array.astype(np.float32, copy=True)
    return torch.from_numpy(array)


def read_weights(reader: GGUFFile, arch: str, config: ModelConfig, dtype: torch.dtype, source: str):
    weights: dict[str, torch.Tensor] = {}
    halves: dict[tuple[str, str], torch.Tensor] = {}  # (layer, "gate"|"up") of stacked experts awaiting the other
    for t in reader.tensors:
        m = _BLOCK_RE.match(t.name)
        if m and m.group(2) in _STACKED_EXPERTS:
            layer, part = f"model.layers.{m.group(1)}.mlp.experts", _STACKED_EXPERTS[m.group(2)]
            tensor = _dequantize(t, source).to(dtype)
            if part == "down":
                weights[f"{layer}.down_proj"] = tensor.contiguous()
                continue
            other = halves.pop((layer, "up" if part == "gate" else "gate"), None)
            if other is None:
                halves[(layer, part)] = tensor
                continue
            gate, up = (tensor, other) if part == "gate" else (other, tensor)
            weights[f"{layer}.gate_up_proj"] = torch.cat([gate, up], dim=1)
            continue
        name = hf_tensor_name(t.name, arch)
        if name is None:
            raise ModelLoadError(f"{source}: GGUF tensor {t.name!r} has no place in a {config.architecture}")
        tensor = _dequantize(t, source)
        if name.endswith("shared_expert_gate.weight"):
            tensor = tensor.reshape(1, -1)  # llama.cpp stores the shared expert's gate as a [H] vector
        if arch in _PERMUTED and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads
            tensor = unpermute_rope_rows(tensor, heads)
        if arch in _NORM_PLUS_ONE and t.name.endswith("norm.weight"):
            tensor = tensor - 1.0
        weights[name] = tensor.to(dtype).contiguous()
    if halves:
        (layer, part), _ = next(iter(halves.items()))
        raise ModelLoadError(f"{source}: {layer} has stacked {part} experts but not the matching other half")
    return weights


def _dequantize(t: GGUFTensor, source: str) -> torch.Tensor:
    try:
        return dequantize_tensor(t)
    except Exception as e:
        raise ModelLoadError(f"{source}: cannot dequantize tensor {t.name} ({t.tensor_type.name}): {e}") from e


def read_tokenizer_info(meta: _Metadata, arch: str, config: ModelConfig) -> TokenizerInfo:
    tokens = [str(t) for t in meta.require("tokenizer.ggml.tokens")]
    vocab = GGUFVocab(
        model=str(meta.require("tokenizer.ggml.model")),
        tokens=tokens,
        merges=[str(m) for m in meta.get("tokenizer.ggml.merges", [])],
        token_types=[int(t) for t in meta.get("tokenizer.ggml.token_type", [])],
        unk_token_id=meta.get("tokenizer.ggml.unknown_token_id"),
        scores=[float(s) for s in meta.get("tokenizer.ggml.scores", [])],
        add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix"),
    )

    def token(i: int | None) -> str | None:
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    chat_template = meta.get("tokenizer.chat_template")
    if chat_template is None and arch == "gemma3":
        chat_template = GEMMA_CHAT_TEMPLATE  # GGUFs of the base model carry none; the turn format is Gemma's
    return TokenizerInfo(
        tokenizer_json=build_tokenizer_json(vocab, arch, meta.source),
        chat_template=chat_template,
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
