"""Property tests for the operator (issue 9, fuzz): every CR the CRD schema accepts either renders manifests that
pass kubernetes-validate or is refused by the operator with a message naming the field; every CR with one field
broken is rejected by the CRD schema with an error naming that field."""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import jsonschema
import kubernetes_validate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_crd_llmdeployment import K8S_VERSION, apply_defaults, openapi_schema, validator
from test_operator_render import OPTS, OWNER_UID, validate_service_monitor

from kubellm.builtin_models import BUILTIN_MODELS, BUILTIN_PREFIX
from kubellm.operator import render as rd
from kubellm.operator.spec import (
    HF_ID_PATTERN,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    PVC_PATTERN,
    QUANTITY_PATTERN,
    SpecError,
    parse_spec,
)

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _validator() -> jsonschema.Draft4Validator:
    return validator()


@functools.cache
def _spec_schema() -> dict[str, Any]:
    return openapi_schema()["properties"]["spec"]


def _prop(*path: str) -> dict[str, Any]:
    node = _spec_schema()
    for key in path:
        node = node["properties"][key]
    return node


def _enum(*path: str) -> st.SearchStrategy[str]:
    return st.sampled_from(_prop(*path)["enum"])


def _int(*path: str, cap: int = 1000) -> st.SearchStrategy[int]:
    node = _prop(*path)
    return st.integers(node.get("minimum", 0), node.get("maximum", cap))


def _num(*path: str) -> st.SearchStrategy[float]:
    node = _prop(*path)
    return st.floats(
        node.get("minimum", 0), node.get("maximum", 100.0), exclude_min=bool(node.get("exclusiveMinimum")),
        allow_nan=False, allow_infinity=False,
    )  # fmt: skip


# Strings the CRD's patterns accept, restricted to an alphabet where Python's `$` and Go's agree (no newlines).
_SAFE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
_label = st.from_regex(re.compile(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?"), fullmatch=True)
_hf_id = st.from_regex(re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}/[A-Za-z0-9][A-Za-z0-9._-]{0,15}"), fullmatch=True)
_pvc = st.builds(
    lambda claim, path: f"pvc://{claim}{path}", _label,
    st.one_of(st.just(""), st.text(_SAFE, max_size=12).map(lambda p: "/" + p)),
)  # fmt: skip
_builtin = st.sampled_from(sorted(BUILTIN_MODELS)).map(lambda m: BUILTIN_PREFIX + m)
_source = st.one_of(_hf_id, _pvc, _builtin)
_quantity = st.one_of(
    st.integers(1, 2**40),
    st.builds(
        lambda n, u: f"{n}{u}", st.integers(1, 4096), st.sampled_from(["", "m", "k", "M", "G", "Ki", "Mi", "Gi"])
    ),
    st.builds(lambda a, b: f"{a}.{b}", st.integers(0, 64), st.integers(1, 999)),
)
_dns_name = st.from_regex(re.compile(r"[a-z]([-a-z0-9]{0,40}[a-z0-9])?"), fullmatch=True)
_env_name = st.from_regex(re.compile(r"[A-Z_][A-Z0-9_]{0,15}"), fullmatch=True)
_toleration = st.fixed_dictionaries(
    {"key": _label},
    optional={
        "operator": st.sampled_from(["Exists", "Equal"]),
        "value": _label,
        "effect": st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute"]),
    },
)
_node_selector = st.dictionaries(
    st.builds(lambda p, k: f"{p}/{k}", st.sampled_from(["kubernetes.io", "node.kubernetes.io", "example.com"]), _label),
    _label, max_size=3,
)  # fmt: skip
_secret_ref = st.fixed_dictionaries({"name": _dns_name}, optional={"key": _label})


def _opt(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


@st.composite
def _autoscaling(draw: st.DrawFn) -> dict[str, Any]:
    out = draw(
        _opt(
            enabled=st.booleans(),
            targetWaitingRequests=_num("autoscaling", "targetWaitingRequests"),
            targetKVCacheUsage=_num("autoscaling", "targetKVCacheUsage"),
            scaleUpStabilizationSeconds=_int("autoscaling", "scaleUpStabilizationSeconds"),
            scaleDownDelaySeconds=_int("autoscaling", "scaleDownDelaySeconds"),
        )
    )
    lo = draw(_int("autoscaling", "minReplicas", cap=20))
    hi = draw(st.integers(max(lo, _prop("autoscaling", "maxReplicas")["minimum"]), 40))
    out.update({"minReplicas": lo, "maxReplicas": hi})
    return out


@st.composite
def valid_crs(draw: st.DrawFn) -> dict[str, Any]:
    """CRs built from the CRD schema's own enums, ranges and patterns."""
    model = {"source": draw(_source)} | draw(
        _opt(
            servedModelName=_label,
            revision=st.text(_SAFE, min_size=1, max_size=12),
            tokenSecretRef=_secret_ref,
            hfEndpoint=st.builds(lambda s, h: f"{s}://{h}.example", st.sampled_from(["http", "https"]), _label),
        )
    )
    gpus = draw(_int("resources", "gpusPerReplica", cap=8).filter(lambda g: g <= 8))
    spec: dict[str, Any] = {"model": model}
    spec |= draw(
        _opt(
            engine=_opt(
                image=st.sampled_from(
                    ["ghcr.io/kubellm/kubellm-engine:0.2.0", "registry.local/engine@sha256:" + "a" * 64]
                ),
                args=st.lists(st.sampled_from(["--max-num-seqs", "64", "--seed", "1"]), max_size=3),
                tensorParallelSize=st.integers(1, max(1, gpus)),
                maxModelLen=_int("engine", "maxModelLen", cap=131072),
                gpuMemoryUtilization=_num("engine", "gpuMemoryUtilization"),
                enablePrefixCaching=st.booleans(),
                dtype=_enum("engine", "dtype"),
                terminationGracePeriodSeconds=_int("engine", "terminationGracePeriodSeconds", cap=3600),
                startupTimeoutSeconds=_int("engine", "startupTimeoutSeconds", cap=7200),
            ),
            replicas=_int("replicas", cap=16),
            nodeSelector=_node_selector,
            tolerations=st.lists(_toleration, max_size=2),
            autoscaling=_autoscaling(),
            router=_opt(
                replicas=_int("router", "replicas", cap=8),
                policy=_enum("router", "policy"),
                apiKeySecretRef=_secret_ref,
                cpu=_quantity,
                memory=_quantity,
            ),
            modelCache=st.one_of(
                _opt(claimName=_dns_name, accessMode=_enum("modelCache", "accessMode")),
                _opt(size=_quantity, storageClassName=_label, accessMode=_enum("modelCache", "accessMode")),
            ),
            env=st.lists(st.fixed_dictionaries({"name": _env_name, "value": st.text(_SAFE, max_size=8)}), max_size=3),
            priorityClassName=_dns_name,
            networkPolicy=_opt(enabled=st.booleans()),
            serviceMonitor=_opt(enabled=st.booleans()),
        )
    )
    spec["resources"] = {"gpusPerReplica": gpus} | draw(_opt(cpu=_quantity, memory=_quantity, shmSize=_quantity))
    name = draw(_dns_name.filter(lambda n: len(n) <= MAX_NAME_LENGTH))
    return {"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name}, "spec": spec}


@st.composite
def schema_valid_crs(draw: st.DrawFn) -> dict[str, Any]:
    """valid_crs plus combinations the schema lets through but the operator may refuse (cross-field rules)."""
    cr = draw(valid_crs())
    spec = cr["spec"]
    rule = draw(st.sampled_from(["none", "none", "tp", "minmax", "builtin", "cache", "name"]))
    if rule == "tp":
        spec["resources"]["gpusPerReplica"] = draw(st.integers(0, 4))
        spec.setdefault("engine", {})["tensorParallelSize"] = draw(st.integers(1, 64))
    elif rule == "minmax":
        spec["autoscaling"] = {"minReplicas": draw(st.integers(0, 50)), "maxReplicas": draw(st.integers(1, 50))}
    elif rule == "builtin":
        spec["model"]["source"] = BUILTIN_PREFIX + draw(st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,15}\Z"))
    elif rule == "cache":
        spec["modelCache"] = {"claimName": draw(_dns_name), "size": draw(_quantity)}
    elif rule == "name":
        cr["metadata"]["name"] = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=70))
    return cr


# The fields each cross-field rule must name in its message.
_RULE_WORDS = [
    (lambda n, s: len(n) > MAX_NAME_LENGTH or not re.match(NAME_PATTERN, n), ["metadata.name"]),
    (
        lambda n, s: (s.get("engine") or {}).get("tensorParallelSize", 1) > max(1, s["resources"]["gpusPerReplica"]),
        ["engine.tensorParallelSize", "resources.gpusPerReplica"],
    ),
    (
        lambda n, s: s.get("autoscaling", {}).get("minReplicas", 1) > s.get("autoscaling", {}).get("maxReplicas", 4),
        ["autoscaling.minReplicas", "autoscaling.maxReplicas"],
    ),
    (
        lambda n, s: (
            s["model"]["source"].startswith(BUILTIN_PREFIX)
            and s["model"]["source"].removeprefix(BUILTIN_PREFIX) not in BUILTIN_MODELS
        ),
        ["model.source"],
    ),
    (lambda n, s: bool({"claimName", "size"} <= set(s.get("modelCache") or {})), ["modelCache", "claimName", "size"]),
]


def _validate_manifests(r: rd.Rendered) -> None:
    for m in r.manifests:
        if m["kind"] == "ServiceMonitor":
            validate_service_monitor(m)
            continue
        kubernetes_validate.validate(m, K8S_VERSION, strict=True)
        assert len(m["metadata"]["name"]) <= 63


@SETTINGS
@given(schema_valid_crs())
def test_every_schema_accepted_cr_renders_valid_manifests_or_is_refused_naming_the_field(cr):
    _validator().validate(cr)
    defaulted = apply_defaults(openapi_schema(), copy.deepcopy(cr))
    _validator().validate(defaulted)
    name, spec = cr["metadata"]["name"], defaulted["spec"]
    expected = [words for broken, words in _RULE_WORDS if broken(name, spec)]
    try:
        parsed = parse_spec(name, spec)
    except SpecError as e:
        assert expected, f"schema-valid CR refused by no known rule: {e}"
        for words in expected:
            assert all(w in str(e) for w in words), (words, str(e))
        return
    assert not expected, f"operator accepted a CR breaking {expected}"
    assert parse_spec(name, cr["spec"]) == parsed  # the API server's defaults change nothing
    owner = rd.Owner(name, "ml", OWNER_UID)
    _validate_manifests(rd.render(parsed, owner, OPTS, rd.desired_engine_replicas(parsed, None)))


def _set(spec: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = spec
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


_not_string = st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), max_size=2))
_not_int = st.one_of(st.text(max_size=4), st.booleans(), st.floats(0.5, 9.5).filter(lambda f: f != int(f)))
_not_number = st.one_of(st.text(max_size=4), st.booleans(), st.lists(st.integers(), max_size=1))
_not_bool = st.one_of(st.integers(), st.sampled_from(["true", "yes"]))
_not_quantity = st.one_of(st.sampled_from(["lots", "Gi", "-", "1 Gi", "ten"]), st.booleans(), st.floats(0.5, 2.5))


def _breakages() -> list[tuple[tuple[str, ...], st.SearchStrategy[Any]]]:
    """(path under spec, strategy of bad values): every leaf field with its schema's kinds of breakage."""
    out: list[tuple[tuple[str, ...], st.SearchStrategy[Any]]] = []

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        for key, sub in (node.get("properties") or {}).items():
            p = (*path, key)
            if sub.get("x-kubernetes-int-or-string"):
                out.append((p, _not_quantity))
            elif sub.get("type") == "object" and "properties" in sub:
                out.append((p, _not_string))
                out.append(((*p, "unknownField"), st.just("x")))
                walk(sub, p)
            elif sub.get("type") == "string":
                bad = [_not_string]
                if "enum" in sub:
                    bad.append(st.text(max_size=8).filter(lambda v, e=sub["enum"]: v not in e))
                if "pattern" in sub:
                    bad.append(
                        st.sampled_from(["", "no pattern here", "ftp://x"]).filter(
                            lambda v, r=sub["pattern"]: not re.search(r, v)
                        )
                    )
                if sub.get("minLength"):
                    bad.append(st.just(""))
                out.append((p, st.one_of(*bad)))
            elif sub.get("type") == "integer":
                bad = [_not_int]
                if "minimum" in sub:
                    bad.append(st.integers(max_value=sub["minimum"] - 1, min_value=sub["minimum"] - 1000))
                if "maximum" in sub:
                    bad.append(st.integers(min_value=sub["maximum"] + 1, max_value=sub["maximum"] + 1000))
                out.append((p, st.one_of(*bad)))
            elif sub.get("type") == "number":
                bad = [_not_number]
                if "minimum" in sub:
                    lo = sub["minimum"]
                    below = st.floats(lo - 100, lo, exclude_max=not sub.get("exclusiveMinimum"))
                    bad.append(below)
                if "maximum" in sub:
                    bad.append(st.floats(sub["maximum"], sub["maximum"] + 100, exclude_min=True))
                out.append((p, st.one_of(*bad)))
            elif sub.get("type") == "boolean":
                out.append((p, _not_bool))
            elif sub.get("type") == "array":
                out.append((p, st.one_of(_not_string.filter(lambda v: not isinstance(v, list)), st.just({}))))

    walk(_spec_schema(), ())
    return out


def _creatable(spec: dict[str, Any], path: tuple[str, ...]) -> bool:
    """Setting `path` adds no object that then lacks its own required fields."""
    node, schema = spec, _spec_schema()
    for key in path[:-1]:
        schema = schema["properties"][key]
        if not isinstance(node, dict) or key not in node:
            if schema.get("required"):
                return False
            node = {}
        else:
            node = node[key]
    return True


_MISSING = [("model", "source"), ("model",)]


@st.composite
def broken_crs(draw: st.DrawFn) -> tuple[dict[str, Any], str, str]:
    """A valid CR with exactly one field broken, the field's name and how it was broken."""
    cr = draw(valid_crs())
    spec = cr["spec"]
    how = draw(st.sampled_from(["value", "value", "value", "missing", "nested-required"]))
    if how == "missing":
        path = draw(st.sampled_from(_MISSING))
        node = spec
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return cr, path[-1], how
    if how == "nested-required":
        which = draw(st.sampled_from(["tokenSecretRef", "apiKeySecretRef", "env"]))
        if which == "tokenSecretRef":
            spec["model"]["tokenSecretRef"] = {"key": "k"}
        elif which == "apiKeySecretRef":
            spec.setdefault("router", {})["apiKeySecretRef"] = {"key": "k"}
        else:
            spec["env"] = [*spec.get("env", []), {"value": "v"}]
        return cr, "name", how
    path, bad = draw(st.sampled_from([(p, b) for p, b in _breakages() if _creatable(spec, p)]))
    _set(spec, path, draw(bad))
    return cr, path[-1], how


@SETTINGS
@given(broken_crs())
def test_every_cr_with_one_broken_field_is_rejected_naming_the_field(case):
    cr, field, how = case
    errors = list(_validator().iter_errors(cr))
    assert errors, f"schema accepted a CR with {field!r} broken ({how}): {cr['spec']}"
    for e in errors:
        named = field in [str(p) for p in e.absolute_path] or repr(field) in e.message or field in e.message
        assert named, (field, how, list(e.absolute_path), e.message)


def test_strategies_cover_every_source_form_and_the_patterns_agree():
    assert re.match(HF_ID_PATTERN, "org/model") and re.match(PVC_PATTERN, "pvc://c/p")
    assert re.match(QUANTITY_PATTERN, "1.5")
    paths = {p for p, _ in _breakages()}
    assert {("model", "source"), ("engine", "dtype"), ("router", "policy"), ("resources", "memory")} <= paths
