"""The side-by-side benchmark's bookkeeping, on a CPU machine without vLLM: both engines get the same shape,
workloads and settings; a peer that did not run (or ran elsewhere, or with other settings) prints "not measured"
and no ratio; bounds come from the run's own ceilings."""

from __future__ import annotations

import json

import pytest

from bench import bounds, report
from bench.offline import attach_peer
from bench.peer_vllm import parse_args, peer_command
from bench.shapes import SHAPES, write_config_dir
from bench.workloads import WORKLOADS, EngineSettings, Sampling
from kubellm.engine.model_config import ModelConfig
from kubellm.engine.random_model import LLAMA_3_1_8B

H100_LIKE = bounds.Ceilings(copy_gb_s=3000.0, matmul_tflop_s=790.0)


def test_the_llama_shape_is_the_one_our_engine_benchmarked_before():
    assert ModelConfig.from_hf_config(SHAPES["llama-3.1-8b"]) == LLAMA_3_1_8B


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_shape_is_a_config_transformers_reads(tmp_path, name):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(write_config_dir(name, tmp_path))
    assert cfg.architectures == SHAPES[name]["architectures"]
    assert cfg.hidden_size == SHAPES[name]["hidden_size"]
    assert cfg.num_hidden_layers == SHAPES[name]["num_hidden_layers"]


@pytest.mark.parametrize(
    ("name", "published_active_params"),
    [("llama-3.1-8b", 8.03e9), ("qwen3-30b-a3b", 3.3e9)],  # the model cards' figures, embeddings included
)
def test_matmul_flops_per_token_match_the_published_active_parameter_counts(name, published_active_params):
    cfg = SHAPES[name]
    params = bounds.flops_per_token(cfg, ctx=0) / 2 + cfg["vocab_size"] * cfg["hidden_size"]  # + the embedding
    assert params == pytest.approx(published_active_params, rel=0.02)


def test_batch1_bound_is_the_weight_and_kv_read_at_the_measured_bandwidth():
    cfg = SHAPES["llama-3.1-8b"]
    a, b = WORKLOADS["a"], WORKLOADS["b"]
    # 8.03e9 params less the embedding table (one row read), bf16, plus 1152 tokens of KV (32 layers x 2 x 8 x 128).
    expected_ms = ((8.03e9 - 128256 * 4096) * 2 + 1152 * 32 * 2 * 8 * 128 * 2) / 3000e9 * 1e3
    one = bounds.workload_bounds(cfg, H100_LIKE, a, b)
    assert one["batch1_ms"] == pytest.approx(expected_ms, rel=0.02)
    faster = bounds.workload_bounds(cfg, bounds.Ceilings(6000.0, 790.0), a, b)
    assert faster["batch1_ms"] == pytest.approx(one["batch1_ms"] / 2, rel=0.01)
    assert faster["a_total_tok_s"] == pytest.approx(one["a_total_tok_s"])  # (a) is compute-bound
    two_gpus = bounds.workload_bounds(cfg, H100_LIKE, a, b, tp=2)
    assert two_gpus["batch1_ms"] == pytest.approx(one["batch1_ms"] / 2)
    assert two_gpus["a_total_tok_s"] == pytest.approx(2 * one["a_total_tok_s"])


def test_fp8_runs_bound_batch1_by_one_byte_weights_and_a_by_the_fp8_rate():
    cfg, a, b = SHAPES["llama-3.1-8b"], WORKLOADS["a"], WORKLOADS["b"]
    fp8 = bounds.Precision.of_run("fp8", "auto")
    assert fp8 == bounds.Precision.of_run("fp8-block", None) == bounds.Precision(weight_bytes=1, kv_bytes=2)
    assert bounds.Precision.of_run(None, "auto") == bounds.BF16
    assert bounds.Precision.of_run(None, "fp8") == bounds.Precision(weight_bytes=2, kv_bytes=1)
    # the layers' weights (8.03e9 params less the embedding and the LM head) at one byte, the LM head at two,
    # plus 1152 tokens of bf16 KV
    layers = 8.03e9 - 2 * 128256 * 4096
    expected_ms = (layers + 128256 * 4096 * 2 + 1152 * 32 * 2 * 8 * 128 * 2) / 3000e9 * 1e3
    with_fp8_rate = bounds.Ceilings(3000.0, 790.0, fp8_matmul_tflop_s=1580.0)
    one = bounds.workload_bounds(cfg, with_fp8_rate, a, b, p=fp8)
    assert one["batch1_ms"] == pytest.approx(expected_ms, rel=0.02)
    bf16 = bounds.workload_bounds(cfg, with_fp8_rate, a, b)
    assert bf16["batch1_ms"] > 1.8 * one["batch1_ms"]
    # (a): the layers' GEMMs at twice the rate, attention and the LM head at bf16's: faster, but less than 2x
    assert 1.6 * bf16["a_total_tok_s"] < one["a_total_tok_s"] < 2 * bf16["a_total_tok_s"]
    unmeasured = bounds.workload_bounds(cfg, H100_LIKE, a, b, p=fp8)  # no FP8 rate measured: bf16's
    assert unmeasured["a_total_tok_s"] == pytest.approx(bf16["a_total_tok_s"])
    assert bounds.kv_bytes_per_token(cfg, 1) * 2 == bounds.kv_bytes_per_token(cfg) == 32 * 2 * 8 * 128 * 2


def test_a_small_kv_pool_lowers_the_decode_bound_of_b():
    cfg, a, b = SHAPES["llama-3.1-8b"], WORKLOADS["a"], WORKLOADS["b"]
    roomy = bounds.workload_bounds(cfg, H100_LIKE, a, b, kv_tokens=10**7)
    tight = bounds.workload_bounds(cfg, H100_LIKE, a, b, kv_tokens=120 * 1200)
    assert roomy["b_batch"] == 500 and tight["b_batch"] == 120
    assert tight["b_output_tok_s"] < roomy["b_output_tok_s"]


def test_moe_decode_reads_only_the_experts_a_batch_touches():
    cfg = SHAPES["qwen3-30b-a3b"]
    assert bounds.experts_touched(128, 8, 1) == pytest.approx(8)
    assert bounds.experts_touched(128, 8, 256) == pytest.approx(128, rel=1e-3)
    one = bounds.decode_step_ms(cfg, 1, 1024, H100_LIKE)["gemm_ms"]
    many = bounds.decode_step_ms(cfg, 256, 1024, H100_LIKE)["gemm_ms"]
    assert 5 < many / one < 16  # 8 experts' weights at batch 1, all 128 at batch 256 (attention weights shared)


def test_the_peer_is_started_with_our_shape_scale_and_settings(tmp_path):
    ours = EngineSettings(max_num_seqs=256, gpu_memory_utilization=0.95, quantization="fp8", kv_cache_dtype="fp8")
    cmd = peer_command("python3", "qwen3-30b-a3b", 0.5, ours, "1,a,b", tmp_path / "peer.json")
    assert cmd[:3] == ["python3", "-m", "bench.peer_vllm"]
    args = parse_args(cmd[3:])
    assert (args.shape, args.scale, args.workloads) == ("qwen3-30b-a3b", 0.5, "1,a,b")
    assert EngineSettings(**json.loads(args.settings_json)) == ours


def test_scaled_workloads_keep_their_shape_and_prompts_are_the_same_in_every_process():
    c = WORKLOADS["c"].scaled(0.5)
    assert c.requests == 500 and c.requests % c.suffixes_per_prefix == 0
    prompts = c.prompts(128256)
    assert prompts == c.prompts(128256)
    assert all(len(p) == 1600 for p in prompts)
    assert len({tuple(p[:1500]) for p in prompts}) == 50  # 50 shared prefixes, 10 suffixes each
    assert WORKLOADS["a"].scaled(0.5).requests == 500 and WORKLOADS["b"].scaled(0.1).requests == 50


def _our_run(**over):
    r = {
        "shape": "llama-3.1-8b",
        "scale": 0.5,
        "settings": EngineSettings().as_dict(),
        "sampling": {"temperature": 1.0, "top_p": 1.0, "ignore_eos": True},
        "gpu_identity": {"gpus": [{"uuid": "GPU-aaaa"}]},
        "workloads": {"a": {"total_tok_s": 30000.0, "preemptions": 0}, "b": {"output_tok_s": 14000.0}},
        "batch1": {"ms_per_token": 6.0},
        "startup": {"engine_init_s": 20.0, "kv_tokens": 400000, "kv_bytes_per_token": 31104},
        "bounds": {"a_total_tok_s": 60000.0, "b_output_tok_s": 28000.0, "batch1_ms": 5.0},
    }
    return {**r, **over}


def _peer_run(**over):
    r = _our_run()
    peer = {k: r[k] for k in ("shape", "scale", "settings", "sampling", "gpu_identity")}
    peer.update(
        version="0.26.0",
        workloads={"a": {"total_tok_s": 15000.0, "preemptions": 3}, "b": {"output_tok_s": 14000.0}},
        batch1={"ms_per_token": 12.0},
        startup_s=150.0,
        kv_tokens=420000,
        kv_bytes_per_token=62208.0,
    )
    return {**peer, **over}


def _row(table: str, name: str) -> list[str]:
    line = next(x for x in table.splitlines() if x.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_ratios_are_speed_ratios_against_the_peer_of_this_run():
    r = _our_run()
    attach_peer(r, _peer_run())
    table = report.comparison_table(r)
    assert _row(table, "(a) total tok/s")[1:7] == ["30,000", "15,000", "2.00x", "60,000", "0.50x", "0.25x"]
    assert _row(table, "batch-1 decode ms/token")[1:7] == ["6.00", "12.00", "2.00x", "5.00", "0.83x", "0.42x"]
    assert _row(table, "(a) preemptions")[1:3] == ["0", "3"]
    assert _row(table, "KV capacity, tokens")[1:3] == ["400,000", "420,000"]
    assert _row(table, "KV bytes per token")[1:4] == ["31,104", "62,208", "-"]  # sizes, not speeds: no ratio


def test_a_peer_that_did_not_run_prints_not_measured_and_no_ratio():
    r = _our_run()
    attach_peer(r, {"error": "not run (--peer none)"})
    table = report.comparison_table(r)
    row = _row(table, "(a) total tok/s")
    assert row[2] == report.NOT_MEASURED and row[3] == "-" and row[6] == "-"
    assert "not run (--peer none)" in table
    assert "15,000" not in table


@pytest.mark.parametrize(
    ("peer_over", "reason"),
    [
        ({"gpu_identity": {"gpus": [{"uuid": "GPU-bbbb"}]}}, "other GPUs"),
        ({"settings": {**EngineSettings().as_dict(), "max_num_seqs": 256}}, "settings"),
        ({"sampling": {"temperature": 0.0, "top_p": 1.0, "ignore_eos": True}}, "sampling"),
        ({"scale": 1.0}, "scale"),
    ],
)
def test_a_peer_from_another_machine_or_with_other_settings_is_not_compared(peer_over, reason):
    r = _our_run()
    attach_peer(r, _peer_run(**peer_over))
    assert reason in r["peer"]["error"]
    assert _row(report.comparison_table(r), "(a) total tok/s")[2] == report.NOT_MEASURED


def test_the_sampling_both_engines_get_is_sampled_not_greedy():
    # The earlier comparison ran ours at temperature 1 against vLLM's greedy; one definition now serves both.
    assert Sampling().temperature == 1.0 and Sampling().ignore_eos
