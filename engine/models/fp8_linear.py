"""FP8 linear layers on CUDA: the weight stays float8_e4m3fn on the GPU with its float32 scales, and the GEMM is
models/fp8_gemm.fp8_linear (activations quantized per token, or per tensor with a static scale, inside it).

Fusing: q/k/v and gate/up are one GEMM each here, but an FP8 checkpoint scales each projection on its own. Per
tensor scales of the parts become one per-channel scale vector (each output row keeps its projection's scale:
exact, no requantization); per-channel scales are concatenated; 128x128 block scales are concatenated when every
part's rows are whole blocks (true of the real models), otherwise the layer is dequantized at load instead.
A static input scale is the largest of the parts' (they all scale the same input).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from kubellm.engine.loader.errors import ModelLoadError
from kubellm.engine.loader.fp8_weights import Fp8Tensor

_module: dict[str, ModuleType] = {}


@dataclass
class Fp8Params:
    """What a Linear holding an FP8 weight needs besides the weight: its scales (on the weight's device)."""

    scale: torch.Tensor
    input_scale: torch.Tensor | None
    block_size: tuple[int, int] | None


def gemm_module() -> ModuleType:
    """models/fp8_gemm (its Triton/cuBLAS kernels); a load error naming the cause when it cannot be imported, so a
    GPU without them fails at start, not at the first request."""
    if "gemm" not in _module:
        try:
            _module["gemm"] = importlib.import_module("kubellm.engine.models.fp8_gemm")
        except ImportError as e:
            raise ModelLoadError(f"FP8 weights on CUDA need the FP8 GEMM kernels (models/fp8_gemm.py): {e}") from e
    return _module["gemm"]


def fp8_forward(x: torch.Tensor, weight: torch.Tensor, p: Fp8Params, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (bf16) @ dequantized(weight [N, K]).T + bias, through the FP8 GEMM."""
    lead = x.shape[:-1]
    out = gemm_module().fp8_linear(
        x.reshape(-1, x.shape[-1]), weight, p.scale, block_size=p.block_size, input_scale=p.input_scale,
        out_dtype=x.dtype,
    )  # fmt: skip
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, out.shape[-1])


def fp8_silu_mul_forward(
    gate_up: torch.Tensor, weight: torch.Tensor, p: Fp8Params, bias: torch.Tensor | None
) -> torch.Tensor:
    """The down projection of silu(gate) * up from the fused gate_up output [T, 2I]: where the layer's activation
    quantization is row-local, SiLU-and-mul writes the FP8 input itself (fp8_gemm.silu_mul_fp8_linear)."""
    out = gemm_module().silu_mul_fp8_linear(
        gate_up, weight, p.scale, block_size=p.block_size, input_scale=p.input_scale, out_dtype=gate_up.dtype
    )
    return out if bias is None else out + bias


def hold(module: nn.Module, t: Fp8Tensor) -> None:
    """Make `module` (a Linear or RowParallelLinear) hold FP8 weight `t` and its scales on its weight's device; its
    forward then runs the FP8 GEMM (CUDA: the FP8 GEMM must be importable)."""
    gemm_module()
    device = module.weight.device
    module.weight = nn.Parameter(t.weight.to(device), requires_grad=False)
    input_scale = None if t.input_scale is None else t.input_scale.to(device)
    module.fp8 = Fp8Params(t.scale.to(device), input_scale, t.block_size)


def shard(t: Fp8Tensor, dim: int, rank: int, size: int) -> Fp8Tensor | None:
    """This rank's 1/size of an FP8 weight [N, K] along `dim` (0: output rows, column-parallel; 1: input columns,
    row-parallel) with the scales that go with it; None when block scales do not split at the shard's edges."""
    if size == 1:
        return t
    n = t.weight.shape[dim]
    if n % size:
        raise ModelLoadError(f"cannot split dimension {dim} (size {n}) of an FP8 weight into {size} equal shards")
    per = n // size
    weight = t.weight.narrow(dim, rank * per, per).contiguous()
    scale = t.scale
    if t.block_size is not None:
        b = t.block_size[dim]
        if per % b:
            return None
        scale = t.scale.narrow(dim, rank * per // b, per // b).contiguous()
    elif dim == 0 and t.scale.numel() > 1:  # per-row scales follow their rows; a column split keeps them all
        scale = t.scale.narrow(0, rank * per, per).contiguous()
    return Fp8Tensor(weight, scale, t.input_scale, t.block_size)


def fuse(parts: list[Fp8Tensor]) -> Fp8Tensor | None:
    """Stack the parts' rows into one FP8 weight with matching scales; None when block scales cannot follow
    (a part whose rows are not whole blocks)."""
    if len(parts) == 1:
        return parts[0]
    weight = torch.cat([p.weight for p in parts], dim=0)
    block = parts[0].block_size
    if block is not None:
        if any(p.weight.shape[0] % block[0] for p in parts):
            return None
        scale = torch.cat([p.scale for p in parts], dim=0)
    elif all(p.scale.numel() == 1 for p in parts) and all(torch.equal(p.scale, parts[0].scale) for p in parts):
        scale = parts[0].scale
    else:
        scale = torch.cat([p.scale.reshape(-1).expand(p.weight.shape[0]) for p in parts])
    inputs = [p.input_scale for p in parts]
    input_scale = None if inputs[0] is None else torch.stack([s for s in inputs if s is not None]).max()
    return Fp8Tensor(weight, scale, input_scale, block)


def stack_experts(per_expert: list[Fp8Tensor]) -> Fp8Tensor:
    """One projection of every expert stacked: weight [E, N, K]; scales [E, N] (per tensor or per channel, the
    per-tensor ones spread over their rows) or [E, N/bn, K/bk] (blocks); static input scale the largest."""
    weight = torch.stack([p.weight for p in per_expert])
    if per_expert[0].block_size is not None:
        scale = torch.stack([p.scale for p in per_expert])
    else:
        scale = torch.stack([p.scale.reshape(-1).expand(p.weight.shape[0]) for p in per_expert])
    inputs = [p.input_scale for p in per_expert if p.input_scale is not None]
    return Fp8Tensor(weight, scale, torch.stack(inputs).max() if inputs else None, per_expert[0].block_size)
