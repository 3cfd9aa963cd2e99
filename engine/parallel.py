"""Tensor parallelism: process-group set-up/teardown and the shard helpers the model uses when tp_size > 1.

Megatron-style sharding: q/k/v and gate/up are column-parallel (each rank owns whole heads / a slice of the
intermediate), o_proj and down_proj row-parallel (partial sums all-reduced), the embedding and LM head
vocab-parallel (rows split, padded so every rank's slice has one size). A rank reads only its slices when the
weights mapping can (`read_slice`: lazy safetensors, random weights); from a plain dict it cuts them out of the
full tensors. Nothing here runs at TP 1.

Two process groups: the default one (NCCL on CUDA, gloo on CPU) carries the forward's collectives, and on CUDA a
gloo "control" group carries the pickled per-step commands, so they never touch the GPU stream.

Small all-reduces (decode) go through symmetric memory when the GPUs allow it (engine/symm_all_reduce.py), the
rest through NCCL. CUDA graphs capture the all-reduces of the decode forward (PyTorch's ProcessGroupNCCL supports
capture and waits for its watchdog's pending work before one starts). `warm_up` creates the communicator before
any capture, and every rank captures the same sizes in the same order because every rank runs allocate_kv_cache
from the same broadcast command. --no-tp-cuda-graphs (KUBELLM_TP_CUDA_GRAPHS=0) falls back to eager decode under
tensor parallelism.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kubellm.engine import symm_all_reduce
from kubellm.engine.model_config import ModelConfig

# Idle servers wait in a broadcast between requests: the collective timeout must not end them. Worker death
# is detected by other means (rank 0 checks the processes each step; workers watch their parent).
COLLECTIVE_TIMEOUT = timedelta(days=365)


def check_tp_size(config: ModelConfig, tp_size: int) -> None:
    """Raise ValueError naming the sizes when `tp_size` cannot split this model evenly."""
    if tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    sizes = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
    }
    if config.kv_lora_rank:  # multi-head latent attention: the one latent KV head is replicated, not split
        del sizes["num_key_value_heads"]
    if config.num_experts:  # experts (and the shared expert) are split by intermediate dimension, like the MLP
        sizes["moe_intermediate_size"] = config.moe_intermediate_size
        if config.shared_expert_intermediate_size:
            sizes["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
    bad = [f"{name}={value}" for name, value in sizes.items() if value % tp_size]
    if bad:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must divide the model's {', '.join(bad)} "
            f"(heads and the KV cache are split by head across ranks)"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


_control: dict[str, dist.ProcessGroup | None] = {"group": None}


def init_group(rank: int, size: int, port: int, device_type: str) -> None:
    """Join the default process group of this TP replica (one per process); on CUDA bind rank r to GPU r first
    (NCCL and the object collectives use the current device) and add the gloo control group."""
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process")
    device_id = None
    if device_type == "cuda":
        device_id = torch.device("cuda", rank)
        torch.cuda.set_device(device_id)
    dist.init_process_group(
        backend_for(device_type),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device_id,
    )
    if device_type == "cuda":
        _control["group"] = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)


def control_group() -> dist.ProcessGroup | None:
    """The group for pickled commands and results: gloo beside an NCCL default group, else the default (None)."""
    return _control["group"]


def warm_up(device: torch.device) -> None:
    """One all-reduce on `device`, waited for: the communicator exists before any CUDA graph capture."""
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if int(probe.item()) != dist.get_world_size():
        raise RuntimeError(f"all-reduce warm-up gave {probe.item()}, expected {dist.get_world_size()}")


def abort_group() -> None:
    """Abort the default group's communicators (NCCL: in-flight collectives end with an error rather than wait
    for a rank that is gone). Best effort: a torch without the private hook leaves them as they are."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None and dist.is_initialized():
        try:
            abort()
        except Exception:  # the process is failing anyway; the caller raises its own error
            pass


def destroy_group() -> None:
    symm_all_reduce.teardown()
    _control["group"] = None
    if dist.is_initialized():
        dist.destroy_process_group()


def vocab_shard(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """(first row, rows per rank) of this rank's vocab slice; the last slice may run past the vocab (padding)."""
    per = -(-vocab_size // size)
    return rank * per, per


def read_slice(weights: Mapping[str, torch.Tensor], name: str, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows/columns [start, stop) of weight `name` along `dim`, as its own storage. Mappings with a
    `read_slice(name, dim, start, stop)` method read only that slice; from others it is cut out of the full tensor."""
    reader = getattr(weights, "read_slice", None)
    if reader is not None:
        return reader(name, dim, start, stop)
    return weights[name].narrow(dim, start, stop - start).clone()


def read_shard(weights: Mapping[str, torch.Tensor], name: str, dim: int, rank: int, size: int) -> torch.Tensor:
    """This rank's contiguous 1/size slice of weight `name` along `dim` (the whole tensor at size 1)."""
    if size == 1:
        return weights[name]
    n = shape_of(weights, name)[dim]
    if n % size:
        raise ValueError(f"cannot split dimension {dim} of {name} (size {n}) into {size} equal shards")
    per = n // size
    return read_slice(weights, name, dim, rank * per, (rank + 1) * per)


def read_vocab_shard(weights: Mapping[str, torch.Tensor], name: str, rank: int, size: int) -> torch.Tensor:
    """This rank's rows of a [V, H] vocab tensor; rows past V are zero (their logits are sliced off after the
    gather)."""
    if size == 1:
        return weights[name]
    vocab = shape_of(weights, name)[0]
    start, per = vocab_shard(vocab, rank, size)
    rows = max(0, min(per, vocab - start))
    part = read_slice(weights, name, 0, start, start + rows)
    if rows == per:
        return part
    out = torch.zeros((per, *part.shape[1:]), dtype=part.dtype, device=part.device)
    out[:rows] = part
    return out


def shape_of(weights: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A weight's shape without reading it when the mapping can say (`shape(name)`)."""
    shape = getattr(weights, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(weights[name].shape)


def vocab_parallel_embedding(input_ids: torch.Tensor, weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Look up the ids this rank's slice holds, zero the rest, and sum over ranks."""
    per = weight.shape[0]
    local = input_ids - rank * per
    outside = (local < 0) | (local >= per)
    out = F.embedding(local.masked_fill(outside, 0), weight)
    out = out.masked_fill(outside[:, None], 0)
    return symm_all_reduce.all_reduce(out)


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 logits [N, V]: each rank projects onto its vocab slice, then the slices are all-gathered
    (every rank gets them; only rank 0 samples)."""
    local = F.linear(hidden, weight).float().contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=-1)[:, :vocab_size]


class RowParallelLinear(nn.Module):
    """Input dimension split across ranks: local partial products are all-reduced, then the (replicated) bias
    is added once."""

    def __init__(self, in_f: int, out_f: int, bias: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty((out_f, in_f), dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty((out_f,), dtype=dtype, device=device), requires_grad=False) if bias else None
        )

        self.fp8: Any = None  # models/fp8_linear.Fp8Params once load_fp8 made the weight FP8 (CUDA)

    matmul = staticmethod(F.linear)  # see models/llama.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is not None:
            from kubellm.engine.models.fp8_linear import fp8_forward

            partial = fp8_forward(x, self.weight, self.fp8, None)
        else:
            partial = self.matmul(x, self.weight)
        out = symm_all_reduce.all_reduce(partial)
        return out if self.bias is None else out + self.bias

    def load_fp8(self, t: Any) -> None:
        """Hold this rank's columns of an FP8 weight (models/fp8_linear.Fp8Tensor) with its scales."""
        from kubellm.engine.models.fp8_linear import hold

        hold(self, t)
