"""The mixture-of-experts feed-forward layer every MoE model here shares (Qwen3-MoE, Qwen2-MoE, Mixtral).

router logits -> softmax (float32) -> top-k, renormalised or not -> each token through its k SiLU-gated expert
MLPs -> sum weighted by the routing weights; plus an optional always-on shared expert (Qwen2-MoE's is scaled by a
per-token sigmoid gate; DeepSeek's ungated ones use the same hook with `shared_expert_gated` false).

Expert weights are stacked: `w13 [E, 2I, H]` (rows [:I] the gate projection, [I:] the up projection) and
`w2 [E, H, I]`, the layout the fused GPU kernels read. Under tensor parallelism each rank holds every expert's
slice of the intermediate dimension (the split the dense MLP uses), so the rank's output is a partial sum that
one all-reduce completes.

Two paths compute the same thing: on CUDA the Triton kernels of `fused_moe` (when importable), elsewhere the
torch reference below, which gathers the tokens routed to each active expert and runs only those (no dense
E-wide compute). The references are public: the GPU kernel tests compare against them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.engine import parallel, symm_all_reduce
from kubellm.engine.loader.fp8_weights import Fp8Tensor, Fp8Weights
from kubellm.engine.model_config import ModelConfig

from . import fp8_linear, fused
from .causal_lm import CheckpointReader, check_shape, expect_shape, materialize, new_param, new_weight
from .fp8_gemm import dequantize_weight_fp8, quantize_weight_fp8

logger = logging.getLogger(__name__)

# The engine's moe_kernel (--moe-kernel, KUBELLM_MOE_KERNEL): "torch" forces the torch reference on CUDA too (for
# comparisons); "auto" (default) takes the fused kernels when the tensor is on CUDA and the kernel module imports.
MOE_KERNELS = ("auto", "torch")
_kernels: dict[str, ModuleType | None] = {}
_state = {"kernel": "auto"}


class MoeTerms(NamedTuple):
    """A MoE layer's output left unsummed for the next residual-add + norm kernel (fused.sum_add_rms_norm): the k
    weighted expert outputs [T, k, H] and the shared experts' output [T, H] (or None). Their sum is the output."""

    parts: torch.Tensor
    extra: torch.Tensor | None = None

    def total(self) -> torch.Tensor:
        """The sum, as the layer's reduced forward computes it (torch.sum over k, then + extra)."""
        summed = self.parts.sum(dim=1)
        return summed if self.extra is None else summed + self.extra


def configure(kernel: str) -> None:
    """Set the MoE implementation choice (the model runner applies the engine's moe_kernel on every rank)."""
    if kernel not in MOE_KERNELS:
        raise ValueError(f"moe_kernel (KUBELLM_MOE_KERNEL) must be 'auto' or 'torch', got {kernel!r}")
    _state["kernel"] = kernel


def reference_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int32): softmax in float32 over the
    experts, the k largest, optionally renormalised to sum to 1."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def reference_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """sum_k w_k * (silu(x @ gate_e^T) * (x @ up_e^T)) @ w2_e^T for each token's k experts e, in x's dtype.

    Tokens are grouped by expert (a stable sort of the flattened ids), so each active expert runs two GEMMs over
    just its tokens; experts nobody chose cost nothing. Products are summed in float32."""
    t, k = topk_ids.shape
    inter = w2.shape[2]
    out = torch.zeros((t, x.shape[1]), dtype=torch.float32, device=x.device)
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    flat_weights = topk_weights.reshape(-1).float()
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start : start + n]  # positions in the [T * k] flattening routed to this expert
        start += n
        tokens = slots // k
        gate_up = F.linear(x[tokens], w13[expert])
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out.index_add_(0, tokens, F.linear(act, w2[expert]).float() * flat_weights[slots, None])
    return out.to(x.dtype)


def _kernel_module() -> ModuleType | None:
    """models/fused_moe (Triton), or None where it is absent or cannot run (installs without Triton)."""
    if "module" not in _kernels:
        try:
            from kubellm.engine.models import fused_moe  # type: ignore[attr-defined]
        except ImportError as e:
            logger.debug("fused MoE kernels unavailable: %s", e)
            fused_moe = None
        if fused_moe is not None and not getattr(fused_moe, "available", lambda: True)():
            fused_moe = None
        _kernels["module"] = fused_moe
    return _kernels["module"]


def _kernels_for(device: torch.device) -> ModuleType | None:
    """The fused kernel module when the layer should use it on `device`, else None (the torch reference)."""
    return _kernel_module() if device.type == "cuda" and _state["kernel"] == "auto" else None


def kernel_choice(device: torch.device) -> str:
    """Which implementation the MoE layers run on `device`: "fused_moe (triton)" or "torch reference"."""
    return "fused_moe (triton)" if _kernels_for(device) is not None else "torch reference"


def experts_impl(x: torch.Tensor) -> tuple[Callable, Callable]:
    """(softmax top-k `(logits, k, renormalize) -> (weights, ids)`, experts `(x, w13, w2, weights, ids) -> out`)
    for x's device: the fused kernels on CUDA, the torch references elsewhere (for models with a router of their
    own, as DeepSeek's)."""
    return _impl(x)


def fp8_experts_supported(device: torch.device) -> bool:
    """Whether the fused MoE kernel on `device` takes FP8 experts (w1_scale/w2_scale/block_size)."""
    module = _kernels_for(device)
    if module is None:
        return False
    return "w1_scale" in inspect.signature(module.fused_experts).parameters


def _impl(x: torch.Tensor) -> tuple[Callable, Callable]:
    module = _kernels_for(x.device)
    if module is None:
        return reference_topk, reference_experts
    return module.fused_topk, module.fused_experts


class SparseMoE(nn.Module):
    """One sparse feed-forward block: router, stacked experts (this rank's intermediate slice of each), and the
    optional shared expert (a dense MLP built by the caller, its down projection NOT all-reduced: the block
    all-reduces once, routed and shared partial sums together)."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        tp_size: int = 1,
        shared_expert: nn.Module | None = None,
    ):
        super().__init__()
        e, h = config.num_experts, config.hidden_size
        self.top_k, self.renormalize = config.num_experts_per_tok, config.norm_topk_prob
        self.intermediate = config.moe_intermediate_size // tp_size
        self.tp_size = tp_size
        self.gate = new_param((e, h), dtype, device)  # the router: replicated on every rank
        self.w13 = new_weight((e, 2 * self.intermediate, h), dtype, device)
        self.w2 = new_weight((e, h, self.intermediate), dtype, device)
        self.shared_expert = shared_expert
        self.shared_expert_gate = new_param((1, h), dtype, device) if config.shared_expert_gated else None
        # FP8 experts (CUDA): w13/w2 are float8_e4m3fn, scaled per row [E, N] or per block [E, N/bn, K/bk]
        self.w13_scale: torch.Tensor | None = None
        self.w2_scale: torch.Tensor | None = None
        self.fp8_block_size: tuple[int, int] | None = None
        self.a13_scale: torch.Tensor | None = None  # static activation scales (None: dynamic, per token)
        self.a2_scale: torch.Tensor | None = None

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every tensor-parallel rank holds whole (for CausalLM.param_counts)."""
        return [p for p in (self.gate, self.shared_expert_gate) if p is not None]

    def expert_parameters(self) -> list[nn.Parameter]:
        """The routed experts' and the shared expert's weights (this rank's slices of them)."""
        shared = list(self.shared_expert.parameters()) if self.shared_expert is not None else []
        return [self.w13, self.w2, *shared]

    def routed_experts(
        self, experts: Callable, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, **kw: bool
    ) -> torch.Tensor:
        """The routed experts' weighted sum for `x` through `experts` (the fused kernel or the reference), FP8
        experts with their scales. Models with a router of their own (DeepSeek) call it too. `kw`: the fused
        kernel's options (reduce)."""
        if self.w13_scale is not None:
            return experts(
                x, self.w13, self.w2, weights, ids, w1_scale=self.w13_scale, w2_scale=self.w2_scale,
                a1_scale=self.a13_scale, a2_scale=self.a2_scale, block_size=self.fp8_block_size, **kw,
            )  # fmt: skip
        return experts(x, self.w13, self.w2, weights, ids, **kw)

    def can_defer_sum(self, x: torch.Tensor, experts: Callable) -> bool:
        """Whether this layer may leave its sum to the next norm kernel: nothing else needs it first (no
        tensor-parallel all-reduce), the fused kernels, the moe_sum_norm setting on."""
        return self.tp_size == 1 and experts is not reference_experts and fused.moe_sum_norm_enabled(x)

    def forward_unreduced(self, x: torch.Tensor) -> torch.Tensor | MoeTerms:
        """`forward`, but on CUDA the top-k expert outputs may come back unsummed (MoeTerms) for the decoder
        stack's next residual-add + norm kernel to sum (models/fused.py's sum_add_rms_norm: the layer's torch.sum
        kernel gone). Not with a gated shared expert (its gate scales it first), nor where `can_defer_sum` says
        no, nor on the down_sum path (which sums in its GEMM): then [T, H], as `forward` returns."""
        topk, experts = _impl(x)
        if self.shared_expert is not None or not self.can_defer_sum(x, experts):
            return self.forward(x)
        weights, ids = topk(F.linear(x, self.gate), self.top_k, self.renormalize)
        out = self.routed_experts(experts, x, weights, ids, reduce=False)
        return MoeTerms(out) if out.dim() == 3 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk, experts = _impl(x)
        weights, ids = topk(F.linear(x, self.gate), self.top_k, self.renormalize)
        out = self.routed_experts(experts, x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(F.linear(x, self.shared_expert_gate)) * shared
            out = out + shared
        # Expert parallelism would go here instead: each rank holding E/ep whole experts, tokens sent to the ranks
        # of their experts by an all-to-all before `experts` and the results returned by a second one after it.
        if self.tp_size > 1:
            out = symm_all_reduce.all_reduce(out)
        return out


# Checkpoint layouts of the routed experts, per module prefix (`{layer}.mlp` or Mixtral's `{layer}.block_sparse_moe`):
# one tensor per expert, named (gate, up, down) as below, or transformers 5's stacked
# `experts.gate_up_proj [E, 2I, H]` / `experts.down_proj [E, H, I]`.
_PER_EXPERT_NAMES = {"mlp": ("gate_proj", "up_proj", "down_proj"), "block_sparse_moe": ("w1", "w3", "w2")}


def load_moe_weights(reader: CheckpointReader, moe: SparseMoE, layer_prefix: str) -> None:
    """Fill `moe` from a checkpoint in either layout, writing each expert (or this rank's slice of it) straight
    into the stacked parameters: no second copy of the expert weights exists at any time."""
    weights = reader.weights
    module = "block_sparse_moe" if f"{layer_prefix}.block_sparse_moe.gate.weight" in weights else "mlp"
    prefix = f"{layer_prefix}.{module}"
    name = f"{prefix}.gate.weight"
    reader.put(moe.gate, reader.take(name), name)
    if f"{prefix}.experts.gate_up_proj" in weights:
        _load_stacked(reader, moe, prefix)
    elif not _load_fp8_experts(reader, moe, prefix, _PER_EXPERT_NAMES[module]):
        _load_per_expert(reader, moe, prefix, _PER_EXPERT_NAMES[module])
    if reader.scheme is not None and reader.scheme.method == "online":
        _quantize_online(reader, moe, prefix)
    if moe.shared_expert is not None:
        reader.load_mlp(moe.shared_expert, f"{prefix}.shared_expert")
    if moe.shared_expert_gate is not None:
        name = f"{prefix}.shared_expert_gate.weight"
        reader.put(moe.shared_expert_gate, reader.take(name), name)


def _load_per_expert(reader: CheckpointReader, moe: SparseMoE, prefix: str, names: tuple[str, str, str]) -> None:
    inter, (e, _, h) = moe.intermediate, moe.w13.shape
    w13, w2 = materialize(moe.w13), materialize(moe.w2)
    for expert in range(e):
        base = f"{prefix}.experts.{expert}"
        gate, up, down = (f"{base}.{n}.weight" for n in names)
        for rows, name in ((slice(0, inter), gate), (slice(inter, 2 * inter), up)):
            part = reader.take(name, "col")
            check_shape(part, (inter, h), name)
            w13[expert, rows].copy_(part)
        part = reader.take(down, "row")
        check_shape(part, (h, inter), down)
        w2[expert].copy_(part)


def _load_stacked(reader: CheckpointReader, moe: SparseMoE, prefix: str) -> None:
    gate_up, down = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
    if reader.size == 1:
        reader.put(moe.w13, reader.take(gate_up), gate_up)
        reader.put(moe.w2, reader.take(down), down)
        return
    e, _, h = moe.w13.shape
    inter, lo = moe.intermediate, reader.rank * moe.intermediate
    half = inter * reader.size
    expect_shape(parallel.shape_of(reader.weights, gate_up), (e, 2 * half, h), gate_up)
    # this rank's rows of the gate half and of the up half, each read alone
    w13 = materialize(moe.w13)
    w13[:, :inter].copy_(reader.take_range(gate_up, 1, lo, lo + inter))
    w13[:, inter:].copy_(reader.take_range(gate_up, 1, half + lo, half + lo + inter))
    reader.put(moe.w2, reader.take_range(down, 2, lo, lo + inter), down)


def _load_fp8_experts(reader: CheckpointReader, moe: SparseMoE, prefix: str, names: tuple[str, str, str]) -> bool:
    """The experts as FP8 on the GPU, when the checkpoint holds them so and the fused kernel takes FP8 (else False:
    the caller loads them dequantized). Gate and up of each expert are fused as a dense layer's are."""
    e, device = moe.w13.shape[0], moe.w13.device
    per_expert = [[f"{prefix}.experts.{i}.{n}.weight" for n in names] for i in range(e)]
    if not reader.keeps_fp8([n for group in per_expert for n in group], device):
        return False
    if not fp8_experts_supported(device):
        logger.warning("%s: the fused MoE kernel takes no FP8 experts here; experts dequantized to %s",
                       prefix, moe.w13.dtype)  # fmt: skip
        return False
    stacks = fp8_expert_stacks(reader.weights, per_expert, reader.rank, reader.size)  # type: ignore[arg-type]
    if stacks is None:
        logger.warning("%s: FP8 block scales do not split at gate/up or shard edges; experts dequantized", prefix)
        return False
    _hold_fp8_experts(moe, *stacks, f"{prefix}.experts")
    reader.used.update(n for group in per_expert for n in group)
    reader.fp8_layers += 1
    return True


def fp8_expert_stacks(
    weights: Fp8Weights, per_expert: list[list[str]], rank: int = 0, size: int = 1
) -> tuple[Fp8Tensor, Fp8Tensor] | None:
    """Every expert's (gate, up, down) FP8 weights as fused_moe takes them: w13 [E, 2I, H] (gate rows, then up)
    and w2 [E, H, I], their scales per row ([E, 2I], [E, H]: per-tensor scales spread over their rows) or per
    block ([E, 2I/bn, H/bk], [E, H/bn, I/bk]); under tensor parallelism this rank's slice of I in each. None when
    block scales do not split at gate/up or at the shard's edges."""
    w13, w2 = [], []
    for gate, up, down in per_expert:
        parts = [fp8_linear.shard(weights.fp8(n), 0, rank, size) for n in (gate, up)]
        down_part = fp8_linear.shard(weights.fp8(down), 1, rank, size)
        fused = None if any(p is None for p in parts) else fp8_linear.fuse(parts)  # type: ignore[arg-type]
        if fused is None or down_part is None:
            return None
        w13.append(fused)
        w2.append(down_part)
    return fp8_linear.stack_experts(w13), fp8_linear.stack_experts(w2)


def _hold_fp8_experts(moe: SparseMoE, w13: Fp8Tensor, w2: Fp8Tensor, label: str) -> None:
    fp8_linear.gemm_module()
    check_shape(w13.weight, tuple(moe.w13.shape), f"{label} (gate/up)")
    check_shape(w2.weight, tuple(moe.w2.shape), f"{label} (down)")
    device = moe.w13.device
    moe.w13 = nn.Parameter(w13.weight.to(device), requires_grad=False)
    moe.w2 = nn.Parameter(w2.weight.to(device), requires_grad=False)
    moe.w13_scale, moe.w2_scale = w13.scale.to(device), w2.scale.to(device)
    moe.fp8_block_size = w13.block_size
    moe.a13_scale = None if w13.input_scale is None else w13.input_scale.to(device)
    moe.a2_scale = None if w2.input_scale is None else w2.input_scale.to(device)


def _quantize_online(reader: CheckpointReader, moe: SparseMoE, prefix: str) -> None:
    """--quantization fp8: each expert's gate/up and down rounded through FP8 per tensor (vLLM's online scheme);
    held as FP8 where the fused kernel takes it, else computed with the rounded weights."""
    quantized = [[quantize_weight_fp8(w[i]) for i in range(w.shape[0])] for w in (moe.w13.data, moe.w2.data)]
    if fp8_experts_supported(moe.w13.device):
        w13, w2 = (fp8_linear.stack_experts([Fp8Tensor(q, s, None, None) for q, s in stack]) for stack in quantized)
        _hold_fp8_experts(moe, w13, w2, f"{prefix}.experts")
        reader.fp8_layers += 1
        return
    for param, stack in zip((moe.w13.data, moe.w2.data), quantized, strict=True):
        for i, (q, s) in enumerate(stack):
            param[i].copy_(dequantize_weight_fp8(q, s))
