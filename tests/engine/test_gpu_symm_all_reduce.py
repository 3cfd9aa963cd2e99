"""The symmetric-memory one-shot all-reduce of tensor-parallel decode steps (engine/symm_all_reduce.py) gives
NCCL's sums, eagerly and replayed from a CUDA graph with new inputs, and leaves large messages to NCCL.

Needs 2 GPUs (the ranks use NCCL beside it, as the engine does). Two ranks sharing one GPU cannot stand in: on
1x H200 (2026-11-29) the rendezvous there declined and the graph capture then failed on gloo's all-reduce.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu

HIDDEN = 4096


def _rank_main(rank: int, size: int, port: int, results) -> None:
    import os

    import torch.distributed as dist

    from kubellm.engine import symm_all_reduce

    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ["KUBELLM_TP_SYMM_MEM"] = "1"  # opt-in until measured on 2+ GPUs
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    report: dict = {"rank": rank}
    try:
        report["enabled"] = symm_all_reduce.setup(device, torch.bfloat16, wanted=True)
        gen = torch.Generator(device=device).manual_seed(rank)
        for rows in (1, 7, 64):
            x = torch.randn(rows, HIDDEN, generator=gen, device=device).to(torch.bfloat16)
            want = x.float().clone()
            dist.all_reduce(want)
            got = symm_all_reduce.all_reduce(x.clone())
            report[f"eager_{rows}"] = float((got.float() - want).abs().max())
        # graph capture: a static input, replayed with new values
        static = torch.zeros(8, HIDDEN, dtype=torch.bfloat16, device=device)
        symm_all_reduce.all_reduce(static.clone())  # warm-up outside the capture
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = symm_all_reduce.all_reduce(static * 1)
        errs = []
        for step in range(3):
            static.copy_(torch.full_like(static, float(rank + 1 + step)))
            graph.replay()
            torch.cuda.synchronize(device)
            want = sum(r + 1 + step for r in range(size))
            errs.append(float((out.float() - want).abs().max()))
        report["graph"] = max(errs)
        big = torch.ones(512, HIDDEN, dtype=torch.bfloat16, device=device)  # 4 MiB: NCCL's, in place
        report["large_in_place"] = symm_all_reduce.all_reduce(big) is big and bool((big == size).all())
    except Exception as e:  # reported, not raised: the parent asserts
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        symm_all_reduce.teardown()
        results.put(report)
        dist.destroy_process_group()


def _run(size: int) -> list[dict]:
    from kubellm.engine.parallel import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, size, port, results)) for r in range(size)]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return sorted(reports, key=lambda r: r["rank"])


def _check(reports: list[dict]) -> None:
    print(reports)
    for r in reports:
        assert "error" not in r, r
        assert r["enabled"], r
        for rows in (1, 7, 64):
            # bf16 inputs summed in bf16 vs a float32 NCCL sum of the same bf16 values: one bf16 rounding
            assert r[f"eager_{rows}"] < 0.07, r
        assert r["graph"] == 0.0, r
        assert r["large_in_place"], r


def test_two_ranks_on_two_gpus_sum_as_nccl_does() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, torch sees {torch.cuda.device_count()}")
    _check(_run(2))
