"""Prompt rendering shared by engine and router: chat template + tokenizer -> token ids.

The one path from a chat request to its prompt token ids: the engine's server, the offline `LLM.chat` and the
router all call `PromptRenderer.chat_token_ids` (or `render_chat`) with the request's own JSON messages and
options. The router has no model files: it fetches `TokenizerInfo` from an engine's /v1/tokenizer_info and
builds the same `PromptRenderer`, so both derive identical token ids and therefore identical block hashes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from functools import cached_property
from typing import Any, Literal

import jinja2
import jinja2.sandbox
from pydantic import BaseModel
from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    """The chat template rejected the conversation (e.g. roles out of order)."""


class ChatTemplateKwargsError(ChatTemplateError):
    """`chat_template_kwargs` names a variable the renderer sets itself."""


# Variables the renderer passes to every template; chat_template_kwargs may not override them.
_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})
# A tool's function fields as templates read them, in one order so that engine and router render the same text
# whatever order a client wrote them in.
_TOOL_FUNCTION_FIELDS = ("name", "description", "parameters", "strict")
# Message fields chat templates read (as vLLM hands them over); anything else in a message is not shown to them.
_MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id", "reasoning_content")


ContentFormat = Literal["auto", "string", "openai"]


def template_message(message: Mapping[str, Any], content_format: ContentFormat = "string") -> dict[str, Any]:
    """One OpenAI chat message as chat templates take it (vLLM's conversion): text content parts joined by
    newlines into one string (with content format "openai": a list of text parts, a string becoming one part), a
    missing content as "", and tool-call arguments (a JSON string on the wire) parsed into the object Hugging Face
    templates expect to `tojson`."""
    if not isinstance(message, Mapping):
        raise ChatTemplateError("a message must be an object")
    content = message.get("content")
    texts = [content] if isinstance(content, str) else []
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
    if content_format == "openai" and content is not None:
        content = [{"type": "text", "text": t} for t in texts]
    else:
        content = "\n".join(texts)
    out: dict[str, Any] = {"role": message.get("role"), "content": content or ""}
    for key in _MESSAGE_FIELDS:
        if message.get(key) is not None:
            out[key] = message[key]
    if "reasoning_content" not in out and message.get("reasoning") is not None:
        out["reasoning_content"] = message["reasoning"]  # vLLM's newer name for it, as clients send answers back
    if isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [_template_tool_call(c) for c in out["tool_calls"]]
    return out


def _last_text(content: str | list[dict[str, Any]]) -> str:
    """The text a continued final message ends with: its string, or (content format "openai") its last part's."""
    if isinstance(content, list):
        return str(content[-1]["text"]) if content else ""
    return content


def _template_tool_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except (ValueError, RecursionError):
        return call  # not JSON (or nested beyond the parser): the template sees the string as sent
    return {**call, "function": {**function, "arguments": arguments}}


def template_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """One OpenAI tool (`{"type": "function", "function": {...}}`) as chat templates take it (`tools | tojson`)."""
    function = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping):
        raise ChatTemplateError('a tool must be an object {"type": "function", "function": {...}}')
    fields = {k: function[k] for k in _TOOL_FUNCTION_FIELDS if function.get(k) is not None}
    return {"type": tool.get("type") or "function", "function": fields}


def detect_content_format(template: str) -> ContentFormat:
    """ "openai" when the template loops over a message's `content` (it expects a list of parts), else "string"."""
    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"
    for loop in ast.find_all(jinja2.nodes.For):
        it: jinja2.nodes.Node | None = loop.iter
        if isinstance(it, jinja2.nodes.Filter):  # e.g. `message.content | selectattr(...)`
            it = it.node
        if isinstance(it, jinja2.nodes.Getattr) and it.attr == "content":
            return "openai"
        if (
            isinstance(it, jinja2.nodes.Getitem)
            and isinstance(it.arg, jinja2.nodes.Const)
            and it.arg.value == "content"
        ):
            return "openai"
    return "string"


class TokenizerInfo(BaseModel):
    """What a router needs to render and tokenize exactly as the engine does (GET /v1/tokenizer_info)."""

    tokenizer_json: str
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False
    model_max_length: int | None = None
    # how message content reaches the template (vLLM's --chat-template-content-format); auto: what it iterates
    chat_template_content_format: ContentFormat = "auto"


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class PromptRenderer:
    """Renders chat conversations with a Hugging Face-style Jinja chat template and tokenizes text."""

    def __init__(self, info: TokenizerInfo):
        self.info = info
        self.tokenizer = Tokenizer.from_str(info.tokenizer_json)
        self.bos_token_id = self.tokenizer.token_to_id(info.bos_token) if info.bos_token else None
        self.eos_token_id = self.tokenizer.token_to_id(info.eos_token) if info.eos_token else None

    @cached_property
    def _template(self) -> jinja2.Template | None:
        if not self.info.chat_template:
            return None
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        return env.from_string(self.info.chat_template)

    @cached_property
    def content_format(self) -> ContentFormat:
        """ "string" or "openai": the configured format, or for "auto" the one the template reads."""
        if self.info.chat_template_content_format != "auto" or not self.info.chat_template:
            return "openai" if self.info.chat_template_content_format == "openai" else "string"
        return detect_content_format(self.info.chat_template)

    def render_chat(
        self,
        messages: Iterable[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Iterable[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text of a chat request, from its JSON messages and vLLM's options: with
        `continue_final_message` the text ends with the last (assistant) message's content, so generation
        continues it instead of opening a new turn. The request's `tools` (whatever its tool_choice, as vLLM
        does) reach the template as `tools`, None when it has none."""
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use the completions API")
        kwargs = dict(chat_template_kwargs or {})
        reserved = sorted(_TEMPLATE_VARIABLES & kwargs.keys())
        if reserved:
            raise ChatTemplateKwargsError(f"chat_template_kwargs may not set {', '.join(reserved)}")
        msgs = [template_message(m, self.content_format) for m in messages]
        template_tools = [template_tool(t) for t in tools] if tools else None
        try:
            text = self._template.render(
                messages=msgs,
                tools=template_tools,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                bos_token=self.info.bos_token or "",
                eos_token=self.info.eos_token or "",
                **kwargs,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e
        final = _last_text(msgs[-1]["content"]) if continue_final_message and msgs else ""
        cut = text.rfind(final) if final else -1
        return text[: cut + len(final)] if cut >= 0 else text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize text; a BOS is added when the model wants one and the text does not start with it."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if (
            add_special_tokens
            and self.info.add_bos_token
            and self.bos_token_id is not None
            and not (ids and ids[0] == self.bos_token_id)
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def chat_token_ids(
        self,
        messages: Iterable[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Iterable[Mapping[str, Any]] | None = None,
        encode: Callable[[str], list[int]] | None = None,
    ) -> list[int]:
        """A chat request's prompt token ids. `encode` may replace plain encoding with an equal but faster one
        (the router's segment cache); the template writes the BOS itself where the model wants one."""
        text = self.render_chat(
            messages,
            add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
        )
        return encode(text) if encode is not None else self.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
