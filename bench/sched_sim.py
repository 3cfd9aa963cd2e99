"""Scheduler simulation: the offline workloads through our Scheduler and KV cache manager, no model, no GPU.

    python -m bench.sched_sim                          # (a), (b), (c) at scale 1.0, the H100 pool of 2026-12-07
    python -m bench.sched_sim --workloads b --out bench/results   # also writes sched-sim-<date>.json/.md

Each step is faked: every scheduled sequence computes its tokens, and one that reaches the end of its known tokens
samples one (a fixed id). It counts what a policy costs when the pool is tight: preemptions, steps, the mean running
batch, and tokens recomputed (positions computed again after a preemption, not found in the prefix cache). A
roofline estimate of GPU time per step (Llama-3.1-8B on an H100, the constants below) weighs steps
against recompute; it is an estimate for comparing policies, not a measurement.

Policies compared, on the same pool, limits and prompts (bench/workloads.py):
- ours: kubellm.engine.scheduler.Scheduler as the engine builds it (growth reserve from EngineConfig's default);
  ours:N the same with a growth reserve of N tokens;
- vllm-v1-model: a MODEL of vLLM v1's fcfs policy written from reading vllm/v1/core/sched/scheduler.py and
  kv_cache_manager.py (not vLLM itself): running requests first; a waiting request is admitted while the free
  blocks cover its new tokens plus a watermark of 1% of the pool (vLLM main; vllm-v1-model-nowm: the same without
  it; not checked which of the two 0.26.0 has), with no reserve for the running requests' growth; the victim is the
  last request in the running list; it goes back to the front of the waiting queue; a step that preempted admits nobody.
The roofline estimate ignores the async engine's placeholders and the host: it compares policies only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.workloads import WORKLOADS, EngineSettings, Workload
from kubellm.engine.config import EngineConfig
from kubellm.engine.kv_cache_manager import KVCacheManager
from kubellm.engine.request import Request, RequestStatus
from kubellm.engine.sampling_params import SamplingParams
from kubellm.engine.scheduler import Scheduler

# The pool our engine had on the H100 run of 2026-12-07 (Llama-3.1-8B shape, gpu_memory_utilization 0.9).
H100_POOL_BLOCKS = 27_668
VOCAB = 128_256
SAMPLED_TOKEN = 1_234

# Roofline constants (Llama-3.1-8B, bf16, one H100): bytes of weights and of one token's KV over all layers,
# flops per token through the linear layers, and the measured ceilings from GUIDE.md.
WEIGHT_BYTES = 16.06e9
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2
LINEAR_FLOPS_PER_TOKEN = 2 * 7.5e9
ATTN_FLOPS_PER_QK_PAIR = 32 * 4 * 32 * 128  # layers x (QK^T + PV, 2 flops each) x query heads x head dim
HBM_BYTES_PER_S = 3.0e12
BF16_FLOPS_PER_S = 790e12 * 0.8  # what large GEMMs reach in practice


class VllmV1PolicyModel(Scheduler):
    """A model of vLLM v1's fcfs policy (see the module docstring), on our Scheduler's mechanics.

    vLLM admits a waiting (or preempted) request when the free blocks (cached-but-unreferenced ones included) cover
    its new tokens plus a watermark of `watermark` x the pool, the watermark applying only while other requests are
    scheduled (vLLM main's KVCacheManager: watermark 0.01; older v1 releases had none): no reserve for the running
    requests' growth. Victims and re-queueing are the same as ours (running[-1], to the front of the waiting queue;
    no admission in a step that preempted)."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 watermark: float):  # fmt: skip
        super().__init__(
            kv, max_num_seqs, max_num_batched_tokens, max_model_len, policy="fcfs", growth_reserve_tokens=0
        )
        self.watermark_blocks = int(watermark * kv.num_blocks)

    def _growth_reserve_blocks(self) -> int:
        # The admission check in Scheduler.schedule: with no growth reserve, a request's own blocks + this must fit.
        return self.watermark_blocks

    def _pick_victim(self) -> Request | None:
        return self.running[-1] if self.running else None


@dataclass
class SimResult:
    policy: str
    workload: str
    requests: int
    pool_blocks: int
    steps: int = 0
    preemptions: int = 0
    requests_preempted: int = 0
    mean_running: float = 0.0  # sequences in the batch, per step
    mean_decodes: float = 0.0  # of which decoding one token
    peak_running: int = 0
    tokens_computed: int = 0
    tokens_recomputed: int = 0
    est_gpu_s: float = 0.0  # roofline estimate (see module docstring)
    est_output_tok_s: float = 0.0
    sim_wall_s: float = 0.0


def step_seconds(seqs: list[tuple[int, int]]) -> float:
    """Roofline time of one step of (start_pos, num_tokens) sequences: weights + KV read vs flops."""
    tokens = sum(n for _, n in seqs)
    kv_read = sum(s + n for s, n in seqs) * KV_BYTES_PER_TOKEN
    attn_flops = sum(n * s + n * n // 2 for s, n in seqs) * ATTN_FLOPS_PER_QK_PAIR
    flops = tokens * LINEAR_FLOPS_PER_TOKEN + attn_flops
    return max((WEIGHT_BYTES + kv_read) / HBM_BYTES_PER_S, flops / BF16_FLOPS_PER_S)


def make_scheduler(policy: str, pool_blocks: int, settings: EngineSettings) -> Scheduler:
    kv = KVCacheManager(pool_blocks, settings.block_size, settings.enable_prefix_caching)
    limits = (settings.max_num_seqs, settings.max_num_batched_tokens, settings.max_model_len)
    if policy == "ours" or policy.startswith("ours:"):  # ours:N: with a growth reserve of N tokens instead
        reserve = policy.partition(":")[2]
        tokens = int(reserve) if reserve else EngineConfig().kv_growth_reserve_tokens
        return Scheduler(kv, *limits, policy="fcfs", growth_reserve_tokens=tokens)
    if policy == "vllm-v1-model":
        return VllmV1PolicyModel(kv, *limits, watermark=0.01)
    if policy == "vllm-v1-model-nowm":
        return VllmV1PolicyModel(kv, *limits, watermark=0.0)
    raise ValueError(f"unknown policy {policy!r}")


def simulate(policy: str, workload: Workload, pool_blocks: int, settings: EngineSettings) -> SimResult:
    t0 = time.perf_counter()
    sched = make_scheduler(policy, pool_blocks, settings)
    requests = []
    for i, prompt in enumerate(workload.prompts(VOCAB)):
        params = SamplingParams(max_tokens=workload.max_tokens, ignore_eos=True)
        req = Request(f"r{i}", prompt, params, max_tokens=workload.max_tokens, block_size=settings.block_size,
                      arrival_time=float(i))  # fmt: skip
        requests.append(req)
        sched.add_request(req)
    high_water = {r.request_id: 0 for r in requests}  # furthest position ever computed, per request
    res = SimResult(policy, workload.key, workload.requests, pool_blocks)
    est = 0.0
    sum_running = sum_decodes = 0
    while sched.has_unfinished():
        out = sched.schedule()
        if out.failed:
            raise RuntimeError(f"{policy}: {len(out.failed)} requests failed: {out.failed[0].error}")
        if out.is_empty:
            raise RuntimeError(f"{policy}: nothing scheduled with {sched.num_waiting} waiting (a stall)")
        seqs = [(s.start_pos, len(s.token_ids)) for s in out.batch.seqs]
        for s in out.batch.seqs:
            end = s.start_pos + len(s.token_ids)
            hw = high_water[s.request_id]
            res.tokens_recomputed += max(0, min(end, hw) - s.start_pos)
            high_water[s.request_id] = max(hw, end)
        res.tokens_computed += sum(n for _, n in seqs)
        res.steps += 1
        sum_running += len(seqs)
        sum_decodes += sum(1 for _, n in seqs if n == 1)
        res.peak_running = max(res.peak_running, len(seqs))
        est += step_seconds(seqs)
        for req in sched.update_after_step(out):
            req.output_token_ids.append(SAMPLED_TOKEN)
            if len(req.output_token_ids) >= req.max_tokens:
                sched.finish_request(req.request_id, RequestStatus.FINISHED_LENGTH)
    res.preemptions = sched.num_preemptions
    res.requests_preempted = sum(1 for r in requests if r.num_preemptions)
    res.mean_running = round(sum_running / res.steps, 1)
    res.mean_decodes = round(sum_decodes / res.steps, 1)
    res.est_gpu_s = round(est, 2)
    res.est_output_tok_s = round(workload.requests * workload.max_tokens / est)
    res.sim_wall_s = round(time.perf_counter() - t0, 1)
    return res


def markdown(results: list[SimResult], command: str, commit: str, settings: EngineSettings) -> str:
    lines = [
        f"# Scheduler simulation ({dt.date.today().isoformat()})",
        "",
        f"Command: `{command}` at commit {commit}. Pure Python, no model: bench/sched_sim.py.",
        f"KV blocks of {settings.block_size} tokens (the 2026-12-07 H100 run had {H100_POOL_BLOCKS}), "
        f"max_num_seqs {settings.max_num_seqs}, max_num_batched_tokens {settings.max_num_batched_tokens}. "
        "vllm-v1-model is our model of vLLM v1's policy, not vLLM. est GPU s is a roofline estimate "
        "(Llama-3.1-8B, H100 constants), not a measurement.",
        "",
        "| pool blocks | workload | policy | preemptions | requests preempted | steps | mean running | mean decodes | "
        "recomputed tokens | est GPU s | est output tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.pool_blocks} | {r.workload} | {r.policy} | {r.preemptions} | {r.requests_preempted} | {r.steps} | "
            f"{r.mean_running} | "
            f"{r.mean_decodes} | {r.tokens_recomputed} | {r.est_gpu_s} | {r.est_output_tok_s} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="abc")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--pool-blocks", default=str(H100_POOL_BLOCKS), help="KV blocks; a comma list runs each")
    p.add_argument("--policies", default="ours,vllm-v1-model,vllm-v1-model-nowm")
    p.add_argument("--out", type=Path, help="folder for sched-sim-<date>.json/.md")
    args = p.parse_args()
    settings = EngineSettings()
    results = []
    pools = [int(x) for x in args.pool_blocks.split(",")]
    for pool in pools:
        for key in args.workloads:
            w = WORKLOADS[key].scaled(args.scale)
            for policy in args.policies.split(","):
                r = simulate(policy, w, pool, settings)
                print(json.dumps(asdict(r)), flush=True)
                results.append(r)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python -m bench.sched_sim " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"
    )
    md = markdown(results, command, commit, settings)
    print(md)
    if args.out:
        stem = args.out / f"sched-sim-{dt.date.today().isoformat()}"
        payload = {
            "command": command,
            "commit": commit,
            "settings": settings.as_dict(),
            "results": [asdict(r) for r in results],
        }
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        stem.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
