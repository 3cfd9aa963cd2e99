"""One OpenAI error for the whole stack: the engine server and the router raise the core's APIError and
answer with the same body bytes."""

from __future__ import annotations

import json

from kubellm.openai_errors import APIError, error_json


def test_error_body_is_openais_shape_with_the_type_given_by_status():
    body = json.loads(error_json(404, "The model `x` does not exist.", "model", "model_not_found"))
    assert body == {
        "error": {
            "message": "The model `x` does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_error_body_bytes_are_fixed():
    assert error_json(503, "busy", code="no_replica") == (
        b'{"error":{"message":"busy","type":"service_unavailable_error","param":null,"code":"no_replica"}}'
    )


def test_unlisted_statuses_are_server_errors_from_500_and_request_errors_below():
    assert json.loads(error_json(502, "down"))["error"]["type"] == "server_error"
    assert json.loads(error_json(422, "odd"))["error"]["type"] == "invalid_request_error"


def test_the_exception_carries_what_the_response_needs_and_renders_the_same_body():
    err = APIError(503, "draining", code="draining", headers={"Retry-After": "2"})
    assert (err.status, err.message, err.param, err.code, err.headers) == (
        503,
        "draining",
        None,
        "draining",
        {"Retry-After": "2"},
    )
    assert str(err) == "draining"
    assert err.json() == error_json(503, "draining", None, "draining")


def test_headers_default_to_empty_and_are_not_shared_with_the_caller():
    given = {"Retry-After": "1"}
    err = APIError(429, "slow down", headers=given)
    given["X"] = "y"
    assert err.headers == {"Retry-After": "1"}
    assert APIError(400, "bad").headers == {}
