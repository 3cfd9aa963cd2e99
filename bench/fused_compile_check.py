"""Compile the elementwise and routing Triton kernels of engine/models/fused.py for Hopper (sm90) on a machine
without a GPU, every variant the engine launches (the rotary kernels with and without Qwen3's per-head q/k norm,
the cache-writing ones, DeepSeek's MLA rope with its latent write, grouped top-k for each routing shape, the MoE
top-k sum folded into the residual-add + norm).

Why: Triton's interpreter runs kernels on CPU but never compiles them, so a name bound to two types in the branches
of a kernel, a bad reshape or layout only shows on the GPU, where the first failure switches every fused kernel
off for the process (seen 2026-12-07: mla_rope_cache). The triton wheel ships ptxas, so `triton.compile` builds
for an explicit target anywhere (bench/fp8_compile_check.py does the same for the FP8 kernels).

    pip install triton==3.6.0      # the GPU machine's version
    python -m bench.fused_compile_check      # exit 1 if any variant fails to compile
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kubellm.engine import loader as _loader_first  # noqa: F401 (loader before models: import cycle)
from kubellm.engine.models import fused

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"eps", "scale"}  # the kernels' float scalars; every other scalar is an int


def compile_variant(fn, pointers: dict[str, str], consts: dict, warps: int, label: str) -> bool:
    """Build one variant (pointers typed as given, ints i32, FLOATS fp32; constexprs as given)."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in pointers}
    try:
        kernel = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
            target=TARGET,
            options={"num_warps": warps, "num_stages": 1},
        )
    except Exception as e:  # every failure is reported; the exit status counts them
        print(f"FAIL {fn.__name__} {label}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
        return False
    spills = kernel.asm["ptx"].count("st.local")
    print(f"ok   {fn.__name__:26s} {label:58s} smem {kernel.metadata.shared:6d}  spills {spills}", flush=True)
    return True


def variants() -> Iterator[tuple]:
    bf = "*bf16"
    heads = fused.ROPE_HEADS_PER_PROGRAM
    norm = {"x_ptr": bf, "w_ptr": bf, "out_ptr": bf}
    for n in (128, 2048, 4096):
        yield fused._rms_norm_kernel, norm, {"BLOCK": n}, fused.RMS_NORM_WARPS, f"n={n}"
    parts = {"p_ptr": bf, "e_ptr": bf, "r_ptr": bf, "w_ptr": bf, "r_out_ptr": bf, "out_ptr": bf}
    # Qwen3-30B-A3B, Mixtral, DeepSeek-V2-Lite (with its shared experts' output) top-k and hidden
    for k, n, extra in ((8, 2048, False), (2, 4096, False), (6, 2048, True)):
        consts = {"K": k, "BLOCK": n, "HAS_EXTRA": extra}
        label = f"top_k={k} hidden={n} shared={extra}"
        yield fused._sum_add_rms_norm_kernel, parts, consts, fused.RMS_NORM_WARPS, label
    rope = {"q_ptr": bf, "k_ptr": bf, "cos_ptr": bf, "sin_ptr": bf, "q_out_ptr": bf, "k_out_ptr": bf, "qw_ptr": bf,
            "kw_ptr": bf}  # fmt: skip
    cache = {"q_ptr": bf, "k_ptr": bf, "v_ptr": bf, "cos_ptr": bf, "sin_ptr": bf, "slot_ptr": "*i64",
             "q_out_ptr": bf, "cache_ptr": bf, "qw_ptr": bf, "kw_ptr": bf}  # fmt: skip
    for d in (128, 64):
        for qk_norm in (False, True):
            consts = {"HEAD_DIM": d, "BLOCK": d // 2, "HEADS": heads, "NORM": qk_norm}
            yield fused._rope_kernel, rope, consts, 4, f"head_dim={d} qk_norm={qk_norm}"
            yield fused._rope_cache_kernel, cache, consts, 4, f"head_dim={d} qk_norm={qk_norm}"
    mla = {"q_ptr": bf, "k_ptr": bf, "cos_ptr": bf, "sin_ptr": bf, "q_out_ptr": bf, "k_out_ptr": bf}
    mla_cache = {"q_ptr": bf, "k_ptr": bf, "lat_ptr": bf, "lw_ptr": bf, "cos_ptr": bf, "sin_ptr": bf,
                 "slot_ptr": "*i64", "q_out_ptr": bf, "cache_ptr": bf}  # fmt: skip
    for interleave in (False, True):
        consts = {"HALF": 32, "HEADS": heads, "INTERLEAVE": interleave}
        yield fused._mla_rope_kernel, mla, consts, 4, f"interleave={interleave}"
        yield (
            fused._mla_rope_cache_kernel, mla_cache, consts | {"RANK_BLOCK": 512}, fused.RMS_NORM_WARPS,
            f"interleave={interleave} rank=512",
        )  # fmt: skip
    topk = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "w_ptr": "*fp32", "ids_ptr": "*i32"}
    # (experts, groups, topk_group, k, sigmoid, bias, renormalize): DeepSeek-V3, Moonlight, a softmax grouped one,
    # DeepSeek-V2 (160 = 8 x 20), Kimi-K2 (384), 3 groups of 32
    for e, g, tg, k, sigmoid, bias, renorm in (
        (256, 8, 4, 8, True, True, True), (64, 1, 1, 6, True, True, True), (64, 8, 3, 6, False, False, False),
        (160, 8, 3, 6, False, False, False), (384, 1, 1, 8, True, True, True), (96, 3, 2, 4, True, True, True),
    ):  # fmt: skip
        n_group, group = triton.next_power_of_2(g), triton.next_power_of_2(e // g)
        consts = {
            "N_GROUP": n_group, "GROUP": group, "TOPK_GROUP": min(tg, g), "K": k, "K_PAD": triton.next_power_of_2(k),
            "SIGMOID": sigmoid, "HAS_BIAS": bias, "RENORMALIZE": renorm,
        }  # fmt: skip
        yield fused._grouped_topk_kernel, topk, consts, 4, f"experts={e} groups={g}x{e // g} k={k} sigmoid={sigmoid}"
    yield fused._silu_mul_kernel, {"x_ptr": bf, "out_ptr": bf}, {"BLOCK": fused.SILU_MUL_CONFIG[0]}, 4, ""


def main() -> int:
    failed = sum(not compile_variant(*v) for v in variants())
    print(f"{failed} variant(s) failed to compile" if failed else "every variant compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
