"""Choose the fused MoE tile configs per batch-size bucket on this GPU and write them where the engine reads them.

For each shape (E, top-k, H, I) in priority order and each batch bucket: random routing (top-k of softmax of
standard-normal logits), then for every tile height BLOCK_M that suits the rows per expert (and, for a few
tokens, no alignment at all: one pair per tile), the alignment timed once and each GEMM (gate_up, down) timed
alone over its candidate tilings; the bucket's config is the option whose align + best gate_up + best down is
fastest. Each timing is the median of ITERS runs, each after a write of 256 MB that
evicts L2 (so weights come from memory, as in a model whose layers each have their own). Bounded by
--deadline-s: shapes and buckets not reached keep `default_config`. Writes one JSON per shape:
<out-dir>/E=..,N=..,H=..,device=..,dtype=bfloat16.json (the name fused_moe.config_file_name gives).
--dtype fp8 tunes FP8 experts (128x128 block scales, per-token-group activations, as Qwen3-30B-A3B-FP8 ships;
per-tensor FP8 experts read the same dtype=float8_e4m3fn file): each GEMM is timed on its pre-quantized input.

    python -m bench.moe_autotune --out-dir engine/models/moe_configs --deadline-s 240 [--dtype fp8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kubellm.engine import loader as _loader_first  # noqa: F401 (loader before models: import cycle)
from kubellm.engine.models import fp8_quant, fused_moe
from kubellm.engine.models.fused_moe import GemmConfig, MoeConfig

SHAPES = [  # priority order: (name, E, top-k, H, I)
    ("qwen3-30b-a3b", 128, 8, 2048, 768),
    ("deepseek-v2-lite", 64, 6, 2048, 1408),
    ("mixtral", 8, 2, 4096, 14336),
    ("qwen3-30b-a3b-tp2", 128, 8, 2048, 384),
    ("qwen3-30b-a3b-tp4", 128, 8, 2048, 192),
    ("deepseek-v2-lite-tp2", 64, 6, 2048, 704),
    ("mixtral-tp2", 8, 2, 4096, 7168),
    ("deepseek-v2-lite-tp4", 64, 6, 2048, 352),
    ("mixtral-tp4", 8, 2, 4096, 3584),
]
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
ITERS = 12
DIRECT_MAX_TOKENS = 8  # batches where skipping the alignment (one pair per tile) is also tried
MAX_UNROLL = 64  # down_sum unrolls top_k * I / BLOCK_K loads: more compiles too slowly to be worth trying


# (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) per tile height, hand-picked to keep the compiles (~1-2 s
# each, most of the autotune's time) few: narrow N and long K for weight-bound small tiles, wider for big ones.
CANDIDATES = {
    16: [(16, 256, 1, 4, 4), (16, 128, 1, 4, 5), (32, 128, 1, 4, 4), (32, 256, 1, 4, 3), (64, 128, 1, 4, 4),
         (64, 256, 1, 4, 3)],
    32: [(64, 64, 8, 4, 4), (64, 128, 8, 4, 3), (128, 64, 8, 4, 4), (128, 128, 8, 4, 3), (32, 128, 8, 4, 4),
         (64, 128, 8, 4, 5)],
    64: [(64, 64, 8, 4, 4), (64, 128, 8, 4, 3), (128, 64, 8, 4, 3), (128, 64, 8, 8, 4), (128, 128, 8, 8, 3),
         (64, 64, 8, 4, 5)],
    128: [(128, 64, 8, 8, 3), (128, 64, 8, 8, 4), (64, 64, 8, 4, 4), (128, 128, 8, 8, 3)],
}  # fmt: skip


def candidates(block_m: int) -> list[GemmConfig]:
    return [GemmConfig(*c) for c in CANDIDATES[block_m]]


def block_ms(num_tokens: int, top_k: int, num_experts: int) -> list[int]:
    rows = num_tokens * top_k / num_experts
    return [bm for bm, lo, hi in ((16, 0, 96), (32, 4, 256), (64, 16, 1e9), (128, 64, 1e9)) if lo <= rows <= hi]


class Timer:
    """Median GPU time of a callable, each run after evicting L2."""

    def __init__(self) -> None:
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        try:
            fn()  # compile
        except Exception as e:  # a tiling this GPU cannot run (e.g. out of shared memory) just loses
            print(f"  skipped: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            return float("inf")
        events = []
        for _ in range(ITERS):
            self.flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def down_sum_candidates(inter: int, top_k: int) -> list[GemmConfig]:
    """Tilings of the token-major down_sum kernel whose unrolled loop stays small (it compiles per I)."""
    tiles = ((16, 128), (16, 256), (32, 128), (64, 64))
    return [GemmConfig(bn, bk, 1, 4, 1) for bn, bk in tiles if top_k * -(-inter // bk) <= MAX_UNROLL]


FP8_BLOCK = (128, 128)


def quantize_experts_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] bf16 -> (float8_e4m3fn, [E, N/128, K/128] block scales)."""
    e, n, k = w.shape
    wg = w.float().view(e, n // 128, 128, k // 128, 128)
    s = (wg.abs().amax(dim=(2, 4)) / 448).clamp_min(1e-12)
    return (wg / s[:, :, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(e, n, k), s


def tune_bucket(
    timer: Timer, e: int, k: int, h: int, inter: int, t: int, gen: torch.Generator, w13, w2,
    fp8_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:  # fmt: skip
    """Best (alignment, gate_up tiling, down tiling) for t tokens, each stage timed alone on a fixed alignment;
    the down figure includes the sum over k, which the token-major down_sum makes unnecessary. fp8_scales: w13 and
    w2 are FP8 with these block scales; the GEMMs' inputs are quantized once, outside the timings."""
    x = torch.randn(t, h, generator=gen, device="cuda", dtype=torch.bfloat16)
    w, ids = torch.topk(torch.softmax(torch.randn(t, e, generator=gen, device="cuda"), -1), k, -1)
    w, ids = (w / w.sum(-1, keepdim=True)).contiguous(), ids.to(torch.int32)
    per_pair = torch.empty(t * k, h, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(t, h, device="cuda", dtype=torch.bfloat16)

    group = fp8_quant.ActQuant("group")
    xq, up_fp8 = x, None
    if fp8_scales is not None:
        xq, xs = fp8_quant.quantize(x, group)
        up_fp8 = fused_moe.Fp8Gemm(xs, fp8_scales[0], FP8_BLOCK)

    def run_up(al, c):
        return fused_moe.gate_up(xq, w13, al, k, c, up_fp8, out_dtype=torch.bfloat16)

    def down_input(a):
        if fp8_scales is None:
            return a, None
        aq, a_s = fp8_quant.quantize(a, group)
        return aq, fused_moe.Fp8Gemm(a_s, fp8_scales[1], FP8_BLOCK)

    def down_and_sum(a, al, c):
        fused_moe.down(a[0], w2, al, w, c, per_pair, a[1])
        if k > 1:
            torch.sum(per_pair.view(t, k, h), dim=1, out=out)

    w2_scale = fp8_scales[1] if fp8_scales is not None else None
    blk = FP8_BLOCK if fp8_scales is not None else None

    best = None
    options = [(bm, False) for bm in block_ms(t, k, e)] + ([(16, True)] if t <= DIRECT_MAX_TOKENS else [])
    for bm, direct in options:
        al = fused_moe.align_pairs(ids, e, bm, direct)
        align_ms = 0.0 if direct else timer(lambda bm=bm: fused_moe.align_pairs(ids, e, bm))
        up_t = {c: timer(lambda c=c, al=al: run_up(al, c)) for c in candidates(bm)}
        up = min(up_t, key=up_t.get)
        if up_t[up] == float("inf"):
            continue  # no tiling of this height ran
        activated = run_up(al, up)
        a_in = down_input(activated)
        dn_t = {(c, False): timer(lambda c=c, a=a_in, al=al: down_and_sum(a, al, c)) for c in candidates(bm)}
        if direct:
            for c in down_sum_candidates(inter, k):
                dn_t[(c, True)] = timer(
                    lambda c=c, a=activated, al=al: fused_moe.down_sum(a, w2, al, k, w, c, out, w2_scale, blk)
                )
        (dn, fuse), dn_ms = min(dn_t.items(), key=lambda kv: kv[1])
        if dn_ms == float("inf"):
            continue
        total = align_ms + up_t[up] + dn_ms
        if best is None or total < best[0]:
            best = (total, MoeConfig(bm, up, dn, direct, fuse), align_ms, up_t[up], dn_ms)
    if best is None:
        raise RuntimeError(f"no fused MoE tiling ran for {t} tokens")
    _, cfg, align_ms, up_ms, dn_ms = best
    return {"config": cfg, "align_ms": align_ms, "gate_up_ms": up_ms, "down_ms": dn_ms}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=fused_moe.CONFIG_DIR)
    ap.add_argument("--deadline-s", type=float, default=240.0)
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16")
    args = ap.parse_args()
    fp8 = args.dtype == "fp8"
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    deadline = time.monotonic() + args.deadline_s
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = fused_moe.current_device_name()
    timer = Timer()
    wanted = args.shapes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    for name, e, k, h, inter in (s for s in SHAPES if s[0] in wanted):
        if time.monotonic() > deadline:
            print(f"deadline: {name} not tuned (default_config)", flush=True)
            continue
        gen = torch.Generator(device="cuda").manual_seed(0)
        w13 = torch.randn(e, 2 * inter, h, generator=gen, device="cuda", dtype=torch.bfloat16) / h**0.5
        w2 = torch.randn(e, h, inter, generator=gen, device="cuda", dtype=torch.bfloat16) / inter**0.5
        scales = None
        if fp8:
            if inter % 128 or h % 128:
                print(f"{name}: FP8 blocks need H and I multiples of 128, skipped", flush=True)
                continue
            (w13, s13), (w2, s2) = quantize_experts_fp8(w13), quantize_experts_fp8(w2)
            scales = (s13, s2)
        path = args.out_dir / fused_moe.config_file_name(e, inter, h, dtype, device)
        configs, timings = {}, {}
        for t in batches:
            if time.monotonic() > deadline:
                print(f"deadline: {name} tuned up to batch {max(configs, default=0)}", flush=True)
                break
            r = tune_bucket(timer, e, k, h, inter, t, gen, w13, w2, scales)
            configs[t] = r["config"].to_json()
            timings[t] = {key: r[key] for key in ("align_ms", "gate_up_ms", "down_ms")}
            us = {key: f"{r[key] * 1e3:.1f} us" for key in ("align_ms", "gate_up_ms", "down_ms")}
            print(f"{name} T={t}: {configs[t]} {us}", flush=True)
            doc = {"device": device, "E": e, "top_k": k, "N": inter, "H": h, "dtype": str(dtype).split(".")[-1],
                   "tuned": time.strftime("%Y-%m-%d"), "triton": _triton_version(), "configs": configs,
                   "timings": timings}  # fmt: skip
            path.write_text(json.dumps(doc, indent=1) + "\n")  # after every bucket: a timeout keeps what was done
        print(f"wrote {path}", flush=True)
        del w13, w2
        torch.cuda.empty_cache()


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
