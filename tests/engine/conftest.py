"""Session fixtures for the model-path tests: the embedded SmolLM2 is loaded (and dequantized) once, by us
and by transformers, and tiny random checkpoints are saved once per kind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_loaded(embedded_model_path):
    from kubellm.engine.loader import load_model

    return load_model(str(embedded_model_path))


@pytest.fixture(scope="session")
def smollm2_runner(smollm2_loaded):
    from tiny_models import make_runner

    return make_runner(smollm2_loaded, num_blocks=160)


@pytest.fixture(scope="session")
def smollm2_hf_model(embedded_model_path):
    from transformers import AutoModelForCausalLM

    path = Path(embedded_model_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(embedded_model_path):
    from transformers import AutoTokenizer

    path = Path(embedded_model_path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """kind -> directory of a saved tiny random checkpoint (llama, llama3, qwen2, qwen3, mistral)."""
    from tiny_models import save_tiny_model

    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = save_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return made[kind]

    return get


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir) -> Callable[[str], Any]:
    """transformers' float32 model of a tiny checkpoint kind, loaded once per test module."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Any] = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = AutoModelForCausalLM.from_pretrained(tiny_model_dir(kind), dtype=torch.float32).eval()
        return made[kind]

    return get
