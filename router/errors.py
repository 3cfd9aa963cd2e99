"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}, so clients' error handling works."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    err = ErrorBody(message=message, type=_TYPES.get(status, "server_error"), param=param, code=code)
    return ErrorResponse(error=err).model_dump()


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(error_body(status, message, param, code)).encode(),
        content_type="application/json",
        headers=headers,
    )


def sse_error_event(status: int, message: str, code: str | int | None = None) -> bytes:
    """The final event of a stream whose replica died: the openai client raises APIError on it."""
    return b"data: " + json.dumps(error_body(status, message, None, code)).encode() + b"\n\n"


class RouterError(Exception):
    """Raised inside the router; the handler turns it into an OpenAI-shaped response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.param, self.code, self.headers)
