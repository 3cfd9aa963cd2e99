"""`make lint`'s type check: mypy over the engine's seams (runner, server and test-fake protocols) and what
implements them, so a runner or fake engine that drifts from its protocol fails CI, and over the pure-logic
modules of all three parts (scheduler, KV cache, router policies, operator rendering, parsers...).

The source folders import as kubellm.engine / kubellm.router / kubellm.operator through setuptools'
package-dir mapping, which mypy cannot follow: this builds that package layout out of symlinks in a
temporary folder and points mypy at it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"engine": "engine", "router": "router", "operator": "operator"}

# The protocols, their implementations, the engine loop and the server<->engine seam. Extend as modules
# become clean under mypy.
MODULES = [
    "kubellm.engine.step_runner",
    "kubellm.engine.model_runner",
    "kubellm.engine.tp_worker",
    "kubellm.engine.sim_runner",
    "kubellm.engine.llm_engine",
    "kubellm.engine.outputs",
    "kubellm.engine.attention.base",
    "kubellm.engine.attention.mla",
    "kubellm.engine.attention.torch_mla",
    "kubellm.engine.models.deepseek",
    "kubellm.engine.server.served_engine",
    "kubellm.engine.server.async_engine",
    "kubellm.engine.server.serving",
    # pure logic: scheduling and the KV cache, requests and their parameters, the core's shared protocol
    # pieces, the router's policies and index, the operator's rendering and status, the output parsers
    "kubellm.engine.scheduler",
    "kubellm.engine.kv_cache_manager",
    "kubellm.engine.request",
    "kubellm.engine.sampling_params",
    "kubellm.engine.forward_batch",
    "kubellm.engine.config",
    "kubellm.engine.detokenizer",
    "kubellm.engine.structured_output",
    "kubellm.block_hash",
    "kubellm.kv_events",
    "kubellm.prompt",
    "kubellm.config_flags",
    "kubellm.routing",
    "kubellm.openai_protocol",
    "kubellm.openai_errors",
    "kubellm.router.policies",
    "kubellm.router.policies.base",
    "kubellm.router.policies.prefix",
    "kubellm.router.policies.least_load",
    "kubellm.router.policies.round_robin",
    "kubellm.router.policies.session",
    "kubellm.router.prefix_index",
    "kubellm.router.queue",
    "kubellm.router.config",
    "kubellm.operator.render",
    "kubellm.operator.spec",
    "kubellm.operator.autoscaler",
    "kubellm.operator.status",
    "kubellm.operator.rbac",
    "kubellm.operator.crd",
    "kubellm.engine.server.chat_tools",
    "kubellm.engine.server.chat_output",
    "kubellm.engine.server.tool_parsers",
    "kubellm.engine.server.tool_parsers.base",
    "kubellm.engine.server.tool_parsers.json_stream",
    "kubellm.engine.server.tool_parsers.hermes",
    "kubellm.engine.server.tool_parsers.forced",
    "kubellm.engine.server.tool_parsers.qwen3_coder",
    "kubellm.engine.server.tool_parsers.kimi_k2",
    "kubellm.engine.server.tool_parsers.deepseek",
    "kubellm.engine.server.tool_parsers.glm45",
    "kubellm.engine.server.tool_parsers.llama3_json",
    "kubellm.engine.server.tool_parsers.mistral",
    "kubellm.engine.server.reasoning_parsers.think_tags",
    "kubellm.engine.server.protocol",
    "kubellm.engine.server.sse",
    "kubellm.engine.server.errors",
    "kubellm.engine.model_config",
    "kubellm.engine.token_bitmask",
    "kubellm.metric_names",
    "kubellm.builtin_models",
    "kubellm.router.backends",
    "kubellm.router.tokenization",
    "kubellm.router.errors",
    "kubellm.router.kv_events_client",
    "kubellm.router.discovery.static",
    "kubellm.operator.reconcile",
    "kubellm.operator.metrics_scrape",
    "kubellm.operator.events",
    "server_fakes",  # tests/engine_server: the fake engine the server tests run against
    "replay_model",  # tests/engine_server: a transcript-replaying model runner
]


def package_tree(dest: Path) -> Path:
    """dest/kubellm: the core's files, with engine/, router/, operator/ linked in as subpackages."""
    pkg = dest / "kubellm"
    pkg.mkdir()
    for entry in (ROOT / "kubellm").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in PARTS.items():
        (pkg / name).symlink_to(ROOT / folder)
    return dest


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kubellm-typecheck-") as tmp:
        path = package_tree(Path(tmp))
        args = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
        for module in MODULES:
            args += ["-m", module]
        env = {**os.environ, "MYPYPATH": f"{path}:{ROOT / 'tests' / 'engine_server'}"}
        return subprocess.run(args, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
