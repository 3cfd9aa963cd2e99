"""One step's GPU kernels grouped by kind, the same way for our engine and for vLLM: the one classifier both profiles
use (bench/step_profile.py for ours, bench/peer_vllm.py --profile for the peer), and the per-step summary of a
profile's kernel intervals. Stdlib only: the vLLM process imports it beside vLLM's pinned packages.

Kernel names are CUDA symbol names as torch.profiler reports them, lower-cased before matching; the first kind with
a matching pattern wins, so the specific kinds come before the broad ones. What each engine launches (Llama shape,
bf16, one H100/H200):
- ours (engine/): weight GEMMs through cuBLAS (nvjet_*, sm90_xmma_gemm_*, gemv2T_*, splitKreduce_*) or our Triton
  _gemv_kernel; flashinfer decode/prefill attention (flashinfer::BatchDecode*, BatchPrefillWithPagedKVCache*);
  K/V writes by index_copy_; Triton _add_rms_norm_kernel, _rms_norm_kernel, _rope_kernel (or _rope_cache_kernel, the
  rotary embedding that writes K and V into the paged cache itself), _silu_mul_kernel; the sampler's _race_kernel.
- vLLM 0.26 (read in its source: model_executor/layers, v1/attention/backends, v1/sample): torch.compile'd model
  code, so norms, SiLU-and-mul, residual adds and (native) rotary become Inductor kernels triton_poi_fused_* /
  triton_red_fused_* / triton_per_fused_*, or, where its CUDA custom ops are on, rms_norm_kernel,
  fused_add_rms_norm_kernel, rotary_embedding_kernel, act_and_mul_kernel; K/V writes reshape_and_cache_flash_kernel
  (concat_and_cache_mla_kernel for MLA); attention by FlashAttention (FA3: cutlass::device_kernel<flash::
  FlashAttnFwdSm90...>, FlashAttnFwdCombine; FA2: flash_fwd_splitkv_kernel), FlashInfer (flashinfer::...) or its
  Triton kernel_unified_attention_2d/3d + reduce_segments; GEMMs through cuBLAS like ours (or Inductor's
  triton_tem_fused_mm_* templates); the sampler's exponential_/div/argmax or flashinfer::sampling::* kernels.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

KERNEL_KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("all_reduce", ("nccl", "allreduce", "all_reduce", "allgather", "cross_device_reduce")),
    ("kv_write", ("index_copy", "indexcopy", "reshape_and_cache", "concat_and_cache")),
    (
        "moe_routing",  # gating top-k and the sort of tokens by expert (ours: engine/models/fused_moe.py, fused.py)
        (
            "_topk_softmax_kernel",
            "grouped_topk",
            "_align_kernel",
            "_scatter_kernel",
            "moe_align",
            "count_and_sort",
            "topkgating",
            "topk_softmax",
            "moe_sum",
        ),
    ),
    (
        "fused_elementwise",
        (
            "rms_norm",
            "rmsnorm",
            "_rope",
            "rotary",
            "silu",
            "act_and_mul",
            "triton_poi_",
            "triton_red_",
            "triton_per_",
        ),
    ),
    ("sampling", ("sampling::", "_race_kernel")),
    (
        "attention",
        (
            "batchdecode",
            "batchprefill",
            "flashinfer",
            "prefillwithkvcache",
            "decodewithkvcache",
            "flash_fwd",
            "flashattn",
            "fmha",
            "unified_attention",
            "reduce_segments",
            "paged_attention",
        ),
    ),
    (
        "gemm",
        (
            "gemm",
            "gemv",
            "splitk",
            "cutlass",
            "xmma",
            "nvjet",
            "cublas",
            "sm90_",
            "sm80_",
            "triton_tem",
            "fused_moe",
            "_gate_up_kernel",  # our fused-MoE expert GEMMs (engine/models/fused_moe.py)
            "_down_kernel",
            "_down_sum_kernel",
        ),
    ),
    ("sampling", ("exponential", "argmax", "argmin", "softmax", "distribution", "reduce", "cumsum", "sort", "topk")),
    ("copies", ("memcpy", "memset", "copy")),
]
KINDS = list(dict.fromkeys(kind for kind, _ in KERNEL_KINDS)) + ["other"]


def kernel_kind(name: str) -> str:
    """The kind of one kernel (see KERNEL_KINDS), "other" when no pattern matches."""
    low = name.lower()
    for kind, patterns in KERNEL_KINDS:
        if any(p in low for p in patterns):
            return kind
    return "other"


def busy_ms(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (us in, ms out): the time at least one kernel ran."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e3


class HostTimer:
    """Wraps named callables of live objects, summing their wall time and counting their calls; `restore()` undoes
    it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.wrapped: set[str] = set()  # the labels being timed
        self._undo: list[Callable[[], None]] = []

    def wrap(self, obj: Any, attr: str, label: str) -> None:
        orig = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t
                self.calls[label] += 1

        self.wrapped.add(label)
        had_own = attr in vars(obj)
        setattr(obj, attr, timed)
        self._undo.append(lambda: setattr(obj, attr, orig) if had_own else delattr(obj, attr))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()


def summarize(
    kernels: Iterable[tuple[str, float, float]],
    steps: int,
    wall_s: float,
    host_s: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Per-step figures of a profile of `steps` consecutive steps that took `wall_s` (synchronised at both ends):
    `kernels` are (name, start_us, end_us) of every GPU kernel and copy; `host_s` the seconds spent in named host
    phases over all steps (they overlap the GPU under async scheduling); what the phases leave of the wall time
    is `rest_of_step`."""
    if steps < 1:
        raise ValueError(f"a profile covers at least one step, got {steps}")
    ms: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    intervals = []
    for name, start, end in kernels:
        kind = kernel_kind(name)
        ms[kind] += (end - start) / 1e3
        count[kind] += 1
        intervals.append((start, end))
    wall_ms = wall_s / steps * 1e3
    busy = busy_ms(intervals) / steps
    host_ms = {k: v / steps * 1e3 for k, v in (host_s or {}).items()}
    host_ms["rest_of_step"] = max(0.0, wall_ms - sum(host_ms.values()))
    return {
        "steps": steps,
        "wall_ms_per_step": wall_ms,
        "gpu_busy_ms_per_step": busy,
        "gpu_idle_ms_per_step": max(0.0, wall_ms - busy),
        "gpu_kernel_ms_per_step": {k: v / steps for k, v in sorted(ms.items(), key=lambda kv: -kv[1])},
        "gpu_kernels_per_step": {k: count[k] / steps for k in sorted(count, key=lambda k: -ms[k])},
        "host_ms_per_step": host_ms,
    }


def side_by_side(title: str, ours: Mapping[str, Any] | None, peer: Mapping[str, Any] | None, peer_name: str) -> str:
    """A markdown table of two step profiles (summarize's dicts; None: not profiled): wall, GPU busy and idle,
    kernel ms (and kernels) per kind, host ms per phase, one row each, "ours | peer"."""

    def cell(p: Mapping[str, Any] | None, *keys: str) -> str:
        v: Any = p
        for k in keys:
            v = v.get(k) if isinstance(v, Mapping) else None
        return "-" if v is None else f"{v:.2f}"

    def kernels(p: Mapping[str, Any] | None, kind: str) -> str:
        ms = cell(p, "gpu_kernel_ms_per_step", kind)
        n = (p or {}).get("gpu_kernels_per_step", {}).get(kind)
        return ms if n is None or ms == "-" else f"{ms} ({n:.0f})"

    lines = [f"| {title} | ours | {peer_name} |", "|---|---|---|"]
    for label, key in (("wall ms", "wall_ms_per_step"), ("GPU busy ms", "gpu_busy_ms_per_step")):
        lines.append(f"| {label} | {cell(ours, key)} | {cell(peer, key)} |")
    lines.append(f"| GPU idle ms | {cell(ours, 'gpu_idle_ms_per_step')} | {cell(peer, 'gpu_idle_ms_per_step')} |")
    for kind in KINDS:
        if any(kind in (p or {}).get("gpu_kernel_ms_per_step", {}) for p in (ours, peer)):
            lines.append(f"| kernel ms (kernels): {kind} | {kernels(ours, kind)} | {kernels(peer, kind)} |")
    phases = list(dict.fromkeys([*(ours or {}).get("host_ms_per_step", {}), *(peer or {}).get("host_ms_per_step", {})]))
    for phase in phases:
        lines.append(
            f"| host ms: {phase} | {cell(ours, 'host_ms_per_step', phase)} | {cell(peer, 'host_ms_per_step', phase)} |"
        )
    return "\n".join(lines)
