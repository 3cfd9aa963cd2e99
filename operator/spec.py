"""The LLMDeployment spec as a pydantic model: the boundary where a user's CR enters the operator.

Defaults mirror the CRD's (a test compares them), so a CR read from a cluster that applied the CRD's
defaults and one built by hand in a test give the same model. Checks that the CRD's OpenAPI schema
cannot express (cross-field rules, known builtin models) live in `semantic_errors`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from kubellm.builtin_models import BUILTIN_MODELS, BUILTIN_PREFIX

GROUP = "kubellm.io"
VERSION = "v1alpha1"
PLURAL = "llmdeployments"
KIND = "LLMDeployment"
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_ENGINE_IMAGE = "ghcr.io/kubellm/kubellm-engine:0.1.0"
DEFAULT_ROUTER_IMAGE = "ghcr.io/kubellm/kubellm-router:0.1.0"
DEFAULT_ROUTER_CPU_LIMIT = "2"  # CPUs per router pod: its worker processes (kubellm router --workers default)

# Model source forms: a Hugging Face id (org/name), pvc://claim/path, builtin:name.
HF_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
PVC_PATTERN = r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?$"
BUILTIN_PATTERN = r"^builtin:[a-z0-9][a-z0-9._-]*$"
MODEL_SOURCE_PATTERN = f"({HF_ID_PATTERN})|({PVC_PATTERN})|({BUILTIN_PATTERN})"
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
# Child object names append at most "-model-cache" (12 chars) and must stay DNS-1035 labels (<= 63).
MAX_NAME_LENGTH = 50
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

ROUTER_POLICIES = ("prefix", "least_load", "round_robin", "session")
DTYPES = ("auto", "float16", "bfloat16", "float32")
# `kubellm serve --quantization` / `--kv-cache-dtype` values a CR may set (the engine's flags; the operator
# imports no engine code, a test checks the engine accepts each)
QUANTIZATIONS = ("fp8",)
KV_CACHE_DTYPES = ("auto", "fp8")
ACCESS_MODES = ("ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class SecretKeyRef(_Model):
    name: str = Field(min_length=1)
    key: str = "token"


class ApiKeySecretRef(_Model):
    name: str = Field(min_length=1)
    key: str = "api-key"


class ModelSpec(_Model):
    source: str = Field(pattern=MODEL_SOURCE_PATTERN)
    served_model_name: str | None = None
    revision: str = "main"
    token_secret_ref: SecretKeyRef | None = None
    hf_endpoint: str | None = None

    @property
    def kind(self) -> Literal["hf", "pvc", "builtin"]:
        if self.source.startswith(BUILTIN_PREFIX):
            return "builtin"
        if self.source.startswith("pvc://"):
            return "pvc"
        return "hf"

    @property
    def name(self) -> str:
        """The name clients send as `model`: servedModelName, else the source without its scheme."""
        if self.served_model_name:
            return self.served_model_name
        if self.kind == "builtin":
            return self.source.removeprefix(BUILTIN_PREFIX)
        if self.kind == "pvc":
            return self.source.rstrip("/").rsplit("/", 1)[-1]
        return self.source


class LocalObjectReference(_Model):
    name: str = Field(min_length=1)


class EngineSpec(_Model):
    image: str | None = None
    args: list[str] = Field(default_factory=list)
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    max_model_len: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, ge=0.05, le=1)
    enable_prefix_caching: bool = True
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    quantization: Literal["fp8"] | None = None  # unset: the checkpoint's own quantization_config
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    termination_grace_period_seconds: int = Field(default=120, ge=0)
    startup_timeout_seconds: int = Field(default=1800, ge=30)


class ResourcesSpec(_Model):
    gpus_per_replica: int = Field(default=1, ge=0, le=64)
    cpu: str | int | None = None
    memory: str | int | None = None
    shm_size: str | int | None = None


class AutoscalingSpec(_Model):
    enabled: bool = False
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    target_waiting_requests: float = Field(default=4.0, gt=0)
    target_kv_cache_usage: float = Field(default=0.8, gt=0, le=1, alias="targetKVCacheUsage")
    scale_up_stabilization_seconds: int = Field(default=30, ge=0)
    scale_down_delay_seconds: int = Field(default=300, ge=0)


class RouterSpec(_Model):
    replicas: int = Field(default=1, ge=1)
    policy: Literal["prefix", "least_load", "round_robin", "session"] = "prefix"
    # unset: the router's own defaults (kubellm.routing), so they stay in one place
    prefix_min_match_ratio: float | None = Field(default=None, ge=0, le=1)
    prefix_min_match_tokens: int | None = Field(default=None, ge=0)
    api_key_secret_ref: ApiKeySecretRef | None = None
    image: str | None = None
    cpu: str | int | None = None
    memory: str | int | None = None


class ModelCacheSpec(_Model):
    claim_name: str | None = None
    size: str | int | None = None
    storage_class_name: str | None = None
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"] = "ReadWriteMany"


class NetworkPolicySpec(_Model):
    enabled: bool = True


class ServiceMonitorSpec(_Model):
    enabled: bool = True


class LLMDeploymentSpec(_Model):
    model: ModelSpec
    engine: EngineSpec = Field(default_factory=EngineSpec)
    replicas: int = Field(default=1, ge=0)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    model_cache: ModelCacheSpec = Field(default_factory=ModelCacheSpec)
    env: list[dict[str, Any]] = Field(default_factory=list)
    priority_class_name: str | None = None
    # None: the operator's default (the chart sets it from its imagePullSecrets); [] pulls with none
    image_pull_secrets: list[LocalObjectReference] | None = None
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    service_monitor: ServiceMonitorSpec = Field(default_factory=ServiceMonitorSpec)


class SpecError(ValueError):
    """A CR the operator refuses to act on; the message goes to the Degraded condition and an Event."""


def semantic_errors(name: str, spec: LLMDeploymentSpec) -> list[str]:
    """Rules the CRD schema cannot state; any of them means nothing gets created."""
    errors: list[str] = []
    if len(name) > MAX_NAME_LENGTH or not re.match(NAME_PATTERN, name):
        errors.append(
            f"metadata.name {name!r} must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters "
            "(lowercase letters, digits and '-', starting with a letter): child objects are named after it"
        )
    gpus, tp = spec.resources.gpus_per_replica, spec.engine.tensor_parallel_size
    if tp > 1 and tp > gpus:
        errors.append(
            f"engine.tensorParallelSize ({tp}) exceeds resources.gpusPerReplica ({gpus}): "
            "each tensor-parallel rank needs its own GPU"
        )
    auto = spec.autoscaling
    if auto.min_replicas > auto.max_replicas:
        errors.append(
            f"autoscaling.minReplicas ({auto.min_replicas}) is greater than "
            f"autoscaling.maxReplicas ({auto.max_replicas})"
        )
    if spec.model.kind == "builtin":
        short = spec.model.source.removeprefix(BUILTIN_PREFIX)
        if short not in BUILTIN_MODELS:
            known = ", ".join(BUILTIN_PREFIX + m for m in sorted(BUILTIN_MODELS))
            errors.append(f"model.source: unknown builtin model {spec.model.source!r}; builtin models: {known}")
    if spec.model_cache.claim_name and spec.model_cache.size:
        errors.append(
            "modelCache: set either claimName (an existing PVC) or size (a PVC the operator creates), not both"
        )
    return errors


def parse_spec(name: str, raw_spec: dict[str, Any] | None) -> LLMDeploymentSpec:
    """The validated spec, or SpecError with every problem in one message."""
    try:
        spec = LLMDeploymentSpec.model_validate(raw_spec or {})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            problems.append(f"spec.{loc}: {err['msg']}")
        raise SpecError("; ".join(problems)) from None
    errors = semantic_errors(name, spec)
    if errors:
        raise SpecError("; ".join(errors))
    return spec
