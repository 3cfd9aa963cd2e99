"""The OpenAI semantics of completions and chat: request -> token ids + SamplingParams -> engine -> response
objects or SSE chunks. No HTTP here (api_server.py owns that), so the logic is testable on its own.

Streaming generators yield nothing until the engine's first output arrives, so a request the engine refuses
still gets a proper HTTP error status instead of a 200 stream carrying an error. Whatever ends a generator
early (client gone, cancellation) aborts its engine requests in `finally`, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from kubellm.engine.outputs import CompletionOutput
from kubellm.openai_errors import APIError, model_not_found
from kubellm.prompt import ChatTemplateError, ChatTemplateKwargsError

from .async_engine import AsyncEngine, RequestStream
from .chat_output import ChatOutputParser
from .chat_tools import (
    ChatParsingConfig,
    ToolPlan,
    delta_tool_calls,
    finish_reason,
    forced_calls_schema,
    message_tool_calls,
    output_parser,
    plan_tools,
)
from .errors import bad_request, from_value_error
from .protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    PromptTokensDetails,
    TokenizeRequest,
    TopLogprob,
    UnsupportedField,
    UsageInfo,
)
from .served_engine import ServedEngine
from .sse import DONE, sse_data, sse_error
from .tool_parsers import ParsedDelta

# Request fields -> SamplingParams fields; the engine's generation_config defaults fill the None ones.
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
LONG_PROMPT_CHARS = 20_000  # tokenize longer prompts off the event loop
COMPILE_TIMEOUT_S = 10.0  # a constraint compiling longer than this is refused with a 400


@dataclass
class _Prompt:
    token_ids: list[int]
    text: str | None


@dataclass
class _ChoiceState:
    finished: bool = False
    started: bool = False
    has_calls: bool = False
    held: CompletionOutput | None = None  # tokens and logprobs of deltas whose text a tool parser held back

    def hold(self, c: CompletionOutput | None) -> None:
        if c is None:
            return
        if self.held is None:
            self.held = CompletionOutput(c.index, logprobs=[] if c.logprobs is not None else None)
        self.held.token_ids.extend(c.token_ids)
        if self.held.logprobs is not None and c.logprobs is not None:
            self.held.logprobs.extend(c.logprobs)

    def release(self, c: CompletionOutput | None) -> CompletionOutput | None:
        """`c` with the held-back deltas' tokens and logprobs in front (they are sent with its chunk)."""
        held, self.held = self.held, None
        if held is None or c is None:
            return c
        logprobs = held.logprobs + c.logprobs if held.logprobs is not None and c.logprobs is not None else c.logprobs
        return dataclasses.replace(c, token_ids=held.token_ids + list(c.token_ids), logprobs=logprobs)


@dataclass
class _Tally:
    """Usage over all prompts of one HTTP request."""

    prompt_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: dict[tuple[int, int], int] = field(default_factory=dict)

    def usage(self) -> UsageInfo:
        p = sum(self.prompt_tokens.values())
        c = sum(self.completion_tokens.values())
        details = PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values()))
        return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c, prompt_tokens_details=details)

    def record(self, i: int, out: Any) -> None:
        """Count one delta output of prompt i."""
        self.prompt_tokens[i] = len(out.prompt_token_ids or ())
        self.cached_tokens[i] = int(getattr(out, "num_cached_tokens", 0) or 0)
        for c in out.outputs:
            key = (i, c.index)
            self.completion_tokens[key] = self.completion_tokens.get(key, 0) + len(c.token_ids)


class OpenAIServing:
    def __init__(
        self,
        async_engine: AsyncEngine,
        served_model_names: list[str],
        max_logprobs: int = 20,
        chat_parsing: ChatParsingConfig | None = None,
    ):
        self.chat_parsing = chat_parsing or ChatParsingConfig()
        self.async_engine = async_engine
        self.served_model_names = served_model_names
        self.max_logprobs = max_logprobs
        self._sampling_params_cls: Any = None
        self.compile_timeout_s = COMPILE_TIMEOUT_S
        self.on_constrained_request: Any = None  # kind -> None (a metrics counter)

    @property
    def engine(self) -> ServedEngine:
        return self.async_engine.engine

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    # ---- shared helpers ----

    def check_model(self, name: str | None) -> None:
        if name is None or name in self.served_model_names or name == self.engine.config.model:
            return
        raise model_not_found(name)

    def _sampling_params_class(self) -> Any:
        if self._sampling_params_cls is None:
            from kubellm.engine.sampling_params import SamplingParams

            self._sampling_params_cls = SamplingParams
        return self._sampling_params_cls

    def build_params(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        prompt_len: int,
        logprobs: int | None,
        plan: ToolPlan | None = None,
    ) -> Any:
        """SamplingParams from the request, with the model's generation_config defaults for omitted fields."""
        cls = self._sampling_params_class()
        defaults = dict(self.engine.default_sampling_params() or {})
        max_len = self.engine.max_model_len
        budget = req.token_budget() if isinstance(req, ChatCompletionRequest) else req.max_tokens
        room = max_len - prompt_len
        param = "max_tokens" if isinstance(req, CompletionRequest) or req.max_tokens is not None else None
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            param = "max_completion_tokens"
        if budget is not None and budget > room:
            raise bad_request(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_len + budget} tokens ({prompt_len} in the prompt, {budget} for the completion). "
                "Please reduce the prompt or the completion length.",
                param,
                "context_length_exceeded",
            )
        if logprobs is not None and logprobs > self.max_logprobs:
            raise bad_request(f"logprobs: at most {self.max_logprobs} are supported", "logprobs")
        kw: dict[str, Any] = {
            "n": req.n or 1,
            "max_tokens": budget if budget is not None else room,
            "seed": req.seed,
            "stop": req.stop_list(),
            "min_tokens": req.min_tokens,
            "ignore_eos": req.ignore_eos,
            "skip_special_tokens": req.skip_special_tokens,
            "include_stop_str_in_output": req.include_stop_str_in_output,
        }
        if req.stop_token_ids:
            kw["stop_token_ids"] = list(req.stop_token_ids)
        if plan is not None and self._parses_output(plan) and "skip_special_tokens" not in req.model_fields_set:
            kw["skip_special_tokens"] = False  # tool-call and think markers are special tokens in many vocabularies
        try:
            constraint = req.constraint()
        except ValueError as e:
            raise bad_request(str(e), str(e).split(":", 1)[0], "invalid_value") from e
        schema = forced_calls_schema(plan) if plan is not None else None
        if schema is not None and constraint is not None:
            raise bad_request(
                f"{constraint[1]}: an output constraint cannot be combined with a forced tool_choice",
                constraint[1],
                "invalid_value",
            )
        if schema is not None:
            kw["structured_outputs"] = self._forced_calls_constraint(schema)
        elif constraint is not None:
            kw["structured_outputs"] = constraint[0]
        if logprobs is not None:
            kw["logprobs"] = logprobs
        for name in _SAMPLING_FIELDS:
            value = getattr(req, name)
            if value is None:
                value = defaults.get(name)
            if value is not None:
                kw[name] = value
        known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
        if known is not None:
            for name in list(kw):
                if name in known:
                    continue
                if name in req.model_fields_set or name in ("stop_token_ids", "logprobs"):
                    raise UnsupportedField(name)
                del kw[name]  # a default we pass only where the engine knows the field
        try:
            return cls(**kw)
        except ValueError as e:
            raise from_value_error(e, kw.keys()) from e

    async def compile_constraint(self, req: CompletionRequest | ChatCompletionRequest, params: Any) -> None:
        """Compile the request's output constraint on a worker thread (the engine thread then finds it in the
        cache), bounded in time: an invalid or too costly constraint is a 400 naming its field."""
        spec = getattr(params, "structured_outputs", None)
        if spec is None:
            return
        given = req.constraint()
        field = given[1] if given is not None else "tools"  # else: a forced tool_choice's arguments schema
        manager = getattr(self.engine, "structured_outputs", None)
        if manager is None:
            raise UnsupportedField(field, "(structured outputs) is not supported by this engine")
        from kubellm.engine.structured_output import GrammarError

        loop = asyncio.get_running_loop()
        try:
            manager.check_size(spec)
            await loop.run_in_executor(None, lambda: manager.backend)  # first use wraps the tokenizer, untimed
            await asyncio.wait_for(loop.run_in_executor(None, manager.compile, spec), self.compile_timeout_s)
        except GrammarError as e:
            raise bad_request(f"{field}: {e}", field, "invalid_value") from e
        except TimeoutError as e:
            raise bad_request(
                f"{field}: compiling the constraint took longer than {self.compile_timeout_s:g} s; simplify it",
                field,
                "invalid_value",
            ) from e
        if self.on_constrained_request is not None:
            self.on_constrained_request(spec.kind)

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range for this model's vocabulary of {vocab}", param)

    def _check_prompt_len(self, n: int, param: str) -> None:
        max_len = self.engine.max_model_len
        if n == 0:
            raise bad_request("the prompt is empty", param)
        if n >= max_len:
            raise bad_request(
                f"This model's maximum context length is {max_len} tokens. However, your prompt has {n} tokens; "
                "it must be shorter than that to leave room for the completion.",
                param,
                "context_length_exceeded",
            )

    async def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        renderer = self.engine.renderer
        if len(text) < LONG_PROMPT_CHARS:
            return renderer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.get_running_loop().run_in_executor(None, renderer.encode, text, add_special_tokens)

    def _unique_id(self, base: str) -> str:
        return base if base not in self.async_engine._active else f"{base}-{uuid.uuid4().hex[:8]}"

    def _submit(
        self, base_id: str, prompts: list[_Prompt], params: Any, priority: int, cache_salt: str | None = None
    ) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for i, p in enumerate(prompts):
                rid = self._unique_id(base_id if len(prompts) == 1 else f"{base_id}-{i}")
                streams.append(
                    self.async_engine.add_request(
                        rid, p.token_ids, params, prompt=p.text, priority=priority, cache_salt=cache_salt
                    )
                )
        except BaseException:
            self._release(streams)
            raise
        return streams

    def _release(self, streams: list[RequestStream]) -> None:
        for s in streams:
            if not s.finished or s.aborted:
                self.async_engine.release(s.request_id)

    def _decoded(self, token_id: int, lp: Any) -> str:
        tok = getattr(lp, "decoded_token", None)
        if tok is None:
            tok = self.engine.renderer.decode([token_id], skip_special_tokens=False)
        return tok

    # ---- completions ----

    async def prepare_completion(self, req: CompletionRequest) -> list[_Prompt]:
        req.check_supported()
        self.check_model(req.model)
        prompts: list[_Prompt] = []
        for p in req.prompts():
            if isinstance(p, str):
                ids = await self._encode(p, req.add_special_tokens)
                prompts.append(_Prompt(ids, p))
            else:
                self._check_token_ids(p, "prompt")
                prompts.append(_Prompt(list(p), None))
            self._check_prompt_len(len(prompts[-1].token_ids), "prompt")
        return prompts

    def _prompt_text(self, p: _Prompt) -> str:
        if p.text is None:
            p.text = self.engine.renderer.decode(p.token_ids, skip_special_tokens=False)
        return p.text

    def _completion_logprobs(self, c: Any, offset: int, k: int) -> CompletionLogprobs:
        lps = CompletionLogprobs()
        for tid, entry in zip(c.token_ids, c.logprobs or [], strict=False):
            chosen = entry.get(tid)
            tok = self._decoded(tid, chosen)
            lps.tokens.append(tok)
            lps.token_logprobs.append(chosen.logprob if chosen is not None else None)
            top = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
            lps.top_logprobs.append({self._decoded(t, lp): lp.logprob for t, lp in top[: max(k, 1)]})
            lps.text_offset.append(offset)
            offset += len(tok)
        return lps

    async def completion(self, req: CompletionRequest, request_id: str) -> CompletionResponse:
        prompts = await self.prepare_completion(req)
        params = self.build_params(req, max(len(p.token_ids) for p in prompts), req.logprobs)
        await self.compile_constraint(req, params)
        streams = self._submit(request_id, prompts, params, req.priority, req.cache_salt)
        tally = _Tally()
        try:
            finals = await asyncio.gather(*(_whole_output(s) for s in streams))
        finally:
            self._release(streams)
        n = req.n or 1
        choices: list[CompletionChoice] = []
        for i, (p, out) in enumerate(zip(prompts, finals, strict=True)):
            tally.prompt_tokens[i] = len(p.token_ids)
            if out is not None:
                tally.record(i, out)
            echo = self._prompt_text(p) if req.echo else ""
            for j in range(n):
                c = _choice(out, j)
                text = echo + (c.text if c else "")
                lps = None
                if req.logprobs is not None and c is not None:
                    lps = self._completion_logprobs(c, len(echo), req.logprobs)
                reason = (c.finish_reason if c else None) or "abort"
                choices.append(
                    CompletionChoice(
                        index=i * n + j,
                        text=text,
                        logprobs=lps,
                        finish_reason=reason,
                        stop_reason=_stop_reason(c),
                        prompt_token_ids=p.token_ids if req.return_token_ids else None,
                        token_ids=_token_ids(c) if req.return_token_ids else None,
                    )
                )
        return CompletionResponse(
            id=f"cmpl-{request_id}", model=req.model or self.model_name, choices=choices, usage=tally.usage()
        )

    async def completion_stream(self, req: CompletionRequest, request_id: str) -> AsyncIterator[bytes]:
        """Validates and submits first (errors raise before any byte), then returns the chunk generator."""
        prompts = await self.prepare_completion(req)
        params = self.build_params(req, max(len(p.token_ids) for p in prompts), req.logprobs)
        await self.compile_constraint(req, params)
        streams = self._submit(request_id, prompts, params, req.priority, req.cache_salt)
        return _errors_in_band(self._completion_chunks(req, request_id, prompts, streams))

    async def _completion_chunks(
        self, req: CompletionRequest, request_id: str, prompts: list[_Prompt], streams: list[RequestStream]
    ) -> AsyncIterator[bytes]:
        n = req.n or 1
        model = req.model or self.model_name
        rid = f"cmpl-{request_id}"
        created = int(time.time())
        states = {(i, j): _ChoiceState() for i in range(len(prompts)) for j in range(n)}
        tally = _Tally(prompt_tokens={i: len(p.token_ids) for i, p in enumerate(prompts)})
        try:
            async for i, out in _merge(streams):
                choices: list[CompletionChoice] = []
                if out is not None:
                    tally.record(i, out)
                for j in range(n):
                    st = states[(i, j)]
                    if st.finished:
                        continue
                    c = _choice(out, j)
                    if c is None and out is not None:
                        continue
                    text = c.text if c else ""
                    if req.echo and not st.started:
                        text = self._prompt_text(prompts[i]) + text
                    reason = c.finish_reason if c else "abort"
                    if out is None:  # the stream ended without finishing: aborted
                        reason = reason or "abort"
                    if not text and reason is None:
                        continue
                    lps = None
                    if req.logprobs is not None and c is not None:
                        lps = self._completion_logprobs(c, 0, req.logprobs)
                    choices.append(
                        CompletionChoice(
                            index=i * n + j, text=text, logprobs=lps, finish_reason=reason, stop_reason=_stop_reason(c)
                        )
                    )
                    st.started = True
                    st.finished = reason is not None
                if choices:
                    usage = tally.usage() if req.stream_options and req.stream_options.continuous_usage_stats else None
                    yield sse_data(
                        CompletionStreamResponse(id=rid, created=created, model=model, choices=choices, usage=usage)
                    )
            if req.include_usage():
                yield sse_data(CompletionStreamResponse(id=rid, created=created, model=model, usage=tally.usage()))
            yield DONE
        finally:
            self._release(streams)

    # ---- chat ----

    def render_chat(self, req: ChatCompletionRequest | TokenizeRequest, add_generation_prompt: bool = True) -> str:
        """The prompt text of a chat (or chat tokenize) request: the core's one path, which the router's
        prefix hashing also takes."""
        try:
            return self.engine.renderer.render_chat(
                [m.model_dump(exclude_none=True) for m in req.messages or ()],
                add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template_kwargs=req.chat_template_kwargs,
                tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
            )
        except ChatTemplateKwargsError as e:
            raise bad_request(str(e), "chat_template_kwargs") from e
        except ChatTemplateError as e:
            raise bad_request(str(e), "messages") from e

    async def prepare_chat(self, req: ChatCompletionRequest) -> _Prompt:
        req.check_supported()
        self.check_model(req.model)
        text = self.render_chat(req, req.add_generation_prompt)
        ids = await self._encode(text, False)
        self._check_prompt_len(len(ids), "messages")
        return _Prompt(ids, text)

    def _parses_output(self, plan: ToolPlan) -> bool:
        return plan.mode != "none" or self.chat_parsing.reasoning_parser is not None

    def _forced_calls_constraint(self, schema: dict[str, Any]) -> Any:
        """The structured-outputs constraint that makes a forced tool choice always parse."""
        try:
            from kubellm.engine.sampling_params import StructuredOutputsParams
        except ImportError as e:
            raise UnsupportedField("tool_choice", "required or a named function needs structured outputs") from e
        try:
            return StructuredOutputsParams(json=schema)
        except ValueError as e:
            raise bad_request(f"tools: a function's parameters are not a usable JSON schema: {e}", "tools") from e

    def _output_parser(self, req: ChatCompletionRequest, plan: ToolPlan, prompt: _Prompt) -> ChatOutputParser | None:
        return output_parser(plan, self.chat_parsing, prompt.text or "", req.chat_template_kwargs)

    def _chat_logprobs_k(self, req: ChatCompletionRequest) -> int | None:
        return (req.top_logprobs or 0) if req.logprobs else None

    def _chat_logprobs(self, c: Any, k: int) -> ChatChoiceLogprobs:
        content: list[ChatTokenLogprob] = []
        for tid, entry in zip(c.token_ids, c.logprobs or [], strict=False):
            chosen = entry.get(tid)
            tok = self._decoded(tid, chosen)
            top = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)[:k]
            content.append(
                ChatTokenLogprob(
                    token=tok,
                    logprob=chosen.logprob if chosen is not None else float("-inf"),
                    bytes=list(tok.encode("utf-8")),
                    top_logprobs=[
                        TopLogprob(token=(s := self._decoded(t, lp)), logprob=lp.logprob, bytes=list(s.encode("utf-8")))
                        for t, lp in top
                    ],
                )
            )
        return ChatChoiceLogprobs(content=content)

    def _echo_text(self, req: ChatCompletionRequest) -> str:
        if req.echo and req.messages and req.messages[-1].role == "assistant":
            return req.messages[-1].text()
        return ""

    async def chat(self, req: ChatCompletionRequest, request_id: str) -> ChatCompletionResponse:
        prompt = await self.prepare_chat(req)
        plan = plan_tools(req, self.chat_parsing)
        k = self._chat_logprobs_k(req)
        params = self.build_params(req, len(prompt.token_ids), k, plan)
        await self.compile_constraint(req, params)
        streams = self._submit(request_id, [prompt], params, req.priority, req.cache_salt)
        try:
            out = await _whole_output(streams[0])
        finally:
            self._release(streams)
        tally = _Tally(prompt_tokens={0: len(prompt.token_ids)})
        if out is not None:
            tally.record(0, out)
        echo = self._echo_text(req)
        choices = []
        for j in range(req.n or 1):
            c = _choice(out, j)
            message = ChatResponseMessage(content=echo + (c.text if c else ""))
            reason = (c.finish_reason if c else None) or "abort"
            parser = self._output_parser(req, plan, prompt)
            if parser is not None:
                parsed = parser.parse_whole(c.text if c else "")
                calls = message_tool_calls(parsed.tool_calls)
                message = ChatResponseMessage(
                    content=(echo + (parsed.content or "")) or None,  # as a stream rebuilds it: none sent
                    tool_calls=calls,
                    reasoning_content=parsed.reasoning,
                    reasoning=parsed.reasoning,
                )
                reason = finish_reason(reason, bool(calls))
            choices.append(
                ChatCompletionChoice(
                    index=j,
                    message=message,
                    logprobs=self._chat_logprobs(c, k) if k is not None and c is not None else None,
                    finish_reason=reason,
                    stop_reason=_stop_reason(c),
                    token_ids=_token_ids(c) if req.return_token_ids else None,
                )
            )
        return ChatCompletionResponse(
            id=f"chatcmpl-{request_id}",
            model=req.model or self.model_name,
            choices=choices,
            usage=tally.usage(),
            prompt_token_ids=prompt.token_ids if req.return_token_ids else None,
        )

    async def chat_stream(self, req: ChatCompletionRequest, request_id: str) -> AsyncIterator[bytes]:
        prompt = await self.prepare_chat(req)
        plan = plan_tools(req, self.chat_parsing)
        k = self._chat_logprobs_k(req)
        params = self.build_params(req, len(prompt.token_ids), k, plan)
        await self.compile_constraint(req, params)
        streams = self._submit(request_id, [prompt], params, req.priority, req.cache_salt)
        parsers = [self._output_parser(req, plan, prompt) for _ in range(req.n or 1)]
        return _errors_in_band(self._chat_chunks(req, request_id, prompt, streams, k, parsers))

    async def _chat_chunks(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        prompt: _Prompt,
        streams: list[RequestStream],
        k: int | None,
        parsers: list[ChatOutputParser | None],
    ) -> AsyncIterator[bytes]:
        n = req.n or 1
        model = req.model or self.model_name
        rid = f"chatcmpl-{request_id}"
        created = int(time.time())
        states = [_ChoiceState() for _ in range(n)]
        tally = _Tally(prompt_tokens={0: len(prompt.token_ids)})
        echo = self._echo_text(req)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

        def chunk(choices: list[ChatStreamChoice]) -> bytes:
            usage = tally.usage() if continuous else None
            return sse_data(
                ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=choices, usage=usage)
            )

        try:
            async for _, out in _merge(streams):
                if out is not None:
                    tally.record(0, out)
                choices: list[ChatStreamChoice] = []
                for j, st in enumerate(states):
                    if st.finished:
                        continue
                    c = _choice(out, j)
                    if c is None and out is not None:
                        continue
                    if not st.started:  # OpenAI's first chunk per choice: the role, empty content
                        # (none where the answer may be only tool calls: their message content is null)
                        first = DeltaMessage(role="assistant", content="" if parsers[j] is None else None)
                        yield chunk([ChatStreamChoice(index=j, delta=first)])
                        st.started = True
                        if echo:
                            yield chunk([ChatStreamChoice(index=j, delta=DeltaMessage(content=echo))])
                    text = c.text if c else ""
                    reason = c.finish_reason if c else "abort"
                    if out is None:
                        reason = reason or "abort"
                    if not text and reason is None:
                        continue
                    delta = DeltaMessage(content=text) if text else DeltaMessage()
                    parser = parsers[j]
                    if parser is not None:
                        delta, has_calls = _parsed_delta(parser, text, reason is not None)
                        st.has_calls = st.has_calls or has_calls
                        reason = finish_reason(reason, st.has_calls)
                        if delta == DeltaMessage() and reason is None:
                            st.hold(c)  # held back: it may be part of a marker; its logprobs go with the next chunk
                            continue
                    c = st.release(c)
                    lps = self._chat_logprobs(c, k) if k is not None and c is not None else None
                    choices.append(
                        ChatStreamChoice(
                            index=j, delta=delta, logprobs=lps, finish_reason=reason, stop_reason=_stop_reason(c)
                        )
                    )
                    st.finished = reason is not None
                if choices:
                    yield chunk(choices)
            if req.include_usage():
                yield sse_data(ChatCompletionStreamResponse(id=rid, created=created, model=model, usage=tally.usage()))
            yield DONE
        finally:
            self._release(streams)


def _parsed_delta(parser: ChatOutputParser, text: str, final: bool) -> tuple[DeltaMessage, bool]:
    """The stream delta of new text once parsed, and whether it carries tool calls."""
    parsed = parser.feed(text) if text else ParsedDelta()
    if final:
        parsed.extend(parser.finish())
    calls = delta_tool_calls(parsed.tool_calls)
    reasoning = parsed.reasoning or None
    delta = DeltaMessage(
        content=parsed.content or None, reasoning_content=reasoning, reasoning=reasoning, tool_calls=calls or None
    )
    return delta, bool(calls)


def _choice(out: Any, j: int) -> Any:
    if out is None:
        return None
    for c in out.outputs:
        if c.index == j:
            return c
    return out.outputs[j] if j < len(out.outputs) else None


def _token_ids(c: Any) -> list[int]:
    return list(c.token_ids) if c is not None else []


def _stop_reason(c: Any) -> int | str | None:
    reason = getattr(c, "stop_reason", None) if c is not None else None
    return reason if isinstance(reason, (int, str)) else None


async def _errors_in_band(gen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An engine error before the first chunk propagates (the handler answers with an HTTP status); after
    it, the headers are sent, so the error travels as a final SSE event."""
    sent = False
    try:
        async for chunk in gen:
            sent = True
            yield chunk
    except APIError as e:
        if not sent:
            raise
        yield sse_error(e.status, e.message, e.param, e.code)
        yield DONE
    finally:
        await gen.aclose()  # type: ignore[attr-defined]


async def _whole_output(stream: RequestStream) -> Any:
    """The request's deltas assembled into its whole output (None if it was aborted before any)."""
    whole = None
    async for out in stream.updates():
        if whole is None:
            whole = out
        else:
            whole.add(out)
    return whole


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """Interleaves several requests' outputs as (prompt index, output); (i, None) marks a stream that ended
    without a finished output (aborted). Engine errors propagate as APIError."""
    if len(streams) == 1:
        s = streams[0]
        async for out in s.updates():
            yield 0, out
        if s.aborted:
            yield 0, None
        return
    q: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s.updates():
                q.put_nowait((i, out, None, False))
        except APIError as e:
            q.put_nowait((i, None, e, True))
            return
        q.put_nowait((i, None, None, True))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, out, err, done = await q.get()
            if err is not None:
                raise err
            if done:
                remaining -= 1
                if streams[i].aborted:
                    yield i, None
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
