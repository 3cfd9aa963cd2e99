"""`kubellm operator`: run the LLMDeployment operator (kopf) against the cluster in the kubeconfig or in-cluster."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubellm.operator.render import RenderOptions
from kubellm.operator.spec import DEFAULT_ENGINE_IMAGE, DEFAULT_ROUTER_IMAGE

LOG_LEVELS = ("debug", "info", "warning", "error")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubellm operator",
        description="Run the kubellm operator: turns LLMDeployment resources into engine replicas, a router, "
        "and their Services, PDB, RBAC and NetworkPolicy; keeps status; autoscales. Install the CRD first: "
        "kubectl apply -f crds/",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], metavar="NS",
        help="watch this namespace (repeatable; globs like 'team-*' allowed). Default: all namespaces",
    )  # fmt: skip
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces (the default)")
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--standalone", action="store_true", default=True, help="no peering (default; run one replica)")
    peer.add_argument("--peering", metavar="NAME", help="kopf peering object NAME, for several operator replicas")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account, then $KUBECONFIG)")
    p.add_argument("--metrics-port", type=int, default=8080, help="port of /metrics and /healthz (0: off)")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics server")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.add_argument("--interval", type=float, default=15.0, help="seconds between reconcile/autoscale ticks")
    p.add_argument(
        "--engine-image", default=os.environ.get("KUBELLM_ENGINE_IMAGE", DEFAULT_ENGINE_IMAGE),
        help=f"engine image of LLMDeployments that name none (default: $KUBELLM_ENGINE_IMAGE, "
        f"else {DEFAULT_ENGINE_IMAGE})",
    )  # fmt: skip
    p.add_argument(
        "--router-image", default=os.environ.get("KUBELLM_ROUTER_IMAGE", DEFAULT_ROUTER_IMAGE),
        help=f"router image of LLMDeployments that name none (default: $KUBELLM_ROUTER_IMAGE, "
        f"else {DEFAULT_ROUTER_IMAGE})",
    )  # fmt: skip
    p.add_argument(
        "--image-pull-secret", action="append", default=[], metavar="NAME",
        help="Secret for pulling engine and router images, for LLMDeployments that name none (repeatable)",
    )  # fmt: skip
    p.add_argument("--engine-image-pull-policy", choices=PULL_POLICIES, default=None, help="engine pods' pull policy")
    p.add_argument("--router-image-pull-policy", choices=PULL_POLICIES, default=None, help="router pods' pull policy")
    p.add_argument(
        "--operator-namespace", default=os.environ.get("POD_NAMESPACE", "kubellm-system"),
        help="namespace of the operator's pods (admitted to engines' /metrics by their NetworkPolicy)",
    )  # fmt: skip
    p.add_argument(
        "--monitoring-namespace", action="append", default=None, metavar="NS",
        help="namespace whose pods may scrape engines (repeatable; default: monitoring)",
    )  # fmt: skip
    p.add_argument("--cluster-domain", default="cluster.local", help="for the endpoint URL in status")
    p.add_argument("--no-scanning", action="store_true", help="do not watch CRDs/namespaces appear (kopf scanning)")
    return p


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The Runtime/run keyword arguments for parsed flags (tested without starting anything)."""
    from kubellm.operator.reconcile import OperatorConfig

    render = RenderOptions(
        engine_image=args.engine_image,
        router_image=args.router_image,
        operator_namespace=args.operator_namespace,
        monitoring_namespaces=tuple(args.monitoring_namespace or ["monitoring"]),
        cluster_domain=args.cluster_domain,
        image_pull_secrets=tuple(args.image_pull_secret),
        engine_image_pull_policy=args.engine_image_pull_policy,
        router_image_pull_policy=args.router_image_pull_policy,
    )
    return {
        "config": OperatorConfig(render=render, interval=args.interval),
        "metrics_port": args.metrics_port or None,
        "metrics_host": args.metrics_host,
        "scanning": not args.no_scanning,
        "namespaces": list(args.namespace),
        "clusterwide": not args.namespace,
        "standalone": args.peering is None,
        "peering_name": args.peering,
    }


async def run(
    *,
    config: Any,
    namespaces: Sequence[str] = (),
    clusterwide: bool = True,
    standalone: bool = True,
    peering_name: str | None = None,
    registry: Any = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
    login: Any = None,
    **runtime_kwargs: Any,
) -> None:
    """Run the operator until stopped; tests call this with a fresh registry and KMock's login."""
    import kopf

    from kubellm.operator.handlers import Runtime, register

    if login is not None:
        runtime_kwargs["login"] = login
    rt = Runtime(config=config, peering=not standalone, **runtime_kwargs)
    registry = registry if registry is not None else kopf.OperatorRegistry()
    register(registry, rt)
    await kopf.operator(
        registry=registry,
        clusterwide=clusterwide,
        namespaces=list(namespaces),
        standalone=standalone,
        peering_name=peering_name,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def missing_cluster_config(env: Mapping[str, str], home: Path, token_file: str = SERVICE_ACCOUNT_TOKEN) -> str | None:
    """Why no cluster can be reached (one line saying how to point at one), or None when credentials exist:
    in a pod (service account), through $KUBECONFIG, or ~/.kube/config. Checked before kopf starts, whose
    own failure is dozens of lines of retries and tracebacks."""
    if env.get("KUBERNETES_SERVICE_HOST") and Path(token_file).exists():
        return None
    listed = [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    if listed:
        if any(Path(p).expanduser().is_file() for p in listed):
            return None
        return (
            f"KUBECONFIG={env['KUBECONFIG']} names no existing file; point it (or --kubeconfig) at your cluster's "
            "kubeconfig"
        )
    if (home / ".kube" / "config").is_file():
        return None
    return (
        "no Kubernetes cluster configured (no ~/.kube/config, no $KUBECONFIG, not in a pod); point it at one with "
        "--kubeconfig FILE or KUBECONFIG=FILE (`kind create cluster` writes ~/.kube/config)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    problem = missing_cluster_config(os.environ, Path.home())
    if problem:
        print(f"kubellm operator: {problem}", file=sys.stderr)
        return 1
    try:
        import kopf  # noqa: F401
    except ImportError:
        print("kubellm operator: kopf is not installed; pip install 'kubellm[operator]'", file=sys.stderr)
        return 1
    try:
        asyncio.run(run(**config_from_args(args)))
    except KeyboardInterrupt:
        pass
    return 0
