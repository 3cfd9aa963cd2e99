"""The one exception for a failure a client should see, and the bytes of OpenAI's error body for it.

Engine server and router both raise `APIError` and answer with `error_json`, so a client gets the same
`{"error": {"message", "type", "param", "code"}}` whichever process failed. Turning the error into an HTTP
response is each server's job (this module imports no HTTP library)."""

from __future__ import annotations

from kubellm.openai_protocol import ErrorResponse


def error_json(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error body as UTF-8 JSON; `type` follows from the status."""
    return ErrorResponse.make(status, message, param, code).model_dump_json().encode()


class APIError(Exception):
    """An error for the client: status, a message that names the problem, the offending field, a machine
    code, and headers the response must carry (e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def json(self) -> bytes:
        return error_json(self.status, self.message, self.param, self.code)
