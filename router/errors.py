"""OpenAI-shaped error responses from the router. The exception (`APIError`) and its body are the core's
(kubellm.openai_errors), so a client sees the same shape whether the router or an engine answers."""

from __future__ import annotations

from kubellm.openai_errors import error_json


def sse_error_event(status: int, message: str, code: str | None = None) -> bytes:
    """The final event of a stream whose replica died: the openai client raises APIError on it."""
    return b"data: " + error_json(status, message, None, code) + b"\n\n"
