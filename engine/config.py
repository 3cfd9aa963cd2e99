"""Engine arguments, named as vLLM names them so `vllm serve` users find what they know."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from kubellm.builtin_models import DEFAULT_MODEL
from kubellm.config_flags import FLAG, FlagSpec, env_bool, env_option, option

DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float")
CHAT_TEMPLATE_CONTENT_FORMATS = ("auto", "string", "openai")  # vLLM's --chat-template-content-format


def _human_int(value: str | int) -> int:
    """Integers as vLLM takes them: 4096, 4k, 4K (k=1000, K=1024 like vLLM), 1m, 1M, 1g, 1G."""
    s = str(value).strip()
    mult = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2, "g": 1000**3, "G": 1024**3}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def _max_model_len(value: str | int) -> int | None:
    """A length as _human_int takes it, or `auto` / -1 (vLLM's spellings): the model's own, fitted to the KV pool."""
    return None if str(value).strip().lower() in ("auto", "-1") else _human_int(value)


def _non_negative_float(value: str | float) -> float:
    f = float(value)
    if not f >= 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {value}")
    return f


def _optional_int(value: str | int) -> int | None:
    """auto (None), or an integer as _human_int takes it."""
    return None if str(value).strip().lower() == "auto" else _human_int(value)


def _quantization(value: str) -> str | None:
    """--quantization: fp8, or none (vLLM's spelling of unset)."""
    low = str(value).strip().lower()
    return None if low in ("", "none") else low


def _optional_bool(value: str) -> bool | None:
    """auto (None), or 0/1 as the KUBELLM_* switches take them."""
    return None if str(value).strip().lower() == "auto" else env_bool(value)


@dataclass
class EngineConfig:
    """Every engine setting; `kubellm serve` has one flag per field (--field-name), generated from this class."""

    model: str = option(DEFAULT_MODEL, help="a Hugging Face model directory, a .gguf file, or a builtin name")
    served_model_name: str | None = option(None, help="the name clients use (the first of --served-model-name)")
    tokenizer: str | None = option(
        None, help="tokenizer (and chat template) from this HF directory or .gguf file instead of the model's"
    )
    max_model_len: int | None = option(
        None,
        parse=_max_model_len,
        help="context length (unset or auto: the model's own, lowered to what the KV cache holds)",
    )
    max_num_seqs: int = option(256, help="most requests in one batch")
    max_num_batched_tokens: int = option(
        2048, parse=_human_int, help="the per-step token budget shared by decodes and prefill chunks"
    )
    long_prefill_token_threshold: int = option(
        0, parse=_human_int, help="a prompt's prefill takes at most this many tokens a step (0: the whole budget)"
    )
    block_size: int = option(16, help="tokens per KV cache block")
    gpu_memory_utilization: float = option(0.9, help="fraction of GPU memory the engine may use")
    kv_cache_memory_bytes: int | None = option(
        None, parse=_human_int, help="explicit KV cache budget in bytes (unset: measured on GPU, 256 MiB on CPU)"
    )
    num_gpu_blocks_override: int | None = option(None, help="exact KV pool size in blocks (tests, benchmarks)")
    enable_prefix_caching: bool = option(True, help="reuse KV blocks of shared prefixes")
    tensor_parallel_size: int = option(1, names=("-tp",), help="GPUs (ranks) one replica spans")
    dtype: str = option(
        "auto", choices=DTYPES, help="weight and activation dtype; auto: bfloat16 on CUDA, float32 on CPU"
    )
    device: str = option("auto", choices=("auto", "cuda", "cpu", "sim"), help="device; sim: a timing model")
    quantization: str | None = option(
        None,
        choices=(None, "fp8"),
        parse=_quantization,
        names=("-q",),
        help="fp8: quantize a bf16 checkpoint's linear layers to FP8 at load (per tensor, dynamic activations); "
        "unset: as the checkpoint's quantization_config says (fp8 and compressed-tensors FP8 load by themselves)",
    )
    kv_cache_dtype: str = option(
        "auto",
        choices=("auto", "fp8", "fp8_e4m3"),
        help="KV cache storage: auto (the model dtype) or fp8 (e4m3, scaled by the checkpoint's k/v scales or 1.0; "
        "the pool holds twice the tokens)",
    )
    calculate_kv_scales: bool = option(
        False,
        help="with --kv-cache-dtype fp8 and no k/v scales in the checkpoint: compute each layer's scales at start "
        "from one full-precision forward over a fixed English text (amax/200 for K, amax/100 for V, vLLM's "
        "headroom) instead of 1.0",
    )
    attention_backend: str = option("auto", choices=("auto", "torch", "flashinfer"), help="attention kernels")
    enforce_eager: bool = option(False, help="no CUDA graphs")
    async_scheduling: bool | None = option(
        None, help="prepare the next step on the host while the GPU runs this one (unset: on with CUDA)"
    )
    seed: int = option(0, help="engine seed (requests without their own seed draw from it)")
    generation_config: str = option(
        "auto", choices=("auto", "vllm"), help="auto: the model's generation_config.json sets sampling defaults"
    )
    max_waiting_requests: int = option(1024, help="waiting-queue bound; beyond it requests get 429")
    scheduling_policy: str = option("fcfs", choices=("fcfs", "priority"), help="order of admission")
    kv_growth_reserve_tokens: int = option(
        128,
        help="admit new requests only while free KV blocks cover every running request's next N tokens, so a "
        "full cache does not preempt (and recompute) requests it just admitted (0: admit while blocks last)",
    )
    sim_time_scale: float = option(
        1.0,
        parse=_non_negative_float,
        help="--device sim: multiply the timing model's step times (a slower simulated device)",
    )
    # Tuning switches, each also settable by its KUBELLM_* environment variable (the default when set).
    num_threads: int = env_option(
        "KUBELLM_NUM_THREADS", int, 0,
        help="CPU: torch intra-op threads (0: one per usable CPU, shared among tensor-parallel ranks)",
    )  # fmt: skip
    fused_kernels: bool = env_option(
        "KUBELLM_FUSED_KERNELS", env_bool, True,
        help="CUDA: Triton kernels for RMSNorm, rotary and SiLU-and-mul (off: torch ops)",
    )  # fmt: skip
    rope_cache: bool = env_option(
        "KUBELLM_ROPE_CACHE", env_bool, True,
        help="CUDA: the rotary kernel writes K and V straight into the paged cache (MLA: the normed latent and rope "
        "key; off: rotary, then index_copy_)",
    )  # fmt: skip
    fused_qk_norm: bool = env_option(
        "KUBELLM_FUSED_QK_NORM", env_bool, True,
        help="CUDA: Qwen3's per-head q/k RMSNorm inside the rotary kernel (else one Triton kernel per norm); off: "
        "torch ops",
    )  # fmt: skip
    moe_sum_norm: bool = env_option(
        "KUBELLM_MOE_SUM_NORM", env_bool, True,
        help="CUDA, one rank: a MoE layer's sum over its top-k experts runs in the next residual-add + RMSNorm kernel "
        "(off: a torch.sum kernel per layer)",
    )  # fmt: skip
    fused_sampler: bool = env_option(
        "KUBELLM_FUSED_SAMPLER", env_bool, True,
        help="CUDA: one Triton kernel for plain temperature sampling (off: torch ops)",
    )  # fmt: skip
    grammar_prefetch: bool = env_option(
        "KUBELLM_GRAMMAR_PREFETCH", env_bool, False,
        help="structured outputs under async scheduling: a worker thread advances the grammars over a step's tokens "
        "and fills the next step's token masks while the engine thread schedules and queues the next forward (off, "
        "the default until measured on a GPU: the engine thread does both before sampling)",
    )  # fmt: skip
    grammar_switch_interval_ms: float = env_option(
        "KUBELLM_GRAMMAR_SWITCH_INTERVAL_MS", float, 0.5,
        help="structured outputs with KUBELLM_GRAMMAR_PREFETCH=1: the interpreter's GIL switch interval (ms) once the "
        "prefetcher's thread starts, so it gets the GIL back from the engine thread within this rather than Python's "
        "5 ms (process-wide, put back when the engine closes; 0: leave Python's)",
    )  # fmt: skip
    grammar_batch_accept: bool = env_option(
        "KUBELLM_GRAMMAR_BATCH_ACCEPT", env_bool, False,
        help="structured outputs: advance a step's grammars over their tokens in one llguidance call that releases "
        "the GIL and runs on the mask fill's threads (off, the default until measured on a GPU: one call per row, "
        "holding the GIL), on the prefetcher's thread or the engine's",
    )  # fmt: skip
    grammar_step_reuse: bool = env_option(
        "KUBELLM_GRAMMAR_STEP_REUSE", env_bool, True,
        help="structured outputs with KUBELLM_GRAMMAR_PREFETCH=1: a step whose constrained rows are the previous "
        "step's, in order, reuses its bookkeeping (each request's prefetch row, the fill's row order) and takes the "
        "prefetched masks whole instead of row by row (0: rebuilt every step, as before)",
    )  # fmt: skip
    grammar_direct_masks: bool = env_option(
        "KUBELLM_GRAMMAR_DIRECT_MASKS", env_bool, False,
        help="structured outputs on CUDA with KUBELLM_GRAMMAR_PREFETCH=1 and KUBELLM_GRAMMAR_STEP_REUSE: the "
        "prefetcher fills the next step's masks straight into the pinned buffer that step copies to the GPU (off, "
        "the default until run on a GPU: the engine thread copies them there)",
    )  # fmt: skip
    grammar_pinned_masks: bool = env_option(
        "KUBELLM_GRAMMAR_PINNED_MASKS", env_bool, True,
        help="structured outputs on CUDA: fill each step's token masks straight into pinned host memory (two buffers "
        "in turn), copied to the GPU without a staging copy (0: a new array each step, pinned by a copy)",
    )  # fmt: skip
    grammar_threads: int = env_option(
        "KUBELLM_GRAMMAR_THREADS", int, 0,
        help="structured outputs: threads filling token masks in parallel over rows (0: one per CPU the process may "
        "use, at most 32)",
    )  # fmt: skip
    grammar_roots: int = env_option(
        "KUBELLM_GRAMMAR_ROOTS", int, 0,
        help="structured outputs: the most independently built start matchers (lineages) per grammar, one per live "
        "request up to this bound, built off the engine thread (0, the default: 4 per fill thread, at most 128; 1: "
        "one, as before: llguidance's copies of one matcher share a lock that serialises their mask fills)",
    )  # fmt: skip
    grammar_lineage_idle_s: float = env_option(
        "KUBELLM_GRAMMAR_LINEAGE_IDLE_S", float, 60.0,
        help="structured outputs: seconds a grammar's idle lineage (KUBELLM_GRAMMAR_ROOTS) is kept before it is freed, "
        "down to twice the grammar's live requests and at least one (0: kept for as long as the grammar is cached, "
        "as before: up to 512 grammars x 128 start matchers)",
    )  # fmt: skip
    gemv_kernel: bool = env_option(
        "KUBELLM_GEMV", env_bool, True,
        help="CUDA, tensor parallel: a Triton GEMV for few-row weight products (off: cuBLAS)",
    )  # fmt: skip
    fp8_gemm: str = env_option(
        "KUBELLM_FP8_GEMM", str, "fixed",
        choices=("fixed", "table", "tune"),
        help="CUDA, FP8 linear layers: which GEMM route each product takes. table: the measured-best per weight "
        "format, shape class and batch-size bucket (models/fp8_dispatch.py, from bench/fp8_micro.py); tune: the "
        "candidates timed on this GPU at start-up (bounded, logged; the table's where not reached); fixed: W8A16 up "
        "to 16 rows, else the format's W8A8 (the default until table's and tune's gpu tests have run on a GPU)",
    )  # fmt: skip
    fp8_splitk: bool = env_option(
        "KUBELLM_FP8_SPLITK", env_bool, True,
        help="CUDA, FP8 linear layers with --fp8-gemm tune: the split-K small-batch kernel is a candidate (off: never "
        "used; W8A16 takes its place)",
    )  # fmt: skip
    tp_cuda_graphs: bool = env_option(
        "KUBELLM_TP_CUDA_GRAPHS", env_bool, True,
        help="decode CUDA graphs under tensor parallelism (off: eager, the fallback)",
    )  # fmt: skip
    tp_symm_mem: bool = env_option(
        "KUBELLM_TP_SYMM_MEM", env_bool, False,
        help="tensor parallel: all-reduce through symmetric memory for small messages",
    )  # fmt: skip
    decode_tensor_cores: bool | None = env_option(
        "KUBELLM_DECODE_TENSOR_CORES", _optional_bool, None,
        parse=_optional_bool,
        metavar="auto|0|1",
        help="flashinfer: tensor-core decode kernels (unset: on when a KV head serves 4 or more query heads)",
    )  # fmt: skip
    moe_kernel: str = env_option(
        "KUBELLM_MOE_KERNEL", str, "auto",
        choices=("auto", "torch"),
        help="mixture-of-experts layers: auto takes the fused Triton kernels on CUDA, torch the reference",
    )  # fmt: skip
    prefill_backend: str = env_option(
        "KUBELLM_PREFILL_BACKEND", str, "fa2",
        choices=("fa2", "fa3", "auto"),
        help="flashinfer: paged prefill kernel family (also that of the MLA kernel DeepSeek models attend with in "
        "steps with prefill rows, and of their up-projected ragged prefill)",
    )  # fmt: skip
    mla_decode_backend: str = env_option(
        "KUBELLM_MLA_DECODE_BACKEND", str, "prefill",
        choices=("prefill", "fa2", "fa3", "auto", "triton"),
        help="flashinfer: MLA kernel family of decode-only steps (DeepSeek; eager and CUDA-graph). prefill: the "
        "KUBELLM_PREFILL_BACKEND family; fa3: the sm90 kernel (a first-use build unless prebuilt); auto: fa3 on sm90a; "
        "triton: our own split-KV Triton decode kernel (opt-in until measured)",
    )  # fmt: skip
    mla_upproject_min_tokens: int = env_option(
        "KUBELLM_MLA_UPPROJECT_MIN_TOKENS", int, 0,
        help="MLA (DeepSeek): a prefill chunk of at least N new tokens attends up-projected (its context's latents "
        "through kv_b_proj to per-head K/V, then ordinary causal attention; flashinfer's ragged prefill on CUDA) "
        "instead of absorbed; decodes stay absorbed. 0: never (the default until GPU measurements pick N)",
    )  # fmt: skip
    mla_upproject_max_context_tokens: int | None = env_option(
        "KUBELLM_MLA_UPPROJECT_MAX_CONTEXT_TOKENS", _optional_int, None,
        parse=_optional_int,
        metavar="auto|N",
        help="MLA up-projected prefill: the most context tokens (cached + new) one step's up-projected chunks hold "
        "in total; their per-head K/V are per-layer temporaries of that many tokens, which the start-up memory "
        "profile reserves (logged), and chunks past the bound attend absorbed. auto: 2 x max_num_batched_tokens",
    )  # fmt: skip
    chat_template: str | None = option(
        None, help="chat template replacing the model's: a file path, or the Jinja template itself"
    )
    chat_template_content_format: str = option(
        "auto",
        choices=CHAT_TEMPLATE_CONTENT_FORMATS,
        help="how message content reaches the template: string (text parts joined) or openai (a list of parts); "
        "auto: openai when the template loops over a message's content",
    )

    def __post_init__(self) -> None:
        checks = {
            "max_num_seqs": self.max_num_seqs >= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens >= 1,
            "block_size": self.block_size >= 1,
            "gpu_memory_utilization": 0.0 < self.gpu_memory_utilization <= 1.0,
            "tensor_parallel_size": self.tensor_parallel_size >= 1,
            "max_model_len": self.max_model_len is None or self.max_model_len >= 1,
            "sim_time_scale": self.sim_time_scale > 0,
            "kv_growth_reserve_tokens": self.kv_growth_reserve_tokens >= 0,
            "long_prefill_token_threshold": self.long_prefill_token_threshold >= 0,
            "num_threads": self.num_threads >= 0,
            "grammar_threads": self.grammar_threads >= 0,
            "grammar_roots": self.grammar_roots >= 0,
            "grammar_lineage_idle_s": self.grammar_lineage_idle_s >= 0,
            "mla_upproject_min_tokens": self.mla_upproject_min_tokens >= 0,
            "mla_upproject_max_context_tokens": self.mla_upproject_max_context_tokens is None
            or self.mla_upproject_max_context_tokens >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid engine argument {name}={getattr(self, name)!r}")
        for f in dataclasses.fields(self):  # one source of truth: the choices each flag declares
            spec: FlagSpec | None = f.metadata.get(FLAG)
            value = getattr(self, f.name)
            if spec is not None and spec.choices is not None and value not in spec.choices:
                via = f" ({spec.env})" if spec.env else ""
                raise ValueError(
                    f"invalid engine argument {f.name}={value!r}{via}; choose from {', '.join(map(str, spec.choices))}"
                )

    @property
    def mla_decode_kernel(self) -> str:
        """mla_decode_backend resolved: `prefill` is the prefill family (KUBELLM_PREFILL_BACKEND)."""
        return self.prefill_backend if self.mla_decode_backend == "prefill" else self.mla_decode_backend

    @property
    def mla_upproject_context_budget(self) -> int:
        """mla_upproject_max_context_tokens resolved: auto is twice the step's token budget (a step of new chunks
        whose cached prefixes are as long as themselves, in total)."""
        if self.mla_upproject_max_context_tokens is not None:
            return self.mla_upproject_max_context_tokens
        return 2 * self.max_num_batched_tokens

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
