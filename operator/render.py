"""LLMDeployment → Kubernetes manifests, as pure functions (no I/O, no kopf): easy to test and to diff.

Names (for an LLMDeployment `NAME`):
  NAME-engine   Deployment, headless Service (EndpointSlices the router watches), PDB, NetworkPolicy
  NAME          router Service (the endpoint clients use)
  NAME-router   router Deployment, ServiceAccount, Role, RoleBinding
  NAME-model-cache  PVC (only when modelCache.size is set)
  NAME          ServiceMonitor (when the monitoring.coreos.com CRD exists)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kubellm.builtin_models import BUILTIN_PREFIX
from kubellm.operator.rbac import ROUTER_RULES
from kubellm.operator.spec import (
    API_VERSION,
    DEFAULT_ENGINE_IMAGE,
    DEFAULT_ROUTER_CPU_LIMIT,
    DEFAULT_ROUTER_IMAGE,
    KIND,
    LLMDeploymentSpec,
)

Manifest = dict[str, Any]

ENGINE_PORT = 8000
ROUTER_PORT = 8080
MODEL_DIR = "/models"
USER_ID = 1000

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_LLMD = "kubellm.io/llmdeployment"
MANAGED_BY = "kubellm-operator"

# Pods of the operator carry these labels (the chart sets them); the engines' NetworkPolicy admits them.
OPERATOR_POD_LABELS = {LABEL_NAME: "kubellm", LABEL_COMPONENT: "operator"}

# The router's command line as the operator renders it. The router reads engines from the EndpointSlices
# of --service (label kubernetes.io/service-name=SERVICE) in --namespace, port named "http"; the API key,
# when set, arrives in the environment variable below, never on the command line.
ROUTER_ARGS_TEMPLATE = (
    "router",
    "--policy", "{policy}",
    "--port", str(ROUTER_PORT),
    "--model", "{served_model_name}",
    "--discovery", "kubernetes",
    "--namespace", "{namespace}",
    "--service", "{engine_service}",
)  # fmt: skip
ROUTER_API_KEY_ENV = "KUBELLM_API_KEY"
ENGINE_PORT_NAME = "http"


@dataclass(frozen=True)
class RenderOptions:
    """Operator-wide settings (from `kubellm operator` flags) that shape every LLMDeployment's objects."""

    engine_image: str = DEFAULT_ENGINE_IMAGE
    router_image: str = DEFAULT_ROUTER_IMAGE
    operator_namespace: str = "kubellm-system"
    monitoring_namespaces: tuple[str, ...] = ("monitoring",)
    cluster_domain: str = "cluster.local"
    service_monitor_available: bool = False
    image_pull_secrets: tuple[str, ...] = ()  # for LLMDeployments that name none (spec.imagePullSecrets unset)
    engine_image_pull_policy: str | None = None  # None: Kubernetes' default for the tag
    router_image_pull_policy: str | None = None


@dataclass(frozen=True)
class Owner:
    """The LLMDeployment the objects belong to (owner references make deletion cascade)."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class Names:
    engine: str
    router: str
    router_service: str
    model_cache: str
    service_monitor: str

    @classmethod
    def of(cls, name: str) -> Names:
        return cls(f"{name}-engine", f"{name}-router", name, f"{name}-model-cache", name)


@dataclass
class Rendered:
    """All manifests for one LLMDeployment, plus facts the reconciler reports in status."""

    manifests: list[Manifest] = field(default_factory=list)
    endpoint: str = ""
    selector: str = ""
    model_name: str = ""


def selector_labels(owner: Owner, component: str) -> dict[str, str]:
    return {LABEL_LLMD: owner.name, LABEL_COMPONENT: component}


def common_labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        LABEL_NAME: "kubellm",
        LABEL_INSTANCE: owner.name,
        LABEL_MANAGED_BY: MANAGED_BY,
        **selector_labels(owner, component),
    }


def _meta(owner: Owner, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": common_labels(owner, component),
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def label_selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _quantity(value: str | int | float | None) -> str | None:
    """Quantities as strings; fractional CPUs in millicores, the form the API server stores."""
    if value is None:
        return None
    if isinstance(value, float) or (isinstance(value, str) and re.fullmatch(r"\d*\.\d+", value)):
        return f"{round(float(value) * 1000)}m"
    return str(value)


def _restricted_container_security() -> dict[str, Any]:
    """Every container: non-root, no privilege escalation, no capabilities, read-only root filesystem (the
    engine and the download write only to volumes: /tmp, /dev/shm and the model cache)."""
    return {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": USER_ID,
        "runAsGroup": USER_ID,
        "fsGroup": USER_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def model_path(spec: LLMDeploymentSpec) -> str:
    """What the engine gets as MODEL: the builtin name, a path on the PVC, or the download directory."""
    m = spec.model
    if m.kind == "builtin":
        return BUILTIN_PREFIX + m.source.removeprefix(BUILTIN_PREFIX)
    if m.kind == "pvc":
        rest = m.source.removeprefix("pvc://").split("/", 1)
        return f"{MODEL_DIR}/pvc/{rest[1]}".rstrip("/") if len(rest) > 1 else f"{MODEL_DIR}/pvc"
    return download_dir(m.source, m.revision)


def download_dir(repo: str, revision: str) -> str:
    safe_rev = re.sub(r"[^A-Za-z0-9._-]", "_", revision)
    return f"{MODEL_DIR}/cache/{repo.replace('/', '--')}/{safe_rev}"


def engine_args(spec: LLMDeploymentSpec) -> list[str]:
    e = spec.engine
    args = ["serve", model_path(spec), "--served-model-name", spec.model.name]
    if e.max_model_len is not None:
        args += ["--max-model-len", str(e.max_model_len)]
    args += [
        "--tensor-parallel-size", str(e.tensor_parallel_size),
        "--gpu-memory-utilization", str(e.gpu_memory_utilization),
        "--enable-prefix-caching" if e.enable_prefix_caching else "--no-enable-prefix-caching",
        "--dtype", e.dtype,
    ]  # fmt: skip
    if e.quantization is not None:
        args += ["--quantization", e.quantization]
    if e.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", e.kv_cache_dtype]
    if spec.resources.gpus_per_replica == 0:
        args += ["--device", "cpu"]
    args += list(e.args)
    args += ["--port", str(ENGINE_PORT), "--host", "0.0.0.0"]
    return args


def router_args(spec: LLMDeploymentSpec, owner: Owner) -> list[str]:
    values = {
        "policy": spec.router.policy,
        "served_model_name": spec.model.name,
        "namespace": owner.namespace,
        "engine_service": Names.of(owner.name).engine,
    }
    args = [part.format(**values) for part in ROUTER_ARGS_TEMPLATE]
    if spec.router.prefix_min_match_ratio is not None:  # unset: the router's default applies
        args += ["--prefix-min-match-ratio", repr(float(spec.router.prefix_min_match_ratio))]
    if spec.router.prefix_min_match_tokens is not None:
        args += ["--prefix-min-match-tokens", str(spec.router.prefix_min_match_tokens)]
    return args


def _engine_volumes(spec: LLMDeploymentSpec, names: Names) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    cache = spec.model_cache
    if cache.claim_name:
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.claim_name}})
    elif cache.size:
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": names.model_cache}})
    else:
        volumes.append({"name": "model-cache", "emptyDir": {}})
    mounts.append({"name": "model-cache", "mountPath": f"{MODEL_DIR}/cache"})
    if spec.model.kind == "pvc":
        claim = spec.model.source.removeprefix("pvc://").split("/", 1)[0]
        volumes.append({"name": "model-pvc", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model-pvc", "mountPath": f"{MODEL_DIR}/pvc", "readOnly": True})
    shm: dict[str, Any] = {"medium": "Memory"}
    shm_size = _quantity(spec.resources.shm_size)
    if shm_size:
        shm["sizeLimit"] = shm_size
    elif spec.engine.tensor_parallel_size > 1:
        shm["sizeLimit"] = "16Gi"
    else:
        shm["sizeLimit"] = "2Gi"
    volumes.append({"name": "dshm", "emptyDir": shm})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    return volumes, mounts


def _engine_resources(spec: LLMDeploymentSpec) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    r = spec.resources
    if r.gpus_per_replica:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(r.gpus_per_replica)
    cpu = _quantity(r.cpu)
    if cpu:
        requests["cpu"] = cpu
    memory = _quantity(r.memory)
    if memory:
        requests["memory"] = limits["memory"] = memory
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _download_init_container(spec: LLMDeploymentSpec, image: str, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    m = spec.model
    env: list[dict[str, Any]] = [{"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}, {"name": "HOME", "value": "/tmp"}]
    if m.hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": m.hf_endpoint})
    if m.token_secret_ref:
        ref = m.token_secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    # user env (e.g. HF_ENDPOINT, proxies) reaches the download too
    env += [dict(e) for e in spec.env if e.get("name") not in {x["name"] for x in env}]
    return {
        "name": "model-download",
        "image": image,
        "command": ["python", "-m", "kubellm.operator.model_download"],
        "args": ["--repo", m.source, "--revision", m.revision, "--dest", download_dir(m.source, m.revision)],
        "env": env,
        "volumeMounts": [mt for mt in mounts if mt["name"] in ("model-cache", "tmp")],
        "securityContext": _restricted_container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _image_pull(pod_spec: dict[str, Any], spec: LLMDeploymentSpec, opts: RenderOptions, policy: str | None) -> None:
    """Pull secrets (the CR's, else the operator's default) on the pod, the pull policy on its containers."""
    own = spec.image_pull_secrets
    names = [r.name for r in own] if own is not None else list(opts.image_pull_secrets)
    if names:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in names]
    if policy:
        for c in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
            c["imagePullPolicy"] = policy


def _tolerations(spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    tolerations = [dict(t) for t in spec.tolerations]
    if spec.resources.gpus_per_replica and not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
        # GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def engine_deployment(spec: LLMDeploymentSpec, owner: Owner, opts: RenderOptions, replicas: int) -> Manifest:
    names = Names.of(owner.name)
    image = spec.engine.image or opts.engine_image
    volumes, mounts = _engine_volumes(spec, names)
    http_get = {"path": "/health", "port": ENGINE_PORT_NAME}
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{MODEL_DIR}/cache/hf"},
    ]
    env += [dict(e) for e in spec.env if e.get("name") not in ("HOME", "HF_HOME")]
    container: dict[str, Any] = {
        "name": "engine",
        "image": image,
        "command": ["kubellm"],
        "args": engine_args(spec),
        "ports": [{"name": ENGINE_PORT_NAME, "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "env": env,
        "startupProbe": {
            "httpGet": http_get,
            "periodSeconds": 10,
            "failureThreshold": max(1, spec.engine.startup_timeout_seconds // 10),
        },
        "readinessProbe": {"httpGet": http_get, "periodSeconds": 5, "failureThreshold": 3, "timeoutSeconds": 3},
        "livenessProbe": {"httpGet": http_get, "periodSeconds": 15, "failureThreshold": 4, "timeoutSeconds": 5},
        # endpoints drop the pod before the engine stops taking requests; then the engine drains
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "10"]}}},
        "volumeMounts": mounts,
        "securityContext": _restricted_container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = _engine_resources(spec)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "terminationGracePeriodSeconds": spec.engine.termination_grace_period_seconds + 10,
        "containers": [container],
        "volumes": volumes,
    }
    if spec.model.kind == "hf":
        pod_spec["initContainers"] = [_download_init_container(spec, image, mounts)]
    _image_pull(pod_spec, spec, opts, opts.engine_image_pull_policy)
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    tolerations = _tolerations(spec)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.affinity:
        pod_spec["affinity"] = dict(spec.affinity)
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    # GPUs are rarely spare: replace pods one at a time instead of surging an extra replica
    if spec.resources.gpus_per_replica:
        rolling = {"maxSurge": 0, "maxUnavailable": 1}
    else:
        rolling = {"maxSurge": 1, "maxUnavailable": 0}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, names.engine, "engine"),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(owner, "engine")},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling},
            "template": {
                "metadata": {"labels": common_labels(owner, "engine")},
                "spec": pod_spec,
            },
        },
    }


def engine_service(owner: Owner) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, Names.of(owner.name).engine, "engine"),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(owner, "engine"),
            "ports": [
                {"name": ENGINE_PORT_NAME, "port": ENGINE_PORT, "targetPort": ENGINE_PORT_NAME, "protocol": "TCP"}
            ],
            "publishNotReadyAddresses": False,
        },
    }


def router_service_account(owner: Owner) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(owner, Names.of(owner.name).router, "router"),
    }


def router_role(owner: Owner) -> Manifest:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(owner, Names.of(owner.name).router, "router"),
        "rules": [r.as_k8s() for r in ROUTER_RULES],
    }


def router_role_binding(owner: Owner) -> Manifest:
    name = Names.of(owner.name).router
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(owner, name, "router"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }


def router_deployment(spec: LLMDeploymentSpec, owner: Owner, opts: RenderOptions) -> Manifest:
    names = Names.of(owner.name)
    http_get = {"path": "/health", "port": "http"}
    container: dict[str, Any] = {
        "name": "router",
        "image": spec.router.image or opts.router_image,
        "command": ["kubellm"],
        "args": router_args(spec, owner),
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": http_get, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": http_get, "periodSeconds": 15, "failureThreshold": 4, "timeoutSeconds": 5},
        "securityContext": _restricted_container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.router.api_key_secret_ref:
        ref = spec.router.api_key_secret_ref
        container["env"].append(
            {"name": ROUTER_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    # The router starts one worker per CPU of its cgroup limit (`kubellm router --workers` default), so the
    # limit sets its parallelism; the request stays small where the CR names no CPU (routers idle mostly).
    cpu = _quantity(spec.router.cpu)
    requests = {"cpu": cpu or "250m", "memory": _quantity(spec.router.memory) or "512Mi"}
    limits = {"cpu": cpu or DEFAULT_ROUTER_CPU_LIMIT, "memory": requests["memory"]}
    container["resources"] = {"requests": requests, "limits": limits}
    pod_spec: dict[str, Any] = {
        "serviceAccountName": names.router,
        "securityContext": _pod_security(),
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    _image_pull(pod_spec, spec, opts, opts.router_image_pull_policy)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, names.router, "router"),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": selector_labels(owner, "router")},
            "template": {
                "metadata": {"labels": common_labels(owner, "router")},
                "spec": pod_spec,
            },
        },
    }


def router_service(owner: Owner) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, Names.of(owner.name).router_service, "router"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(owner, "router"),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def engine_pdb(owner: Owner) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(owner, Names.of(owner.name).engine, "engine"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(owner, "engine")}},
    }


def engine_network_policy(owner: Owner, opts: RenderOptions) -> Manifest:
    """Only the router may reach the engine port; the operator (autoscaling scrapes) and monitoring
    namespaces may too, because /metrics shares the API port and NetworkPolicy cannot tell paths apart."""
    port = [{"protocol": "TCP", "port": ENGINE_PORT}]
    peers: list[dict[str, Any]] = [{"podSelector": {"matchLabels": selector_labels(owner, "router")}}]
    peers.append(
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": opts.operator_namespace}},
            "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)},
        }
    )
    for ns in opts.monitoring_namespaces:
        peers.append({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(owner, Names.of(owner.name).engine, "engine"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(owner, "engine")},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": port}],
        },
    }


def model_cache_pvc(spec: LLMDeploymentSpec, owner: Owner) -> Manifest:
    cache = spec.model_cache
    pvc_spec: dict[str, Any] = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": _quantity(cache.size)}},
    }
    if cache.storage_class_name:
        pvc_spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(owner, Names.of(owner.name).model_cache, "model-cache"),
        "spec": pvc_spec,
    }


def service_monitor(owner: Owner) -> Manifest:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(owner, Names.of(owner.name).service_monitor, "metrics"),
        "spec": {
            "selector": {
                "matchLabels": {LABEL_LLMD: owner.name},
                "matchExpressions": [{"key": LABEL_COMPONENT, "operator": "In", "values": ["engine", "router"]}],
            },
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
        },
    }


def desired_engine_replicas(spec: LLMDeploymentSpec, autoscaled: int | None) -> int:
    """spec.replicas without autoscaling; with it, the autoscaler's last decision clamped to [min, max]."""
    if not spec.autoscaling.enabled:
        return spec.replicas
    a = spec.autoscaling
    current = spec.replicas if autoscaled is None else autoscaled
    return max(a.min_replicas, min(a.max_replicas, current))


def render(spec: LLMDeploymentSpec, owner: Owner, opts: RenderOptions, engine_replicas: int) -> Rendered:
    """Every object for one LLMDeployment, in creation order (RBAC before the pods that use it)."""
    names = Names.of(owner.name)
    manifests: list[Manifest] = []
    if spec.model_cache.size and not spec.model_cache.claim_name:
        manifests.append(model_cache_pvc(spec, owner))
    manifests += [
        router_service_account(owner),
        router_role(owner),
        router_role_binding(owner),
        engine_service(owner),
        router_service(owner),
        engine_pdb(owner),
    ]
    if spec.network_policy.enabled:
        manifests.append(engine_network_policy(owner, opts))
    manifests.append(engine_deployment(spec, owner, opts, engine_replicas))
    manifests.append(router_deployment(spec, owner, opts))
    if spec.service_monitor.enabled and opts.service_monitor_available:
        manifests.append(service_monitor(owner))
    endpoint = f"http://{names.router_service}.{owner.namespace}.svc.{opts.cluster_domain}/v1"
    return Rendered(
        manifests=manifests,
        endpoint=endpoint,
        selector=label_selector_string(selector_labels(owner, "engine")),
        model_name=spec.model.name,
    )
