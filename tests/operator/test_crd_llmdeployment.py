"""The CRD: generated file in sync, valid for the API server, structural, and it accepts/rejects/defaults CRs
the way the API server would (checked with a JSON-schema validator against its openAPIV3Schema)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubellm.operator import crd as crd_mod
from kubellm.operator.spec import LLMDeploymentSpec, SpecError, parse_spec

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "llmdeployment.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
K8S_VERSION = "1.33.0"


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text())


def openapi_schema() -> dict[str, Any]:
    return load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def strict(schema: Any) -> Any:
    """As kubectl's default strict field validation: unknown fields are errors, except where preserved."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields") and schema is not None:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def validator() -> jsonschema.Draft4Validator:
    schema = strict(openapi_schema())
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema)


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """The API server's defaulting: a property's default fills a missing key of an object that exists."""
    if isinstance(obj, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                obj[key] = apply_defaults(sub, obj[key])
    elif isinstance(obj, list) and "items" in schema:
        return [apply_defaults(schema["items"], x) for x in obj]
    return obj


def test_crd_file_is_the_generator_output():
    assert CRD_FILE.read_text() == crd_mod.render_yaml(), (
        "run: python -m kubellm.operator.crd > crds/llmdeployment.yaml"
    )


def test_crd_validates_as_apiextensions_v1():
    kubernetes_validate.validate(load_crd(), K8S_VERSION, strict=True)


def test_crd_has_subresources_columns_short_name():
    crd = load_crd()
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["llmd"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Model", "Replicas", "Ready", "Age"} <= set(names)


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for k, sub in (schema.get("properties") or {}).items():
        out += _walk(sub, f"{path}.{k}")
    if isinstance(schema.get("items"), dict):
        out += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _walk(schema["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural():
    root = openapi_schema()
    for path, node in _walk(root):
        if node.get("x-kubernetes-int-or-string"):
            assert node.get("anyOf") == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert "type" in node, f"{path} has no type (structural schemas need one everywhere)"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node:
            jsonschema.Draft4Validator(strict(node)).validate(node["default"])
    assert root["properties"]["metadata"] == {"type": "object"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted_and_defaults_agree_with_the_pydantic_model(path):
    cr = yaml.safe_load(path.read_text())
    validator().validate(cr)
    defaulted = apply_defaults(openapi_schema(), copy.deepcopy(cr))
    validator().validate(defaulted)
    assert parse_spec(cr["metadata"]["name"], defaulted["spec"]) == parse_spec(cr["metadata"]["name"], cr["spec"])


def test_defaults_of_every_section_match_the_pydantic_model():
    # empty sections get every default from the API server; pydantic must arrive at the same spec
    sections = ["engine", "resources", "autoscaling", "router", "modelCache", "networkPolicy", "serviceMonitor"]
    cr = {"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "x"},
          "spec": {"model": {"source": "org/model"}, **{s: {} for s in sections}}}  # fmt: skip
    defaulted = apply_defaults(openapi_schema(), copy.deepcopy(cr))
    assert defaulted["spec"]["engine"]["tensorParallelSize"] == 1
    assert defaulted["spec"]["replicas"] == 1
    from_server = LLMDeploymentSpec.model_validate(defaulted["spec"])
    from_pydantic = LLMDeploymentSpec.model_validate({"model": {"source": "org/model"}})
    assert from_server == from_pydantic
    dumped = from_pydantic.model_dump(by_alias=True, exclude_none=True)
    for s in sections:
        for key, value in defaulted["spec"][s].items():
            assert dumped[s][key] == value, f"default of spec.{s}.{key}: CRD {value!r} vs pydantic {dumped[s][key]!r}"


def _cr(**spec: Any) -> dict[str, Any]:
    base = {"model": {"source": "org/model"}}
    base.update(spec)
    return {"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "x"}, "spec": base}


BAD = {
    "no model": {"spec": {}},
    "model without source": _cr(model={"revision": "main"}),
    "source not a model": _cr(model={"source": "just-a-name"}),
    "bad pvc source": _cr(model={"source": "pvc://Bad_Claim/x"}),
    "tp zero": _cr(engine={"tensorParallelSize": 0}),
    "gpu mem over 1": _cr(engine={"gpuMemoryUtilization": 1.5}),
    "dtype enum": _cr(engine={"dtype": "int4"}),
    "quantization enum": _cr(engine={"quantization": "awq"}),
    "kv cache dtype enum": _cr(engine={"kvCacheDtype": "int8"}),
    "args not strings": _cr(engine={"args": [1]}),
    "replicas negative": _cr(replicas=-1),
    "policy enum": _cr(router={"policy": "random"}),
    "router zero": _cr(router={"replicas": 0}),
    "kv target zero": _cr(autoscaling={"targetKVCacheUsage": 0}),
    "kv target over 1": _cr(autoscaling={"targetKVCacheUsage": 1.5}),
    "max zero": _cr(autoscaling={"maxReplicas": 0}),
    "memory not a quantity": _cr(resources={"memory": "lots"}),
    "unknown field": _cr(modelName="x"),
    "secret ref without name": _cr(model={"source": "org/m", "tokenSecretRef": {"key": "k"}}),
    "access mode enum": _cr(modelCache={"accessMode": "Everywhere"}),
    "env without name": _cr(env=[{"value": "1"}]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_crs_are_rejected_by_the_schema(name):
    with pytest.raises(jsonschema.ValidationError):
        validator().validate(BAD[name])


GOOD = {
    "minimal": _cr(),
    "pvc": _cr(model={"source": "pvc://models/llama/8b"}),
    "builtin": _cr(model={"source": "builtin:smollm2-135m-instruct"}, resources={"gpusPerReplica": 0}),
    "fp8": _cr(engine={"quantization": "fp8", "kvCacheDtype": "fp8"}),
    "scale to zero": _cr(autoscaling={"enabled": True, "minReplicas": 0, "maxReplicas": 2}),
    "cpu int and millis": _cr(resources={"cpu": 4, "memory": "16Gi"}, router={"cpu": "500m"}),
    "env with valueFrom": _cr(env=[{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]),
}


@pytest.mark.parametrize("name", list(GOOD))
def test_good_crs_are_accepted_and_parse(name):
    validator().validate(GOOD[name])
    parse_spec("x", apply_defaults(openapi_schema(), copy.deepcopy(GOOD[name]))["spec"])


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"engine": {"tensorParallelSize": 4}, "resources": {"gpusPerReplica": 2}}, "tensorParallelSize (4) exceeds"),
        ({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas (3) is greater"),
        ({"model": {"source": "builtin:gpt-5"}}, "unknown builtin model"),
        ({"modelCache": {"claimName": "c", "size": "1Gi"}}, "either claimName"),
    ],
)
def test_combinations_the_schema_cannot_express_are_refused_with_a_clear_message(spec, words):
    cr = _cr(**spec)
    validator().validate(cr)  # the schema lets them through...
    with pytest.raises(SpecError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_spec("x", cr["spec"])  # ...the operator does not


def test_long_or_odd_names_are_refused():
    with pytest.raises(SpecError, match="DNS-1035"):
        parse_spec("a" * 60, {"model": {"source": "org/m"}})
    with pytest.raises(SpecError, match="DNS-1035"):
        parse_spec("1abc", {"model": {"source": "org/m"}})


def test_secret_ref_key_defaults_match():
    cr = _cr(model={"source": "org/m", "tokenSecretRef": {"name": "t"}}, router={"apiKeySecretRef": {"name": "k"}})
    defaulted = apply_defaults(openapi_schema(), copy.deepcopy(cr))
    assert parse_spec("x", defaulted["spec"]) == parse_spec("x", cr["spec"])
