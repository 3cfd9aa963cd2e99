"""One OpenAI error for the whole stack: the engine server and the router raise the core's APIError and
answer with the same body bytes."""

from __future__ import annotations

import json

import pytest

from kubellm.openai_errors import APIError, check_json_content_type, error_json


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


_JSON = [None, "application/json", "application/json; charset=utf-8", "Application/JSON", " application/json ;q=1"]


@pytest.mark.parametrize("header", _JSON)
def test_json_content_types_pass_with_or_without_parameters_and_in_any_case(header):
    check_json_content_type(header)  # (the exact 'application/json' skips parsing: the others must pass too)


@pytest.mark.parametrize("header", ["text/plain", "application/jsonl", "application/x-www-form-urlencoded"])
def test_other_content_types_are_415(header):
    with pytest.raises(APIError) as e:
        check_json_content_type(header)
    assert (e.value.status, e.value.code) == (415, "unsupported_content_type")
