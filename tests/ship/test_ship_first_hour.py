"""The Kubernetes path of a user's first hour: the CR the chart's NOTES print schedules on a CPU-only cluster,
private-registry pull secrets and pull policies reach engine and router pods, and every chart value the docs
name is one the chart accepts and renders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from kubellm.operator import render as rd
from kubellm.operator.cli import build_parser, config_from_args
from kubellm.operator.spec import parse_spec

from .test_ship_chart import _docs, _validate_cr
from .tools import CHART, REPO, helm, helm_template

QUICKSTART = CHART / "files" / "quickstart-llmdeployment.yaml"
CPU_EXAMPLES = [QUICKSTART, REPO / "examples" / "smollm2-cpu.yaml", REPO / "examples" / "smollm2-scale-to-zero.yaml"]
GPU = "nvidia.com/gpu"


def _render_cr(cr: dict, opts: rd.RenderOptions) -> rd.Rendered:
    spec = parse_spec(cr["metadata"]["name"], cr["spec"])
    return rd.render(spec, rd.Owner(cr["metadata"]["name"], "default", "uid-1"), opts, 1)


def _pod_specs(r: rd.Rendered) -> dict[str, dict]:
    return {m["metadata"]["name"]: m["spec"]["template"]["spec"] for m in r.manifests if m["kind"] == "Deployment"}


def test_the_notes_print_the_quickstart_file(binaries) -> None:
    out = helm("install", "kubellm", str(CHART), "--dry-run=client", "--namespace", "kubellm-system").stdout
    notes = out.split("NOTES:", 1)[1]
    block = notes.split("<<'YAML'\n", 1)[1].split("\n  YAML", 1)[0]
    assert yaml.safe_load(block.replace("\n  ", "\n").removeprefix("  ")) == yaml.safe_load(QUICKSTART.read_text())


@pytest.mark.parametrize("path", CPU_EXAMPLES, ids=lambda p: p.name)
def test_cpu_examples_ask_for_no_gpu(path: Path) -> None:
    """What the operator renders for them requests CPU and memory, and nothing anywhere names a GPU."""
    cr = yaml.safe_load(path.read_text())
    _validate_cr(cr)
    rendered = _render_cr(cr, rd.RenderOptions())
    assert GPU not in json.dumps(rendered.manifests)
    engine = _pod_specs(rendered)[cr["metadata"]["name"] + "-engine"]["containers"][0]
    assert engine["resources"]["requests"]["cpu"] and engine["resources"]["requests"]["memory"]


def _operator_options(*set_values: str) -> rd.RenderOptions:
    """RenderOptions as the operator builds them from the args the chart gives it."""
    (dep,) = [d for d in _docs(helm_template(set_values=set_values)) if d["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    return config_from_args(build_parser().parse_args(args[1:]))["config"].render


def test_pull_secrets_and_policies_reach_engine_and_router_pods(binaries) -> None:
    opts = _operator_options(
        "imagePullSecrets[0].name=regcred", "engineImage.pullPolicy=Never", "routerImage.pullPolicy=Always"
    )
    cr = yaml.safe_load(QUICKSTART.read_text())
    pods = _pod_specs(_render_cr(cr, opts))
    engine, router = pods["smollm2-engine"], pods["smollm2-router"]
    for pod in (engine, router):
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert {c["imagePullPolicy"] for c in engine["containers"]} == {"Never"}
    assert {c["imagePullPolicy"] for c in router["containers"]} == {"Always"}
    # the CR's own list overrides the operator's default; an empty one pulls with none
    own = _pod_specs(_render_cr({**cr, "spec": {**cr["spec"], "imagePullSecrets": [{"name": "team-reg"}]}}, opts))
    assert {p["imagePullSecrets"][0]["name"] for p in own.values()} == {"team-reg"}
    none = _pod_specs(_render_cr({**cr, "spec": {**cr["spec"], "imagePullSecrets": []}}, opts))
    assert all("imagePullSecrets" not in p for p in none.values())
    # without the values, pods carry neither (Kubernetes' defaults)
    plain = _pod_specs(_render_cr(cr, _operator_options()))
    assert all("imagePullSecrets" not in p for p in plain.values())
    assert all("imagePullPolicy" not in c for p in plain.values() for c in p["containers"])


def _named_values() -> set[str]:
    """Chart values the docs name: docs/ship.md's values and images tables, README's 'Values you usually set'."""
    names: set[str] = set()
    table = (REPO / "docs" / "ship.md").read_text().split("Values users usually set", 1)[1].split("\n\n", 2)[1]
    for line in table.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([A-Za-z][\w.*]*)`", line.split("|")[1]))
    images = (REPO / "docs" / "ship.md").read_text().split("set these values:", 1)[1].split("\n\n", 2)[1]
    for line in images.splitlines()[2:]:  # the `set` column of the images table
        names |= set(re.findall(r"`([A-Za-z][\w.*]*)`", line.split("|")[2]))
    readme = (REPO / "README.md").read_text()
    usual = readme.split("Values you usually set:", 1)[1].split("\n\n", 1)[0]
    names |= set(re.findall(r"`([A-Za-z][\w.*]*)`", usual))
    return names


def _doc_set_flags() -> list[str]:
    """Every `--set key=value` in README and docs/ (the kind walkthrough's among them)."""
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    return sorted({f.rstrip(":,.") for f in re.findall(r"--set ([\w.\[\]]+=[^\s\\`]+)", text)})


def _schema_node(schema: dict, path: list[str]) -> dict | None:
    node = schema
    for part in path:
        if part == "*":
            return node if node.get("properties") else None
        node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return node


def test_every_value_the_docs_name_is_in_the_schema() -> None:
    names = _named_values()
    assert {"engineImage.*", "imagePullSecrets", "operator.watchNamespaces"} <= names  # the parser finds them
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        relative = ["operator", *parts] if parts[0] in ("nodeSelector", "tolerations", "affinity") else parts
        if _schema_node(schema, relative) is None:
            missing.append(name)
    assert not missing, f"documented values values.schema.json rejects: {missing}"


def test_every_documented_set_flag_renders(binaries) -> None:
    flags = _doc_set_flags()
    assert any(f.startswith("engineImage.repository=") for f in flags), "the kind walkthrough sets the CPU image"
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    objects = _docs(helm_template(set_values=tuple(flags)))  # helm checks the schema and fails on a bad value
    (dep,) = [d for d in objects if d["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    build_parser().parse_args(args[1:])  # and the operator takes what the chart passes
