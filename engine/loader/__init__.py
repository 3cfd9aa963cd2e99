"""`load_model(path) -> LoadedModel`: a HF safetensors directory, a GGUF file, or a builtin model name."""

from __future__ import annotations

from pathlib import Path

import torch

from kubellm.builtin_models import BUILTIN_MODELS, BuiltinModelError, resolve_model
from kubellm.engine.model_config import ModelConfig, UnsupportedModelError
from kubellm.prompt import TokenizerInfo

from .errors import ModelLoadError
from .gguf_file import is_gguf_file, load_gguf
from .hf_dir import load_hf_dir, read_tokenizer_info
from .loaded import LoadedModel

__all__ = ["LoadedModel", "ModelLoadError", "UnsupportedModelError", "load_model", "load_tokenizer"]

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    path: str | Path, dtype: torch.dtype | str | None = torch.float32, load_weights: bool = True, lazy: bool = False
) -> LoadedModel:
    """Weights come back in `dtype` (float32 by default), HF-named, on the CPU; the model runner moves them.
    `load_weights=False` reads only config, tokenizer and chat template (the simulated engine needs no more).
    `lazy=True`: a HF directory's weights are read as the model asks for them, in slices under tensor
    parallelism (GGUF files are dequantized whole either way)."""
    name = str(path)
    try:
        resolved = Path(resolve_model(name))
    except BuiltinModelError as e:
        raise ModelLoadError(str(e)) from e
    torch_dtype = parse_dtype(dtype)
    if resolved.is_dir():
        if (resolved / "config.json").is_file():
            return load_hf_dir(resolved, torch_dtype, name, load_weights, lazy)
        ggufs = sorted(resolved.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], torch_dtype, name, load_weights)
        found = f"{len(ggufs)} .gguf files" if ggufs else "no .gguf file"
        raise ModelLoadError(f"model directory {resolved} has no config.json and {found}; cannot tell what to load")
    if resolved.is_file():
        if is_gguf_file(resolved):
            return load_gguf(resolved, torch_dtype, name, load_weights)
        raise ModelLoadError(
            f"model file {resolved} is not a GGUF file (bad magic); pass a GGUF file or a HF directory"
        )
    builtins = ", ".join(sorted(BUILTIN_MODELS))
    raise ModelLoadError(
        f"model path {resolved} does not exist: pass a Hugging Face model directory, a .gguf file, "
        f"or a builtin model name ({builtins})"
    )


def load_tokenizer(path: str | Path, model_config: ModelConfig) -> TokenizerInfo:
    """The tokenizer and chat template from a HF tokenizer directory (tokenizer.json, tokenizer_config.json)
    or a GGUF file, for `--tokenizer` as vLLM takes it; `model_config` (the served model's) names the special
    tokens a tokenizer_config.json leaves out."""
    resolved = Path(path)
    if resolved.is_dir():
        return read_tokenizer_info(resolved, model_config)
    if resolved.is_file() and is_gguf_file(resolved):
        return load_gguf(resolved, torch.float32, str(path), load_weights=False).tokenizer_info
    raise ModelLoadError(f"tokenizer {path}: not a directory with a tokenizer.json, nor a GGUF file")
