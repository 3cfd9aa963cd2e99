"""Engine arguments, named as vLLM names them so `vllm serve` users find what they know."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str = "smollm2-135m-instruct"
    served_model_name: str | None = None
    tokenizer: str | None = None
    max_model_len: int | None = None  # None: the model's own limit
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # the per-step token budget shared by decodes and prefill chunks
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # explicit KV budget (CPU default: 256 MiB)
    num_gpu_blocks_override: int | None = None  # exact pool size, for tests and benchmarks
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto | cuda | cpu | sim
    attention_backend: str = "auto"  # auto | torch | flashinfer
    enforce_eager: bool = False  # no CUDA graphs
    async_scheduling: bool | None = None  # overlap host work with the GPU; None: on for CUDA (see llm_engine.py)
    seed: int = 0
    generation_config: str = "auto"  # auto: the model's generation_config.json sets defaults; "vllm": ignore it
    max_waiting_requests: int = 1024  # beyond this the server answers 429
    scheduling_policy: str = "fcfs"  # fcfs | priority
    # admit new requests only while free KV blocks cover each running request's next this-many tokens (0: admit
    # while blocks last, as vLLM does); saves the prefills that preemption by recompute throws away
    kv_growth_reserve_tokens: int = 128
    sim_time_scale: float = 1.0  # --device sim: every simulated step takes this many times its modelled time
    chat_template: str | None = None  # replaces the model's own (the router fetches it with the tokenizer)
    chat_template_content_format: str = "auto"  # auto | string | openai (vLLM's --chat-template-content-format)

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
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid engine argument {name}={getattr(self, name)!r}")
        if self.device not in ("auto", "cuda", "cpu", "sim"):
            raise ValueError(f"invalid engine argument device={self.device!r}; choose auto, cuda, cpu or sim")
        if self.attention_backend not in ("auto", "torch", "flashinfer"):
            raise ValueError(f"invalid engine argument attention_backend={self.attention_backend!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"invalid engine argument scheduling_policy={self.scheduling_policy!r}")
        if self.chat_template_content_format not in ("auto", "string", "openai"):
            raise ValueError(
                f"invalid engine argument chat_template_content_format={self.chat_template_content_format!r}"
            )
        if self.generation_config not in ("auto", "vllm"):
            raise ValueError(f"invalid engine argument generation_config={self.generation_config!r}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
