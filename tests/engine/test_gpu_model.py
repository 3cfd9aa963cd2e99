"""The GPU path end to end on a seeded random SmolLM2-shaped model (GPU only; skipped without CUDA).

- logits of the GPU path (bf16, flashinfer, CUDA-graph decode) match the CPU reference path (float32, torch
  backend) teacher-forced over 64 positions of 8 prompts: every position of one 64-token prefill, and a
  16-token prefill followed by 48 decode steps;
- CUDA-graph decode gives the same greedy tokens as eager decode through the whole engine (6 prompts, so
  the captured batch of 8 carries 2 padding rows that must not disturb real KV);
- the KV budget comes from a profiled forward.
"""

from __future__ import annotations

import pytest
import torch
from gpu_model_setup import (
    bf16_rounded_random_model,
    block_tables,
    run_to_completion,
    small_runner,
    teacher_forced_logits,
)

from kubellm.engine.attention import AttentionMetadata
from kubellm.engine.config import EngineConfig
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq

pytestmark = pytest.mark.gpu

PROMPTS, POSITIONS, PREFILL = 8, 64, 16


@pytest.fixture(scope="module")
def loaded():
    import flashinfer  # noqa: F401  (a GPU machine without flashinfer fails here, never skips)

    from kubellm.engine.random_model import SMOLLM2_135M

    return bf16_rounded_random_model(SMOLLM2_135M, std=0.02, embed_std=0.2)


def _runner(loaded, device: str):
    return small_runner(loaded, device, PROMPTS, POSITIONS)


@torch.inference_mode()
def _all_positions(runner, tokens: list[list[int]]) -> torch.Tensor:
    """Logits [prompts * positions, vocab] of one prefill of every prompt, at every position."""
    tables = block_tables(len(tokens), POSITIONS)
    batch = ForwardBatch([ScheduledSeq(f"f{i}", t, 0, tables[i], True) for i, t in enumerate(tokens)])
    meta = AttentionMetadata.from_batch(batch, runner.block_size, runner.device)
    ids = torch.tensor([x for t in tokens for x in t], device=runner.device)
    runner.attn.begin_step(meta)
    hidden = runner.model(ids, meta.positions, runner.kv_caches, runner.attn)
    return runner.model.compute_logits(hidden).float().cpu()


def _teacher_forced(runner, tokens: list[list[int]]) -> torch.Tensor:
    return teacher_forced_logits(runner, tokens, PREFILL)


def test_gpu_logits_match_cpu_reference_teacher_forced(loaded):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, loaded.config.vocab_size, (PROMPTS, POSITIONS), generator=gen).tolist()
    gpu_runner = _runner(loaded, "cuda")
    assert gpu_runner.attn.name == "flashinfer" and gpu_runner.dtype == torch.bfloat16
    assert gpu_runner._graphs, "CUDA graphs were not captured"
    cpu_runner = _runner(loaded, "cpu")
    for label, fn in (("prefill, all positions", _all_positions), ("prefill + decode", _teacher_forced)):
        gpu, cpu = fn(gpu_runner, tokens), fn(cpu_runner, tokens)
        gpu, cpu = gpu.reshape(-1, gpu.shape[-1]), cpu.reshape(-1, cpu.shape[-1])
        rel = ((gpu - cpu).norm(dim=-1) / cpu.norm(dim=-1)).max().item()
        # Argmax only where the reference is decided: random weights give many near-ties.
        top2 = cpu.topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > 0.1
        agree = (gpu.argmax(-1) == cpu.argmax(-1))[decided].float().mean().item()
        print(
            f"{label}: {gpu.shape[0]} rows, max relative L2 error {rel:.4f}, "
            f"argmax agreement {agree:.4f} on the {int(decided.sum())} rows with a top-2 gap > 0.1"
        )
        assert rel < 0.05, f"{label}: GPU logits differ from the CPU reference: relative error {rel:.4f}"
        assert agree > 0.95, label
    assert gpu_runner.graph_replays == POSITIONS - PREFILL, "decode steps did not replay the CUDA graphs"


def _greedy(loaded, enforce_eager: bool, prompts: list[list[int]], async_scheduling=None, params=None, full=False):
    from kubellm.engine.llm_engine import LLMEngine
    from kubellm.engine.sampling_params import SamplingParams

    cfg = EngineConfig(
        model="random-smollm2",
        device="cuda",
        max_num_seqs=8,
        max_num_batched_tokens=256,
        max_model_len=512,
        num_gpu_blocks_override=128,
        enforce_eager=enforce_eager,
        generation_config="vllm",
        async_scheduling=async_scheduling,
    )
    engine = LLMEngine(cfg, loaded=loaded)
    assert bool(engine.runner._graphs) is not enforce_eager
    assert engine.async_scheduling is (async_scheduling is not False), "on by default on CUDA"
    params = params or SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outs = run_to_completion(engine, prompts, params)
    if not enforce_eager:
        assert engine.runner.graph_replays > 0
    return [c.token_ids if not full else (c.token_ids, c.finish_reason, c.logprobs) for c in outs]


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in (5, 17, 33, 64, 1, 90)]


def test_cuda_graph_decode_equals_eager_token_for_token(loaded):
    prompts = _prompts()
    graph = _greedy(loaded, False, prompts)
    eager = _greedy(loaded, True, prompts)
    assert graph == eager


def test_async_scheduling_equals_synchronous_steps_on_the_gpu(loaded):
    """Placeholder tokens filled on the device from the previous step's draws give the synchronous engine's
    tokens (greedy, and seeded sampling with logprobs: same batches, so bit-identical); requests stopping
    early on stop tokens end right at the stop token, their extra in-flight step dropped."""
    from kubellm.engine.sampling_params import SamplingParams

    prompts = _prompts()
    assert _greedy(loaded, False, prompts, async_scheduling=True) == _greedy(loaded, False, prompts, False)
    sampled = SamplingParams(max_tokens=40, temperature=0.8, seed=7, logprobs=2, ignore_eos=True)
    assert _greedy(loaded, False, prompts, True, sampled, full=True) == _greedy(
        loaded, False, prompts, False, sampled, full=True
    )
    stops = set(range(3, 1000))
    stopping = SamplingParams(max_tokens=40, temperature=0.8, seed=7, stop_token_ids=sorted(stops))
    outs = _greedy(loaded, False, prompts, True, stopping, full=True)
    assert any(reason == "stop" for _, reason, _ in outs), "some request met a stop token"
    for tokens, reason, _ in outs:
        assert all(t >= 0 for t in tokens)
        if reason == "stop":
            assert tokens[-1] in stops and not stops & set(tokens[:-1])
        else:
            assert reason == "length" and len(tokens) == 40 and not stops & set(tokens)


def test_kv_budget_comes_from_a_profiled_forward(loaded):
    from kubellm.engine.model_runner import ModelRunner

    runner = ModelRunner(loaded, EngineConfig(device="cuda", max_num_batched_tokens=4096, gpu_memory_utilization=0.5))
    budget = runner.available_kv_cache_bytes()
    prof = runner.memory_profile
    print("memory profile:", {k: round(v, 3) for k, v in prof.items()})
    assert budget and budget > 0
    assert prof["peak_forward_gib"] > prof["weights_gib"] > 0


def test_fused_kernels_match_torch_ops():
    """The Triton RMSNorm / rotary / SiLU-mul kernels against the torch ops they replace, bf16 on CUDA."""
    import torch.nn.functional as F

    from kubellm.engine.loader import load_model  # noqa: F401 - import order: loader before models
    from kubellm.engine.models import fused
    from kubellm.engine.models.llama import rotate

    assert fused.enabled(torch.empty(1, device="cuda")), "Triton kernels unavailable on CUDA"
    gen = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dt)

    x, w = randn(33, 4096), randn(4096)
    ref = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt)
    assert (fused.rms_norm(x, w, 1e-5).float() - ref.float()).abs().max() <= ref.abs().max() * 2**-7
    res = randn(33, 4096)
    h_ref = res + x
    normed_ref = w * (h_ref.float() * torch.rsqrt(h_ref.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt)
    h, normed = fused.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(h, h_ref), "the residual stream is rounded exactly as torch's add rounds it"
    assert (normed.float() - normed_ref.float()).abs().max() <= normed_ref.abs().max() * 2**-7
    t, hq, hkv, d = 33, 32, 8, 128
    qkv = randn(t, (hq + 2 * hkv) * d)
    q, k, _ = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hkv, d)
    freqs = torch.arange(1000, 1000 + t, device="cuda").float()[:, None] * (
        500000.0 ** (-torch.arange(0, d, 2, device="cuda") / d)
    )
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    qo, ko = fused.rope(q, k, cos, sin)
    for got, want in ((qo, rotate(q, cos, sin)), (ko, rotate(k, cos, sin))):
        assert (got.float() - want.float()).abs().max() <= 2 * 2**-7 * want.abs().max()
    gu = randn(33, 2 * 14336)
    gate, up = gu.split(14336, dim=-1)
    want = F.silu(gate) * up
    assert (fused.silu_mul(gu).float() - want.float()).abs().max() <= 2**-7 * want.abs().max()
    assert fused._state["ok"] and not fused.failed_ops()
