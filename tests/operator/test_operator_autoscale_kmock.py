"""Autoscaling end to end: the operator scrapes fake engine and router /metrics (pods in KMock point at them),
scales the engine Deployment to zero when idle and back when the router holds requests, and records it."""

from __future__ import annotations

import socket
from typing import Any

import aiohttp
from aiohttp import web
from kubellm_operator_testkit import CR_RES, DEP_RES, NS, create, eventually, mark_ready, obj


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeMetrics:
    def __init__(self) -> None:
        self.engine = {"waiting": 0.0, "running": 2.0, "kv": 0.1}
        self.queued = 0.0

    async def engine_metrics(self, _: web.Request) -> web.Response:
        e = self.engine
        text = (
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="tiny"}} {e["waiting"]}\n'
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="tiny"}} {e["running"]}\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="tiny"}} {e["kv"]}\n'
        )
        return web.Response(text=text)

    async def router_metrics(self, _: web.Request) -> web.Response:
        text = (
            "# TYPE kubellm_router_queued_requests gauge\n"
            f'kubellm_router_queued_requests{{model="tiny"}} {self.queued}\n'
            f'kubellm_router_queued_requests{{model="other"}} 99\n'
        )
        return web.Response(text=text)


async def serve(handler) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def pod(name: str, component: str, port: int, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"kubellm.io/llmdeployment": "tiny", "app.kubernetes.io/component": component}},
        "spec": {"containers": [{"name": component, "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip


async def test_scale_to_zero_when_idle_and_back_from_router_queue(kube, operator_factory):
    emu, url = kube
    fake = FakeMetrics()
    eng_runner, eng_port = await serve(fake.engine_metrics)
    rtr_runner, rtr_port = await serve(fake.router_metrics)
    metrics_port = free_port()
    try:
        async with operator_factory(interval=0.2, metrics_port=metrics_port) as op:
            cr = {
                "apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment",
                "metadata": {"name": "tiny", "namespace": NS},
                "spec": {"model": {"source": "builtin:smollm2-135m-instruct", "servedModelName": "tiny"},
                         "resources": {"gpusPerReplica": 0},
                         "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 3,
                                         "scaleUpStabilizationSeconds": 0, "scaleDownDelaySeconds": 1}},
            }  # fmt: skip
            await create(emu, url, cr)
            await eventually(lambda: obj(emu, DEP_RES, "tiny-engine"))
            assert obj(emu, DEP_RES, "tiny-engine")["spec"]["replicas"] == 1
            await eventually(lambda: obj(emu, DEP_RES, "tiny-router"))
            mark_ready(emu, DEP_RES, "tiny-router", 1)
            emu.objects["v1/pods", NS, "tiny-engine-a"] = pod("tiny-engine-a", "engine", eng_port)
            emu.objects["v1/pods", NS, "tiny-router-a"] = pod("tiny-router-a", "router", rtr_port)

            # busy: stays at one replica over passes spanning more than scaleDownDelaySeconds (each pass
            # starts 0.2 s after the previous one ended, so 8 of them take over 1.4 s)
            await op.reconciled_again(8)
            assert obj(emu, DEP_RES, "tiny-engine")["spec"]["replicas"] == 1

            # idle for scaleDownDelaySeconds: to zero, with reason in status and an Event
            fake.engine.update(running=0.0)
            await eventually(lambda: obj(emu, DEP_RES, "tiny-engine")["spec"]["replicas"] == 0, timeout=10)
            await eventually(lambda: obj(emu, CR_RES, "tiny")["status"].get("phase") == "ScaledToZero")
            status = obj(emu, CR_RES, "tiny")["status"]
            assert status["lastScaleReason"].startswith("ScaleToZero")
            assert status["desiredReplicas"] == 0 and status["lastScaleTime"]
            del emu.objects["v1/pods", NS, "tiny-engine-a"]

            # a request arrives at the router, which holds it: the operator wakes one engine at once
            fake.queued = 2
            await eventually(lambda: obj(emu, DEP_RES, "tiny-engine")["spec"]["replicas"] == 1, timeout=10)
            await eventually(lambda: obj(emu, CR_RES, "tiny")["status"]["lastScaleReason"].startswith("ScaleFrom"))

            def reasons() -> set[str]:
                return {o.raw.get("reason") for k, o in emu.objects.items() if k[0] == "v1/events" and not o.deleted}

            await eventually(lambda: {"ScaleToZero", "ScaleFromZero"} <= reasons())
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                text = await r.text()
            assert (
                'kubellm_operator_scaling_decisions_total{name="tiny",namespace="ml",reason="ScaleToZero"} 1.0' in text
            )
            assert (
                'kubellm_operator_scaling_decisions_total{name="tiny",namespace="ml",reason="ScaleFromZero"} 1.0'
                in text
            )
            assert 'kubellm_operator_desired_replicas{name="tiny",namespace="ml"} 1.0' in text
            assert "kubellm_operator_reconcile_duration_seconds_count" in text
    finally:
        await eng_runner.cleanup()
        await rtr_runner.cleanup()


async def test_unreachable_pod_metrics_hold_replicas_and_say_why_once(kube, operator_factory, caplog):
    """What an operator outside the cluster sees: pod IPs answer nothing. No load is invented from that (replicas
    stay), and one warning says autoscaling needs the operator in the cluster."""
    emu, url = kube
    closed = free_port()  # nothing listens there
    caplog.set_level("WARNING", logger="kubellm.operator")
    async with operator_factory(interval=0.2) as op:
        cr = {
            "apiVersion": "kubellm.io/v1alpha1", "kind": "LLMDeployment",
            "metadata": {"name": "tiny", "namespace": NS},
            "spec": {"model": {"source": "builtin:smollm2-135m-instruct", "servedModelName": "tiny"},
                     "resources": {"gpusPerReplica": 0},
                     "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 3,
                                     "scaleUpStabilizationSeconds": 0, "scaleDownDelaySeconds": 0}},
        }  # fmt: skip
        await create(emu, url, cr)
        await eventually(lambda: obj(emu, DEP_RES, "tiny-engine"))
        emu.objects["v1/pods", NS, "tiny-engine-a"] = pod("tiny-engine-a", "engine", closed)
        await op.reconciled_again(6)
        assert obj(emu, DEP_RES, "tiny-engine")["spec"]["replicas"] == 1
    warnings = [r.getMessage() for r in caplog.records if "no ready pod answered its /metrics" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"127.0.0.1:{closed}/metrics" in warnings[0] and "run it in the cluster (the Helm chart)" in warnings[0]
