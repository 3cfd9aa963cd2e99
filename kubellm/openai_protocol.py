"""OpenAI wire types that both the engine server and the router produce, so clients see one error shape
and one model list whichever process answers."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

# OpenAI's error `type` values, by HTTP status.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers every failed request."""

    error: ErrorInfo

    @classmethod
    def make(cls, status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
        err_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return cls(error=ErrorInfo(message=message, type=err_type, param=param, code=code))


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kubellm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
