"""Compile every FP8 Triton kernel variant the engine launches for Hopper (sm90) on a machine without a GPU.

Why: Triton's interpreter runs kernels on CPU but never compiles them, so layout, type and shared-memory errors
only show on the GPU. The triton wheel ships ptxas, so `triton.compile` can build for an explicit target anywhere.
Each variant gets the divisibility hints a real launch gives (pointers, strides, K and N multiples of 16), without
which the software pipeliner stays off. Per variant it prints shared memory, whether loads are pipelined (async
copies), whether the dot became a Hopper wgmma, and register spills (local memory in the PTX).

    pip install triton==3.6.0      # the GPU machine's version
    python -m bench.fp8_compile_check [quant|gemm|moe]      # exit 1 if any variant fails to compile
"""

from __future__ import annotations

import itertools
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kubellm.engine import loader as _loader_first  # noqa: F401 (loader before models: import cycle)
from kubellm.engine.models import fp8_gemm, fp8_quant, fused_moe

TARGET = GPUTarget("cuda", 90, 32)
QMAX = fp8_quant.FP8_MAX
DIVISIBLE = {"K", "N", "n_cols"}  # int arguments that are multiples of 16 in every model shape


def compile_variant(fn, pointers: dict[str, str], consts: dict, warps: int, stages: int, label: str) -> bool:
    """Build one variant; ints default to i32, the kernels' float scalars to fp32, and constexpr parameters not
    given take their defaults (as a launch does)."""
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    consts = defaults | consts
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in ("eps", "min_scale") else "i32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name in pointers or name.startswith("stride") or name in DIVISIBLE
    }
    try:
        kernel = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
            target=TARGET,
            options={"num_warps": warps, "num_stages": stages},
        )
    except Exception as e:  # every failure is reported; the exit status counts them
        print(f"FAIL {fn.__name__} {label}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
        return False
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    print(
        f"ok   {fn.__name__:32s} {label:60s} smem {kernel.metadata.shared:6d}  "
        f"pipelined loads {ttgir.count('async_copy_global_to_local'):2d}  wgmma {ttgir.count('warp_group_dot ')}  "
        f"spills {ptx.count('st.local')}",
        flush=True,
    )
    return True


def quant_variants():
    q = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32"}
    for given in (False, True):
        yield (
            fp8_quant._rows_kernel,
            q,
            {"BLOCK": fp8_quant.ROW_CHUNK, "GIVEN_SCALE": given, "QMAX": QMAX},
            4,
            3,
            (f"given_scale={given}"),
        )
    yield fp8_quant._tensor_amax_kernel, q, {"ROWS": 16, "BLOCK": 1024, "QMAX": QMAX}, 4, 3, ""
    for groups in (1, fp8_quant.GROUPS_PER_PROGRAM):
        yield fp8_quant._groups_kernel, q, {"GROUP": 128, "GROUPS": groups, "QMAX": QMAX}, 4, 3, f"groups={groups}"
    norm = q | {"r_ptr": "*bf16", "w_ptr": "*bf16", "r_out_ptr": "*bf16"}
    for block, group, residual, given in ((4096, 0, True, False), (4096, 128, True, False), (8192, 128, False, False),
                                          (4096, 0, True, True)):  # fmt: skip
        consts = {"BLOCK": block, "GROUP": group, "HAS_RESIDUAL": residual, "GIVEN_SCALE": given, "QMAX": QMAX}
        yield fp8_quant._rms_norm_quant_kernel, norm, consts, 4, 3, f"block={block} group={group} residual={residual}"
    for given in (False, True):
        consts = {"GROUP": 128, "GROUPS": fp8_quant.GROUPS_PER_PROGRAM, "GIVEN_SCALE": given, "QMAX": QMAX}
        yield fp8_quant._silu_mul_quant_groups_kernel, q, consts, 4, 3, f"given_scale={given}"
    yield fp8_quant._silu_mul_quant_rows_kernel, q, {"BLOCK": fp8_quant.ROW_CHUNK, "QMAX": QMAX}, 4, 3, ""


def gemm_variants():
    ptrs = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "as_ptr": "*fp32", "bs_ptr": "*fp32"}
    modes = [(0, 0), (1, 1), (0, 1), (1, 0), (2, 2), (0, 2)]  # (activation, weight) scale layouts fp8_gemm launches
    tiles = {fp8_gemm.w8a8_config(m) for m in (16, 64, 256, 8192)}
    for (a_mode, b_mode), cfg, even in itertools.product(modes, sorted(tiles, key=str), (True, False)):
        consts = {"A_MODE": a_mode, "B_MODE": b_mode, "BN": 128, "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N,
                  "BLOCK_K": 128, "GROUP_M": cfg.GROUP_M, "EVEN_K": even}  # fmt: skip
        yield fp8_gemm._w8a8_kernel, ptrs, consts, cfg.num_warps, cfg.num_stages, f"A{a_mode} B{b_mode} {cfg} {even=}"
    for kind, b_mode in (("tensor", 0), ("channel", 1), ("block", 2)):
        c = fp8_gemm.W8A16_CONFIG[kind]
        for x, block_m in (("*bf16", 16), ("*fp16", 16), ("*bf16", 32), ("*bf16", 64)):
            ptrs = {"x_ptr": x, "w_ptr": "*fp8e4nv", "out_ptr": x, "s_ptr": "*fp32"}
            block_k = min(c["BLOCK_K"], 8192 // block_m, 128 if b_mode == 2 else 1 << 20)  # as w8a16 narrows it
            consts = {"B_MODE": b_mode, "BN": 128, "BK": 128, "BLOCK_M": block_m, "BLOCK_N": c["BLOCK_N"],
                      "BLOCK_K": block_k}  # fmt: skip
            label = f"{kind} x={x} rows<={block_m}"
            yield fp8_gemm._w8a16_kernel, ptrs, consts, c["num_warps"], c["num_stages"], label


def moe_variants():
    for quant in (0, 1, 2):
        x = "*bf16" if quant == 0 else "*fp8e4nv"
        scales = {"as_ptr": "*fp32", "ws_ptr": "*fp32", "sorted_ptr": "*i32", "tile_expert_ptr": "*i32"}
        up = {"x_ptr": x, "w_ptr": x, "out_ptr": "*bf16", "qs_ptr": "*fp32"} | scales
        down = {"a_ptr": x, "w_ptr": x, "out_ptr": "*bf16", "weights_ptr": "*fp32"} | scales
        for bm, bn, bk, direct, even in ((16, 32, 128, True, True), (64, 128, 64, False, True),
                                         (32, 64, 256, False, False)):  # fmt: skip
            consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk if quant != 2 else min(bk, 128), "GROUP_M": 8,
                      "EVEN_K": even, "DIRECT": direct, "QUANT": quant, "BN": 128, "BK": 128}  # fmt: skip
            label = f"quant={quant} {bm}x{bn}x{consts['BLOCK_K']} {direct=} {even=}"
            yield fused_moe._gate_up_kernel, up, consts, 4, 3, label
            yield fused_moe._down_kernel, down, consts, 4, 3, label
        if quant == 2:  # gate_up writing the FP8 activation and its group scales itself (gate_up_quantized)
            consts = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "EVEN_K": True, "DIRECT": False,
                      "QUANT": 2, "BN": 128, "BK": 128, "QUANT_OUT": True, "ROUND_TO": tl.bfloat16,
                      "QMAX": QMAX}  # fmt: skip
            yield fused_moe._gate_up_kernel, up | {"out_ptr": "*fp8e4nv"}, consts, 4, 3, "quant=2 64x128x128 quant_out"
        down_sum = {"a_ptr": "*bf16", "w_ptr": x, "out_ptr": "*bf16", "ids_ptr": "*i32", "weights_ptr": "*fp32",
                    "ws_ptr": "*fp32"}  # fmt: skip
        consts = {"K": 768, "TOP_K": 8, "BLOCK_N": 32, "BLOCK_K": 128, "QUANT": quant, "BN": 128, "BK": 128}
        yield fused_moe._down_sum_kernel, down_sum, consts, 4, 1, f"quant={quant}"


GROUPS = {"quant": quant_variants, "gemm": gemm_variants, "moe": moe_variants}


def main() -> int:
    wanted = sys.argv[1:] or list(GROUPS)
    results = [compile_variant(*v) for g in wanted for v in GROUPS[g]()]
    print(f"{sum(results)} compiled for sm90, {len(results) - sum(results)} failed", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
