"""A transcript-replaying test model: the embedded model's tokenizer and chat template with `--device sim`, whose
runner answers each request with a fixed transcript (chosen by a key word in the prompt), then end-of-turn.

It stands in for a model that writes tool calls in a known format, so the server's parsing is tested end to end
on exact text. Prefix caching is off so a request's whole prompt passes through the runner in its first step.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from kubellm.engine.config import EngineConfig
from kubellm.engine.forward_batch import ForwardBatch, TokenFill
from kubellm.engine.step_runner import ReadyTokens, Sample, StepRunner


class ReplayRunner:
    """A StepRunner (engine/step_runner.py) whose tokens come from transcripts (no logits: `sample` unused)."""

    samples_logits = False
    supports_token_fill = False
    device = torch.device("cpu")

    def __init__(self, sim_runner: Any, renderer: Any, transcripts: dict[str, str], end_id: int):
        self._sim = sim_runner
        self._renderer = renderer
        self._transcripts = {key: renderer.encode(text, add_special_tokens=False) for key, text in transcripts.items()}
        self._end_id = end_id
        self._replies: dict[str, list[int]] = {}
        self._prompt_lens: dict[str, int] = {}
        self._holds: dict[str, tuple[int, threading.Event]] = {}  # transcript key -> (token index, release)
        self._reply_keys: dict[str, str] = {}
        self._hold_timeout = 60.0

    def hold(self, key: str, upto: str, timeout: float = 60) -> threading.Event:
        """Make the next reply of transcript `key` stop once it has written `upto` (a prefix of the transcript)
        until the returned event is set, so a test can see what a client has received mid-generation. The engine
        thread waits at most `timeout` seconds, so a test that never releases it fails instead of hanging."""
        tokens = self._transcripts[key]
        assert self._renderer.decode(tokens, skip_special_tokens=False).startswith(upto)
        written = (self._renderer.decode(tokens[:i], skip_special_tokens=False) for i in range(1, len(tokens) + 1))
        n = next(i for i, text in enumerate(written, start=1) if len(text) >= len(upto))
        release = threading.Event()
        self._holds[key] = (n, release)
        self._hold_timeout = timeout
        return release

    def _reply(self, request_id: str, prompt_ids: list[int]) -> list[int]:
        if request_id not in self._replies:
            prompt = self._renderer.decode(prompt_ids, skip_special_tokens=False)
            keys = [k for k in self._transcripts if k in prompt]
            assert len(keys) == 1, f"the prompt must name exactly one transcript key, found {keys}"
            self._replies[request_id] = [*self._transcripts[keys[0]], self._end_id]
            self._reply_keys[request_id] = keys[0]
        return self._replies[request_id]

    def kv_cache_bytes_per_block(self) -> int:
        return self._sim.kv_cache_bytes_per_block()

    def available_kv_cache_bytes(self) -> int | None:
        return self._sim.available_kv_cache_bytes()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._sim.allocate_kv_cache(num_blocks)

    def close(self) -> None:
        """Nothing to release."""

    def execute(self, batch: ForwardBatch, fill: TokenFill | None, sample: Sample) -> ReadyTokens:
        out = []
        for s in batch.seqs:
            reply = self._reply(s.request_id, s.token_ids)
            if s.needs_logits:
                generated = s.start_pos + len(s.token_ids) - self._prompt_len(s)
                held = self._holds.get(self._reply_keys[s.request_id])
                if held is not None and generated == held[0]:
                    del self._holds[self._reply_keys[s.request_id]]
                    held[1].wait(self._hold_timeout)
                out.append(reply[min(generated, len(reply) - 1)])
        return ReadyTokens(out)

    def _prompt_len(self, s: Any) -> int:
        # The first step of a request computes its whole prompt (no prefix cache, one chunk): remember its length.
        return self._prompt_lens.setdefault(s.request_id, s.start_pos + len(s.token_ids))


def replay_engine(transcripts: dict[str, str], chat_template: str) -> Any:
    from kubellm.engine.llm_engine import LLMEngine

    config = EngineConfig(
        device="sim",
        enable_prefix_caching=False,
        max_num_batched_tokens=8192,
        num_gpu_blocks_override=512,
        sim_time_scale=0.001,
        chat_template=chat_template,
    )
    engine = LLMEngine(config)
    end_id = engine.renderer.eos_token_id
    assert end_id is not None, "the embedded model's tokenizer names its end-of-turn token"
    runner: StepRunner = ReplayRunner(engine.runner, engine.renderer, transcripts, end_id)
    engine.runner = runner
    return engine
