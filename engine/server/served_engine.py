"""The seam between the server and the engine: everything the server's engine thread and handlers use of an
engine, typed. `LLMEngine` implements it, and so do the tests' fake engines; the type checker (`make lint`)
holds both to it, so a fake cannot drift from the engine it stands for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from kubellm.engine.config import EngineConfig
from kubellm.engine.kv_cache_manager import KVEvent
from kubellm.engine.outputs import EngineStats, RequestOutput
from kubellm.engine.sampling_params import SamplingParams
from kubellm.prompt import PromptRenderer, TokenizerInfo


class ServedEngine(Protocol):
    """What `AsyncEngine` (on its engine thread) and `OpenAIServing` (reads only) need of an engine."""

    config: EngineConfig
    renderer: PromptRenderer
    tokenizer_info: TokenizerInfo
    max_model_len: int
    last_step_tokens: int  # tokens the latest step computed (the server's metrics read it)

    @property
    def vocab_size(self) -> int: ...

    def default_sampling_params(self) -> dict[str, Any]:
        """Sampling defaults (the model's generation_config) for fields a request leaves out."""
        ...

    def add_request(
        self,
        request_id: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prompt: str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str = "",
    ) -> str:
        """Queue a request; raises ValueError naming the problem."""
        ...

    def abort_request(self, request_id: str | list[str]) -> list[RequestOutput]: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[RequestOutput]:
        """One engine step: delta outputs of the requests that got tokens or finished."""
        ...

    def stats(self) -> EngineStats: ...

    def cached_block_hashes(self) -> list[int]: ...

    def drain_kv_events(self) -> list[KVEvent]: ...

    def close(self) -> None: ...


if TYPE_CHECKING:
    from kubellm.engine.llm_engine import LLMEngine

    def _conforms(engine: LLMEngine) -> ServedEngine:
        return engine  # the type checker holds the real engine to this interface
