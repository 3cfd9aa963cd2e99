"""Every Kubernetes API call the operator makes, as RBAC rules; docs/operator-rbac.md mirrors this.

The chart's ClusterRole is derived from OPERATOR_RULES (a test checks the kinds the operator renders,
reads and lists are all covered, and that every rule of the Role the operator renders is included,
since Kubernetes refuses to let a subject grant permissions it does not hold).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    api_group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str

    def as_k8s(self) -> dict[str, list[str]]:
        return {"apiGroups": [self.api_group], "resources": list(self.resources), "verbs": list(self.verbs)}


# Verbs for objects the operator owns and keeps equal to what it renders (client-side apply).
MANAGE = ("get", "list", "create", "patch", "delete")

# The router's Role (rendered per LLMDeployment): discover engines through EndpointSlices.
ROUTER_RULES: tuple[Rule, ...] = (
    Rule("discovery.k8s.io", ("endpointslices",), ("get", "list", "watch"), "router discovers engine endpoints"),
)

OPERATOR_RULES: tuple[Rule, ...] = (
    # kopf itself
    Rule("kubellm.io", ("llmdeployments",), ("get", "list", "watch", "patch"), "watch CRs, finalizer, progress"),
    Rule("kubellm.io", ("llmdeployments/status",), ("get", "patch"), "status and conditions"),
    Rule("", ("events",), ("create",), "Events for scaling decisions and invalid specs"),
    Rule("apiextensions.k8s.io", ("customresourcedefinitions",), ("get", "list", "watch"), "kopf's CRD discovery"),
    Rule("", ("namespaces",), ("get", "list", "watch"), "kopf watches namespaces when given patterns"),
    Rule(
        "kopf.dev",
        ("clusterkopfpeerings", "kopfpeerings"),
        ("get", "list", "watch", "patch"),
        "kopf peering (not with --standalone)",
    ),
    # objects rendered per LLMDeployment
    Rule("apps", ("deployments",), MANAGE, "engine and router Deployments"),
    Rule("", ("services",), MANAGE, "engine headless Service, router Service"),
    Rule("", ("serviceaccounts",), MANAGE, "router ServiceAccount"),
    Rule("", ("persistentvolumeclaims",), MANAGE, "model cache PVC"),
    Rule("policy", ("poddisruptionbudgets",), MANAGE, "engine PDB"),
    Rule("rbac.authorization.k8s.io", ("roles", "rolebindings"), MANAGE, "router Role/RoleBinding"),
    Rule("networking.k8s.io", ("networkpolicies",), MANAGE, "engine NetworkPolicy"),
    Rule("monitoring.coreos.com", ("servicemonitors",), MANAGE, "ServiceMonitor when the CRD exists"),
    # read-only
    Rule("", ("pods",), ("get", "list"), "engine failures (init/engine termination messages), pod IPs to scrape"),
    *ROUTER_RULES,
)


def cluster_role_rules() -> list[dict[str, list[str]]]:
    return [r.as_k8s() for r in OPERATOR_RULES]


def grants(rules: tuple[Rule, ...], api_group: str, resource: str, verb: str) -> bool:
    return any(api_group == r.api_group and resource in r.resources and verb in r.verbs for r in rules)
