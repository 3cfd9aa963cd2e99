"""Tensor parallelism: process-group set-up/teardown and the shard helpers the model uses when tp_size > 1.

Megatron-style sharding: q/k/v and gate/up are column-parallel (each rank owns whole heads / a slice of the
intermediate), o_proj and down_proj row-parallel (partial sums all-reduced), the embedding and LM head
vocab-parallel (rows split, padded so every rank's slice has one size). Every rank loads the full checkpoint
and keeps its shard (simple; a per-rank partial load is a later optimisation). Nothing here runs at TP 1.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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


def init_group(rank: int, size: int, port: int, device_type: str) -> None:
    """Join the default process group of this TP replica (one per process)."""
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process")
    dist.init_process_group(
        backend_for(device_type),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=COLLECTIVE_TIMEOUT,
    )


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def vocab_shard(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """(first row, rows per rank) of this rank's vocab slice; the last slice may run past the vocab (padding)."""
    per = -(-vocab_size // size)
    return rank * per, per


def shard(tensor: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """This rank's contiguous 1/size slice along `dim`, as its own storage (the full tensor can then be freed)."""
    if size == 1:
        return tensor
    n = tensor.shape[dim]
    if n % size:
        raise ValueError(f"cannot split dimension {dim} of size {n} into {size} equal shards")
    return tensor.narrow(dim, rank * (n // size), n // size).clone()


def shard_vocab(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rows of the vocab slice of [V, H]; rows past V are zero (their logits are sliced off after the gather)."""
    if size == 1:
        return tensor
    start, per = vocab_shard(tensor.shape[0], rank, size)
    out = torch.zeros((per, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    rows = max(0, min(per, tensor.shape[0] - start))
    out[:rows] = tensor[start : start + rows]
    return out


def vocab_parallel_embedding(input_ids: torch.Tensor, weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Look up the ids this rank's slice holds, zero the rest, and sum over ranks."""
    per = weight.shape[0]
    local = input_ids - rank * per
    outside = (local < 0) | (local >= per)
    out = F.embedding(local.masked_fill(outside, 0), weight)
    out = out.masked_fill(outside[:, None], 0)
    dist.all_reduce(out)
    return out


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out)
        return out if self.bias is None else out + self.bias
