"""The fields of an inference request the router reads, parsed once from the raw body (which is forwarded
untouched: the engine validates everything else). orjson parses a 2 kB chat body ~5x faster than pydantic's
validating parse of the same model did, and the router no longer builds a model it never used."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from kubellm.openai_errors import APIError


@dataclass
class RoutedBody:
    model: str
    fields: dict[str, Any]  # the whole body as parsed (the prompt's fields feed the prefix hash)
    stream: bool = False
    user: str | None = None


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def parse_routed_body(raw: bytes) -> RoutedBody:
    """Raises APIError 400 naming the problem: not JSON, not an object, or a routed field of the wrong type."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"request body is not a valid JSON object: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise APIError(400, "request body is not a valid JSON object", code="invalid_json")
    model = body.get("model")
    if model is None:
        raise _invalid("model", "Field required")
    if not isinstance(model, str):
        raise _invalid("model", "Input should be a valid string")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream", "Input should be a valid boolean")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid("user", "Input should be a valid string")
    return RoutedBody(model, body, bool(stream), user)


def dumps(value: Any) -> str:
    """Compact JSON text (non-ASCII kept as is), the router's one serializer for hashing text."""
    return orjson.dumps(value).decode()


def dumps_bytes(value: Any) -> bytes:
    """dumps(value) encoded as UTF-8 (what orjson writes)."""
    return orjson.dumps(value)
