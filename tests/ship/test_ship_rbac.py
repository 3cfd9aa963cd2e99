"""The operator's ClusterRoles grant exactly what it needs: the API calls its code makes, kopf's own needs,
and every rule of the Roles it renders (Kubernetes refuses to let a subject grant rights it does not hold).

"What its code makes" is recorded, not listed by hand: the real Reconciler runs every example
LLMDeployment (plus one with every optional object switched on) against a recording client that first
finds nothing (creates), then finds stale objects (patches) and orphans (garbage collection deletes).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from .tools import REPO, helm_template

Triple = tuple[str, str, str]  # (apiGroup, resource, verb)

# Resources kopf touches on the operator's behalf (kopf docs, "Deployment" → RBAC), for our settings:
# watching the CR (list/watch), finalizers + progress annotations (patch), status (patch of the status
# subresource), Events (create), scanning for CRDs (and namespaces, when given namespace patterns) and,
# only with peering, the peering objects.
KOPF_NEEDS: set[Triple] = {
    ("kubellm.io", "llmdeployments", "list"),
    ("kubellm.io", "llmdeployments", "watch"),
    ("kubellm.io", "llmdeployments", "patch"),
    ("kubellm.io", "llmdeployments/status", "patch"),
    ("", "events", "create"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
}
KOPF_PEERING: set[Triple] = {
    ("kopf.dev", r, v) for r in ("clusterkopfpeerings", "kopfpeerings") for v in ("get", "list", "watch", "patch")
}
# Granted though no code path above records them, each for a stated reason.
DELIBERATE_EXTRAS: dict[Triple, str] = {
    ("kubellm.io", "llmdeployments", "get"): "kopf re-reads an object after a failed patch",
    ("kubellm.io", "llmdeployments/status", "get"): "pairs with status patch (kubectl-style status reads)",
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"): "kopf's CRD lookup by name",
    ("", "namespaces", "get"): "kopf resolves single namespaces by name",
}
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces", "clusterkopfpeerings"}


def triples(rules: list[Mapping[str, Any]]) -> set[Triple]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


class RecordingClient:
    """Stands in for kubellm.operator.kube.KubeClient and records every call as an RBAC triple."""

    def __init__(self, phase: str) -> None:
        self.phase = phase  # "create": nothing exists; "drift": everything exists, stale, plus orphans
        self.calls: set[Triple] = set()

    def _rec(self, kind: Any, verb: str) -> None:
        self.calls.add((kind.group, kind.plural, verb))

    async def get(self, kind: Any, namespace: str, name: str) -> dict[str, Any] | None:
        self._rec(kind, "get")
        if self.phase == "create":
            return None
        return {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": {"name": name, "namespace": namespace}}

    async def list(self, kind: Any, namespace: str, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        self._rec(kind, "list")
        if self.phase == "create" or kind.kind == "Pod":
            return []
        orphan = {"name": "orphan", "ownerReferences": [{"controller": True, "uid": "uid-1"}]}
        return [{"apiVersion": kind.api_version, "kind": kind.kind, "metadata": orphan}]

    async def create(self, kind: Any, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self._rec(kind, "create")
        return copy.deepcopy(body)

    async def patch(self, kind: Any, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self._rec(kind, "patch")
        return copy.deepcopy(patch)

    async def delete(self, kind: Any, namespace: str, name: str) -> None:
        self._rec(kind, "delete")

    async def serves(self, kind: Any) -> bool:
        return True  # API discovery: allowed to every authenticated user (system:discovery), no rule needed

    async def close(self) -> None:
        pass


def _everything_on() -> dict[str, Any]:
    """An LLMDeployment that makes the operator render every kind it can."""
    return {
        "apiVersion": "kubellm.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "everything"},
        "spec": {
            "model": {"source": "meta-llama/Llama-3.1-8B-Instruct"},
            "replicas": 1,
            "resources": {"gpusPerReplica": 1},
            "modelCache": {"size": "100Gi"},
            "networkPolicy": {"enabled": True},
            "serviceMonitor": {"enabled": True},
        },
    }


def _cr_bodies() -> list[dict[str, Any]]:
    bodies = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "examples").glob("*.yaml"))]
    bodies.append(_everything_on())
    for b in bodies:
        b["metadata"].update(namespace="team-a", uid="uid-1", generation=1)
    return bodies


@pytest.fixture(scope="module")
def code_calls() -> set[Triple]:
    from kubellm.operator.metrics import OperatorMetrics
    from kubellm.operator.reconcile import OperatorConfig, Reconciler

    calls: set[Triple] = set()

    async def run() -> None:
        for phase in ("create", "drift"):
            for body in _cr_bodies():
                client = RecordingClient(phase)
                rec = Reconciler(client, OperatorConfig(), OperatorMetrics())  # type: ignore[arg-type]
                try:
                    await rec.reconcile(body, lambda *_: None, gc=True, autoscale=True)
                finally:
                    await rec.close()
                calls.update(client.calls)

    asyncio.run(run())
    return calls


@pytest.fixture(scope="module")
def rendered_role_rules() -> set[Triple]:
    """Rules of every Role the operator renders, over every example."""
    from kubellm.operator import render as rd
    from kubellm.operator.spec import parse_spec

    out: set[Triple] = set()
    for body in _cr_bodies():
        spec = parse_spec(body["metadata"]["name"], body["spec"])
        owner = rd.Owner(body["metadata"]["name"], "team-a", "uid-1")
        opts = rd.RenderOptions(service_monitor_available=True)
        for m in rd.render(spec, owner, opts, 1).manifests:
            if m["kind"] in ("Role", "ClusterRole"):
                out |= triples(m["rules"])
    assert out, "the operator renders no Role: the router could not discover engines"
    return out


def _chart_rbac(*values: str) -> tuple[set[Triple], set[Triple], list[dict]]:
    """(cluster role triples, namespaced role triples, bindings) as the chart renders them."""
    docs = [d for d in yaml.safe_load_all(helm_template(set_values=values)) if d]
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    assert set(roles) == {"kubellm", "kubellm-cluster"}, set(roles)
    bindings = [d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    return triples(roles["kubellm-cluster"]["rules"]), triples(roles["kubellm"]["rules"]), bindings


def test_code_calls_are_recorded(code_calls: set[Triple]) -> None:
    """The recording drove every path: create, patch and delete on what the operator renders."""
    verbs = {v for _, _, v in code_calls}
    assert {"get", "list", "create", "patch", "delete"} <= verbs
    assert ("apps", "deployments", "create") in code_calls
    assert ("", "pods", "list") in code_calls


@pytest.mark.parametrize("peering", [False, True])
def test_cluster_role_is_exactly_what_is_needed(
    peering: bool, code_calls: set[Triple], rendered_role_rules: set[Triple]
) -> None:
    cluster, namespaced, _ = _chart_rbac(f"operator.peering.enabled={str(peering).lower()}")
    granted = cluster | namespaced
    needed = code_calls | rendered_role_rules | KOPF_NEEDS | (KOPF_PEERING if peering else set())
    missing = needed - granted
    assert not missing, f"the chart's ClusterRoles lack: {sorted(missing)}"
    extra = granted - needed - set(DELIBERATE_EXTRAS)
    assert not extra, f"the chart's ClusterRoles grant more than the operator needs: {sorted(extra)}"
    assert rendered_role_rules <= namespaced, "router Role rules must be held where the operator creates Roles"
    assert {r for _, r, _ in cluster} <= CLUSTER_SCOPED
    assert not {r for _, r, _ in namespaced} & CLUSTER_SCOPED


def test_chart_matches_operator_rbac_module(code_calls: set[Triple], rendered_role_rules: set[Triple]) -> None:
    """operator/rbac.py (OPERATOR_RULES) declares the rules; the chart grants those minus any no code uses
    (e.g. `get` on pods: the reconciler only lists them)."""
    from kubellm.operator.rbac import OPERATOR_RULES

    declared = triples([r.as_k8s() for r in OPERATOR_RULES])
    cluster, namespaced, _ = _chart_rbac("operator.peering.enabled=true")
    chart = cluster | namespaced
    assert chart <= declared, f"the chart grants what operator/rbac.py does not declare: {sorted(chart - declared)}"
    # What the chart leaves out of rbac.py must be provably unused: no recorded call, no kopf need, no Role rule.
    needed = code_calls | rendered_role_rules | KOPF_NEEDS | KOPF_PEERING | set(DELIBERATE_EXTRAS)
    omitted = declared - chart
    assert not omitted & needed, f"the chart omits rules the operator uses: {sorted(omitted & needed)}"
    cluster, namespaced, _ = _chart_rbac()
    assert cluster | namespaced == {t for t in chart if t[0] != "kopf.dev"}


def test_namespaced_install_binds_rights_only_in_watched_namespaces() -> None:
    _, _, bindings = _chart_rbac("operator.watchNamespaces={team-a,team-b}")
    crb = [b for b in bindings if b["kind"] == "ClusterRoleBinding"]
    rb = [b for b in bindings if b["kind"] == "RoleBinding"]
    assert [b["roleRef"]["name"] for b in crb] == ["kubellm-cluster"]
    assert sorted(b["metadata"]["namespace"] for b in rb) == ["team-a", "team-b"]
    assert {b["roleRef"]["name"] for b in rb} == {"kubellm"}
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "kubellm", "namespace": "kubellm-system"}]


def test_no_wildcards_and_no_secrets() -> None:
    cluster, namespaced, _ = _chart_rbac("operator.peering.enabled=true")
    for g, r, v in cluster | namespaced:
        assert "*" not in (g, r, v)
        assert r != "secrets", "the operator references Secrets by name; it never reads them"
        assert v not in ("escalate", "bind", "impersonate")
