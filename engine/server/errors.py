"""Every failure leaves the server as OpenAI's error JSON with the right status; bad input never becomes a 500.
The exception and its body are the core's (kubellm.openai_errors); this module maps failures onto it and
answers it over aiohttp."""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from kubellm.openai_errors import APIError

logger = logging.getLogger("kubellm.engine.server")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def error_response(err: APIError) -> web.Response:
    return web.Response(
        status=err.status, body=err.json(), content_type="application/json", charset="utf-8", headers=err.headers
    )


def _loc(loc: Iterable[Any]) -> str:
    parts: list[str] = []
    for p in loc:
        # pydantic puts union member tags ("str", "list[int]", "function-after[...]") into the path: drop them.
        if isinstance(p, str) and ("[" in p or p in _UNION_TAGS):
            continue
        parts.append(str(p))
    return ".".join(parts)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def from_validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming its field, e.g. `temperature: Input should be ...`."""
    errors = exc.errors(include_url=False)
    if not errors:
        return bad_request("invalid request")
    # Within a union pydantic reports every branch; the deepest location is the most specific complaint
    # (e.g. an unsupported content part rather than "content should be a string").
    first = max(errors, key=lambda e: len(_loc(e.get("loc", ())).split(".")))
    param = _loc(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
        return bad_request(msg, param or None, "unrecognized_argument")
    if first.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param or None, "missing_required_parameter")
    return bad_request(f"{param}: {msg}" if param else msg, param or None, "invalid_value")


_FIELD_RE = re.compile(r"\b([a-z_]+)\b")


def from_value_error(exc: ValueError, known_fields: Iterable[str] = ()) -> APIError:
    """A ValueError from SamplingParams or the engine; its message names the field, which becomes `param`."""
    message = str(exc) or "invalid request"
    known = set(known_fields)
    param = next((w for w in _FIELD_RE.findall(message) if w in known), None)
    return bad_request(message, param)


def keys_match(given: str, expected: str) -> bool:
    """Constant-time API key comparison (no timing side channel on how many leading characters match)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))
