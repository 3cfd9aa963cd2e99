"""Offline engine benchmark on one GPU: a Llama-3.1-8B-shaped model with random bf16 weights made on the device.

    python -m bench.offline                 # everything, ~7 minutes on an H200
    python -m bench.offline --scale 0.1     # every request count x0.1 (said so in the results)
    python -m bench.offline --tensor-parallel-size 1,2,4 --workloads d,a,b --decode-batches 1 --skip-hf
                                            # the same engine at TP 1, 2 and 4, one after another

Workloads (all requests arrive at once, ignore_eos, temperature 1.0, seed 0; prompts are random token ids):
  (a) 1000 x 1024 in / 128 out       (b) 500 x 200 in / 1000 out
  (c) 100 shared 1500-token prefixes x 10 suffixes of 100 tokens, 100 out; prefix caching on, then off
  (d) decode step time at batch 1/32/128/256 with 1024-token prompts, against a roofline built from the
      device-copy bandwidth and bf16 matmul rate measured in this same run.
transformers' continuous batching (`generate_batch`, paged|sdpa) runs a 10% subset of (a) and (b) in the same
process after our engine is freed. One table of ratios to the vLLM 0.26.0 anchors and physical bounds (the
[engine-gpu] issue) is printed; bench/results/engine-gpu-<date>.json and .md are written after every phase,
so a run stopped by its time limit still leaves what it measured.

Tensor parallelism (`--tensor-parallel-size`, one size or a comma list): every rank draws its own shards of the
same random weights on its GPU (engine/random_model.py's RandomRecipe); each size writes its own results
(engine-gpu-<date>-tp<N>.json/.md) and a sweep adds engine-gpu-<date>-tp.json/.md comparing them against TP 1,
with the [tensor-parallel] issue's target: batch-1 decode ms/token at TP 2 <= 0.65x TP 1. Rooflines at TP N are
the one-GPU roofline / N (weights and KV split evenly; the all-reduces are not in it).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.step_profile import describe as describe_profile
from bench.step_profile import profile_steps
from kubellm.engine.config import EngineConfig
from kubellm.engine.model_config import ModelConfig
from kubellm.engine.random_model import LLAMA_3_1_8B, RandomWeights, random_loaded_model
from kubellm.engine.sampling_params import SamplingParams

# The [engine-gpu] issue's anchors: vLLM 0.26.0 and transformers 5.17 on the same kind of H200.
VLLM = {
    "a_total_tok_s": 34535.0,
    "b_output_tok_s": 17805.0,
    "c_output_tok_s": 7162.0,
    "batch1_ms": 4.9,
    "startup_s": 154,
}
HF = {"a_total_tok_s": 2128.0, "b_output_tok_s": 585.0}
BOUND = {"a_total_tok_s": 49000.0, "b_output_tok_s": 30000.0, "batch1_ms": 3.74}
TARGET = {"ratio": 0.8, "batch1_ms": 5.5, "d256_roofline_ratio": 1.3, "startup_s": 60.0}
TP_TARGET = {"tp": 2, "batch1_ratio": 0.65}  # [tensor-parallel]: batch-1 ms/token at TP 2 <= 0.65x TP 1

log = logging.getLogger("bench.offline")


# ---- ceilings and roofline -------------------------------------------------------------------------
def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Device copy GB/s (bytes read + written) and bf16 matmul TFLOP/s, each the mean of 10 after warm-up."""
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t = _cuda_time(lambda: dst.copy_(src), 10)
    copy_gbs = 2 * src.numel() / t / 1e9
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    t = _cuda_time(lambda: a @ b, 10)
    torch.cuda.empty_cache()
    return {"copy_gb_s": copy_gbs, "matmul_tflop_s": 2 * n**3 / t / 1e12}


def _cuda_time(fn: Callable[[], Any], iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def decode_roofline_ms(c: ModelConfig, batch: int, ctx: int, copy_gb_s: float, tflop_s: float) -> dict[str, float]:
    """Sum over the step's kernels of max(bytes / copy bandwidth, FLOPs / matmul rate), bf16 everywhere."""
    bw, rate, e = copy_gb_s * 1e9, tflop_s * 1e12, 2
    gemms = [
        (c.hidden_size, c.q_size + 2 * c.kv_size),  # qkv
        (c.q_size, c.hidden_size),  # o
        (c.hidden_size, 2 * c.intermediate_size),  # gate_up
        (c.intermediate_size, c.hidden_size),  # down
    ]
    gemm_s = 0.0
    for k, n in gemms:
        gemm_s += max((k * n + batch * (k + n)) * e / bw, 2 * batch * k * n / rate)
    gemm_s *= c.num_hidden_layers
    gemm_s += max(
        (c.vocab_size * c.hidden_size + batch * c.hidden_size) * e / bw, 2 * batch * c.hidden_size * c.vocab_size / rate
    )
    kv_bytes = batch * ctx * 2 * c.kv_size * e  # K and V of every context token, per layer
    attn_flops = 4 * batch * ctx * c.q_size
    attn_s = c.num_hidden_layers * max(kv_bytes / bw, attn_flops / rate)
    return {"gemm_ms": gemm_s * 1e3, "attention_ms": attn_s * 1e3, "total_ms": (gemm_s + attn_s) * 1e3}


def decode_attention_micro(batch: int, ctx: int, tensor_cores: bool) -> dict[str, float]:
    """One layer's paged decode attention (Llama-3-8B heads, bf16) timed alone: ms and effective TB/s of KV read."""
    from kubellm.engine.attention.flashinfer_backend import FlashInferAttention

    c, bs = LLAMA_3_1_8B, 16
    pages = -(-ctx // bs)
    attn = FlashInferAttention(
        c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.head_dim**-0.5, bs, use_tensor_cores=tensor_cores
    )
    cache = torch.randn(batch * pages, 2, bs, c.num_key_value_heads, c.head_dim, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(batch, c.num_attention_heads, c.head_dim, dtype=torch.bfloat16, device="cuda")
    tables = [list(range(i * pages, (i + 1) * pages)) for i in range(batch)]
    from kubellm.engine.attention.flashinfer_backend import _i32, paged_kv_layout

    indptr, indices, last = paged_kv_layout([ctx] * batch, tables, bs)
    attn._decode[None].plan(
        _i32(indptr), _i32(indices), _i32(last), c.num_attention_heads, c.num_key_value_heads, c.head_dim, bs,
        q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=c.head_dim**-0.5,
    )  # fmt: skip
    for _ in range(3):
        attn._decode[None].run(q, cache)
    t = _cuda_time(lambda: attn._decode[None].run(q, cache), 20)
    kv_bytes = batch * ctx * 2 * c.kv_size * 2
    out = {"ms": t * 1e3, "kv_tb_s": kv_bytes / t / 1e12}
    try:  # as a decode step runs it: 32 layers' calls replayed from one CUDA graph (no launch overhead)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(32):
                attn._decode[None].run(q, cache)
        graph.replay()
        out["in_graph_ms"] = _cuda_time(graph.replay, 10) * 1e3 / 32
    except Exception as e:  # a wrapper that cannot be captured outside its CUDA-graph mode
        out["in_graph_error"] = f"{type(e).__name__}: {e}"
    return out


def prefill_attention_micro(backend: str, seqs: int = 16, ctx: int = 1024) -> dict[str, Any]:
    """One layer's paged causal prefill attention of (a)'s shape (16 prompts x 1024 tokens, Llama-3-8B heads,
    bf16) on one flashinfer prefill backend: ms and TFLOP/s (causal: half the square's FLOPs)."""
    from kubellm.engine.attention.flashinfer_backend import FlashInferAttention, _i32, _i32_on, paged_kv_layout

    c, bs = LLAMA_3_1_8B, 16
    try:
        attn = FlashInferAttention(
            c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.head_dim**-0.5, bs, prefill_backend=backend
        )
        pages = -(-ctx // bs)
        shape = (seqs * pages, 2, bs, c.num_key_value_heads, c.head_dim)
        cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        q = torch.randn(seqs * ctx, c.num_attention_heads, c.head_dim, dtype=torch.bfloat16, device="cuda")
        tables = [list(range(i * pages, (i + 1) * pages)) for i in range(seqs)]
        indptr, indices, last = paged_kv_layout([ctx] * seqs, tables, bs)
        wrapper = attn._prefill[None]
        qo = [i * ctx for i in range(seqs + 1)]
        wrapper.plan(
            _i32(qo), _i32(indptr), _i32_on(indices, attn.device), _i32(last), c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, bs, causal=True, q_data_type=torch.bfloat16,
            kv_data_type=torch.bfloat16, sm_scale=c.head_dim**-0.5,
        )  # fmt: skip
        for _ in range(3):
            wrapper.run(q, cache)
        t = _cuda_time(lambda: wrapper.run(q, cache), 10)
    except Exception as e:  # FA3 not buildable here, say
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    flops = 4 * seqs * ctx * ctx / 2 * c.num_attention_heads * c.head_dim
    return {"ms": t * 1e3, "tflop_s": flops / t / 1e12}


# ---- our engine ------------------------------------------------------------------------------------
class TimedWeights(RandomWeights):
    """Random weights that add up the time spent making them (synchronised), to subtract from start-up. Under
    tensor parallelism this is rank 0's share (the other ranks draw theirs at the same time)."""

    seconds = 0.0

    def chunk(self, name: str, k: int, length: int) -> torch.Tensor:
        t = time.perf_counter()
        out = super().chunk(name, k, length)
        torch.cuda.synchronize()
        TimedWeights.seconds += time.perf_counter() - t
        return out


def build_engine(args: argparse.Namespace, tp: int = 1):
    from kubellm.engine.llm_engine import LLMEngine

    # The recipe (seed 0, bf16, drawn on CUDA) is what the other ranks rebuild: the same weights as rank 0's.
    loaded = random_loaded_model(LLAMA_3_1_8B, torch.bfloat16, "cuda", seed=0, name="random-llama-3.1-8b")
    loaded.weights = TimedWeights(LLAMA_3_1_8B, torch.bfloat16, "cuda", seed=0)  # type: ignore[assignment]
    config = EngineConfig(
        tensor_parallel_size=tp,
        model="random-llama-3.1-8b",
        device="cuda",
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=True,
        enforce_eager=args.enforce_eager,
        generation_config="vllm",
        seed=0,
    )
    TimedWeights.seconds = 0.0
    engine = LLMEngine(config, loaded=loaded)
    engine.final_outputs_only = True  # as vLLM's offline LLM: no per-step outputs of unfinished requests
    torch.cuda.synchronize()
    return engine


def local_runner(engine):
    """Rank 0's ModelRunner (the engine's runner itself at TP 1): graph counters, memory profile, backend."""
    return getattr(engine.runner, "inner", engine.runner)


def random_prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(1000, vocab - 1000) for _ in range(length)] for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def run_workload(engine, prompts: list[list[int]], max_tokens: int, label: str) -> dict[str, Any]:
    """Submit every prompt at once, step until all finish; throughput per second of wall time."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0)
    runner = local_runner(engine)
    before = engine.stats()
    replays0 = getattr(runner, "graph_replays", 0)
    step_times: list[float] = []
    torch.cuda.synchronize()
    start_wall, arrival = time.perf_counter(), time.time()
    for i, p in enumerate(prompts):
        engine.add_request(f"{label}-{i}", p, params, arrival_time=arrival)
    outs = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        for out in engine.step():
            if out.finished:
                outs.append(out)
        step_times.append(time.perf_counter() - t)
    wall = time.perf_counter() - start_wall
    n_in = sum(len(p) for p in prompts)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs if o.metrics.first_token_time]
    tpot = [
        (o.metrics.last_token_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
        for o in outs
        if o.metrics.first_token_time and o.metrics.last_token_time and len(o.outputs[0].token_ids) > 1
    ]
    errors = [o.error for o in outs if o.error]
    stats = engine.stats()
    res = {
        "requests": len(prompts),
        "finished": len(outs),
        "errors": len(errors),
        "input_tokens": n_in,
        "output_tokens": n_out,
        "wall_s": wall,
        "requests_per_s": len(outs) / wall,
        "output_tok_s": n_out / wall,
        "total_tok_s": (n_in + n_out) / wall,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_ms": percentile(tpot, 50) * 1e3,
        "tpot_p99_ms": percentile(tpot, 99) * 1e3,
        "steps": len(step_times),
        "preemptions": stats.num_preemptions - before.num_preemptions,
        "prefix_hit_rate": (stats.prefix_hits - before.prefix_hits)
        / max(1, stats.prefix_queries - before.prefix_queries),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "cuda_graph_replays": getattr(runner, "graph_replays", 0) - replays0,
    }
    log.info("%s: %s", label, {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})
    return res


def decode_step_times(engine, batch: int, ctx: int, steps: int, profile: bool = False) -> dict[str, Any]:
    """Median engine step and GPU forward time of pure decode steps of `batch` sequences at ~ctx tokens."""
    rng = random.Random(batch)
    # Long enough that nobody finishes while measured (the first requests decode while later ones prefill).
    params = SamplingParams(max_tokens=2 * steps + 64, ignore_eos=True, temperature=1.0)
    prompts = random_prompts(rng, batch, ctx, engine.model_config.vocab_size)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, params)
    requests = [engine.scheduler.requests[rid] for rid in ids]
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in requests):  # prefill everything first
        engine.step()
    for _ in range(2):  # and let async scheduling reach its steady state
        engine.step()
    runner = engine.runner
    orig = runner.execute
    forward: list[float] = []

    def timed(b, *args, **kwargs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = orig(b, *args, **kwargs)
        torch.cuda.synchronize()
        forward.append(time.perf_counter() - t)
        return r

    def per_step_ms(n: int) -> float:
        """Wall time of n consecutive steps over n: with async scheduling a step's host work overlaps the
        GPU's, so only a run of steps (synchronised at its ends) shows the time a step really costs."""
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            engine.step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n * 1e3

    step_ms = per_step_ms(steps)
    profiled = None
    if profile:
        try:
            profiled = profile_steps(engine)
        except Exception:  # a profiler problem must not cost the run's figures
            log.exception("decode step profile at batch %d failed", batch)
    overlap = engine.async_scheduling
    engine.async_scheduling = False  # the same steps with the host work not overlapped, for comparison
    sync_step_ms = per_step_ms(max(4, steps // 4))
    engine.async_scheduling = overlap
    runner.execute = timed  # last: the forward alone, synchronised
    for _ in range(2):
        engine.step()
    runner.execute = orig
    engine.abort_request(ids)
    return {
        "step_ms": step_ms,
        "sync_step_ms": sync_step_ms,
        "forward_ms": statistics.median(forward) * 1e3 if forward else float("nan"),
        **({"profile": profiled} if profiled else {}),
    }


def prefill_step_ms(engine, tokens: int, prompt_len: int, profile: bool = False) -> dict[str, Any]:
    """Steps prefilling `tokens` tokens of `prompt_len`-token prompts (workload (a)'s shape), synchronised: the
    best of 3 (the first also pays lazy initialisation), and with `profile` the kernel time of one more by kind."""
    n = -(-tokens // prompt_len)
    vocab = engine.model_config.vocab_size

    def add(round_: int) -> None:
        rng = random.Random(tokens + round_)
        for i, prompt in enumerate(random_prompts(rng, n, prompt_len, vocab)):
            engine.add_request(f"prefill-probe-{round_}-{i}", prompt, SamplingParams(max_tokens=1, ignore_eos=True))

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    times = []
    for round_ in range(3):
        add(round_)
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
        drain()
    out: dict[str, Any] = {"tokens": tokens, "prompt_len": prompt_len, "step_ms": min(times), "all_ms": times}
    if profile:
        add(3)
        out["profile"] = profile_steps(engine, steps=1)
        drain()
    return out


# ---- transformers' continuous batching -------------------------------------------------------------
def run_hf(prompts_a: list[list[int]], out_a: int, prompts_b: list[list[int]], out_b: int) -> dict[str, Any]:
    import transformers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    c = LLAMA_3_1_8B
    cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta,
        rope_scaling=dict(c.rope_scaling or {}),
        tie_word_embeddings=False,
    )
    t = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="paged|sdpa")
    model.eval()
    init_s = time.perf_counter() - t
    out: dict[str, Any] = {"version": transformers.__version__, "attn_implementation": "paged|sdpa", "init_s": init_s}
    for key, prompts, n_out in (("a", prompts_a, out_a), ("b", prompts_b, out_b)):
        if not prompts:
            continue
        gen = GenerationConfig(max_new_tokens=n_out, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        results = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        n_in = sum(len(p) for p in prompts)
        n_gen = sum(len(r.generated_tokens) for r in results.values())
        out[key] = {
            "requests": len(prompts),
            "wall_s": wall,
            "output_tokens": n_gen,
            "output_tok_s": n_gen / wall,
            "total_tok_s": (n_in + n_gen) / wall,
        }
        log.info("transformers %s: %s", key, out[key])
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


# ---- report ----------------------------------------------------------------------------------------
def _ratio(x: float | None, y: float | None) -> str:
    if x is None or y is None or y == 0 or x != x:
        return "-"
    return f"{x / y:.2f}x"


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"
    return str(x)


def table(r: dict[str, Any]) -> str:
    """One table: our figure, vLLM's, ours/vLLM, transformers' (same run), ours/transformers, bound, ours/bound."""
    w = r.get("workloads", {})
    hf = r.get("transformers", {})
    d = r.get("decode", {})
    rows: list[tuple[str, Any, Any, Any, Any, bool]] = []  # name, ours, vllm, hf, bound, lower_is_better

    def get(key: str, field: str) -> float | None:
        return w.get(key, {}).get(field)

    rows.append(
        (
            "(a) total tok/s",
            get("a", "total_tok_s"),
            VLLM["a_total_tok_s"],
            hf.get("a", {}).get("total_tok_s"),
            BOUND["a_total_tok_s"],
            False,
        )
    )
    rows.append(
        (
            "(b) output tok/s",
            get("b", "output_tok_s"),
            VLLM["b_output_tok_s"],
            hf.get("b", {}).get("output_tok_s"),
            BOUND["b_output_tok_s"],
            False,
        )
    )
    rows.append(
        ("(c) output tok/s, prefix cache on", get("c_on", "output_tok_s"), VLLM["c_output_tok_s"], None, None, False)
    )
    rows.append(("(c) output tok/s, prefix cache off", get("c_off", "output_tok_s"), None, None, None, False))
    b1 = d.get("1", {})
    rows.append(("batch-1 decode ms/token", b1.get("step_ms"), VLLM["batch1_ms"], None, b1.get("roofline_ms"), True))
    for b in ("32", "128", "256"):
        x = d.get(b, {})
        rows.append((f"(d) decode step ms, batch {b}", x.get("step_ms"), None, None, x.get("roofline_ms"), True))
    rows.append(
        (
            "start-up s (weights in memory -> ready)",
            r.get("startup", {}).get("ready_s"),
            VLLM["startup_s"],
            None,
            None,
            True,
        )
    )
    head = "| figure | ours | vLLM 0.26 | ours/vLLM | transformers | ours/transformers | bound | ours/bound |"
    lines = [head, "|" + "---|" * 8]
    for name, ours, vllm, hfv, bound, lower in rows:
        inv = (lambda a, b: _ratio(b, a)) if lower else _ratio  # lower-is-better rows: ratio = speed ratio
        lines.append(
            f"| {name} | {_fmt(ours)} | {_fmt(vllm)} | {inv(ours, vllm)} | {_fmt(hfv)} | {inv(ours, hfv)} | "
            f"{_fmt(bound)} | {inv(ours, bound)} |"
        )
    lines.append("")
    lines.append("Ratios are speed ratios (>1 = faster than the other), also for the ms and s rows.")
    lines.append("")
    lines.append(
        "| workload | req/s | output tok/s | total tok/s | TTFT p50/p99 s | TPOT p50/p99 ms | peak alloc GiB |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for key, x in w.items():
        lines.append(
            f"| {key} ({x['requests']} req) | {x['requests_per_s']:.2f} | {x['output_tok_s']:,.0f} | "
            f"{x['total_tok_s']:,.0f} | "
            f"{x['ttft_p50_s']:.2f} / {x['ttft_p99_s']:.2f} | {x['tpot_p50_ms']:.1f} / {x['tpot_p99_ms']:.1f} | "
            f"{x['peak_allocated_gib']:.1f} |"
        )
    if d:
        lines.append("")
        lines.append(
            "| decode batch | engine step ms | same, synchronous steps | forward alone ms (synchronised) "
            "| roofline ms (GEMM + attention) | step/roofline |"
        )
        lines.append("|---|---|---|---|---|---|")
        for b, x in d.items():
            lines.append(
                f"| {b} | {x['step_ms']:.2f} | {x.get('sync_step_ms', float('nan')):.2f} | {x['forward_ms']:.2f} "
                f"| {x['roofline_ms']:.2f} "
                f"({x['roofline_gemm_ms']:.2f} + {x['roofline_attention_ms']:.2f}) | "
                f"{x['step_ms'] / x['roofline_ms']:.2f} |"
            )
    return "\n".join(lines)


def git_commit() -> str:
    """The commit measured: KUBELLM_GIT_COMMIT when set (a copied tree without .git), else git's HEAD."""
    if os.environ.get("KUBELLM_GIT_COMMIT"):
        return os.environ["KUBELLM_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(r: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tp = r.get("tensor_parallel_size", 1)
    stem = out_dir / f"engine-gpu-{r['date']}{r.get('name_suffix', '')}"
    stem.with_suffix(".json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    md = [
        f"# Engine on GPU — {r['date']}" + (f", tensor parallel {tp}" if tp > 1 else ""),
        "",
        f"{r['gpu']}{f' x {tp}' if tp > 1 else ''}, torch {r['torch']}, flashinfer {r.get('flashinfer', '-')}, "
        f"git {r['commit']}.",
        f"Model: Llama-3.1-8B shape, random bf16 weights. Scale: {r['scale']} of the issue's request counts"
        + (" (shrunk to fit the device time: counts below are the ones run)." if r["scale"] != 1 else "."),
        f"Engine: max_num_seqs {r['engine']['max_num_seqs']}, max_num_batched_tokens "
        f"{r['engine']['max_num_batched_tokens']}, gpu_memory_utilization {r['engine']['gpu_memory_utilization']}, "
        f"block 16, CUDA graphs {'off' if r['engine']['enforce_eager'] else 'on'}. "
        "(c) off = the same engine with prefix caching switched off.",
        f"Ceilings measured in this run: copy {r['ceilings']['copy_gb_s']:.0f} GB/s, bf16 matmul "
        f"{r['ceilings']['matmul_tflop_s']:.0f} TFLOP/s.",
        "",
        table(r),
        "",
    ]
    profile = []
    if r.get("prefill_probe"):
        pp = r["prefill_probe"]
        tflops = 2 * 8.03e9 * pp["tokens"] / (pp["step_ms"] / 1e3) / 1e12
        profile.append(
            f"- prefill step of {pp['tokens']} tokens ({pp.get('prompt_len', '?')}-token prompts, best of 3): "
            f"{pp['step_ms']:.0f} ms = {tflops:.0f} TFLOP/s on the weight GEMMs' FLOPs alone (ceiling "
            f"{r['ceilings']['matmul_tflop_s']:.0f}); the rest is attention, elementwise ops and the step's host work."
        )
        if pp.get("profile"):
            profile.append(describe_profile(f"that prefill step of {pp['tokens']} tokens", pp["profile"]))
    for b, x in (r.get("decode") or {}).items():
        if x.get("profile"):
            profile.append(describe_profile(f"decode step at batch {b}", x["profile"]))
    for key, x in (r.get("decode_attention_micro") or {}).items():
        profile.append(
            f"- decode attention alone, one layer, {key}, ctx 1024: {x['ms']:.3f} ms = {x['kv_tb_s']:.2f} TB/s"
        )
    for backend, x in (r.get("prefill_attention_micro") or {}).items():
        if "ms" in x:
            profile.append(
                f"- prefill attention alone, one layer, {backend}, 16 x 1024 causal: {x['ms']:.3f} ms = "
                f"{x['tflop_s']:.0f} TFLOP/s"
            )
        else:
            profile.append(f"- prefill attention alone, {backend}: {x.get('error')}")
    if profile:
        md += ["Where the time goes:", *profile, ""]
    if r.get("notes"):
        md += ["Notes:", *[f"- {n}" for n in r["notes"]], ""]
    stem.with_suffix(".md").write_text("\n".join(md))


def run_engine(
    args: argparse.Namespace, r: dict[str, Any], tp: int, out_dir: Path, left: Callable[[], float]
) -> tuple[list[list[int]], list[list[int]]]:
    """Build the engine at tensor parallel `tp`, run the chosen workloads into `r` (written after each phase),
    close it and free the GPUs. Returns the (a) and (b) prompts transformers would replay."""
    c = LLAMA_3_1_8B
    s = args.scale
    t = time.perf_counter()
    engine = build_engine(args, tp)
    runner = local_runner(engine)
    r["startup"] = {
        "engine_init_s": engine.startup_seconds,
        "weights_generation_s": TimedWeights.seconds,
        "ready_s": engine.startup_seconds - TimedWeights.seconds,
        "cuda_graph_capture_s": runner.graph_capture_seconds,
        "cuda_graphs": bool(runner._graphs),
        "kv_blocks": engine.kv.num_blocks,
        "kv_tokens": engine.kv.num_blocks * engine.config.block_size,
        "memory_profile": runner.memory_profile,
        "attention_backend": runner.attn.name,
    }
    log.info("TP %d startup: %s (wall %.1fs)", tp, r["startup"], time.perf_counter() - t)
    write_results(r, out_dir)
    rng = random.Random(0)
    wanted = args.workloads.split(",")
    phase_s = 90 * min(1.0, max(s, 0.25))  # time a workload phase needs left to be started (it shrinks with scale)
    hf_a: list[list[int]] = []
    hf_b: list[list[int]] = []
    try:
        if "d" in wanted:
            for b in [int(x) for x in args.decode_batches.split(",")]:
                if left() < 60:
                    r["notes"].append(f"(d) batch {b} skipped: out of time")
                    continue
                x = decode_step_times(engine, b, 1024, 32, profile=args.profile and b in (1, 256))
                ceil = r["ceilings"]
                roof = decode_roofline_ms(c, b, 1024 + 10, ceil["copy_gb_s"], ceil["matmul_tflop_s"])
                x.update(
                    roofline_ms=roof["total_ms"] / tp,
                    roofline_gemm_ms=roof["gemm_ms"] / tp,
                    roofline_attention_ms=roof["attention_ms"] / tp,
                )
                r["decode"][str(b)] = x
                log.info("TP %d decode batch %d: %s", tp, b, x)
            if left() > 60:
                r["prefill_probe"] = prefill_step_ms(engine, args.max_num_batched_tokens, 1024, profile=args.profile)
                log.info("prefill probe: %s", r["prefill_probe"])
            write_results(r, out_dir)
        if "a" in wanted and left() > phase_s:
            prompts = random_prompts(rng, max(1, round(1000 * s)), 1024, c.vocab_size)
            hf_a = prompts[: max(1, round(len(prompts) * args.hf_fraction))]
            r["workloads"]["a"] = run_workload(engine, prompts, 128, "a")
            write_results(r, out_dir)
        if "b" in wanted and left() > phase_s:
            prompts = random_prompts(rng, max(1, round(500 * s)), 200, c.vocab_size)
            hf_b = prompts[: max(1, round(len(prompts) * args.hf_fraction))]
            r["workloads"]["b"] = run_workload(engine, prompts, 1000, "b")
            write_results(r, out_dir)
        if "c" in wanted and left() > phase_s:
            n_prefix = max(1, round(100 * s))
            prefixes = random_prompts(rng, n_prefix, 1500, c.vocab_size)
            suffixes = random_prompts(rng, n_prefix * 10, 100, c.vocab_size)
            prompts = [prefixes[i // 10] + suffixes[i] for i in range(n_prefix * 10)]
            rng.shuffle(prompts)
            engine.reset_prefix_cache()
            r["workloads"]["c_on"] = run_workload(engine, prompts, 100, "c_on")
            write_results(r, out_dir)
            if left() > phase_s:
                engine.kv.enable_prefix_caching = False
                engine.reset_prefix_cache()
                r["workloads"]["c_off"] = run_workload(engine, prompts, 100, "c_off")
                engine.kv.enable_prefix_caching = True
                write_results(r, out_dir)
        r["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        free, total = torch.cuda.mem_get_info()
        r["device_used_gib_at_end"] = (total - free) / 2**30
        write_results(r, out_dir)
    finally:
        engine.close()  # tensor-parallel workers exit and free their GPUs
        del engine, runner
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free, total = torch.cuda.mem_get_info()
        r["device_used_gib_after_close"] = (total - free) / 2**30  # what the next size's rank 0 cannot have
        log.info("TP %d closed: %.1f GiB still used on GPU 0", tp, r["device_used_gib_after_close"])
    return hf_a, hf_b


def tp_summary(r: dict[str, Any]) -> dict[str, Any]:
    w, d = r.get("workloads", {}), r.get("decode", {})
    return {
        "a_total_tok_s": w.get("a", {}).get("total_tok_s"),
        "a_tpot_p50_ms": w.get("a", {}).get("tpot_p50_ms"),
        "b_output_tok_s": w.get("b", {}).get("output_tok_s"),
        "b_tpot_p50_ms": w.get("b", {}).get("tpot_p50_ms"),
        "batch1_ms": d.get("1", {}).get("step_ms"),
        "batch1_forward_ms": d.get("1", {}).get("forward_ms"),
        "batch1_roofline_ms": d.get("1", {}).get("roofline_ms"),
        "startup_ready_s": r.get("startup", {}).get("ready_s"),
        "cuda_graphs": r.get("startup", {}).get("cuda_graphs"),
        "kv_tokens": r.get("startup", {}).get("kv_tokens"),
    }


def tp_table(r: dict[str, Any]) -> str:
    """TP N against TP 1: throughputs (higher is better) and batch-1 ms/token as a fraction of TP 1's."""
    rows = r.get("tp", {})
    base = rows.get("1", {})
    lines = [
        "| TP | (a) total tok/s | vs TP 1 | (b) output tok/s | vs TP 1 | (a)/(b) TPOT p50 ms | batch-1 ms/token "
        "| / TP 1 | batch-1 GPU forward ms | roofline ms | CUDA graphs | KV tokens |",
        "|" + "---|" * 12,
    ]
    for tp, x in rows.items():
        a, b, m = x.get("a_total_tok_s"), x.get("b_output_tok_s"), x.get("batch1_ms")
        frac = f"{m / base['batch1_ms']:.2f}" if m and base.get("batch1_ms") else "-"
        tpots = f"{_fmt(x.get('a_tpot_p50_ms'))} / {_fmt(x.get('b_tpot_p50_ms'))}"
        lines.append(
            f"| {tp} | {_fmt(a)} | {_ratio(a, base.get('a_total_tok_s'))} | {_fmt(b)} | "
            f"{_ratio(b, base.get('b_output_tok_s'))} | {tpots} | {_fmt(m)} | {frac} | "
            f"{_fmt(x.get('batch1_forward_ms'))} | {_fmt(x.get('batch1_roofline_ms'))} | {x.get('cuda_graphs')} | "
            f"{_fmt(x.get('kv_tokens'))} |"
        )
    two, one = rows.get(str(TP_TARGET["tp"]), {}).get("batch1_ms"), base.get("batch1_ms")
    if two and one:
        ok = two <= TP_TARGET["batch1_ratio"] * one
        lines += [
            "",
            f"Target (batch-1 ms/token at TP 2 <= {TP_TARGET['batch1_ratio']}x TP 1): {two:.2f} / {one:.2f} = "
            f"{two / one:.2f} -> {'met' if ok else 'NOT met'}.",
        ]
    return "\n".join(lines)


def write_tp_summary(r: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"engine-gpu-{r['date']}-tp"
    keep = {k: v for k, v in r.items() if k not in ("workloads", "decode")}
    stem.with_suffix(".json").write_text(json.dumps(keep, indent=2, default=str) + "\n")
    sizes = ", ".join(r.get("tp", {}))
    md = [
        f"# Engine on GPU — tensor parallel {sizes} — {r['date']}",
        "",
        f"{r['gpu']} (one per rank), torch {r['torch']}, flashinfer {r.get('flashinfer', '-')}, git {r['commit']}.",
        f"Model: Llama-3.1-8B shape, random bf16 weights (each rank draws its shards). Scale {r['scale']}. "
        f"Per-size details: engine-gpu-{r['date']}-tp<N>.md.",
        "",
        tp_table(r),
        "",
    ]
    if r.get("notes"):
        md += ["Notes:", *[f"- {n}" for n in r["notes"]], ""]
    stem.with_suffix(".md").write_text("\n".join(md))


# ---- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiply every request count")
    p.add_argument("--hf-fraction", type=float, default=0.1, help="share of (a) and (b) run by transformers")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--hf-from", help="take transformers' figures from an earlier results JSON of the same GPU kind")
    p.add_argument("--workloads", default="d,a,b,c", help="comma list of d,a,b,c")
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--profile", action="store_true", help="(d): profile decode steps at batch 1 and 256")
    p.add_argument(
        "--prefill-backends", default="", help="time flashinfer prefill attention on these backends (e.g. fa2,fa3)"
    )
    p.add_argument("--decode-batches", default="1,32,128,256")
    p.add_argument("--deadline-s", type=float, default=1e9, help="skip phases that would not finish by then")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument(
        "--tensor-parallel-size", default="1", help="GPUs per engine; a comma list (1,2,4) runs each in turn"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.perf_counter()
    left = lambda: args.deadline_s - (time.perf_counter() - t0)  # noqa: E731

    device = torch.device("cuda")
    try:
        import flashinfer

        fi_version = flashinfer.__version__
    except ImportError:
        fi_version = None
    s = args.scale
    r: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "flashinfer": fi_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "scale": s,
        "engine": {
            k: getattr(args, k)
            for k in (
                "max_num_seqs",
                "max_num_batched_tokens",
                "max_model_len",
                "gpu_memory_utilization",
                "enforce_eager",
            )
        },
        "anchors": {"vllm": VLLM, "transformers": HF, "bounds": BOUND, "targets": TARGET},
        "workloads": {},
        "decode": {},
        "notes": [],
    }
    out_dir = Path(args.out_dir)
    r["ceilings"] = measure_ceilings(device)
    log.info("ceilings: %s", r["ceilings"])
    # Decode attention alone, both flashinfer decode kernels; the engine then uses the faster at batch 256.
    micro = {}
    batches = (1, 8, 32, 256)
    for tc in (False, True):
        for b in batches:
            micro[f"{'tensor_core' if tc else 'cuda_core'}_b{b}"] = decode_attention_micro(b, 1024, tc)
    r["decode_attention_micro"] = micro
    use_tc = micro["tensor_core_b256"]["ms"] < micro["cuda_core_b256"]["ms"]
    os.environ["KUBELLM_DECODE_TENSOR_CORES"] = "1" if use_tc else "0"
    r["engine"]["decode_tensor_cores"] = use_tc
    log.info("decode attention alone (1 layer, ctx 1024): %s -> tensor cores %s", micro, use_tc)
    if args.prefill_backends:  # measured only: the engine keeps its default (KUBELLM_PREFILL_BACKEND overrides)
        r["prefill_attention_micro"] = {b: prefill_attention_micro(b) for b in args.prefill_backends.split(",")}
        log.info("prefill attention alone (1 layer, 16 x 1024 causal): %s", r["prefill_attention_micro"])
    torch.cuda.empty_cache()

    sizes = [int(x) for x in str(args.tensor_parallel_size).split(",")]
    sweep = sizes != [1]
    hf_a: list[list[int]] = []
    hf_b: list[list[int]] = []
    tp_results: dict[int, dict[str, Any]] = {}
    for i, tp in enumerate(sizes):
        rt = json.loads(json.dumps(r, default=str)) if sweep else r
        rt["tensor_parallel_size"] = tp
        rt["name_suffix"] = f"-tp{tp}" if sweep else ""
        if torch.cuda.device_count() < tp:
            log.warning("TP %d skipped: torch sees %d GPUs", tp, torch.cuda.device_count())
            r["notes"].append(f"TP {tp} skipped: {torch.cuda.device_count()} GPUs")
            continue
        if left() < 120:
            r["notes"].append(f"TP {tp} skipped: out of time")
            continue
        end = time.perf_counter() + left() / (len(sizes) - i)  # an equal share of what is left for each size
        left_here = lambda end=end: min(left(), end - time.perf_counter())  # noqa: E731
        prompts_a, prompts_b = run_engine(args, rt, tp, out_dir, left_here)
        if tp == 1:
            hf_a, hf_b = prompts_a, prompts_b
        tp_results[tp] = rt
        if sweep:
            r["tp"] = {str(k): tp_summary(v) for k, v in tp_results.items()}
            write_tp_summary(r, out_dir)
    if sweep:
        r["bench_wall_s"] = time.perf_counter() - t0
        write_tp_summary(r, out_dir)
        for rt in tp_results.values():
            print(table(rt), flush=True)
        print(tp_table(r), flush=True)
        return 0

    if args.hf_from:
        earlier = json.loads(Path(args.hf_from).read_text())
        r["transformers"] = dict(earlier["transformers"], source=f"{args.hf_from} (commit {earlier.get('commit')})")
        r["notes"].append(
            f"transformers figures from an earlier run on the same GPU kind ({args.hf_from}, {earlier.get('date')}): "
            "its code path is untouched by our commits, and rerunning it costs ~3 minutes of device time"
        )
    elif not args.skip_hf and (hf_a or hf_b):
        # transformers runs ~15-30x slower: estimate from its anchors and shrink to what time allows.
        need = sum(len(p) + 128 for p in hf_a) / HF["a_total_tok_s"] + len(hf_b) * 1000 / HF["b_output_tok_s"] + 40
        if need > left():
            f = max(0.0, (left() - 40) / need)
            hf_a, hf_b = hf_a[: int(len(hf_a) * f)], hf_b[: int(len(hf_b) * f)]
            r["notes"].append(
                f"transformers subset shrunk to {len(hf_a)} (a) and {len(hf_b)} (b) requests to fit the time"
            )
        if hf_a or hf_b:
            try:
                r["transformers"] = run_hf(hf_a, 128, hf_b, 1000)
            except Exception as e:  # the peer failing must not lose our results
                log.exception("transformers continuous batching failed")
                r["notes"].append(f"transformers failed: {type(e).__name__}: {e}")
    r["bench_wall_s"] = time.perf_counter() - t0
    write_results(r, out_dir)
    print(table(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
