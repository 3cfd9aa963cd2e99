"""Rendered manifests: valid Kubernetes objects for every example, with the shape the issue asks for."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubellm.operator import rbac
from kubellm.operator import render as rd
from kubellm.operator.kube import KINDS
from kubellm.operator.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
K8S_VERSION = "1.33.0"
OPTS = rd.RenderOptions(service_monitor_available=True)
OWNER_UID = "7f0c4f5e-0000-4000-8000-000000000001"


@functools.cache
def rendered(path: Path) -> tuple[dict[str, Any], rd.Rendered]:
    cr = yaml.safe_load(path.read_text())
    spec = parse_spec(cr["metadata"]["name"], cr["spec"])
    owner = rd.Owner(cr["metadata"]["name"], "ml", OWNER_UID)
    replicas = rd.desired_engine_replicas(spec, None)
    return cr, rd.render(spec, owner, OPTS, replicas)


def by_kind(r: rd.Rendered, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [m for m in r.manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [m["metadata"]["name"] for m in r.manifests if m["kind"] == kind])
    return found[0]


def validate_service_monitor(m: dict[str, Any]) -> None:
    # kubernetes-validate ships no prometheus-operator schemas: check the fields Prometheus reads
    assert m["apiVersion"] == "monitoring.coreos.com/v1"
    assert m["spec"]["selector"]["matchLabels"]
    for ep in m["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scheme", "scrapeTimeout"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_rendered_object_validates_against_kubernetes_openapi(path):
    _, r = rendered(path)
    kinds = {m["kind"] for m in r.manifests}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    assert {"NetworkPolicy", "ServiceMonitor"} <= kinds
    for m in r.manifests:
        if m["kind"] == "ServiceMonitor":
            validate_service_monitor(m)
            continue
        kubernetes_validate.validate(m, K8S_VERSION, strict=True)
        assert len(m["metadata"]["name"]) <= 63
        assert (m["apiVersion"], m["kind"]) in KINDS


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_object_is_owned_by_the_llmdeployment_and_labelled(path):
    cr, r = rendered(path)
    for m in r.manifests:
        (ref,) = m["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "kubellm.io/v1alpha1",
            "kind": "LLMDeployment",
            "name": cr["metadata"]["name"],
            "uid": OWNER_UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert m["metadata"]["labels"][rd.LABEL_LLMD] == cr["metadata"]["name"]
        assert m["metadata"]["namespace"] == "ml"


def engine_container(r: rd.Rendered) -> dict[str, Any]:
    dep = by_kind(r, "Deployment", r.manifests[0]["metadata"]["labels"][rd.LABEL_LLMD] + "-engine")
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_llama_8b_engine_pod_on_one_gpu():
    _, r = rendered(REPO / "examples" / "llama-8b.yaml")
    dep = by_kind(r, "Deployment", "llama-8b-engine")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" == c["resources"]["requests"]["nvidia.com/gpu"]
    assert c["command"] == ["kubellm"]
    args = c["args"]
    assert args[:4] == ["serve", "/models/cache/meta-llama--Llama-3.1-8B-Instruct/main", "--served-model-name",
                        "llama-3.1-8b-instruct"]  # fmt: skip
    for flag, value in [("--max-model-len", "16384"), ("--tensor-parallel-size", "1"), ("--dtype", "bfloat16"),
                        ("--gpu-memory-utilization", "0.9"), ("--port", "8000"), ("--host", "0.0.0.0")]:  # fmt: skip
        assert args[args.index(flag) + 1] == value
    assert "--enable-prefix-caching" in args
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert pod["terminationGracePeriodSeconds"] >= 120
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["python", "-m", "kubellm.operator.model_download"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in init["env"]
    assert init["args"][init["args"].index("--dest") + 1] == args[1]
    cache = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert cache["persistentVolumeClaim"]["claimName"] == "llama-8b-model-cache"
    pvc = by_kind(r, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert dep["spec"]["replicas"] == 1  # autoscaling: starts at spec.replicas clamped to [1, 4]


def test_tensor_parallel_gets_shm_and_gpus():
    _, r = rendered(REPO / "examples" / "llama-70b-tp4.yaml")
    pod = by_kind(r, "Deployment", "llama-70b-engine")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert c["args"][c["args"].index("--tensor-parallel-size") + 1] == "4"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["priorityClassName"] == "llm-serving"


@pytest.mark.parametrize(
    ("example", "expect"),
    [
        ("qwen3-coder-next-tp8.yaml", ["--tensor-parallel-size", "8", "--max-model-len", "200000",
                                       "--max-num-seqs", "2"]),
        ("kimi-k2.5-tp8.yaml", ["--tensor-parallel-size", "8", "--max-model-len", "50000",
                                "--gpu-memory-utilization", "0.98", "--trust-remote-code",
                                "--enable-auto-tool-choice", "--tool-call-parser", "kimi_k2",
                                "--reasoning-parser", "kimi_k2"]),
    ],
)  # fmt: skip
def test_moe_examples_render_their_vllm_flags(example, expect):
    _, r = rendered(REPO / "examples" / example)
    args = engine_container(r)["args"]
    for i in range(0, len(expect) - 1, 2):
        if expect[i + 1].startswith("--"):
            assert expect[i] in args and expect[i + 1] in args
        else:
            assert args[args.index(expect[i]) + 1] == expect[i + 1]
    if example.startswith("qwen"):
        assert "--enable-prefix-caching" in args
    assert "--trust-remote-code" in args or example.startswith("qwen")


def test_single_gpu_moe_example_renders():
    _, r = rendered(REPO / "examples" / "qwen3-coder-30b-a3b.yaml")
    c = engine_container(r)
    args = c["args"]
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.95"
    assert args[args.index("--max-model-len") + 1] == "65536"
    assert ("--enable-prefix-caching" in args and "--tensor-parallel-size" not in args[args.index("serve") :]) or (
        args[args.index("--tensor-parallel-size") + 1] == "1"
    )
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--enable-auto-tool-choice" in args and args[args.index("--tool-call-parser") + 1] == "qwen3_coder"


def test_fp8_examples_pass_quantization_and_kv_cache_dtype_to_the_engine():
    args = engine_container(rendered(REPO / "examples" / "llama-8b-fp8.yaml")[1])["args"]
    assert args[args.index("--kv-cache-dtype") + 1] == "fp8"
    assert "--quantization" not in args  # the checkpoint's quantization_config says it: no flag
    args = engine_container(rendered(REPO / "examples" / "qwen3-30b-a3b-fp8.yaml")[1])["args"]
    assert "--kv-cache-dtype" not in args and "--quantization" not in args  # defaults render no flag
    cr = yaml.safe_load((REPO / "examples" / "llama-8b.yaml").read_text())
    cr["spec"]["engine"]["quantization"] = "fp8"
    spec = parse_spec("online", cr["spec"])
    args = rd.engine_args(spec)
    assert args[args.index("--quantization") + 1] == "fp8"


def test_spec_fp8_values_are_what_the_engine_flags_take():
    from kubellm.engine.config import EngineConfig
    from kubellm.operator import spec

    for value in spec.QUANTIZATIONS:
        assert EngineConfig(quantization=value).quantization == value
    for value in spec.KV_CACHE_DTYPES:
        assert EngineConfig(kv_cache_dtype=value).kv_cache_dtype == value


def test_builtin_model_on_cpu_has_no_gpu_no_download():
    _, r = rendered(REPO / "examples" / "smollm2-cpu.yaml")
    dep = by_kind(r, "Deployment", "smollm2-engine")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert "initContainers" not in pod
    assert "nvidia.com/gpu" not in str(c["resources"])
    assert "tolerations" not in pod
    assert c["args"][1] == "builtin:smollm2-135m-instruct"
    assert c["args"][c["args"].index("--device") + 1] == "cpu"
    assert c["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_router_args_follow_the_documented_contract():
    _, r = rendered(REPO / "examples" / "llama-8b.yaml")
    dep = by_kind(r, "Deployment", "llama-8b-router")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["kubellm"]
    assert c["args"] == ["router", "--policy", "prefix", "--port", "8080", "--model", "llama-3.1-8b-instruct",
                         "--discovery", "kubernetes", "--namespace", "ml", "--service", "llama-8b-engine"]  # fmt: skip
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "llama-8b-router"
    svc = by_kind(r, "Service", "llama-8b")
    assert svc["spec"]["ports"][0]["port"] == 80
    assert r.endpoint == "http://llama-8b.ml.svc.cluster.local/v1"
    headless = by_kind(r, "Service", "llama-8b-engine")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["ports"][0]["name"] == rd.ENGINE_PORT_NAME


@pytest.mark.parametrize(("router", "requests", "limits"), [
    ({}, {"cpu": "250m", "memory": "512Mi"}, {"cpu": "2", "memory": "512Mi"}),
    ({"cpu": "4", "memory": "1Gi"}, {"cpu": "4", "memory": "1Gi"}, {"cpu": "4", "memory": "1Gi"}),
])  # fmt: skip
def test_router_cpu_limit_is_set_and_workers_are_left_to_the_router(router, requests, limits):
    """The router runs one worker per CPU of its cgroup limit, so the operator sets the limit, never --workers."""
    spec = parse_spec("x", {"model": {"source": "org/m"}, "router": router})
    c = by_kind(rd.render(spec, rd.Owner("x", "ns", "u"), OPTS, 1), "Deployment", "x-router")["spec"]["template"][
        "spec"
    ]["containers"][0]
    assert c["resources"] == {"requests": requests, "limits": limits}
    assert "--workers" not in c["args"]


def test_router_api_key_comes_from_a_secret_in_the_environment():
    spec = parse_spec("x", {"model": {"source": "org/m"}, "router": {"apiKeySecretRef": {"name": "keys"}}})
    r = rd.render(spec, rd.Owner("x", "ns", "u"), OPTS, 1)
    c = by_kind(r, "Deployment", "x-router")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": rd.ROUTER_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api-key"}}} in c[
        "env"
    ]
    assert not any("key" in a.lower() for a in c["args"])


def test_router_role_reads_endpointslices_only_and_operator_holds_it():
    _, r = rendered(REPO / "examples" / "llama-8b.yaml")
    role = by_kind(r, "Role")
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]  # fmt: skip
    for rule in role["rules"]:
        for g in rule["apiGroups"]:
            for res in rule["resources"]:
                for v in rule["verbs"]:
                    assert rbac.grants(rbac.OPERATOR_RULES, g, res, v), (g, res, v)


def test_network_policy_admits_router_operator_and_monitoring_only():
    opts = rd.RenderOptions(operator_namespace="ops", monitoring_namespaces=("mon", "prom"))
    spec = parse_spec("x", {"model": {"source": "org/m"}})
    np = by_kind(rd.render(spec, rd.Owner("x", "ns", "u"), opts, 1), "NetworkPolicy")
    assert np["spec"]["podSelector"]["matchLabels"] == {rd.LABEL_LLMD: "x", rd.LABEL_COMPONENT: "engine"}
    (rule,) = np["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": rd.ENGINE_PORT}]
    peers = rule["from"]
    assert peers[0] == {"podSelector": {"matchLabels": {rd.LABEL_LLMD: "x", rd.LABEL_COMPONENT: "router"}}}
    assert peers[1]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ops"}
    assert peers[1]["podSelector"]["matchLabels"] == rd.OPERATOR_POD_LABELS
    assert [p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in peers[2:]] == ["mon", "prom"]


def test_optional_objects_follow_spec_and_cluster():
    spec = parse_spec("x", {"model": {"source": "pvc://weights/llama"}, "networkPolicy": {"enabled": False}})
    r = rd.render(spec, rd.Owner("x", "ns", "u"), rd.RenderOptions(service_monitor_available=False), 1)
    kinds = [m["kind"] for m in r.manifests]
    assert "NetworkPolicy" not in kinds and "ServiceMonitor" not in kinds and "PersistentVolumeClaim" not in kinds
    pod = by_kind(r, "Deployment", "x-engine")["spec"]["template"]["spec"]
    assert {"name": "model-pvc", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]
    assert pod["containers"][0]["args"][1] == "/models/pvc/llama"
    assert "initContainers" not in pod


def test_every_kind_the_operator_touches_is_in_its_rbac_rules():
    for (_, kind), k in KINDS.items():
        verbs = ("get", "list") if kind == "Pod" else ("get", "list", "create", "patch", "delete")
        for v in verbs:
            assert rbac.grants(rbac.OPERATOR_RULES, k.group, k.plural, v), (kind, v)
    for res, verbs in [("llmdeployments", ("list", "watch", "patch")), ("llmdeployments/status", ("patch",))]:
        for v in verbs:
            assert rbac.grants(rbac.OPERATOR_RULES, "kubellm.io", res, v)
    assert rbac.grants(rbac.OPERATOR_RULES, "", "events", "create")


def test_rbac_doc_lists_exactly_the_rules():
    doc = (REPO / "docs" / "operator-rbac.md").read_text()
    rows = set()
    for line in doc.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] not in ("API group", "---") and not set(cells[0]) <= {"-"}:
            group = "" if cells[0] in ('""', "(core)") else cells[0]
            rows.add((group, cells[1], cells[2]))
    expected = {(r.api_group, ", ".join(r.resources), ", ".join(r.verbs)) for r in rbac.OPERATOR_RULES}
    assert rows == expected
