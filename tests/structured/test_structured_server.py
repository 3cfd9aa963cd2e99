"""Acceptance of [structured-outputs]: the official `openai` client against a real `kubellm serve` on the embedded
SmolLM2 (CPU). Every strict json_schema answer that stops validates against its schema, streaming and not; json_object
answers parse; regex and choice hold on completions; a schema admitting the unconstrained greedy answer leaves it
unchanged; bad constraints are 400s naming their field; the compile-time histogram and request counter count.
Forced tool calls on the same machinery: tests/engine_server/test_tool_calling_forced.py."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest
from server_harness import http_get

from kubellm import metric_names as mn

MODEL = "smollm2-135m-instruct"


def obj(props: dict, required: list[str] | None = None) -> dict:
    """A strict object (OpenAI's strict mode: every property required unless listed, no extra keys)."""
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


NAME = {"type": "string", "maxLength": 30}
COORD = {"type": "integer", "minimum": -100, "maximum": 100}
SCHEMAS: list[tuple[str, dict]] = [
    ("a person with a name and an age", obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    (
        "an address with street, city and a 5-digit zip code",
        obj({"street": NAME, "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    ),
    ("up to three fruits", obj({"fruits": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}})),
    ("the colour of the sky", obj({"colour": {"enum": ["red", "green", "blue", "grey"]}})),
    ("a probability between 0 and 1", obj({"p": {"type": "number", "minimum": 0, "maximum": 1}})),
    (
        "an id that is either a short code or a number",
        obj({"id": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "integer", "minimum": 0, "maximum": 999}]}}),
    ),
    (
        "a book with a title and, optionally, a year",
        obj({"title": NAME, "year": {"type": "integer", "minimum": 1000, "maximum": 2100}}, required=["title"]),
    ),
    ("whether water is wet", obj({"wet": {"type": "boolean"}})),
    (
        "two pets with a name and a species",
        obj({"pets": {"type": "array", "items": obj({"name": NAME, "species": NAME}), "maxItems": 2}}),
    ),
    ("today's date", obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}})),
    ("a user with a profile holding a nickname", obj({"user": obj({"profile": obj({"nickname": NAME})})})),
    ("a rating from 1 to 5", obj({"stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]}})),
    ("a middle name, or null when there is none", obj({"middle_name": {"type": ["string", "null"], "maxLength": 20}})),
    (
        "a temperature in Celsius below 60",
        obj({"celsius": {"type": "number", "minimum": -90, "exclusiveMaximum": 60}}),
    ),
    ("an email address", obj({"email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}})),
    ("a point with x and y coordinates", obj({"point": obj({"x": COORD, "y": COORD})})),
]


@pytest.fixture(scope="module")
def serve_args():
    return ("--device", "cpu", "--max-num-seqs", "64")


def _messages(what: str, schema: dict) -> list[dict]:
    return [{"role": "user", "content": f"Reply in JSON with {what}. Schema: {json.dumps(schema)}"}]


def _format(i: int, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"schema_{i}", "schema": schema, "strict": True}}


async def _one(aclient: openai.AsyncOpenAI, i: int, what: str, schema: dict, stream: bool) -> tuple[str, str]:
    kwargs = dict(model=MODEL, messages=_messages(what, schema), max_tokens=256, temperature=0)
    if not stream:
        out = await aclient.chat.completions.create(response_format=_format(i, schema), **kwargs)
        return out.choices[0].message.content or "", out.choices[0].finish_reason
    text, reason = "", None
    async for chunk in await aclient.chat.completions.create(response_format=_format(i, schema), stream=True, **kwargs):
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    return text, reason or ""


async def test_every_strict_schema_answer_validates_streaming_and_not(async_openai_client):
    jobs = [_one(async_openai_client, i, w, s, stream) for stream in (False, True) for i, (w, s) in enumerate(SCHEMAS)]
    answers = await asyncio.gather(*jobs)
    n = len(SCHEMAS)
    lengths = 0
    for k, (text, reason) in enumerate(answers):
        what, schema = SCHEMAS[k % n]
        assert reason in ("stop", "length"), (what, reason)
        if reason == "length":
            lengths += 1
            continue
        jsonschema.validate(json.loads(text), schema)
    assert lengths * 20 <= len(answers), f"{lengths} of {len(answers)} answers ran out of tokens"
    assert answers[:n] == answers[n:], "greedy answers are the same streamed and not"


def test_json_object_answers_parse(openai_client):
    out = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a JSON object with the name and the country of Paris."}],
        response_format={"type": "json_object"},
        max_tokens=256,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(json.loads(choice.message.content), dict)
        assert all(lp.logprob > -1e9 for lp in choice.logprobs.content)


def test_regex_and_choice_hold_on_completions(openai_client):
    prompt = "Q: What is the capital of France?\nA:"
    regex = openai_client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0.8, seed=5, n=3,
        extra_body={"structured_outputs": {"regex": " [A-Z][a-z]{1,12}\\."}},
    )  # fmt: skip
    for c in regex.choices:
        assert re.fullmatch(r" [A-Z][a-z]{1,12}\.", c.text) and c.finish_reason == "stop", c.text
    older = openai_client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0, logprobs=1,
        extra_body={"guided_choice": ["Paris", "Lyon", "Marseille"]},
    )  # fmt: skip
    assert older.choices[0].text in ("Paris", "Lyon", "Marseille")
    grammar = openai_client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
        extra_body={"guided_grammar": 'root ::= " " ("yes" | "no")'},
    )  # fmt: skip
    assert grammar.choices[0].text in (" yes", " no")


def test_schema_admitting_the_greedy_answer_leaves_it_unchanged(openai_client):
    cases = [
        (
            'Reply with only this JSON and nothing else: {"city":"Paris","country":"France"}',
            {"response_format": _format(0, obj({"city": NAME, "country": NAME}))},
        ),
        (
            'Return the JSON {"name":"Alice","age":30} verbatim.',
            {"extra_body": {"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": "[ \\n]*"}}},
        ),
    ]
    for content, constraint in cases:
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=40, temperature=0)
        free = openai_client.chat.completions.create(**kwargs).choices[0]
        assert isinstance(json.loads(free.message.content), dict), "the unconstrained answer is JSON to begin with"
        constrained = openai_client.chat.completions.create(**kwargs, **constraint).choices[0]
        assert constrained.message.content == free.message.content
        assert constrained.finish_reason == free.finish_reason == "stop"


def test_cut_by_max_tokens_is_length(openai_client):
    out = openai_client.chat.completions.create(
        model=MODEL,
        messages=_messages(*SCHEMAS[0]),
        response_format=_format(0, SCHEMAS[0][1]),
        max_tokens=3,
        temperature=0,
    )
    assert out.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}},
         "response_format", "invalid JSON schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "invalid regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"guided_grammar": "start: nothing_defined"}, "guided_grammar", "invalid grammar"),
        ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format",
         "one output constraint"),
        ({"guided_json": {"properties": {f"k{i}": {"type": "string"} for i in range(4000)}}}, "guided_json",
         "at most 65536"),
        ({"structured_outputs": {"json": {}, "backend": "x"}}, "structured_outputs.backend", "Unrecognized"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400_naming_the_field(openai_client, body, param, needle):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body=body
        )
    err = e.value.body
    assert err["param"] == param and needle in err["message"], err


def test_metrics_count_compiles_and_constrained_requests(serve_process, openai_client):
    before = http_get(serve_process.url + "/metrics")[1]
    schema = obj({"metric_probe": {"type": "boolean"}})
    for _ in range(2):  # the second request finds the grammar in the cache
        openai_client.chat.completions.create(
            model=MODEL, messages=_messages("a flag", schema), max_tokens=16, temperature=0,
            response_format=_format(0, schema),
        )  # fmt: skip
    after = http_get(serve_process.url + "/metrics")[1]

    def value(text: str, line_start: str) -> float:
        return next(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line_start))

    compiles = f'{mn.STRUCTURED_OUTPUT_COMPILE_TIME}_count{{model_name="{MODEL}"}}'
    requests = f'{mn.STRUCTURED_OUTPUT_REQUESTS}_total{{kind="json",model_name="{MODEL}"}}'
    assert value(after, compiles) == value(before, compiles) + 1
    assert value(after, requests) == value(before, requests) + 2
