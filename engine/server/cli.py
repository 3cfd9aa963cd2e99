"""`kubellm serve [MODEL] [--config FILE.yaml] [flags]`: vllm serve's flag names, and the same keys in YAML.

YAML keys may use dashes or underscores, as users write vLLM configs. Command-line flags override the file.
Keys nobody knows are an error naming the key. vLLM options kubellm does not implement are accepted with a
warning naming them when ignoring them cannot change results (logging, docs UI, ...), and refused with a
clear error when it could (quantization, speculative decoding, LoRA, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kubellm.builtin_models import DEFAULT_MODEL, BuiltinModelError, resolve_model
from kubellm.config_flags import FLAG, ConfigFileError, add_flags, config_defaults, option

from ..config import EngineConfig, _human_int, _non_negative_float
from .chat_tools import ChatParsingConfig

logger = logging.getLogger("kubellm.engine.server")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# vLLM options whose absence cannot change any output: accepted, with a warning. name -> takes a value
VLLM_IGNORED: dict[str, bool] = {
    "trust-remote-code": False,
    "disable-log-requests": False,
    "enable-log-requests": False,
    "disable-log-stats": False,
    "disable-fastapi-docs": False,
    "disable-frontend-multiprocessing": False,
    "enable-prompt-tokens-details": False,
    "enable-force-include-usage": False,
    "disable-uvicorn-access-log": False,
    "enable-server-load-tracking": False,
    "disable-custom-all-reduce": False,
    "enable-chunked-prefill": False,
    "no-enable-chunked-prefill": False,
    "enable-request-id-headers": False,
    "enable-sleep-mode": False,
    "uvicorn-log-level": True,
    "download-dir": True,
    "max-log-len": True,
    "allowed-origins": True,
    "allowed-methods": True,
    "allowed-headers": True,
    "swap-space": True,
    "cpu-offload-gb": True,
    "compilation-config": True,
    "max-seq-len-to-capture": True,
    "max-cudagraph-capture-size": True,
    "distributed-executor-backend": True,
    "worker-cls": True,
    "root-path": True,
    "response-role": True,
    "max-parallel-loading-workers": True,
    "otlp-traces-endpoint": True,
    "collect-detailed-traces": True,
    "hf-token": True,
    "config-format": True,
    "preemption-mode": True,
    "guided-decoding-backend": True,
    "limit-mm-per-prompt": True,
    "max-num-partial-prefills": True,
}

# vLLM options that would change results if ignored: refused unless set to their neutral value.
# name -> (takes a value, neutral values, why)
VLLM_REFUSED: dict[str, tuple[bool, tuple[Any, ...], str]] = {
    "speculative-config": (True, (None, "", {}), "speculative decoding is not implemented"),
    "enable-lora": (False, (None, False), "LoRA adapters are not implemented"),
    "lora-modules": (True, (None, "", []), "LoRA adapters are not implemented"),
    "hf-overrides": (True, (None, "", {}), "model config overrides are not implemented"),
    "override-generation-config": (True, (None, "", {}), "generation config overrides are not implemented"),
    "rope-scaling": (True, (None, "", {}), "rope scaling overrides are not implemented"),
    "rope-theta": (True, (None,), "rope theta overrides are not implemented"),
    "pipeline-parallel-size": (True, (None, 1, "1"), "pipeline parallelism is not implemented"),
    "data-parallel-size": (True, (None, 1, "1"), "data parallelism inside one server is not implemented; run replicas"),
    "load-format": (True, (None, "auto", "safetensors", "gguf"), "only safetensors and GGUF weights load"),
    "tokenizer-mode": (True, (None, "auto"), "tokenizer modes other than auto are not implemented"),
    "revision": (True, (None, ""), "model revisions need a hub download, which kubellm does not do"),
    "tokenizer-revision": (True, (None, ""), "model revisions need a hub download, which kubellm does not do"),
    "code-revision": (True, (None, ""), "model revisions need a hub download, which kubellm does not do"),
    "ssl-keyfile": (True, (None, ""), "TLS is not served here; terminate TLS at the ingress or service mesh"),
    "ssl-certfile": (True, (None, ""), "TLS is not served here; terminate TLS at the ingress or service mesh"),
    "middleware": (True, (None, "", []), "custom middleware is not supported"),
    "logprobs-mode": (True, (None, "raw_logprobs"), "only raw logprobs are implemented"),
    "max-lora-rank": (True, (None,), "LoRA adapters are not implemented"),
}


class ConfigError(ValueError):
    """A bad --config file or flag value; the message names the key."""


def _api_key_from_env() -> str | None:
    return os.environ.get("KUBELLM_API_KEY") or os.environ.get("VLLM_API_KEY") or None


@dataclass
class ServeArgs:
    """The server's own settings (each a flag, like EngineConfig's fields) and the engine's config."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_names: list[str] = field(default_factory=list)
    host: str = option("0.0.0.0", help="bind address")
    port: int = option(8000, help="port (0 picks a free one)")
    api_key: str | None = option(
        default_factory=_api_key_from_env,
        env="KUBELLM_API_KEY",
        help="require `Authorization: Bearer KEY` (also from VLLM_API_KEY)",
    )
    log_level: str = option("info", choices=LOG_LEVELS, help="log level")
    max_logprobs: int = option(20, help="most logprobs a request may ask for")
    shutdown_grace_period: float = option(
        30.0,
        parse=_non_negative_float,
        help="seconds in-flight requests get to finish after SIGTERM (keep below the pod's terminationGracePeriod)",
    )
    max_request_body_bytes: int = option(8 * 1024 * 1024, parse=_human_int, help="larger bodies get 413")
    chat_parsing: ChatParsingConfig = field(default_factory=ChatParsingConfig)


# EngineConfig fields given another way: MODEL (or --model) and --served-model-name (one or more names).
_BY_HAND = ("model", "served_model_name")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubellm serve",
        description="Run an engine replica: an OpenAI-compatible server (flag names as in `vllm serve`).",
    )
    model_help = (
        f"{_help_of('model')}; builtin models assembled from packages are cached in $KUBELLM_CACHE_DIR "
        f"(else ~/.cache/kubellm) (default: {DEFAULT_MODEL})"
    )
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.add_argument(
        "--model", dest="model_option", default=None, metavar="MODEL", help="the same as MODEL (vllm serve takes both)"
    )
    p.add_argument("--config", help="YAML file with the same keys as the flags (dashes or underscores)")
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name(s) clients use; the first labels metrics (default: the MODEL argument as given)",
    )
    add_flags(p, EngineConfig, skip=_BY_HAND)
    add_flags(p, ServeArgs)
    add_flags(p, ChatParsingConfig)
    for name, takes_value in VLLM_IGNORED.items():
        if takes_value:
            p.add_argument(f"--{name}", dest=_ignored_dest(name), default=None, help=argparse.SUPPRESS)
        else:
            p.add_argument(
                f"--{name}", dest=_ignored_dest(name), action="store_true", default=None, help=argparse.SUPPRESS
            )
    for name, (takes_value, _, _) in VLLM_REFUSED.items():
        if takes_value:
            p.add_argument(f"--{name}", dest=_refused_dest(name), default=None, help=argparse.SUPPRESS)
        else:
            p.add_argument(
                f"--{name}", dest=_refused_dest(name), action="store_true", default=None, help=argparse.SUPPRESS
            )
    return p


def _help_of(name: str) -> str:
    (f,) = (f for f in fields(EngineConfig) if f.name == name)
    return f.metadata[FLAG].help


def _ignored_dest(name: str) -> str:
    return "vllm_ignored_" + name.replace("-", "_")


def _refused_dest(name: str) -> str:
    return "vllm_refused_" + name.replace("-", "_")


def _check_vllm_options(ns: argparse.Namespace) -> list[str]:
    """Raises ConfigError for refused options set to a non-neutral value; returns warnings for ignored ones."""
    for name, (_, neutral, why) in VLLM_REFUSED.items():
        value = getattr(ns, _refused_dest(name))
        if value is not None and value not in neutral:
            raise ConfigError(f"--{name} is not supported by kubellm: {why}")
    ignored = [name for name in VLLM_IGNORED if getattr(ns, _ignored_dest(name)) is not None]
    return [
        f"ignoring vLLM option --{name}: kubellm does not implement it and it does not change results"
        for name in ignored
    ]


def read_chat_template(value: str) -> str:
    """`--chat-template` as vLLM takes it: a path to a Jinja file, or the template text itself."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--chat-template: cannot read {value}: {e}") from e
    if "{{" in value or "{%" in value:
        return value
    raise ConfigError(f"--chat-template: {value!r} is neither a readable file nor a Jinja template")


def parse_args(argv: list[str]) -> tuple[ServeArgs, list[str]]:
    """(arguments, warnings). Raises ConfigError naming the bad key; argparse exits on bad flags."""
    try:
        parser = build_parser()  # reads the KUBELLM_* variables behind flag defaults
    except ConfigFileError as e:
        raise ConfigError(str(e)) from e
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**config_defaults(known.config, parser, "kubellm serve"))
        except ConfigFileError as e:
            raise ConfigError(str(e)) from e
    ns = parser.parse_args(argv)
    warnings = _check_vllm_options(ns)
    if ns.model and ns.model_option and ns.model != ns.model_option:
        raise ConfigError(f"two models given: {ns.model!r} (MODEL) and {ns.model_option!r} (--model); give one")
    model_arg = ns.model or ns.model_option or DEFAULT_MODEL
    try:
        model_path = resolve_model(model_arg)
    except BuiltinModelError as e:
        raise ConfigError(str(e)) from e
    names = ns.served_model_name or [model_arg]
    if ns.enable_auto_tool_choice and not ns.tool_call_parser:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser to name the model's tool-call format")
    engine_values = {f.name: getattr(ns, f.name) for f in fields(EngineConfig) if f.name not in _BY_HAND}
    engine_values["dtype"] = {"half": "float16", "float": "float32"}.get(ns.dtype, ns.dtype)
    engine_values["chat_template"] = read_chat_template(ns.chat_template) if ns.chat_template else None
    try:
        engine = EngineConfig(model=model_path, served_model_name=names[0], **engine_values)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if ns.max_waiting_requests < 0:
        raise ConfigError(f"--max-waiting-requests must be >= 0, got {ns.max_waiting_requests}")
    if not 0 <= ns.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {ns.port}")
    server_values = {f.name: getattr(ns, f.name) for f in fields(ServeArgs) if FLAG in f.metadata}
    chat_parsing = ChatParsingConfig(**{f.name: getattr(ns, f.name) for f in fields(ChatParsingConfig)})
    return ServeArgs(engine=engine, served_model_names=names, chat_parsing=chat_parsing, **server_values), warnings


def make_server(args: ServeArgs) -> Any:
    from .api_server import Server, ServerSettings

    def factory() -> Any:
        from kubellm.engine.llm_engine import LLMEngine

        return LLMEngine(args.engine)

    settings = ServerSettings(
        host=args.host,
        port=args.port,
        served_model_names=args.served_model_names,
        model_path=args.engine.model,
        api_key=args.api_key,
        max_request_body_bytes=args.max_request_body_bytes,
        shutdown_grace_period=args.shutdown_grace_period,
        max_logprobs=args.max_logprobs,
        access_log=args.log_level == "debug",
        chat_parsing=args.chat_parsing,
    )
    return Server(factory, settings, max_waiting_requests=args.engine.max_waiting_requests)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, warnings = parse_args(argv)
    except ConfigError as e:
        print(f"kubellm serve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for w in warnings:
        logger.warning(w)
    from .api_server import serve

    return asyncio.run(serve(make_server(args)))
