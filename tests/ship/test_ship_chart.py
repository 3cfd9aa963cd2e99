"""The Helm chart, checked with the real helm v4 binary: lint, render, and validate every object.

Every values case (defaults + charts/kubellm/ci/*.yaml) must lint and render; every rendered object must
validate against the Kubernetes OpenAPI schemas (kubernetes-validate), custom resources against their
CRDs' schemas; the values schema must turn a bad values file into a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .conftest import VALUES_CASES, _case_id
from .tools import CHART, REPO, helm, helm_template

K8S_VERSION = "1.35.0"
# Kinds whose schema comes from a CRD, not from Kubernetes itself.
CRD_KINDS = {"LLMDeployment", "ServiceMonitor", "PodMonitor", "KopfPeering", "ClusterKopfPeering"}


def _docs(stream: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(stream) if d]


def _validate_cr(cr: dict) -> None:
    """Against the CRD's openAPIV3Schema; OpenAPI 3.0 schemas use draft-04 keywords (boolean exclusiveMinimum)."""
    crd = yaml.safe_load((REPO / "crds" / "llmdeployment.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator(schema).validate(cr)


@pytest.mark.parametrize("case", VALUES_CASES, ids=_case_id)
def test_helm_lint(case: Path | None, binaries) -> None:
    args = ["lint", str(CHART), "--strict"] + (["--values", str(case)] if case else [])
    out = helm(*args)
    assert "0 chart(s) failed" in out.stdout, out.stdout


@pytest.mark.parametrize("case", [_case_id(c) for c in VALUES_CASES])
def test_every_object_validates(case: str, rendered_streams: dict[str, str]) -> None:
    docs = _docs(rendered_streams[case])
    assert docs, "helm template rendered nothing"
    kinds = set()
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        kinds.add(kind)
        if kind in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{case}: {kind}/{name} is invalid: {e.message} at {list(e.path)}")
    assert {"CustomResourceDefinition", "Deployment"} <= kinds


def test_values_cases_cover_the_optional_objects(rendered_streams: dict[str, str]) -> None:
    """The ci/ values files exist to exercise every optional template at least once."""
    kinds = {d["kind"] for stream in rendered_streams.values() for d in _docs(stream)}
    assert {"ServiceMonitor", "PodMonitor", "LLMDeployment", "ConfigMap", "RoleBinding", "Service"} <= kinds
    assert len(VALUES_CASES) >= 4


def test_example_llmdeployment_matches_the_crd(rendered_streams: dict[str, str]) -> None:
    examples = [d for s in rendered_streams.values() for d in _docs(s) if d["kind"] == "LLMDeployment"]
    assert examples
    for cr in examples:
        _validate_cr(cr)
    enabled = helm_template(set_values=("example.enabled=true",))
    (cr,) = [d for d in _docs(enabled) if d["kind"] == "LLMDeployment"]
    _validate_cr(cr)
    assert cr["spec"]["model"]["source"] == "builtin:smollm2-135m-instruct"


def test_prometheus_operator_objects_are_well_formed(rendered_streams: dict[str, str]) -> None:
    """No OpenAPI schema for monitoring.coreos.com here: check the fields Prometheus acts on."""
    docs = _docs(rendered_streams["monitoring-values"])
    (sm,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    (pm,) = [d for d in docs if d["kind"] == "PodMonitor"]
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert sm["apiVersion"] == pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"


def test_podmonitor_selects_what_the_operator_renders() -> None:
    """The PodMonitor's selector must match the labels of the engine and router pods the operator renders."""
    from kubellm.operator import render
    from kubellm.operator.spec import LLMDeploymentSpec

    pm = next(
        d for d in _docs(helm_template(set_values=("metrics.podMonitor.enabled=true",))) if d["kind"] == "PodMonitor"
    )
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "builtin:smollm2-135m-instruct"}})
    out = render.render(spec, render.Owner("demo", "ns", "uid-1"), render.RenderOptions(), 1)
    pods = [m for m in out.manifests if m["kind"] == "Deployment"]
    assert len(pods) == 2
    sel = pm["spec"]["selector"]
    for dep in pods:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert sel["matchLabels"].items() <= labels.items()
        for expr in sel["matchExpressions"]:
            assert labels[expr["key"]] in expr["values"]
        ports = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert pm["spec"]["podMetricsEndpoints"][0]["port"] in ports


def test_operator_pod_labels_admitted_by_engine_network_policy(rendered_streams: dict[str, str]) -> None:
    """The engines' NetworkPolicy admits the operator by fixed labels; the chart's pods must carry them."""
    from kubellm.operator.render import OPERATOR_POD_LABELS

    for case, stream in rendered_streams.items():
        (dep,) = [d for d in _docs(stream) if d["kind"] == "Deployment"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert OPERATOR_POD_LABELS.items() <= labels.items(), case


def test_crd_in_chart_is_byte_identical_to_crds_dir() -> None:
    """crds/llmdeployment.yaml is the one source; the chart ships an exact copy (helm reads only its own dir)."""
    src = (REPO / "crds" / "llmdeployment.yaml").read_bytes()
    copy = (CHART / "crds" / "llmdeployment.yaml").read_bytes()
    assert copy == src, "chart CRD is stale: cp crds/llmdeployment.yaml charts/kubellm/crds/llmdeployment.yaml"
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["llmdeployment.yaml"]


def test_crd_rendered_and_valid(rendered_streams: dict[str, str]) -> None:
    (crd,) = [d for d in _docs(rendered_streams["default"]) if d["kind"] == "CustomResourceDefinition"]
    assert crd == yaml.safe_load((REPO / "crds" / "llmdeployment.yaml").read_text())


def test_dashboards_configmaps_hold_the_chart_json(rendered_streams: dict[str, str]) -> None:
    cms = [d for d in _docs(rendered_streams["default"]) if d["kind"] == "ConfigMap"]
    names = sorted(p.stem for p in (CHART / "dashboards").glob("*.json"))
    assert len(cms) == len(names) == 3
    for cm in cms:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = cm["data"].items()
        stem = key.removeprefix("kubellm-").removesuffix(".json")
        assert json.loads(text) == json.loads((CHART / "dashboards" / f"{stem}.json").read_text())
    moved = _docs(rendered_streams["monitoring-values"])
    assert {d["metadata"]["namespace"] for d in moved if d["kind"] == "ConfigMap"} == {"monitoring"}


def test_operator_command_line(rendered_streams: dict[str, str]) -> None:
    def args_of(case: str) -> list[str]:
        (dep,) = [d for d in _docs(rendered_streams[case]) if d["kind"] == "Deployment"]
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["kubellm"]
        return c["args"]

    default = args_of("default")
    assert default[0] == "operator" and "--all-namespaces" in default and "--standalone" in default
    assert "--engine-image=ghcr.io/kubellm/kubellm-engine:0.1.0" in default
    ns = args_of("namespaced-values")
    assert "--namespace=team-a" in ns and "--namespace=team-b" in ns and "--all-namespaces" not in ns
    assert "--standalone" not in ns and "--peering=kubellm" in ns and "--log-level=debug" in ns
    prod = args_of("production-values")
    assert "--engine-image=registry.example.com/ml/kubellm-engine:0.1.0-rc1-cu129" in prod
    assert "--metrics-port=9090" in prod


def test_operator_args_parse_with_the_operator_cli(rendered_streams: dict[str, str]) -> None:
    """Every flag the chart passes must be one `kubellm operator` accepts (once operator/cli.py exists)."""
    from kubellm.operator.cli import build_parser, config_from_args

    for case, stream in rendered_streams.items():
        (dep,) = [d for d in _docs(stream) if d["kind"] == "Deployment"]
        c = dep["spec"]["template"]["spec"]["containers"][0]
        parsed = build_parser().parse_args(c["args"][1:])
        cfg = config_from_args(parsed)
        if case == "namespaced-values":
            assert cfg["namespaces"] == ["team-a", "team-b"] and not cfg["clusterwide"]
            assert not cfg["standalone"] and cfg["peering_name"] == "kubellm"
        else:
            assert cfg["clusterwide"] and cfg["standalone"], case
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
        assert cfg["metrics_port"] == port, case
        assert c["livenessProbe"]["httpGet"]["port"] == "metrics"


def test_values_schema_rejects_bad_values(tmp_path: Path, binaries) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("operator:\n  logLevel: verbose\n  replicas: -1\nimage:\n  tag: 1.0\nexample:\n  modle: x\n")
    out = helm("template", "kubellm", str(CHART), "--values", str(bad), check=False)
    assert out.returncode != 0
    err = out.stderr
    assert "values don't meet the specifications of the schema" in err, err
    for needle in ("/operator/logLevel", "must be one of", "/operator/replicas", "/image/tag", "'modle' not allowed"):
        assert needle in err, f"{needle!r} missing from helm's error:\n{err}"


def test_values_schema_accepts_every_values_file() -> None:
    """The same schema through jsonschema, so a schema mistake shows here with a Python traceback too."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)
    for case in VALUES_CASES[1:]:
        merged = _merge(defaults, yaml.safe_load(case.read_text()))
        jsonschema.validate(merged, schema)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def test_every_value_is_documented_and_used(chart_dir: Path) -> None:
    """Each leaf key in values.yaml appears in some template (no dead knobs)."""
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    templates = "".join(p.read_text() for p in (chart_dir / "templates").iterdir())

    free_form = {"resources", "nodeSelector", "affinity", "podAnnotations", "podLabels", "labels", "annotations"}

    def leaves(d: dict, prefix: str = "") -> list[str]:
        out: list[str] = []
        for k, v in d.items():
            nested = isinstance(v, dict) and v and k not in free_form
            out += leaves(v, f"{prefix}{k}.") if nested else [prefix + k]
        return out

    unused = []
    for key in leaves(values):
        parts = key.split(".")
        # referenced as .Values.a.b.c, or via `with`/variables as .c beside its parent
        if not any(f".{'.'.join(parts[i:])}" in templates for i in range(len(parts))):
            unused.append(key)
    assert not unused, f"values never used by a template: {unused}"
