"""Pure pieces: the apply planner, status from observed children, Prometheus parsing."""

from __future__ import annotations

import json

import pytest

from kubellm.operator import apply as ap
from kubellm.operator import status as st
from kubellm.operator.metrics_scrape import parse_engine_metrics, parse_router_queued

OWNED = {"ownerReferences": [{"uid": "u1", "controller": True}]}


def dep(**spec):
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", **OWNED}, "spec": spec}


def test_plan_create_then_nothing_when_server_added_defaults():
    want = dep(
        replicas=1, template={"spec": {"containers": [{"name": "c", "resources": {"limits": {"memory": "1024Mi"}}}]}}
    )
    p = ap.plan(want, None)
    assert p.action == "create" and ap.LAST_APPLIED in p.body["metadata"]["annotations"]
    live = json.loads(json.dumps(p.body))
    live["metadata"].update(uid="x", resourceVersion="5")
    c = live["spec"]["template"]["spec"]["containers"][0]
    c.update(imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log")
    c["resources"]["limits"]["memory"] = "1Gi"  # the API server's canonical form
    live["status"] = {"readyReplicas": 1}
    assert ap.plan(want, live).action == "none"


def test_plan_patches_drift_and_removes_dropped_fields():
    old = dep(replicas=1, nodeSelector={"a": "1", "b": "2"})
    live = ap.with_last_applied(old)
    new = dep(replicas=1, nodeSelector={"a": "1"})
    p = ap.plan(new, live)
    assert p.action == "patch"
    assert p.body["spec"]["nodeSelector"] == {"a": "1", "b": None}
    live["spec"]["replicas"] = 7  # someone edited it by hand
    assert ap.plan(old, live).action == "patch"


def test_plan_refuses_objects_controlled_by_someone_else():
    live = dep(replicas=1)
    live["metadata"]["ownerReferences"] = [{"uid": "other", "controller": True}]
    assert ap.plan(dep(replicas=1), live).action == "conflict"


def test_quantities_compare_by_value():
    assert ap.is_subset({"cpu": "0.5"}, {"cpu": "500m"})
    assert ap.is_subset({"m": "2Gi"}, {"m": "2048Mi"})
    assert not ap.is_subset({"m": "2Gi"}, {"m": "2G"})
    assert not ap.is_subset({"image": "a:1"}, {"image": "a:2"})
    assert not ap.is_subset([1, 2], [1, 2, 3])


def _deployment(ready: int, replicas: int = 1, gen: int = 1) -> dict:
    status = {"replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas, "observedGeneration": gen}
    return {"metadata": {"generation": gen}, "spec": {"replicas": replicas}, "status": status}


def test_conditions_ready_progressing_and_scaled_to_zero():
    o = st.Observed(
        generation=3, desired_replicas=1, engine=_deployment(1), router=_deployment(1), endpoint="http://x/v1"
    )
    phase, conds, _, ready = st.compute_conditions(o)
    by = {c["type"]: c for c in conds}
    assert phase == "Ready" and ready == 1 and by["Ready"]["status"] == "True"
    assert by["Progressing"]["reason"] == "RolledOut" and by["Degraded"]["status"] == "False"
    o = st.Observed(generation=3, desired_replicas=2, engine=_deployment(0, 2), router=_deployment(1))
    phase, conds, _, _ = st.compute_conditions(o)
    assert phase == "Progressing" and {c["type"]: c for c in conds}["Ready"]["status"] == "False"
    o = st.Observed(generation=3, desired_replicas=0, engine=_deployment(0, 0), router=_deployment(1))
    phase, conds, _, _ = st.compute_conditions(o)
    by = {c["type"]: c for c in conds}
    assert phase == "ScaledToZero" and by["Ready"]["reason"] == "ScaledToZero"
    assert by["EnginesAvailable"]["status"] == "False"


def test_unschedulable_pods_show_in_progressing():
    msg = "0/3 nodes: Insufficient nvidia.com/gpu"
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg}
    pod = {"metadata": {"name": "p"}, "status": {"conditions": [cond]}}
    o = st.Observed(generation=1, desired_replicas=1, engine=_deployment(0), router=_deployment(1), engine_pods=(pod,))
    by = {c["type"]: c for c in st.compute_conditions(o)[1]}
    assert by["Progressing"]["reason"] == "Unschedulable" and "nvidia.com/gpu" in by["Progressing"]["message"]


def test_pod_failure_reasons():
    def term(name, code, msg, init=False):
        key = "initContainerStatuses" if init else "containerStatuses"
        return {"metadata": {"name": "p"}, "status": {key: [{"name": name, "ready": False,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": code, "message": msg}}}]}}  # fmt: skip

    assert st.pod_failure(term("model-download", 11, "rejected the token", init=True)).reason == "ModelUnauthorized"
    assert st.pod_failure(term("model-download", 13, "no space", init=True)).reason == "NoSpaceForModel"
    assert (
        st.pod_failure(term("engine", 1, "architecture DeepseekV3 is not supported")).reason
        == "UnsupportedArchitecture"
    )
    assert st.pod_failure(term("engine", 137, "OOMKilled")).reason == "EngineFailed"
    pull = {"metadata": {"name": "p"}, "status": {"containerStatuses": [
        {"name": "engine", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]}}  # fmt: skip
    assert st.pod_failure(pull).reason == "ImagePullFailed"
    assert st.pod_failure({"metadata": {"name": "p"}, "status": {"phase": "Running"}}) is None


def test_the_engines_refusal_of_qwen3_next_reads_as_unsupported_naming_what_is_missing():
    """examples/qwen3-coder-next-tp8.yaml: the engine's own message (its config check, no weights needed) is what
    the pod's termination message carries; the condition's reason and message follow from it."""
    from kubellm.engine.model_config import ModelConfig, UnsupportedModelError

    config = {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "num_experts": 512}
    with pytest.raises(UnsupportedModelError) as refused:
        ModelConfig.from_hf_config(config)
    message = f"UnsupportedModelError: {refused.value}"
    pod = {"metadata": {"name": "p"}, "status": {"containerStatuses": [{"name": "engine", "ready": False,
           "state": {"waiting": {"reason": "CrashLoopBackOff"}},
           "lastState": {"terminated": {"exitCode": 1, "message": message}}}]}}  # fmt: skip
    failure = st.pod_failure(pod)
    assert failure.reason == "UnsupportedArchitecture"
    assert "hybrid linear attention" in failure.message and "mixture of experts" not in failure.message


def test_last_transition_time_moves_only_on_flips():
    o = st.Observed(generation=1, desired_replicas=1, engine=_deployment(1), router=_deployment(1))
    first = st.build_status(o, None, "2026-01-01T00:00:00Z")
    second = st.build_status(o, first, "2026-01-01T00:05:00Z")
    assert second == first
    o2 = st.Observed(generation=1, desired_replicas=1, engine=_deployment(0), router=_deployment(1))
    third = st.build_status(o2, second, "2026-01-01T00:09:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in third["conditions"]}
    assert times["Ready"] == "2026-01-01T00:09:00Z" and times["RouterAvailable"] == "2026-01-01T00:00:00Z"


ENGINE_TEXT = """# HELP vllm:num_requests_waiting Waiting
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 3.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 5.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.42
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{model_name="m"} 1234.0
"""


def test_parse_engine_and_router_metrics():
    load = parse_engine_metrics(ENGINE_TEXT, "m")
    assert (load.waiting, load.running, load.kv_usage) == (3.0, 5.0, 0.42)
    assert parse_engine_metrics(ENGINE_TEXT, "other").waiting == 0
    assert parse_engine_metrics("garbage{{{", "m").waiting == 0
    router = '# TYPE kubellm_router_queued_requests gauge\nkubellm_router_queued_requests{model="m"} 2\n'
    assert parse_router_queued(router, "m") == 2 and parse_router_queued(router, "x") == 0
