"""Small-batch weight GEMMs of a Llama-3.1-8B layer stack (or, --shape qwen3-30b-a3b, the dense GEMMs of a
Qwen3-30B-A3B layer: qkv, o, router): cuBLAS (F.linear) vs our Triton kernel (engine/models/gemv.py), at the shard
shapes of tensor parallel 1, 2 and 4, for M = 1..16 decode rows.

Each measurement is a CUDA graph of LAYERS layers x the shape's GEMMs over distinct weights (more
than L2 holds), replayed REPS times: what a decode step's graph does. Prints achieved GB/s of weight reads
against the copy ceiling measured in the same run, and the Triton/cuBLAS speed ratio per shape; writes JSON.

    python -m bench.gemv_micro --out-dir DIR
    python -m bench.gemv_micro --shape qwen3-30b-a3b --tp 1 --rows 1,8 --out-dir DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.cuda_timing import graph_ms
from bench.offline import measure_ceilings
from kubellm.engine.loader import errors as _loader_first  # noqa: F401 (loader before models: import cycle)
from kubellm.engine.models import gemv

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
LAYERS, REPS = 8, 20
CONFIGS = [
    {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}
    for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4,), (3, 4, 5))
]


def layer_shapes(tp: int, shape: str = "llama-3.1-8b") -> dict[str, tuple[int, int]]:
    """(N, K) of each weight GEMM of one layer on one rank. qwen3-30b-a3b: the dense GEMMs around its experts
    (hidden 2048, 32 q / 4 kv heads of 128, a 128-expert router), whose matrices are shard-sized at TP 1."""
    if shape == "qwen3-30b-a3b":
        hidden, heads, kv_heads, experts = 2048, 32, 4, 128
        return {
            "qkv": ((heads + 2 * kv_heads) * HEAD_DIM // tp, hidden),
            "o": (hidden, heads * HEAD_DIM // tp),
            "router": (experts, hidden),
        }
    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM // tp
    return {
        "qkv": (qkv, HIDDEN),
        "o": (HIDDEN, HEADS * HEAD_DIM // tp),
        "gate_up": (2 * INTER // tp, HIDDEN),
        "down": (HIDDEN, INTER // tp),
    }


def copy_ceiling_gb_s() -> float:
    """The device copy ceiling, measured as bench/offline.py measures it for every results file."""
    return measure_ceilings(torch.device("cuda"))["copy_gb_s"]


def run_stack(linear, xs: dict, weights: dict, shapes: dict) -> None:
    for i in range(LAYERS):
        for name in shapes:
            linear(xs[name], weights[name][i])


def with_config(cfg: dict):
    return lambda x, w: gemv.gemv(x, w, cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=Path("."))
    ap.add_argument("--tp", default="1,2,4")
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--shape", default="llama-3.1-8b", choices=("llama-3.1-8b", "qwen3-30b-a3b"))
    args = ap.parse_args()
    torch.manual_seed(0)
    ceiling = copy_ceiling_gb_s()
    print(f"copy ceiling {ceiling:.0f} GB/s")
    results = {"copy_gb_s": ceiling, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": [],
               "shape": args.shape}  # fmt: skip
    # the config is chosen on the first TP size at its first row count (run with --tp 2,1,4), then used everywhere
    best_cfg = None
    for tp in [int(t) for t in args.tp.split(",")]:
        shapes = layer_shapes(tp, args.shape)
        weights = {
            name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
            for name, (n, k) in shapes.items()
        }
        total_bytes = sum(w.numel() * 2 for ws in weights.values() for w in ws)
        for m in [int(r) for r in args.rows.split(",")]:
            xs = {name: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for name, (n, k) in shapes.items()}

            def stack(linear, xs=xs, weights=weights, shapes=shapes):
                return lambda: run_stack(linear, xs, weights, shapes)

            cublas_ms = graph_ms(stack(F.linear), REPS)
            if best_cfg is None:
                timings = []
                for cfg in CONFIGS:
                    try:
                        ms = graph_ms(stack(with_config(cfg)), REPS)
                    except Exception as e:  # a config that does not fit shared memory
                        print("config", cfg, "failed:", type(e).__name__)
                        continue
                    timings.append((ms, cfg))
                timings.sort(key=lambda t: t[0])
                best_cfg = timings[0][1]
                results[f"config_sweep_tp{tp}_m{m}"] = [{"ms": t, **c} for t, c in timings]
                print("best configs:", timings[:5])
            ours_ms = graph_ms(stack(with_config(best_cfg)), REPS)
            errs = []
            for name in shapes:
                ref = F.linear(xs[name], weights[name][0]).float()
                got = gemv.gemv(xs[name], weights[name][0], best_cfg).float()
                errs.append(float((got - ref).norm() / ref.norm()))
            case = {
                "tp": tp,
                "rows": m,
                "weight_gb": total_bytes / 1e9,
                "cublas_ms": cublas_ms,
                "triton_ms": ours_ms,
                "cublas_gb_s": total_bytes / cublas_ms / 1e6,
                "triton_gb_s": total_bytes / ours_ms / 1e6,
                "triton_speedup": cublas_ms / ours_ms,
                "max_rel_err_vs_cublas": max(errs),
            }
            results["cases"].append(case)
            print(
                f"TP {tp} M {m}: cuBLAS {case['cublas_gb_s']:.0f} GB/s ({case['cublas_gb_s'] / ceiling:.2f} of copy), "
                f"Triton {case['triton_gb_s']:.0f} GB/s ({case['triton_gb_s'] / ceiling:.2f}), "
                f"speedup {case['triton_speedup']:.3f}x, rel err {case['max_rel_err_vs_cublas']:.2e}"
            )
        del weights
        torch.cuda.empty_cache()
    results["config"] = best_cfg
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gemv-micro.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
