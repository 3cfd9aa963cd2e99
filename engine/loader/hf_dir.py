"""Load a Hugging Face model directory: config.json, safetensors (single or sharded), tokenizer, templates."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from kubellm.engine.model_config import ModelConfig, token_id_list
from kubellm.prompt import TokenizerInfo

from .errors import ModelLoadError
from .fp8_weights import Fp8Weights
from .loaded import LoadedModel
from .quantization import kv_cache_scheme_is_fp8, parse_quantization_config
from .safetensors_file import SafetensorsFile, Staging

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_json(path: Path, required: bool = True) -> dict[str, Any]:
    """A JSON object from `path`; {} when an optional file is absent."""
    if not path.is_file():
        if required:
            raise ModelLoadError(f"model directory {path.parent} has no {path.name}")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return value


def load_hf_dir(
    path: Path, dtype: torch.dtype, name: str, load_weights: bool = True, lazy: bool = False
) -> LoadedModel:
    """`lazy`: weights stay in their files until asked for, each read on its own or in slices
    (`SafetensorsWeights`), so a tensor-parallel rank reads only its shards."""
    hf_config = read_json(path / "config.json")
    config = ModelConfig.from_hf_config(hf_config)
    generation_config = read_json(path / "generation_config.json", required=False)
    tokenizer_info = read_tokenizer_info(path, config)
    for eos in token_id_list(generation_config.get("eos_token_id")):
        if eos not in config.eos_token_ids:
            config.eos_token_ids.append(eos)
    if not config.eos_token_ids and tokenizer_info.eos_token:
        eos_id = Tokenizer.from_str(tokenizer_info.tokenizer_json).token_to_id(tokenizer_info.eos_token)
        if eos_id is not None:
            config.eos_token_ids.append(eos_id)
    quant_config = hf_config.get("quantization_config")
    scheme = parse_quantization_config(quant_config, f"{path / 'config.json'} quantization_config")
    weights: Mapping[str, torch.Tensor] = {}
    if load_weights:
        read_dtype = None if scheme else dtype  # FP8 weights and their float32 scales stay as stored
        weights = SafetensorsWeights(path, read_dtype) if lazy else read_safetensors(path, read_dtype)
        if scheme is not None:
            weights = Fp8Weights(weights, scheme, dtype)
    return LoadedModel(
        config, weights, tokenizer_info, generation_config, name=name, path=str(path),  # type: ignore[arg-type]
        quantization=scheme, kv_cache_fp8=kv_cache_scheme_is_fp8(quant_config),
    )  # fmt: skip


def weight_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        index = read_json(path / INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{path / INDEX_FILE} has no weight_map")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"model directory {path} lacks shard(s) named in {INDEX_FILE}: {', '.join(missing)}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = f" (found {', '.join(others)}: only safetensors weights are supported)" if others else ""
    raise ModelLoadError(f"model directory {path} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def read_safetensors(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor, floating ones cast to `dtype` (None: as stored)."""
    weights: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensor = f.get_tensor(key)
                    if dtype is not None:
                        refuse_unscaled_fp8(key, tensor.dtype, path)
                    weights[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except ModelLoadError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"corrupt or unreadable weights file {file}: {e}") from e
    return weights


def refuse_unscaled_fp8(name: str, dtype: torch.dtype, path: Path) -> None:
    """An FP8 tensor read without a quantization_config would be cast without its scale: wrong numbers, silently."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ModelLoadError(
            f"{path}: tensor {name!r} is {str(dtype).removeprefix('torch.')} but config.json has no "
            "quantization_config saying how it is scaled"
        )


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """The checkpoint's tensors read on access (in `dtype`), whole or as a slice (`read_slice`), never all at
    once, each straight into its own tensor (safetensors_file.py: no file mapping stays resident). The files'
    headers are read and checked here, so a corrupt file fails at load time as in the eager path."""

    def __init__(self, path: Path, dtype: torch.dtype | None):
        self.dtype = dtype  # None: tensors as stored
        self._staging: Staging | None = None
        self._files: dict[str, SafetensorsFile] = {}
        for file in weight_files(path):
            opened = SafetensorsFile(file)
            for key, entry in opened.entries.items():
                if dtype is not None:
                    refuse_unscaled_fp8(key, entry.dtype, path)
                self._files[key] = opened

    def streaming_to(self, device: torch.device) -> SafetensorsWeights:
        """These weights, whole tensors made on `device` and streamed there through two staging buffers (pinned on
        a GPU) instead of read whole into host memory first; slices (tensor-parallel shards) are read as before."""
        view = copy.copy(self)
        view._staging = Staging(device)
        return view

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._staging is not None:
            return self._cast(self._files[name].read_to(name, self._staging))
        return self._cast(self._files[name].read(name))

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor to find out
        return name in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[name].entries[name].shape

    def dtype_of(self, name: str) -> torch.dtype:
        """The stored dtype, read from the header."""
        return self._files[name].entries[name].dtype

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """[start, stop) along `dim`, read from the file alone (the rest of the tensor is never loaded)."""
        return self._cast(self._files[name].read(name, dim, start, stop))

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor


def _token_text(value: Any) -> str | None:
    """tokenizer_config writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(path: Path, tok_config: dict[str, Any]) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template:
        return str(template)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    return read_json(path / "chat_template.json", required=False).get("chat_template")


def read_tokenizer_info(path: Path, config: ModelConfig) -> TokenizerInfo:
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelLoadError(f"model directory {path} has no tokenizer.json (only fast tokenizers are supported)")
    tokenizer_json = tok_file.read_text(encoding="utf-8")
    try:
        tokenizer = Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ModelLoadError(f"cannot parse {tok_file}: {e}") from e
    tok_config = read_json(path / "tokenizer_config.json", required=False)
    bos = _token_text(tok_config.get("bos_token"))
    eos = _token_text(tok_config.get("eos_token"))
    if bos is None and config.bos_token_id is not None:
        bos = tokenizer.id_to_token(config.bos_token_id)
    if eos is None and config.eos_token_ids:
        eos = tokenizer.id_to_token(config.eos_token_ids[0])
    if "add_bos_token" in tok_config:
        add_bos = bool(tok_config["add_bos_token"])
    else:  # ask the tokenizer's own post-processor whether it prepends the BOS
        bos_id = tokenizer.token_to_id(bos) if bos else None
        ids = tokenizer.encode("a").ids
        add_bos = bos_id is not None and bool(ids) and ids[0] == bos_id
    max_len = tok_config.get("model_max_length")
    return TokenizerInfo(
        tokenizer_json=tokenizer_json,
        chat_template=_chat_template(path, tok_config),
        bos_token=bos,
        eos_token=eos,
        add_bos_token=add_bos,
        model_max_length=int(max_len) if isinstance(max_len, int | float) and max_len < 1e9 else None,
    )
