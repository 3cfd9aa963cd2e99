"""OpenAI-shaped errors {"error": {"message", "type", "param", "code"}}, built with the core's wire types so a
client sees the same shape whether the router or an engine answers."""

from __future__ import annotations

from aiohttp import web

from kubellm.openai_protocol import ErrorResponse


def error_json(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    return ErrorResponse.make(status, message, param, code).model_dump_json().encode()


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status, body=error_json(status, message, param, code), content_type="application/json", headers=headers
    )


def sse_error_event(status: int, message: str, code: str | None = None) -> bytes:
    """The final event of a stream whose replica died: the openai client raises APIError on it."""
    return b"data: " + error_json(status, message, None, code) + b"\n\n"


class RouterError(Exception):
    """Raised inside the router; the handler turns it into an OpenAI-shaped response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.param, self.code, self.headers)
