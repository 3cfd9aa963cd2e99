"""The real kopf operator (the same `run()` as `kubellm operator`) against KMock (GUIDE.md §4)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from kubellm_operator_testkit import (
    CHILDREN,
    CR_RES,
    DEP_RES,
    NS,
    child_writes,
    condition,
    create,
    delete,
    eventually,
    llmd,
    mark_ready,
    obj,
    patch,
    writes,
)

from kubellm import metric_names as mn

DESIRED, LLAMA = mn.OPERATOR_DESIRED_REPLICAS, {"namespace": NS, "name": "llama"}


async def test_apply_creates_all_children_with_owner_references_and_status(kube, operator_factory):
    emu, url = kube
    async with operator_factory():
        cr = await create(emu, url, llmd())
        uid = cr["metadata"]["uid"]
        await eventually(lambda: all(obj(emu, r, n) for r, n in CHILDREN))
        for res, name in CHILDREN:
            refs = obj(emu, res, name)["metadata"]["ownerReferences"]
            assert refs[0]["uid"] == uid and refs[0]["kind"] == "LLMDeployment" and refs[0]["controller"] is True
        await eventually(lambda: (obj(emu, CR_RES, "llama").get("status") or {}).get("phase"))
        status = obj(emu, CR_RES, "llama")["status"]
        assert status["endpoint"] == "http://llama.ml.svc.cluster.local/v1"
        assert status["desiredReplicas"] == 1
        assert {c["type"] for c in status["conditions"]} == {"Ready", "EnginesAvailable", "RouterAvailable",
                                                             "Progressing", "Degraded"}  # fmt: skip
        assert condition(emu, "llama", "Ready")["status"] == "False"
        assert not obj(emu, CR_RES, "llama")["metadata"].get("finalizers")  # deletion never waits for us
        # the children become ready: the timer notices and status follows
        mark_ready(emu, DEP_RES, "llama-engine", 1)
        mark_ready(emu, DEP_RES, "llama-router", 1)
        await eventually(lambda: condition(emu, "llama", "Ready")["status"] == "True")
        status = obj(emu, CR_RES, "llama")["status"]
        assert status["phase"] == "Ready" and status["readyReplicas"] == 1
        assert condition(emu, "llama", "Progressing")["reason"] == "RolledOut"


async def test_reconcile_twice_sends_no_writes(kube, operator_factory):
    emu, url = kube
    async with operator_factory(interval=0.2) as op:
        await create(emu, url, llmd())
        await eventually(lambda: all(obj(emu, r, n) for r, n in CHILDREN))
        mark_ready(emu, DEP_RES, "llama-engine", 1)
        mark_ready(emu, DEP_RES, "llama-router", 1)
        await eventually(lambda: condition(emu, "llama", "Ready")["status"] == "True")
        await op.reconciled_again()  # the pass that wrote Ready has finished
        since = len(emu._requests)
        gets_before = sum(1 for r in emu._requests if str(r.method).upper().endswith("GET"))
        await op.reconciled_again(3)  # periodic passes, each a full reconcile
        gets_after = sum(1 for r in emu._requests if str(r.method).upper().endswith("GET"))
        assert gets_after - gets_before >= 2 * len(CHILDREN)  # it did look...
        assert writes(emu, since) == []  # ...and wrote nothing


async def test_changing_model_or_replicas_patches_the_deployment(kube, operator_factory):
    emu, url = kube
    async with operator_factory():
        await create(emu, url, llmd())
        await eventually(lambda: all(obj(emu, r, n) for r, n in CHILDREN))
        await eventually(lambda: (obj(emu, CR_RES, "llama").get("status") or {}).get("phase"))
        since = len(emu._requests)
        await patch(url, "llama", {"spec": {"replicas": 3, "model": {"source": "Qwen/Qwen2.5-7B-Instruct"}}})

        def engine() -> dict[str, Any]:
            return obj(emu, DEP_RES, "llama-engine")

        await eventually(lambda: engine()["spec"]["replicas"] == 3)
        args = engine()["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "/models/cache/Qwen--Qwen2.5-7B-Instruct/main" in args
        assert "Qwen/Qwen2.5-7B-Instruct" in args
        patches = [r for r in child_writes(emu, since) if "llama-engine" in str(r.url)]
        assert patches and all(str(r.method).upper().endswith("PATCH") for r in patches)
        assert not [r for r in child_writes(emu, since) if str(r.method).upper().endswith("POST")]


async def test_deleting_while_running_completes_and_forgets_the_state(kube, operator_factory):
    emu, url = kube
    async with operator_factory() as op:
        await create(emu, url, llmd())
        await eventually(lambda: obj(emu, DEP_RES, "llama-engine"))
        await eventually(lambda: op.metrics.registry.get_sample_value(DESIRED, LLAMA) == 1)
        await delete(url, "llama")
        await eventually(lambda: obj(emu, CR_RES, "llama") is None)
        await eventually(lambda: op.metrics.registry.get_sample_value(DESIRED, LLAMA) is None)
        # cascade is the API server's garbage collector's job: every child names the owner that went away
        assert obj(emu, DEP_RES, "llama-engine")["metadata"]["ownerReferences"][0]["name"] == "llama"


async def test_deleting_while_the_operator_is_stopped_completes(kube, operator_factory):
    """`kubectl delete llmd` must not hang on a finalizer that only a running operator removes."""
    emu, url = kube
    async with operator_factory() as op:
        await create(emu, url, llmd())
        await eventually(lambda: all(obj(emu, r, n) for r, n in CHILDREN))
        await eventually(lambda: (obj(emu, CR_RES, "llama").get("status") or {}).get("phase"))
        await op.reconciled_again()  # the periodic pass ran over it too
    await delete(url, "llama")  # the operator is stopped
    await eventually(lambda: obj(emu, CR_RES, "llama") is None)


async def test_with_peering_the_periodic_pass_is_a_kopf_timer_holding_the_finalizer(kube, operator_factory):
    """Several operator replicas: kopf pauses its timers on standby replicas, so the periodic pass is one (and
    the finalizer it needs is the documented price)."""
    emu, url = kube
    async with aiohttp.ClientSession() as s:
        peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "kubellm"}}
        async with s.post(f"{url}/apis/kopf.dev/v1/clusterkopfpeerings", json=peering) as r:
            assert r.status < 300, await r.text()
    async with operator_factory(interval=0.2, peering="kubellm") as op:
        await create(emu, url, llmd())
        await eventually(lambda: obj(emu, CR_RES, "llama")["metadata"].get("finalizers") == ["kubellm.io/finalizer"])
        await eventually(lambda: all(obj(emu, r, n) for r, n in CHILDREN))
        mark_ready(emu, DEP_RES, "llama-engine", 1)
        mark_ready(emu, DEP_RES, "llama-router", 1)
        await eventually(lambda: condition(emu, "llama", "Ready")["status"] == "True", timeout=30)  # the timer saw it
        await op.reconciled_again()
        await delete(url, "llama")
        # a running replica lets it go (kopf first stops the object's timer)
        await eventually(lambda: obj(emu, CR_RES, "llama") is None, timeout=30)


async def test_a_finalizer_left_by_an_older_operator_is_removed(kube, operator_factory):
    emu, url = kube
    old = llmd()
    old["metadata"]["finalizers"] = ["kubellm.io/finalizer"]
    await create(emu, url, old)
    async with operator_factory():
        await eventually(lambda: obj(emu, DEP_RES, "llama-engine"))
        await eventually(lambda: not obj(emu, CR_RES, "llama")["metadata"].get("finalizers"))
    await delete(url, "llama")
    await eventually(lambda: obj(emu, CR_RES, "llama") is None)


async def test_restarting_the_operator_creates_no_duplicates(kube, operator_factory):
    emu, url = kube
    async with operator_factory():
        await create(emu, url, llmd())
        await eventually(lambda: all(obj(emu, r, n) for r, n in CHILDREN))
        await eventually(lambda: (obj(emu, CR_RES, "llama").get("status") or {}).get("phase"))
    posts_before = [r for r in child_writes(emu) if str(r.method).upper().endswith("POST")]
    assert len(posts_before) == len(CHILDREN)
    since = len(emu._requests)
    async with operator_factory() as op:
        await eventually(lambda: len(emu._requests) > since + len(CHILDREN))  # resumed and looked
        await op.reconciled_again(3)  # the resume, then periodic passes: each had the chance to write
    assert [r for r in child_writes(emu, since) if str(r.method).upper().endswith("POST")] == []
    assert [r for r in child_writes(emu, since)] == []


async def test_invalid_cr_gets_degraded_condition_event_and_nothing_created(kube, operator_factory):
    emu, url = kube
    async with operator_factory() as op:
        await create(emu, url, llmd(engine={"tensorParallelSize": 4}, resources={"gpusPerReplica": 2}))
        await eventually(lambda: condition(emu, "llama", "Degraded"))
        c = condition(emu, "llama", "Degraded")
        assert c["status"] == "True" and c["reason"] == "InvalidSpec"
        assert "tensorParallelSize (4) exceeds resources.gpusPerReplica (2)" in c["message"]
        assert obj(emu, CR_RES, "llama")["status"]["phase"] == "Degraded"

        def events() -> list[dict[str, Any]]:
            return [o.raw for k, o in emu.objects.items() if k[0] == "v1/events" and not o.deleted]

        await eventually(lambda: [e for e in events() if e.get("reason") == "InvalidSpec"])
        (ev,) = [e for e in events() if e.get("reason") == "InvalidSpec"]
        assert ev["type"] == "Warning" and "tensorParallelSize" in ev["message"]
        assert ev["involvedObject"]["name"] == "llama"
        assert child_writes(emu) == []  # nothing half-created
        await op.reconciled_again()  # periodic passes over the same invalid spec do not repeat the Event
        assert len([e for e in events() if e.get("reason") == "InvalidSpec"]) == 1
        # fixing the spec brings everything up
        await patch(url, "llama", {"spec": {"resources": {"gpusPerReplica": 4}}})
        await eventually(lambda: all(obj(emu, r, n) for r, n in CHILDREN))
        await eventually(lambda: condition(emu, "llama", "Degraded")["status"] == "False")


@pytest.mark.parametrize(
    ("container", "exit_code", "message", "reason"),
    [
        ("model-download", 10, "model org/x is gated: accept its license", "ModelGated"),
        ("engine", 1, "ValueError: unsupported model architecture 'KimiK25ForCausalLM'", "UnsupportedArchitecture"),
    ],
)
async def test_pod_failures_surface_as_degraded(kube, operator_factory, container, exit_code, message, reason):
    emu, url = kube
    async with operator_factory():
        await create(emu, url, llmd())
        await eventually(lambda: obj(emu, DEP_RES, "llama-engine"))
        term = {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message}}
        statuses = [{"name": container, "ready": False, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                     "lastState": term}]  # fmt: skip
        key = "initContainerStatuses" if container == "model-download" else "containerStatuses"
        emu.objects["v1/pods", NS, "llama-engine-abc"] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "llama-engine-abc", "namespace": NS,
                         "labels": {"kubellm.io/llmdeployment": "llama", "app.kubernetes.io/component": "engine"}},
            "status": {"phase": "Pending", key: statuses},
        }  # fmt: skip
        await eventually(lambda: condition(emu, "llama", "Degraded")["status"] == "True")
        c = condition(emu, "llama", "Degraded")
        assert c["reason"] == reason and message in c["message"]
        assert condition(emu, "llama", "Ready")["status"] == "False"
