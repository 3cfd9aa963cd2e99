"""CPU micro-benchmarks of the per-decode-step host work (no GPU needed): what runs on the host before a
decode graph replay (page tables, graph inputs, flashinfer plan inputs) and the sampler's paths.

    .venv/bin/python -m bench.host_micro            # batch 256 x 65 blocks (~1k-token contexts), vocab 128256

flashinfer is stubbed (its planner is not timed); the numbers are per call, median of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from collections.abc import Callable

import torch

sys.modules.setdefault("flashinfer", types.ModuleType("flashinfer"))  # flashinfer_backend imports it at top level

from kubellm.engine.attention.base import AttentionMetadata  # noqa: E402
from kubellm.engine.attention.flashinfer_backend import FlashInferAttention  # noqa: E402
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq  # noqa: E402
from kubellm.engine.model_runner import ModelRunner, cuda_graph_batch_sizes  # noqa: E402
from kubellm.engine.sampler import Sampler, SamplingState  # noqa: E402
from kubellm.engine.sampling_params import SamplingParams  # noqa: E402


def timeit(fn: Callable[[], object], repeat: int) -> float:
    """Median milliseconds per call after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def decode_batch(batch: int, blocks: int, block_size: int) -> ForwardBatch:
    seqs = []
    for i in range(batch):
        start = (blocks - 1) * block_size + i % block_size  # last block partly filled
        ids = list(range(i * blocks, (i + 1) * blocks))
        seqs.append(ScheduledSeq(f"r{i}", [i % 1000], start, ids, True))
    return ForwardBatch(seqs)


class _FakeGraph:
    def replay(self) -> None:
        pass


class _PlanOnlyAttention(FlashInferAttention):
    """The flashinfer backend's host side with the planner replaced by a no-op that keeps its inputs."""

    def __init__(self, block_size: int, max_bs: int, max_pages: int) -> None:
        self.block_size = block_size
        self._graph_pages = max_bs * max_pages
        self._graph_decode = {b: types.SimpleNamespace(plan=lambda *a, **k: a) for b in range(1, max_bs + 1)}
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = 32, 8, 128, 128**-0.5
        self.dtype = torch.bfloat16


def graph_runner(batch: int, blocks: int, block_size: int) -> ModelRunner:
    """A ModelRunner whose graph path runs its real host code around fake replay and LM head."""
    r = ModelRunner.__new__(ModelRunner)
    r.block_size = block_size
    r.num_blocks = batch * blocks + 1
    r.dummy_block = r.num_blocks
    r._graph_sizes = cuda_graph_batch_sizes(512)
    r._graphs = {b: (_FakeGraph(), torch.zeros(b, 8)) for b in r._graph_sizes}
    r._graph_inputs = torch.zeros((3, 512), dtype=torch.int64)
    r.graph_replays = 0
    r.device = torch.device("cpu")
    r.attn = _PlanOnlyAttention(block_size, 512, 256)
    r.model = types.SimpleNamespace(compute_logits=lambda h: h)
    r.model_config = types.SimpleNamespace(vocab_size=8)
    r.kv_caches = [torch.zeros(1)]
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--blocks", type=int, default=65)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    b, nb, bs = args.batch, args.blocks, args.block_size
    fb = decode_batch(b, nb, bs)
    print(f"batch {b} x {nb} blocks of {bs}; vocab {args.vocab}; torch threads {torch.get_num_threads()}")
    ms = timeit(lambda: AttentionMetadata.from_batch(fb, bs, "cpu"), args.repeat)
    print(f"AttentionMetadata.from_batch (decode)           {ms:8.3f} ms")
    runner = graph_runner(b, nb, bs)
    ms = timeit(lambda: runner.logits(fb), args.repeat)
    print(f"ModelRunner.execute graph path host work        {ms:8.3f} ms")
    prefill = ForwardBatch(
        [ScheduledSeq(f"p{i}", list(range(512)), 0, list(range(i * 32, i * 32 + 32)), True) for i in range(32)]
    )
    ms = timeit(lambda: AttentionMetadata.from_batch(prefill, bs, "cpu"), args.repeat)
    print(f"AttentionMetadata.from_batch (32 x 512 prefill) {ms:8.3f} ms")

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, args.vocab, generator=g)
    sampler = Sampler(seed=0)
    cases = {
        "greedy": SamplingParams(temperature=0.0),
        "temperature 1.0": SamplingParams(temperature=1.0),
        "temperature 1.0, seeded": None,
        "top_p 0.9": SamplingParams(temperature=1.0, top_p=0.9),
    }
    for name, params in cases.items():
        if params is None:
            states = [SamplingState.create(SamplingParams(temperature=1.0, seed=i), []) for i in range(b)]
        else:
            states = [SamplingState.create(params, []) for _ in range(b)]
        ms = timeit(lambda states=states: sampler(logits, states), max(3, args.repeat // 4))
        print(f"sampler [{b}, {args.vocab}] {name:24s}{ms:8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
