"""The one `kubellm` entry point. Each subcommand's module is imported only when it runs, so
`kubellm router` works in an image that has only the router's extra installed."""

from __future__ import annotations

import importlib
import sys

from kubellm import __version__
from kubellm.parent_watch import arm_from_env

# subcommand -> (module with main(argv) -> int, one-line description)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("kubellm.engine.server.cli", "run an engine replica: OpenAI-compatible server (like `vllm serve`)"),
    "router": ("kubellm.router.cli", "run the prefix-cache-aware OpenAI-compatible router"),
    "operator": ("kubellm.operator.cli", "run the Kubernetes operator for LLMDeployment resources"),
    "up": ("kubellm.local_stack", "start a local stack (engines + router, no Kubernetes) on the embedded model"),
    "version": ("", "print the version"),
}

USAGE = "usage: kubellm {" + ",".join(SUBCOMMANDS) + "} [-h] ...\n"


def _help() -> str:
    lines = [USAGE, "kubellm: Kubernetes-native LLM serving.\n", "subcommands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines.append("\nRun `kubellm SUBCOMMAND --help` for a subcommand's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return 0 if argv else 2
    if argv[0] in ("--version", "version"):
        print(f"kubellm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    arm_from_env()  # a child of `kubellm up` stops when it goes away (closed terminal, kill -9)
    if name not in SUBCOMMANDS:
        print(f"kubellm: unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name.startswith(e.name) or e.name == module_name):
            print(f"kubellm {name}: not available yet ({module_name} is not part of this build)", file=sys.stderr)
        else:
            print(
                f"kubellm {name}: missing dependency {e.name!r}; install the part's extra, e.g. "
                f"pip install 'kubellm[{_extra_for(name)}]'",
                file=sys.stderr,
            )
        return 1
    return int(module.main(rest) or 0)


def _extra_for(subcommand: str) -> str:
    return {"serve": "engine", "router": "router", "operator": "operator"}.get(subcommand, "engine,router")


if __name__ == "__main__":
    sys.exit(main())
