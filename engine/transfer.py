"""Host <-> device copies that never make the host wait for queued GPU work.

A plain `torch.tensor(values, device="cuda")` (or `.to("cuda")` of pageable memory) synchronises the stream:
the host stalls until every kernel already queued has run. Async scheduling prepares step N+1 on the host
while step N runs on the GPU, so every small copy on that path goes through pinned memory instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

WAIT_CHECK_INTERVAL_S = 0.05
_wait_checks: list[Callable[[], None]] = []


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


def add_wait_check(check: Callable[[], None]) -> None:
    """Run `check` every WAIT_CHECK_INTERVAL_S while `wait_event` waits; it raises to abandon the wait. A
    tensor-parallel rank 0 registers one: if a worker dies, the GPU work waiting on its collectives never ends,
    and the engine must fail its requests instead of hanging."""
    _wait_checks.append(check)


def remove_wait_check(check: Callable[[], None]) -> None:
    if check in _wait_checks:
        _wait_checks.remove(check)


def wait_event(event: torch.cuda.Event) -> None:
    """`event.synchronize()`, interruptible by the registered checks (plain synchronize when there are none)."""
    if not _wait_checks:
        event.synchronize()
        return
    next_check = time.monotonic() + WAIT_CHECK_INTERVAL_S
    spins = 0
    while not event.query():
        spins += 1
        now = time.monotonic()
        if now >= next_check:
            for check in list(_wait_checks):
                check()
            next_check = now + WAIT_CHECK_INTERVAL_S
        time.sleep(0 if spins < 2000 else 0.0001)  # yield the GIL; after ~ms-long waits stop spinning hot
