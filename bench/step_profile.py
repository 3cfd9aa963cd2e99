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
from typing import Any

import torch

from bench.kernel_kinds import HostTimer, summarize


def profile_steps(engine: Any, steps: int = 8) -> dict[str, Any]:
    """Profile `steps` consecutive engine steps (the engine must be decoding already)."""
    from torch.profiler import ProfilerActivity, profile

    from kubellm.engine import sampler as sampler_mod

    host = HostTimer()
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
    kernels = [
        (ev.name, ev.time_range.start, ev.time_range.end)
        for ev in prof.events()
        if ev.device_type == torch.autograd.DeviceType.CUDA
    ]
    return summarize(kernels, steps, wall, host.seconds)


def describe(what: str, p: dict[str, Any]) -> str:
    """One markdown bullet for the results file; `what`: e.g. "decode step at batch 256"."""
    kernels = ", ".join(f"{k} {v:.2f}" for k, v in p["gpu_kernel_ms_per_step"].items())
    hosts = ", ".join(f"{k} {v:.2f}" for k, v in p["host_ms_per_step"].items())
    return (
        f"- {what} (profiled, {p['steps']} steps): {p['wall_ms_per_step']:.2f} ms wall, GPU busy "
        f"{p['gpu_busy_ms_per_step']:.2f} ms (idle {p['gpu_idle_ms_per_step']:.2f}); kernel ms by kind: {kernels}; "
        f"host ms by phase (overlapping the GPU under async scheduling): {hosts}"
    )
