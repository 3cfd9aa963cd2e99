"""Builds the LLMDeployment CRD. `crds/llmdeployment.yaml` is this function's output (a test keeps them equal).

Written in Python so the schema's defaults and enums come from the same constants as the pydantic spec.
Regenerate with: python -m kubellm.operator.crd > crds/llmdeployment.yaml
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from kubellm.operator import spec as s
from kubellm.routing import DEFAULT_PREFIX_MIN_MATCH_RATIO, DEFAULT_PREFIX_MIN_MATCH_TOKENS

Schema = dict[str, Any]


def _obj(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    out: Schema = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def _str(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


def _int(description: str, **extra: Any) -> Schema:
    return {"type": "integer", "description": description, **extra}


def _num(description: str, **extra: Any) -> Schema:
    return {"type": "number", "description": description, **extra}


def _bool(description: str, default: bool) -> Schema:
    return {"type": "boolean", "description": description, "default": default}


def _quantity(description: str) -> Schema:
    return {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-int-or-string": True,
        "description": description,
        "pattern": s.QUANTITY_PATTERN,
    }


def _secret_ref(description: str, default_key: str) -> Schema:
    return _obj(
        {
            "name": _str("Secret name, in the LLMDeployment's namespace", minLength=1),
            "key": _str("key", default=default_key),
        },
        required=["name"],
        description=description,
    )


def _free_object(description: str) -> Schema:
    return {"type": "object", "description": description, "x-kubernetes-preserve-unknown-fields": True}


def spec_schema() -> Schema:
    model = _obj(
        {
            "source": _str(
                "Hugging Face id (org/name), pvc://claim/path, or builtin:smollm2-135m-instruct",
                pattern=s.MODEL_SOURCE_PATTERN,
            ),
            "servedModelName": _str("name clients send as `model` (default: derived from source)"),
            "revision": _str("Hugging Face revision (branch, tag or commit)", default="main", minLength=1),
            "tokenSecretRef": _secret_ref("Secret holding a Hugging Face token (gated/private models)", "token"),
            "hfEndpoint": _str("Hugging Face endpoint (HF_ENDPOINT), e.g. a mirror", pattern=r"^https?://"),
        },
        required=["source"],
    )
    engine = _obj(
        {
            "image": _str("engine image (default: the operator's --engine-image)"),
            "args": {"type": "array", "items": {"type": "string"}, "description": "extra `kubellm serve` flags"},
            "tensorParallelSize": _int("GPUs one replica shards the model over", minimum=1, maximum=64, default=1),
            "maxModelLen": _int("context length", minimum=1),
            "gpuMemoryUtilization": _num(
                "fraction of GPU memory the engine may use", minimum=0.05, maximum=1, default=0.9
            ),
            "enablePrefixCaching": _bool("reuse KV blocks of shared prefixes", True),
            "dtype": _str("weights/activations dtype", enum=list(s.DTYPES), default="auto"),
            "quantization": _str(
                "fp8: quantize a bf16 checkpoint's linear layers to FP8 at load (per tensor, dynamic activations); "
                "unset: as the checkpoint's quantization_config says (FP8 checkpoints need nothing here)",
                enum=list(s.QUANTIZATIONS),
            ),
            "kvCacheDtype": _str(
                "KV cache storage: auto (the model dtype) or fp8 (e4m3: twice the tokens in the same memory)",
                enum=list(s.KV_CACHE_DTYPES),
                default="auto",
            ),
            "terminationGracePeriodSeconds": _int("time to drain in-flight requests", minimum=0, default=120),
            "startupTimeoutSeconds": _int(
                "time allowed to load weights before the startup probe fails", minimum=30, default=1800
            ),
        }
    )
    resources = _obj(
        {
            "gpusPerReplica": _int("nvidia.com/gpu per engine replica (0: CPU)", minimum=0, maximum=64, default=1),
            "cpu": _quantity("CPU request per engine replica"),
            "memory": _quantity("memory request and limit per engine replica"),
            "shmSize": _quantity("size of /dev/shm (tensor parallel)"),
        }
    )
    autoscaling = _obj(
        {
            "enabled": _bool("scale on queue depth and KV cache usage", False),
            "minReplicas": _int("lower bound; 0 allows scale to zero", minimum=0, default=1),
            "maxReplicas": _int("upper bound", minimum=1, default=4),
            "targetWaitingRequests": _num(
                "waiting requests per replica to aim for", exclusiveMinimum=True, minimum=0, default=4
            ),
            "targetKVCacheUsage": _num(
                "KV cache usage (0-1 fraction) to aim for", exclusiveMinimum=True, minimum=0, maximum=1, default=0.8
            ),
            "scaleUpStabilizationSeconds": _int("load must persist this long before scaling up", minimum=0, default=30),
            "scaleDownDelaySeconds": _int(
                "low load (or idle, for zero) must persist this long before scaling down", minimum=0, default=300
            ),
        }
    )
    router = _obj(
        {
            "replicas": _int("router replicas", minimum=1, default=1),
            "policy": _str("routing policy", enum=list(s.ROUTER_POLICIES), default="prefix"),
            "prefixMinMatchRatio": _num(
                "prefix policy: a cached prefix pulls a request to its replica only when it covers at least this "
                "fraction of the prompt; shorter matches are routed as no match (0: any match; unset: the "
                f"router's default, {DEFAULT_PREFIX_MIN_MATCH_RATIO:g})",
                minimum=0,
                maximum=1,
            ),
            "prefixMinMatchTokens": _int(
                "prefix policy: a cached prefix must also be at least this many tokens long to pull a request "
                f"(0: any length; unset: the router's default, {DEFAULT_PREFIX_MIN_MATCH_TOKENS})",
                minimum=0,
            ),
            "apiKeySecretRef": _secret_ref("Secret with the API key clients must send", "api-key"),
            "image": _str("router image (default: the operator's --router-image)"),
            "cpu": _quantity(
                "CPU limit per router replica (request: 250m unless set); the router runs one worker process per "
                f"CPU of its limit (default {s.DEFAULT_ROUTER_CPU_LIMIT})"
            ),
            "memory": _quantity("memory request and limit per router replica"),
        }
    )
    model_cache = _obj(
        {
            "claimName": _str("an existing PVC to cache models in"),
            "size": _quantity("size of a PVC the operator creates for the cache"),
            "storageClassName": _str("storage class of that PVC"),
            "accessMode": _str(
                "access mode of that PVC (ReadWriteMany to share across nodes)",
                enum=list(s.ACCESS_MODES),
                default="ReadWriteMany",
            ),
        },
        description="where downloaded models persist; without it each pod downloads into an emptyDir",
    )
    env_var = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1}},
        "x-kubernetes-preserve-unknown-fields": True,
    }
    return _obj(
        {
            "model": model,
            "engine": engine,
            "replicas": _int("engine replicas when autoscaling is off", minimum=0, default=1),
            "resources": resources,
            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
            "tolerations": {"type": "array", "items": _free_object("a core/v1 Toleration")},
            "affinity": _free_object("a core/v1 Affinity"),
            "autoscaling": autoscaling,
            "router": router,
            "modelCache": model_cache,
            "env": {"type": "array", "items": env_var, "description": "core/v1 EnvVars for the engine"},
            "priorityClassName": _str("priority class of the engine pods"),
            "imagePullSecrets": {
                "type": "array",
                "items": _obj({"name": _str("Secret name", minLength=1)}, required=["name"]),
                "description": "Secrets for pulling the engine and router images; unset: the operator's default "
                "(the Helm chart's imagePullSecrets), [] for none",
            },
            "networkPolicy": _obj({"enabled": _bool("only the router may reach the engines' API port", True)}),
            "serviceMonitor": _obj({"enabled": _bool("create a ServiceMonitor when its CRD exists", True)}),
        },
        required=["model"],
    )


def status_schema() -> Schema:
    condition = _obj(
        {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer"},
        },
        required=["type", "status"],
    )
    return _obj(
        {
            "phase": {"type": "string"},
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "replicas": {"type": "integer"},
            "desiredReplicas": {"type": "integer"},
            "readyReplicas": {"type": "integer"},
            "selector": {"type": "string"},
            "endpoint": {"type": "string"},
            "model": {"type": "string"},
            "observedGeneration": {"type": "integer"},
            "lastScaleTime": {"type": "string", "format": "date-time"},
            "lastScaleReason": {"type": "string"},
        }
    )


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{s.PLURAL}.{s.GROUP}", "labels": {"app.kubernetes.io/name": "kubellm"}},
        "spec": {
            "group": s.GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": s.PLURAL,
                "singular": "llmdeployment",
                "kind": s.KIND,
                "listKind": f"{s.KIND}List",
                "shortNames": ["llmd"],
                "categories": ["kubellm"],
            },
            "versions": [
                {
                    "name": s.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": _obj(
                            {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                            required=["spec"],
                            description="An LLM served by kubellm engine replicas behind a kubellm router.",
                        )
                    },
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.source"},
                        {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
                        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


HEADER = "# Generated by `python -m kubellm.operator.crd`; edit operator/crd.py, not this file.\n"


def render_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render_yaml())
