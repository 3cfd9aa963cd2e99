"""Tensor-parallel replica: rank 0 lives in the engine process, ranks 1..N-1 are worker processes it spawns.

Rank 0 owns the scheduler and KV bookkeeping; per step it broadcasts the ForwardBatch (a pickled Python
object) and every rank runs the same `ModelRunner.logits`, so the collectives inside the forward line up.
Rank 0's `TPModelRunner` is a StepRunner like the ModelRunner, so `LLMEngine` does not know TP is on.

Weights: a worker loads the model from `loaded.path` (HF directories lazily, so it reads only its shards) or, for
a model made in memory, rebuilds it from `loaded.recipe` (random weights drawn on its own device, only its shards).
Commands travel through a shared-memory ring (engine/tp_channel.py: microseconds, where a pickled gloo broadcast
cost ~1 ms of GPU idle per step); replies to `call` (start-up, KV sizing) gather over `parallel.control_group()`
(gloo beside NCCL on CUDA). Decode CUDA graphs are captured on every rank (--no-tp-cuda-graphs, or
KUBELLM_TP_CUDA_GRAPHS=0, turns them off under tensor parallelism).

Shutdown: `close()` broadcasts a stop and joins the workers (terminating stragglers). Workers are daemon
processes and also die with their parent (PR_SET_PDEATHSIG plus a parent-watch thread), so a killed engine
leaves no process holding a GPU; rank 0 checks the workers are alive before every command it sends. A worker
dying mid-step leaves rank 0's queued GPU work waiting forever in a collective: on CUDA rank 0's device waits
(`transfer.wait_event`) also check the workers, and on a death abort the NCCL communicator and raise, so the
engine fails its requests (and /health turns 503) instead of hanging; close() then skips device syncs.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import queue
import time
import traceback
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kubellm.engine import parallel, symm_all_reduce
from kubellm.engine.config import EngineConfig
from kubellm.engine.forward_batch import ForwardBatch, TokenFill
from kubellm.engine.loader import LoadedModel
from kubellm.engine.loader.loaded import ModelRecipe
from kubellm.engine.model_runner import ModelRunner, available_cpus, resolve_device, resolve_dtype
from kubellm.engine.step_runner import Sample, StepResult
from kubellm.engine.tp_channel import ShmBroadcastReader, ShmBroadcastWriter
from kubellm.engine.transfer import add_wait_check, remove_wait_check
from kubellm.parent_watch import die_with_parent

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # a worker must reach the process group within this (imports, CUDA init)
_EXECUTE, _CALL, _STOP = "execute", "call", "stop"


class TPModelRunner:
    """The StepRunner of rank 0 of a tensor-parallel replica."""

    samples_logits = True
    supports_token_fill = True  # async scheduling: workers receive each step's sampled ids from rank 0

    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        size = config.tensor_parallel_size
        parallel.check_tp_size(loaded.config, size)
        source: str | ModelRecipe | None = loaded.path or loaded.recipe
        if not source:
            raise ValueError("tensor parallelism needs a model on disk or a recipe to rebuild it (random weights)")
        device = resolve_device(config.device)
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs, torch sees {torch.cuda.device_count()}")
        self.size = size
        self._backend = parallel.backend_for(device.type)
        self._closed = False
        self._failed = False  # a worker died: the communicator is aborted, the device may hold stuck work
        self._group = False
        self._ready = False  # every rank loaded: the command loop runs and a stop can be broadcast
        self._channel = ShmBroadcastWriter(readers=size - 1)
        ctx = mp.get_context("spawn")
        port = parallel.free_port()
        hello: Any = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, size, port, config, source, os.getpid(), hello, self._channel.spec()),
                name=f"kubellm-tp{rank}",
                daemon=True,
            )
            for rank in range(1, size)
        ]
        try:
            for p in self._procs:
                p.start()
            self._await_hello(hello, size - 1)
            self._channel.unlink()  # every worker has mapped it: a killed replica leaves no file behind
            parallel.init_group(0, size, port, device.type)
            self._group = True
            parallel.warm_up(_rank_device(device, 0))
            symm_all_reduce.setup(_rank_device(device, 0), resolve_dtype(config.dtype, device), config.tp_symm_mem)
            self.inner = _make_runner(loaded, config, 0, size)
            errors = [e for e in self._gather("ok") if e != "ok"]  # every rank reports its load
            if errors:
                raise RuntimeError(f"tensor-parallel worker failed to start: {errors[0]}")
            self._ready = True
            if device.type == "cuda":
                add_wait_check(self._check_workers)
        except BaseException:
            self.close()
            raise
        logger.info("tensor parallel: %d ranks (%s backend)", size, parallel.backend_for(device.type))

    def _await_hello(self, hello: Any, n: int) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        seen = 0
        while seen < n:
            self._check_workers()
            if time.monotonic() > deadline:
                raise RuntimeError("tensor-parallel workers did not start in time")
            with contextlib.suppress(queue.Empty):
                hello.get(timeout=0.5)
                seen += 1

    def _check_workers(self) -> None:
        dead = [f"{p.name} (exit code {p.exitcode})" for p in self._procs if not p.is_alive()]
        if dead:
            if self._group and not self._failed and self._backend == "nccl":
                logger.error("tensor-parallel worker(s) %s exited; aborting the NCCL communicator", ", ".join(dead))
                parallel.abort_group()  # collectives waiting on the dead rank end instead of hanging
            self._failed = True
            raise RuntimeError(f"tensor-parallel worker(s) {', '.join(dead)} exited; the replica cannot continue")

    def _gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value, group=parallel.control_group())
        return out

    def _send(self, command: tuple) -> None:
        self._check_workers()
        self._channel.send(command, check=self._check_workers)

    # ---- the ModelRunner interface --------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def num_blocks(self) -> int:
        return self.inner.num_blocks

    @property
    def model_config(self):
        return self.inner.model_config

    def kv_cache_bytes_per_block(self) -> int:
        return self.inner.kv_cache_bytes_per_block()  # the same on every rank

    def call(self, method: str, *args: Any) -> list[Any]:
        """Run `ModelRunner.<method>(*args)` (a dotted path: "model.param_counts") on every rank; results in
        rank order. Every rank reaches the gather even when one fails, then the first error raises here."""
        self._send((_CALL, method, args))
        results = self._gather(_call(self.inner, 0, method, args))
        for r in results:
            if isinstance(r, _WorkerError):
                raise RuntimeError(f"tensor-parallel call {method} failed: {r.message}")
        return results

    def available_kv_cache_bytes(self) -> int | None:
        """The smallest rank's budget (None on CPU)."""
        budgets = self.call("available_kv_cache_bytes")
        return None if budgets[0] is None else min(budgets)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.call("allocate_kv_cache", num_blocks)

    def param_counts(self) -> list[dict[str, int]]:
        """Each rank's parameter element counts (sharded / replicated), in rank order."""
        return self.call("model.param_counts")

    def execute(self, batch: ForwardBatch, fill: TokenFill | None, sample: Sample) -> StepResult:
        """Every rank runs the batch; rank 0 samples and broadcasts the sampled ids (still on the device,
        stream-ordered: no host sync) so every rank can fill the next step's placeholder tokens itself.
        `fill`: those placeholders, from the previous step's ids, which each worker holds."""
        publish = any(s.needs_logits for s in batch.seqs)
        logits = self._run(batch, fill, publish)
        result = sample(logits)
        if publish:
            if result.token_ids is None:
                raise RuntimeError("tensor parallel needs the sampled ids on the device to share them")
            dist.broadcast(result.token_ids, src=0)
        return result

    def logits(self, batch: ForwardBatch, fill: TokenFill | None = None) -> torch.Tensor:
        """Every rank runs the batch; rank 0's logits (what `ModelRunner.logits` returns), nothing sampled."""
        return self._run(batch, fill, publish=False)

    def _run(self, batch: ForwardBatch, fill: TokenFill | None, publish: bool) -> torch.Tensor:
        """`publish`: the workers then wait for this step's sampled ids from rank 0."""
        spec = (fill.seq_indices, fill.source_rows) if fill is not None else None
        self._send((_EXECUTE, batch, spec, publish))
        try:
            return self.inner.logits(batch, fill)
        except dist.DistError as e:  # a peer vanished mid-step (gloo: connection reset)
            raise RuntimeError(f"tensor-parallel step failed, a worker is gone or broken: {e}") from e

    def close(self) -> None:
        """Stop the workers and leave the process group; idempotent."""
        if self._closed:
            return
        self._closed = True
        remove_wait_check(self._check_workers)
        if self._ready:
            with contextlib.suppress(Exception):
                if all(p.is_alive() for p in self._procs):
                    self._channel.send((_STOP,), check=self._check_workers)
        for p in self._procs:
            if p.pid is not None:
                p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        if self._group:
            with contextlib.suppress(Exception):
                if hasattr(self, "inner"):
                    _drop_graphs(self.inner, sync=not self._failed)
                parallel.destroy_group()
            self._group = False
        self._channel.close()


class _WorkerError:
    def __init__(self, message: str):
        self.message = message


def _call(runner: ModelRunner, rank: int, method: str, args: tuple) -> Any:
    try:
        return operator.attrgetter(method)(runner)(*args)
    except Exception as e:
        return _WorkerError(f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")


def _rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _make_runner(loaded: LoadedModel, config: EngineConfig, rank: int, size: int) -> ModelRunner:
    runner = ModelRunner(loaded, config, tp_rank=rank, tp_size=size)
    if not config.tp_cuda_graphs:
        runner.use_cuda_graphs = False  # read when the KV cache is allocated (and graphs captured), later
    return runner


def _drop_graphs(runner: ModelRunner, sync: bool = True) -> None:
    """Free the captured decode graphs (they hold NCCL work of the communicator) before the group goes away.
    `sync=False` after a worker died: the stream may hold work that never completes."""
    runner._graphs = {}
    if sync and runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)


def _load(source: str | ModelRecipe, config: EngineConfig, device: torch.device) -> LoadedModel:
    if isinstance(source, str):
        from kubellm.engine.loader import load_model

        return load_model(source, dtype=config.dtype, lazy=True)
    return source.load(device)


def _worker_main(
    rank: int,
    size: int,
    port: int,
    config: EngineConfig,
    source: str | ModelRecipe,
    parent_pid: int,
    hello,
    channel: tuple[str, int, int, int],
) -> None:
    """Ranks 1..N-1: join the group, load and shard the weights, then run whatever rank 0 broadcasts."""
    die_with_parent(parent_pid)  # SIGKILL: a worker holds nothing worth saving
    device = resolve_device(config.device)
    if device.type == "cpu" and not config.num_threads:
        config = replace(config, num_threads=max(1, available_cpus() // size))  # share the cores
    # CPU ranks share few cores with rank 0: poll the ring with sleeps rather than spinning
    commands = ShmBroadcastReader(channel, rank - 1, hot_spin_s=0.0 if device.type == "cpu" else 0.05)
    hello.put(rank)
    parallel.init_group(rank, size, port, device.type)
    parallel.warm_up(_rank_device(device, rank))
    symm_all_reduce.setup(_rank_device(device, rank), resolve_dtype(config.dtype, device), config.tp_symm_mem)
    runner: ModelRunner | None = None
    status = "ok"
    try:
        runner = _make_runner(_load(source, config, _rank_device(device, rank)), config, rank, size)
    except Exception as e:  # reported to rank 0 through the start-up gather
        status = f"rank {rank}: {type(e).__name__}: {e}"
    dist.all_gather_object([None] * size, status, group=parallel.control_group())
    if runner is None:
        os._exit(1)
    try:
        _serve(runner, commands, rank, size)
    finally:
        with contextlib.suppress(Exception):
            _drop_graphs(runner)
            parallel.destroy_group()


def _serve(runner: ModelRunner, commands: ShmBroadcastReader, rank: int, size: int) -> None:
    sampled: torch.Tensor | None = None  # the last step's sampled ids, as rank 0 broadcast them
    while True:
        command = commands.recv()
        if command[0] == _STOP:
            return
        if command[0] == _EXECUTE:
            _, batch, spec, publish = command
            fill = TokenFill(sampled, *spec) if spec is not None else None
            try:
                runner.logits(batch, fill)
            except ValueError:  # input validation before any collective: rank 0 raised the same error
                logger.debug("rank %d: batch rejected", rank, exc_info=True)
                continue
            if publish:
                n = sum(1 for s in batch.seqs if s.needs_logits)
                sampled = torch.empty(n, dtype=torch.int64, device=runner.device)
                dist.broadcast(sampled, src=0)
            continue
        _, method, args = command
        dist.all_gather_object([None] * size, _call(runner, rank, method, args), group=parallel.control_group())
