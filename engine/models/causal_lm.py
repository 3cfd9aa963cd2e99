"""What every decoder-only model here shares, whatever its blocks look like: the (vocab-parallel) embedding and
LM head, tied or not; logits; the parameter accounting the tensor-parallel tests check; and the checkpoint
reader that takes HF-named tensors (this rank's shards under tensor parallelism), fuses q/k/v and gate/up, and
refuses missing, misshapen or unused weights by name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.engine import parallel
from kubellm.engine.loader.errors import ModelLoadError
from kubellm.engine.loader.fp8_weights import Fp8Tensor
from kubellm.engine.loader.quantization import Fp8Scheme
from kubellm.engine.model_config import ModelConfig

from . import fp8_linear
from .fp8_gemm import dequantize_weight_fp8, quantize_weight_fp8

logger = logging.getLogger(__name__)


def new_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # torch.empty reserves without touching pages; load_weights swaps in the real storage.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


_deferred = {"on": False}


@contextmanager
def deferred_weights() -> Iterator[None]:
    """Models built inside give their big weights (linear layers, experts: `new_weight`) no storage until they are
    loaded. On CUDA torch.empty does take device memory, so an FP8 checkpoint would otherwise need its bf16 size
    free at start, only for the FP8 weights to replace it."""
    _deferred["on"] = True
    try:
        yield
    finally:
        _deferred["on"] = False


def new_weight(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """`new_param`, or inside `deferred_weights` one element broadcast to `shape` (its right shape, dtype and device;
    loading replaces it, and in-place fills call `materialize` first)."""
    if not _deferred["on"]:
        return new_param(shape, dtype, device)
    return nn.Parameter(torch.empty(1, dtype=dtype, device=device).expand(shape), requires_grad=False)


def is_deferred(t: torch.Tensor) -> bool:
    """A `new_weight` placeholder not loaded yet."""
    return t.numel() > 1 and all(stride == 0 for stride in t.stride())


def materialize(param: nn.Parameter) -> torch.Tensor:
    """The parameter's storage, allocated now if it was deferred (for loaders that fill it in place)."""
    if is_deferred(param):
        param.data = torch.empty(param.shape, dtype=param.dtype, device=param.device)
    return param.data


class CheckpointReader:
    """One load: `take` a weight (or this rank's shard), `put` it into a parameter; `finish` checks that every
    checkpoint entry was used."""

    def __init__(self, weights: Mapping[str, torch.Tensor], config: ModelConfig, rank: int, size: int):
        self.weights, self.config, self.rank, self.size = weights, config, rank, size
        self.used: set[str] = set()
        # the FP8 scheme when `weights` is an Fp8Weights view (an FP8 checkpoint, or --quantization fp8)
        self.scheme: Fp8Scheme | None = getattr(weights, "scheme", None)
        self.fp8_layers = 0  # linear layers (or expert stacks) loaded as FP8 on the device

    def take(self, name: str, split: str = "") -> torch.Tensor:
        """The weight, or this rank's shard of it: split "col" (output rows: heads / intermediate), "row" (input
        columns: the row-parallel layers) or "vocab"."""
        if name not in self.weights:
            raise ModelLoadError(f"checkpoint lacks weight {name!r} that {self.config.architecture} needs")
        self.used.add(name)
        if split == "vocab":
            return parallel.read_vocab_shard(self.weights, name, self.rank, self.size)
        if split:
            return parallel.read_shard(self.weights, name, 0 if split == "col" else 1, self.rank, self.size)
        return self.weights[name]

    def take_range(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """[start, stop) of weight `name` along `dim`, read alone where the mapping can."""
        if name not in self.weights:
            raise ModelLoadError(f"checkpoint lacks weight {name!r} that {self.config.architecture} needs")
        self.used.add(name)
        return parallel.read_slice(self.weights, name, dim, start, stop)

    def put(self, param: nn.Parameter | None, tensor: torch.Tensor, name: str) -> None:
        if param is None:
            raise ModelLoadError(
                f"checkpoint has weight {name!r} that this {self.config.architecture} config does not use"
            )
        check_shape(tensor, tuple(param.shape), name)
        param.data = tensor.to(device=param.device, dtype=param.dtype)

    def keeps_fp8(self, names: list[str], device: torch.device) -> bool:
        """Whether these checkpoint weights go to `device` as FP8 (an FP8 checkpoint's FP8 tensors, on CUDA)."""
        if self.scheme is None or self.scheme.method == "online" or device.type != "cuda":
            return False
        return all(self.weights.is_fp8(n) for n in names)  # type: ignore[attr-defined]

    def fp8_shard(self, name: str, split: str) -> Fp8Tensor | None:
        """This rank's part of FP8 weight `name` (split "col": output rows, "row": input columns, "": all of it,
        a replicated layer) with its scales; None when block scales do not split at the shard's edges."""
        whole = self.weights.fp8(name)  # type: ignore[attr-defined]
        return whole if not split else fp8_linear.shard(whole, 1 if split == "row" else 0, self.rank, self.size)

    def put_linear(self, linear: nn.Module, prefix: str, parts: tuple[str, ...], split: str, label: str) -> None:
        """`linear.weight` from `prefix.{part}.weight` for each part, stacked (one part: `prefix.weight` when
        `parts` is empty). FP8 on CUDA where the checkpoint holds FP8 or --quantization fp8 asks; otherwise in the
        model dtype: FP8 checkpoints dequantized at load, online FP8 rounded through FP8 per tensor so that the CPU
        computes with the very weights the GPU would hold."""
        names = [f"{prefix}.{p}.weight" for p in parts] if parts else [f"{prefix}.weight"]
        device = linear.weight.device
        if self.keeps_fp8(names, device):
            shards = [self.fp8_shard(n, split) for n in names]
            fused = None if any(t is None for t in shards) else fp8_linear.fuse(shards)  # type: ignore[arg-type]
            if fused is not None:
                self.used.update(names)
                self._load_fp8(linear, fused, label)
                return
            logger.warning("%s: FP8 block scales do not split at the fused projections or shard edges; "
                           "dequantized to %s", label, linear.weight.dtype)  # fmt: skip
        if parts:  # the parts meet on the device: concatenating on the host would be a second host copy of them
            tensor = torch.cat([self.take(n, split).to(device) for n in names], dim=0)
        else:
            tensor = self.take(names[0], split)
        if self.scheme is not None and self.scheme.method == "online":
            check_shape(tensor, tuple(linear.weight.shape), label)
            q, scale = quantize_weight_fp8(tensor.to(device))
            if device.type == "cuda":
                self._load_fp8(linear, Fp8Tensor(q, scale, None, None), label)
                return
            tensor = dequantize_weight_fp8(q, scale)
        self.put(linear.weight, tensor, label)

    def _load_fp8(self, linear: nn.Module, t: Fp8Tensor, label: str) -> None:
        load = getattr(linear, "load_fp8", None)
        if load is None:
            raise ModelLoadError(f"{label}: {type(linear).__name__} layers cannot hold FP8 weights")
        check_shape(t.weight, tuple(linear.weight.shape), label)
        load(t)
        self.fp8_layers += 1

    def fused(self, prefix: str, parts: tuple[str, ...], suffix: str) -> torch.Tensor:
        """Column shards of several projections stacked into one (q/k/v, gate/up)."""
        return torch.cat([self.take(f"{prefix}.{p}.{suffix}", "col") for p in parts], dim=0)

    def load_attention_and_mlp(self, layer: nn.Module, prefix: str) -> None:
        """The fused qkv / o_proj and gate_up / down_proj of a block (llama.py's Attention and MLP), with the
        biases the config declares."""
        self.load_attention(layer.self_attn, prefix)
        self.load_mlp(layer.mlp, f"{prefix}.mlp")

    def load_attention(self, attn: nn.Module, prefix: str) -> None:
        c, qkv = self.config, ("q_proj", "k_proj", "v_proj")
        self.put_linear(attn.qkv_proj, f"{prefix}.self_attn", qkv, "col", f"{prefix}.self_attn.qkv")
        if c.attention_bias:
            self.put(attn.qkv_proj.bias, self.fused(f"{prefix}.self_attn", qkv, "bias"), f"{prefix}.self_attn.qkv")
        name = f"{prefix}.self_attn.o_proj.weight"
        self.put_linear(attn.o_proj, f"{prefix}.self_attn.o_proj", (), "row", name)
        if c.attention_out_bias:
            name = f"{prefix}.self_attn.o_proj.bias"
            self.put(attn.o_proj.bias, self.take(name), name)

    def load_mlp(self, mlp: nn.Module, prefix: str) -> None:
        """gate/up fused into gate_up_proj, and down_proj, of the MLP whose HF name is `prefix`."""
        gate_up = ("gate_proj", "up_proj")
        self.put_linear(mlp.gate_up_proj, prefix, gate_up, "col", f"{prefix}.gate_up")
        name = f"{prefix}.down_proj.weight"
        self.put_linear(mlp.down_proj, f"{prefix}.down_proj", (), "row", name)
        if mlp.down_proj.bias is not None:
            self.put(mlp.gate_up_proj.bias, self.fused(prefix, gate_up, "bias"), f"{prefix}.gate_up")
            name = f"{prefix}.down_proj.bias"
            self.put(mlp.down_proj.bias, self.take(name), name)

    def finish(self, ignored_suffixes: tuple[str, ...] = (), ignored_prefixes: tuple[str, ...] = ()) -> None:
        """Refuse checkpoint entries nothing took, except those named by the ignored suffixes or prefixes."""
        if self.config.tie_word_embeddings and "lm_head.weight" in self.weights:
            self.used.add("lm_head.weight")  # some checkpoints save the tied copy too
        unexpected = sorted(
            n for n in self.weights
            if n not in self.used and not n.endswith(ignored_suffixes) and not n.startswith(ignored_prefixes)
        )  # fmt: skip
        if unexpected:
            shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
            raise ModelLoadError(
                f"checkpoint has {len(unexpected)} weights {self.config.architecture} does not use: {shown}"
            )


def check_shape(tensor: torch.Tensor, expected: tuple[int, ...], name: str) -> None:
    expect_shape(tuple(tensor.shape), expected, name)


def expect_shape(shape: tuple[int, ...], expected: tuple[int, ...], name: str) -> None:
    if tuple(shape) != tuple(expected):
        raise ModelLoadError(f"weight {name!r} has shape {tuple(shape)}, the config implies {tuple(expected)}")


class CausalLM(nn.Module):
    """Base of the model classes: embedding and LM head (vocab rows split under tensor parallelism, the head tied
    to the embedding when the config says so), logits, parameter accounting. Subclasses build `layers` and
    `norm`, and name their replicated norm types in `norm_types`."""

    norm_types: tuple[type[nn.Module], ...] = ()

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str, tp_rank: int, tp_size: int):
        super().__init__()
        device = torch.device(device)
        if tp_size > 1:
            parallel.check_tp_size(config, tp_size)
        self.config = config
        self.dtype = dtype
        self.tp_rank, self.tp_size = tp_rank, tp_size
        vocab = parallel.vocab_shard(config.vocab_size, tp_rank, tp_size)[1] if tp_size > 1 else config.vocab_size
        self.embed_tokens = new_param((vocab, config.hidden_size), dtype, device)
        self.lm_head = (
            self.embed_tokens if config.tie_word_embeddings else new_param((vocab, config.hidden_size), dtype, device)
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            return parallel.vocab_parallel_embedding(input_ids, self.embed_tokens, self.tp_rank)
        return F.embedding(input_ids, self.embed_tokens)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, V] (the full vocab on every rank under tensor parallelism)."""
        if self.tp_size > 1:
            return parallel.vocab_parallel_logits(hidden, self.lm_head, self.config.vocab_size)
        return F.linear(hidden, self.lm_head).float()

    def param_counts(self) -> dict[str, int]:
        """Elements held by this rank: 'sharded' (split across TP ranks) and 'replicated' (norms, row biases);
        'experts' counts the MoE layers' expert weights (routed and shared, part of 'sharded')."""
        replicated = {id(p) for m in self.modules() if isinstance(m, self.norm_types) for p in m.parameters()}
        for m in self.modules():  # e.g. the MoE router
            if hasattr(m, "replicated_parameters"):
                replicated |= {id(p) for p in m.replicated_parameters()}
        for layer in self.layers:  # row-parallel biases are added once, whole, on every rank (at TP 1 too)
            for lin in (layer.self_attn.o_proj, getattr(layer.mlp, "down_proj", None)):
                if lin is not None and lin.bias is not None:
                    replicated.add(id(lin.bias))
        counts = {"sharded": 0, "replicated": 0}
        for p in self.parameters():  # a tied lm_head is the embedding's Parameter: counted once
            counts["replicated" if id(p) in replicated else "sharded"] += p.numel()
        counts["experts"] = sum(
            p.numel() for m in self.modules() if hasattr(m, "expert_parameters") for p in m.expert_parameters()
        )
        return counts

    def load_embeddings(self, reader: CheckpointReader) -> None:
        reader.put(self.embed_tokens, reader.take("model.embed_tokens.weight", "vocab"), "model.embed_tokens.weight")
        if not self.config.tie_word_embeddings:
            reader.put(self.lm_head, reader.take("lm_head.weight", "vocab"), "lm_head.weight")

    def tie_head(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head = self.embed_tokens
