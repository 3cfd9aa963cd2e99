"""How the GPU micro-benchmarks time a call: CUDA events around back-to-back launches, and the same around
replays of a CUDA graph (what a decode step's graph does: no launch overhead). One timer, so every figure in
bench/results is measured alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def event_ms(fn: Callable[[], Any], iters: int) -> float:
    """Milliseconds per call of `fn`, launched `iters` times back to back between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def graph_ms(fn: Callable[[], Any], reps: int) -> float:
    """Milliseconds per replay of `fn` captured in a CUDA graph. `fn` runs once first on a side stream, outside
    the capture, so Triton compiles and lazy allocations happen there (a capture must not allocate or sync)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return event_ms(graph.replay, reps)
