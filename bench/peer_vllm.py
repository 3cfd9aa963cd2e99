"""The peer, measured beside our engine: vLLM 0.26.0 on the same workloads, shape, settings and GPU machine.

Runs in its own process (vLLM's pinned packages differ from ours), with vLLM installed by
shared/gpu/vllm-install.sh into /tmp/vsite:

    PYTHONPATH=/tmp/vsite:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 -m bench.peer_vllm \
        --shape llama-3.1-8b --scale 0.5 --json-out /tmp/peer-llama-3.1-8b.json

`--profile` adds, after the workloads, the step profiles bench/offline.py --profile takes of ours (the same probes,
bench/workloads.py): one prefill step of max_num_batched_tokens tokens and decode steps at the given batches, each
as GPU kernel time by kind (bench/kernel_kinds.py, the one classifier of both), GPU idle and host time per step.
torch.profiler runs around vLLM's in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0), stepped directly
through `llm.llm_engine`; a profile that fails is noted and never costs the workloads' figures.

`python -m bench.offline --peer vllm` starts it itself (before our engine takes the GPU), or reads a file it wrote
earlier on the same machine with `--peer-json`. vLLM gets a directory holding only the shape's config.json, dummy
weights and no tokenizer (prompts are token ids), and the workloads, sampling parameters and engine limits of
bench/workloads.py: nothing here may differ from what our engine runs.

Mixture-of-experts shapes: vLLM's dummy weights route every token of DeepSeek-V2/V3 to the same few experts (bench/
expert_routing.py says why, from vLLM 0.26.0's code), so after the dummy load the weights that decide routing are
re-drawn to our random model's distribution (norms ones, embedding and router gates N(0, 0.02); `routing_reinit` in
the JSON says what was changed; `--keep-dummy-routing` leaves vLLM's as they were, to reproduce older figures), and
`experts_hit` counts the distinct experts each MoE layer hits in one prefill step (bench.offline prints ours beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.expert_routing import hits_line, moe_shape, reinit_routing, watch_routing
from bench.gpu_info import gpu_identity
from bench.kernel_kinds import HostTimer, summarize
from bench.shapes import shape, write_config_dir
from bench.workloads import (
    BATCH1_OUT,
    BATCH1_PROMPT,
    PROBE_CTX,
    WORKLOADS,
    EngineSettings,
    Sampling,
    Workload,
    decode_probe,
    prefill_probe,
)


def _preemptions(llm: Any) -> float | None:
    try:
        return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    except Exception:  # metrics off or renamed: reported as not measured, never guessed
        return None


def _params(max_tokens: int, sampling: Sampling) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, detokenize=False, **asdict(sampling))


def _generate(llm: Any, prompts: list[list[int]], max_tokens: int, sampling: Sampling) -> tuple[float, int]:
    inputs = [{"prompt_token_ids": p} for p in prompts]
    t = time.perf_counter()
    outs = llm.generate(inputs, _params(max_tokens, sampling), use_tqdm=False)
    wall = time.perf_counter() - t
    return wall, sum(len(o.outputs[0].token_ids) for o in outs)


def run_workload(llm: Any, w: Workload, vocab: int, sampling: Sampling) -> dict[str, Any]:
    prompts = w.prompts(vocab)
    before = _preemptions(llm)
    wall, n_out = _generate(llm, prompts, w.max_tokens, sampling)
    after = _preemptions(llm)
    n_in = sum(len(p) for p in prompts)
    return {
        "requests": len(prompts),
        "input_tokens": n_in,
        "output_tokens": n_out,
        "wall_s": wall,
        "output_tok_s": n_out / wall,
        "total_tok_s": (n_in + n_out) / wall,
        "preemptions": None if before is None or after is None else after - before,
    }


def batch1(llm: Any, vocab: int, sampling: Sampling) -> dict[str, Any]:
    """ms/token of one request: (time to 1 + BATCH1_OUT tokens - time to 1 token) / BATCH1_OUT, best of a few."""
    prompt = Workload("batch1", 1, BATCH1_PROMPT, 1, seed=4).prompts(vocab)
    _generate(llm, prompt, 1, sampling)  # caches the prompt: every timed run below prefills the same way
    t1 = min(_generate(llm, prompt, 1, sampling)[0] for _ in range(3))
    tn = min(_generate(llm, prompt, 1 + BATCH1_OUT, sampling)[0] for _ in range(2))
    return {"ms_per_token": (tn - t1) / BATCH1_OUT * 1e3, "t_first_s": t1, "t_all_s": tn}


# ---- step profiles (--profile) ---------------------------------------------------------------------
# Host phases of vLLM's engine core step (v1/engine/core.py: step / step_with_batch_queue), timed where they exist.
HOST_PHASES = (
    ("scheduler", "schedule", "schedule"),
    ("model_executor", "execute_model", "execute_model"),
    ("model_executor", "sample_tokens", "sample_tokens"),
    ("scheduler", "update_from_output", "update_from_output"),
)
MAX_DRAIN_STEPS = 10_000


def _engine_core(llm: Any) -> Any:
    """vLLM's in-process EngineCore (LLMEngine.engine_core is an InprocClient holding it), or None."""
    return getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)


@contextmanager
def timed_core(core: Any) -> Iterator[tuple[HostTimer, list[int | None]]]:
    """While inside: the host phases of vLLM's engine core `core` (HOST_PHASES, those it has) timed and counted,
    and the tokens of each step its scheduler schedules recorded; afterwards the core is as it was."""
    host = HostTimer()
    for owner, attr, label in HOST_PHASES if core is not None else ():
        obj = getattr(core, owner, None)
        if obj is not None and callable(getattr(obj, attr, None)):
            host.wrap(obj, attr, label)
    scheduled: list[int | None] = []
    scheduler = getattr(core, "scheduler", None)
    timed_schedule = getattr(scheduler, "schedule", None)
    if callable(timed_schedule):

        def recorded(*args: Any, **kwargs: Any) -> Any:
            out = timed_schedule(*args, **kwargs)
            scheduled.append(getattr(out, "total_num_scheduled_tokens", None))
            return out

        scheduler.schedule = recorded
    try:
        yield host, scheduled
    finally:
        if callable(timed_schedule):
            scheduler.schedule = timed_schedule  # the host timer's wrapper again, which restore() removes
        host.restore()


def profiled(llm: Any, run: Callable[[HostTimer], int]) -> dict[str, Any]:
    """`run(host)` steps the engine and returns how many steps it profiled; it runs under torch.profiler (CUDA
    kernels and copies) with vLLM's host phases timed, synchronised at both ends."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with timed_core(_engine_core(llm)) as (host, scheduled):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            steps = run(host)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
    kernels = [
        (ev.name, ev.time_range.start, ev.time_range.end)
        for ev in prof.events()
        if ev.device_type == torch.autograd.DeviceType.CUDA
    ]
    out = summarize(kernels, steps, wall, host.seconds)
    out["forwards"] = host.calls.get("execute_model")  # model executions launched while profiled
    out["scheduled_tokens"] = scheduled  # per scheduled step: what the profiled forwards computed
    return out


def _add(llm: Any, ids: list[str], prompts: list[list[int]], max_tokens: int, sampling: Sampling) -> None:
    params = _params(max_tokens, sampling)
    try:  # as LLM.generate and our engine's offline runs: no outputs of unfinished requests built every step
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY
    except (ImportError, AttributeError):
        pass
    for rid, prompt in zip(ids, prompts, strict=True):
        llm.llm_engine.add_request(rid, {"prompt_token_ids": prompt}, params)


def _finish(llm: Any, ids: list[str]) -> None:
    """Abort the probe's requests and step until vLLM holds none (the next probe starts from an idle engine); an
    abort that fails only means running them to their end."""
    try:
        llm.llm_engine.abort_request(ids)
    except Exception as e:
        print(f"vllm profile: aborting the probe's requests failed ({type(e).__name__}: {e}); running them out")
    for _ in range(MAX_DRAIN_STEPS):
        if not llm.llm_engine.has_unfinished_requests():
            return
        llm.llm_engine.step()


def profile_prefill(llm: Any, tokens: int, prompt_len: int, vocab: int, sampling: Sampling) -> dict[str, Any]:
    """One step prefilling `tokens` tokens of fresh `prompt_len`-token prompts (ours: offline.prefill_step_ms's
    profiled round 3): stepped until that forward is launched, then synchronised."""
    prompts = prefill_probe(tokens, prompt_len, 3).prompts(vocab)
    ids = [f"profile-prefill-{i}" for i in range(len(prompts))]
    _add(llm, ids, prompts, 1, sampling)

    def run(host: HostTimer) -> int:
        for _ in range(8):  # the first step launches it; a few more only if vLLM scheduled nothing at first
            llm.llm_engine.step()
            if host.calls["execute_model"] or "execute_model" not in host.wrapped:
                break
        return 1

    try:
        return {"tokens": tokens, "prompt_len": prompt_len, **profiled(llm, run)}
    finally:
        _finish(llm, ids)


def profile_decode(
    llm: Any, batch: int, vocab: int, sampling: Sampling, settings: EngineSettings, steps: int = 8
) -> dict[str, Any]:
    """`steps` decode steps of `batch` sequences at ~PROBE_CTX tokens (ours: offline.decode_step_times' profile):
    the prompts prefilled first, a few steps more to reach steady state, then profiled."""
    prompts = decode_probe(batch).prompts(vocab)
    ids = [f"profile-d{batch}-{i}" for i in range(batch)]
    _add(llm, ids, prompts, 2 * 32 + 64, sampling)  # never finishing while measured, as ours
    try:
        prefill_steps = -(-batch * PROBE_CTX // settings.max_num_batched_tokens)
        for _ in range(prefill_steps + 4):
            llm.llm_engine.step()

        def run(host: HostTimer) -> int:
            for _ in range(steps):
                llm.llm_engine.step()
            return steps

        return {"batch": batch, **profiled(llm, run)}
    finally:
        _finish(llm, ids)


def experts_hit(llm: Any, moe: tuple[int, int], vocab: int, sampling: Sampling, settings: EngineSettings) -> dict:
    """Distinct experts per MoE layer in one prefill step of max_num_batched_tokens fresh tokens (prefill_probe's
    prompts; as bench.offline counts ours): past vLLM's CUDA-graph sizes, so its MoE custom op runs eagerly and each
    FusedMoE router's select_experts is seen (bench/expert_routing.watch_routing)."""
    prompts = prefill_probe(settings.max_num_batched_tokens, PROBE_CTX, 5).prompts(vocab)
    ids = [f"experts-hit-{i}" for i in range(len(prompts))]
    _add(llm, ids, prompts, 1, sampling)
    model = llm.apply_model(lambda m: m)[0]  # in process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the module itself
    try:
        with watch_routing(model, moe[0]) as watch:
            for _ in range(8):  # the first step launches it; a few more only if vLLM scheduled nothing at first
                llm.llm_engine.step()
                if watch.rows:
                    break
            return watch.summary(moe[1])
    finally:
        _finish(llm, ids)


def profile_all(
    llm: Any, batches: list[int], vocab: int, sampling: Sampling, settings: EngineSettings
) -> dict[str, Any]:
    """Each probe on its own: one that fails says why in place of its figures."""
    out: dict[str, Any] = {"decode": {}}
    try:
        out["prefill"] = profile_prefill(llm, settings.max_num_batched_tokens, PROBE_CTX, vocab, sampling)
    except Exception as e:  # a profiler or vLLM-internals problem costs this probe only
        out["prefill"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    for b in batches:
        try:
            out["decode"][str(b)] = profile_decode(llm, b, vocab, sampling, settings)
        except Exception as e:
            out["decode"][str(b)] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def peer_command(
    python: str,
    shape_name: str,
    scale: float,
    settings: EngineSettings,
    workloads: str,
    json_out: Path,
    profile_batches: list[int] | None = None,
) -> list[str]:
    """The command bench.offline starts the peer with: our run's shape, scale and settings, nothing else;
    `profile_batches` (our --profile): the decode batches to profile, besides one prefill step."""
    cmd = [
        python, "-m", "bench.peer_vllm", "--shape", shape_name, "--scale", repr(scale), "--workloads", workloads,
        "--settings-json", json.dumps(settings.as_dict()), "--json-out", str(json_out),
    ]  # fmt: skip
    if profile_batches is not None:
        cmd += ["--profile", "--profile-batches", ",".join(map(str, profile_batches))]
    return cmd


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--workloads", default="1,a,b,c", help="comma list of 1 (batch-1 decode), a, b, c")
    p.add_argument("--settings-json", help="EngineSettings as JSON (what bench.offline passes); defaults otherwise")
    p.add_argument("--json-out", required=True)
    p.add_argument("--profile", action="store_true", help="after the workloads: prefill and decode step profiles")
    p.add_argument("--profile-batches", default="1,256", help="the decode batches --profile profiles")
    p.add_argument(
        "--keep-dummy-routing", action="store_true",
        help="MoE shapes: leave vLLM's dummy weights as loaded (every token routed alike: bench/expert_routing.py)",
    )  # fmt: skip
    args = p.parse_args(argv)
    try:
        args.profile_batches = [int(b) for b in args.profile_batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--profile-batches: a comma list of batch sizes, not {args.profile_batches!r}")
    if any(b < 1 for b in args.profile_batches):
        p.error(f"--profile-batches: batch sizes are >= 1, not {args.profile_batches}")
    return args


def kv_bytes_per_token(llm: Any, kv_tokens: int | None) -> float | None:
    """Bytes of KV cache per token slot, all layers, measured from the cache tensors vLLM bound to its attention
    layers (the compilation config's static forward context, layer name -> module with `kv_cache`), not from a
    formula. None where that layout is not found."""
    import torch

    if not kv_tokens:
        return None
    try:
        context = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    except AttributeError:
        return None
    seen: set[tuple[int, int]] = set()
    total = 0
    for layer in context.values():
        caches = getattr(layer, "kv_cache", None)  # a tensor (vLLM 0.26's model runner) or a list of them
        for t in caches if isinstance(caches, list | tuple) else [caches]:
            if isinstance(t, torch.Tensor) and t.numel() and (t.data_ptr(), t.numel()) not in seen:
                seen.add((t.data_ptr(), t.numel()))
                total += t.numel() * t.element_size()
    return total / kv_tokens if total else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    settings = EngineSettings(**json.loads(args.settings_json)) if args.settings_json else EngineSettings()
    sampling = Sampling()
    cfg = shape(args.shape)
    import vllm
    from vllm import LLM

    result: dict[str, Any] = {
        "engine": "vllm",
        "version": vllm.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu_identity": gpu_identity(),
        "shape": args.shape,
        "scale": args.scale,
        "settings": settings.as_dict(),
        "sampling": asdict(sampling),
        "workloads": {},
        "notes": [],
    }
    out = Path(args.json_out)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")

    model_dir = write_config_dir(args.shape, Path(tempfile.mkdtemp(prefix="peer-")))
    quantization = settings.quantization
    if quantization == "fp8-block":  # the checkpoint format, as our engine gets it: vLLM reads it from config.json
        config = json.loads((model_dir / "config.json").read_text())
        # imported here: it pulls our engine's loader package (gguf), which vLLM's site lacks
        from bench.fp8_checkpoint import BLOCK_QUANTIZATION_CONFIG

        config["quantization_config"] = BLOCK_QUANTIZATION_CONFIG
        (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        quantization = None
    t = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        quantization=quantization,
        kv_cache_dtype=settings.kv_cache_dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enable_prefix_caching=settings.enable_prefix_caching,
        block_size=settings.block_size,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
        tensor_parallel_size=settings.tensor_parallel_size,
        disable_log_stats=False,  # the preemption counter
    )
    result["startup_s"] = time.perf_counter() - t
    moe = moe_shape(cfg)
    if moe is not None and not args.keep_dummy_routing:
        try:  # before any measurement: in place, so the compiled model and its CUDA graphs read the new values
            result["routing_reinit"] = llm.apply_model(reinit_routing)[0]
        except Exception as e:
            result["routing_reinit"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            result["notes"].append(
                "routing weights NOT re-initialised: vLLM's dummy weights route every token alike, its MoE figures "
                f"are not comparable ({result['routing_reinit']['error']})"
            )
        print(f"vllm routing re-initialisation: {result['routing_reinit']}", flush=True)
    elif moe is not None:
        result["routing_reinit"] = {"skipped": "--keep-dummy-routing"}
    cache_config = llm.llm_engine.vllm_config.cache_config
    blocks = cache_config.num_gpu_blocks
    # vLLM may change the block size it was given (some MLA backends need 64): count tokens with the one it uses
    result["kv_tokens"] = blocks * cache_config.block_size if blocks else None
    try:  # an optional figure read from vLLM's internals: never worth the start-up just paid
        result["kv_bytes_per_token"] = kv_bytes_per_token(llm, result["kv_tokens"])
    except Exception as e:
        result["kv_bytes_per_token"] = None
        result["notes"].append(f"KV bytes per token: reading vLLM's caches failed ({type(e).__name__}: {e})"[:300])
    if result["kv_bytes_per_token"] is None and not any(n.startswith("KV bytes") for n in result["notes"]):
        result["notes"].append("KV bytes per token: vLLM's per-layer kv_cache tensors were not found")
    save()
    vocab = cfg["vocab_size"]
    if moe is not None:
        try:
            result["experts_hit"] = experts_hit(llm, moe, vocab, sampling, settings)
        except Exception as e:  # an internals mismatch costs this count only
            result["experts_hit"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(hits_line("vllm", result["experts_hit"]), flush=True)
        save()
    for key in args.workloads.split(","):
        try:  # one workload failing (memory, a vLLM error) costs its figures only, said in the notes
            if key == "1":
                result["batch1"] = batch1(llm, vocab, sampling)
            else:
                w = WORKLOADS[key].scaled(args.scale)
                if key == "c":
                    llm.reset_prefix_cache()
                result["workloads"][key] = run_workload(llm, w, vocab, sampling)
            print(f"vllm {key}: {result.get('batch1') if key == '1' else result['workloads'][key]}", flush=True)
        except Exception as e:
            result["notes"].append(f"workload {key}: not measured ({type(e).__name__}: {e})"[:300])
            print(f"vllm {key} failed: {type(e).__name__}: {e}", flush=True)
        save()
    if args.profile:
        result["profile"] = profile_all(llm, args.profile_batches, vocab, sampling, settings)
        save()  # (before printing it: nothing after the probes may cost them)
        print(f"vllm profile: {json.dumps(result['profile'], default=str)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
