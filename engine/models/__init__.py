"""Model registry: HF architecture name -> implementation (the Llama-family forward, MoE members included, or
Gemma 3's)."""

from __future__ import annotations

import torch
from torch import nn

from kubellm.engine.model_config import ModelConfig, unsupported_architecture

from .deepseek import DeepseekForCausalLM
from .gemma3 import Gemma3ForCausalLM
from .llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekForCausalLM,
}


def build_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device | str, tp_rank: int = 0, tp_size: int = 1
) -> nn.Module:
    cls = MODEL_REGISTRY.get(config.architecture)
    if cls is None:
        raise unsupported_architecture(config.architecture)
    if tp_size > 1:
        return cls(config, dtype=dtype, device=device, tp_rank=tp_rank, tp_size=tp_size)
    return cls(config, dtype=dtype, device=device)


__all__ = ["MODEL_REGISTRY", "Gemma3ForCausalLM", "LlamaForCausalLM", "build_model"]
