"""Helpers for running the real kopf operator against KMock in tests (GUIDE.md §4).

KMock emulates the API server's objects, lists and watches, but stamps no resourceVersion/uid/generation,
applies JSON patches without answering a failed `test` with 422, and has no status/spec split. The
subclass below adds exactly those, so kopf's optimistic-concurrency finalizer patches behave as on a
real cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import jsonpatch
import kmock
import kopf
from kmock._internal import dicts as kdicts
from kmock._internal import enums

from kubellm import metric_names as mn
from kubellm.operator.cli import run
from kubellm.operator.metrics import OperatorMetrics
from kubellm.operator.reconcile import OperatorConfig
from kubellm.operator.render import RenderOptions

RESOURCES: dict[str, kmock.ResourceInfo] = {}
_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
for key, kind, subresources in [
    ("kubellm.io/v1alpha1/llmdeployments", "LLMDeployment", {"status"}),
    ("apps/v1/deployments", "Deployment", {"status"}),
    ("v1/services", "Service", {"status"}),
    ("v1/serviceaccounts", "ServiceAccount", set()),
    ("v1/persistentvolumeclaims", "PersistentVolumeClaim", {"status"}),
    ("v1/pods", "Pod", {"status"}),
    ("v1/events", "Event", set()),
    ("policy/v1/poddisruptionbudgets", "PodDisruptionBudget", {"status"}),
    ("rbac.authorization.k8s.io/v1/roles", "Role", set()),
    ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding", set()),
    ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy", set()),
]:
    RESOURCES[key] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=_VERBS, subresources=subresources)
# kopf's backbone waits for these to be discoverable even when it never lists them (clusterwide, no scanning)
RESOURCES["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=_VERBS)
RESOURCES["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
    kind="CustomResourceDefinition", namespaced=False, verbs=_VERBS
)
PEERINGS = "kopf.dev/v1/clusterkopfpeerings"  # kopf's peering objects (clusterwide operators)
RESOURCES[PEERINGS] = kmock.ResourceInfo(kind="ClusterKopfPeering", namespaced=False, verbs=_VERBS)
SERVICE_MONITORS = "monitoring.coreos.com/v1/servicemonitors"


def merge_diff(old: Any, new: Any) -> Any:
    """A JSON merge patch turning `old` into `new` (None deletes a key)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        if k not in old or old[k] != v:
            out[k] = merge_diff(old.get(k), v)
    return out


@attrs.define(kw_only=True)
class StampingEmulator(kmock.KubernetesEmulator):
    """KMock plus what a real API server does on writes: uid/resourceVersion/generation, 422 on a failed
    JSON-patch test, status only through /status for resources with that subresource."""

    _rv: Any = attrs.field(factory=lambda: itertools.count(1000), init=False)
    _mut: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)

    def _key(self, request: Any) -> Any:
        return (request.resource, request.namespace, request.name)

    def _has_status_subresource(self, request: Any) -> bool:
        for res in self.resources:
            if res == request.resource:
                return "status" in self.resources[res].subresources
        return False

    async def _handle(self, request: Any) -> Any:
        if request.resource is None or request.action not in (enums.action.CREATE, enums.action.UPDATE):
            return await super()._handle(request)
        async with self._mut:
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta["resourceVersion"] = str(next(self._rv))
                meta.setdefault("generation", 1)
                meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                if request.namespace and "namespace" not in meta:
                    meta["namespace"] = request.namespace
            elif request.action == enums.action.UPDATE and request.name is not None:
                key = self._key(request)
                if key in self._objects and not self._objects[key].deleted:
                    old = copy.deepcopy(self._objects[key].raw)
                    try:
                        if isinstance(request.data, list):
                            new = jsonpatch.apply_patch(old, request.data, in_place=False)
                        else:
                            new = kdicts.patch_dict(old, request.data or {})
                    except jsonpatch.JsonPatchTestFailed as e:
                        raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from None
                    new = copy.deepcopy(dict(new))
                    if self._has_status_subresource(request):
                        if request.subresource == "status":
                            new = (
                                {**old, "status": new.get("status")}
                                if "status" in new
                                else {k: v for k, v in old.items() if k != "status"}
                            )
                        elif "status" in old:
                            new["status"] = old["status"]
                        else:
                            new.pop("status", None)
                    if new.get("spec") != old.get("spec"):
                        new.setdefault("metadata", {})["generation"] = int(old["metadata"].get("generation", 1)) + 1
                    if new != old:
                        new.setdefault("metadata", {})["resourceVersion"] = str(next(self._rv))
                    # KMock tracks requests by identity: rewrite this one (frozen attrs) instead of copying it
                    object.__setattr__(request, "data", merge_diff(old, new))
            return await super()._handle(request)


def writes(emu: StampingEmulator, since: int = 0) -> list[Any]:
    """Mutating requests the operator (or kopf) sent, from request number `since`."""
    return [
        r for r in list(emu._requests)[since:] if str(r.method).upper().endswith(("POST", "PATCH", "PUT", "DELETE"))
    ]


def child_writes(emu: StampingEmulator, since: int = 0) -> list[Any]:
    return [r for r in writes(emu, since) if "llmdeployments" not in str(r.url) and "/events" not in str(r.url)]


class Operator:
    """A running operator (the same `run()` as `kubellm operator`) on a fresh kopf registry."""

    def __init__(
        self,
        url: str,
        interval: float,
        options: RenderOptions | None = None,
        metrics_port: int | None = None,
        peering: str | None = None,
    ) -> None:
        self.url = url
        self.peering = peering  # a ClusterKopfPeering name: several replicas, kopf's timer for the periodic pass
        self.metrics_port = metrics_port
        self.config = OperatorConfig(render=options or RenderOptions(), interval=interval)
        self.metrics = OperatorMetrics()
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def reconciles(self) -> float:
        """How many reconciles (handler or periodic pass) this operator has finished."""
        return self.metrics.registry.get_sample_value(mn.OPERATOR_RECONCILE_DURATION + "_count") or 0.0

    async def reconciled_again(self, times: int = 2) -> None:
        """Wait until `times` more reconciles finished: proof the operator had the chance to act (or not)."""
        target = self.reconciles() + times
        await eventually(lambda: self.reconciles() >= target)

    def login(self, **_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=self.url, insecure=True, default_namespace="default")

    async def __aenter__(self) -> Operator:
        self.task = asyncio.create_task(
            run(
                config=self.config,
                registry=kopf.OperatorRegistry(),
                login=self.login,
                clusterwide=True,
                standalone=self.peering is None,
                peering_name=self.peering,
                stop_flag=self.stop,
                ready_flag=self.ready,
                scanning=False,
                metrics_port=self.metrics_port,
                metrics_host="127.0.0.1",
                metrics=self.metrics,
            )
        )
        await asyncio.wait_for(self.ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.stop.set()
        assert self.task is not None
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 10)


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `check` until it returns a truthy value (or raises no AssertionError) within `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except (AssertionError, KeyError, ValueError, TypeError):
            if asyncio.get_running_loop().time() > deadline:
                raise
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


CR_RES = "kubellm.io/v1alpha1/llmdeployments"
DEP_RES = "apps/v1/deployments"
NS = "ml"

CHILDREN = [
    ("apps/v1/deployments", "llama-engine"),
    ("apps/v1/deployments", "llama-router"),
    ("v1/services", "llama-engine"),
    ("v1/services", "llama"),
    ("v1/serviceaccounts", "llama-router"),
    ("rbac.authorization.k8s.io/v1/roles", "llama-router"),
    ("rbac.authorization.k8s.io/v1/rolebindings", "llama-router"),
    ("policy/v1/poddisruptionbudgets", "llama-engine"),
    ("networking.k8s.io/v1/networkpolicies", "llama-engine"),
    ("v1/persistentvolumeclaims", "llama-model-cache"),
]


def llmd(name: str = "llama", **spec: Any) -> dict[str, Any]:
    body = {
        "model": {"source": "meta-llama/Llama-3.1-8B-Instruct", "tokenSecretRef": {"name": "hf"}},
        "resources": {"gpusPerReplica": 1},
        "modelCache": {"size": "40Gi"},
    }
    body.update(spec)
    return {"apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment",
            "metadata": {"name": name, "namespace": NS}, "spec": body}  # fmt: skip


def obj(emu, res: str, name: str) -> dict[str, Any] | None:
    try:
        found = emu.objects[res, NS, name]
    except KeyError:
        return None
    return None if found.deleted else found.raw


async def create(emu, url: str, body: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(f"{url}/apis/kubellm.io/v1alpha1/namespaces/{NS}/llmdeployments",
                                                    json=body) as r:  # fmt: skip
        assert r.status < 300, await r.text()
        return await r.json()


async def patch(url: str, name: str, patch_body: dict[str, Any], res: str = "llmdeployments", sub: str = "") -> None:
    import aiohttp

    group = "apis/kubellm.io/v1alpha1" if res == "llmdeployments" else "apis/apps/v1"
    path = f"{url}/{group}/namespaces/{NS}/{res}/{name}" + (f"/{sub}" if sub else "")
    headers = {"Content-Type": "application/merge-patch+json"}
    async with aiohttp.ClientSession() as s, s.patch(path, json=patch_body, headers=headers) as r:
        assert r.status < 300, await r.text()


async def delete(url: str, name: str) -> None:
    import aiohttp

    async with (
        aiohttp.ClientSession() as s,
        s.delete(f"{url}/apis/kubellm.io/v1alpha1/namespaces/{NS}/llmdeployments/{name}") as r,
    ):
        assert r.status < 300, await r.text()


def condition(emu, name: str, type_: str) -> dict[str, Any] | None:
    cr = obj(emu, CR_RES, name)
    for c in ((cr or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return None


def mark_ready(emu, res: str, name: str, replicas: int) -> None:
    emu.objects[res, NS, name].patch(
        {"status": {"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
                    "availableReplicas": replicas, "observedGeneration": obj(emu, res, name)["metadata"]["generation"]}}
    )  # fmt: skip
