"""Reasoning parsers by vLLM's `--reasoning-parser` names.

Which state a parser starts in is decided per request from the rendered prompt and `chat_template_kwargs`,
as the models' templates decide whether thinking happens (`enable_thinking` for Qwen3/GLM, `thinking` for
DeepSeek-V3.1 and Kimi-K2).
"""

from __future__ import annotations

from typing import Any

from .think_tags import ThinkStyle, ThinkTagParser

THINK = ThinkStyle()
KIMI_THINK = ThinkStyle(implicit_ends=("<|tool_calls_section_begin|>",))

REASONING_PARSERS = ("deepseek_r1", "deepseek_v3", "qwen3", "glm45", "kimi_k2")


def prompt_opens_thinking(prompt: str, style: ThinkStyle = THINK) -> bool:
    """True when the template ended the prompt inside an open think tag, so the output starts in reasoning."""
    return prompt.rstrip().endswith(style.start)


def make_reasoning_parser(
    name: str, prompt: str = "", chat_template_kwargs: dict[str, Any] | None = None
) -> ThinkTagParser | None:
    """The parser for one request, or None when this request does not think (its output is all answer)."""
    kwargs = chat_template_kwargs or {}
    if name == "deepseek_r1":  # R1 may start thinking without writing <think>
        return ThinkTagParser(THINK, starts_in_reasoning=True)
    if name == "deepseek_v3":  # V3.1/V3.2 think only when asked
        return ThinkTagParser(THINK, starts_in_reasoning=True) if kwargs.get("thinking", False) else None
    if name in ("qwen3", "glm45"):
        return ThinkTagParser(THINK, starts_in_reasoning=prompt_opens_thinking(prompt))
    if name == "kimi_k2":  # thinks unless told not to
        return ThinkTagParser(KIMI_THINK, starts_in_reasoning=True) if kwargs.get("thinking", True) else None
    raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSERS)}")


__all__ = ["REASONING_PARSERS", "ThinkStyle", "ThinkTagParser", "make_reasoning_parser", "prompt_opens_thinking"]
