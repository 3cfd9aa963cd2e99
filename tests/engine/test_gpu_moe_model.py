"""The MoE models on the GPU (GPU only; skipped without CUDA; a GPU machine without Triton or flashinfer fails):

- a small random Qwen3-MoE-shaped model (routed experts, a shared expert, a dense layer) gives, on the GPU path
  (bf16, flashinfer, fused MoE kernels, CUDA-graph decode), the logits of the CPU reference path (float32, torch),
  teacher-forced through a prefill and decode steps;
- CUDA-graph decode gives the same greedy tokens as eager decode through the whole engine (batches of 8);
- on Qwen3-30B-A3B's real expert shape (128 experts of 768, 8 active; 4 of its 48 layers), the fused kernels give
  the torch reference's logits on the same GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gpu_model_setup import (
    bf16_rounded_random_model,
    compare_routed_logits,
    run_to_completion,
    small_runner,
    teacher_forced_logits,
)

from kubellm.engine.config import EngineConfig

pytestmark = pytest.mark.gpu

PROMPTS, POSITIONS, PREFILL = 6, 48, 16


def small_config():
    from kubellm.engine.random_model import QWEN3_30B_A3B

    return dataclasses.replace(
        QWEN3_30B_A3B, vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=128, shared_expert_intermediate_size=192, shared_expert_gated=True, mlp_only_layers=[1],
        max_position_embeddings=512, bos_token_id=1, eos_token_ids=[2],
    )  # fmt: skip


@pytest.fixture(scope="module")
def loaded():
    import flashinfer  # noqa: F401 - the GPU path needs it: missing, this fails rather than skips
    import triton  # noqa: F401

    return bf16_rounded_random_model(small_config(), std=0.05, embed_std=0.5)


def _runner(loaded, device: str):
    return small_runner(loaded, device, PROMPTS, POSITIONS)


def _teacher_forced(runner, tokens: list[list[int]]) -> torch.Tensor:
    """Logits [steps * prompts, vocab]: one prefill of PREFILL tokens, then one decode per step."""
    logits = teacher_forced_logits(runner, tokens, PREFILL)
    return logits.reshape(-1, logits.shape[-1])


def test_gpu_moe_logits_match_the_cpu_reference(loaded):
    from kubellm.engine.models import moe

    assert moe.kernel_choice(torch.device("cuda")) == "fused_moe (triton)"
    tokens = torch.randint(3, 2048, (PROMPTS, POSITIONS), generator=torch.Generator().manual_seed(0)).tolist()
    gpu_runner = _runner(loaded, "cuda")
    assert gpu_runner._graphs, "CUDA graphs were not captured"
    gpu = _teacher_forced(gpu_runner, tokens)
    assert gpu_runner.graph_replays == POSITIONS - PREFILL, "decode steps did not replay the CUDA graphs"
    compare_routed_logits(gpu, _teacher_forced(_runner(loaded, "cpu"), tokens), "small MoE, GPU vs CPU")


def test_cuda_graph_decode_equals_eager_with_moe(loaded):
    from kubellm.engine.llm_engine import LLMEngine
    from kubellm.engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(1)
    # 8 prompts: every decode step is a batch of 8 in both modes (a captured size, no padding rows), so both run
    # the very same kernels on the very same shapes and must agree exactly
    prompts = [torch.randint(3, 2048, (n,), generator=gen).tolist() for n in (5, 17, 33, 64, 1, 9, 40, 2)]

    def greedy(enforce_eager: bool) -> list[list[int]]:
        cfg = EngineConfig(
            model="random-moe", device="cuda", max_num_seqs=8, max_num_batched_tokens=256, max_model_len=256,
            num_gpu_blocks_override=64, enforce_eager=enforce_eager, generation_config="vllm",
        )  # fmt: skip
        engine = LLMEngine(cfg, loaded=loaded)
        outs = run_to_completion(engine, prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
        assert (engine.runner.graph_replays > 0) is not enforce_eager
        return [c.token_ids for c in outs]

    assert greedy(False) == greedy(True)


def test_fused_kernels_equal_the_torch_reference_on_the_real_expert_shape(monkeypatch):
    from kubellm.engine.models import moe
    from kubellm.engine.random_model import QWEN3_30B_A3B, random_loaded_model

    assert moe.kernel_choice(torch.device("cuda")) == "fused_moe (triton)"
    config = dataclasses.replace(QWEN3_30B_A3B, num_hidden_layers=4)
    loaded = random_loaded_model(config, torch.bfloat16, "cuda", seed=0, std=0.02, embed_std=0.5)
    tokens = torch.randint(3, 151936, (PROMPTS, POSITIONS), generator=torch.Generator().manual_seed(2)).tolist()
    fused = _teacher_forced(_runner(loaded, "cuda"), tokens)
    monkeypatch.setenv("KUBELLM_MOE_KERNEL", "torch")
    ref_runner = _runner(loaded, "cuda")
    assert not ref_runner._graphs, "the torch reference reads counts back to the host: it must decode eagerly"
    reference = _teacher_forced(ref_runner, tokens)
    compare_routed_logits(fused, reference, "Qwen3-30B-A3B experts, fused vs torch reference (bf16, same GPU)")
