"""Physical bounds of a benchmark run, computed from ceilings measured in that same run (device-copy bandwidth and
bf16 matmul rate) and a model shape from bench/shapes.py: dense Llama-family, Qwen-style mixture of experts and
DeepSeek multi-head latent attention.

A step's roofline is the sum over its kernels of max(bytes / bandwidth, FLOPs / matmul rate), bf16 unless the run's
Precision says its layers' weights are FP8 (one byte each, multiplied at the FP8 rate measured in the run) or its KV
cache is FP8 (one byte an element); embeddings and the LM head stay bf16, as both engines keep them. Under
tensor parallelism N GPUs share the work: times divide by N and throughputs multiply (the all-reduces are not in it).
Stdlib only: the bookkeeping test imports it on a CPU machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.workloads import BATCH1_OUT, BATCH1_PROMPT, Workload

BYTES = 2  # bf16


@dataclass(frozen=True)
class Ceilings:
    copy_gb_s: float  # bytes read + written per second, as a device-to-device copy counts them
    matmul_tflop_s: float
    fp8_matmul_tflop_s: float | None = None  # measured in FP8 runs only

    @property
    def bandwidth(self) -> float:
        return self.copy_gb_s * 1e9

    @property
    def rate(self) -> float:
        return self.matmul_tflop_s * 1e12


@dataclass(frozen=True)
class Precision:
    """How a run stores what a step reads: its layers' GEMM weights and its KV cache, bytes per element."""

    weight_bytes: int = BYTES
    kv_bytes: int = BYTES

    @classmethod
    def of_run(cls, quantization: str | None, kv_cache_dtype: str | None) -> Precision:
        fp8_weights = bool(quantization) and quantization != "none"  # fp8 (online) and fp8-block: the FP8 formats
        return cls(1 if fp8_weights else BYTES, 1 if kv_cache_dtype == "fp8" else BYTES)

    def layer_rate(self, c: Ceilings) -> float:
        """The layers' GEMMs' matmul rate: FP8 weights multiply on FP8 tensor cores where the run measured them."""
        if self.weight_bytes == 1 and c.fp8_matmul_tflop_s:
            return c.fp8_matmul_tflop_s * 1e12
        return c.rate


BF16 = Precision()


@dataclass(frozen=True)
class Gemm:
    k: int
    n: int
    count: int = 1  # identical matrices read for this step (e.g. the experts one step touches)
    rows_per_matrix: float | None = None  # token rows each matrix multiplies; None: the whole batch


def _experts(cfg: dict[str, Any]) -> int:
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)


def experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts a batch reads when each token picks top_k of num_experts uniformly."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def _is_mla(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("kv_lora_rank"))


def _attention_gemms(cfg: dict[str, Any]) -> list[Gemm]:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if _is_mla(cfg):
        nope, rope, v, lora = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
        q = [Gemm(h, heads * (nope + rope))]
        if cfg.get("q_lora_rank"):
            q = [Gemm(h, cfg["q_lora_rank"]), Gemm(cfg["q_lora_rank"], heads * (nope + rope))]
        return [*q, Gemm(h, lora + rope), Gemm(lora, heads * (nope + v)), Gemm(heads * v, h)]
    hd = cfg.get("head_dim") or h // heads
    q, kv = heads * hd, cfg.get("num_key_value_heads", heads) * hd
    return [Gemm(h, q + 2 * kv), Gemm(q, h)]


def _mlp_gemms(cfg: dict[str, Any], layer: int, batch: int) -> list[Gemm]:
    h = cfg["hidden_size"]
    e = _experts(cfg)
    dense_first = cfg.get("first_k_dense_replace", 0)
    dense = e == 0 or layer < dense_first or layer in (cfg.get("mlp_only_layers") or [])
    if dense:
        i = cfg["intermediate_size"]
        return [Gemm(h, 2 * i), Gemm(i, h)]
    k, i = cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    touched = experts_touched(e, k, batch)
    rows = batch * k / touched
    out = [Gemm(h, e), Gemm(h, 2 * i, touched, rows), Gemm(i, h, touched, rows)]
    shared = cfg.get("n_shared_experts") or 0
    if shared:
        out += [Gemm(h, 2 * i * shared), Gemm(i * shared, h)]
    if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE's gated shared expert
        si = cfg["shared_expert_intermediate_size"]
        out += [Gemm(h, 2 * si), Gemm(si, h), Gemm(h, 1)]
    return out


def kv_bytes_per_token(cfg: dict[str, Any], element_bytes: int = BYTES) -> int:
    """Bytes of KV cache one token occupies over all layers."""
    layers = cfg["num_hidden_layers"]
    if _is_mla(cfg):
        return layers * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * element_bytes
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return layers * 2 * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd * element_bytes


def _attention_flops_per_token(cfg: dict[str, Any], ctx: int) -> float:
    """FLOPs of one query token attending over ctx tokens in one layer (scores + weighted sum)."""
    heads = cfg["num_attention_heads"]
    if _is_mla(cfg):  # absorbed: scores over the latent + rope part, the weighted sum over the latent
        lora, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
        return 2 * heads * ctx * (2 * lora + rope)
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 4 * heads * hd * ctx


def decode_step_ms(
    cfg: dict[str, Any], batch: int, ctx: int, c: Ceilings, tp: int = 1, p: Precision = BF16
) -> dict[str, float]:
    """Roofline of one decode step of `batch` sequences at `ctx` tokens each: GEMMs, attention and total, in ms."""
    gemm_s, rate = 0.0, p.layer_rate(c)
    for layer in range(cfg["num_hidden_layers"]):
        for g in [*_attention_gemms(cfg), *_mlp_gemms(cfg, layer, batch)]:
            rows = batch if g.rows_per_matrix is None else g.rows_per_matrix
            bytes_ = g.count * (g.k * g.n * p.weight_bytes + rows * (g.k + g.n) * BYTES)
            gemm_s += max(bytes_ / c.bandwidth, 2 * g.count * rows * g.k * g.n / rate)
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    gemm_s += max((vocab * h + batch * h) * BYTES / c.bandwidth, 2 * batch * h * vocab / c.rate)
    kv = batch * ctx * kv_bytes_per_token(cfg, p.kv_bytes)
    flops = batch * cfg["num_hidden_layers"] * _attention_flops_per_token(cfg, ctx)
    attn_s = max(kv / c.bandwidth, flops / c.rate)
    return {"gemm_ms": gemm_s * 1e3 / tp, "attention_ms": attn_s * 1e3 / tp, "total_ms": (gemm_s + attn_s) * 1e3 / tp}


def _layer_gemm_flops(cfg: dict[str, Any]) -> float:
    """Matmul FLOPs of one token through every layer's weight GEMMs (active experts only)."""
    total = 0.0
    for layer in range(cfg["num_hidden_layers"]):
        for g in _attention_gemms(cfg):
            total += 2 * g.k * g.n
        for g in _mlp_gemms(cfg, layer, 1):  # at one token, `count` experts each multiply that one row
            total += 2 * g.count * g.k * g.n
    return total


def flops_per_token(cfg: dict[str, Any], ctx: int) -> float:
    """Matmul FLOPs one token costs in a forward pass at ctx tokens of context (active experts only)."""
    attention = cfg["num_hidden_layers"] * _attention_flops_per_token(cfg, ctx)
    return _layer_gemm_flops(cfg) + attention + 2 * cfg["hidden_size"] * cfg["vocab_size"]


def compute_seconds_per_token(cfg: dict[str, Any], ctx: int, c: Ceilings, p: Precision = BF16) -> float:
    """flops_per_token's FLOPs at their rates: the layers' GEMMs at the precision's rate, the rest at bf16's."""
    layers = _layer_gemm_flops(cfg)
    return layers / p.layer_rate(c) + (flops_per_token(cfg, ctx) - layers) / c.rate


def workload_bounds(
    cfg: dict[str, Any],
    c: Ceilings,
    a: Workload,
    b: Workload,
    tp: int = 1,
    kv_tokens: int | None = None,
    p: Precision = BF16,
) -> dict[str, float]:
    """Upper bounds on the headline figures of workloads (a), (b) and batch-1 decode.

    (a) total tok/s: every token needs its matmul FLOPs (prompt tokens at half their context on average).
    (b) output tok/s: all of (b)'s requests decoding at once (fewer if the KV pool cannot hold them) at their mean
        context, each step at its roofline; prefill time not counted.
    batch-1: one decode step at 1024 + 128 tokens of context.
    """
    a_tokens = a.prompt_len + a.max_tokens
    a_seconds = (
        a.prompt_len * compute_seconds_per_token(cfg, a.prompt_len // 2, c, p)
        + a.max_tokens * compute_seconds_per_token(cfg, a.prompt_len + a.max_tokens // 2, c, p)
    ) / a_tokens
    b_ctx = b.prompt_len + b.max_tokens // 2
    b_batch = b.requests if kv_tokens is None else max(1, min(b.requests, kv_tokens // (b.prompt_len + b.max_tokens)))
    b_step = decode_step_ms(cfg, b_batch, b_ctx, c, tp, p)["total_ms"]
    return {
        "a_total_tok_s": tp / a_seconds,
        "b_output_tok_s": b_batch / (b_step / 1e3),
        "b_batch": b_batch,
        "batch1_ms": decode_step_ms(cfg, 1, BATCH1_PROMPT + BATCH1_OUT // 2, c, tp, p)["total_ms"],
    }
