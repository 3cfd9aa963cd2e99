"""Multi-head latent attention alone on one GPU: one layer of DeepSeek-V2-Lite's shape (16 heads, qk_nope 128, rope
64, v 128, latent 512, page 16 unless said), random bf16 tensors (seed 0).

- decode: the engine's flashinfer MLA backend (engine/attention/flashinfer_mla.py: latent write + kernel) at batch
  1/32/128/256 over 1024-token contexts, in a CUDA graph, against the floor of reading each context's latents once
  (batch x ctx x 576 x 2 bytes at the copy bandwidth measured in this run), for the FA2 kernel family the engine
  uses by default and FA3 (KUBELLM_PREFILL_BACKEND=fa3 switches the engine to it), at pages of 16 and 64 tokens
  (the engine's --block-size; vLLM's FLASH_ATTN_MLA decode ran at 16 beside us on 2026-12-07); with two or more
  kernels, each other kernel's time over the first's per page and batch (e.g. fa3 / fa2: below 1 is faster; the
  engine takes a decode family with KUBELLM_MLA_DECODE_BACKEND). `triton` in --decode-kernels times our own split-KV
  decode kernel (engine/attention/triton_mla_decode.py, KUBELLM_MLA_DECODE_BACKEND=triton; its rows name the KV
  splits a row it ran with); `triton-N-W-S-P[-M]` the same with another launch shape, to sweep it in one run: BLOCK_N
  tokens a tile, W warps, S pipeline stages, P programs per SM (the split count's target), M tokens a split at least
  (the engine's: 32-4-3-2-64).
  A decode row that fails (e.g. a launch shape past shared memory) is recorded in decode_errors, not fatal.
  `--skip-prefill` stops after the decode rows;
- prefill chunks of L new tokens (L = 16 ... 4096; as many chunks as make 16384 tokens, at most 16) over a cached
  prefix of 0 or 4096 tokens, causal, with each path's projections: absorbed (W_UK on the queries, the MLA kernel over
  the latent pool, W_UV on its output: the engine's default) vs up-projected (the engine's path with
  --mla-upproject-min-tokens: the context's latents gathered and through kv_b_proj to K_nope and V, then flashinfer's
  ragged prefill with head_dim_qk 192 / head_dim_vo 128), both on the flashinfer family --prefill-kernels names (fa2
  by default; fa3 as KUBELLM_PREFILL_BACKEND=fa3 runs the engine, its first use builds FA3's 192/128 module).
  The issue asks which is faster per length: the smallest L from which up-projection wins at both prefix lengths is
  what --mla-upproject-min-tokens should be set to (the engine default stays 0, absorbed everywhere, until this says
  otherwise).

    python -m bench.mla_micro --out-dir DIR      (bench/gpu_run.sh mla-micro)
    bench/gpu_run.sh mla-micro --decode-batches 1,64,256 --decode-kernels fa2,fa3,triton --decode-pages 16,64 \
        --skip-prefill

Results: DIR/mla-micro-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.cuda_timing import event_ms, graph_ms
from bench.offline import measure_ceilings
from kubellm.engine.attention import AttentionMetadata
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq

HEADS, NOPE, ROPE, V, RANK, BLOCK = 16, 128, 64, 128, 512, 16
WIDTH = RANK + ROPE
SCALE = (NOPE + ROPE) ** -0.5
REPS = 20


def _batch(lens: list[int], new: int, block: int = BLOCK) -> tuple[ForwardBatch, int]:
    """Sequences of `lens` tokens (the last `new` of each computed this step) on consecutive blocks."""
    seqs, at = [], 0
    for i, n in enumerate(lens):
        pages = -(-n // block)
        seqs.append(ScheduledSeq(f"s{i}", [0] * new, n - new, list(range(at, at + pages)), True))
        at += pages
    return ForwardBatch(seqs), at


def _backend(
    kernel: str = "fa2", upproject_min_tokens: int = 0, max_context_tokens: int | None = None, block: int = BLOCK
):
    """`kernel`: a flashinfer family (prefill and decode), or `triton`: fa2 prefill, our Triton decode kernel."""
    from kubellm.engine.attention.flashinfer_mla import FlashInferMLAAttention

    decode = kernel
    if kernel.startswith("triton"):
        kernel, decode = "fa2", "triton"
    return FlashInferMLAAttention(
        HEADS, 1, WIDTH, SCALE, block, kv_lora_rank=RANK, dtype=torch.bfloat16, device="cuda", mla_backend=kernel,
        mla_decode_backend=decode, upproject_min_tokens=upproject_min_tokens,
        upproject_max_context_tokens=max_context_tokens, qk_nope_head_dim=NOPE, v_head_dim=V,
    )  # fmt: skip


def triton_config(kernel: str):
    """`triton`: the engine's launch shape; `triton-N-W-S-P[-M]`: BLOCK_N, warps, stages, programs per SM, min
    tokens a split."""
    from kubellm.engine.attention.triton_mla_decode import DEFAULT, DecodeConfig

    if kernel == "triton":
        return DEFAULT
    n, w, s, p, *m = map(int, kernel.split("-")[1:])
    least = m[0] if m else DEFAULT.min_split_tokens
    return DecodeConfig(block_n=n, num_warps=w, num_stages=s, programs_per_sm=p, min_split_tokens=least)


def decode_row(
    batch: int, ctx: int, kernel: str, ceilings: dict[str, float], gen: torch.Generator, page: int = BLOCK
) -> dict[str, Any]:
    attn = _backend(kernel, block=page)
    splits = None
    if kernel.startswith("triton"):
        wrapper = attn._eager_decode
        wrapper.config = triton_config(kernel)  # type: ignore[union-attr]
        splits = wrapper.splits(batch)  # type: ignore[union-attr]
    fb, blocks = _batch([ctx] * batch, 1, page)
    pool = torch.randn(blocks, page, WIDTH, generator=gen, device="cuda", dtype=torch.bfloat16)
    q_lat = torch.randn(batch, HEADS, RANK, generator=gen, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(batch, HEADS, ROPE, generator=gen, device="cuda", dtype=torch.bfloat16)
    latent = torch.randn(batch, RANK, generator=gen, device="cuda", dtype=torch.bfloat16)
    k_rope = torch.randn(batch, ROPE, generator=gen, device="cuda", dtype=torch.bfloat16)
    attn.begin_step(AttentionMetadata.from_batch(fb, page, "cuda"))
    ms = graph_ms(lambda: attn.forward_mla(0, q_lat, q_rope, latent, k_rope, pool), REPS)
    floor_ms = batch * ctx * WIDTH * 2 / (ceilings["copy_gb_s"] / 2 * 1e9) * 1e3  # read once (copy = read + write)
    return {
        "kernel": kernel,
        "splits": splits,
        "page": page,
        "batch": batch,
        "ctx": ctx,
        "ms": ms,
        "floor_ms": floor_ms,
        "ratio_to_floor": ms / floor_ms,
    }


def _layer():
    """DeepSeek-V2-Lite's attention layer (bf16): what the engine's up-projected path runs through
    (MLAttention._split_attention: latent write, context gather, kv_b_proj, ragged prefill)."""
    from bench.shapes import shape
    from kubellm.engine.model_config import ModelConfig
    from kubellm.engine.models.deepseek import MLAttention

    c = ModelConfig.from_hf_config(shape("deepseek-v2-lite"))
    assert (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank) == (
        HEADS, NOPE, ROPE, V, RANK,
    )  # fmt: skip
    return MLAttention(c, torch.bfloat16, torch.device("cuda"))


def prefill_row(
    seqs: int, length: int, cached: int, gen: torch.Generator, layer, kernel: str = "fa2"
) -> dict[str, Any]:
    """`seqs` chunks of `length` new tokens, each over `cached` tokens already in the pool; both paths on flashinfer's
    `kernel` family (the engine's KUBELLM_PREFILL_BACKEND: the MLA kernel and the up-projected ragged prefill)."""
    t = seqs * length
    x = dict(device="cuda", dtype=torch.bfloat16)
    w_kv = torch.randn(HEADS * (NOPE + V), RANK, generator=gen, **x) / RANK**0.5  # kv_b_proj
    layer.kv_b_proj.weight.data = w_kv
    w_uk = w_kv.view(HEADS, NOPE + V, RANK)[:, :NOPE]
    w_uv = w_kv.view(HEADS, NOPE + V, RANK)[:, NOPE:]
    q = torch.randn(t, HEADS, NOPE + ROPE, generator=gen, **x)
    q_nope, q_rope = q.split((NOPE, ROPE), dim=-1)
    latent = torch.randn(t, RANK, generator=gen, **x)
    k_rope = torch.randn(t, ROPE, generator=gen, **x)

    fb, blocks = _batch([cached + length] * seqs, length)
    pool = torch.randn(blocks, BLOCK, WIDTH, generator=gen, **x)  # the cached prefixes' latents
    meta = AttentionMetadata.from_batch(fb, BLOCK, "cuda")
    attn = _backend(kernel)
    attn.begin_step(meta)
    # every chunk of 2+ tokens up-projected, as the engine would with a context bound holding the whole step
    up_attn = _backend(kernel, upproject_min_tokens=1, max_context_tokens=seqs * (cached + length))
    up_attn.begin_step(meta)
    assert up_attn.mla_split is not None and up_attn.mla_split.absorbed_rows is None

    def absorbed() -> torch.Tensor:  # the model's absorbed path (MLAttention.forward without a split)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
        out = attn.forward_mla(0, q_lat, q_rope, latent, k_rope, pool)
        return torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def up_projected() -> torch.Tensor:  # the engine's up-projected path
        return layer._split_attention(0, q_nope, q_rope, latent, k_rope, pool, up_attn, up_attn.mla_split)

    a, u = absorbed(), up_projected()  # same math: a wrong wiring shows here, not as a speed-up
    rel = ((a.float() - u.float()).norm() / u.float().norm()).item()
    row = {
        "kernel": kernel, "seqs": seqs, "len": length, "cached": cached,
        "absorbed_ms": event_ms(absorbed, REPS), "up_ms": event_ms(up_projected, REPS),
    }  # fmt: skip
    row["faster"] = "absorbed" if row["absorbed_ms"] <= row["up_ms"] else "up-projected"
    row["up_over_absorbed"] = row["up_ms"] / row["absorbed_ms"]
    row["rel_l2_between_paths"] = rel
    return row


def decode_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each kernel's decode time over the first kernel's, at the same page and batch (both measured)."""
    base_kernel = rows[0]["kernel"] if rows else None
    base = {(r["page"], r["batch"], r["ctx"]): r["ms"] for r in rows if r["kernel"] == base_kernel}
    return [
        {
            "kernel": r["kernel"],
            "over": base_kernel,
            "page": r["page"],
            "batch": r["batch"],
            "ctx": r["ctx"],
            "ratio": r["ms"] / base[(r["page"], r["batch"], r["ctx"])],
        }
        for r in rows
        if r["kernel"] != base_kernel and (r["page"], r["batch"], r["ctx"]) in base
    ]


def _splits(row: dict[str, Any]) -> str:
    return f" ({row['splits']} splits)" if row.get("splits") else ""


def write_results(out_dir: Path, result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"mla-micro-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    c = result["ceilings"]
    lines = [
        f"# MLA attention micro-benchmark, {result['device']}",
        "",
        f"One layer of DeepSeek-V2-Lite's shape (16 heads, latent 512 + rope 64, page 16 unless said), bf16, "
        f"flashinfer {result['flashinfer']}. Copy bandwidth in this run {c['copy_gb_s']:.0f} GB/s (read + write).",
        "",
        "Decode (latent write + MLA kernel, CUDA graph):",
        "",
        "| kernel | page | batch | ctx | us | floor us (latents read once) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['kernel']}{_splits(r)} | {r.get('page', BLOCK)} | "
            f"{r['batch']} | {r['ctx']} | {r['ms'] * 1e3:.1f} | "
            f"{r['floor_ms'] * 1e3:.1f} | {r['ratio_to_floor']:.2f} |"
            for r in result["decode"]
        ),
        *(
            f"- decode {r['kernel']} page {r['page']} batch {r['batch']} failed: {r['error']}"
            for r in result.get("decode_errors", [])
        ),
        *(
            [
                "",
                "Decode, time over the first kernel's (below 1: faster):",
                "",
                "| kernel / first | page | batch | ctx | ratio |",
                "|---|---:|---:|---:|---:|",
                *(
                    f"| {r['kernel']} / {r['over']} | {r['page']} | {r['batch']} | {r['ctx']} | {r['ratio']:.2f} |"
                    for r in result["decode_ratios"]
                ),
            ]
            if result.get("decode_ratios")
            else []
        ),
        "",
        "Prefill chunks, causal, over a cached prefix or none, each path's projections included (up-projected: the "
        "engine's path, MLAttention._split_attention):",
        "",
        "| kernel | chunks x new tokens | cached | absorbed ms | up-projected ms | up / absorbed | faster | "
        "rel. L2 between |",
        "|---|---|---:|---:|---:|---:|---|---:|",
        *(
            f"| {r.get('kernel', 'fa2')} | {r['seqs']} x {r['len']} | {r['cached']} | {r['absorbed_ms']:.3f} | "
            f"{r['up_ms']:.3f} | {r['up_over_absorbed']:.2f} | {r['faster']} | {r['rel_l2_between_paths']:.1e} |"
            for r in result["prefill"]
        ),
    ]
    errors = result.get("prefill_errors", [])
    if errors:
        lines += [
            "",
            *(
                f"- {r.get('kernel', 'fa2')} {r['seqs']} x {r['len']} over {r['cached']} cached: not measured "
                f"({r['error']})"
                for r in errors
            ),
        ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md", flush=True)


def main() -> None:
    import flashinfer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--decode-batches", default="1,32,128,256")
    ap.add_argument(
        "--decode-kernels", default="fa2,fa3", help="flashinfer MLA families to time (--prefill-backend), or triton"
    )
    ap.add_argument("--decode-pages", default="16,64", help="page sizes (the engine's --block-size) of the decode rows")
    ap.add_argument(
        "--prefill-kernels", default="fa2", help="flashinfer families of the prefill rows (fa3: a first-use build)"
    )
    ap.add_argument("--prefill-lens", default="16,64,256,1024,4096", help="new tokens per chunk")
    ap.add_argument("--prefill-cached", default="0,4096", help="tokens cached before each chunk")
    ap.add_argument(
        "--prefill-tokens", type=int, default=16384, help="chunks per row: this many new tokens, 1 to 16 chunks"
    )
    ap.add_argument("--skip-prefill", action="store_true", help="the decode rows only")
    ap.add_argument("--deadline-s", type=float, default=300.0)
    args = ap.parse_args()
    deadline = time.monotonic() + args.deadline_s
    ceilings = measure_ceilings(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "flashinfer": flashinfer.__version__,
        "ceilings": ceilings, "decode": [], "decode_errors": [], "prefill": [], "prefill_errors": [],
    }  # fmt: skip
    for kernel in args.decode_kernels.split(","):
        for page in map(int, args.decode_pages.split(",")):
            for b in map(int, args.decode_batches.split(",")):
                if time.monotonic() < deadline:
                    try:
                        result["decode"].append(row := decode_row(b, 1024, kernel, ceilings, gen, page))
                    except Exception as e:
                        row = {"kernel": kernel, "page": page, "batch": b, "error": f"{type(e).__name__}: {e}"[:300]}
                        result["decode_errors"].append(row)
                        torch.cuda.empty_cache()
                    print(f"decode {row}", flush=True)
    result["decode_ratios"] = decode_ratios(result["decode"])
    for r in result["decode_ratios"]:
        print(f"decode {r['kernel']} / {r['over']}: page {r['page']} batch {r['batch']}: {r['ratio']:.3f}", flush=True)
    write_results(args.out_dir, result)  # the decode rows stand whatever the prefill rows meet
    if args.skip_prefill:
        return
    layer = _layer()
    rows = [
        (kernel, cached, n)
        for kernel in args.prefill_kernels.split(",")
        for cached in map(int, args.prefill_cached.split(","))
        for n in map(int, args.prefill_lens.split(","))
    ]
    for kernel, cached, n in rows:
        seqs = max(1, min(16, args.prefill_tokens // n))  # at most --prefill-tokens new tokens a step
        if time.monotonic() < deadline:
            try:  # (a kernel build or memory failure costs its row, said in the results, not the run)
                result["prefill"].append(row := prefill_row(seqs, n, cached, gen, layer, kernel))
            except Exception as e:
                row = {
                    "kernel": kernel, "seqs": seqs, "len": n, "cached": cached,
                    "error": f"{type(e).__name__}: {e}"[:300],
                }  # fmt: skip
                result["prefill_errors"].append(row)
                torch.cuda.empty_cache()
            print(f"prefill {row}", flush=True)
            write_results(args.out_dir, result)
    write_results(args.out_dir, result)


if __name__ == "__main__":
    main()
