"""`kubellm operator`: its flags, and the real process (subprocess) running against KMock via a kubeconfig."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest
from kubellm_operator_testkit import DEP_RES, create, eventually, llmd, obj

from kubellm.cli import main as kubellm_main
from kubellm.operator import cli


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        kubellm_main(["operator", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--namespace", "--all-namespaces", "--metrics-port", "--log-level", "--standalone", "--peering",
                 "--kubeconfig", "--engine-image", "--router-image", "--interval"):  # fmt: skip
        assert flag in out


def test_flags_become_operator_settings():
    args = cli.build_parser().parse_args(
        ["-n", "team-a", "--namespace", "team-b", "--peering", "kubellm", "--metrics-port", "9100",
         "--engine-image", "reg/engine:1", "--monitoring-namespace", "prom", "--interval", "5"]
    )  # fmt: skip
    kw = cli.config_from_args(args)
    assert kw["namespaces"] == ["team-a", "team-b"] and kw["clusterwide"] is False
    assert kw["standalone"] is False and kw["peering_name"] == "kubellm"
    assert kw["metrics_port"] == 9100
    assert kw["config"].interval == 5
    assert kw["config"].render.engine_image == "reg/engine:1"
    assert kw["config"].render.monitoring_namespaces == ("prom",)
    default = cli.config_from_args(cli.build_parser().parse_args([]))
    assert default["clusterwide"] is True and default["standalone"] is True and default["namespaces"] == []


def test_namespace_and_all_namespaces_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["-n", "a", "-A"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _operator_without_cluster(tmp_path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_") and k != "KUBECONFIG"}
    env.update(HOME=str(tmp_path), **env_extra)  # a home without ~/.kube/config
    return subprocess.run(
        [sys.executable, "-m", "kubellm.cli", "operator", "--metrics-port", "0"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_without_a_kubeconfig_it_says_so_in_one_line(tmp_path):
    out = _operator_without_cluster(tmp_path)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "kubellm operator: no Kubernetes cluster configured (no ~/.kube/config, no $KUBECONFIG, not in a pod); "
        "point it at one with --kubeconfig FILE or KUBECONFIG=FILE (`kind create cluster` writes ~/.kube/config)"
    ]
    missing = tmp_path / "nope.yaml"
    out = _operator_without_cluster(tmp_path, KUBECONFIG=str(missing))
    assert out.returncode == 1 and out.stderr.splitlines() == [
        f"kubellm operator: KUBECONFIG={missing} names no existing file; point it (or --kubeconfig) at your "
        "cluster's kubeconfig"
    ]


def test_credentials_are_found_where_kubernetes_clients_look(tmp_path):
    token = tmp_path / "token"
    assert cli.missing_cluster_config({}, tmp_path, str(token))
    token.write_text("t")
    assert cli.missing_cluster_config({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, tmp_path, str(token)) is None
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("apiVersion: v1\n")
    assert cli.missing_cluster_config({}, tmp_path, str(tmp_path / "none")) is None
    other = tmp_path / "other"
    other.write_text("apiVersion: v1\n")
    listed = {"KUBECONFIG": f"{tmp_path / 'gone'}{os.pathsep}{other}"}
    assert cli.missing_cluster_config(listed, tmp_path / "elsewhere", str(tmp_path / "none")) is None


async def test_the_kubellm_operator_process_reconciles_against_kmock(kube, tmp_path):
    emu, url = kube
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: kmock, cluster: {{server: "{url}"}}}}]
users: [{{name: test, user: {{token: test-token}}}}]
contexts: [{{name: kmock, context: {{cluster: kmock, user: test, namespace: default}}}}]
current-context: kmock
"""
    )
    metrics_port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubellm.cli", "operator", "--kubeconfig", str(kubeconfig), "--no-scanning",
        "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1", "--interval", "0.5",
        "--log-level", "warning",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        await create(emu, url, llmd())
        await eventually(lambda: obj(emu, DEP_RES, "llama-engine"), timeout=30)
        await eventually(lambda: (obj(emu, "kubellm.io/v1alpha1/llmdeployments", "llama").get("status") or {}).get(
            "phase"), timeout=10)  # fmt: skip
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{metrics_port}/healthz") as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                assert 'kubellm_operator_desired_replicas{name="llama",namespace="ml"} 1.0' in await r.text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
        except TimeoutError:
            proc.kill()
            out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()[-3000:]
