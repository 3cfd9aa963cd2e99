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


def check_json_content_type(header: str | None) -> None:
    """A body sent as anything but JSON is refused before it is read, as OpenAI does (`curl -d` without
    `-H 'Content-Type: application/json'` sends a form). No header at all is taken as JSON."""
    if header is None or header == "application/json":  # (what nearly every client sends: no parsing)
        return
    media_type = header.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415,
            f"Unsupported content type: '{media_type}'. This API accepts only JSON request bodies; "
            "send the header 'Content-Type: application/json'.",
            code="unsupported_content_type",
        )


def route_error(status: int, method: str, path: str, allow: str | None = None) -> APIError:
    """What an unknown route (404) or a wrong method (405, with its Allow header) answers, on every server."""
    if status == 405:
        allowed = f"; use {allow}" if allow else ""
        return APIError(
            405, f"method {method} is not allowed on {path}{allowed}", code="method_not_allowed",
            headers={"Allow": allow} if allow else None,
        )  # fmt: skip
    return APIError(404, f"no route for {method} {path}", code="not_found")


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
