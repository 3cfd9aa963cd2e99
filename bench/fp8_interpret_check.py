"""Run the FP8 Triton kernels' logic on CPU (TRITON_INTERPRET=1) against torch references: a check without a GPU.

Why the interpreter is patched: Triton 3.6's interpreter converts floats bit by bit itself and gets two conversions
these kernels use wrong -- fp32 -> bf16 truncates instead of rounding to nearest even, and fp32 -> e4m3 drops the
carry when rounding overflows the mantissa (a value rounding up to the next power of two comes out half as large:
2.4% of a per-token quantization of randn) -- its tl.dot of bf16 operands multiplies their uint16 bit patterns as
integers (seen: the split-K kernel's tensor-core variant 1e9 off), and with numpy >= 2.4 every range() over a
runtime int fails.
`faithful_interpreter` makes those conversions torch's (round to nearest even; e4m3 saturating, as the GPU's
cvt.rn.satfinite), so what is left to see is the kernels' own logic: scale indexing, groups, masks, tiles, routes.
What it cannot show is the GPU's arithmetic (FP8 tensor-core accumulation, approximate exp): the gpu tests cover that.

References are written here: activation scales amax / 448 by IEEE division (as the kernels' div.rn; see
tests/engine/fp8_reference.py for why not `amax / 448` on CUDA), products in float64.

    pip install triton==3.6.0
    python -m bench.fp8_interpret_check        # exit 1 on any mismatch; ~2 minutes on 2 cores (+ split-K's)
    python -m bench.fp8_interpret_check --only splitk [--quick]

Seen 2026-12-07 (triton 3.6.0, numpy 2.4.6, CPU): every quantization bit-equal to torch's; fused_experts with block
and per-channel FP8 experts 1.6-1.7e-3 from float64 in every route (aligned 16/64, direct, direct + down_sum,
128-column tiles), the bf16 output rounding; with one block-scale index broken on purpose, 5.7-6.6e-2. Unpatched
(numpy < 2.4), the interpreter put the kernels 8e-2 (block) and 1.3e-1 (per-channel) off on Qwen3-30B-A3B's shape.
Split-K (fp8_gemm.splitk), seen 2026-12-07: --cases 1 (one row, CUDA cores, the default split) on the six full shapes
x three formats, 18 of 18 at 1.61-1.70e-3 from float64 (~25 minutes); --quick (CI) 18 of 18; with the block-scale
index broken on purpose (the split's first block for every step), 2 of the 6 block cases of --quick fail.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import numpy as np
import torch
import torch.nn.functional as F
import triton.language as tl
import triton.runtime.interpreter as interpreter

from kubellm.engine import loader as _loader_first  # noqa: F401 (loader before models: import cycle)
from kubellm.engine.models import fp8_quant, fused, fused_moe
from kubellm.engine.models.moe import reference_topk

FP8 = torch.float8_e4m3fn
E, TOP_K, H, INTER = 16, 8, 512, 256  # small enough to interpret in seconds; 4 x 2 blocks of 128
MOE_TOL = 5e-3  # vs float64: the bf16 output rounding (~1.1e-3) and rare e4m3 flips of the requantized activation

_TORCH = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16, tl.float8e4nv: FP8}
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, FP8: torch.uint8}
_NP_BITS = {torch.int32: np.int32, torch.int16: np.int16, torch.uint8: np.uint8}


def faithful_interpreter() -> None:
    """Patch Triton's interpreter: float conversions as torch (= the GPU) does them; indices from 1-element arrays."""
    convert = interpreter._convert_float

    def torch_convert(data: np.ndarray, src, dst, rounding_mode):
        s, d = _TORCH.get(src), _TORCH.get(dst)
        if s is None or d is None:
            return convert(data, src, dst, rounding_mode)
        t = torch.from_numpy(np.ascontiguousarray(data).view(_NP_BITS[_BITS[s]])).view(s)
        t = t.float().clamp(-448.0, 448.0) if d == FP8 else t
        return t.to(d).view(_BITS[d]).numpy()

    interpreter._convert_float = torch_convert
    patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        """Products of float operands in float32 from their real values (the interpreter multiplies bf16's stored
        uint16 bit patterns as integers), accumulated into d as the GPU's tensor cores do."""

        def values(h):
            src = _TORCH.get(h.dtype)
            if src is None:
                return h.data
            bits = np.ascontiguousarray(h.data).view(_NP_BITS[_BITS[src]])
            return torch.from_numpy(bits).view(src).float().numpy()

        out = np.matmul(values(a), values(b)).astype(d.data.dtype) + d.data
        return interpreter.TensorHandle(out, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot


def ieee_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax / torch.full_like(amax, 448.0)).clamp_min(fp8_quant.MIN_SCALE)


def torch_quantize(x: torch.Tensor, mode: str, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    m, k = xf.shape
    if mode == "tensor":
        s = ieee_scale(xf.abs().amax()).reshape(1)
        return (xf / s).clamp(-448, 448).to(FP8), s
    g = k if mode == "token" else group
    kp = -(-k // g) * g
    xg = F.pad(xf, (0, kp - k)).view(m, kp // g, g)
    s = ieee_scale(xg.abs().amax(dim=2))
    return (xg / s[:, :, None]).clamp(-448, 448).to(FP8).view(m, kp)[:, :k].contiguous(), s


def check_quantization() -> list[str]:
    failures = []
    gen = torch.Generator().manual_seed(0)
    for mode in ("tensor", "token", "group"):
        for m, k in ((1, 512), (5, 2048), (3, 1000)):
            x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 5).to(torch.bfloat16)
            if m > 1:
                x[1] = 0.0  # the floor scale
            q, s = fp8_quant.quantize(x, fp8_quant.ActQuant(mode))
            rq, rs = torch_quantize(x, mode)
            same = torch.equal(s.reshape(rs.shape), rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
            print(f"quantize {mode:6s} {m}x{k}: {'bit-equal' if same else 'DIFFERS'}", flush=True)
            if not same:
                failures.append(f"quantize {mode} {m}x{k}")
        x = (torch.randn(4, 2 * 768, generator=gen) * 3).to(torch.bfloat16)
        if mode != "tensor":  # dynamic per-tensor scales are never fused
            q, s = fp8_quant.silu_mul_quant(x, fp8_quant.ActQuant(mode))
            rq, rs = torch_quantize(fused.silu_mul(x), mode)
            same = torch.equal(s.reshape(rs.shape), rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
            print(f"silu_mul_quant {mode}: {'bit-equal to silu_mul then quantize' if same else 'DIFFERS'}", flush=True)
            if not same:
                failures.append(f"silu_mul_quant {mode}")
    return failures


def quantize_experts(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[E, N, K] float32 -> (fp8, scales, dequantized float64)."""
    e, n, k = w.shape
    if fmt == "channel":
        s = w.abs().amax(dim=2) / 448
        q = (w / s[:, :, None]).clamp(-448, 448).to(FP8)
        return q, s, q.double() * s[:, :, None]
    wg = w.view(e, n // 128, 128, k // 128, 128)
    s = wg.abs().amax(dim=(2, 4)) / 448
    q = (wg / s[:, :, None, :, None]).clamp(-448, 448).to(FP8)
    return q.view(e, n, k), s, (q.double() * s[:, :, None, :, None]).view(e, n, k)


def exact_experts(x, d13, d2, w, ids, block: bool, direct_sum: bool) -> torch.Tensor:
    """Expert by expert in float64, activations quantized where the kernels quantize them, the activation and each
    pair's output rounded to bf16 where the kernels store them."""
    mode = "group" if block else "token"

    def qdq(a: torch.Tensor) -> torch.Tensor:
        q, s = torch_quantize(a, mode)
        return q.double() * (s.double().repeat_interleave(128, dim=1)[:, : a.shape[1]] if block else s.double())

    t, k = ids.shape
    xd = qdq(x)
    flat = ids.reshape(-1).long()
    act = torch.empty(t * k, INTER, dtype=torch.float64)
    for e in flat.unique().tolist():
        p = (flat == e).nonzero().squeeze(1)
        gu = xd[p // k] @ d13[e].t()
        act[p] = (F.silu(gu[:, :INTER]) * gu[:, INTER:]).to(torch.bfloat16).double()
    ad = act if direct_sum else qdq(act.to(torch.bfloat16))
    out = torch.empty(t * k, H, dtype=torch.float64)
    for e in flat.unique().tolist():
        p = (flat == e).nonzero().squeeze(1)
        out[p] = ad[p] @ d2[e].t() * w.reshape(-1)[p, None].double()
    if not direct_sum:
        out = out.to(torch.bfloat16).double()
    return out.view(t, k, -1).sum(dim=1)


def check_experts() -> list[str]:
    failures = []
    gen = torch.Generator().manual_seed(1)
    w13 = torch.randn(E, 2 * INTER, H, generator=gen) / H**0.5
    w13 *= torch.rand(E, 2 * INTER, 1, generator=gen) * 4 + 0.5  # uneven rows: block scales differ ~9x
    w2 = torch.randn(E, H, INTER, generator=gen) / INTER**0.5
    up = fused_moe.GemmConfig(BLOCK_N=64, BLOCK_K=256, GROUP_M=4, num_warps=4, num_stages=3)  # BLOCK_K narrowed
    dn = fused_moe.GemmConfig(BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=3)  # two steps a block
    wide = fused_moe.GemmConfig(BLOCK_N=128, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=3)
    configs = {
        "aligned 16": fused_moe.MoeConfig(16, up, dn),
        "aligned 64": fused_moe.MoeConfig(64, up, dn),
        "direct": fused_moe.MoeConfig(16, up, dn, direct=True),
        "direct+down_sum": fused_moe.MoeConfig(16, up, dn, direct=True, fuse_sum=True),
        "128-column tiles": fused_moe.MoeConfig(16, wide, wide),  # block: gate_up writes the FP8 activation
    }
    for fmt in ("block", "channel"):
        block = fmt == "block"
        q13, s13, d13 = quantize_experts(w13, fmt)
        q2, s2, d2 = quantize_experts(w2, fmt)
        kw = {"block_size": (128, 128)} if block else {}
        for t in (1, 5):
            x = torch.randn(t, H, generator=gen).to(torch.bfloat16)
            w, ids = reference_topk(torch.randn(t, E, generator=gen), TOP_K, True)
            for name, cfg in configs.items():
                got = fused_moe.fused_experts(x, q13, q2, w, ids, cfg, w1_scale=s13, w2_scale=s2, **kw)
                ref = exact_experts(x, d13, d2, w, ids, block, direct_sum=cfg.direct and cfg.fuse_sum)
                err = float((got.double() - ref).norm() / ref.norm())
                ok = err < MOE_TOL
                print(f"fused_experts {fmt:7s} T={t} {name:18s}: {err:.2e} vs float64 {'ok' if ok else 'TOO FAR'}",
                      flush=True)  # fmt: skip
                if not ok:
                    failures.append(f"fused_experts {fmt} T={t} {name}: {err:.2e}")
    return failures


# The split-K small-M kernel (fp8_gemm.splitk) on Llama-3.1-8B's four layer shapes and Qwen3-30B-A3B's attention
# ((N, K); its MLPs are experts). --quick (CI): each shape's K in full but N cut to 200 columns (ragged against the
# 32-column tiles), which is what the split logic and the masks depend on.
SPLITK_SHAPES = {
    "llama qkv": (6144, 4096),
    "llama o": (4096, 4096),
    "llama gate_up": (28672, 4096),
    "llama down": (4096, 14336),
    "qwen3-30b-a3b qkv": (5120, 2048),
    "qwen3-30b-a3b o": (2048, 4096),
}
SPLITK_TOL = 4e-3  # vs float64: the bf16 output rounding (2^-9 relative per element, ~1.1e-3 in L2)


def quantize_weight(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float32 -> (fp8, scales, dequantized float64), the three scale layouts (blocks 128 x 128, ragged)."""
    n, k = w.shape
    if fmt == "tensor":
        s = w.abs().amax() / 448
        q = (w / s).clamp(-448, 448).to(FP8)
        return q, s, q.double() * s
    if fmt == "channel":
        s = w.abs().amax(dim=1) / 448
        q = (w / s[:, None]).clamp(-448, 448).to(FP8)
        return q, s, q.double() * s[:, None]
    nb, kb = -(-n // 128), -(-k // 128)
    wp = F.pad(w, (0, kb * 128 - k, 0, nb * 128 - n)).view(nb, 128, kb, 128)
    s = (wp.abs().amax(dim=(1, 3)) / 448).clamp_min(1e-12)
    q = (wp / s[:, None, :, None]).clamp(-448, 448).to(FP8)
    d = (q.double() * s[:, None, :, None]).view(nb * 128, kb * 128)[:n, :k]
    return q.view(nb * 128, kb * 128)[:n, :k].contiguous(), s, d


# (M, tensor cores, SPLIT_K: None the default) per shape and format; --quick takes the first three, --cases N the
# first N
SPLITK_CASES = [(1, False, None), (3, False, 1), (16, True, None), (1, True, 1), (1, False, 1), (3, False, None),
                (3, True, None), (7, True, None), (7, True, 1), (16, True, 1), (64, True, None)]  # fmt: skip


def check_splitk(quick: bool, cases: int | None = None) -> list[str]:
    from kubellm.engine.models import fp8_gemm

    failures = []
    gen = torch.Generator().manual_seed(2)
    shapes = {n: SPLITK_SHAPES[n] for n in ("llama down", "qwen3-30b-a3b qkv")} if quick else SPLITK_SHAPES
    for name, (n, k) in shapes.items():
        n = min(n, 72) if quick else n
        w = torch.randn(n, k, generator=gen) / k**0.5
        w *= torch.rand(n, 1, generator=gen) * 4 + 0.5  # uneven rows: channel and block scales differ
        for fmt in ("tensor", "channel", "block"):
            q, s, d = quantize_weight(w, fmt)
            block = (128, 128) if fmt == "block" else None
            for m, dot, split in SPLITK_CASES[: cases or (3 if quick else len(SPLITK_CASES))]:
                x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
                ref = x.double() @ d.t()
                cfg = fp8_gemm.splitk_config(m, n, k, fmt, block, 132, split_k=split, use_dot=dot)
                got = fp8_gemm.splitk(x, q, s, fmt, block, torch.bfloat16, cfg)
                err = float((got.double() - ref).norm() / ref.norm())
                ok = err < SPLITK_TOL
                print(f"splitk {name:18s} [{n},{k}] {fmt:7s} M={m:2d} dot={dot!s:5s} SPLIT_K={cfg.SPLIT_K}: "
                      f"{err:.2e} vs float64 {'ok' if ok else 'TOO FAR'}", flush=True)  # fmt: skip
                if not ok:
                    failures.append(f"splitk {name} {fmt} M={m} dot={dot} split={cfg.SPLIT_K}: {err:.2e}")
    return failures


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("quantization", "experts", "splitk"), default=None)
    ap.add_argument("--quick", action="store_true", help="splitk: two shapes, N cut to 72 columns, 3 cases (CI)")
    ap.add_argument("--cases", type=int, default=None, help="splitk: the first N of SPLITK_CASES per shape/format")
    args = ap.parse_args()
    faithful_interpreter()
    failures = []
    if args.only in (None, "quantization"):
        failures += check_quantization()
    if args.only in (None, "experts"):
        failures += check_experts()
    if args.only in (None, "splitk"):
        failures += check_splitk(args.quick, args.cases)
    print("all checks passed" if not failures else f"{len(failures)} failed: {failures}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
