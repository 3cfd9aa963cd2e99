"""Tool-call parsers by vLLM's `--tool-call-parser` names."""

from __future__ import annotations

from .base import ParsedDelta, ParsedMessage, ToolCall, ToolCallDelta, ToolParser, merge_deltas
from .deepseek import DeepSeekV3ToolParser, DeepSeekV31ToolParser
from .glm45 import Glm45ToolParser
from .hermes import HermesToolParser
from .kimi_k2 import KimiK2ToolParser
from .llama3_json import Llama3JsonToolParser
from .mistral import MistralToolParser
from .qwen3_coder import Qwen3CoderToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p
    for p in (
        HermesToolParser,
        Qwen3CoderToolParser,
        KimiK2ToolParser,
        DeepSeekV3ToolParser,
        DeepSeekV31ToolParser,
        Glm45ToolParser,
        Llama3JsonToolParser,
        MistralToolParser,
    )
}

__all__ = ["TOOL_PARSERS", "ParsedDelta", "ParsedMessage", "ToolCall", "ToolCallDelta", "ToolParser", "merge_deltas"]
