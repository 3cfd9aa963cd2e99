"""Compile every Triton kernel the engine launches for a GPU target, on a machine with no GPU and no CUDA torch:

    PYTHONPATH=<dir with triton==3.6.0> python -m kubellm.engine.compile_check [--arch 90] [--jobs N] [--only RE]

Why: the CPU tests run the kernels under TRITON_INTERPRET, which executes them in numpy and never type-checks them,
so a kernel Triton refuses to compile (e.g. a name bound to a block in one branch of a runtime `if` and to a scalar
in the other: "Mismatched type for ... between then block and else block") passed every CPU test and failed only
on the GPU, where it also switched the fused kernels off. Run this before a GPU lease: it fails on such errors.

How, in three steps:
  1. A compile-only Triton driver stands in for the CUDA one: it names the target (sm90 by default, 32-thread
     warps) and its kernel load and launch do nothing. The engine's REAL launch wrappers (fused.py, fused_moe.py,
     fp8_gemm.py, fp8_quant.py, gemv.py, sampling_kernels.py, token_bitmask.py) then run on CPU tensors shaped as the
     models shape them (`cases()`: Llama-3.1-8B, Qwen3-30B-A3B, Mixtral, DeepSeek-V2-Lite/V2/V3, Kimi-K2, the small
     embedded models; bf16/fp16/fp32 where used, FP8 weights and activations, each boolean constexpr both ways, one
     and several tokens, tensor-parallel shards, the tuned MoE tile configs). Triton's own binder specialises the
     arguments, so every signature, constexpr and alignment comes from the code itself and cannot drift; the check
     only records what would be compiled (Triton's compile is swapped for a recorder in this step).
  2. Each distinct compilation is compiled for real (ttir, ttgir, llir, ptx and a cubin through ptxas), in a process
     pool, and checked against the target's limits (shared memory per block, threads per block).
  3. Coverage: every @triton.jit kernel under engine/ (functions other kernels call are helpers, compiled inside
     them) must have been launched by some case, so a new kernel without a case fails the check.

The engine's wrappers accept CPU tensors only where Triton runs kernels on them (TRITON_INTERPRET=1, their CPU test
mode): the check sets that variable for the engine's guards while Triton itself is told not to interpret
(knobs.runtime.interpret = False, fixed before any kernel is defined), so kernels are real JIT functions.
Nothing is cached across runs: Triton's cache goes to a fresh temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

TRITON_VERSION = "3.6.0"  # the GPU image's; tests/engine/test_triton_compile.py installs exactly this one
ENGINE_DIR = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-block limits of the target: sm90 (H100, H200) allows 227 KiB of shared memory and 1024 threads."""

    max_shared_mem: int = 232448
    max_threads: int = 1024
    multiprocessor_count: int = 132


LIMITS = {90: Limits(), 89: Limits(101376, 1024, 128), 80: Limits(166912, 1024, 108)}


# ---- the shapes the kernels are launched with (pure data) ----


@dataclasses.dataclass(frozen=True)
class Attn:
    """A standard attention layer: q, k, v heads of one head size, as views of one qkv projection's output."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: bool = False  # Qwen3's per-head q/k RMSNorm folded into the rotary kernels
    tp: tuple[int, ...] = (1,)


@dataclasses.dataclass(frozen=True)
class Mla:
    """DeepSeek's multi-head latent attention."""

    name: str
    hidden: int
    heads: int
    q_lora: int | None
    kv_lora: int = 512
    rope: int = 64
    nope: int = 128
    tp: tuple[int, ...] = (1,)


@dataclasses.dataclass(frozen=True)
class Moe:
    """Routed experts: E experts of intermediate size I (per shard: the tuned configs' N), hidden H, top k."""

    name: str
    experts: int
    inter: int
    hidden: int
    top_k: int
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    sigmoid: bool = False
    bias: bool = False
    scale: float = 1.0


ATTN = [
    Attn("smollm2-135m", 576, 9, 3, 64),
    Attn("gemma3-270m", 640, 4, 1, 256),
    Attn("llama-3.1-8b", 4096, 32, 8, 128, tp=(1, 2, 8)),
    Attn("qwen3-30b-a3b", 2048, 32, 4, 128, qk_norm=True, tp=(1, 4)),
]
MLA = [
    Mla("deepseek-v2-lite", 2048, 16, None, tp=(1, 2)),
    Mla("deepseek-v3", 7168, 128, 1536, tp=(1, 8)),
]
MOE = [
    Moe("qwen3-30b-a3b", 128, 768, 2048, 8),
    Moe("mixtral-8x7b", 8, 14336, 4096, 2),
    Moe("deepseek-v2-lite", 64, 1408, 2048, 6, renormalize=False),
    Moe("deepseek-v2", 160, 1536, 5120, 6, renormalize=False, n_group=8, topk_group=3, scale=16.0),
    Moe("deepseek-v3", 256, 2048, 7168, 8, n_group=8, topk_group=4, sigmoid=True, bias=True, scale=2.5),
    Moe("kimi-k2", 384, 2048, 7168, 8, sigmoid=True, bias=True, scale=2.827),
]
# dense MLPs' intermediate sizes (SiLU-and-mul, the FP8 down projection's input) and hidden sizes
DENSE_INTER = {"llama-3.1-8b": 14336, "deepseek-v2-lite": 10944, "deepseek-v2-lite-shared": 2816, "deepseek-v3": 18432,
               "deepseek-v3-shared": 2048, "smollm2-135m": 1536, "gemma3-270m": 2048}  # fmt: skip
HIDDEN = {"smollm2-135m": 576, "gemma3-270m": 640, "llama-3.1-8b": 4096, "qwen3-30b-a3b": 2048, "deepseek-v3": 7168}
VOCAB = {"llama-3.1-8b": 128256, "qwen3-30b-a3b": 151936, "deepseek-v2-lite": 102400, "deepseek-v3": 129280,
         "smollm2-135m": 49152, "gemma3-270m": 262144}  # fmt: skip
# FP8 linear layers [N, K]: Llama-3.1-8B's (per-tensor / per-channel checkpoints) and DeepSeek-V3's (128x128 blocks)
FP8_LAYERS = {
    "llama-3.1-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "deepseek-v3": [(1536, 7168), (24576, 1536), (576, 7168), (7168, 16384), (4096, 7168), (7168, 2048)],
}
FP8_SPLITK_LAYERS = {  # (N, K): Llama-3.1-8B's four; Qwen3-30B-A3B's attention (its MLPs are experts)
    "llama-3.1-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "qwen3-30b-a3b": [(5120, 2048), (2048, 4096)],
}
TOKENS = (1, 5, 64, 300)  # one token (ints equal to 1 specialise), odd, a multiple of 16, a prefill chunk
DTYPES = ("bfloat16", "float16")


# ---- cases: the launch wrappers called as the models call them ----


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[], object]


def cases() -> list[Case]:
    """Every launch to check, in a fixed order (each worker process sees the same list)."""
    import torch

    from kubellm.engine import sampling_kernels, token_bitmask
    from kubellm.engine.attention import triton_mla_decode
    from kubellm.engine.models import fp8_gemm, fp8_quant, fused, fused_moe, gemv

    out: list[Case] = []

    def add(name: str, fn: Callable[[], object]) -> None:
        out.append(Case(name, fn))

    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    e = torch.empty
    fp8 = fp8_quant.FP8_DTYPE

    # fused.py: norms, rotary (alone, with the KV write, with Qwen3's q/k norm), SiLU-and-mul, grouped top-k
    for model, hidden in HIDDEN.items():
        for d in (*DTYPES, "float32"):
            for t in (1, 64):
                add(f"fused.rms_norm {model} {d} T={t}", lambda t=t, h=hidden, d=dt[d]: _declined(fused.rms_norm(
                    e(t, h, dtype=d), e(h, dtype=d), 1e-6), "rms_norm"))  # fmt: skip
                add(f"fused.add_rms_norm {model} {d} T={t}", lambda t=t, h=hidden, d=dt[d]: _declined(
                    fused.add_rms_norm(e(t, h, dtype=d), e(t, h, dtype=d), e(h, dtype=d), 1e-6),
                    "add_rms_norm"))  # fmt: skip
    for moe in MOE[:5]:  # a MoE layer's k unsummed expert terms summed into the next residual add + norm
        extra = moe.name.startswith("deepseek")  # the shared experts' output, a term of its own
        for d in DTYPES:
            for t in (1, 64):
                add(f"fused.sum_add_rms_norm {moe.name} {d} T={t} extra={extra}", lambda t=t, m=moe, d=dt[d], x=extra:
                    _declined(fused.sum_add_rms_norm(e(t, m.top_k, m.hidden, dtype=d), e(t, m.hidden, dtype=d),
                              e(m.hidden, dtype=d), 1e-6, e(t, m.hidden, dtype=d) if x else None),
                              "sum_add_rms_norm"))  # fmt: skip
    for a in ATTN:
        for tp in a.tp:
            hq, hkv = a.heads // tp, max(a.kv_heads // tp, 1)
            for d in (*DTYPES, "float32"):
                for t in TOKENS:
                    for norm in (False, True) if a.qk_norm else (False,):
                        tag = f"{a.name} tp{tp} {d} T={t}{' qk_norm' if norm else ''}"
                        add(f"fused.rope {tag}", lambda t=t, hq=hq, hkv=hkv, a=a, d=dt[d], n=norm: _rope(
                            fused, t, hq, hkv, a.head_dim, d, n, cache=False))  # fmt: skip
                        add(f"fused.rope_cache {tag}", lambda t=t, hq=hq, hkv=hkv, a=a, d=dt[d], n=norm: _rope(
                            fused, t, hq, hkv, a.head_dim, d, n, cache=True))  # fmt: skip
                    if a.qk_norm:  # the per-head norm on its own, when the rotary kernel declines
                        q_view = functools.partial(_qkv, t, hq, hkv, a.head_dim, dt[d])
                        add(f"fused.rms_norm heads {a.name} tp{tp} {d} T={t}", lambda q=q_view, a=a, d=dt[d]: _declined(
                            fused.rms_norm(q()[0], e(a.head_dim, dtype=d), 1e-6), "rms_norm"))  # fmt: skip
    for m in MLA:
        for tp in m.tp:
            h = m.heads // tp
            for d in DTYPES:
                for t in TOKENS:
                    for inter in (False, True):
                        for page in (16, 64):
                            tag = f"{m.name} tp{tp} {d} T={t} interleave={inter} page={page}"
                            add(f"fused.mla_rope_cache {tag}", lambda t=t, h=h, m=m, d=dt[d], i=inter, p=page: _mla(
                                fused, t, h, m, d, i, p, cache=True))  # fmt: skip
                        add(
                            f"fused.mla_rope {m.name} tp{tp} {d} T={t} interleave={inter}",
                            functools.partial(_mla, fused, t, h, m, dt[d], inter, 16, cache=False),
                        )
                    # kv_a_layernorm on the latent's view of the kv_a projection (where mla_rope_cache declines)
                    add(f"fused.rms_norm kv_a_layernorm {m.name} {d} T={t}", lambda t=t, m=m, d=dt[d]: _declined(
                        fused.rms_norm(e(t, m.kv_lora + m.rope, dtype=d)[:, : m.kv_lora], e(m.kv_lora, dtype=d), 1e-6),
                        "rms_norm"))  # fmt: skip
                    if m.q_lora:
                        add(f"fused.rms_norm q_a_layernorm {m.name} {d} T={t}", lambda t=t, m=m, d=dt[d]: _declined(
                            fused.rms_norm(e(t, m.q_lora, dtype=d), e(m.q_lora, dtype=d), 1e-6),
                            "rms_norm"))  # fmt: skip
    # attention/triton_mla_decode.py (KUBELLM_MLA_DECODE_BACKEND=triton): decode batches whose split counts on 132
    # SMs cover many splits (64), a few (5 or 2) and one (the direct path, no merge)
    for m in MLA:
        for tp in m.tp:
            h = m.heads // tp
            for d in DTYPES:
                for page in (16, 64):
                    for b in (1, 64, 256, 512):
                        add(f"triton_mla_decode {m.name} tp{tp} {d} page={page} B={b}",
                            functools.partial(_mla_decode, triton_mla_decode, b, h, m, dt[d], page))  # fmt: skip
    for model, inter in DENSE_INTER.items():
        for d in (*DTYPES, "float32"):
            for t in (1, 300):
                add(f"fused.silu_mul {model} I={inter} {d} T={t}", lambda t=t, i=inter, d=dt[d]: _declined(
                    fused.silu_mul(e(t, 2 * i, dtype=d)), "silu_mul"))  # fmt: skip
    for moe in MOE:
        if moe.n_group > 1 or moe.sigmoid:  # DeepSeek's grouped / sigmoid routing (the plain softmax: fused_topk)
            for t in TOKENS:
                for renorm in (False, True):
                    add(f"fused.grouped_topk {moe.name} T={t} renormalize={renorm}",
                        lambda t=t, m=moe, r=renorm: _declined(fused.grouped_topk(
                            e(t, m.experts), m.top_k, m.n_group, m.topk_group, m.sigmoid,
                            e(m.experts) if m.bias else None, r, m.scale), "grouped_topk"))  # fmt: skip

    # fused_moe.py: softmax top-k and the experts (bf16/fp16; FP8 per tensor, per channel, 128x128 blocks)
    for moe in MOE[:3]:
        for t in TOKENS:
            for renorm in (False, True):
                add(f"fused_moe.fused_topk {moe.name} T={t} renormalize={renorm}", lambda t=t, m=moe, r=renorm:
                    fused_moe.fused_topk(e(t, m.experts), m.top_k, r))  # fmt: skip
    for moe, cfg_name, t, cfg in _moe_configs(fused_moe):
        for d in DTYPES if cfg_name == "default" else ("bfloat16",):
            add(f"fused_moe.fused_experts {moe.name} {cfg_name} {d} T={t}", lambda t=t, m=moe, c=cfg, d=dt[d]: _experts(
                fused_moe, t, m, c, d, None))  # fmt: skip
    qwen3_tp4 = dataclasses.replace(MOE[0], name="qwen3-30b-a3b-tp4", inter=MOE[0].inter // 4)
    for moe in (MOE[0], qwen3_tp4, MOE[4]):  # Qwen3-30B-A3B (and its TP 4 shard), DeepSeek-V3: FP8 checkpoints exist
        for quant in ("tensor", "tensor-static", "channel", "block"):
            if quant == "block" and moe.inter % 128:
                continue  # 128x128 blocks straddling the shard edge: the loader dequantizes such experts
            for t in (1, 5, 300, 2048):
                for c_name, cfg in (("default", None), ("direct-fuse-sum", _direct_fuse_sum(fused_moe)),
                                    ("wide-up", _wide_up(fused_moe))):  # fmt: skip
                    if c_name == "direct-fuse-sum" and (t > 1 or not moe.name.startswith("qwen3")):
                        continue  # one token; K (= I) unrolls into the kernel: V3's 2048 takes minutes to compile
                    add(f"fused_moe.fused_experts fp8-{quant} {moe.name} {c_name} T={t}",
                        lambda t=t, m=moe, c=cfg, q=quant: _experts(fused_moe, t, m, c, torch.bfloat16, q))  # fmt: skip

    # fp8_gemm.py / fp8_quant.py: FP8 linear layers (W8A16 up to 16 rows, else quantize + W8A8) and the fused quant
    for model, layers in FP8_LAYERS.items():
        kinds = ("block",) if model == "deepseek-v3" else ("tensor", "tensor-static", "channel", "channel-static")
        for kind in kinds:
            for n, k in layers:
                for t in (1, 5, 16, 17, 100, 300):
                    for d in ("bfloat16",) if kind == "block" else DTYPES:
                        add(f"fp8_gemm.fp8_linear {model} {kind} [{n},{k}] {d} T={t}",
                            lambda t=t, n=n, k=k, q=kind, d=dt[d]: _fp8_linear(fp8_gemm, t, n, k, q, d))  # fmt: skip
    # the split-K small-M kernel (a --fp8-gemm tune candidate): one pass and partial sums + reduce, CUDA cores (1-4
    # rows) and tensor cores, each scale layout
    for model, layers in FP8_SPLITK_LAYERS.items():
        for kind in ("tensor", "channel", "block"):
            for n, k in layers:
                for t in (1, 3, 7, 16, 64):
                    for dot in (False, True) if t <= 4 else (True,):
                        for split in (1, None):
                            for d in ("bfloat16",) if kind == "block" else DTYPES:
                                add(f"fp8_gemm.splitk {model} {kind} [{n},{k}] {d} T={t} dot={dot} split={split}",
                                    lambda t=t, n=n, k=k, q=kind, d=dt[d], o=dot, s=split: _fp8_splitk(
                                        fp8_gemm, t, n, k, q, d, o, s))  # fmt: skip
    for spec_name in ("token", "group", "static"):
        for model, hidden in (("llama-3.1-8b", 4096), ("deepseek-v3", 7168), ("qwen3-30b-a3b", 2048)):
            for d in DTYPES:
                for t in (17, 300):
                    for residual in (False, True):
                        add(f"fp8_quant.rms_norm_quant {spec_name} {model} {d} T={t} residual={residual}",
                            lambda t=t, h=hidden, d=dt[d], s=spec_name, r=residual: fp8_quant.rms_norm_quant(
                                e(t, h, dtype=d), e(h, dtype=d), 1e-6, _spec(fp8_quant, s),
                                e(t, h, dtype=d) if r else None))  # fmt: skip
        for model, inter in (("llama-3.1-8b", 14336), ("deepseek-v3", 18432), ("deepseek-v3-shared", 2048)):
            for d in DTYPES:
                for t in (17, 300):
                    add(f"fp8_quant.silu_mul_quant {spec_name} {model} {d} T={t}", lambda t=t, i=inter, d=dt[d],
                        s=spec_name: fp8_quant.silu_mul_quant(e(t, 2 * i, dtype=d), _spec(fp8_quant, s)))  # fmt: skip
    for spec_name in ("tensor", "token", "group", "static"):
        for d in (*DTYPES, "float32"):
            for t in (1, 300):
                add(f"fp8_quant.quantize {spec_name} {d} T={t}", lambda t=t, d=dt[d], s=spec_name: fp8_quant.quantize(
                    e(t, 4096, dtype=d), _spec(fp8_quant, s)))  # fmt: skip
    _ = fp8

    # gemv.py: tensor-parallel decode GEMMs (Llama-3.1-8B's shards at TP 2 and 4)
    for tp in (2, 4):
        for n, k in ((6144 // tp, 4096), (4096, 4096 // tp), (28672 // tp, 4096), (4096, 14336 // tp)):
            for d in DTYPES:
                for t in (1, 3, 16):
                    add(f"gemv.gemv llama-3.1-8b tp{tp} [{n},{k}] {d} T={t}", lambda t=t, n=n, k=k, d=dt[d]: gemv.gemv(
                        e(t, k, dtype=d), e(n, k, dtype=d)))  # fmt: skip

    # sampling_kernels.py (float32 logits) and token_bitmask.py (the logits' dtype)
    for model, vocab in VOCAB.items():
        for b in (1, 8):
            add(f"sampling_kernels.race {model} B={b}", lambda b=b, v=vocab: _race(sampling_kernels, b, v))
            for d in ("float32", "bfloat16"):
                add(f"token_bitmask.mask_on_device {model} {d} B={b}", lambda b=b, v=vocab, d=dt[d]:
                    token_bitmask.mask_on_device(e(b, v, dtype=d), torch.arange(b), torch.zeros(
                        b, token_bitmask.bitmask_words(v), dtype=torch.int32)))  # fmt: skip
    return out


def _qkv(t: int, hq: int, hkv: int, d: int, dtype: Any) -> tuple[Any, Any, Any]:
    """q [T, Hq, D], k and v [T, Hkv, D] as views of one qkv output, as llama.py splits them."""
    import torch

    q, k, v = torch.empty(t, (hq + 2 * hkv) * d, dtype=dtype).split((hq * d, hkv * d, hkv * d), dim=-1)
    return q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)


def _rope(fused: Any, t: int, hq: int, hkv: int, d: int, dtype: Any, norm: bool, cache: bool) -> object:
    import torch

    q, k, v = _qkv(t, hq, hkv, d, dtype)
    cos, sin = torch.empty(t, 1, d, dtype=dtype), torch.empty(t, 1, d, dtype=dtype)
    qk = (torch.empty(d, dtype=dtype), torch.empty(d, dtype=dtype), 1e-6) if norm else None
    if not cache:
        return _declined(fused.rope(q, k, cos, sin, qk), "rope")
    kv_cache = torch.empty(8, 2, 16, hkv, d, dtype=dtype)
    return _declined(fused.rope_cache(q, k, v, cos, sin, kv_cache, torch.zeros(t, dtype=torch.int64), qk), "rope_cache")


def _mla(fused: Any, t: int, h: int, m: Mla, dtype: Any, interleave: bool, page: int, cache: bool) -> object:
    """q_rope and k_rope as views of the query and latent projections' outputs, as deepseek.py splits them."""
    import torch

    q = torch.empty(t, h * (m.nope + m.rope), dtype=dtype)
    _, q_rope = q.view(t, h, m.nope + m.rope).split((m.nope, m.rope), dim=-1)
    latent, k_rope = torch.empty(t, m.kv_lora + m.rope, dtype=dtype).split((m.kv_lora, m.rope), dim=-1)
    cos, sin = torch.empty(t, 1, m.rope // 2, dtype=dtype), torch.empty(t, 1, m.rope // 2, dtype=dtype)
    if not cache:
        return _declined(fused.mla_rope(q_rope, k_rope, cos, sin, interleave), "mla_rope")
    kv_cache = torch.empty(4, page, m.kv_lora + m.rope, dtype=dtype)
    slots = torch.zeros(t, dtype=torch.int64)
    return _declined(fused.mla_rope_cache(q_rope, k_rope, latent, torch.empty(m.kv_lora, dtype=dtype), 1e-6, cos, sin,
                                          interleave, kv_cache, slots), "mla_rope_cache")  # fmt: skip


def _mla_decode(tmd: Any, b: int, h: int, m: Mla, dtype: Any, page: int) -> object:
    """The absorbed query as deepseek.py makes it (bmm over heads, transposed back), q_rope a view of q_proj's
    output, the pool's two column views, a page table of one page per row."""
    import torch

    q_latent = torch.empty(h, b, m.kv_lora, dtype=dtype).transpose(0, 1)
    q_rope = torch.empty(b, h, m.nope + m.rope, dtype=dtype)[..., m.nope :]
    pool = torch.empty(4, page, m.kv_lora + m.rope, dtype=dtype)
    indptr = torch.arange(b + 1, dtype=torch.int32)
    indices, lens = torch.zeros(b, dtype=torch.int32), torch.ones(b, dtype=torch.int32)
    splits = tmd.decode_splits(b, h, LIMITS[90].multiprocessor_count)
    return tmd.mla_decode(q_latent, q_rope, pool[..., : m.kv_lora], pool[..., m.kv_lora :], indptr, indices, lens,
                          0.1, splits)  # fmt: skip


def _declined(result: object, op: str) -> object:
    """A wrapper that declines shapes its models use would hide a kernel from the check: fail instead."""
    if result is None:
        raise RuntimeError(f"fused.{op} declined this launch (or its kernel failed): nothing was compiled")
    return result


def _moe_configs(fused_moe: Any) -> Iterator[tuple[Moe, str, int, Any]]:
    """(shape, config name, tokens, config): the default tiles at each token count, and every tuned file's entries
    (engine/models/moe_configs: keyed by GPU, E, N = I of the shard, H and dtype) at their batch buckets."""
    for moe in MOE[:3]:
        for t in (*TOKENS, 2048):
            yield moe, "default", t, None
    for path in sorted(fused_moe.CONFIG_DIR.glob("*.json")):
        found = re.match(r"E=(\d+),N=(\d+),H=(\d+),device=([^,]+),dtype=(\w+)\.json$", path.name)
        if not found or found.group(5) != "bfloat16":
            raise ValueError(f"unexpected MoE config file name {path.name}")
        e, n, h = (int(found.group(i)) for i in (1, 2, 3))
        top_k = next((m.top_k for m in MOE if m.experts == e), 8)
        for bucket, cfg in sorted(fused_moe.load_configs(path.name).items()):
            yield Moe(f"E={e},N={n},H={h}", e, n, h, top_k), f"tuned[{bucket}]", bucket, cfg


def _direct_fuse_sum(fused_moe: Any) -> Any:
    """A direct, summed-in-registers config (the autotune writes such for a few tokens): the down_sum kernel."""
    return fused_moe.MoeConfig(16, fused_moe.GemmConfig(32, 128, 1, 4, 4), fused_moe.GemmConfig(64, 128, 1, 4, 4),
                               direct=True, fuse_sum=True)  # fmt: skip


def _wide_up(fused_moe: Any) -> Any:
    """gate_up tiles 128 columns wide: with 128x128 FP8 blocks the tile is one group of the down GEMM's input, so
    gate_up writes FP8 itself (QUANT_OUT)."""
    return fused_moe.MoeConfig(64, fused_moe.GemmConfig(128, 64, 8, 8, 3), fused_moe.GemmConfig(128, 64, 8, 8, 3))


def _experts(fused_moe: Any, t: int, m: Moe, cfg: Any, dtype: Any, quant: str | None) -> object:
    import torch

    e, i, h, k = m.experts, m.inter, m.hidden, m.top_k
    wdt = torch.float8_e4m3fn if quant else dtype
    # weights are never written or read on the host: torch.empty reserves address space only
    w13, w2 = torch.empty(e, 2 * i, h, dtype=wdt), torch.empty(e, h, i, dtype=wdt)
    x = torch.empty(t, h, dtype=dtype)
    weights, ids = torch.empty(t, k), torch.zeros(t, k, dtype=torch.int32)
    scales: dict[str, Any] = {}
    if quant in ("tensor", "tensor-static"):
        scales = {"w1_scale": torch.ones(e), "w2_scale": torch.ones(e)}
        if quant == "tensor-static":
            scales |= {"a1_scale": torch.ones(1), "a2_scale": torch.ones(1)}
    elif quant == "channel":
        scales = {"w1_scale": torch.ones(e, 2 * i), "w2_scale": torch.ones(e, h)}
    elif quant == "block":
        scales = {"w1_scale": torch.ones(e, 2 * i // 128, -(-h // 128)), "w2_scale": torch.ones(e, -(-h // 128),
                  -(-i // 128)), "block_size": (128, 128)}  # fmt: skip
    return fused_moe.fused_experts(x, w13, w2, weights, ids, cfg, **scales)


def _fp8_linear(fp8_gemm: Any, t: int, n: int, k: int, kind: str, dtype: Any) -> object:
    import torch

    w = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    block = None
    if kind.startswith("tensor"):
        scale = torch.ones(())
    elif kind.startswith("channel"):
        scale = torch.ones(n)
    else:
        block, scale = (128, 128), torch.ones(-(-n // 128), -(-k // 128))
    static = torch.ones(1) if kind.endswith("static") else None
    return fp8_gemm.fp8_linear(torch.empty(t, k, dtype=dtype), w, scale, block_size=block, input_scale=static,
                               out_dtype=dtype)  # fmt: skip


def _fp8_splitk(fp8_gemm: Any, t: int, n: int, k: int, kind: str, dtype: Any, dot: bool, split: int | None) -> object:
    import torch

    w = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    block = (128, 128) if kind == "block" else None
    scale = {"tensor": torch.ones(()), "channel": torch.ones(n), "block": torch.ones(-(-n // 128), -(-k // 128))}[kind]
    cfg = fp8_gemm.splitk_config(t, n, k, kind, block, 132, split_k=split, use_dot=dot)
    return fp8_gemm.splitk(torch.empty(t, k, dtype=dtype), w, scale, kind, block, dtype, cfg)


def _spec(fp8_quant: Any, name: str) -> Any:
    import torch

    if name == "static":
        return fp8_quant.ActQuant("tensor", static_scale=torch.ones(1))
    return fp8_quant.ActQuant(name, group=128)


def _race(sampling_kernels: Any, b: int, vocab: int) -> object:
    import torch

    out = sampling_kernels.race(torch.empty(b, vocab), torch.ones(b), seed=12345)
    if out is None:
        raise RuntimeError("sampling_kernels.race declined or failed")
    return out


# ---- the compile-only driver and the recorder ----


@dataclasses.dataclass
class Request:
    """One distinct compilation the wrappers asked for: Triton's compile arguments, and the first case asking."""

    fn: Any  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    case: str

    @property
    def kernel(self) -> str:
        return f"{self.fn.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.fn.__name__}"

    def describe(self) -> str:
        names = self.fn.arg_names
        consts = {names[k[0]] if len(k) == 1 else k: _short(v) for k, v in self.constexprs.items()}
        opts = {k: self.options[k] for k in ("num_warps", "num_stages") if k in self.options}
        return f"{self.kernel} constexprs={consts} {opts} signature={self.signature}"


def _short(v: Any) -> Any:
    return v if isinstance(v, (int, float, bool, str, type(None))) else str(v)


class _NoKernel:
    """What the recorder returns for a kernel: launching it does nothing."""

    function = None
    packed_metadata = None

    @staticmethod
    def run(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def launch_metadata(*args: Any, **kwargs: Any) -> None:
        return None


class _Recorder:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._seen: set[str] = set()
        self.case = ""

    def __call__(self, src: Any, target: Any = None, options: dict | None = None, _env_vars: Any = None) -> _NoKernel:
        options = dict(options or {})
        key = f"{src.fn.fn.__module__}.{src.name}|{src.hash()}|{sorted(options.items())}"
        if key not in self._seen:
            self._seen.add(key)
            self.requests.append(Request(src.fn, src.signature, src.constants, src.attrs, options, self.case))
        return _NoKernel()


def _compile_only_driver(arch: int) -> Any:
    """A Triton driver for a GPU that is not here: the target it names, no-op kernel loads and launches."""
    from triton.backends.compiler import GPUTarget

    limits = LIMITS.get(arch, Limits())

    class Utils:
        @staticmethod
        def get_device_properties(device: int) -> dict:
            return {"max_shared_mem": limits.max_shared_mem, "multiprocessor_count": limits.multiprocessor_count,
                    "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0,
                    "mem_bus_width": 0}  # fmt: skip

        @staticmethod
        def load_binary(name: str, kernel: bytes, shared: int, device: int) -> tuple:
            return None, None, 0, 0, limits.max_threads

    class CompileOnlyDriver:
        utils = Utils()
        device = 0  # `record` moves to a new one each time: JIT functions then bind fresh caches and the recorder

        @staticmethod
        def launcher_cls(src: Any, metadata: Any) -> Callable[..., None]:
            return lambda *args, **kwargs: None

        @staticmethod
        def get_current_target() -> Any:
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self) -> int:
            return self.device

        @staticmethod
        def get_current_stream(device: int | None = None) -> int:
            return 0

        @staticmethod
        def get_active_torch_device() -> Any:
            import torch

            return torch.device("cpu")

    return CompileOnlyDriver()


def _prepare(cache_dir: str) -> None:
    """Before the engine's kernels are defined: Triton compiles (never interprets) into cache_dir; the engine's
    guards let CPU tensors reach the wrappers (their TRITON_INTERPRET test mode)."""
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    try:
        import triton
    except ImportError as e:
        raise SystemExit(
            f"compile_check: Triton is not importable ({e}); install it outside the venv, e.g. `pip install --target "
            f".venv/triton-{TRITON_VERSION} triton=={TRITON_VERSION}`, and run with PYTHONPATH=.venv/triton-"
            f"{TRITON_VERSION}"
        ) from None
    from triton import knobs

    if triton.__version__ != TRITON_VERSION:
        print(f"compile_check: note: Triton {triton.__version__}, the GPU image has {TRITON_VERSION}", file=sys.stderr)
    knobs.runtime.interpret = False
    os.environ["TRITON_INTERPRET"] = "1"


def _kernel_modules() -> list[str]:
    """Engine modules that define Triton kernels (by their source: any file with a @triton.jit)."""
    names = []
    for path in sorted(ENGINE_DIR.rglob("*.py")):
        if "@triton.jit" in path.read_text():
            rel = path.relative_to(ENGINE_DIR).with_suffix("")
            names.append("kubellm.engine." + ".".join(rel.parts))
    return names


def kernels_and_helpers(modules: list[str]) -> tuple[set[str], set[str]]:
    """("module.kernel" names launched from the host, names of @triton.jit helpers other kernels call)."""
    from triton.runtime.jit import JITFunction

    fns: dict[str, Any] = {}
    for name in modules:
        mod = importlib.import_module(name)
        for attr, value in vars(mod).items():
            if isinstance(value, JITFunction) and value.fn.__module__ == mod.__name__:
                fns[f"{name.rsplit('.', 1)[-1]}.{attr}"] = value
    sources = {q: f.src for q, f in fns.items()}
    helpers = {
        q for q, f in fns.items()
        if any(re.search(rf"\b{f.fn.__name__}\s*\(", src) for other, src in sources.items() if other != q)
    }  # fmt: skip
    return set(fns) - helpers, helpers


# ---- running ----


@dataclasses.dataclass
class Result:
    index: int
    ok: bool
    seconds: float
    error: str = ""
    shared: int = 0


_REQUESTS: list[Request] = []  # set before the pool forks: workers compile by index
_ARCH = 90


def _compile(index: int) -> Result:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import compile as triton_compile

    req = _REQUESTS[index]
    limits = LIMITS.get(_ARCH, Limits())
    start = time.perf_counter()
    try:
        src = ASTSource(req.fn, req.signature, req.constexprs, req.attrs)
        kernel = triton_compile(src, target=GPUTarget("cuda", _ARCH, 32), options=req.options)
    except Exception as e:  # the point of the check: Triton's error, reported with the kernel and variant
        return Result(index, False, time.perf_counter() - start, f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - start
    meta = kernel.metadata
    problems = []
    if meta.shared > limits.max_shared_mem:
        problems.append(f"needs {meta.shared} bytes of shared memory, sm{_ARCH} allows {limits.max_shared_mem}")
    if meta.num_warps * 32 > limits.max_threads:
        problems.append(f"{meta.num_warps} warps exceed {limits.max_threads} threads per block")
    if not kernel.asm.get("cubin"):
        problems.append("no cubin came out")
    return Result(index, not problems, seconds, "; ".join(problems), meta.shared)


def record(case_list: list[Case]) -> tuple[list[Request], list[str]]:
    """Step 1: run the cases with the recorder in place of Triton's compile. Returns (requests, errors: cases whose
    wrapper raised or turned its op off)."""
    import triton.compiler
    from triton.runtime import driver

    from kubellm.engine import sampling_kernels
    from kubellm.engine.models import fused

    recorder = _Recorder()
    real = triton.compiler.compile
    triton.compiler.compile = recorder  # a JIT function binds it when it first launches on a device
    driver.active.device += 1  # a device no JIT function has seen: no kernel cached, the recorder bound afresh
    errors = []
    try:
        for case in case_list:
            recorder.case = case.name
            try:
                case.run()
            except Exception as e:
                errors.append(f"{case.name}: {type(e).__name__}: {e}\n{_tail(traceback.format_exc())}")
            if fused.failed_ops() or not sampling_kernels._state["ok"]:
                errors.append(f"{case.name}: a wrapper caught a failure and turned its op off: "
                              f"{sorted(fused.failed_ops()) or ['sampling race']}")  # fmt: skip
                fused._failed.clear()
                sampling_kernels._state["ok"] = True
    finally:
        triton.compiler.compile = real
    return recorder.requests, errors


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def _size(value: Any) -> bool:
    """An int constexpr of 16 or more is a size (a block, a head dim, K); smaller ones select code (modes, flags)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 16


def quick_selection(requests: list[Request]) -> list[int]:
    """Indices of a subset of `requests` that still holds, for every kernel, each combination of its declared
    constexprs that select code (bools, dtypes, mode numbers: not sizes) and each set of pointer dtypes it is
    launched with; the cheapest request (smallest sizes) represents each. Type errors such as "mismatched type
    between then block and else block" depend on these, not on sizes; sizes and tile configs (shared memory) are
    the full scope's. Pure logic over the recorded requests."""

    def modes(r: Request) -> tuple:
        names, declared = r.fn.arg_names, set(r.fn.constexprs)
        return tuple((names[k[0]], str(v)) for k, v in sorted(r.constexprs.items())
                     if len(k) == 1 and k[0] in declared and not _size(v))  # fmt: skip

    def dtypes(r: Request) -> tuple:
        return tuple(sorted((k, v) for k, v in r.signature.items() if isinstance(v, str) and v.startswith("*")))

    def cost(i: int) -> tuple:
        r = requests[i]
        sizes = sum(v for v in r.constexprs.values() if _size(v))
        return sizes + int(r.options.get("num_stages", 3)), i

    chosen, seen = [], set()
    for i in sorted(range(len(requests)), key=cost):
        r = requests[i]
        keys = {("modes", r.kernel, modes(r)), ("dtypes", r.kernel, dtypes(r))}
        if not keys <= seen:
            seen |= keys
            chosen.append(i)
    return sorted(chosen)


@contextlib.contextmanager
def compile_only(arch: int = 90) -> Iterator[None]:
    """Triton set up to compile for `arch` with no GPU (the compile-only driver, a fresh cache directory removed
    on exit), and the engine's guards letting CPU tensors reach its wrappers."""
    cache_dir = tempfile.mkdtemp(prefix="kubellm-triton-check-")
    try:
        _prepare(cache_dir)
        from triton.runtime import driver

        previous = driver._active  # None until something asked for the real one (which needs a GPU)
        driver.set_active(_compile_only_driver(arch))
        try:
            yield
        finally:
            driver._active = previous
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def check(case_list: list[Case], arch: int = 90, jobs: int = 0, scope: str = "full",
          expected: set[str] | None = None, out: Any = sys.stdout) -> dict:  # fmt: skip
    """Steps 1-3 for these cases inside `compile_only(arch)`: record, compile (all, or the quick selection), and
    (given `expected` kernel names) coverage. Prints a table and every failure; returns a summary."""
    global _REQUESTS, _ARCH
    started = time.perf_counter()
    requests, errors = record(case_list)
    recorded_at = time.perf_counter()
    picked = quick_selection(requests) if scope == "quick" else list(range(len(requests)))
    _REQUESTS, _ARCH = [requests[i] for i in picked], arch
    order = sorted(range(len(_REQUESTS)), key=lambda i: -_cost(_REQUESTS[i]))  # the slow ones first
    jobs = jobs or min(os.cpu_count() or 1, 8)
    if jobs > 1 and len(order) > 1:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile, order))
    else:
        results = [_compile(i) for i in order]
    results.sort(key=lambda r: r.index)
    compiled = _REQUESTS
    launched = {r.kernel for r in requests}
    missing = sorted(expected - launched) if expected is not None else []
    failures = [(compiled[r.index], r) for r in results if not r.ok]
    per_kernel: dict[str, list[Result]] = {}
    for req, res in zip(compiled, results, strict=True):
        per_kernel.setdefault(req.kernel, []).append(res)
    print(f"{'kernel':44} {'variants':>8} {'compile s':>10} {'max shared B':>13}", file=out)
    for name in sorted(per_kernel):
        rs = per_kernel[name]
        print(f"{name:44} {len(rs):8d} {sum(r.seconds for r in rs):10.1f} {max(r.shared for r in rs):13d}", file=out)
    for req, res in failures:
        print(f"\nFAILED to compile for sm{arch}: {req.describe()}\n  first launched by: {req.case}\n"
              f"{_tail(res.error, 25)}", file=out)  # fmt: skip
    for err in errors:
        print(f"\nFAILED launch wrapper: {err}", file=out)
    for name in missing:
        print(f"\nNOT CHECKED: kernel {name} was never launched by a case: add one to compile_check.cases()", file=out)
    total = time.perf_counter() - started
    summary = {
        "ok": not failures and not errors and not missing and (bool(requests) or not case_list),
        "arch": arch,
        "scope": scope,
        "cases": len(case_list),
        "variants_launched": len(requests),
        "compilations": len(compiled),
        "kernels": sorted(launched),
        "failures": [
            {"kernel": q.kernel, "variant": q.describe(), "case": q.case, "error": r.error} for q, r in failures
        ],
        "wrapper_errors": errors,
        "missing": missing,
        "slowest": [
            {"variant": compiled[r.index].describe(), "case": compiled[r.index].case, "seconds": round(r.seconds, 1)}
            for r in sorted(results, key=lambda r: -r.seconds)[:10]
        ],
        "record_seconds": round(recorded_at - started, 1),
        "compile_seconds": round(sum(r.seconds for r in results), 1),
        "seconds": round(total, 1),
        "jobs": jobs,
    }
    print(f"\n{'OK' if summary['ok'] else 'FAILED'}: {len(compiled)} compilations ({scope} scope, of {len(requests)} "
          f"distinct launches) of {len(launched)} kernels for sm{arch} from {len(case_list)} cases: "
          f"{len(failures)} failed, {len(errors)} wrapper errors, {len(missing)} kernels not launched; "
          f"{total:.1f} s in {jobs} processes", file=out)  # fmt: skip
    return summary


def run(arch: int = 90, jobs: int = 0, only: str | None = None, scope: str = "full", out: Any = sys.stdout) -> dict:
    """The engine's check: every case (or those matching `only`, then without the coverage check)."""
    started = time.perf_counter()
    with compile_only(arch):
        modules = _kernel_modules()
        kernels, _ = kernels_and_helpers(modules)
        from kubellm.engine.models import fused

        # every fused setting on, whatever the defaults (with moe_sum_norm off, its kernel's cases were declined,
        # nothing compiled, and the check failed)
        fused.configure(True, rope_cache=True, qk_norm=True, moe_sum_norm=True)
        case_list = [c for c in cases() if not only or re.search(only, c.name)]
        summary = check(case_list, arch, jobs, scope, None if only else kernels, out)
    summary["seconds"] = round(time.perf_counter() - started, 1)  # with the imports
    return summary


def _cost(req: Request) -> int:
    """A rough compile-time rank: big tiles (or loops unrolled over a constexpr K), many stages, tensor-core dots."""
    sizes = sum(v for v in req.constexprs.values() if _size(v))
    return sizes * int(req.options.get("num_stages", 3)) * (2 if "tl.dot" in req.fn.src else 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubellm.engine.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100/H200)")
    p.add_argument("--jobs", type=int, default=0, help="compile processes (default: the CPU count, at most 8)")
    p.add_argument("--only", help="only the cases whose name matches this regular expression (no coverage check)")
    p.add_argument("--scope", choices=("full", "quick"), default="full",
                   help="full (default): every distinct launch; quick (CI): each kernel's code-selecting constexpr "
                   "combinations and pointer dtypes, at their smallest sizes")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)
    if args.arch < 70:
        p.error(f"--arch {args.arch}: Triton targets compute capability 7.0 and up (70, 80, 89, 90, ...)")
    summary = run(args.arch, args.jobs, args.only, args.scope)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
