"""The one TP2-versus-TP1 check the model tests share: the same prompts decoded greedily by an engine at tensor
parallelism 1 and 2 give the same tokens (near-ties excepted, by the greedy rule), and the caller gets what it
needs to check how the weights were split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from greedy_reference import assert_greedy_equal, engine_greedy
from tiny_models import full_pass_logits

from kubellm.engine.config import EngineConfig
from kubellm.engine.llm_engine import LLMEngine


@dataclass
class TpParity:
    """The per-model parameter counts of the whole model (TP 1) and of each TP-2 rank, for split checks."""

    full_counts: dict[str, int]
    rank_counts: list[dict[str, int]]


def cpu_tp_config(model: str, tp: int, **extra) -> EngineConfig:
    """The small CPU engine every parity test runs: 32 KV blocks, 16-token chunks."""
    return EngineConfig(
        model=model, device="cpu", tensor_parallel_size=tp, num_gpu_blocks_override=32, max_num_batched_tokens=16,
        **extra,
    )  # fmt: skip


def assert_tp2_decodes_as_tp1(
    make_engine: Callable[[int], LLMEngine], prompts: list[list[int]], max_new: int, label: str
) -> TpParity:
    """Decode `prompts` at TP 1 and at TP 2 (its worker processes closed however it ends); fail on a divergence
    that is not a near-tie of TP 1's own logits."""
    tp1 = make_engine(1)
    try:
        ref = engine_greedy(tp1, prompts, max_new)
        tp2 = make_engine(2)
        try:
            ours = engine_greedy(tp2, prompts, max_new)
            rank_counts = tp2.runner.param_counts()
        finally:
            tp2.close()
        for i, (p, r, o) in enumerate(zip(prompts, ref, ours, strict=True)):
            logits = full_pass_logits(tp1.runner, p + r)[len(p) - 1 : len(p) - 1 + len(r)]
            assert_greedy_equal(o, r, list(logits), f"{label} TP2 vs TP1 prompt {i}")
        return TpParity(full_counts=tp1.runner.model.param_counts(), rank_counts=rank_counts)
    finally:
        tp1.close()
