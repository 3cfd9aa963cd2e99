"""The CPU reference of an FP8 model as the GPU path computes it: the float32 CPU model (dequantized or FP8-rounded
weights) with each FP8 layer's input quantized and dequantized as the GPU kernels quantize it, in float32.

The quantization math is the test's own (amax / 448 per tensor, token or 1 x group columns, or a static scale;
round to e4m3, saturating), not the engine's. Which input is quantized how follows the GPU path's documented rules
(models/fp8_gemm.py, models/fused_moe.py), restated here:
- a dense FP8 linear of more than W8A16_ROWS input rows runs W8A8: its input quantized per tensor (one per-tensor
  weight scale), per token (per-channel scales, and fused q/k/v or gate/up parts of unequal per-tensor scales,
  which the GPU holds as one per-channel vector), per token and 128-column group (block weights), or with the
  layer's static input scale (the largest of its fused parts'); up to W8A16_ROWS rows (decode) it reads bf16;
- FP8 experts always quantize both GEMMs' inputs: x per token (per tensor or channel weights) or per token and
  group (block), or with the static scale (the largest over the experts); the gate/up output per (token, expert)
  row likewise.
Routing (softmax top-k of the router logits, renormalised as the config says) is computed from the same hidden
state as the experts see, unquantized, as on the GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0
W8A16_ROWS = 16  # fp8_gemm.GEMV_MAX_ROWS: up to this many rows the GPU multiplies bf16 activations


def qdq(x: torch.Tensor, mode: str, group: int = 128, static: float | None = None) -> torch.Tensor:
    """x [M, K] quantized to e4m3 and back, in float32: per `tensor`, per `token`, per token and `group` columns,
    or with the `static` scale."""
    x = x.float()
    if static is not None:
        scale = torch.tensor(static)
    elif mode == "tensor":
        scale = x.abs().amax() / E4M3_MAX
    elif mode == "token":
        scale = x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
    elif mode == "group":
        m, k = x.shape
        g = x.reshape(m, k // group, group)
        scale = (g.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(1e-12)
        return ((g / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale).reshape(m, k)
    else:
        raise ValueError(mode)
    scale = scale.clamp_min(1e-12)
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


Spec = tuple[str, float | None]  # (dynamic mode: tensor / token / group, or the static scale)
_PARTS = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}
_DENSE = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def checkpoint_specs(checkpoint: Path) -> Callable[[str, tuple[str, ...], bool], Spec | None]:
    """For an FP8 checkpoint: (module prefix, its checkpoint parts, experts?) -> how the GPU quantizes that layer's
    input, None where the checkpoint holds the layer unquantized. Fused per-tensor parts of unequal scales become one
    per-channel scale on the GPU (fp8_linear.fuse), hence per-token inputs; experts' scales are spread over rows."""
    tensors = load_file(str(checkpoint / "model.safetensors"))
    q = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    if q["quant_method"] == "fp8":
        strategy, static = ("block" if q.get("weight_block_size") else "tensor"), q.get("activation_scheme") == "static"
    else:
        group = next(iter(q["config_groups"].values()))
        strategy, static = group["weights"]["strategy"], not group["input_activations"]["dynamic"]

    def spec(prefix: str, parts: tuple[str, ...], experts: bool) -> Spec | None:
        names = [f"{prefix}.{p}" for p in parts]
        if tensors[f"{names[0]}.weight"].dtype != torch.float8_e4m3fn:
            return None
        if static:
            return "tensor", max(float(tensors[f"{n}.input_scale"].max()) for n in names)
        if strategy == "block":
            return "group", None
        if strategy == "channel" or experts:
            return "token", None
        scales = [tensors[f"{n}.weight_scale"].reshape(()) for n in names]
        return ("tensor" if all(torch.equal(s, scales[0]) for s in scales) else "token"), None

    return spec


def online_spec(prefix: str, parts: tuple[str, ...], experts: bool) -> Spec:
    """--quantization fp8: one per-tensor weight scale per (fused) layer, per row for experts; dynamic inputs."""
    return ("token" if experts else "tensor"), None


@contextmanager
def activations_quantized(
    model: torch.nn.Module, spec: Callable[[str, tuple[str, ...], bool], Spec | None]
) -> Iterator[None]:
    """Within the block, `model` (a CPU CausalLM in float32) quantizes the inputs of its FP8 layers as the GPU
    does; `spec` as `checkpoint_specs` returns."""
    from kubellm.engine.models.moe import SparseMoE

    handles = []
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}"
        for name in _DENSE:
            owner, attr = name.split(".")
            module = getattr(getattr(layer, owner), attr, None)
            if module is None:
                continue
            parts = _PARTS.get(name, (attr,))
            how = spec(f"{prefix}.{owner}", parts, False)
            if how is not None:
                handles.append(module.register_forward_pre_hook(_dense_hook(*how)))
        if isinstance(layer.mlp, SparseMoE):
            experts = [f"{prefix}.mlp.experts.{j}" for j in range(layer.mlp.w13.shape[0])]
            up = [spec(x, ("gate_proj", "up_proj"), True) for x in experts]
            down = [spec(x, ("down_proj",), True) for x in experts]
            if up[0] is not None:
                s13 = None if up[0][1] is None else max(u[1] for u in up)  # type: ignore[index]
                s2 = None if down[0][1] is None else max(d[1] for d in down)  # type: ignore[index]
                handles.append(layer.mlp.register_forward_hook(_experts_hook(up[0][0], s13, s2)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _dense_hook(mode: str, static: float | None) -> Callable:
    def hook(module, args):
        (x,) = args
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= W8A16_ROWS:
            return None
        return (qdq(rows, mode, static=static).reshape(x.shape).to(x.dtype),)

    return hook


def _experts_hook(mode: str, s13: float | None, s2: float | None) -> Callable:
    """A forward hook replacing a SparseMoE's output by its routed experts with quantized inputs (no shared expert:
    the models tested here have none)."""

    def hook(moe, args, output):
        (x,) = args
        assert moe.shared_expert is None
        x = x.float()
        probs = torch.softmax(F.linear(x, moe.gate.float()), dim=-1)
        weights, ids = torch.topk(probs, moe.top_k, dim=-1)
        if moe.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        xq = qdq(x, mode, static=s13)
        inter = moe.w2.shape[2]
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(moe.top_k):
                e = int(ids[t, k])
                h = xq[t : t + 1] @ moe.w13[e].float().t()
                act = F.silu(h[:, :inter]) * h[:, inter:]
                out[t] += weights[t, k] * (qdq(act, mode, static=s2) @ moe.w2[e].float().t())[0]
        return out.to(output.dtype)

    return hook


def rounded_to_bf16(path: Path) -> None:
    """Round a saved checkpoint's float tensors to bf16 in place (kept float32): the GPU path, which loads in bf16,
    and the float32 CPU reference then hold the very same numbers."""
    file = path / "model.safetensors"
    tensors = {n: t.bfloat16().float() if t.dtype == torch.float32 else t for n, t in load_file(str(file)).items()}
    save_file(tensors, str(file), metadata={"format": "pt"})
