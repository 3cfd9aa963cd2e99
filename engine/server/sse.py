"""Server-sent events framing as OpenAI streams it: `data: <json>\\n\\n` per chunk, then `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from kubellm.openai_protocol import ErrorResponse

DONE = b"data: [DONE]\n\n"


def sse_data(chunk: BaseModel) -> bytes:
    """One chunk. Like OpenAI: `finish_reason: null` stays, `usage` appears only where set, deltas carry only
    what they change."""
    body: dict[str, Any] = chunk.model_dump(mode="json")
    if body.get("usage") is None:
        body.pop("usage", None)
    for choice in body.get("choices", ()):
        if isinstance(choice.get("delta"), dict):
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if choice.get("logprobs") is None:
            choice.pop("logprobs", None)
        if choice.get("stop_reason") is None:
            choice.pop("stop_reason", None)
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_error(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """An error after the stream started: headers are gone, so the error travels as a data event."""
    return b"data: " + ErrorResponse.make(status, message, param, code).model_dump_json().encode() + b"\n\n"
