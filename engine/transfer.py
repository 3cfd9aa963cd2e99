"""Host <-> device copies that never make the host wait for queued GPU work.

A plain `torch.tensor(values, device="cuda")` (or `.to("cuda")` of pageable memory) synchronises the stream:
the host stalls until every kernel already queued has run. Async scheduling prepares step N+1 on the host
while step N runs on the GPU, so every small copy on that path goes through pinned memory instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device_async(
    values: Sequence | np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`values` as a tensor on `device`; on CUDA copied from pinned memory without waiting for the stream."""
    if isinstance(values, torch.Tensor):
        host = values.to(dtype)
    elif isinstance(values, np.ndarray):
        host = torch.from_numpy(values).to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_host_async(tensors: Sequence[torch.Tensor | None]) -> tuple[list[torch.Tensor | None], torch.cuda.Event | None]:
    """Start copying tensors to (pinned) host memory; wait on the returned event (None: nothing was on a GPU)
    before reading them."""
    if not any(t is not None and t.device.type == "cuda" for t in tensors):
        return list(tensors), None
    host = [t.to("cpu", non_blocking=True) if t is not None else None for t in tensors]
    event = torch.cuda.Event()
    event.record()
    return host, event
