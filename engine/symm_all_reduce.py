"""Small all-reduces of tensor-parallel decode steps through PyTorch's symmetric memory instead of NCCL.

Why: a decode step at batch 1 runs 2 all-reduces per layer of a few KB each, where NCCL's fixed cost (~6 us each
in a CUDA graph on 2x H200, 0.41 ms of a 4 ms step) dominates the transfer. A one-shot all-reduce over
symmetric memory has every rank read each peer's buffer straight over NVLink and sum, in one kernel with a
signal-pad barrier: no proxy thread, no protocol handshakes. Large messages (prefill) stay on NCCL, whose ring
and tree algorithms move less data per rank.

Only peer-to-peer loads are used: NVLink multicast (NVLS, PyTorch's `multimem_*` ops) stays off
(TORCH_SYMM_MEM_DISABLE_MULTICAST=1 is respected; see bench/gpu_run.sh). Opt-in for now (--tp-symm-mem or
KUBELLM_TP_SYMM_MEM=1): it has not yet run on 2+ GPUs (none were lent when it was written); bench/gpu_run.sh
tp turns it on to measure it. Set-up is collective: every rank allocates its buffer and rendezvous, then all
ranks agree (an all-reduce of their success flags) so no rank takes a path its peers do not.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# One-shot reads every peer's whole message: past a few hundred KB NCCL's algorithms win (and the buffer grows).
MAX_BYTES_BY_WORLD_SIZE = {2: 512 * 1024, 4: 256 * 1024}
DEFAULT_MAX_BYTES = 128 * 1024

_state: dict[str, object] = {"buffer": None, "group_name": None}


def enabled() -> bool:
    return _state["buffer"] is not None


def setup(device: torch.device, dtype: torch.dtype, wanted: bool) -> bool:
    """Collective: every rank of the default group calls it after the group exists (`wanted`: the engine's
    tp_symm_mem setting, the same on every rank). True when the symmetric path is in use on every rank."""
    _state["buffer"] = None
    if device.type != "cuda" or dist.get_world_size() < 2 or not wanted:
        return False
    max_bytes = MAX_BYTES_BY_WORLD_SIZE.get(dist.get_world_size(), DEFAULT_MAX_BYTES)
    elem = torch.empty((), dtype=dtype).element_size()
    buffer = None
    reason = ""
    try:
        import torch.distributed._symmetric_memory as symm_mem

        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
            raise RuntimeError("this torch has no symm_mem.one_shot_all_reduce_copy")
        group_name = dist.group.WORLD.group_name
        buffer = symm_mem.empty(max_bytes // elem, dtype=dtype, device=device)
        symm_mem.rendezvous(buffer, group_name)
        _state["group_name"] = group_name
    except Exception as e:  # no P2P between these GPUs, an old torch, ...: NCCL does the work
        reason = f"{type(e).__name__}: {e}"
        buffer = None
    ok = torch.tensor([1 if buffer is not None else 0], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if int(ok.item()) == 0:
        logger.info("symmetric-memory all-reduce off (%s); NCCL does all of them", reason or "a peer could not")
        return False
    _state["buffer"] = buffer
    if not _probe(device, dtype):
        _state["buffer"] = None
        logger.warning("symmetric-memory all-reduce gave a wrong sum; NCCL does all of them")
        return False
    logger.info("symmetric-memory one-shot all-reduce for messages up to %d KiB", max_bytes // 1024)
    return True


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    """Every rank checks a sum it knows in advance; all ranks agree on the verdict."""
    rank, size = dist.get_rank(), dist.get_world_size()
    x = torch.full((4096,), float(rank + 1), dtype=dtype, device=device)
    got = all_reduce(x)
    expected = size * (size + 1) / 2
    good = torch.tensor([1 if bool((got.float() == expected).all()) else 0], dtype=torch.int32, device=device)
    dist.all_reduce(good, op=dist.ReduceOp.MIN)
    return int(good.item()) == 1


def teardown() -> None:
    _state["buffer"] = None
    _state["group_name"] = None


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over the ranks: a new tensor when the symmetric path takes it, else `t` reduced in place by
    NCCL. Callers use the return value."""
    buffer = _state["buffer"]
    if (
        isinstance(buffer, torch.Tensor)
        and t.dtype == buffer.dtype
        and t.numel() <= buffer.numel()
        and t.is_contiguous()
    ):
        return torch.ops.symm_mem.one_shot_all_reduce_copy(buffer, t, "sum", str(_state["group_name"]))
    dist.all_reduce(t)
    return t
