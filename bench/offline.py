"""Offline engine benchmark on one GPU, our engine and the peer (vLLM 0.26.0) side by side on the same machine.

    python -m bench.offline --peer vllm --scale 0.5          # vLLM first (own process), then ours; one table
    python -m bench.offline --peer-json /tmp/peer.json       # ours, compared with a peer run made earlier on this
                                                             # machine by bench.peer_vllm (same GPU UUID required)
    python -m bench.offline --shape qwen3-30b-a3b --workloads 1,a,b --gpu-memory-utilization 0.95
    python -m bench.offline --tensor-parallel-size 1,2,4 --workloads d,a,b --decode-batches 1
                                                             # the same engine at TP 1, 2 and 4, one after another

Shapes: bench/shapes.py (HF config.json contents both engines read; random bf16 weights). Workloads, prompts, sampling
parameters and engine limits: bench/workloads.py, the same for both engines:
  (a) 1000 x 1024 in / 128 out       (b) 500 x 200 in / 1000 out
  (c) 100 shared 1500-token prefixes x 10 suffixes of 100 tokens, 100 out; prefix caching on (ours also off)
  (1) batch-1 decode ms/token: one 1024-token prompt timed to 1 and to 257 output tokens, (t257 - t1) / 256
  (d) ours only: decode step time at batch 1/32/128/256 with 1024-token prompts, against its roofline.
Bounds (bench/bounds.py) come from the device-copy bandwidth and bf16 matmul rate measured in this run. Ratios are
printed only against figures measured in this run on this GPU; what was not measured says so.
Results: bench/results/engine-gpu-<date>-<shape>[-name].json/.md, written after every phase, so a run stopped
by its time limit still leaves what it measured.

Tensor parallelism (`--tensor-parallel-size`, one size or a comma list): every rank draws its own shards of the
same random weights on its GPU (engine/random_model.py's RandomRecipe); each size writes its own results
(engine-gpu-<date>-tp<N>.json/.md) and a sweep adds engine-gpu-<date>-tp.json/.md comparing them against TP 1,
with the [tensor-parallel] issue's target: batch-1 decode ms/token at TP 2 <= 0.65x TP 1. Bounds at TP N are
the one-GPU bounds scaled for N GPUs (weights and KV split evenly; the all-reduces are not in them).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench import bounds, kernel_kinds, report
from bench.cuda_timing import event_ms, graph_ms
from bench.expert_routing import hits_line, moe_shape, watch_routing
from bench.gpu_info import gpu_identity
from bench.peer_vllm import peer_command
from bench.result_files import git_commit
from bench.shapes import shape
from bench.step_profile import describe as describe_profile
from bench.step_profile import profile_steps
from bench.workloads import (
    BATCH1_OUT,
    BATCH1_PROMPT,
    PROBE_CTX,
    PROFILE_BATCHES,
    WORKLOADS,
    EngineSettings,
    Sampling,
    Workload,
    decode_probe,
    prefill_probe,
)
from kubellm.engine.config import EngineConfig
from kubellm.engine.model_config import ModelConfig, UnsupportedModelError
from kubellm.engine.outputs import OutputKind
from kubellm.engine.random_model import LLAMA_3_1_8B, RandomWeights, random_loaded_model
from kubellm.engine.sampling_params import SamplingParams

TP_TARGET = {"tp": 2, "batch1_ratio": 0.65}  # [tensor-parallel]: batch-1 ms/token at TP 2 <= 0.65x TP 1

log = logging.getLogger("bench.offline")


# ---- ceilings and roofline -------------------------------------------------------------------------
def measure_ceilings(device: torch.device, fp8: bool = False) -> dict[str, float]:
    """Device copy GB/s (bytes read + written) and bf16 matmul TFLOP/s, each the mean of 10 after warm-up; with fp8,
    the FP8 tensor-core rate too (bench/fp8_micro.py's _scaled_mm probe), for the bounds of FP8 runs."""
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
    out = {"copy_gb_s": copy_gbs, "matmul_tflop_s": 2 * n**3 / t / 1e12}
    if fp8:
        from bench.fp8_micro import fp8_matmul_tflops

        out["fp8_matmul_tflop_s"] = fp8_matmul_tflops()
        torch.cuda.empty_cache()
    return out


def run_precision(r: dict[str, Any]) -> bounds.Precision:
    st = r["settings"]
    return bounds.Precision.of_run(st.get("quantization"), st.get("kv_cache_dtype"))


def _cuda_time(fn: Callable[[], Any], iters: int) -> float:
    """Seconds per call (bench.cuda_timing.event_ms)."""
    return event_ms(fn, iters) / 1e3


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
        out["in_graph_ms"] = graph_ms(lambda: [attn._decode[None].run(q, cache) for _ in range(32)], 10) / 32
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


def build_engine(model: ModelConfig, name: str, settings: EngineSettings):
    from kubellm.engine.llm_engine import LLMEngine

    # The recipe (seed 0, bf16, drawn on CUDA) is what the other ranks rebuild: the same weights as rank 0's.
    loaded = random_loaded_model(model, torch.bfloat16, "cuda", seed=0, name=name)
    loaded.weights = TimedWeights(model, torch.bfloat16, "cuda", seed=0)  # type: ignore[assignment]
    quantization = settings.quantization
    if quantization == "fp8-block":  # a block-scaled FP8 checkpoint, quantized from the random weights at load
        from bench.fp8_checkpoint import BLOCK_SCHEME, BlockFp8Checkpoint
        from kubellm.engine.loader.fp8_weights import Fp8Weights

        loaded.weights = Fp8Weights(BlockFp8Checkpoint(loaded.weights), BLOCK_SCHEME, torch.bfloat16)  # type: ignore[assignment]
        loaded.quantization, quantization = BLOCK_SCHEME, None
    config = EngineConfig(
        tensor_parallel_size=settings.tensor_parallel_size,
        model=name,
        device="cuda",
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        block_size=settings.block_size,
        enable_prefix_caching=settings.enable_prefix_caching,
        enforce_eager=settings.enforce_eager,
        quantization=quantization,
        kv_cache_dtype=settings.kv_cache_dtype,
        generation_config="vllm",
        seed=settings.seed,
    )
    TimedWeights.seconds = 0.0
    engine = LLMEngine(config, loaded=loaded)
    engine.output_kind = OutputKind.FINAL_ONLY  # as vLLM's offline LLM: no per-step outputs of unfinished requests
    torch.cuda.synchronize()
    return engine


def local_runner(engine):
    """Rank 0's ModelRunner (the engine's runner itself at TP 1): graph counters, memory profile, backend."""
    return getattr(engine.runner, "inner", engine.runner)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **asdict(Sampling()))


def generate(engine, prompts: list[list[int]], max_tokens: int, label: str) -> tuple[float, list[Any]]:
    """Submit every prompt at once and step until all finish, as vLLM's LLM.generate does: wall time, final outputs."""
    params = _params(max_tokens)
    torch.cuda.synchronize()
    start, arrival = time.perf_counter(), time.time()
    for i, p in enumerate(prompts):
        engine.add_request(f"{label}-{i}", p, params, arrival_time=arrival)
    finished = []
    while engine.has_unfinished_requests():
        finished += [out for out in engine.step() if out.finished]
    return time.perf_counter() - start, finished


def run_workload(engine, w: Workload) -> dict[str, Any]:
    """One workload; throughput per second of wall time, tokens counted by the engine's own counters."""
    prompts = w.prompts(engine.model_config.vocab_size)
    runner = local_runner(engine)
    before = engine.stats()
    replays0 = getattr(runner, "graph_replays", 0)
    wall, outs = generate(engine, prompts, w.max_tokens, w.key)
    stats = engine.stats()
    n_in = stats.prompt_tokens - before.prompt_tokens
    n_out = stats.generation_tokens - before.generation_tokens
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs if o.metrics.first_token_time]
    tpot = [
        (o.metrics.last_token_time - o.metrics.first_token_time) / (w.max_tokens - 1)
        for o in outs
        if o.metrics.first_token_time and o.metrics.last_token_time and w.max_tokens > 1
    ]
    res = {
        "requests": len(prompts),
        "finished": len(outs),
        "errors": sum(1 for o in outs if o.error),
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
        "preemptions": stats.num_preemptions - before.num_preemptions,
        "prefix_hit_rate": (stats.prefix_hits - before.prefix_hits)
        / max(1, stats.prefix_queries - before.prefix_queries),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "cuda_graph_replays": getattr(runner, "graph_replays", 0) - replays0,
    }
    log.info("%s: %s", w.key, {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})
    return res


def batch1(engine) -> dict[str, Any]:
    """ms/token of one request, the peer's method (bench/peer_vllm.py): (t(1 + N tokens) - t(1 token)) / N."""
    prompt = Workload("batch1", 1, BATCH1_PROMPT, 1, seed=4).prompts(engine.model_config.vocab_size)
    generate(engine, prompt, 1, "b1-warm")  # caches the prompt: every timed run below prefills the same way
    t1 = min(generate(engine, prompt, 1, f"b1-first-{i}")[0] for i in range(3))
    tn = min(generate(engine, prompt, 1 + BATCH1_OUT, f"b1-all-{i}")[0] for i in range(2))
    return {"ms_per_token": (tn - t1) / BATCH1_OUT * 1e3, "t_first_s": t1, "t_all_s": tn}


def decode_step_times(engine, batch: int, ctx: int, steps: int, profile: bool = False) -> dict[str, Any]:
    """Median engine step and GPU forward time of pure decode steps of `batch` sequences at ~ctx tokens."""
    # Long enough that nobody finishes while measured (the first requests decode while later ones prefill).
    params = _params(2 * steps + 64)
    prompts = decode_probe(batch, ctx).prompts(engine.model_config.vocab_size)
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


def prefill_step_ms(
    engine, tokens: int, prompt_len: int, profile: bool = False, absorbed: bool = False
) -> dict[str, Any]:
    """Steps prefilling `tokens` tokens of `prompt_len`-token prompts (workload (a)'s shape), synchronised: the
    best of 3 (the first also pays lazy initialisation), and with `profile` the kernel time of one more by kind.
    `absorbed`: an engine started with MLA up-projection (--mla-upproject-min-tokens) runs these steps with it
    switched off (rank 0's backend; TP 1), on prompts of their own: the A/B of the two paths in one process."""
    attn = local_runner(engine).attn
    if absorbed:
        saved = attn.upproject_min_tokens
        attn.upproject_min_tokens = 0
        try:
            return {**_prefill_steps(engine, tokens, prompt_len, profile, rounds_from=10), "absorbed": True}
        finally:
            attn.upproject_min_tokens = saved
    return _prefill_steps(engine, tokens, prompt_len, profile, rounds_from=0)


def _prefill_steps(engine, tokens: int, prompt_len: int, profile: bool, rounds_from: int) -> dict[str, Any]:
    vocab = engine.model_config.vocab_size

    def add(round_: int) -> None:
        for i, prompt in enumerate(prefill_probe(tokens, prompt_len, round_).prompts(vocab)):
            engine.add_request(f"prefill-probe-{round_}-{i}", prompt, SamplingParams(max_tokens=1, ignore_eos=True))

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    attn = local_runner(engine).attn
    up_before = getattr(attn, "upprojected_tokens", None)  # MLA: rows that attended up-projected (rank 0)
    times = []
    for round_ in range(rounds_from, rounds_from + 3):  # each round its own prompts: no prefix-cache hits
        add(round_)
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
        drain()
    out: dict[str, Any] = {"tokens": tokens, "prompt_len": prompt_len, "step_ms": min(times), "all_ms": times}
    if up_before is not None:  # the timed steps' rows up-projected (--mla-upproject-min-tokens), 0 when absorbed
        out["mla_upprojected_rows_per_step"] = (attn.upprojected_tokens - up_before) / 3
    if profile:
        add(rounds_from + 3)
        try:
            out["profile"] = profile_steps(engine, steps=1)
        except Exception as e:  # a profiler problem must not cost the run's figures (as decode_step_times)
            log.exception("prefill step profile failed")
            out["profile_error"] = f"{type(e).__name__}: {e}"[:300]
        drain()
    return out


def write_results(r: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"engine-gpu-{r['date']}{r.get('name_suffix', '')}"
    stem.parent.joinpath(stem.name + ".json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    try:
        md = results_markdown(r)
    except Exception:  # (a figure missing or malformed must not end a run whose JSON was just written whole)
        log.exception("the results' markdown failed; %s.json holds them", stem)
        md = f"(the markdown summary failed; {stem.name}.json holds the results)\n"
    stem.parent.joinpath(stem.name + ".md").write_text(md)


def results_markdown(r: dict[str, Any]) -> str:
    tp = r.get("tensor_parallel_size", 1)
    st, peer = r["settings"], r.get("peer") or {}
    peer_name = f"vLLM {peer['version']}" if peer.get("version") else "the peer"
    md = [
        f"# Engine on GPU, {r['shape']} shape, beside {peer_name} — {r['date']}"
        + (f", tensor parallel {tp}" if tp > 1 else ""),
        "",
        f"{r['gpu']}{f' x {tp}' if tp > 1 else ''} ({', '.join(g['uuid'] for g in r['gpu_identity'].get('gpus', []))}),"
        f" torch {r['torch']}, flashinfer {r.get('flashinfer', '-')}, git {r['commit']}, {r['started']}.",
        f"Command: `{r['command']}`"
        + (
            f" with KUBELLM_PREFILL_BACKEND={r['prefill_backend']}."
            if r.get("prefill_backend", "fa2") != "fa2"
            else "."
        )
        + (
            f" KUBELLM_MLA_DECODE_BACKEND={r['mla_decode_backend']}."
            if r.get("mla_decode_backend", "prefill") != "prefill"
            else ""
        )
        + (
            f" FP8 GEMM routes: KUBELLM_FP8_GEMM={r['fp8_gemm']}, KUBELLM_FP8_SPLITK={int(r.get('fp8_splitk', True))}."
            if st.get("quantization") and r.get("fp8_gemm")
            else ""
        ),
        f"Model: {r['shape']} shape (bench/shapes.py), random bf16 weights"
        + (f" (both engines: quantization {st['quantization']})" if st.get("quantization") else "")
        + (f", KV cache {st['kv_cache_dtype']}" if st.get("kv_cache_dtype") not in (None, "auto") else "")
        + f". Scale: {r['scale']} of the request counts"
        + (" (the counts below are the ones run)." if r["scale"] != 1 else "."),
        f"Both engines: max_num_seqs {st['max_num_seqs']}, max_num_batched_tokens {st['max_num_batched_tokens']}, "
        f"max_model_len {st['max_model_len']}, gpu_memory_utilization {st['gpu_memory_utilization']}, block "
        f"{st['block_size']}, prefix caching {'on' if st['enable_prefix_caching'] else 'off'}, CUDA graphs "
        f"{'off' if st['enforce_eager'] else 'on'}, seed {st['seed']}; every request: {r['sampling']}, all arriving at "
        "once. (c) off = our engine with prefix caching switched off.",
        f"Ceilings measured in this run: copy {r['ceilings']['copy_gb_s']:.0f} GB/s, bf16 matmul "
        f"{r['ceilings']['matmul_tflop_s']:.0f} TFLOP/s"
        + (
            f", FP8 matmul {r['ceilings']['fp8_matmul_tflop_s']:.0f} TFLOP/s"
            if r["ceilings"].get("fp8_matmul_tflop_s")
            else ""
        )
        + "; bounds (bench/bounds.py) are computed from them"
        + (
            f" with the run's precision (layers' weights {run_precision(r).weight_bytes} byte(s), KV "
            f"{run_precision(r).kv_bytes} byte(s) an element; embeddings and LM head bf16)."
            if run_precision(r) != bounds.BF16
            else "."
        ),
        "",
        report.table(r),
        "",
    ]
    profile = []
    if r.get("prefill_probe"):
        pp = r["prefill_probe"]
        flops = bounds.flops_per_token(shape(r["shape"]), pp["prompt_len"] // 2) * pp["tokens"]
        tflops = flops / (pp["step_ms"] / 1e3) / 1e12
        profile.append(
            f"- prefill step of {pp['tokens']} tokens ({pp.get('prompt_len', '?')}-token prompts, best of 3): "
            f"{pp['step_ms']:.0f} ms = {tflops:.0f} TFLOP/s on the step's matmul FLOPs (ceiling "
            f"{r['ceilings']['matmul_tflop_s']:.0f}); the rest is attention, elementwise ops and the step's host work."
        )
        if "mla_upprojected_rows_per_step" in pp:
            profile.append(
                f"- MLA attention of that prefill step: {pp['mla_upprojected_rows_per_step']:.0f} of its "
                f"{pp['tokens']} query rows up-projected (mla_upproject_min_tokens "
                f"{r.get('mla_upproject_min_tokens', 0)}), the rest absorbed"
            )
        if pp.get("profile"):
            profile.append(describe_profile(f"that prefill step of {pp['tokens']} tokens", pp["profile"]))
        ab = r.get("prefill_probe_absorbed")
        if ab:
            profile.append(
                f"- the same prefill step with up-projection switched off in this engine (every row absorbed, prompts "
                f"of their own): {ab['step_ms']:.0f} ms (best of 3) against {pp['step_ms']:.0f} ms up-projected "
                f"({ab['step_ms'] / pp['step_ms']:.2f}x)"
            )
            if ab.get("profile"):
                profile.append(describe_profile("that all-absorbed prefill step", ab["profile"]))
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
    md += routing_lines(r)
    side = profiles_side_by_side(r)
    if side:
        md += [
            "Step profiles side by side (per step; kernel ms by kind with the kernel count in brackets, "
            "bench/kernel_kinds.py; host phases overlap the GPU under async scheduling; profiled steps run a little "
            "slower than unprofiled ones):",
            "",
            *side,
        ]
    if r.get("notes"):
        md += ["Notes:", *[f"- {n}" for n in r["notes"]], ""]
    return "\n".join(md)


def routing_lines(r: dict[str, Any]) -> list[str]:
    """MoE shapes: the distinct experts each layer hit in one prefill step, ours and the peer's (bench/
    expert_routing.py), and what the peer's routing weights were re-drawn to; nothing for dense shapes."""
    peer = r.get("peer") or {}
    if "experts_hit" not in r and "experts_hit" not in peer:
        return []
    name = f"vLLM {peer['version']}" if peer.get("version") else "the peer"
    lines = [f"- {hits_line('ours', r.get('experts_hit'))}"]
    if peer and not (peer.get("error") and not peer.get("experts_hit")):
        lines.append(f"- {hits_line(name, peer.get('experts_hit'))}")
        reinit = peer.get("routing_reinit")
        if reinit is None:
            lines.append(
                f"- {name}: its dummy routing weights were NOT re-drawn (a run before bench/expert_routing.py)"
            )
        elif reinit.get("counts"):
            lines.append(
                f"- {name}: after its dummy load, routing weights re-drawn to our random model's distribution "
                f"(norms 1, embedding N(0, {reinit['embed_std']}), gates N(0, {reinit['std']})): {reinit['counts']}"
            )
        else:
            lines.append(f"- {name}: routing weights not re-drawn ({reinit.get('error') or reinit.get('skipped')})")
    return ["Routing (vLLM's dummy weights route every DeepSeek token alike: bench/expert_routing.py):", *lines, ""]


def experts_hit_ours(engine, moe: tuple[int, int], tokens: int, prompt_len: int = PROBE_CTX) -> dict[str, Any]:
    """Distinct experts per MoE layer of rank 0 in one prefill step of `tokens` fresh tokens (prefill_probe's
    prompts, the count bench.peer_vllm takes of vLLM): eager (past the CUDA-graph batch sizes), so SparseMoE's
    routed_experts is seen."""
    vocab = engine.model_config.vocab_size
    prompts = prefill_probe(tokens, prompt_len, 5).prompts(vocab)
    ids = [f"experts-hit-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    try:
        with watch_routing(local_runner(engine).model, moe[0]) as watch:
            for _ in range(8):  # the first step launches the forward; a few more only if it scheduled nothing
                engine.step()
                if watch.rows:
                    break
            return watch.summary(moe[1])
    finally:
        while engine.has_unfinished_requests():
            engine.step()


def run_engine(
    args: argparse.Namespace, r: dict[str, Any], settings: EngineSettings, out_dir: Path, left: Callable[[], float]
) -> None:
    """Build the engine, run the chosen workloads into `r` (written after each phase), close it and free the GPUs."""
    cfg = shape(args.shape)
    model = ModelConfig.from_hf_config(cfg)
    tp = settings.tensor_parallel_size
    t = time.perf_counter()
    engine = build_engine(model, f"random-{args.shape}", settings)
    runner = local_runner(engine)
    r["startup"] = {
        "engine_init_s": engine.startup_seconds,
        "weights_generation_s": TimedWeights.seconds,
        "ready_s": engine.startup_seconds - TimedWeights.seconds,
        "cuda_graph_capture_s": runner.graph_capture_seconds,
        "cuda_graphs": bool(runner._graphs),
        "kv_blocks": engine.kv.num_blocks,
        "kv_tokens": engine.kv.num_blocks * engine.config.block_size,
        # what one cached token costs on this rank, all layers (MLA: one latent row per layer, no K and V)
        "kv_bytes_per_token": runner.kv_cache_bytes_per_block() // engine.config.block_size,
        "memory_profile": runner.memory_profile,
        "attention_backend": runner.attn.name,
    }
    log.info("TP %d startup: %s (wall %.1fs)", tp, r["startup"], time.perf_counter() - t)
    set_bounds(r, cfg)
    moe = moe_shape(cfg)
    if moe is not None:
        try:
            r["experts_hit"] = experts_hit_ours(engine, moe, settings.max_num_batched_tokens)
        except Exception as e:  # a count that fails costs itself only
            log.exception("counting the experts hit failed")
            r["experts_hit"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        log.info(hits_line("ours", r["experts_hit"]))
    write_results(r, out_dir)
    wanted = args.workloads.split(",")
    phase_s = 90 * min(1.0, max(args.scale, 0.25))  # time a workload phase needs left to be started
    try:
        if "1" in wanted and left() > 60:
            r["batch1"] = batch1(engine)
            log.info("batch-1 decode: %s", r["batch1"])
            write_results(r, out_dir)
        if "d" in wanted:
            for b in [int(x) for x in args.decode_batches.split(",")]:
                if left() < 60:
                    r["notes"].append(f"(d) batch {b} skipped: out of time")
                    continue
                x = decode_step_times(engine, b, PROBE_CTX, 32, profile=args.profile and b in PROFILE_BATCHES)
                roof = bounds.decode_step_ms(
                    cfg, b, PROBE_CTX + 10, bounds.Ceilings(**r["ceilings"]), tp, run_precision(r)
                )
                x.update(
                    roofline_ms=roof["total_ms"],
                    roofline_gemm_ms=roof["gemm_ms"],
                    roofline_attention_ms=roof["attention_ms"],
                )
                r["decode"][str(b)] = x
                log.info("TP %d decode batch %d: %s", tp, b, x)
            if left() > 60:
                r["prefill_probe"] = prefill_step_ms(
                    engine, settings.max_num_batched_tokens, PROBE_CTX, profile=args.profile
                )
                log.info("prefill probe: %s", r["prefill_probe"])
            if r.get("mla_upproject_min_tokens") and tp == 1 and left() > 60:  # the same steps absorbed, for the A/B
                r["prefill_probe_absorbed"] = prefill_step_ms(
                    engine, settings.max_num_batched_tokens, PROBE_CTX, profile=args.profile, absorbed=True
                )
                log.info("prefill probe, up-projection off: %s", r["prefill_probe_absorbed"])
            write_results(r, out_dir)
        for key in ("a", "b", "c"):
            if key not in wanted:
                continue
            if left() < phase_s:
                r["notes"].append(f"({key}) skipped: out of time")
                continue
            w = WORKLOADS[key].scaled(args.scale)
            if key != "c":
                r["workloads"][key] = run_workload(engine, w)
            else:
                engine.reset_prefix_cache()
                r["workloads"]["c_on"] = run_workload(engine, replace(w, key="c_on"))
                if left() > phase_s:
                    engine.kv.enable_prefix_caching = False
                    engine.reset_prefix_cache()
                    r["workloads"]["c_off"] = run_workload(engine, replace(w, key="c_off"))
                    engine.kv.enable_prefix_caching = True
            write_results(r, out_dir)
        if hasattr(runner.attn, "upprojected_tokens"):  # MLA: query rows that attended up-projected (rank 0)
            r["mla_upprojected_tokens"] = runner.attn.upprojected_tokens
            r["mla_upproject_deferred_tokens"] = runner.attn.upproject_deferred_tokens  # long, but past the bound
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


def set_bounds(r: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Bounds of (a), (b) and batch-1 from this run's ceilings, scaled for the run's GPUs and our KV pool."""
    tp = r["settings"]["tensor_parallel_size"]
    kv = (r.get("startup") or {}).get("kv_tokens")
    a, b = (WORKLOADS[k].scaled(r["scale"]) for k in ("a", "b"))
    r["bounds"] = bounds.workload_bounds(cfg, bounds.Ceilings(**r["ceilings"]), a, b, tp, kv, run_precision(r))
    r["bound_notes"] = [
        f"Bounds: (a) every token's matmul FLOPs at the measured rate; (b) {r['bounds']['b_batch']} requests decoding"
        " at once at their mean context, each step at its roofline (prefill not counted); batch-1: one decode step's"
        f" roofline at {BATCH1_PROMPT + BATCH1_OUT // 2} tokens of context" + (f"; {tp} GPUs" if tp > 1 else "") + "."
    ]


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
        tpots = f"{report.fmt(x.get('a_tpot_p50_ms'))} / {report.fmt(x.get('b_tpot_p50_ms'))}"
        ra = report.fmt_ratio(report.speed_ratio(a, base.get("a_total_tok_s")))
        rb = report.fmt_ratio(report.speed_ratio(b, base.get("b_output_tok_s")))
        lines.append(
            f"| {tp} | {report.fmt(a)} | {ra} | {report.fmt(b)} | {rb} | {tpots} | {report.fmt(m)} | {frac} | "
            f"{report.fmt(x.get('batch1_forward_ms'))} | {report.fmt(x.get('batch1_roofline_ms'))} | "
            f"{x.get('cuda_graphs')} | {report.fmt(x.get('kv_tokens'))} |"
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
    stem.parent.joinpath(stem.name + ".json").write_text(json.dumps(keep, indent=2, default=str) + "\n")
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
    return "\n".join(md)


# ---- main ------------------------------------------------------------------------------------------
def peer_profile_batches(args: argparse.Namespace) -> list[int] | None:
    """With --profile, the decode batches the peer profiles: those ours profiles ((d)'s batches among
    PROFILE_BATCHES); None without --profile."""
    if not args.profile:
        return None
    return [b for b in (int(x) for x in args.decode_batches.split(",")) if b in PROFILE_BATCHES]


def profiles_side_by_side(r: dict[str, Any]) -> list[str]:
    """Markdown tables of our step profiles beside the peer's (bench/peer_vllm.py --profile), one per probe either
    engine profiled; the peer's only when its figures are this run's (same GPU and settings)."""
    peer = r.get("peer") or {}
    peer_profile = {} if peer.get("error") else (peer.get("profile") or {})
    name = f"vLLM {peer['version']}" if peer.get("version") else "the peer"
    probes: list[tuple[str, Any, Any]] = []
    pp = r.get("prefill_probe") or {}
    peer_prefill = peer_profile.get("prefill") or {}
    if pp.get("profile") or peer_prefill:
        tokens = pp.get("tokens") or peer_prefill.get("tokens")
        probes.append((f"prefill step, {tokens} tokens", pp.get("profile"), peer_prefill))
    batches = dict.fromkeys([*(r.get("decode") or {}), *(peer_profile.get("decode") or {})])
    for b in batches:
        ours = ((r.get("decode") or {}).get(b) or {}).get("profile")
        theirs = (peer_profile.get("decode") or {}).get(b)
        if ours or theirs:
            probes.append((f"decode step, batch {b}", ours, theirs))
    out = []
    for title, ours, theirs in probes:
        errors = [f"{who}: {p['error']}" for who, p in (("ours", ours), (name, theirs)) if p and p.get("error")]
        ours = None if not ours or ours.get("error") else ours
        theirs = None if not theirs or theirs.get("error") else theirs
        out += [kernel_kinds.side_by_side(title, ours, theirs, name), ""]
        out += [f"({'; '.join(errors)})", ""] if errors else []
    return out


def run_peer(args: argparse.Namespace, settings: EngineSettings, out_dir: Path, timeout_s: float) -> dict[str, Any]:
    """vLLM in its own process, before this process touches the GPU; its results, or {"error": why}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_out = out_dir / f"peer-vllm-{args.shape}.json"
    cmd = peer_command(
        args.peer_python, args.shape, args.scale, settings, args.peer_workloads, json_out, peer_profile_batches(args)
    )
    env = dict(os.environ, PYTHONPATH=f"{args.vllm_site}:{Path.cwd()}", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    log.info("peer: %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, env=env, timeout=max(1.0, timeout_s), check=False)
        why = None if done.returncode == 0 else f"vLLM exited with status {done.returncode}"
    except subprocess.TimeoutExpired:
        why = f"vLLM did not finish within {timeout_s:.0f} s"
    peer = json.loads(json_out.read_text()) if json_out.exists() else {}
    if why:
        peer.setdefault("notes", []).append(why)
        if not peer.get("workloads") and not peer.get("batch1"):
            peer["error"] = why
    return peer or {"error": why or "vLLM wrote no results"}


def attach_peer(r: dict[str, Any], peer: dict[str, Any]) -> None:
    """Keep the peer's figures only if they come from this GPU with this run's settings; else say why not."""
    if peer.get("error"):
        r["peer"] = peer
        return
    problems = list(filter(None, [report.same_machine(r["gpu_identity"], peer.get("gpu_identity", {}))]))
    problems += report.settings_mismatch(r, peer)
    r["peer"] = {**peer, "error": "; ".join(problems)} if problems else peer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b", help="a model shape of bench/shapes.py")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every request count")
    p.add_argument("--workloads", default="1,d,a,b,c", help="comma list of 1 (batch-1), d, a, b, c for our engine")
    p.add_argument("--peer", choices=("none", "vllm"), default="none", help="run vLLM first, in its own process")
    p.add_argument("--peer-json", help="the peer's results from bench.peer_vllm, run earlier on this same GPU")
    p.add_argument("--peer-workloads", default="1,a,b,c", help="what the peer runs (comma list of 1, a, b, c)")
    p.add_argument("--peer-python", default=sys.executable)
    p.add_argument("--vllm-site", default="/tmp/vsite", help="where shared/gpu/vllm-install.sh put vLLM")
    p.add_argument("--ours", action=argparse.BooleanOptionalAction, default=True, help="run our engine")
    p.add_argument("--name", default="", help="extra suffix of the results files")
    p.add_argument("--max-num-seqs", type=int, default=EngineSettings.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=EngineSettings.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=EngineSettings.max_model_len)
    p.add_argument("--gpu-memory-utilization", type=float, default=EngineSettings.gpu_memory_utilization)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--block-size", type=int, default=EngineSettings.block_size, help="both engines' KV block size")
    p.add_argument(
        "--quantization",
        choices=("none", "fp8", "fp8-block"),
        default="none",
        help="both engines: fp8 = online per-tensor FP8 (--quantization fp8); fp8-block = an fp8 checkpoint with "
        "128x128 block scales (quantized from the random weights at load; vLLM reads it from config.json)",
    )
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto", help="both engines' KV cache dtype")
    p.add_argument(
        "--profile",
        action="store_true",
        help="(d): profile decode steps at batch 1 and 256 and one prefill step; with --peer vllm the peer's too",
    )
    p.add_argument(
        "--decode-micro",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time both flashinfer decode kernels alone first (Llama shape) and let the engine use the faster",
    )
    p.add_argument(
        "--prefill-backends", default="", help="time flashinfer prefill attention on these backends (e.g. fa2,fa3)"
    )
    p.add_argument(
        "--mla-upproject-min-tokens",
        type=int,
        default=None,
        help="our engine, MLA models: prefill chunks of N+ tokens attend up-projected (0: never; unset: the "
        "engine's default or KUBELLM_MLA_UPPROJECT_MIN_TOKENS); results files get an -mla-upN suffix when N > 0",
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
    sizes = [int(x) for x in str(args.tensor_parallel_size).split(",")]
    settings = EngineSettings(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        block_size=args.block_size,
        tensor_parallel_size=sizes[0],
        quantization=None if args.quantization == "none" else args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    if args.block_size < 1:
        p.error(f"--block-size must be >= 1, got {args.block_size}")
    if args.mla_upproject_min_tokens is not None:  # through the environment: every rank's engine config reads it
        if args.mla_upproject_min_tokens < 0:
            p.error(f"--mla-upproject-min-tokens must be >= 0, got {args.mla_upproject_min_tokens}")
        os.environ["KUBELLM_MLA_UPPROJECT_MIN_TOKENS"] = str(args.mla_upproject_min_tokens)
    mla_up = EngineConfig().mla_upproject_min_tokens
    out_dir = Path(args.out_dir)
    peer: dict[str, Any] = {"error": "not run (--peer none)"}
    if args.peer_json:
        peer = json.loads(Path(args.peer_json).read_text())
    elif args.peer == "vllm":  # first: vLLM sizes its KV pool from the free memory, so this process holds none yet
        peer = run_peer(args, settings, out_dir, left() * (0.5 if args.ours else 1.0))

    device = torch.device("cuda")
    try:
        import flashinfer

        fi_version = flashinfer.__version__
    except ImportError:
        fi_version = None
    r: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.offline " + " ".join(sys.argv[1:] if argv is None else argv),
        "gpu": torch.cuda.get_device_name(device),
        "gpu_identity": gpu_identity(),
        "torch": torch.__version__,
        "flashinfer": fi_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "shape": args.shape,
        "scale": args.scale,
        "settings": settings.as_dict(),
        "sampling": asdict(Sampling()),
        "mla_upproject_min_tokens": mla_up,
        "prefill_backend": EngineConfig().prefill_backend,  # KUBELLM_PREFILL_BACKEND: also the MLA kernel family
        "mla_decode_backend": EngineConfig().mla_decode_backend,  # KUBELLM_MLA_DECODE_BACKEND: decode-only MLA steps
        "fp8_gemm": EngineConfig().fp8_gemm,  # KUBELLM_FP8_GEMM: fixed / table / tune routes of FP8 linear layers
        "fp8_splitk": EngineConfig().fp8_splitk,
        "mla_upproject_max_context_tokens": (
            EngineConfig(max_num_batched_tokens=args.max_num_batched_tokens).mla_upproject_context_budget
            if mla_up
            else None
        ),
        "workloads": {},
        "decode": {},
        "notes": [],
        "name_suffix": f"-{args.shape}"
        + (f"-{args.quantization}" if args.quantization != "none" else "")
        + ("-kv-fp8" if args.kv_cache_dtype == "fp8" else "")
        + (f"-mla-up{mla_up}" if mla_up else "")
        + (f"-{args.name}" if args.name else ""),
    }
    attach_peer(r, peer)
    r["ceilings"] = measure_ceilings(device, fp8=run_precision(r).weight_bytes == 1)
    log.info("ceilings: %s", r["ceilings"])
    set_bounds(r, shape(args.shape))
    if args.decode_micro and args.shape == "llama-3.1-8b":  # both flashinfer decode kernels alone, on these heads
        micro = {}
        for tc in (False, True):
            for b in (1, 8, 32, 256):
                micro[f"{'tensor_core' if tc else 'cuda_core'}_b{b}"] = decode_attention_micro(b, 1024, tc)
        r["decode_attention_micro"] = micro
        use_tc = micro["tensor_core_b256"]["ms"] < micro["cuda_core_b256"]["ms"]
        os.environ["KUBELLM_DECODE_TENSOR_CORES"] = "1" if use_tc else "0"
        r["decode_tensor_cores"] = use_tc
        log.info("decode attention alone (1 layer, ctx 1024): %s -> tensor cores %s", micro, use_tc)
    if args.prefill_backends:  # measured only: the engine keeps its default (KUBELLM_PREFILL_BACKEND overrides)
        r["prefill_attention_micro"] = {b: prefill_attention_micro(b) for b in args.prefill_backends.split(",")}
        log.info("prefill attention alone (1 layer, 16 x 1024 causal): %s", r["prefill_attention_micro"])
    torch.cuda.empty_cache()
    write_results(r, out_dir)

    sweep = sizes != [1]
    tp_results: dict[int, dict[str, Any]] = {}
    for i, tp in enumerate(sizes if args.ours else []):
        rt = json.loads(json.dumps(r, default=str)) if sweep else r
        rt["settings"]["tensor_parallel_size"] = tp
        rt["tensor_parallel_size"] = tp
        rt["name_suffix"] = r["name_suffix"] + (f"-tp{tp}" if sweep else "")
        if torch.cuda.device_count() < tp:
            log.warning("TP %d skipped: torch sees %d GPUs", tp, torch.cuda.device_count())
            r["notes"].append(f"TP {tp} skipped: {torch.cuda.device_count()} GPUs")
            continue
        if left() < 120:
            r["notes"].append(f"TP {tp} skipped: out of time")
            continue
        end = time.perf_counter() + left() / (len(sizes) - i)  # an equal share of what is left for each size
        left_here = lambda end=end: min(left(), end - time.perf_counter())  # noqa: E731
        try:
            run_engine(args, rt, replace(settings, tensor_parallel_size=tp), out_dir, left_here)
        except UnsupportedModelError as e:  # a shape our engine cannot run yet: the peer's figures still stand
            rt["notes"].append(f"our engine: {NOT_MEASURED_OURS}: {e}")
            log.warning("our engine refused %s: %s", args.shape, e)
        tp_results[tp] = rt
        if sweep:
            r["tp"] = {str(k): tp_summary(v) for k, v in tp_results.items()}
            write_tp_summary(r, out_dir)
    r["bench_wall_s"] = time.perf_counter() - t0
    if sweep:
        write_tp_summary(r, out_dir)
        for rt in tp_results.values():
            print(report.table(rt), flush=True)
        print(tp_table(r), flush=True)
        return 0
    write_results(r, out_dir)
    print(report.table(r), flush=True)
    return 0


NOT_MEASURED_OURS = "not measured (the engine refuses this model)"


if __name__ == "__main__":
    raise SystemExit(main())
