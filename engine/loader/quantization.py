"""Which FP8 format a checkpoint is in (`quantization_config` of config.json, or `--quantization fp8`), and the
FP8 arithmetic of the checkpoint formats: dequantize a (possibly stacked) weight with its scales, store K/V as FP8.
Weight quantization (`--quantization fp8`) is models/fp8_gemm.quantize_weight_fp8.

Formats read (tensor names are the HF module's, e.g. `model.layers.0.self_attn.q_proj`):
- `fp8` (vLLM/HF, DeepSeek-V3, Qwen3-*-FP8): `weight` float8_e4m3fn with a per-tensor `weight_scale`, or with
  `weight_block_size` [bn, bk] a `weight_scale_inv` [ceil(N/bn), ceil(K/bk)] (despite its name a multiplier);
  `activation_scheme` dynamic, or static with an `input_scale` per layer.
- `compressed-tensors`, float-quantized FP8: `weight` float8_e4m3fn with `weight_scale` per tensor ([1]), per
  channel ([N, 1]) or per 128x128 block; activations dynamic per token, or static per tensor (`input_scale`).

Which layers are FP8 is read from each weight's dtype (an ignored / not-converted layer is stored in bf16), so
the config's ignore lists need no matching here. Anything else is refused at start, naming the method or variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kubellm.engine.model_config import UnsupportedModelError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
QUANTIZATION_METHODS = ("fp8",)  # what --quantization takes (online, from a bf16/fp32 checkpoint)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # --kv-cache-dtype: auto keeps the model dtype
# --calculate-kv-scales: K and V scales are amax / these (vLLM's constants: headroom for larger activations than
# the calibration text's), from a forward over KV_CALIBRATION_TEXT.
K_SCALE_DIVISOR, V_SCALE_DIVISOR = 200.0, 100.0
KV_CALIBRATION_TEXT = (
    "The weather report for the coming week promised rain on Monday and sunshine after that. Maria read it twice, "
    "then decided to move the garden party to Saturday. She wrote to her friends: 'Bring something to share - "
    "bread, fruit, a salad, or your famous lemon cake! We start at 3 pm.' In the meantime, she counted the chairs "
    "(there were 24), fixed the gate, and asked why the neighbour's dog barked at 7:15 every morning."
)
# Checkpoint tensors that are scales of another tensor, never parameters of their own.
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".input_scale", ".k_scale", ".v_scale", ".kv_scale")


class UnsupportedQuantizationError(UnsupportedModelError):
    """A quantization method or variant kubellm cannot run; the message names it."""


@dataclass(frozen=True)
class Fp8Scheme:
    """How a checkpoint's FP8 linear weights are scaled, and how activations are quantized on the GPU."""

    method: str  # "fp8", "compressed-tensors", or "online" (--quantization fp8 over a bf16 checkpoint)
    weight_strategy: str  # "tensor", "channel" or "block"
    activation: str  # "dynamic" or "static"
    block_size: tuple[int, int] | None = None  # (bn, bk) when weight_strategy is "block"

    @property
    def scale_suffix(self) -> str:
        return "weight_scale_inv" if self.method == "fp8" and self.weight_strategy == "block" else "weight_scale"

    def describe(self) -> str:
        block = f" {self.block_size[0]}x{self.block_size[1]}" if self.block_size else ""
        return f"{self.method} FP8 ({self.weight_strategy}{block} weight scales, {self.activation} activations)"


ONLINE_FP8 = Fp8Scheme("online", "tensor", "dynamic")


def parse_quantization_config(config: Any, source: str) -> Fp8Scheme | None:
    """config.json's `quantization_config` (None: an unquantized checkpoint) -> the FP8 scheme, or a refusal
    naming what is not supported."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise UnsupportedQuantizationError(f"{source}: quantization_config is not an object")
    method = str(config.get("quant_method", "")).lower()
    if method == "fp8":
        return _parse_fp8(config, source)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(config, source)
    raise UnsupportedQuantizationError(
        f"{source}: quantization method {config.get('quant_method')!r} is not supported; kubellm loads "
        "'fp8' and 'compressed-tensors' FP8 checkpoints (or a bf16 checkpoint with --quantization fp8)"
    )


def resolve_scheme(checkpoint: Fp8Scheme | None, quantization: str | None, source: str) -> Fp8Scheme | None:
    """The scheme to run: the checkpoint's, or online FP8 when `--quantization fp8` is asked of an unquantized one."""
    if quantization in (None, "", "none"):
        return checkpoint
    if quantization not in QUANTIZATION_METHODS:
        raise UnsupportedQuantizationError(
            f"--quantization {quantization!r} is not supported; choose one of: {', '.join(QUANTIZATION_METHODS)}"
        )
    if checkpoint is None:
        return ONLINE_FP8
    if checkpoint.method == "fp8":
        return checkpoint  # as vLLM: --quantization fp8 over an fp8 checkpoint reads the checkpoint's scales
    raise UnsupportedQuantizationError(
        f"{source}: --quantization {quantization} contradicts the checkpoint's own {checkpoint.method} "
        "quantization; leave --quantization unset to load it"
    )


def _parse_fp8(config: dict[str, Any], source: str) -> Fp8Scheme:
    fmt = str(config.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise UnsupportedQuantizationError(f"{source}: fp8 format {fmt!r} is not supported (only e4m3)")
    activation = str(config.get("activation_scheme", "dynamic")).lower()
    if activation not in ("dynamic", "static"):
        raise UnsupportedQuantizationError(f"{source}: fp8 activation_scheme {activation!r} is not supported")
    block = config.get("weight_block_size")
    if block is None:
        return Fp8Scheme("fp8", "tensor", activation)
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise UnsupportedQuantizationError(f"{source}: fp8 weight_block_size {block!r} is not two positive integers")
    if activation == "static":
        raise UnsupportedQuantizationError(f"{source}: fp8 block weights with static activations are not supported")
    return Fp8Scheme("fp8", "block", "dynamic", (int(block[0]), int(block[1])))


def _parse_compressed_tensors(config: dict[str, Any], source: str) -> Fp8Scheme:
    fmt = config.get("format")
    if fmt not in ("float-quantized", "naive-quantized", None):
        raise UnsupportedQuantizationError(
            f"{source}: compressed-tensors format {fmt!r} is not supported (FP8 'float-quantized' only)"
        )
    groups = config.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise UnsupportedQuantizationError(f"{source}: compressed-tensors quantization_config has no config_groups")
    schemes = {_parse_ct_group(name, group, source) for name, group in groups.items()}
    if len(schemes) > 1:
        raise UnsupportedQuantizationError(
            f"{source}: compressed-tensors config_groups mix schemes ({'; '.join(s.describe() for s in schemes)})"
        )
    return schemes.pop()


def _parse_ct_group(name: str, group: Any, source: str) -> Fp8Scheme:
    where = f"{source}: compressed-tensors group {name!r}"
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise UnsupportedQuantizationError(f"{where} has no weights scheme")
    w, a = group["weights"], group.get("input_activations")
    if (w.get("num_bits"), w.get("type")) != (8, "float"):
        raise UnsupportedQuantizationError(
            f"{where}: {w.get('num_bits')}-bit {w.get('type')} weights are not supported (FP8 only: 8-bit float)"
        )
    strategy = w.get("strategy")
    if strategy not in ("tensor", "channel", "block") or w.get("dynamic") or not w.get("symmetric", True):
        raise UnsupportedQuantizationError(
            f"{where}: weight strategy {strategy!r} (dynamic={w.get('dynamic')}, symmetric={w.get('symmetric')}) "
            "is not supported; FP8 weights per tensor, channel or block, static and symmetric"
        )
    block = None
    if strategy == "block":
        structure = w.get("block_structure")
        if not (isinstance(structure, list) and len(structure) == 2):
            raise UnsupportedQuantizationError(f"{where}: block weights without a [rows, cols] block_structure")
        block = (int(structure[0]), int(structure[1]))
    if not isinstance(a, dict):
        raise UnsupportedQuantizationError(
            f"{where}: weight-only FP8 (no input_activations) is not supported; FP8 weights with FP8 activations"
        )
    if (a.get("num_bits"), a.get("type")) != (8, "float"):
        raise UnsupportedQuantizationError(f"{where}: {a.get('num_bits')}-bit {a.get('type')} activations")
    if a.get("dynamic") and a.get("strategy") in ("token", "tensor"):
        activation = "dynamic"
    elif not a.get("dynamic") and a.get("strategy") == "tensor":
        activation = "static"
    else:
        raise UnsupportedQuantizationError(
            f"{where}: activation strategy {a.get('strategy')!r} (dynamic={a.get('dynamic')}) is not supported; "
            "dynamic per token or static per tensor"
        )
    if block is not None and activation == "static":
        raise UnsupportedQuantizationError(f"{where}: block-wise weights with static activations are not supported")
    return Fp8Scheme("compressed-tensors", strategy, activation, block)


def kv_cache_scheme_is_fp8(config: Any) -> bool:
    """Whether a quantization_config declares an FP8 KV cache (its checkpoint then carries k_scale/v_scale)."""
    if not isinstance(config, dict):
        return False
    kv = config.get("kv_cache_scheme")
    return isinstance(kv, dict) and (kv.get("num_bits"), kv.get("type")) == (8, "float")


# ---- arithmetic ------------------------------------------------------------------------------------------------


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None = None) -> torch.Tensor:
    """FP8 `weight` [..., N, K] times its scale -> float32. `scale`: one number (per tensor), [N] / [N, 1] (per
    channel), or [..., ceil(N/bn), ceil(K/bk)] with `block_size` (bn, bk) (per block; the last block of a row or
    column may be partial)."""
    w = weight.float()
    s = scale.float()
    if block_size is not None:
        bn, bk = block_size
        n, k = w.shape[-2:]
        expected = (math.ceil(n / bn), math.ceil(k / bk))
        if tuple(s.shape[-2:]) != expected:
            raise ValueError(f"block scales have shape {tuple(s.shape)}; a {n}x{k} weight in {bn}x{bk} blocks needs "
                             f"{expected}")  # fmt: skip
        full = s.repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)
        return w * full[..., :n, :k]
    if s.numel() == 1:
        return w * s.reshape(())
    if s.numel() == w.shape[-2] * math.prod(w.shape[:-2]):  # per output channel (per expert too)
        return w * s.reshape(*w.shape[:-1], 1)
    raise ValueError(f"scale of shape {tuple(s.shape)} fits neither per-tensor nor per-channel of {tuple(w.shape)}")


def to_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale in float8_e4m3fn, saturated at +-448 (a plain cast would turn larger values into NaN)."""
    scaled = x if scale == 1.0 else x / scale
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
