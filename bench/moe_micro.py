"""The fused MoE layer (engine/models/fused_moe.py) against its roofline, per batch size.

Workload: one MoE layer's experts (fused_experts: align, gate_up + SiLU-mul, down + top-k weight, sum over k)
of Qwen3-30B-A3B (E 128, top-8, H 2048, I 768; also its TP 2 and TP 4 shards), DeepSeek-V2-Lite (E 64, top-6,
H 2048, I 1408) and Mixtral (E 8, top-2, H 4096, I 14336), random bf16 weights, routing = top-k of softmax of
standard-normal router logits (seed 0), renormalised. Each measurement is a CUDA graph of LAYERS layers with
distinct weights and routing (more than L2 holds, as in a model), replayed REPS times; the figure is per layer.
The gating kernel (fused_topk) is timed the same way on its own.

Roofline per layer = max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both measured in this run
(bench.offline.measure_ceilings), with bytes = the weights of the experts that this routing activates (each
read once) + x + the output; FLOPs = 2 * T * k * 3 * I * H. Prints ratio = time / roofline (1.0 is the limit).

flashinfer's CUTLASS fused MoE (`flashinfer.fused_moe.cutlass_fused_moe`) is measured only with
--flashinfer-timeout-s > 0, in a subprocess bounded by that time: its first-use JIT build did not finish within
9 minutes on 16 cores (GUIDE.md), longer than one GPU command may run, so by default it reads "not measured".

FP8 experts (--dtype fp8-block: 128x128 block scales as Qwen3-30B-A3B-FP8 ships them; fp8-tensor: one scale per
expert, dynamic per-tensor activations): the same layers quantized, the roofline with 1-byte weights and the FP8
_scaled_mm rate measured in this run; results go to moe-micro-<date>-<dtype>.json/.md.

    python -m bench.moe_micro --out-dir DIR [--batches 1,32,256,1024,4096] [--shapes qwen3-30b-a3b,...] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.cuda_timing import graph_ms
from bench.offline import measure_ceilings
from kubellm.engine import loader as _loader_first  # noqa: F401 (loader before models: import cycle)
from kubellm.engine.models import fused_moe

SHAPES = {  # name: (E, top-k, H, I)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "qwen3-30b-a3b-tp2": (128, 8, 2048, 384),
    "qwen3-30b-a3b-tp4": (128, 8, 2048, 192),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
    "mixtral": (8, 2, 4096, 14336),
}
LAYERS, REPS = 4, 10
NOT_MEASURED = "not measured: its first-use JIT build exceeds one command's 10 minutes (9+ min on 16 cores)"


def routing(t: int, e: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(t, e, generator=gen, device="cuda")
    w, ids = torch.topk(torch.softmax(logits, -1), k, -1)
    return w / w.sum(-1, keepdim=True), ids.to(torch.int32)


def roofline_ms(
    t: int, k: int, h: int, inter: int, active_experts: float, ceilings: dict, e_bytes: int = 2
) -> dict[str, float]:
    """The physical floor: each active expert's weights read once, x read and the output written once (what
    an implementation keeps between its GEMMs is its own cost), against the run's copy and matmul ceilings
    (`matmul_tflop_s` is the rate of the weights' dtype: bf16, or FP8 for 1-byte weights)."""
    weight_bytes = active_experts * 3 * inter * h * e_bytes
    mem_ms = (weight_bytes + 2 * t * h * 2) / (ceilings["copy_gb_s"] * 1e9) * 1e3
    flop_ms = 2 * t * k * 3 * inter * h / (ceilings["matmul_tflop_s"] * 1e12) * 1e3
    return {
        "weight_mb": weight_bytes / 1e6,
        "memory_ms": mem_ms,
        "compute_ms": flop_ms,
        "roofline_ms": max(mem_ms, flop_ms),
    }


def quantize_experts(w: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] bf16 -> (float8_e4m3fn, scales): [E, N/128, K/128] blocks, or [E] per expert."""
    e, n, k = w.shape
    if dtype == "fp8-tensor":
        s = w.float().abs().amax(dim=(1, 2)) / 448
        return (w.float() / s[:, None, None]).clamp(-448, 448).to(torch.float8_e4m3fn), s
    wg = w.float().view(e, n // 128, 128, k // 128, 128)
    s = (wg.abs().amax(dim=(2, 4)) / 448).clamp_min(1e-12)
    return (wg / s[:, :, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(e, n, k), s


def measure_shape(name: str, batches: list[int], ceilings: dict, deadline: float, dtype: str = "bf16") -> list[dict]:
    e, k, h, inter = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        w13 = (torch.randn(e, 2 * inter, h, generator=gen, device="cuda", dtype=torch.bfloat16) / h**0.5).contiguous()
        w2 = (torch.randn(e, h, inter, generator=gen, device="cuda", dtype=torch.bfloat16) / inter**0.5).contiguous()
        if dtype == "bf16":
            layers.append((w13, w2, {}))
            continue
        (q13, s13), (q2, s2) = quantize_experts(w13, dtype), quantize_experts(w2, dtype)
        kw = {"w1_scale": s13, "w2_scale": s2} | ({"block_size": (128, 128)} if dtype == "fp8-block" else {})
        layers.append((q13, q2, kw))
        del w13, w2
    rows = []
    for t in batches:
        if time.monotonic() > deadline:
            print(f"{name}: deadline reached before batch {t}", flush=True)
            break
        x = torch.randn(t, h, generator=gen, device="cuda", dtype=torch.bfloat16)
        routes = [routing(t, e, k, gen) for _ in range(LAYERS)]
        active = sum(int(ids.unique().numel()) for _, ids in routes) / LAYERS
        w_dtype = layers[0][0].dtype
        cfg = fused_moe.get_config(e, inter, h, w_dtype, t, k)

        def stack(x=x, routes=routes, layers=layers):
            for (w13, w2, kw), (w, ids) in zip(layers, routes, strict=True):
                fused_moe.fused_experts(x, w13, w2, w, ids, **kw)

        ms = graph_ms(stack, REPS) / LAYERS
        logits = [torch.randn(t, e, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]

        def gating(logits=logits):
            for lg in logits:
                fused_moe.fused_topk(lg, k, True)

        topk_ms = graph_ms(gating, REPS) / LAYERS
        roof = roofline_ms(t, k, h, inter, active, ceilings, 2 if dtype == "bf16" else 1)
        row = {
            "shape": name, "dtype": dtype, "E": e, "top_k": k, "H": h, "I": inter, "batch": t, "active_experts": active,
            "fused_experts_ms": ms, "fused_topk_ms": topk_ms, **roof, "ratio_to_roofline": ms / roof["roofline_ms"],
            "config": cfg.to_json(), "config_source": fused_moe.config_source(e, inter, h, w_dtype),
        }  # fmt: skip
        rows.append(row)
        print(
            f"{name:20s} T={t:5d} active {active:6.1f} experts ({roof['weight_mb']:7.1f} MB)  "
            f"{ms * 1e3:8.1f} us  roofline {roof['roofline_ms'] * 1e3:8.1f} us  ratio {row['ratio_to_roofline']:.2f}  "
            f"topk {topk_ms * 1e3:.1f} us",
            flush=True,
        )
    del layers
    torch.cuda.empty_cache()
    return rows


FLASHINFER_CHILD = """
import sys, json, torch
from flashinfer.fused_moe import cutlass_fused_moe
e, k, h, inter, t = map(int, sys.argv[1:6])
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(t, h, generator=g, device="cuda", dtype=torch.bfloat16)
w13 = torch.randn(e, 2 * inter, h, generator=g, device="cuda", dtype=torch.bfloat16) / h**0.5
w2 = torch.randn(e, h, inter, generator=g, device="cuda", dtype=torch.bfloat16) / inter**0.5
w, ids = torch.topk(torch.softmax(torch.randn(t, e, generator=g, device="cuda"), -1), k, -1)
w = (w / w.sum(-1, keepdim=True)).float(); ids = ids.int()
run = lambda: cutlass_fused_moe(x, ids, w, w13, w2, torch.bfloat16, quant_scales=[])
run(); torch.cuda.synchronize()
s, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(20): run()
en.record(); torch.cuda.synchronize()
print(json.dumps({"ms": s.elapsed_time(en) / 20}))
"""


def flashinfer_ms(name: str, t: int, timeout_s: float) -> float | str:
    """flashinfer's CUTLASS fused MoE in a child process (its JIT build may take longer than we have)."""
    if timeout_s <= 0:
        return NOT_MEASURED
    e, k, h, inter = SHAPES[name]
    try:
        done = subprocess.run(
            [sys.executable, "-c", FLASHINFER_CHILD, *map(str, (e, k, h, inter, t))],
            capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"not measured: build + run did not finish in {timeout_s:.0f} s"
    if done.returncode != 0:
        return "not measured: " + (done.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return float(json.loads(done.stdout.strip().splitlines()[-1])["ms"])


def write_results(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if result.get("dtype", "bf16") == "bf16" else f"-{result['dtype']}"
    stem = out_dir / f"moe-micro-{dt.date.today().isoformat()}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Fused MoE micro-benchmark, {result['device']}, {result.get('dtype', 'bf16')} experts",
        "",
        f"Ceilings measured in this run: copy {result['ceilings']['copy_gb_s']:.0f} GB/s, "
        f"matmul ({result.get('dtype', 'bf16')}) {result['ceilings']['matmul_tflop_s']:.0f} TFLOP/s. "
        f"Per layer, CUDA graph of {LAYERS} layers "
        f"with distinct weights, {REPS} replays. flashinfer CUTLASS: {result['flashinfer']}.",
        "",
        "| shape | batch | active experts | weights MB | fused_experts us | roofline us | ratio | topk us |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['active_experts']:.1f} | {r['weight_mb']:.1f} | "
            f"{r['fused_experts_ms'] * 1e3:.1f} | {r['roofline_ms'] * 1e3:.1f} | {r['ratio_to_roofline']:.2f} | "
            f"{r['fused_topk_ms'] * 1e3:.1f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--batches", default="1,32,256,1024,4096")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--deadline-s", type=float, default=300.0)
    ap.add_argument("--flashinfer-timeout-s", type=float, default=0.0)
    ap.add_argument("--dtype", choices=("bf16", "fp8-block", "fp8-tensor"), default="bf16")
    args = ap.parse_args()
    deadline = time.monotonic() + args.deadline_s
    ceilings = measure_ceilings(torch.device("cuda"))
    if args.dtype != "bf16":  # the roofline's compute side at the FP8 tensor-core rate
        from bench.fp8_micro import fp8_matmul_tflops

        ceilings = {
            **ceilings,
            "bf16_matmul_tflop_s": ceilings["matmul_tflop_s"],
            "matmul_tflop_s": fp8_matmul_tflops(),
        }
    print(f"{torch.cuda.get_device_name()}: copy {ceilings['copy_gb_s']:.0f} GB/s, "
          f"matmul {ceilings['matmul_tflop_s']:.0f} TFLOP/s", flush=True)  # fmt: skip
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.shapes.split(","):
        rows += measure_shape(name, batches, ceilings, deadline, args.dtype)
    fi = flashinfer_ms("qwen3-30b-a3b", 256, args.flashinfer_timeout_s)
    fi_text = fi if isinstance(fi, str) else f"qwen3-30b-a3b batch 256: {fi * 1e3:.1f} us"
    print(f"flashinfer CUTLASS fused MoE: {fi_text}", flush=True)
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": ceilings, "dtype": args.dtype,
        "layers": LAYERS, "reps": REPS, "rows": rows, "flashinfer": fi_text,
    }  # fmt: skip
    write_results(args.out_dir, result)


if __name__ == "__main__":
    main()
