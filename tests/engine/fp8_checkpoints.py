"""Write a tiny saved checkpoint again in an FP8 format, in the format's published tensor layout, plus the same
model with the dequantized weights (what transformers loads as the reference).

The quantization math here is the test's own (amax / 448 per tensor, row or block), independent of the engine's.
Layouts, as vLLM / HF / compressed-tensors read them:
- fp8: `weight` F8_E4M3 and `weight_scale` F32 [] per tensor, or `weight_scale_inv` F32 [ceil(N/bn), ceil(K/bk)]
  with `weight_block_size` [bn, bk]; static activations add `input_scale` F32 []; an FP8 KV cache adds
  `self_attn.k_scale` / `v_scale` F32 [] (kv_cache_scheme).
- compressed-tensors (format float-quantized): `weight` F8_E4M3 and `weight_scale` F32 [1] per tensor or [N, 1]
  per channel; static activations add `input_scale` F32 [1]. (Written by hand: PyPI `compressed-tensors` writes
  these only after a calibration flow that needs llm-compressor; the shapes follow its initialize.py.)
Layer 0's MLP and the LM head stay unquantized (listed as ignored), as real checkpoints leave some layers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMATS = ("fp8-tensor", "fp8-block", "fp8-static", "ct-tensor", "ct-channel", "ct-static")
E4M3_MAX = 448.0
BLOCK = (32, 32)  # small blocks so the tiny models' weights span several, the last ones partial
# every projection, DeepSeek's MLA ones (q_a_proj, kv_a_proj_with_mqa, kv_b_proj, ...) included; not the router
_LINEAR = re.compile(r"\.(\w+_proj(?:_with_mqa)?)\.weight$")
_IGNORED_PREFIX = "model.layers.0.mlp."


def _quantize(
    w: torch.Tensor, strategy: str, block: tuple[int, int] = BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale in the layout's shape, dequantized float32 weight)."""
    w = w.float()
    if strategy == "tensor":
        scale = w.abs().max() / E4M3_MAX
        full = scale
    elif strategy == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX  # [N, 1]
        full = scale
    else:
        bn, bk = block
        n, k = w.shape
        rows, cols = -(-n // bn), -(-k // bk)
        scale = torch.empty(rows, cols)
        for i in range(rows):
            for j in range(cols):
                scale[i, j] = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].abs().max() / E4M3_MAX
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    q = (w / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def write_fp8_checkpoint(
    src: Path, dst: Path, fmt: str, reference: Path, kv_scales: bool = False, block: tuple[int, int] = BLOCK
) -> None:
    """`src` (a saved tiny model) -> `dst` in `fmt`, and `reference`: `src` with every quantized weight replaced
    by its dequantized value (float32). `kv_scales`: also write per-layer k_scale/v_scale (fp8 formats); `block`:
    the fp8-block format's (bn, bk)."""
    for out in (dst, reference):
        shutil.copytree(src, out)
    tensors = load_file(str(src / "model.safetensors"))
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    strategy = {"fp8-block": "block", "ct-channel": "channel"}.get(fmt, "tensor")
    gen = torch.Generator().manual_seed(3)
    for name, tensor in tensors.items():
        if not _LINEAR.search(name) or name.startswith(_IGNORED_PREFIX):
            quantized[name] = dequantized[name] = tensor
            continue
        q, scale, deq = _quantize(tensor, strategy, block)
        module = name.removesuffix(".weight")
        quantized[name], dequantized[name] = q, deq
        if fmt.startswith("fp8"):
            if strategy == "block":
                quantized[f"{module}.weight_scale_inv"] = scale
            else:
                quantized[f"{module}.weight_scale"] = scale.reshape(())
            if fmt == "fp8-static":
                quantized[f"{module}.input_scale"] = (0.01 + torch.rand((), generator=gen) * 0.02).reshape(())
        else:
            quantized[f"{module}.weight_scale"] = scale.reshape(-1, 1) if strategy == "channel" else scale.reshape(1)
            if fmt == "ct-static":
                quantized[f"{module}.input_scale"] = 0.01 + torch.rand(1, generator=gen) * 0.02
    config = json.loads((src / "config.json").read_text())
    if kv_scales:
        for i in range(config["num_hidden_layers"]):
            for kv in ("k_scale", "v_scale"):
                quantized[f"model.layers.{i}.self_attn.{kv}"] = torch.tensor(0.05 + 0.01 * i)
    save_file(quantized, str(dst / "model.safetensors"), metadata={"format": "pt"})
    save_file(dequantized, str(reference / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = _quantization_config(fmt, kv_scales, block)
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def _quantization_config(fmt: str, kv_scales: bool, block: tuple[int, int]) -> dict:
    ignored = ["lm_head", "model.layers.0.mlp"]
    if fmt.startswith("fp8"):
        config: dict = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "static" if fmt == "fp8-static" else "dynamic",
            "modules_to_not_convert": ignored,
        }
        if fmt == "fp8-block":
            config["weight_block_size"] = list(block)
        if kv_scales:
            config["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
        return config
    static = fmt == "ct-static"
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": ignored,
        "kv_cache_scheme": None,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": True,
                    "dynamic": False,
                    "strategy": "channel" if fmt == "ct-channel" else "tensor",
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": True,
                    "dynamic": not static,
                    "strategy": "tensor" if static else "token",
                },
            }
        },
    }


def online_fp8_reference(src: Path, reference: Path) -> Path:
    """`src` with the weights `--quantization fp8` computes with, by vLLM's online scheme: each fused GEMM (q/k/v,
    gate/up, an expert's gate/up) and each other projection rounded through FP8 with one scale (amax / 448)."""
    shutil.copytree(src, reference)
    tensors = load_file(str(src / "model.safetensors"))
    groups: dict[str, list[str]] = {}
    for name in tensors:
        m = _LINEAR.search(name)
        if not m or m.group(1) == "kv_b_proj":  # DeepSeek's kv_b_proj is absorbed into attention: not quantized
            continue
        module = name[: m.start()]
        fused = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
        groups.setdefault(f"{module}.{fused.get(m.group(1), m.group(1))}", []).append(name)
    out = dict(tensors)
    for names in groups.values():
        joined = torch.cat([tensors[n].float() for n in names])
        _, _, deq = _quantize(joined, "tensor")
        for n, part in zip(names, deq.split([tensors[n].shape[0] for n in names]), strict=True):
            out[n] = part.contiguous()
    save_file(out, str(reference / "model.safetensors"), metadata={"format": "pt"})
    return reference
