"""Tensor parallelism on CPU (gloo, 2 ranks): greedy outputs equal TP 1's, each rank holds half of the split
weights, bad sizes fail clearly, and no worker process outlives the engine."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from greedy_reference import assert_greedy_equal, engine_greedy
from tiny_models import full_pass_logits

from kubellm.engine.config import EngineConfig
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

MAX_NEW = 12


def make(path: Path, tp: int, **overrides) -> LLMEngine:
    cfg = dict(model=str(path), device="cpu", tensor_parallel_size=tp, num_gpu_blocks_override=64)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg))


def run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    return engine_greedy(engine, prompts, MAX_NEW)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])  # llama3: tied embeddings, biases, llama3 rope
def test_tp2_greedy_equals_tp1(tiny_model_dir, kind: str) -> None:
    path = tiny_model_dir(kind)
    rng = random.Random(kind)
    prompts = [[rng.randrange(4, 320) for _ in range(n)] for n in (3, 9, 17, 40)]
    # a small token budget forces chunked prefills next to decodes, as in serving
    tp1 = make(path, 1, max_num_batched_tokens=24)
    ref = run(tp1, prompts)
    tp2 = make(path, 2, max_num_batched_tokens=24)
    try:
        ours = run(tp2, prompts)
        counts = tp2.runner.param_counts()
    finally:
        tp2.close()
    runner = tp1.runner
    for i, (p, r, o) in enumerate(zip(prompts, ref, ours, strict=True)):
        logits = full_pass_logits(runner, p + r)[len(p) - 1 : len(p) - 1 + len(r)]
        assert_greedy_equal(o, r, list(logits), f"{kind} TP2 vs TP1 prompt {i}")
    # each rank holds 1/2 of the split weights and all of the replicated ones
    full = runner.model.param_counts()
    assert len(counts) == 2
    for rank_counts in counts:
        assert rank_counts["sharded"] * 2 == full["sharded"], (rank_counts, full)
        assert rank_counts["replicated"] == full["replicated"], (rank_counts, full)


def test_bad_tp_size_is_a_clear_error(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*num_attention_heads=4"):
        make(path, 3)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 .*num_key_value_heads=2"):
        make(path, 4)


def test_no_process_outlives_the_engine(tiny_model_dir) -> None:
    engine = make(tiny_model_dir("qwen3"), 2)
    pids = [p.pid for p in engine.runner._procs]
    assert pids and all(alive(pid) for pid in pids)
    engine.close()
    engine.close()  # idempotent
    assert not any(alive(pid) for pid in pids)


def test_a_dead_worker_fails_the_step_and_close_cleans_up(tiny_model_dir) -> None:
    engine = make(tiny_model_dir("qwen3"), 2)
    worker = engine.runner._procs[0]
    pid = worker.pid
    os.kill(pid, signal.SIGKILL)
    worker.join(timeout=10)
    engine.add_request(None, [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=2))
    with pytest.raises(RuntimeError, match="exited"):
        engine.step()
    engine.close()
    assert not alive(pid)


def test_workers_exit_when_rank0_is_killed(tiny_model_dir) -> None:
    script = (
        "import sys, time\n"
        "from kubellm.engine.config import EngineConfig\n"
        "from kubellm.engine.llm_engine import LLMEngine\n"
        "e = LLMEngine(EngineConfig(model=sys.argv[1], device='cpu', tensor_parallel_size=2,"
        " num_gpu_blocks_override=16))\n"
        "print(*[p.pid for p in e.runner._procs], flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tiny_model_dir("qwen3"))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert pids and all(alive(pid) for pid in pids)
    finally:
        proc.kill()  # SIGKILL: no atexit, no close()
        proc.wait()
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)


def test_tp2_with_async_scheduling_equals_tp1(tiny_model_dir) -> None:
    """Async scheduling under tensor parallelism: rank 0 broadcasts each step's sampled ids, every worker fills
    the next step's placeholder tokens from them; greedy outputs (and EOS/length finishes) equal TP 1's."""
    path = tiny_model_dir("llama3")
    rng = random.Random(5)
    prompts = [[rng.randrange(4, 320) for _ in range(n)] for n in (3, 9, 17, 40, 5)]
    ref = run(make(path, 1, max_num_batched_tokens=24), prompts)
    tp2 = make(path, 2, max_num_batched_tokens=24, async_scheduling=True)
    try:
        assert tp2.async_scheduling
        ours = run(tp2, prompts)
        again = run(tp2, prompts[:2])  # the workers' copy of the sampled ids survives an idle engine
    finally:
        tp2.close()
    runner = make(path, 1).runner
    for i, (p, r, o) in enumerate(zip(prompts, ref, ours, strict=True)):
        logits = full_pass_logits(runner, p + r)[len(p) - 1 : len(p) - 1 + len(r)]
        assert_greedy_equal(o, r, list(logits), f"async TP2 vs TP1 prompt {i}")
    assert again == ours[:2]
