"""Security checks: API keys (constant-time comparison, never logged), request limits answered with clear
errors, the rendered pods' security contexts for every example, and the engines' NetworkPolicy."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from kubellm.operator import render as rd
from kubellm.operator.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
ENGINE_KEY = "sk-engine-7d1c0ffee5ecret-Q9"
ROUTER_KEY = "sk-router-41b0a7d5ecret-Z3"
WRONG_KEY = "sk-wrong-90aa1c5nearmiss-K7"
MODEL = "sec"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_openai_error(r: requests.Response) -> bool:
    try:
        err = r.json().get("error")
    except ValueError:
        return False
    return isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


class Server:
    """`python -m kubellm.cli ARGS` on 127.0.0.1, every byte it logs captured in a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as f:
            cmd = [sys.executable, "-m", "kubellm.cli", *args, "--host", "127.0.0.1", "--port", str(self.port)]
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait(self, timeout: float = 120) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """A sim engine with --api-key (key from the environment) and a router with its own key in front,
    both at debug log level (access logs on): the most they ever log."""
    d = tmp_path_factory.mktemp("sec")
    engine = Server(
        [
            "serve",
            "--device",
            "sim",
            "--served-model-name",
            MODEL,
            "--max-model-len",
            "64",
            "--max-request-body-bytes",
            "65536",
            "--log-level",
            "debug",
        ],
        d / "engine.log",
        env={"KUBELLM_API_KEY": ENGINE_KEY},
    )
    router = None
    try:
        engine.wait()
        router = Server(
            [
                "router",
                "--model",
                MODEL,
                "--backend",
                engine.url,
                "--api-key",
                ROUTER_KEY,
                "--upstream-api-key",
                ENGINE_KEY,
                "--max-body-bytes",
                "65536",
                "--max-header-bytes",
                "4096",
                "--log-level",
                "debug",
            ],
            d / "router.log",
        )
        router.wait()
        yield engine, router
    finally:
        if router is not None:
            router.stop()
        engine.stop()


def _chat(url: str, key: str | None, content: str = "hi", **extra: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}
    return requests.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


# ---- API keys ------------------------------------------------------------------------------------------------


def _functions(path: Path) -> dict[str, ast.AST]:
    tree = ast.parse(path.read_text())
    return {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _calls(node: ast.AST) -> set[str]:
    return {ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}


def test_api_keys_are_compared_in_constant_time() -> None:
    engine_fns = _functions(REPO / "engine" / "server" / "errors.py")
    assert "hmac.compare_digest" in _calls(engine_fns["keys_match"])
    assert "keys_match" in _calls(_functions(REPO / "engine" / "server" / "api_server.py")["_request_id_and_auth"])
    router_auth = _functions(REPO / "router" / "app.py")["_authorized"]
    assert "hmac.compare_digest" in _calls(router_auth)
    for fn in (engine_fns["keys_match"], router_auth):  # no == / != / in against a key anywhere in them
        for cmp in (n for n in ast.walk(fn) if isinstance(n, ast.Compare)):
            text = ast.unparse(cmp)
            assert "key" not in text.lower() or "scheme" in text or "request.path" in text, text


def test_keys_are_enforced_and_never_logged(stack: tuple[Server, Server]) -> None:
    engine, router = stack
    # engine: right key, wrong key, no key, a malformed header that carries the key; probes stay open
    assert _chat(engine.url, ENGINE_KEY).status_code == 200
    for r in (_chat(engine.url, WRONG_KEY), _chat(engine.url, None), _chat(engine.url, ENGINE_KEY + "x")):
        assert r.status_code == 401 and _is_openai_error(r), r.text
    r = requests.post(
        engine.url + "/v1/completions",
        headers={"Authorization": f"Basic {ENGINE_KEY}"},
        json={"model": MODEL, "prompt": "x"},
        timeout=10,
    )
    assert r.status_code == 401
    assert requests.get(engine.url + "/health", timeout=5).status_code == 200
    assert requests.get(engine.url + "/metrics", timeout=5).status_code == 200
    # router: its own key; the engine's key is not accepted from clients; streams too
    assert _chat(router.url, ROUTER_KEY).status_code == 200
    with requests.post(
        router.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {ROUTER_KEY}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "s"}], "max_tokens": 3, "stream": True},
        stream=True,
        timeout=30,
    ) as r:
        assert r.status_code == 200 and b"[DONE]" in r.content
    for key in (ENGINE_KEY, WRONG_KEY, None):
        r = _chat(router.url, key)
        assert r.status_code == 401 and _is_openai_error(r), r.text
    requests.get(router.url + "/v1/models", headers={"Authorization": f"Bearer {WRONG_KEY}"}, timeout=5)
    # keys in other places a careless log line might print: a request id and the prompt itself
    r = _chat(engine.url, WRONG_KEY, content="hello")
    assert r.status_code == 401
    logs = {}
    for s in (engine, router):
        s.stop()  # shutdown messages are logs too
        logs[s.log.name] = s.log.read_text(errors="replace")
    assert all(len(text) > 0 for text in logs.values()), logs
    assert any("GET /health" in t or "POST /v1" in t or "401" in t for t in logs.values()), "access log missing"
    for name, text in logs.items():
        for secret in (ENGINE_KEY, ROUTER_KEY, WRONG_KEY, ENGINE_KEY + "x"):
            assert secret not in text, f"{secret} appears in {name}"
            assert secret[8:20] not in text, f"part of {secret} appears in {name}"


# ---- request limits ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """Engine (small limits) + router without keys, for the limit checks."""
    d = tmp_path_factory.mktemp("limits")
    engine = Server(
        [
            "serve",
            "--device",
            "sim",
            "--served-model-name",
            MODEL,
            "--max-model-len",
            "64",
            "--max-request-body-bytes",
            "65536",
        ],
        d / "engine.log",
    )
    router = None
    try:
        engine.wait()
        router = Server(
            [
                "router",
                "--model",
                MODEL,
                "--backend",
                engine.url,
                "--max-body-bytes",
                "65536",
                "--max-header-bytes",
                "4096",
            ],
            d / "router.log",
        )
        router.wait()
        yield engine, router
    finally:
        if router is not None:
            router.stop()
        engine.stop()


def test_body_over_the_limit_is_413_in_openai_shape(open_stack: tuple[Server, Server]) -> None:
    for s in open_stack:
        big = {"model": MODEL, "prompt": "x" * 100_000, "max_tokens": 1}
        r = requests.post(s.url + "/v1/completions", json=big, timeout=30)
        assert r.status_code == 413 and _is_openai_error(r), (s.url, r.status_code, r.text[:300])
        assert "too large" in r.json()["error"]["message"] or "exceeds" in r.json()["error"]["message"]


def test_prompt_over_the_context_is_400_context_length_exceeded(open_stack: tuple[Server, Server]) -> None:
    for s in open_stack:
        r = _chat(s.url, None, content="word " * 200)
        assert r.status_code == 400 and _is_openai_error(r), r.text[:300]
        assert r.json()["error"]["code"] == "context_length_exceeded"
        r = requests.post(
            s.url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1000}, timeout=30
        )
        assert r.status_code == 400 and _is_openai_error(r), r.text[:300]


def test_oversized_headers_are_refused_and_the_server_lives_on(open_stack: tuple[Server, Server]) -> None:
    engine, router = open_stack
    for s, size in ((router, 5000), (engine, 20_000)):  # router: --max-header-bytes 4096; engine: aiohttp's 8 KiB
        r = requests.get(s.url + "/v1/models", headers={"X-Padding": "p" * size}, timeout=10)
        assert r.status_code in (400, 413, 431), (s.url, r.status_code)
        if s is router:  # the router's own server: OpenAI's error shape, naming the limit
            assert _is_openai_error(r) and "4096 bytes" in r.json()["error"]["message"], r.text[:200]
        else:  # aiohttp's parser answers before any handler, in plain text naming the limit
            assert "got more than" in r.text.lower() and "bytes" in r.text.lower(), r.text[:200]
        r = requests.get(s.url + "/v1/models", headers={f"X-H{i}": "v" * 100 for i in range(40)}, timeout=10)
        assert r.status_code == 200
        assert requests.get(s.url + "/health", timeout=5).status_code == 200


def test_malformed_bodies_get_clear_400s(open_stack: tuple[Server, Server]) -> None:
    for s in open_stack:
        for data in (b"{not json", b"\xff\xfe", b"[]", b"", b'{"model": 5}'):
            r = requests.post(
                s.url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}, timeout=10
            )
            assert r.status_code == 400 and _is_openai_error(r), (s.url, data, r.status_code, r.text[:200])


# ---- rendered pods and the NetworkPolicy ---------------------------------------------------------------------


def _render(path: Path, opts: rd.RenderOptions | None = None) -> list[dict[str, Any]]:
    cr = yaml.safe_load(path.read_text())
    spec = parse_spec(cr["metadata"]["name"], cr["spec"])
    owner = rd.Owner(cr["metadata"]["name"], "ml", "uid-1")
    opts = opts or rd.RenderOptions(service_monitor_available=True)
    return rd.render(spec, owner, opts, max(1, rd.desired_engine_replicas(spec, None))).manifests


def _pods(manifests: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (m["metadata"]["labels"][rd.LABEL_COMPONENT], m["spec"]["template"]["spec"])
        for m in manifests
        if m["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "Pod")
    ]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_rendered_pod_is_locked_down(example: Path) -> None:
    pods = _pods(_render(example))
    assert {c for c, _ in pods} == {"engine", "router"}
    for component, pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        for c in [*pod["containers"], *pod.get("initContainers", [])]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, (component, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (component, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (component, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (component, c["name"])
            assert not sc.get("privileged"), (component, c["name"])
            # a read-only root needs its scratch space on volumes
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, (component, c["name"])
        if component == "engine":
            # engines never call the Kubernetes API: no token in the pod
            assert pod["automountServiceAccountToken"] is False
            assert "serviceAccountName" not in pod
            assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= {"/tmp", "/dev/shm"}
        else:
            # the router watches EndpointSlices: it needs its token, bound to a Role that only reads them
            assert pod["serviceAccountName"].endswith("-router")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_router_role_only_reads_endpointslices(example: Path) -> None:
    (role,) = [m for m in _render(example) if m["kind"] == "Role"]
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
        assert rule["resources"] == ["endpointslices"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_network_policy_admits_only_router_operator_and_monitoring_to_the_engine_port(example: Path) -> None:
    opts = rd.RenderOptions(operator_namespace="kubellm-system", monitoring_namespaces=("monitoring",))
    manifests = _render(example, opts)
    cr = yaml.safe_load(example.read_text())
    if cr["spec"].get("networkPolicy", {}).get("enabled") is False:
        assert not [m for m in manifests if m["kind"] == "NetworkPolicy"]
        return
    (np,) = [m for m in manifests if m["kind"] == "NetworkPolicy"]
    name = cr["metadata"]["name"]
    engine_sel = {rd.LABEL_LLMD: name, rd.LABEL_COMPONENT: "engine"}
    (deploy,) = [
        m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["labels"][rd.LABEL_COMPONENT] == "engine"
    ]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    spec = np["spec"]
    assert spec["podSelector"]["matchLabels"] == engine_sel
    assert all(pod_labels[k] == v for k, v in engine_sel.items())  # the policy really selects the engine pods
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    engine_port = deploy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert rule["ports"] == [{"protocol": "TCP", "port": engine_port}]
    peers = rule["from"]
    assert all(p and "ipBlock" not in p for p in peers)  # no empty peer (= everyone), no CIDR
    router_peer = {"podSelector": {"matchLabels": {rd.LABEL_LLMD: name, rd.LABEL_COMPONENT: "router"}}}
    operator_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubellm-system"}},
        "podSelector": {"matchLabels": dict(rd.OPERATOR_POD_LABELS)},
    }
    monitoring_peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert peers == [router_peer, operator_peer, monitoring_peer]
    # the router peer has no namespaceSelector: it means router pods of this LLMDeployment's own namespace
    (router_deploy,) = [
        m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["labels"][rd.LABEL_COMPONENT] == "router"
    ]
    router_labels = router_deploy["spec"]["template"]["metadata"]["labels"]
    assert all(router_labels[k] == v for k, v in router_peer["podSelector"]["matchLabels"].items())
