"""GET /openapi.json: an OpenAPI 3.1 description generated from the pydantic protocol models, so fuzzers
(schemathesis and the like) and client generators see exactly what the server validates."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from kubellm.openai_protocol import ErrorResponse, ModelCard, ModelList

from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)

_MODELS: list[type[BaseModel]] = [
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(c): {"description": "error", "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
        for c in codes
    }


def _json_op(summary: str, request: type[BaseModel] | None, response: type[BaseModel], *errs: int) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": _ref(response)}}},
            **_errors(*errs),
        },
    }
    if request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
    return op


def _generate_op(summary: str, request: type[BaseModel], response: type[BaseModel]) -> dict[str, Any]:
    op = _json_op(summary, request, response, 400, 401, 404, 413, 415, 429, 503)
    op["responses"]["200"]["content"]["text/event-stream"] = {
        "schema": {"type": "string", "description": "with stream=true: SSE `data: <chunk>` lines, then `data: [DONE]`"}
    }
    return op


@lru_cache(maxsize=1)
def _schemas() -> dict[str, Any]:
    _, top = models_json_schema([(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})


def build_openapi(version: str) -> dict[str, Any]:
    text = {"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}
    ndjson = {
        "200": {"description": "NDJSON KV events", "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}
    }
    health = {"200": {"description": "ready"}, "503": {"description": "loading, draining or failed"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "kubellm engine", "version": version},
        "paths": {
            "/v1/completions": {
                "post": _generate_op("Text completion (OpenAI)", CompletionRequest, CompletionResponse)
            },
            "/v1/chat/completions": {
                "post": _generate_op("Chat completion (OpenAI)", ChatCompletionRequest, ChatCompletionResponse)
            },
            "/v1/models": {"get": _json_op("Served models", None, ModelList, 401, 503)},
            "/v1/models/{model}": {
                "get": {
                    **_json_op("One served model's card", None, ModelCard, 401, 404, 503),
                    "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                }
            },
            "/tokenize": {
                "post": _json_op(
                    "Tokenize a prompt or a conversation", TokenizeRequest, TokenizeResponse, 400, 404, 415
                )
            },
            "/detokenize": {
                "post": _json_op("Token ids to text", DetokenizeRequest, DetokenizeResponse, 400, 404, 415)
            },
            "/version": {"get": _json_op("Server version", None, VersionResponse)},
            "/health": {"get": {"summary": "Readiness", "responses": health}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": text}},
            "/v1/tokenizer_info": {"get": {"summary": "Tokenizer and chat template", "responses": text}},
            "/v1/kv_events": {
                "get": {"summary": "KV cache events (NDJSON: snapshot, then changes)", "responses": ndjson}
            },
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
