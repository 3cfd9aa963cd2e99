"""The benchmark's model shapes (config.json contents both engines read) are the engine's named random-model
configs: one shape, whichever way the harness or a test asks for it."""

from __future__ import annotations

from bench.shapes import LLAMA_3_1_8B, QWEN3_30B_A3B
from kubellm.engine import random_model
from kubellm.engine.model_config import ModelConfig


def test_qwen3_30b_a3b_shape_is_the_engines_constant():
    assert ModelConfig.from_hf_config(QWEN3_30B_A3B) == random_model.QWEN3_30B_A3B


def test_llama_shape_is_the_engines_constant():
    assert ModelConfig.from_hf_config(LLAMA_3_1_8B) == random_model.LLAMA_3_1_8B
