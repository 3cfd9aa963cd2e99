"""FP8 linear layers (engine/models/fp8_gemm.py, fp8_quant.py) against bf16 cuBLAS and the roofline, per batch size.

Workload: Llama-3.1-8B's four layer GEMMs (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096)
at M in {1, 7, 16, 64, 512, 2048, 8192} rows, random weights (seed 0), x ~ N(0, 1) in bf16. Each measurement is
a CUDA graph of LAYERS products with distinct weights (more than L2 holds, as in a model), replayed REPS times;
the figure is per product. Variants (all through the public functions the model calls):
  bf16            F.linear (cuBLAS), the baseline
  tensor          fp8_linear, per-tensor weight, dynamic input (vLLM's online --quantization fp8), through the
                  engine's default dispatch (KUBELLM_FP8_GEMM=table: models/fp8_dispatch.py's measured-best route)
  tensor-fixed    the same under the fixed dispatch (before the table: W8A16 up to 16 rows, else dynamic per-tensor
                  input + tensor-wise _scaled_mm)
  tensor-token    the same weight, per-token input (quantize + row-wise _scaled_mm): PER_TENSOR_WEIGHTS_PER_TOKEN_INPUT
  tensor-token-triton  per-token quantization + our Triton W8A8 kernel (the table's triton+token route, quantization
                  included, unlike tensor-triton)
  tensor-splitk   the split-K small-M kernel (fp8_gemm.splitk, default tiling; M <= 64), bf16 rows
  channel         fp8_linear, per-channel weight, per-token input (table dispatch)
  block           fp8_linear, 128x128 blocks (table dispatch: Triton W8A8 on per-group inputs, or W8A16 / split-K)
  block-splitk    the split-K kernel with block scales (M <= 64)
  block-gemm      the block GEMM alone on a pre-quantized input (what a fused norm/activation+quant leaves)
  block-w8a8      the Triton W8A8 block path at every M (to place GEMV_MAX_ROWS)
  block-w8a16     the W8A16 kernel at M <= 64 (likewise), tensor-w8a16 the same for per-tensor weights
  tensor-triton   our Triton W8A8 kernel with per-tensor scales instead of _scaled_mm (M > 16)
  flashinfer      flashinfer.gemm.fp8_blockscale_gemm_sm90 (DeepGEMM, bf16 input quantized inside), only with
                  --flashinfer-timeout-s > 0, in a child process bounded by that time (its JIT build time is unknown)
Fused quantization, H 4096 / I 14336: add+RMSNorm then quantize (two kernels) vs rms_norm_quant (one), SiLU-and-mul
then quantize vs silu_mul_quant, per token and per 128-group.

Roofline per product = max(bytes / copy bandwidth, FLOPs / matmul rate), both measured in this run: bf16 bytes
and the bf16 matmul rate for bf16; FP8 weight bytes and the FP8 _scaled_mm rate (8192^3, per-tensor) for FP8.
Prints time, TB/s or TFLOP/s achieved, ratio = roofline / time (1.0 is the limit) and speed-up over bf16.

    python -m bench.fp8_micro --out-dir DIR [--batches 1,7,64,512,8192] [--deadline-s 200] [--flashinfer-timeout-s 0]
Results: DIR/fp8-micro-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.cuda_timing import graph_ms
from bench.gpu_info import gpu_identity
from bench.offline import measure_ceilings
from kubellm.engine import loader as _loader_first  # noqa: F401 (loader before models: import cycle)
from kubellm.engine.models import fp8_gemm, fp8_quant, fused

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (K, N)
BATCHES = "1,7,16,64,512,2048,8192"
LAYERS, REPS = 4, 20
FP8 = torch.float8_e4m3fn


def fp8_matmul_tflops() -> float:
    """The FP8 tensor-core rate this GPU reaches through _scaled_mm (8192^3, per-tensor scales)."""
    n = 8192
    a = torch.randn(n, n, device="cuda").to(FP8)
    b = torch.randn(n, n, device="cuda").to(FP8)
    one = torch.ones((), device="cuda")

    def run():
        torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    return 2 * n**3 / (graph_ms(run, 10) * 1e-3) / 1e12


def block_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    nb, kb = -(-n // 128), -(-k // 128)
    wp = F.pad(w.float(), (0, kb * 128 - k, 0, nb * 128 - n)).view(nb, 128, kb, 128)
    s = (wp.abs().amax(dim=(1, 3)) / 448).clamp_min(1e-12)
    q = (wp / s[:, None, :, None]).clamp(-448, 448).to(FP8).view(nb * 128, kb * 128)[:n, :k].contiguous()
    return q, s


def make_layers(k: int, n: int, gen: torch.Generator) -> dict[str, list]:
    layers: dict[str, list] = {"bf16": [], "tensor": [], "channel": [], "block": []}
    for _ in range(LAYERS):
        w = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).to(torch.bfloat16)
        layers["bf16"].append(w)
        layers["tensor"].append(fp8_gemm.quantize_weight_fp8(w))
        layers["channel"].append(fp8_gemm.quantize_weight_fp8(w, per_channel=True))
        layers["block"].append(block_quantize(w))
    return layers


def variants(x: torch.Tensor, layers: dict[str, list], m: int) -> dict[str, Callable[[], None]]:
    """name -> a closure running the LAYERS products of that variant (skipping those that do not apply at M)."""
    blk = (128, 128)
    xq_group = fp8_quant.quantize(x, fp8_quant.ActQuant("group"))
    xq_tensor = fp8_quant.quantize(x, fp8_quant.ActQuant("tensor"))
    out: dict[str, Callable[[], None]] = {
        "bf16": lambda: [F.linear(x, w) for w in layers["bf16"]],
        "tensor": lambda: [fp8_gemm.fp8_linear(x, q, s) for q, s in layers["tensor"]],
        "tensor-token": lambda: [
            fp8_gemm.fp8_gemm(*fp8_quant.quantize(x, fp8_quant.ActQuant("token")), q, s) for q, s in layers["tensor"]
        ],
        "channel": lambda: [fp8_gemm.fp8_linear(x, q, s) for q, s in layers["channel"]],
        "block": lambda: [fp8_gemm.fp8_linear(x, q, s, block_size=blk) for q, s in layers["block"]],
        "block-gemm": lambda: [fp8_gemm.fp8_gemm(*xq_group, q, s, block_size=blk) for q, s in layers["block"]],
        "block-w8a8": lambda: [
            fp8_gemm.fp8_gemm(*fp8_quant.quantize(x, fp8_quant.ActQuant("group")), q, s, block_size=blk)
            for q, s in layers["block"]
        ],
    }
    if m <= fp8_gemm.W8A16_MAX_ROWS:  # where W8A16 could also serve (fp8_linear uses it up to GEMV_MAX_ROWS)
        out["block-w8a16"] = lambda: [
            fp8_gemm.w8a16(x, q, s, "block", blk, torch.bfloat16) for q, s in layers["block"]
        ]  # fmt: skip
        out["tensor-w8a16"] = lambda: [
            fp8_gemm.w8a16(x, q, s, "tensor", None, torch.bfloat16) for q, s in layers["tensor"]
        ]  # fmt: skip
    out["tensor-fixed"] = lambda: _fixed(lambda: [fp8_gemm.fp8_linear(x, q, s) for q, s in layers["tensor"]])
    out["tensor-token-triton"] = lambda: [
        fp8_gemm.fp8_gemm(*fp8_quant.quantize(x, fp8_quant.ActQuant("token")), q, s, use_scaled_mm=False)
        for q, s in layers["tensor"]
    ]
    if m <= fp8_gemm.SPLITK_MAX_ROWS:
        out["tensor-splitk"] = lambda: [
            fp8_gemm.splitk(x, q, s, "tensor", None, torch.bfloat16) for q, s in layers["tensor"]
        ]  # fmt: skip
        out["block-splitk"] = lambda: [
            fp8_gemm.splitk(x, q, s, "block", blk, torch.bfloat16) for q, s in layers["block"]
        ]  # fmt: skip
    if m > fp8_gemm.GEMV_MAX_ROWS:
        out["tensor-triton"] = lambda: [
            fp8_gemm.fp8_gemm(*xq_tensor, q, s, use_scaled_mm=False) for q, s in layers["tensor"]
        ]  # fmt: skip
    return out


def _fixed(run: Callable[[], object]) -> object:
    """`run` under the fixed dispatch (the route is picked when the graph is captured, so the capture sees it)."""
    mode = fp8_gemm.dispatch_mode()
    fp8_gemm.configure("fixed", True)
    try:
        return run()
    finally:
        fp8_gemm.configure(mode, True)


# Tilings tried per shape (the defaults are fp8_gemm.W8A16_CONFIG and w8a8_config): BLOCK_N, BLOCK_K, warps, stages
W8A16_SWEEP = {
    "tensor": [(16, 512, 4, 3), (32, 256, 4, 4), (32, 1024, 4, 2), (64, 512, 4, 3), (32, 512, 8, 3), (16, 1024, 4, 3)],
    "block": [(16, 128, 4, 8), (32, 128, 4, 4), (32, 128, 4, 8), (64, 128, 4, 6), (64, 128, 8, 8), (128, 128, 8, 4)],
}
W8A8_SWEEP = [  # BLOCK_M, BLOCK_N, GROUP_M, warps, stages (BLOCK_K = the block's 128)
    (64, 64, 8, 4, 4), (64, 128, 8, 4, 3), (64, 128, 8, 4, 4), (128, 128, 8, 8, 3), (128, 128, 8, 4, 3),
    (128, 64, 8, 4, 4), (128, 256, 8, 8, 3),
]  # fmt: skip


def measure_sweeps(deadline: float) -> list[dict]:
    """The W8A16 kernel's tilings at M = 1 and the Triton W8A8 block kernel's at M = 512 and 8192, on the qkv and
    down shapes, against the defaults: what to set in fp8_gemm after a run."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    rows = []
    blk = (128, 128)
    for name in SHAPES:  # the split-K kernel's splits and variants at 1 and 16 rows, every shape
        if time.monotonic() > deadline:
            return rows
        k, n = SHAPES[name]
        layers = make_layers(k, n, gen)
        sms = fp8_gemm.sm_count(torch.device("cuda"))
        for m in (1, 16):
            x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
            base = fp8_gemm.splitk_config(m, n, k, "tensor", None, sms)
            tilings = {"default": base}
            for split in sorted({1, max(1, base.SPLIT_K // 2), base.SPLIT_K * 2, base.SPLIT_K * 4}):
                tilings[f"split {split}"] = fp8_gemm.splitk_config(m, n, k, "tensor", None, sms, split_k=split,
                                                                    use_dot=base.use_dot)  # fmt: skip
            if m == 1:
                tilings["tensor cores"] = fp8_gemm.splitk_config(m, n, k, "tensor", None, sms, use_dot=True)
                tilings["BLOCK_K 512"] = fp8_gemm.splitk_config(m, n, k, "tensor", None, sms, block_k=512)
            tilings["BLOCK_N 64"] = fp8_gemm.splitk_config(m, n, k, "tensor", None, sms, block_n=64)
            tilings["BLOCK_N 16"] = fp8_gemm.splitk_config(m, n, k, "tensor", None, sms, block_n=16)
            times = {}
            for label, cfg in tilings.items():

                def run(cfg=cfg, x=x, layers=layers):
                    for q, s in layers["tensor"]:
                        fp8_gemm.splitk(x, q, s, "tensor", None, torch.bfloat16, cfg)

                times[f"{label} {_splitk_label(cfg)}"] = _try_ms(run)
            times["default"] = times[f"default {_splitk_label(base)}"]
            rows.append({"kernel": "splitk", "shape": name, "format": "tensor", "M": m, "ms": times})
            print(f"sweep splitk {name} M={m}: {_fmt_sweep(times)}", flush=True)
        del layers
        torch.cuda.empty_cache()
    for name in ("qkv", "down"):
        k, n = SHAPES[name]
        layers = make_layers(k, n, gen)
        for fmt in ("tensor", "block"):
            if time.monotonic() > deadline:
                return rows
            x = torch.randn(1, k, generator=gen, device="cuda").to(torch.bfloat16)
            bs = blk if fmt == "block" else None
            times = {}
            for bn_, bk_, warps, stages in [(None, None, None, None), *W8A16_SWEEP[fmt]]:
                cfg = (
                    None if bn_ is None else {"BLOCK_N": bn_, "BLOCK_K": bk_, "num_warps": warps, "num_stages": stages}
                )

                def run(cfg=cfg, fmt=fmt, bs=bs, x=x, layers=layers):
                    for q, s in layers[fmt]:
                        fp8_gemm.w8a16(x, q, s, fmt, bs, torch.bfloat16, config=cfg)

                times["default" if cfg is None else str((bn_, bk_, warps, stages))] = _try_ms(run)
            rows.append({"kernel": "w8a16", "shape": name, "format": fmt, "M": 1, "ms": times})
            print(f"sweep w8a16 {name} {fmt} M=1: {_fmt_sweep(times)}", flush=True)
        for m in (512, 8192):
            if time.monotonic() > deadline:
                return rows
            x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
            xq, xs = fp8_quant.quantize(x, fp8_quant.ActQuant("group"))
            times = {}
            for tile in [None, *W8A8_SWEEP]:
                cfg = None if tile is None else fp8_gemm.TileConfig(*tile)

                def run(cfg=cfg, xq=xq, xs=xs, layers=layers):
                    for q, s in layers["block"]:
                        fp8_gemm.fp8_gemm(xq, xs, q, s, block_size=blk, config=cfg)

                times["default" if tile is None else str(tile)] = _try_ms(run)
            rows.append({"kernel": "w8a8-block", "shape": name, "format": "block", "M": m, "ms": times})
            print(f"sweep w8a8 block {name} M={m}: {_fmt_sweep(times)}", flush=True)
        del layers
        torch.cuda.empty_cache()
    return rows


def _splitk_label(c: fp8_gemm.SplitKConfig) -> str:
    return f"({c.BLOCK_N}, {c.BLOCK_K}, split {c.SPLIT_K}, {'dot' if c.use_dot else 'fma'})"


def _try_ms(run: Callable[[], None]) -> float | str:
    try:
        return graph_ms(run, REPS) / LAYERS
    except Exception as e:  # a tiling this GPU cannot run (shared memory, registers) just loses
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _fmt_sweep(times: dict) -> str:
    return "  ".join(f"{k} {v * 1e3:.1f}us" if isinstance(v, float) else f"{k} FAILED" for k, v in times.items())


def roofline_ms(m: int, k: int, n: int, wbytes: int, ceilings: dict, tflops: float) -> float:
    mem = (n * k * wbytes + 2 * m * k + 2 * m * n) / (ceilings["copy_gb_s"] * 1e9) * 1e3
    return max(mem, 2 * m * n * k / (tflops * 1e12) * 1e3)


def measure_gemms(batches: list[int], ceilings: dict, fp8_tflops: float, deadline: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (k, n) in SHAPES.items():
        if time.monotonic() > deadline:
            print(f"deadline reached before {name}", flush=True)
            break
        layers = make_layers(k, n, gen)
        for m in batches:
            if time.monotonic() > deadline:
                print(f"{name}: deadline reached before M={m}", flush=True)
                break
            x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
            times = {}
            for var, fn in variants(x, layers, m).items():
                try:
                    times[var] = graph_ms(fn, REPS) / LAYERS
                except Exception as e:  # a variant that cannot run here is reported, the others still measured
                    times[var] = f"failed: {type(e).__name__}: {str(e)[:160]}"
            bf16_roof = roofline_ms(m, k, n, 2, ceilings, ceilings["matmul_tflop_s"])
            fp8_roof = roofline_ms(m, k, n, 1, ceilings, fp8_tflops)
            row = {"shape": name, "K": k, "N": n, "M": m, "ms": times, "bf16_roofline_ms": bf16_roof,
                   "fp8_roofline_ms": fp8_roof}  # fmt: skip
            rows.append(row)
            cells = "  ".join(
                f"{v} {t * 1e3:7.1f}us" if isinstance(t, float) else f"{v} FAILED" for v, t in times.items()
            )
            print(f"{name:8s} M={m:5d}  fp8 roofline {fp8_roof * 1e3:7.1f}us  {cells}", flush=True)
        del layers
        torch.cuda.empty_cache()
    return rows


def fused_cases(x, r, w, gu, spec: fp8_quant.ActQuant) -> dict[str, Callable[[], object]]:
    return {
        "add_rms_norm+quantize": lambda: fp8_quant.quantize(fused.add_rms_norm(x, r, w, 1e-5)[1], spec),
        "rms_norm_quant(residual)": lambda: fp8_quant.rms_norm_quant(x, w, 1e-5, spec, residual=r),
        "silu_mul+quantize": lambda: fp8_quant.quantize(fused.silu_mul(gu), spec),
        "silu_mul_quant": lambda: fp8_quant.silu_mul_quant(gu, spec),
    }


def measure_fused_quant() -> list[dict]:
    """The fused norm / activation + quantization kernels against the two-kernel sequence they replace."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    h, inter = 4096, 14336
    w = (torch.rand(h, generator=gen, device="cuda") + 0.5).to(torch.bfloat16)
    for m in (1, 64, 512, 8192):
        x = torch.randn(m, h, generator=gen, device="cuda").to(torch.bfloat16)
        r = torch.randn(m, h, generator=gen, device="cuda").to(torch.bfloat16)
        gu = torch.randn(m, 2 * inter, generator=gen, device="cuda").to(torch.bfloat16)
        for mode in ("token", "group"):
            cases = fused_cases(x, r, w, gu, fp8_quant.ActQuant(mode))
            t = {name: graph_ms(fn, REPS) for name, fn in cases.items()}
            rows.append({"M": m, "mode": mode, "ms": t})
            print(f"fused quant M={m:5d} {mode:5s} " + "  ".join(f"{k} {v * 1e3:6.1f}us" for k, v in t.items()))
    return rows


FLASHINFER_CHILD = """
import json, sys, torch
import torch.nn.functional as F
from flashinfer.gemm import fp8_blockscale_gemm_sm90
sys.path.insert(0, ".")
from bench.fp8_micro import SHAPES, LAYERS, REPS, block_quantize
from bench.cuda_timing import event_ms, graph_ms
gen = torch.Generator(device="cuda").manual_seed(0)
for name, (k, n) in SHAPES.items():
    layers = [block_quantize((torch.randn(n, k, generator=gen, device="cuda") / k**0.5).to(torch.bfloat16))
              for _ in range(LAYERS)]
    for m in map(int, sys.argv[1].split(",")):
        x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
        fn = lambda: [fp8_blockscale_gemm_sm90(x, q, None, s) for q, s in layers]
        try:
            ms = graph_ms(fn, REPS) / LAYERS
        except Exception as e:  # not capturable in a graph: timed eagerly (launch overhead included)
            try:
                fn()
                ms = event_ms(fn, REPS) / LAYERS
            except Exception as e2:
                ms = f"failed: {type(e2).__name__}: {str(e2)[:160]} (graph: {type(e).__name__})"
        print(json.dumps({"shape": name, "M": m, "ms": ms}), flush=True)
"""


def flashinfer_block(batches: list[int], timeout_s: float) -> list[dict] | str:
    """flashinfer's sm90 block-scaled GEMM, timed in a child (its first-use build may outlast our budget); the
    lines it printed before a timeout are kept."""
    if timeout_s <= 0:
        return "not measured (--flashinfer-timeout-s 0)"
    cmd = [sys.executable, "-c", FLASHINFER_CHILD, ",".join(map(str, batches))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        stdout, note = done.stdout, ("" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1])
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        note = f"stopped after {timeout_s:.0f} s"
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if not rows:
        return f"not measured: {note[:200] or 'no output'}"
    return rows


def write_results(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"fp8-micro-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    c = result["ceilings"]
    names = ["bf16", "tensor", "tensor-fixed", "tensor-token", "tensor-w8a16", "tensor-splitk", "channel", "block",
             "block-gemm", "block-w8a8", "block-w8a16", "block-splitk", "tensor-triton", "tensor-token-triton",
             "flashinfer"]  # fmt: skip
    fi = {(r["shape"], r["M"]): r["ms"] for r in result["flashinfer"]} if isinstance(result["flashinfer"], list) else {}
    lines = [
        f"# FP8 GEMM micro-benchmark, {result['device']}",
        "",
        f"Ceilings measured in this run: copy {c['copy_gb_s']:.0f} GB/s, bf16 matmul {c['matmul_tflop_s']:.0f} "
        f"TFLOP/s, FP8 _scaled_mm {result['fp8_tflop_s']:.0f} TFLOP/s. Llama-3.1-8B layer shapes; per product, "
        f"CUDA graph of {LAYERS} products with distinct weights, {REPS} replays. Times in us; in brackets the FP8 "
        "roofline / time (1.0 = the limit) for FP8 variants and the bf16 one for bf16. flashinfer: "
        + (result["flashinfer"] if isinstance(result["flashinfer"], str) else "measured (column)"),
        "",
        "| shape | M | " + " | ".join(names) + " | best FP8 / bf16 |",
        "|---|---:|" + "---:|" * (len(names) + 1),
    ]
    for r in result["rows"]:
        t = dict(r["ms"])
        if (r["shape"], r["M"]) in fi:
            t["flashinfer"] = fi[(r["shape"], r["M"])]
        cells = []
        for v in names:
            ms = t.get(v)
            if not isinstance(ms, float):
                cells.append("-" if ms is None else "fail")
                continue
            roof = r["bf16_roofline_ms"] if v == "bf16" else r["fp8_roofline_ms"]
            cells.append(f"{ms * 1e3:.1f} ({roof / ms:.2f})")
        fp8_best = min((ms for v, ms in t.items() if v != "bf16" and isinstance(ms, float)), default=None)
        speed = f"{t['bf16'] / fp8_best:.2f}x" if fp8_best and isinstance(t.get("bf16"), float) else "-"
        lines.append(f"| {r['shape']} | {r['M']} | " + " | ".join(cells) + f" | {speed} |")
    lines += ["", "Fused quantization (us per call, H 4096 / I 14336):", "",
              "| M | mode | add_rms_norm+quantize | rms_norm_quant(residual) | silu_mul+quantize | silu_mul_quant |",
              "|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["fused_quant"]:
        ms = r["ms"]
        lines.append(f"| {r['M']} | {r['mode']} | " + " | ".join(f"{ms[k] * 1e3:.1f}" for k in ms) + " |")
    lines += ["", "Tile sweeps (us per product; the fastest tiling against the default):", "",
              "| kernel | shape | format | M | default us | best tiling | best us |",
              "|---|---|---|---:|---:|---|---:|"]  # fmt: skip
    for r in result.get("sweeps", []):
        ok = {k: v for k, v in r["ms"].items() if isinstance(v, float)}
        if not ok:
            continue
        best = min(ok, key=ok.get)
        default = ok.get("default")
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {r['format']} | {r['M']} | "
            f"{'-' if default is None else f'{default * 1e3:.1f}'} | {best} | {ok[best] * 1e3:.1f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--batches", default=BATCHES)
    ap.add_argument("--deadline-s", type=float, default=240.0, help="for everything but the flashinfer child")
    ap.add_argument("--flashinfer-timeout-s", type=float, default=0.0)
    ap.add_argument("--sweep-s", type=float, default=60.0, help="of --deadline-s, for the tile sweeps (split-K first)")
    args = ap.parse_args()
    deadline = time.monotonic() + args.deadline_s
    batches = [int(b) for b in args.batches.split(",")]
    ceilings = measure_ceilings(torch.device("cuda"))
    fp8_tflops = fp8_matmul_tflops()
    print(f"{torch.cuda.get_device_name()}: copy {ceilings['copy_gb_s']:.0f} GB/s, bf16 matmul "
          f"{ceilings['matmul_tflop_s']:.0f} TFLOP/s, fp8 _scaled_mm {fp8_tflops:.0f} TFLOP/s", flush=True)  # fmt: skip
    result = {
        "device": torch.cuda.get_device_name(), "gpu": gpu_identity(), "torch": torch.__version__,
        "ceilings": ceilings, "fp8_tflop_s": fp8_tflops, "layers": LAYERS, "reps": REPS,
        "gemv_max_rows": fp8_gemm.GEMV_MAX_ROWS, "rows": [], "fused_quant": [], "flashinfer": "not reached",
    }  # fmt: skip
    result["fused_quant"] = measure_fused_quant()
    result["rows"] = measure_gemms(batches, ceilings, fp8_tflops, deadline - args.sweep_s)
    write_results(args.out_dir, result)
    result["sweeps"] = measure_sweeps(deadline)
    write_results(args.out_dir, result)  # written before flashinfer, whose child may run out the clock
    result["flashinfer"] = flashinfer_block(batches, args.flashinfer_timeout_s)  # its own bound, after the deadline
    print(f"flashinfer block GEMM: {result['flashinfer']}", flush=True)
    write_results(args.out_dir, result)


if __name__ == "__main__":
    main()
