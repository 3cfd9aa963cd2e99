"""Where one engine step's time goes: GPU kernel time by kind (torch.profiler) and host time by engine phase.

Used by bench/offline.py for the decode-step profile the [engine-gpu] issue asks for when a target is missed:
run a few steps of an engine that is already in steady decode, and report per step
- GPU: busy time (the union of kernel intervals), idle time, and kernel time by kind (weight GEMMs,
  attention, KV writes, fused elementwise, sampling, copies, other);
- host: wall time inside the scheduler, the model runner's forward (inputs, plan, launch), the sampler's
  launch, the wait for the previous step's tokens, and the rest of the step (stop checks, outputs).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

# First matching pattern wins; kernel names are lower-cased first.
KERNEL_KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("all_reduce", ("nccl", "allreduce", "all_reduce", "allgather")),
    ("attention", ("batchdecode", "batchprefill", "flashinfer", "prefillwithkvcache", "decodewithkvcache")),
    ("gemm", ("gemm", "_gemv", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
    ("kv_write", ("index_copy", "indexcopy")),
    ("fused_elementwise", ("_rms_norm", "_add_rms_norm", "_rope", "_silu_mul")),
    ("sampling", ("_race_kernel", "exponential", "argmax", "argmin", "softmax", "distribution", "reduce", "cumsum")),
    ("sampling", ("sort", "topk")),
    ("copies", ("memcpy", "memset", "copy")),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, patterns in KERNEL_KINDS:
        if any(p in low for p in patterns):
            return kind
    return "other"


def _busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (us in, ms out)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e3


class _HostTimer:
    """Wraps named callables of live objects, summing their wall time; `restore()` undoes it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []

    def wrap(self, obj: Any, attr: str, label: str) -> None:
        orig = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t

        had_own = attr in vars(obj)
        setattr(obj, attr, timed)
        self._undo.append(lambda: setattr(obj, attr, orig) if had_own else delattr(obj, attr))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()


def profile_steps(engine: Any, steps: int = 8) -> dict[str, Any]:
    """Profile `steps` consecutive engine steps (the engine must be decoding already)."""
    from torch.profiler import ProfilerActivity, profile

    from kubellm.engine import sampler as sampler_mod

    host = _HostTimer()
    host.wrap(engine.scheduler, "schedule", "schedule")
    # the forward (inputs, plan, launch): ModelRunner.logits, on rank 0's runner under tensor parallelism (the
    # StepRunner's execute also launches the sampling, timed on its own below)
    host.wrap(getattr(engine.runner, "inner", engine.runner), "logits", "runner_execute")
    host.wrap(engine.sampler, "sample", "sampler_launch")
    orig_result = sampler_mod.PendingSample.result

    def timed_result(self: Any) -> Any:
        t = time.perf_counter()
        ready = self._ready
        if ready is not None:
            ready.synchronize()
        host.seconds["wait_for_tokens"] += time.perf_counter() - t
        return orig_result(self)

    sampler_mod.PendingSample.result = timed_result  # type: ignore[method-assign]
    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
    finally:
        sampler_mod.PendingSample.result = orig_result  # type: ignore[method-assign]
        host.restore()
    kinds: dict[str, float] = defaultdict(float)
    intervals: list[tuple[float, float]] = []
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = ev.time_range.start, ev.time_range.end
        intervals.append((start, end))
        kinds[kernel_kind(ev.name)] += (end - start) / 1e3
    wall_ms = wall / steps * 1e3
    busy = _busy_ms(intervals) / steps
    host_ms = {k: v / steps * 1e3 for k, v in host.seconds.items()}
    accounted = sum(v for k, v in host_ms.items())
    host_ms["rest_of_step"] = max(0.0, wall_ms - accounted)
    return {
        "steps": steps,
        "wall_ms_per_step": wall_ms,
        "gpu_busy_ms_per_step": busy,
        "gpu_idle_ms_per_step": max(0.0, wall_ms - busy),
        "gpu_kernel_ms_per_step": {k: v / steps for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "host_ms_per_step": host_ms,
    }


def describe(what: str, p: dict[str, Any]) -> str:
    """One markdown bullet for the results file; `what`: e.g. "decode step at batch 256"."""
    kernels = ", ".join(f"{k} {v:.2f}" for k, v in p["gpu_kernel_ms_per_step"].items())
    hosts = ", ".join(f"{k} {v:.2f}" for k, v in p["host_ms_per_step"].items())
    return (
        f"- {what} (profiled, {p['steps']} steps): {p['wall_ms_per_step']:.2f} ms wall, GPU busy "
        f"{p['gpu_busy_ms_per_step']:.2f} ms (idle {p['gpu_idle_ms_per_step']:.2f}); kernel ms by kind: {kernels}; "
        f"host ms by phase (overlapping the GPU under async scheduling): {hosts}"
    )
