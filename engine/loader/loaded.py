"""`LoadedModel`: everything the engine takes from a model path, whatever the file format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kubellm.engine.model_config import ModelConfig
from kubellm.prompt import TokenizerInfo

from .quantization import Fp8Scheme


class ModelRecipe(Protocol):
    """Rebuilds a model without files in another process (random weights): what a tensor-parallel worker loads
    when the model has no path. It must be picklable and describe the very weights of the LoadedModel it rides on."""

    def load(self, device: torch.device) -> LoadedModel: ...


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # Hugging Face names ("model.layers.0.self_attn.q_proj.weight", ...)
    tokenizer_info: TokenizerInfo
    generation_config: dict[str, Any] = field(default_factory=dict)  # generation_config.json; {} when absent
    name: str = ""  # the model as the user named it (path or builtin short name)
    path: str = ""  # the resolved file or directory
    recipe: ModelRecipe | None = None  # for models made in memory: how another process makes the same weights
    quantization: Fp8Scheme | None = None  # the checkpoint's FP8 format (weights are then an Fp8Weights view)
    kv_cache_fp8: bool = False  # the checkpoint declares an FP8 KV cache (its k_scale/v_scale are then used)
