"""The fused elementwise kernels (engine/models/fused.py) at a prefill step's size (16384 tokens) and at decode
batch 1, Llama-3.1-8B shapes, over a sweep of launch shapes: GB/s moved against the copy ceiling measured in the
same run; and Qwen3's per-head q/k norm folded into the rotary kernel against the torch norms it replaced (the
speed ratio printed). Each timing is a CUDA graph of 32 calls (one per layer) replayed 10 times.

    python -m bench.elementwise_micro --out-dir DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.cuda_timing import graph_ms
from bench.gemv_micro import copy_ceiling_gb_s
from kubellm.engine.loader import errors as _loader_first  # noqa: F401 (loader before models: import cycle)
from kubellm.engine.models import fused

HIDDEN, INTER, HQ, HKV, D = 4096, 14336, 32, 8, 128
CALLS = 32
_DEFAULT_SHAPES = (fused.ROPE_HEADS_PER_PROGRAM, fused.RMS_NORM_WARPS)  # the engine's, restored after the sweeps


def _graph_ms(fn) -> float:
    return graph_ms(lambda: [fn() for _ in range(CALLS)], reps=10) / CALLS


def sweep(tokens: int) -> dict:
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(tokens, HIDDEN, device=dev, dtype=bf)
    r = torch.randn(tokens, HIDDEN, device=dev, dtype=bf)
    w = torch.randn(HIDDEN, device=dev, dtype=bf)
    qkv = torch.randn(tokens, (HQ + 2 * HKV) * D, device=dev, dtype=bf)
    q = qkv[:, : HQ * D].view(tokens, HQ, D)
    k = qkv[:, HQ * D : (HQ + HKV) * D].view(tokens, HKV, D)
    ang = torch.randn(tokens, D // 2, device=dev)
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos()[:, None, :].to(bf), emb.sin()[:, None, :].to(bf)
    gate_up = torch.randn(tokens, 2 * INTER, device=dev, dtype=bf)
    e = 2
    out: dict = {}

    norm_bytes = 2 * tokens * HIDDEN * e
    add_norm_bytes = 4 * tokens * HIDDEN * e
    rope_bytes = 2 * tokens * (HQ + HKV) * D * e
    silu_bytes = 3 * tokens * INTER * e
    for warps in (4, 8, 16):
        fused.RMS_NORM_WARPS = warps
        ms = _graph_ms(lambda: fused.rms_norm(x, w, 1e-5))
        out[f"rms_norm_w{warps}"] = {"ms": ms, "gb_s": norm_bytes / ms / 1e6}
        ms = _graph_ms(lambda: fused.add_rms_norm(x, r, w, 1e-5))
        out[f"add_rms_norm_w{warps}"] = {"ms": ms, "gb_s": add_norm_bytes / ms / 1e6}
    for heads in (1, 4, 8, 16, 32):
        fused.ROPE_HEADS_PER_PROGRAM = heads
        ms = _graph_ms(lambda: fused.rope(q, k, cos, sin))
        out[f"rope_h{heads}"] = {"ms": ms, "gb_s": rope_bytes / ms / 1e6}
    for block in (512, 1024, 2048, 4096):
        for warps in (2, 4, 8):
            fused.SILU_MUL_CONFIG = (block, warps)
            ms = _graph_ms(lambda: fused.silu_mul(gate_up))
            out[f"silu_mul_b{block}_w{warps}"] = {"ms": ms, "gb_s": silu_bytes / ms / 1e6}
    out.update(qk_norm_rope(tokens))
    return out


def _torch_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # llama.py RMSNorm's torch path
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def qk_norm_rope(tokens: int) -> dict:
    """Qwen3-30B-A3B's attention heads (32 q / 4 kv x 128): the per-head q/k RMSNorm folded into the rotary kernel
    against the path it replaced (torch norms on the qkv views, then the rotary kernel) and against the per-head
    rms_norm kernel then rotary (the fallback), same inputs."""
    fused.ROPE_HEADS_PER_PROGRAM, fused.RMS_NORM_WARPS = _DEFAULT_SHAPES
    dev, bf, hq, hkv, d = "cuda", torch.bfloat16, 32, 4, 128
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device=dev, dtype=bf)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    qw, kw = torch.randn(d, device=dev, dtype=bf), torch.randn(d, device=dev, dtype=bf)
    ang = torch.randn(tokens, d // 2, device=dev)
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos()[:, None, :].to(bf), emb.sin()[:, None, :].to(bf)
    moved = 2 * tokens * (hq + hkv) * d * 2  # read q and k, write them

    def kernel_norms_then_rope():
        qn, kn = fused.rms_norm(q, qw, 1e-6), fused.rms_norm(k, kw, 1e-6)
        assert qn is not None and kn is not None, "the per-head rms_norm kernel declined"
        return fused.rope(qn, kn, cos, sin)

    runs = {
        "qk_norm_rope_fused": lambda: fused.rope(q, k, cos, sin, (qw, kw, 1e-6)),
        "qk_norm_kernel_then_rope": kernel_norms_then_rope,
        "qk_norm_torch_then_rope": lambda: fused.rope(_torch_norm(q, qw), _torch_norm(k, kw), cos, sin),
    }
    out = {}
    for name, fn in runs.items():
        ms = _graph_ms(fn)
        out[name] = {"ms": ms, "gb_s": moved / ms / 1e6}
    base = out["qk_norm_torch_then_rope"]["ms"]
    for v in out.values():
        v["speedup_vs_torch_norm"] = base / v["ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=Path("."))
    args = ap.parse_args()
    ceiling = copy_ceiling_gb_s()
    results = {"copy_gb_s": ceiling, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for tokens in (16384, 1):
        res = sweep(tokens)
        results[f"tokens_{tokens}"] = res
        for name, v in res.items():
            frac = v["gb_s"] / ceiling
            vs = f"  {v['speedup_vs_torch_norm']:.2f}x the torch q/k norms" if "speedup_vs_torch_norm" in v else ""
            print(f"T {tokens:5d} {name:24s} {v['ms'] * 1e3:9.1f} us  {v['gb_s']:7.0f} GB/s ({frac:.2f}){vs}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "elementwise-micro.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
