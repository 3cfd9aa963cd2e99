"""Structured outputs' per-step host work on the CPU (no GPU needed), with SmolLM2's tokenizer (vocabulary 49,152).

    .venv/bin/python -m bench.structured_host --tokenizer-json .gpu/smollm2-tokenizer.json [--batches 1,64,256]
        [--steps 32] [--threads N] [--engine-batch 64] [--engine-tokens 48] [--out-dir bench/results] [--name SUFFIX]

Part 1, the grammar work of one decode step, per schema and batch B: B matchers, each driven through warm-up + steps
decode steps by a token drawn uniformly (seeded) from its own mask, which is what a random model's greedy pick under
the mask amounts to (bench/structured.py's model is random). Timed per step: the fill of the B masks through
llguidance's thread pool (--threads; 0: the engine's default, one thread per usable CPU) with the rows spread over
their grammar's lineages (the engine's default), through the same pool with every row on one lineage
(KUBELLM_GRAMMAR_ROOTS=1, as before: llguidance's copies of one matcher fill one at a time), and, for the pool's
speed-up, through a pool of one thread on copies of the same matchers (filled first: llguidance would answer a
second fill of one matcher from its cache), the B accepts, and the mask applied to float32 logits [B, 49152] on
the CPU. Schemas: the GPU benchmark's ({"items": [string maxLength 8, ...]} with minItems 200), the same without
maxLength, and a typical agent schema (nested object, enum, integer and number ranges, a bounded array, a pattern,
an optional key).

Part 2, the engine: a 1-layer Llama (hidden 64) with SmolLM2's vocabulary on the CPU, async scheduling on, torch on
one thread (the other core is the grammar's), --engine-batch requests of 128 random prompt tokens, --engine-tokens
output tokens each, greedy, ignore_eos: output tok/s unconstrained, with the GPU benchmark's schema every request on
one lineage (KUBELLM_GRAMMAR_ROOTS=1, as before lineages), over lineages with KUBELLM_GRAMMAR_PREFETCH off (the
default: the engine thread feeds the grammars and fills the masks), and on (a worker does, while the engine thread
schedules and runs the next forward). The CPU runs the forward itself, so this shows the overlap only as far as
two cores allow; the GPU figure is bench/structured.py's.

Part 3 (gil_probe): where the prefetcher's thread waits for the GIL. Part 4 (critical_path_probe): what the grammar
adds to the engine thread's critical path in a host-bound step, per mode (prefetch, batched accepts, switch interval).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.result_files import git_commit
from bench.structured import AGENT_CALL_SCHEMA, PROMPT_LEN, SCHEMA, SMOLLM2_VOCAB, parse_batches, read_tokenizer_json

SCHEMA_NO_MAXLENGTH = {
    **SCHEMA,
    "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 200}},
}
AGENT_SCHEMA = AGENT_CALL_SCHEMA  # what a tool-using agent typically asks for
SCHEMAS = {
    "bench (maxLength 8, minItems 200)": SCHEMA,
    "bench without maxLength": SCHEMA_NO_MAXLENGTH,
    "typical agent schema": AGENT_SCHEMA,
}
ENGINE_SCHEMAS = {"bench": SCHEMA, "nomax": SCHEMA_NO_MAXLENGTH}
EOS_ID = 2
SWITCH_MS, SWITCH_MS_LOW = 0.5, 0.1  # part 2's GIL switch intervals (KUBELLM_GRAMMAR_SWITCH_INTERVAL_MS)
WARMUP_STEPS = 8


def _ms(seconds: list[float]) -> float:
    return 1e3 * statistics.mean(seconds) if seconds else float("nan")


def grammar_step(
    manager: Any, before: Any, single: Any, schema: dict[str, Any], batch: int, steps: int, seed: int
) -> dict:
    """Drive `batch` matchers of `schema` for WARMUP_STEPS + `steps` steps; mean ms per step of each part. `manager`
    spreads the rows over lineages (the engine's default), `before` keeps one lineage per grammar
    (KUBELLM_GRAMMAR_ROOTS=1, as before); both are driven by the same tokens."""
    import torch

    from kubellm.engine.sampling_params import StructuredOutputsParams
    from kubellm.engine.token_bitmask import apply_token_bitmask, bitmask_words

    spec = StructuredOutputsParams(json=schema)
    matchers = [manager.new_matcher(spec) for _ in range(batch)]
    lineages = manager.compile(spec).settle(60.0)  # built before the first fill, as a running engine's are
    same = [before.new_matcher(spec) for _ in range(batch)]
    rng = np.random.default_rng(seed)
    logits = torch.zeros(batch, SMOLLM2_VOCAB)
    fill_pool, fill_before, fill_one, accept, apply, allowed = [], [], [], [], [], []
    for step in range(WARMUP_STEPS + steps):
        # One thread first, on copies of the matchers (a copy filled after the original would find its mask in
        # llguidance's cache), then the pool on the matchers themselves: all fill the same states.
        copies = [m.copy() for m in matchers]
        words = np.full((batch, bitmask_words(SMOLLM2_VOCAB)), -1, np.int32)
        t0 = time.perf_counter()
        single.fill_bitmask([(c, j) for j, c in enumerate(copies)], words)
        one_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        before.bitmask(same)
        before_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        mask = manager.bitmask(matchers)
        t1 = time.perf_counter()
        apply_token_bitmask(logits, mask)
        t2 = time.perf_counter()
        bits = np.unpackbits(mask.words.view(np.uint8), axis=1, count=SMOLLM2_VOCAB, bitorder="little")
        tokens = []
        for j in range(batch):
            ids = np.flatnonzero(bits[j])
            tokens.append(int(ids[rng.integers(len(ids))]) if len(ids) else EOS_ID)
        t3 = time.perf_counter()
        for m, t in zip(matchers, tokens, strict=True):
            if t != EOS_ID and not m.is_terminated() and not m.accept_token(t):
                raise RuntimeError(f"the grammar refused token {t} drawn from its own mask")
        t4 = time.perf_counter()
        for m, t in zip(same, tokens, strict=True):
            if t != EOS_ID and not m.is_terminated() and not m.accept_token(t):
                raise RuntimeError(f"a one-lineage matcher refused token {t} that its twin accepted")
        logits.zero_()
        if step < WARMUP_STEPS:
            continue
        fill_pool.append(t1 - t0)
        fill_before.append(before_s)
        fill_one.append(one_s)
        apply.append(t2 - t1)
        accept.append(t4 - t3)
        allowed.append(float(bits.sum()) / batch)
    pool, one, one_lineage = _ms(fill_pool), _ms(fill_one), _ms(fill_before)
    return {
        "batch": batch,
        "lineages": lineages,
        "fill_ms": pool,
        "fill_ms_per_row": pool / batch,
        "fill_one_thread_ms": one,
        "parallel_speedup": one / pool if pool > 0 else None,
        "fill_one_lineage_ms": one_lineage,
        "one_lineage_speedup": one / one_lineage if one_lineage > 0 else None,
        "accept_ms": _ms(accept),
        "apply_ms": _ms(apply),
        "host_ms": pool + _ms(accept) + _ms(apply),
        "mean_allowed_tokens": statistics.mean(allowed),
    }


def cpu_facts() -> dict[str, Any]:
    """What decides how many threads a mask fill gets on this host."""
    from kubellm.engine.model_runner import available_cpus

    try:
        quota = Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    except OSError:
        quota = "unreadable"
    return {
        "os_cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cgroup_cpu_max": quota,
        "usable_cpus": available_cpus(),
        "RAYON_NUM_THREADS": os.environ.get("RAYON_NUM_THREADS"),
    }


def fill_probe(manager: Any, rows: int = 64, repeats: int = 5) -> dict[str, Any]:
    """The pool's speed-up on the costliest state of the benchmark schema (a string just opened): `rows` matchers
    made as the engine makes them (manager.new_matcher), advanced over the opening, then copied afresh for each fill
    (a matcher would answer a second fill from its cache): through one thread, then through the manager's pool;
    best of `repeats`."""
    import llguidance

    from kubellm.engine.sampling_params import StructuredOutputsParams
    from kubellm.engine.token_bitmask import bitmask_words

    backend = manager.backend
    spec = StructuredOutputsParams(json=SCHEMA)
    opening = backend.tokenizer.tokenize_str('{"items":["')
    matchers = [manager.new_matcher(spec) for _ in range(rows)]
    manager.compile(spec).settle(60.0)
    for m in matchers:
        for t in opening:
            if not m.accept_token(t):
                raise RuntimeError("the benchmark schema refused its own opening")
    one = llguidance.LLExecutor(1)
    words = np.full((rows, bitmask_words(SMOLLM2_VOCAB)), -1, np.int32)
    times: dict[str, list[float]] = {"one": [], "pool": [], "pool_one_root": []}
    for _ in range(repeats):
        for name in times:
            # pool_one_root: every row a copy of the first (KUBELLM_GRAMMAR_ROOTS=1: one lineage)
            copies = [(matchers[0] if name == "pool_one_root" else m).copy() for m in matchers]
            t0 = time.perf_counter()
            if name == "one":
                one.unsafe_compute_mask_ptr([(c.matcher, j) for j, c in enumerate(copies)], words.ctypes.data,
                                            words.shape[1] * 4, rows)  # fmt: skip
            else:
                backend.fill_bitmask([(c, j) for j, c in enumerate(copies)], words)
            times[name].append(time.perf_counter() - t0)
    one_ms, pool_ms, lineage_ms = (1e3 * min(times[k]) for k in ("one", "pool", "pool_one_root"))
    return {
        "rows": rows, "pool_threads": backend.num_threads,
        "roots": len({id(m.lineage) for m in matchers}),  # lineages the rows are spread over
        "one_thread_ms": one_ms, "pool_ms": pool_ms, "speedup": one_ms / pool_ms if pool_ms > 0 else None,
        "pool_one_root_ms": lineage_ms, "speedup_one_root": one_ms / lineage_ms if lineage_ms > 0 else None,
        **cpu_facts(),
    }  # fmt: skip


def engine_runs(tokenizer_json: str, batch: int, tokens: int, schema: dict[str, Any] = SCHEMA) -> list[dict[str, Any]]:
    """Part 2: tok/s of the tiny CPU engine, unconstrained and constrained with the prefetcher off and on."""
    import dataclasses

    import torch

    from kubellm.engine.config import EngineConfig
    from kubellm.engine.llm_engine import LLMEngine
    from kubellm.engine.outputs import OutputKind
    from kubellm.engine.random_model import SMOLLM2_135M, random_loaded_model
    from kubellm.engine.sampling_params import SamplingParams, StructuredOutputsParams
    from kubellm.prompt import TokenizerInfo

    shape = dataclasses.replace(
        SMOLLM2_135M, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    )  # fmt: skip
    loaded = random_loaded_model(shape, torch.float32, "cpu", seed=0, name="tiny-smollm2-vocab")
    loaded.tokenizer_info = TokenizerInfo(
        tokenizer_json=tokenizer_json, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    rows = []
    default_interval = sys.getswitchinterval()
    for label, constrained, prefetch, roots, interval_ms, batched in (
        ("unconstrained", False, True, 0, 0.0, False),
        (f"unconstrained, GIL switch interval {SWITCH_MS} ms", False, True, 0, SWITCH_MS, False),
        ("JSON, one lineage, prefetch off (before lineages)", True, False, 1, 0.0, False),
        ("JSON, prefetch off (the default)", True, False, 0, 0.0, False),
        ("JSON, prefetch off, batched accepts", True, False, 0, 0.0, True),
        ("JSON, prefetch on, Python's switch interval (5 ms)", True, True, 0, 5.0, False),
        (f"JSON, prefetch on (the default GIL switch interval, {SWITCH_MS} ms)", True, True, 0, SWITCH_MS, False),
        (f"JSON, prefetch on, GIL switch interval {SWITCH_MS_LOW} ms", True, True, 0, SWITCH_MS_LOW, False),
        (f"JSON, prefetch on, {SWITCH_MS} ms, batched accepts", True, True, 0, SWITCH_MS, True),
    ):
        config = EngineConfig(
            model="tiny-smollm2-vocab", device="cpu", max_num_seqs=batch, generation_config="vllm",
            async_scheduling=True, grammar_prefetch=prefetch, num_threads=1, max_model_len=1024,
            grammar_roots=roots, grammar_switch_interval_ms=interval_ms, grammar_batch_accept=batched,
        )  # fmt: skip
        if not constrained and interval_ms:  # no prefetcher runs to set it: the same interval, set here
            sys.setswitchinterval(interval_ms / 1e3)
        engine = LLMEngine(config, loaded=loaded)
        engine.output_kind = OutputKind.FINAL_ONLY
        spec = StructuredOutputsParams(json=schema) if constrained else None
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, structured_outputs=spec)
        rng = random.Random(batch)
        for warm in (True, False):
            n = 4 if warm else batch
            for i in range(n):
                prompt = [rng.randrange(100, SMOLLM2_VOCAB) for _ in range(PROMPT_LEN)]
                engine.add_request(f"{'w' if warm else 'r'}{i}", prompt, params)
            before = engine.structured_outputs.fill_stats.snapshot()
            start = time.perf_counter()
            outs = []
            while engine.has_unfinished_requests():
                outs += [o for o in engine.step() if o.finished]
            wall = time.perf_counter() - start
        after = engine.structured_outputs.fill_stats.snapshot()
        engine.close()
        sys.setswitchinterval(default_interval)
        worker_steps = max(1, after.worker_steps - before.worker_steps)
        out_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        if constrained and not all(o.outputs[0].text.startswith('{"items":["') for o in outs):
            raise RuntimeError(f"a constrained answer broke the schema: {outs[0].outputs[0].text[:80]!r}")
        steps = max(1, out_tokens // batch)
        rows.append({
            "run": label, "output_tok_s": out_tokens / wall, "wall_s": wall, "steps": steps,
            "fill_ms_per_step": 1e3 * (after.seconds - before.seconds) / steps,
            "engine_wait_ms_per_step": 1e3 * (after.waited_seconds - before.waited_seconds) / steps,
            "prefetched_rows": after.prefetched_rows - before.prefetched_rows,
            "filled_rows": after.rows - before.rows,
            "worker_tokens_ms": 1e3 * (after.worker_tokens_seconds - before.worker_tokens_seconds) / worker_steps,
            "worker_accept_ms": 1e3 * (after.worker_accept_seconds - before.worker_accept_seconds) / worker_steps,
            "worker_fill_ms": 1e3 * (after.worker_fill_seconds - before.worker_fill_seconds) / worker_steps,
        })  # fmt: skip
        print(f"engine {label}: {rows[-1]['output_tok_s']:,.0f} tok/s", flush=True)
    return rows


GIL_INTERVALS_MS = (5.0, 0.5, 0.1)  # Python's default, then KUBELLM_GRAMMAR_SWITCH_INTERVAL_MS candidates


def gil_probe(manager: Any, schema: dict[str, Any], batch: int, steps: int = 24) -> list[dict[str, Any]]:
    """Part 3, where the prefetcher's thread waits: `batch` matchers advanced by the prefetcher's own step
    (advance_and_fill on a worker thread: accepts, then llguidance's fill with the GIL released) while the calling
    thread either waits for it (idle, as the engine thread blocked on the GPU) or runs Python until it is done
    (busy, as the engine thread scheduling the next batch and holding the GIL), per GIL switch interval. Mean ms per
    step: the step's wall time seen by the caller and the worker's phases (GIL waits included)."""
    from concurrent.futures import ThreadPoolExecutor

    from kubellm.engine.sampling_params import StructuredOutputsParams
    from kubellm.engine.structured_output import GrammarRow, advance_and_fill

    spec = StructuredOutputsParams(json=schema)
    default = sys.getswitchinterval()
    rows = []
    pool = ThreadPoolExecutor(1, thread_name_prefix="gil-probe")
    try:
        for interval_ms in GIL_INTERVALS_MS:
            for busy in (False, True):
                matchers = [manager.new_matcher(spec) for _ in range(batch)]
                manager.compile(spec).settle(60.0)
                words = manager.fill(matchers)
                rng = np.random.default_rng(batch)
                grammar_rows = [GrammarRow(j, m, lambda: False, (EOS_ID,)) for j, m in enumerate(matchers)]
                sys.setswitchinterval(interval_ms / 1e3)
                walls, spins = [], 0
                before = manager.fill_stats.snapshot()
                for step in range(WARMUP_STEPS + steps):
                    bits = np.unpackbits(words.view(np.uint8), axis=1, count=SMOLLM2_VOCAB, bitorder="little")
                    tokens = [int(rng.choice(np.flatnonzero(b))) for b in bits]
                    if step == WARMUP_STEPS:
                        before = manager.fill_stats.snapshot()
                    t0 = time.perf_counter()
                    fut = pool.submit(advance_and_fill, manager, grammar_rows, lambda t=tokens: t)
                    if busy:
                        while not fut.done():  # pure Python: holds the GIL but for the interpreter's switches
                            spins += 1
                    done = fut.result()
                    walls.append(time.perf_counter() - t0)
                    words = done.words
                    if len(done.matchers) != batch:
                        raise RuntimeError("a probe grammar ended early")
                sys.setswitchinterval(default)
                after = manager.fill_stats.snapshot()
                n = max(1, after.worker_steps - before.worker_steps)
                rows.append({
                    "switch_interval_ms": interval_ms, "caller": "busy" if busy else "idle", "batch": batch,
                    "step_ms": _ms(walls[WARMUP_STEPS:]),
                    "tokens_ms": 1e3 * (after.worker_tokens_seconds - before.worker_tokens_seconds) / n,
                    "accept_ms": 1e3 * (after.worker_accept_seconds - before.worker_accept_seconds) / n,
                    "fill_ms": 1e3 * (after.worker_fill_seconds - before.worker_fill_seconds) / n,
                })  # fmt: skip
                print(f"gil probe {rows[-1]}", flush=True)
    finally:
        sys.setswitchinterval(default)
        pool.shutdown()
    return rows


def _python_work(units: int) -> int:
    """Pure Python standing in for the engine thread's own work of a step (scheduling, queueing the forward,
    applying the tokens): holds the GIL but for the interpreter's switches."""
    acc = 0
    for i in range(units):
        acc = (acc + i * 7) % 1000003
    return acc


def _units_for(ms: float) -> int:
    """How many _python_work units take `ms` on this thread alone (best of 5)."""
    probe = 200_000
    best = min(_timed(_python_work, probe) for _ in range(5))
    return max(1, int(probe * ms / 1e3 / best))


def _timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


CRITICAL_MODES: tuple[tuple[str, bool | str, bool, float], ...] = (  # (label, prefetch, batched, GIL interval ms)
    ("prefetch off, accepts row by row (the default)", False, False, 5.0),
    ("prefetch off, batched accepts", False, True, 5.0),
    ("prefetch on, accepts row by row, 5 ms", True, False, 5.0),
    ("prefetch on, accepts row by row, 0.5 ms (the session-9 state)", True, False, 0.5),
    ("prefetch on, batched accepts, 5 ms", True, True, 5.0),
    ("prefetch on, batched accepts, 0.5 ms", True, True, 0.5),
    # Not an engine mode (yet): the engine thread advances the grammars (batched) when the tokens arrive, a worker
    # only fills (one llguidance call: the GIL taken twice, to start and to return), overlapping the Python work.
    ("split: engine thread accepts (batched), worker only fills, 0.5 ms", "split", True, 0.5),
)


def critical_path_probe(
    tokenizer_json: str, schema: dict[str, Any], batch: int, work_ms: float, steps: int = 40, threads: int = 1
) -> list[dict[str, Any]]:
    """Part 4, the engine thread's critical path in a host-bound step: per step the engine thread runs `work_ms` of
    Python (its own scheduling and bookkeeping, calibrated alone first) and then needs the next masks of `batch`
    rows; the step's tokens are known at its start (host-bound: the GPU finished long ago). Prefetch off: the Python
    work, then the accepts and the fill on the engine thread. Prefetch on: the MaskPrefetcher's worker advances the
    grammars and fills while the engine thread runs its Python, then the engine takes the result. Batched accepts:
    KUBELLM_GRAMMAR_BATCH_ACCEPT. Split (no engine mode yet): the engine thread advances the grammars (batched) and
    a worker only fills, overlapping the Python work (that design's best case: in the engine the tokens are read back
    after the next forward is queued, so less of the step would overlap). The fill pool has `threads` threads (1 by
    default: the engine thread keeps a core of its own; the CPU count: it competes for one, as with the engine's
    default pool of one thread per CPU). The modes take their steps in turn (each its
    own matchers), so the host's noise falls on all alike; the "none" mode is the Python work alone. Per step
    (median ms): the step's wall time, its excess over "none" (what the grammar adds to the critical path), the
    Python work's own wall time (its excess: the GIL taken by the worker), and the engine thread's wait for the
    prefetcher (or the fill)."""
    from concurrent.futures import ThreadPoolExecutor

    from kubellm.engine.sampling_params import StructuredOutputsParams
    from kubellm.engine.structured_output import GrammarRow, MaskPrefetcher, llguidance_manager

    manager = llguidance_manager(tokenizer_json, SMOLLM2_VOCAB, [EOS_ID], num_threads=threads)
    spec = StructuredOutputsParams(json=schema)
    units = _units_for(work_ms)
    default = sys.getswitchinterval()
    modes: list[dict[str, Any]] = [{"label": "none (the Python work alone)", "interval": 5.0, "grammar": False}]
    for label, prefetch, batched, interval_ms in CRITICAL_MODES:
        matchers = [manager.new_matcher(spec) for _ in range(batch)]
        modes.append({
            "label": label, "interval": interval_ms, "grammar": True, "prefetch": prefetch, "batched": batched,
            "matchers": matchers, "rows": [GrammarRow(j, m, lambda: False, (EOS_ID,)) for j, m in enumerate(matchers)],
            "prefetcher": MaskPrefetcher(manager, None),
            "pool": ThreadPoolExecutor(1, thread_name_prefix="probe-fill"),
            "rng": np.random.default_rng(batch), "walls": [], "works": [], "waits": [],
        })  # fmt: skip
    modes[0].update(walls=[], works=[], waits=[])
    manager.compile(spec).settle(60.0)
    for mode in modes[1:]:
        mode["words"] = manager.fill(mode["matchers"])
    try:
        for step in range(WARMUP_STEPS + steps):
            for mode in modes:
                sys.setswitchinterval(mode["interval"] / 1e3)
                tokens: list[int] = []
                if mode["grammar"]:
                    bits = np.unpackbits(mode["words"].view(np.uint8), axis=1, count=SMOLLM2_VOCAB, bitorder="little")
                    tokens = [int(mode["rng"].choice(np.flatnonzero(b))) for b in bits]
                t0 = time.perf_counter()
                if not mode["grammar"]:
                    _python_work(units)
                    t1 = t2 = time.perf_counter()
                elif mode["prefetch"] == "split":
                    pairs = list(zip(mode["matchers"], tokens, strict=True))
                    if not all(ok and not ended for ok, ended in manager.advance(pairs, True)):
                        raise RuntimeError("a probe grammar refused its token or ended early")
                    future = mode["pool"].submit(manager.fill, mode["matchers"])
                    _python_work(units)
                    t1 = time.perf_counter()
                    mode["words"] = future.result()
                    t2 = time.perf_counter()
                elif mode["prefetch"]:
                    future = mode["prefetcher"].submit(mode["rows"], lambda t=tokens: t, mode["batched"])
                    _python_work(units)
                    t1 = time.perf_counter()
                    result = mode["prefetcher"].take(future)
                    t2 = time.perf_counter()
                    if len(result.matchers) != batch:
                        raise RuntimeError("a probe grammar ended early")
                    mode["words"] = result.words
                else:
                    _python_work(units)
                    t1 = t2 = time.perf_counter()
                    pairs = list(zip(mode["matchers"], tokens, strict=True))
                    if not all(ok and not ended for ok, ended in manager.advance(pairs, mode["batched"])):
                        raise RuntimeError("a probe grammar refused its token or ended early")
                    mode["words"] = manager.fill(mode["matchers"])
                end = time.perf_counter()
                if step >= WARMUP_STEPS:
                    mode["walls"].append(end - t0)
                    mode["works"].append(t1 - t0)
                    mode["waits"].append(t2 - t1)
    finally:
        sys.setswitchinterval(default)
        for mode in modes[1:]:
            mode["prefetcher"].close()
            mode["pool"].shutdown()
        manager.close()
    base = 1e3 * statistics.median(modes[0]["walls"])
    rows = []
    for mode in modes:
        step_ms = 1e3 * statistics.median(mode["walls"])
        rows.append({
            "mode": mode["label"], "batch": batch, "switch_interval_ms": mode["interval"], "work_alone_ms": base,
            "fill_threads": threads,
            "step_ms": step_ms, "excess_ms": step_ms - base, "work_ms": 1e3 * statistics.median(mode["works"]),
            "wait_ms": 1e3 * statistics.median(mode["waits"]),
        })  # fmt: skip
        print(f"critical path {rows[-1]}", flush=True)
    return rows


def baseline_module(ref: str) -> Any:
    """engine/structured_output.py as it is at git `ref`, loaded beside this checkout's as its own module (its
    imports resolve to this checkout's modules), so part 5 runs both in one process, step by step in turn."""
    import importlib.util
    import subprocess
    import tempfile

    try:
        source = subprocess.run(
            ["git", "show", f"{ref}:engine/structured_output.py"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ValueError(f"cannot read engine/structured_output.py at {ref!r}: {e}") from None
    path = Path(tempfile.mkdtemp(prefix="kubellm-baseline-")) / "structured_output.py"
    path.write_text(source)
    name = "kubellm.engine._baseline_structured_output"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up while the class is built)
    spec.loader.exec_module(module)
    return module


class _HostBuffers:
    """PinnedBitmaskBuffers' turn-taking without CUDA: two numpy buffers; the "pinned tensor" handed back is the
    view itself (on a GPU host it is the pinned tensor of the same memory, copied to the device as is)."""

    def __init__(self, words: int):
        self.words = words
        self._buffers = [np.empty((0, words), np.int32)] * 2
        self._next = 0

    def take(self, rows: int) -> tuple[np.ndarray, Any]:
        slot, self._next = self._next, 1 - self._next
        if self._buffers[slot].shape[0] < rows:
            self._buffers[slot] = np.empty((rows, self.words), np.int32)
        view = self._buffers[slot][:rows]
        return view, view


def _grammar_rows(mod: Any, matchers: list[Any], reqs: list[Any]) -> list[Any]:
    """The prefetcher's rows as LLMEngine._prefetch makes them (the finished check reads the request's status)."""
    return [mod.GrammarRow(j, m, (lambda r=r: r.status.is_finished), frozenset((EOS_ID,)))
            for j, (m, r) in enumerate(zip(matchers, reqs, strict=True))]  # fmt: skip


# Part 5's modes: (label, implementation: "ref" or "this", batched accepts, engine path, step reuse, direct masks).
# All prefetch on at a 0.5 ms GIL switch interval. "worker only" is part 4's mode; the engine path adds the engine
# thread's own grammar work of a step as LLMEngine does it: the prefetcher's rows, submit, take, the step's bitmask
# (into the two host buffers, as into the pinned ones on a GPU).
COMPARE_MODES: tuple[tuple[str, str, bool, bool, bool, bool], ...] = (
    ("worker only, batched accepts", "ref", True, False, False, False),
    ("worker only, batched accepts, step reuse off", "this", True, False, False, False),
    ("worker only, batched accepts, step reuse (default)", "this", True, False, True, False),
    ("engine path, batched accepts", "ref", True, True, False, False),
    ("engine path, batched accepts, step reuse off", "this", True, True, False, False),
    ("engine path, batched accepts, step reuse (default)", "this", True, True, True, False),
    ("engine path, batched accepts, step reuse + direct masks", "this", True, True, True, True),
    ("engine path, accepts row by row", "ref", False, True, False, False),
    ("engine path, accepts row by row, step reuse (default)", "this", False, True, True, False),
)


def compare_probe(
    tokenizer_json: str, schema: dict[str, Any], batch: int, work_ms: float, ref: str, steps: int = 40,
    threads: int = 1, interval_ms: float = 0.5,
) -> list[dict[str, Any]]:  # fmt: skip
    """Part 5, part 4 paired against git `ref`'s engine/structured_output.py in the same process: the grammar's
    share of a host-bound step under the prefetcher (batched accepts or row by row, a 0.5 ms GIL switch interval),
    for `ref`'s code and this checkout's, the modes taking their steps in turn (each its own matchers, all drawn by
    the same seeded tokens), so the host's noise falls on all alike. Worker only: part 4's measure (the worker's
    accepts and fill beside the engine thread's Python work). Engine path: plus the engine thread's own grammar
    work of a step, as LLMEngine does it (the prefetcher's rows, submit, take, the step's bitmask). Per step
    (median ms): its excess over the Python work alone (what the grammar adds to the critical path), as the
    difference of the medians and as the median of each step's difference from the Python work alone's step taken
    just before it (paired: steadier when other jobs share the cores)."""
    from kubellm.engine import structured_output as this
    from kubellm.engine.request import RequestStatus
    from kubellm.engine.sampling_params import StructuredOutputsParams
    from kubellm.engine.token_bitmask import bitmask_words

    class _Req:  # what the engine's rows check per step: whether the request finished meanwhile
        status = RequestStatus.RUNNING

    impls = {"ref": baseline_module(ref), "this": this}
    managers = {k: m.llguidance_manager(tokenizer_json, SMOLLM2_VOCAB, [EOS_ID], num_threads=threads)
                for k, m in impls.items()}  # fmt: skip
    spec = StructuredOutputsParams(json=schema)
    units = _units_for(work_ms)
    width = bitmask_words(SMOLLM2_VOCAB)
    default = sys.getswitchinterval()
    none: dict[str, Any] = {"label": "none (the Python work alone)", "impl": "-", "walls": [], "cpu": [], "runq": []}
    modes: list[dict[str, Any]] = [none]
    for label, impl, batched, engine_path, reuse, direct in COMPARE_MODES:
        mod, manager = impls[impl], managers[impl]
        matchers = [manager.new_matcher(spec) for _ in range(batch)]
        reqs = [_Req() for _ in range(batch)]
        modes.append({
            "label": label, "impl": impl, "mod": mod, "manager": manager, "batched": batched,
            "engine_path": engine_path, "reuse": reuse, "direct": direct, "matchers": matchers, "reqs": reqs,
            "rows": _grammar_rows(mod, matchers, reqs),
            "prefetcher": mod.MaskPrefetcher(manager, None), "buffers": _HostBuffers(width), "previous": None,
            "walls": [], "cpu": [], "runq": [],
        })  # fmt: skip
    for manager in managers.values():
        manager.compile(spec).settle(60.0)
    for mode in modes[1:]:
        mode["words"] = mode["manager"].fill(mode["matchers"])
    try:
        for step in range(WARMUP_STEPS + steps):
            picks = np.random.default_rng(step).random(batch)  # (one draw per row, the same for every mode)
            for mode in modes:
                sys.setswitchinterval((interval_ms if mode is not none else 5.0) / 1e3)
                tokens: list[int] = []
                if mode is not none:
                    bits = np.unpackbits(mode["words"].view(np.uint8), axis=1, count=SMOLLM2_VOCAB, bitorder="little")
                    for j in range(batch):
                        ids = np.flatnonzero(bits[j])
                        tokens.append(int(ids[int(picks[j] * len(ids))]))
                run0, cpu0 = _runqueue_s(), time.thread_time()
                t0 = time.perf_counter()
                if mode is none:
                    _python_work(units)
                else:
                    mod, prefetcher = mode["mod"], mode["prefetcher"]
                    if mode["engine_path"] and not mode["reuse"]:  # LLMEngine._prefetch before step reuse
                        rows = _grammar_rows(mod, mode["matchers"], mode["reqs"])
                    else:
                        rows = mode["rows"]
                    extra: dict[str, Any] = {}
                    if mode["reuse"]:
                        extra = {"reuse": True, "previous": mode["previous"],
                                 "out": mode["buffers"].take if mode["direct"] else None,
                                 "finished": lambda q=mode["reqs"]: [r.status.is_finished for r in q]}  # fmt: skip
                    future = prefetcher.submit(rows, lambda t=tokens: t, mode["batched"], **extra)
                    _python_work(units)
                    result = prefetcher.take(future)
                    if len(result.matchers) != batch:
                        raise RuntimeError("a probe grammar ended early")
                    mode["previous"] = result if mode["reuse"] else None
                    if mode["engine_path"]:
                        mode["words"] = mode["manager"].bitmask(mode["matchers"], result, mode["buffers"].take).words
                    else:
                        mode["words"] = result.words
                if step >= WARMUP_STEPS:
                    mode["walls"].append(time.perf_counter() - t0)
                    mode["cpu"].append(time.thread_time() - cpu0)
                    mode["runq"].append(_runqueue_s() - run0)
    finally:
        sys.setswitchinterval(default)
        for mode in modes[1:]:
            mode["prefetcher"].close()
        for manager in managers.values():
            manager.close()
    base = 1e3 * statistics.median(none["walls"])
    rows_out = []
    for mode in modes:
        step_ms = 1e3 * statistics.median(mode["walls"])
        cpu_ms, runq_ms = 1e3 * statistics.mean(mode["cpu"]), 1e3 * statistics.mean(mode["runq"])
        rows_out.append({"mode": mode["label"], "code": ref if mode["impl"] == "ref" else mode["impl"],
                         "batch": batch, "fill_threads": threads, "work_alone_ms": base, "step_ms": step_ms,
                         "excess_ms": step_ms - base, "mean_step_ms": 1e3 * statistics.mean(mode["walls"]),
                         "paired_excess_ms": 1e3 * statistics.median(
                             [w - n for w, n in zip(mode["walls"], none["walls"], strict=True)]),
                         "cpu_ms": cpu_ms, "runqueue_ms": runq_ms})  # fmt: skip
        print(f"compare {rows_out[-1]}", flush=True)
    return rows_out


def _runqueue_s() -> float:
    """Seconds this thread has waited, runnable, for a CPU (Linux schedstat; 0 elsewhere): the step's wall time less
    its CPU time and this is time spent asleep, here waiting for the GIL."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def compare_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    lines = ["", " ".join((compare_probe.__doc__ or "").split()), "",
             "| schema | rows | fill threads | code | mode | step of the Python work alone ms | step ms | "
             "step's excess ms (grammar on the critical path) | paired excess ms | engine thread per step (means), "
             "ms: wall / on CPU / runnable, waiting for a CPU / asleep (the GIL) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        wall, cpu, runq = r["mean_step_ms"], r["cpu_ms"], r["runqueue_ms"]
        lines.append(
            f"| {r['schema']} | {r['batch']} | {r['fill_threads']} | {r['code']} | {r['mode']} | "
            f"{r['work_alone_ms']:.2f} | {r['step_ms']:.2f} | {r['excess_ms']:.2f} | {r['paired_excess_ms']:.2f} | "
            f"{wall:.2f} / {cpu:.2f} / {runq:.2f} / {wall - cpu - runq:.2f} |"
        )
    return lines


def critical_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    lines = ["", " ".join((critical_path_probe.__doc__ or "").split()), "",
             "| schema | rows | fill threads | mode | step of the Python work alone ms | step ms | step's excess ms "
             "(grammar on the critical path) | Python work's wall ms (GIL taken by the worker) | wait for the "
             "prefetcher ms |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['schema']} | {r['batch']} | {r.get('fill_threads', 1)} | {r['mode']} | {r['work_alone_ms']:.2f} "
            f"| {r['step_ms']:.2f} | {r['excess_ms']:.2f} | {r['work_ms']:.2f} | {r['wait_ms']:.2f} |"
        )
    return lines


BOUNDED_SLICE = r'[^"\\\x00-\x1F\x7F]{1,%d}'  # llguidance's own JSON-string slices, of other lengths
SLICE_SETS = {"llguidance's default": (), "+ lengths 1-8": tuple(range(1, 9)), "+ lengths 2, 4, 8": (2, 4, 8)}


def slice_probe(tokenizer_json: str, steps: int = 400, repeats: int = 3) -> list[dict[str, Any]]:
    """Can a bounded string's mask be had faster while enforcing exactly the same constraint? llguidance answers a
    free JSON string from precomputed token sets ("slices": a slice applies when the lexer's state provably accepts
    every token in it) and walks the whole token trie otherwise; its default JSON slices are strings of 1-10, 1-30
    and any length, so inside `maxLength: 8` none applies. Per schema: one seeded trace of tokens drawn from the
    masks, replayed through tokenizers with the default slices and with extra bounded-length ones (masks checked
    identical at every step); best of `repeats`, ms per mask on one thread."""
    import llguidance

    from kubellm.engine.structured_output import llguidance_tokenizer_json

    base = llguidance.LLTokenizer(llguidance_tokenizer_json(tokenizer_json), n_vocab=SMOLLM2_VOCAB, eos_token=[EOS_ID])
    default = llguidance.LLTokenizer.json_slices()
    tokenizers = {name: base.with_slices(default + [BOUNDED_SLICE % n for n in extra]) if extra else base
                  for name, extra in SLICE_SETS.items()}  # fmt: skip
    width = (SMOLLM2_VOCAB + 31) // 32
    rows = []
    for max_length in (8, 32):
        items = {"type": "array", "items": {"type": "string", "maxLength": max_length}, "minItems": 200}
        schema = {**SCHEMA, "properties": {"items": items}}
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        rng = np.random.default_rng(max_length)
        m = llguidance.LLMatcher(base, grammar, log_level=0)
        trace = []
        for _ in range(steps):
            words = np.zeros(width, np.int32)
            m.unsafe_compute_mask_ptr(words.ctypes.data, width * 4)
            ids = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:SMOLLM2_VOCAB])
            if not len(ids) or m.is_stopped():
                break
            trace.append(int(ids[rng.integers(len(ids))]))
            m.consume_token(trace[-1])
        best: dict[str, float] = {}
        reference: list[np.ndarray] = []
        for _ in range(repeats):
            for name, tok in tokenizers.items():
                m = llguidance.LLMatcher(tok, grammar, log_level=0)
                seconds, masks = 0.0, []
                for t in trace:
                    words = np.zeros(width, np.int32)
                    t0 = time.perf_counter()
                    m.unsafe_compute_mask_ptr(words.ctypes.data, width * 4)
                    seconds += time.perf_counter() - t0
                    masks.append(words)
                    m.consume_token(t)
                if not reference:
                    reference = masks
                elif not all(np.array_equal(a, b) for a, b in zip(reference, masks, strict=True)):
                    raise RuntimeError(f"slices {name!r} changed a mask: they must not")
                best[name] = min(best.get(name, np.inf), 1e3 * seconds / len(trace))
        rows.append({"max_length": max_length, "masks": len(trace), "ms_per_mask": best})
    return rows


def slice_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    names = list(SLICE_SETS)
    lines = ["", " ".join((slice_probe.__doc__ or "").split()), "",
             "| string bound | masks | " + " | ".join(f"{n} ms/mask" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]  # fmt: skip
    for r in rows:
        ref = r["ms_per_mask"][names[0]]
        cells = [f"{r['ms_per_mask'][n]:.3f} ({ref / r['ms_per_mask'][n]:.2f}x)" for n in names]
        lines.append(f"| maxLength {r['max_length']} | {r['masks']} | " + " | ".join(cells) + " |")
    return lines


def probe_line(probe: dict[str, Any] | None) -> str:
    if not probe:
        return "Fill probe: not run."
    return (
        f"Fill probe (the benchmark schema's costliest state, a string just opened, {probe['rows']} rows): one thread "
        f"{probe['one_thread_ms']:.2f} ms, the pool of {probe['pool_threads']} over {probe.get('roots', 1)} root "
        f"matcher(s) {probe['pool_ms']:.2f} ms ({probe['speedup']:.2f}x), the pool over copies of one matcher "
        f"{probe.get('pool_one_root_ms', float('nan')):.2f} ms ({probe.get('speedup_one_root') or float('nan'):.2f}x); "
        f"CPUs: os {probe['os_cpu_count']}, affinity {probe['affinity']}, cgroup cpu.max "
        f"'{probe['cgroup_cpu_max']}', usable {probe['usable_cpus']}, RAYON_NUM_THREADS {probe['RAYON_NUM_THREADS']}."
    )


def _load(values: list[float] | None) -> str:
    return " / ".join(f"{v:.2f}" for v in values) if values else "not recorded"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Structured outputs: per-step host work on the CPU — {result['started']}",
        "",
        f"Hardware: {result['hardware']}. Commit {result['commit']}; command `{result['command']}`.",
        "",
        f"Load average (1, 5, 15 min) before the run {_load(result.get('load_average_before'))}, after it "
        f"{_load(result.get('load_average_after'))}: above 0 means other jobs shared these cores.",
        "",
        " ".join(__doc__.split("\n\n")[2].split()),
        "",
        probe_line(result.get("fill_probe")),
        "",
        "| schema | batch | lineages | fill ms/step (pool) | fill ms/row | fill, 1 thread ms | pool speed-up | "
        "fill, pool on one lineage (before) ms | its speed-up | accept ms | apply ms | host ms/step | "
        "mean allowed tokens | host ms vs same batch without maxLength |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["batch"]: r for r in result["grammar"].get("bench without maxLength", [])}
    for name, rows in result["grammar"].items():
        for r in rows:
            ref = base.get(r["batch"])
            ratio = f"{r['host_ms'] / ref['host_ms']:.1f}x" if ref and ref["host_ms"] > 0 else "-"
            speedup = f"{r['parallel_speedup']:.2f}x" if r["parallel_speedup"] else "-"
            before = f"{r['one_lineage_speedup']:.2f}x" if r.get("one_lineage_speedup") else "-"
            lines.append(
                f"| {name} | {r['batch']} | {r.get('lineages', 1)} | {r['fill_ms']:.2f} | {r['fill_ms_per_row']:.3f} | "
                f"{r['fill_one_thread_ms']:.2f} | {speedup} | {r.get('fill_one_lineage_ms', float('nan')):.2f} | "
                f"{before} | {r['accept_ms']:.3f} | {r['apply_ms']:.2f} | "
                f"{r['host_ms']:.2f} | {r['mean_allowed_tokens']:,.0f} | {ratio} |"
            )
    lines += slice_lines(result.get("slices"))
    gil = result.get("gil") or []
    if gil:
        lines += [
            "",
            " ".join((gil_probe.__doc__ or "").split()),
            "",
            "| schema | rows | GIL switch interval ms | caller | step ms | worker: tokens / accepts / fill ms | "
            "step outside the phases ms (GIL taken to start and to return) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in gil:
            phases = r["tokens_ms"] + r["accept_ms"] + r["fill_ms"]
            lines.append(
                f"| {r['schema']} | {r['batch']} | {r['switch_interval_ms']} | {r['caller']} | {r['step_ms']:.2f} | "
                f"{r['tokens_ms']:.2f} / {r['accept_ms']:.2f} / {r['fill_ms']:.2f} | {r['step_ms'] - phases:.2f} |"
            )
    lines += critical_lines(result.get("critical"))
    lines += compare_lines(result.get("compare"))
    engine = result.get("engine") or []
    if engine:
        free = engine[0]["output_tok_s"]
        lines += [
            "",
            " ".join(__doc__.split("\n\n")[3].split()),
            "",
            f"Batch {result['engine_batch']}, {result['engine_tokens']} output tokens per request, schema "
            f"{result.get('engine_schema', 'bench')} (bench: the GPU benchmark's, maxLength 8; nomax: without it).",
            "",
            "| run | output tok/s | vs unconstrained | fill ms/step (any thread) | engine thread's wait for the "
            "prefetcher, ms/step | masks prefetched / filled | prefetcher's step, ms: tokens wait / accepts / fill |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in engine:
            worker = (
                f"{r['worker_tokens_ms']:.2f} / {r['worker_accept_ms']:.2f} / {r['worker_fill_ms']:.2f}"
                if r.get("prefetched_rows") and "worker_fill_ms" in r
                else "-"
            )
            lines.append(
                f"| {r['run']} | {r['output_tok_s']:,.0f} | {r['output_tok_s'] / free:.2f}x | "
                f"{r['fill_ms_per_step']:.2f} | {r['engine_wait_ms_per_step']:.2f} | "
                f"{r['prefetched_rows']:,} / {r['filled_rows']:,} | {worker} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer-json", type=Path, required=True, help="SmolLM2's tokenizer.json")
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per schema and batch")
    p.add_argument("--threads", type=int, default=0, help="part 1's fill pool (0: llguidance's default)")
    p.add_argument("--engine-batch", type=int, default=64, help="part 2's requests (0: skip part 2)")
    p.add_argument("--gil-batch", type=int, default=64, help="part 3's rows (0: skip part 3)")
    p.add_argument("--engine-tokens", type=int, default=48, help="part 2's output tokens per request")
    p.add_argument(
        "--engine-schema",
        choices=sorted(ENGINE_SCHEMAS),
        default="bench",
        help="part 2's schema (bench: maxLength 8, the GPU benchmark's; nomax: the same without maxLength)",
    )
    p.add_argument("--critical-batch", type=int, default=256, help="part 4's rows (0: skip part 4)")
    p.add_argument(
        "--critical-threads",
        type=int,
        default=1,
        help="part 4's fill pool (1: the engine thread keeps a core; the CPU count: it competes for one)",
    )
    p.add_argument("--critical-work-ms", type=float, default=8.0, help="part 4's Python work per step")
    p.add_argument(
        "--parts",
        default="1,2,3,4",
        help="which parts to run (1: grammar step, 2: engine, 3: GIL, 4: critical path, 5: part 4 paired against "
        "--compare-ref)",
    )
    p.add_argument("--compare-steps", type=int, default=80, help="part 5's timed steps per mode")
    p.add_argument(
        "--compare-ref", default="main", help="part 5: the git ref whose engine/structured_output.py runs beside this"
    )
    p.add_argument("--slices", type=int, choices=(0, 1), default=1, help="time extra token slices (1)")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--name", default="", help="a suffix of the results files' names")
    args = p.parse_args(argv)
    try:
        batches = parse_batches(args.batches)
        tokenizer_json = read_tokenizer_json(args.tokenizer_json)
    except ValueError as e:
        p.error(str(e))
    if args.steps < 2 or args.engine_batch < 0 or args.engine_tokens < 1 or args.threads < 0:
        p.error("--steps must be at least 2, --threads and --engine-batch at least 0, --engine-tokens at least 1")
    if args.critical_batch < 0 or args.critical_work_ms <= 0 or args.critical_threads < 1:
        p.error("--critical-batch must be at least 0, --critical-work-ms positive and --critical-threads at least 1")
    try:
        parts = {int(x) for x in args.parts.split(",") if x.strip()}
    except ValueError:
        parts = set()
    if not parts or not parts <= {1, 2, 3, 4, 5}:
        p.error(f"--parts takes numbers among 1,2,3,4,5, not {args.parts!r}")

    from kubellm.engine.model_runner import available_cpus
    from kubellm.engine.structured_output import LLGuidanceBackend, llguidance_manager

    started = datetime.now(UTC)
    manager = llguidance_manager(tokenizer_json, SMOLLM2_VOCAB, [EOS_ID], num_threads=args.threads)
    before = llguidance_manager(tokenizer_json, SMOLLM2_VOCAB, [EOS_ID], num_threads=args.threads, num_roots=1)
    single = LLGuidanceBackend(tokenizer_json, SMOLLM2_VOCAB, [EOS_ID], num_threads=1)
    cpus = available_cpus()
    pool = manager.backend.num_threads
    result: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": f"CPU {platform.processor() or platform.machine()}, {cpus} usable cores (os.cpu_count "
        f"{os.cpu_count()}), shared with other jobs: figures are noisy; fill pool of {pool} thread(s)",
        "commit": git_commit(),
        "load_average_before": list(os.getloadavg()),
        "command": "python -m bench.structured_host " + " ".join(sys.argv[1:] if argv is None else argv),
        "steps": args.steps,
        "fill_probe": fill_probe(manager) if 1 in parts else None,
        "slices": slice_probe(tokenizer_json) if args.slices and 1 in parts else None,
        "grammar": {},
        "engine_batch": args.engine_batch,
        "engine_tokens": args.engine_tokens,
    }
    for name, schema in SCHEMAS.items() if 1 in parts else ():
        result["grammar"][name] = []
        for b in batches:
            row = grammar_step(manager, before, single, schema, b, args.steps, seed=b)
            result["grammar"][name].append(row)
            print(f"{name} B={b}: host {row['host_ms']:.2f} ms/step, fill {row['fill_ms_per_row']:.3f} ms/row",
                  flush=True)  # fmt: skip
    result["gil"] = [r for name in ("bench without maxLength", "bench (maxLength 8, minItems 200)")
                     for r in [dict(x, schema=name) for x in gil_probe(manager, SCHEMAS[name], args.gil_batch)]
                     ] if args.gil_batch and 3 in parts else []  # fmt: skip
    if args.critical_batch and 4 in parts:
        result["critical"] = [
            dict(r, schema=name)
            for name in ("bench without maxLength", "bench (maxLength 8, minItems 200)")
            for r in critical_path_probe(
                tokenizer_json, SCHEMAS[name], args.critical_batch, args.critical_work_ms, threads=args.critical_threads
            )
        ]
    if args.critical_batch and 5 in parts:
        result["compare_ref"] = args.compare_ref
        result["compare"] = [
            dict(r, schema="bench without maxLength")
            for r in compare_probe(
                tokenizer_json,
                SCHEMA_NO_MAXLENGTH,
                args.critical_batch,
                args.critical_work_ms,
                args.compare_ref,
                threads=args.critical_threads,
            )
        ]
    if args.engine_batch and 2 in parts:
        result["engine_schema"] = args.engine_schema
        result["engine"] = engine_runs(
            tokenizer_json, args.engine_batch, args.engine_tokens, ENGINE_SCHEMAS[args.engine_schema]
        )
    result["load_average_after"] = list(os.getloadavg())  # (other jobs' use of these cores during the run)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"structured-host-{started.strftime('%Y-%m-%d')}{'-' + args.name if args.name else ''}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
