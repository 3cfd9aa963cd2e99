"""Tools and reasoning for one chat request: what `tools`/`tool_choice` ask for, the JSON schema that forces
calls, and the parser that splits the generated text into reasoning, content and tool calls.

No HTTP and no engine here: serving.py asks `plan_tools` before generating and feeds the output through the
parser `output_parser` builds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from kubellm.config_flags import option
from kubellm.engine.config import CHAT_TEMPLATE_CONTENT_FORMATS  # noqa: F401  (its home was here)

from .chat_output import ChatOutputParser
from .errors import bad_request
from .reasoning_parsers import REASONING_PARSERS, make_reasoning_parser
from .tool_parsers import TOOL_PARSERS, ToolCall, ToolCallDelta, ToolParser
from .tool_parsers.forced import NamedCallParser, RequiredCallsParser


@dataclass(frozen=True)
class ChatParsingConfig:
    """The server's `--tool-call-parser`, `--reasoning-parser` and `--enable-auto-tool-choice` (flags generated
    from these fields)."""

    tool_call_parser: str | None = option(
        None, choices=sorted(TOOL_PARSERS), help="the model's tool-call output format"
    )
    reasoning_parser: str | None = option(
        None, choices=REASONING_PARSERS, help="split the model's reasoning into reasoning_content"
    )
    enable_auto_tool_choice: bool = option(
        False, help="let the model decide to call tools (tool_choice auto); needs --tool-call-parser"
    )


@dataclass(frozen=True)
class ToolPlan:
    mode: Literal["none", "auto", "required", "named"]
    tools: list[dict[str, Any]]  # as the chat template receives them (OpenAI's tool objects)
    function: str | None = None  # the named choice
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


def plan_tools(req: Any, config: ChatParsingConfig) -> ToolPlan:
    """The request's tool use, checked: a bad combination is a 400 naming the field (OpenAI's and vLLM's rules)."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
    choice = req.tool_choice
    parallel = req.parallel_tool_calls is not False
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice != "none":
            raise bad_request("tool_choice needs tools: give the functions the model may call", "tool_choice")
        return ToolPlan("none", [])
    names = [t["function"]["name"] for t in tools]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise bad_request(f"tools: function name(s) given more than once: {', '.join(duplicated)}", "tools")
    if choice == "none":
        return ToolPlan("none", tools)
    if choice == "auto":
        if not (config.enable_auto_tool_choice and config.tool_call_parser):
            raise bad_request(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                "tool_choice",
            )
        return ToolPlan("auto", tools, parallel=parallel)
    if choice == "required":
        return ToolPlan("required", tools, parallel=parallel)
    name = choice.function.name
    if name not in names:
        raise bad_request(f"tool_choice names function {name!r}, which is not among the tools", "tool_choice")
    return ToolPlan("named", tools, function=name, parallel=False)


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def forced_calls_schema(plan: ToolPlan) -> dict[str, Any] | None:
    """The JSON schema the output is constrained to when calls are forced (vLLM's shapes), else None.

    Named: the function's arguments object. Required: an array of `{"name", "parameters"}`, one item per call.
    """
    if plan.mode == "named":
        tool = next(t for t in plan.tools if t["function"]["name"] == plan.function)
        return _parameters(tool)
    if plan.mode != "required":
        return None
    items = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]}, "parameters": _parameters(t)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in plan.tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not plan.parallel:
        schema["maxItems"] = 1
    return schema


def output_parser(
    plan: ToolPlan,
    config: ChatParsingConfig,
    prompt: str,
    chat_template_kwargs: dict[str, Any] | None,
) -> ChatOutputParser | None:
    """A fresh parser for one choice, or None when the text is all content (no tools in play, no reasoning)."""
    tools: ToolParser | None = None
    if plan.mode == "named":
        assert plan.function is not None
        tools = NamedCallParser(plan.function, plan.tools)
    elif plan.mode == "required":
        tools = RequiredCallsParser(plan.tools)
    elif plan.mode == "auto":
        assert config.tool_call_parser is not None
        tools = TOOL_PARSERS[config.tool_call_parser](plan.tools)
    # Forced calls are constrained from the first token, so there is no reasoning to split off.
    reasoning = None
    if config.reasoning_parser and not plan.forced:
        reasoning = make_reasoning_parser(config.reasoning_parser, prompt, chat_template_kwargs)
    if tools is None and reasoning is None:
        return None
    return ChatOutputParser(reasoning, tools, max_calls=None if plan.parallel else 1)


def finish_reason(reason: str | None, has_calls: bool) -> str | None:
    """OpenAI's `tool_calls` when the turn ended by calling tools (a cut-off turn stays `length`)."""
    return "tool_calls" if has_calls and reason == "stop" else reason


def message_tool_calls(calls: Iterable[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def delta_tool_calls(deltas: Iterable[ToolCallDelta]) -> list[dict[str, Any]]:
    """Stream entries as OpenAI sends them: the first of a call has id, type and name; later ones only arguments."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        entry: dict[str, Any] = {"index": d.index}
        function: dict[str, Any] = {}
        if d.id is not None:
            entry["id"], entry["type"] = d.id, "function"
        if d.name is not None:
            function["name"] = d.name
            function["arguments"] = d.arguments
        elif d.arguments:
            function["arguments"] = d.arguments
        entry["function"] = function
        out.append(entry)
    return out
