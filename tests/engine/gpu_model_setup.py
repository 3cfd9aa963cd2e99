"""What the whole-model GPU tests (dense and MoE) share: the same bf16-rounded random weights on both paths, a
small model runner with a block table per prompt, teacher-forced logits through one prefill and decode steps, and
an engine run to completion. Imports nothing of CUDA itself, so it loads on any machine."""

from __future__ import annotations

import torch

from kubellm.engine.config import EngineConfig
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq
from kubellm.engine.outputs import CompletionOutput, OutputAssembler

BLOCK = 16  # the engine's default block size, which these runners use


def bf16_rounded_random_model(config, std: float, embed_std: float, seed: int = 0):
    """A seeded random model materialised once on the CPU and rounded to bf16, so the GPU path and the float32
    CPU reference load the very same numbers: what differs between them is the GPU path's bf16 arithmetic."""
    from kubellm.engine.random_model import RandomWeights, random_loaded_model

    model = random_loaded_model(config, torch.float32, "cpu", seed=seed, std=std, embed_std=embed_std)
    weights = RandomWeights(config, torch.float32, "cpu", seed=seed, std=std, embed_std=embed_std)
    model.weights = {k: v.to(torch.bfloat16).float() for k, v in weights.items()}
    return model


def block_tables(prompts: int, positions: int, first_block: int = 0) -> list[list[int]]:
    """Disjoint block tables from `first_block` on, one per prompt, each holding `positions` tokens."""
    per = -(-positions // BLOCK)
    return [list(range(first_block + i * per, first_block + (i + 1) * per)) for i in range(prompts)]


def small_runner(loaded, device: str, prompts: int, positions: int, **kw):
    """A model runner (batches of up to 8 sequences) with KV blocks for `prompts` x `positions` tokens and spare."""
    from kubellm.engine.model_runner import ModelRunner

    cfg = EngineConfig(device=device, max_num_seqs=8, max_num_batched_tokens=512, max_model_len=256, **kw)
    runner = ModelRunner(loaded, cfg)
    runner.allocate_kv_cache(prompts * -(-positions // BLOCK) + 8)
    return runner


def teacher_forced_logits(runner, tokens: list[list[int]], prefill: int, first_block: int = 0) -> torch.Tensor:
    """Logits [steps, prompts, vocab] (float32, CPU): one prefill of `prefill` tokens per prompt, then one decode
    step per remaining position, fed the given tokens rather than sampled ones (KV in blocks from `first_block`)."""
    positions = len(tokens[0])
    tables = block_tables(len(tokens), positions, first_block)
    batch = ForwardBatch([ScheduledSeq(f"p{i}", t[:prefill], 0, tables[i], True) for i, t in enumerate(tokens)])
    out = [runner.logits(batch).float().cpu()]
    for pos in range(prefill, positions):
        batch = ForwardBatch([ScheduledSeq(f"p{i}", [t[pos]], pos, tables[i], True) for i, t in enumerate(tokens)])
        out.append(runner.logits(batch).float().cpu())
    return torch.stack(out)


def run_to_completion(engine, prompts: list[list[int]], params) -> list[CompletionOutput]:
    """Submit every prompt at once (ids r0, r1, ...) and step the engine until all finish, none with an error;
    outputs in prompt order."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done: dict[str, CompletionOutput] = {}
    whole = OutputAssembler()
    while engine.has_unfinished_requests():
        for out in map(whole.add, engine.step()):
            if out.finished:
                assert out.error is None, out.error
                done[out.request_id] = out.outputs[0]
    return [done[f"r{i}"] for i in range(len(prompts))]


def compare_routed_logits(gpu: torch.Tensor, ref: torch.Tensor, label: str) -> None:
    """Row-wise relative L2 error and argmax agreement, judged robustly for MoE models: bf16 rounding flips the
    routing of a token whose k-th and (k+1)-th experts nearly tie (a few percent of token-layers), which moves that
    row by much more than rounding does. A wrong kernel (expert, weight, reduction, slot, page, scale, absorption)
    moves every row."""
    rel = (gpu - ref).norm(dim=-1) / ref.norm(dim=-1)
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 0.1  # argmax only where the reference is decided
    agree = (gpu.argmax(-1) == ref.argmax(-1))[decided].float().mean().item()
    median, mean, worst = rel.median().item(), rel.mean().item(), rel.max().item()
    print(f"{label}: {gpu.shape[0]} rows, relative L2 median {median:.4f} mean {mean:.4f} max {worst:.4f}, "
          f"argmax agreement {agree:.4f} on {int(decided.sum())} decided rows")  # fmt: skip
    assert median < 0.03 and mean < 0.06, f"{label}: relative error median {median:.4f}, mean {mean:.4f}"
    assert agree > 0.9, f"{label}: argmax agreement {agree:.4f}"
