"""Request and response bodies of the OpenAI-compatible API, validated at the boundary.

Requests forbid unknown top-level fields as OpenAI does ("Unrecognized request argument"), and accept
vLLM's sampling extensions (top_k, min_p, repetition_penalty, ...) that OpenAI clients pass via
`extra_body`. Fields OpenAI defines that we do not implement are accepted when ignoring them cannot change
the result (metadata, store, user, ...) and refused otherwise (the deprecated functions, logit_bias, ...).

Constraints on the output come in three spellings, all turned into one `StructuredOutputsParams`: OpenAI's
`response_format` (json_object, json_schema; vLLM takes it on completions too), vLLM's `structured_outputs` object,
and vLLM's older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` keys. A request gives at most
one constraint.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from kubellm.engine.sampling_params import StructuredOutputsParams
from kubellm.openai_protocol import ErrorInfo, ErrorResponse, ModelCard, ModelList

__all__ = [
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionStreamResponse",
    "ChatMessage",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamResponse",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "ErrorInfo",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "TokenizeRequest",
    "TokenizeResponse",
    "UnsupportedField",
    "UsageInfo",
]

MAX_N = 128
MAX_TOP_LOGPROBS = 20


class UnsupportedField(ValueError):
    """A field OpenAI defines whose semantics kubellm does not implement; ignoring it would change results."""

    def __init__(self, field: str, reason: str = "is not supported by kubellm"):
        super().__init__(f"{field} {reason}")
        self.field = field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False
    include_obfuscation: bool | None = None  # OpenAI's side-channel padding; nothing to obfuscate locally


class StructuredOutputsField(_Request):
    """vLLM's `structured_outputs` request object (the keys kubellm implements)."""

    json_: dict[str, Any] | str | bool | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None

    def params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(
            json=self.json_,
            regex=self.regex,
            choice=self.choice,
            grammar=self.grammar,
            json_object=bool(self.json_object),
            whitespace_pattern=self.whitespace_pattern,
        )


class JSONSchemaFormat(_Request):
    """OpenAI's `response_format.json_schema`. The schema is enforced whether or not `strict` is set."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema is only allowed with type json_schema, not {self.type!r}")
        return self

    def params(self) -> StructuredOutputsParams:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        assert self.json_schema is not None
        schema = self.json_schema.schema_ if self.json_schema.schema_ is not None else {}
        return StructuredOutputsParams(json=schema)


class _SamplingFields(_Request):
    """Fields shared by completions and chat: OpenAI's, then vLLM's extensions."""

    model: str | None = None
    n: int | None = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    request_id: str | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=256)
    return_token_ids: bool = False  # the response carries the prompt's and each choice's token ids
    response_format: ResponseFormat | None = None  # json_object / json_schema (vLLM takes it on completions too)
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: llguidance serves every constraint

    @field_validator("stop")
    @classmethod
    def _stop_strings_nonempty(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _ids_nonnegative(cls, v: list[int] | None) -> list[int] | None:
        if v and any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v

    def check_supported(self) -> None:
        if self.logit_bias:
            raise UnsupportedField("logit_bias")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "is only allowed when stream is true")
        if self.return_token_ids and self.stream:
            raise UnsupportedField("return_token_ids", "is supported without streaming only")

    def constraint(self) -> tuple[StructuredOutputsParams, str] | None:
        """The request's output constraint and the field that gave it; ValueError naming the field when it is
        invalid or when two fields give one."""
        found: list[tuple[str, Any]] = []
        if self.structured_outputs is not None:
            found.append(("structured_outputs", self.structured_outputs.params))
        guided = {
            "guided_json": "json",
            "guided_regex": "regex",
            "guided_choice": "choice",
            "guided_grammar": "grammar",
        }
        for name, key in guided.items():
            if getattr(self, name) is not None:
                value = getattr(self, name)
                pattern = self.guided_whitespace_pattern
                found.append(
                    (name, lambda k=key, v=value, w=pattern: StructuredOutputsParams(**{k: v}, whitespace_pattern=w))
                )
        found += self._response_format_constraint()
        if not found:
            return None
        if len(found) > 1:
            names = ", ".join(name for name, _ in found)
            raise ValueError(f"{found[1][0]}: give one output constraint per request, not {names}")
        name, build = found[0]
        try:
            return build(), name
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    def _response_format_constraint(self) -> list[tuple[str, Any]]:
        if self.response_format is None or self.response_format.type == "text":
            return []
        return [("response_format", self.response_format.params)]

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt_nonempty(cls, v: Prompt) -> Prompt:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if isinstance(v[0], list) and any(not p for p in v):
                raise ValueError("token-id prompts must not be empty")
            if any(isinstance(t, int) and t < 0 for t in v):
                raise ValueError("token ids must be non-negative")
            if any(isinstance(p, list) and any(t < 0 for t in p) for p in v):
                raise ValueError("token ids must be non-negative")
        return v

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise UnsupportedField("suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedField("best_of", "other than n is not supported by kubellm")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported (text only)")
        if self.text is None:
            raise ValueError("a text content part needs `text`")
        return self


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # only an assistant turn may omit its content (it may carry tool calls instead), as OpenAI checks
    content: str | list[ContentPart] | None = Field(default=None, validate_default=True)
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name for reasoning_content

    @field_validator("content")
    @classmethod
    def _content_given(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if value is None and role is not None and role != "assistant":
            raise ValueError(
                f"Invalid value for 'content': expected a string or content parts, got null ({role} message)"
            )
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    # vLLM extensions
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _tool_choice(cls, v: Any, handler: Any) -> Any:
        try:
            return handler(v)
        except ValidationError:  # one message instead of one per member of the union
            raise ValueError(
                'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
            ) from None

    def check_supported(self) -> None:
        super().check_supported()
        if self.functions:
            raise UnsupportedField("functions", "(function calling) is not supported by kubellm")
        if self.function_call not in (None, "none", "auto"):
            raise UnsupportedField("function_call", "is not supported by kubellm")
        if self.modalities and any(m != "text" for m in self.modalities):
            raise UnsupportedField("modalities", "other than text are not supported")
        if self.audio:
            raise UnsupportedField("audio")
        if self.prediction:
            raise UnsupportedField("prediction")
        if self.top_logprobs and not self.logprobs:
            raise UnsupportedField("top_logprobs", "requires logprobs to be true")
        if self.continue_final_message and self.add_generation_prompt:
            raise UnsupportedField(
                "continue_final_message", "cannot be combined with add_generation_prompt=true; set it to false"
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise UnsupportedField("continue_final_message", "needs the last message to be from the assistant")

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _nonnegative(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v


# ---- responses ----


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


def _absent_if_none(value: Any) -> bool:
    return value is None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # with return_token_ids (vLLM's extension) only
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_absent_if_none)
    token_ids: list[int] | None = Field(None, exclude_if=_absent_if_none)


def _now() -> int:
    return int(time.time())


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = Field(None, exclude_if=_absent_if_none)  # OpenAI's schema: a string or absent


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None  # required (nullable) by OpenAI's schema; kubellm never refuses


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    # with --reasoning-parser: vLLM's field, under its older and its newer name
    reasoning_content: str | None = Field(None, exclude_if=_absent_if_none)
    reasoning: str | None = Field(None, exclude_if=_absent_if_none)


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = Field(None, exclude_if=_absent_if_none)  # with return_token_ids only


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = Field(None, exclude_if=_absent_if_none)  # OpenAI's schema: a string or absent
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_absent_if_none)  # with return_token_ids only


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice] = Field(default_factory=list)
    usage: UsageInfo | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
