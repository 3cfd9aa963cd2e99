"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, params)` and `.chat(messages)`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubellm.engine.config import EngineConfig
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.outputs import OutputKind, RequestOutput
from kubellm.engine.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any):
        config = EngineConfig(**({"model": model} if model else {}), **engine_args)
        self.engine = LLMEngine(config)
        self.engine.output_kind = OutputKind.FINAL_ONLY  # generate() and chat() return whole, finished requests
        self._next_id = 0

    @property
    def tokenizer(self):
        return self.engine.renderer.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.make_sampling_params()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts (strings, token-id lists, or {"prompt": ...}/{"prompt_token_ids": ...}) to completion.

        Requests that fail alone (e.g. too long for the KV pool mid-run) come back with `.error` set; a
        request rejected up front raises ValueError before any other request is queued."""
        if isinstance(prompts, str | dict) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params_list = self._params_for(len(prompts), sampling_params)
        encoded = [self._encode(p) for p in prompts]
        ids = []
        for i, ((text, token_ids), params) in enumerate(zip(encoded, params_list, strict=True)):
            rid = str(self._next_id)
            self._next_id += 1
            try:
                self.engine.add_request(rid, token_ids, params, prompt=text, priority=priority[i] if priority else 0)
            except ValueError:
                self.engine.abort_request(ids)
                raise
            ids.append(rid)
        return self._run(ids)

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then generate. `tools` (OpenAI's tool
        objects) and `chat_template_kwargs` reach the template as the server passes them; as in vLLM, the text
        that comes back is not parsed for tool calls."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        renderer = self.engine.renderer
        prompts = []
        for conv in conversations:
            text = renderer.render_chat(
                conv,  # type: ignore[arg-type]
                add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template_kwargs=chat_template_kwargs,
                tools=tools,
            )
            prompts.append({"prompt": text, "prompt_token_ids": renderer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params)

    def _params_for(self, n: int, params: SamplingParams | Sequence[SamplingParams] | None) -> list[SamplingParams]:
        if params is None:
            return [self.get_default_sampling_params()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts; give one, or one per prompt")
        return params

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.renderer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return prompt["prompt"], self.engine.renderer.encode(prompt["prompt"])
        return None, list(prompt)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        pending = set(ids)
        finished: dict[str, RequestOutput] = {}
        while pending:
            for out in self.engine.step():
                if out.finished and out.request_id in pending:
                    finished[out.request_id] = out
                    pending.discard(out.request_id)
        return [finished[i] for i in ids]
