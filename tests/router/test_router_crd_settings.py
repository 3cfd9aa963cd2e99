"""The prefix-match threshold as an LLMDeployment sets it: `spec.router.prefixMinMatchRatio` and
`prefixMinMatchTokens` are validated by the CRD's schema, left unset mean the router's own defaults (one place:
kubellm.routing), and reach the router's command line as flags its own parser reads back to the same values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubellm.operator import render as rd
from kubellm.operator.spec import SpecError, parse_spec
from kubellm.router.cli import config_from_args
from kubellm.routing import DEFAULT_PREFIX_MIN_MATCH_RATIO, DEFAULT_PREFIX_MIN_MATCH_TOKENS

REPO = Path(__file__).resolve().parents[2]


def router_schema() -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / "llmdeployment.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["router"]


def router_config(router: dict[str, Any]):
    spec = parse_spec("x", {"model": {"source": "org/m"}, "router": router})
    args = rd.router_args(spec, rd.Owner("x", "ns", "u"))
    assert args[0] == "router"
    return args, config_from_args(args[1:])


def test_the_crd_validates_both_fields_and_defaults_neither():
    props = router_schema()["properties"]
    ratio, tokens = props["prefixMinMatchRatio"], props["prefixMinMatchTokens"]
    assert (ratio["type"], ratio["minimum"], ratio["maximum"]) == ("number", 0, 1)
    assert (tokens["type"], tokens["minimum"]) == ("integer", 0)
    assert "default" not in ratio and "default" not in tokens  # unset: the router's default applies
    assert f"{DEFAULT_PREFIX_MIN_MATCH_RATIO:g}" in ratio["description"]
    assert str(DEFAULT_PREFIX_MIN_MATCH_TOKENS) in tokens["description"]
    v = jsonschema.Draft4Validator({**router_schema(), "additionalProperties": False})
    v.validate({"prefixMinMatchRatio": 0.5, "prefixMinMatchTokens": 128})
    v.validate({"prefixMinMatchRatio": 0, "prefixMinMatchTokens": 0})
    for bad in ({"prefixMinMatchRatio": 1.5}, {"prefixMinMatchRatio": -0.1}, {"prefixMinMatchRatio": "0.3"},
                {"prefixMinMatchTokens": -1}, {"prefixMinMatchTokens": 2.5}):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            v.validate(bad)


def test_unset_renders_no_flag_and_the_router_uses_its_default():
    args, config = router_config({})
    assert not any(a.startswith("--prefix-min-match") for a in args)
    assert config.prefix_min_match_ratio == DEFAULT_PREFIX_MIN_MATCH_RATIO
    assert config.prefix_min_match_tokens == DEFAULT_PREFIX_MIN_MATCH_TOKENS


@pytest.mark.parametrize(("ratio", "tokens"), [(0.5, 128), (0, 0), (1, 16), (0.125, 4096)])
def test_set_values_reach_the_router_unchanged(ratio, tokens):
    _, config = router_config({"prefixMinMatchRatio": ratio, "prefixMinMatchTokens": tokens})
    assert config.prefix_min_match_ratio == ratio and config.prefix_min_match_tokens == tokens
    assert config.policy.value == "prefix"


def test_out_of_range_values_are_refused_by_the_operator_too():
    for router in ({"prefixMinMatchRatio": 1.5}, {"prefixMinMatchTokens": -1}):
        with pytest.raises(SpecError):
            parse_spec("x", {"model": {"source": "org/m"}, "router": router})
