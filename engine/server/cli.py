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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubellm.builtin_models import DEFAULT_MODEL, BuiltinModelError, resolve_model

from ..config import EngineConfig
from .chat_tools import CHAT_TEMPLATE_CONTENT_FORMATS, ChatParsingConfig
from .reasoning_parsers import REASONING_PARSERS
from .tool_parsers import TOOL_PARSERS

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
    "long-prefill-token-threshold": True,
}

# vLLM options that would change results if ignored: refused unless set to their neutral value.
# name -> (takes a value, neutral values, why)
VLLM_REFUSED: dict[str, tuple[bool, tuple[Any, ...], str]] = {
    "quantization": (True, (None, "none", "None"), "quantized serving is not implemented"),
    "speculative-config": (True, (None, "", {}), "speculative decoding is not implemented"),
    "enable-lora": (False, (None, False), "LoRA adapters are not implemented"),
    "lora-modules": (True, (None, "", []), "LoRA adapters are not implemented"),
    "hf-overrides": (True, (None, "", {}), "model config overrides are not implemented"),
    "override-generation-config": (True, (None, "", {}), "generation config overrides are not implemented"),
    "rope-scaling": (True, (None, "", {}), "rope scaling overrides are not implemented"),
    "rope-theta": (True, (None,), "rope theta overrides are not implemented"),
    "kv-cache-dtype": (True, (None, "auto"), "KV cache dtypes other than auto are not implemented"),
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


@dataclass
class ServeArgs:
    engine: EngineConfig
    host: str
    port: int
    served_model_names: list[str]
    api_key: str | None
    log_level: str
    max_logprobs: int
    shutdown_grace_period: float
    max_request_body_bytes: int
    chat_parsing: ChatParsingConfig


def _human_int(value: str) -> int:
    """Integers as vLLM takes them: 4096, 4k, 4K (x1000 / x1024 like vLLM: k=1000, K=1024), 1m, 1M."""
    s = str(value).strip()
    mult = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2, "g": 1000**3, "G": 1024**3}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def _max_model_len(value: str) -> int | None:
    """A length as _human_int takes it, or `auto` / -1 (vLLM's spellings): the model's own, fitted to the KV pool."""
    return None if str(value).strip().lower() in ("auto", "-1") else _human_int(value)


def _positive_float(value: str) -> float:
    f = float(value)
    if f < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {value}")
    return f


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubellm serve",
        description="Run an engine replica: an OpenAI-compatible server (flag names as in `vllm serve`).",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help=f"model: a Hugging Face directory, a .gguf file, or a builtin name (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--config", help="YAML file with the same keys as the flags (dashes or underscores)")
    p.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", nargs="+", default=None, help="name(s) clients use; the first labels metrics")
    p.add_argument("--tokenizer", default=None, help="tokenizer path if not the model's own")
    p.add_argument(
        "--max-model-len",
        type=_max_model_len,
        default=None,
        help="context length (default or auto: the model's, lowered to what the KV cache holds)",
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one batch")
    p.add_argument("--max-num-batched-tokens", type=_human_int, default=2048, help="per-step token budget")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="GPU memory fraction for the engine")
    p.add_argument("--kv-cache-memory-bytes", type=_human_int, default=None, help="explicit KV cache budget in bytes")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None, help="exact KV pool size in blocks")
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse KV blocks of shared prefixes (default on)",
    )
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="tensor parallel size")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "half", "float"], help="dtype"
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "cpu", "sim"], help="device; sim = timing model"
    )
    p.add_argument(
        "--sim-time-scale",
        type=_positive_float,
        default=1.0,
        help="--device sim: multiply the timing model's step times (a slower simulated device: fewer requests "
        "per second load it, so a benchmark's client and router CPU cost stops mattering)",
    )
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "flashinfer"])
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepare the next step on the host while the GPU runs this one (default: on with CUDA)",
    )
    p.add_argument("--seed", type=int, default=0, help="engine seed")
    p.add_argument("--generation-config", default="auto", choices=["auto", "vllm"], help="vllm: ignore the model's")
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    p.add_argument(
        "--kv-growth-reserve-tokens",
        type=int,
        default=128,
        help="admit new requests only while free KV blocks cover every running request's next N tokens, so a "
        "full cache does not preempt (and recompute) requests it just admitted (0: admit while blocks last)",
    )
    p.add_argument(
        "--max-waiting-requests", type=int, default=1024, help="waiting-queue bound; beyond it requests get 429"
    )
    p.add_argument("--max-logprobs", type=int, default=20, help="most logprobs a request may ask for")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (env KUBELLM_API_KEY)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.add_argument(
        "--shutdown-grace-period",
        type=_positive_float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM (keep below the pod's terminationGracePeriod)",
    )
    p.add_argument("--max-request-body-bytes", type=_human_int, default=8 * 1024 * 1024, help="larger bodies get 413")
    p.add_argument(
        "--chat-template",
        default=None,
        help="chat template replacing the model's: a file path, or the Jinja template itself",
    )
    p.add_argument(
        "--chat-template-content-format",
        default="auto",
        choices=CHAT_TEMPLATE_CONTENT_FORMATS,
        help="how message content reaches the template: string (text parts joined) or openai (a list of parts); "
        "auto: openai when the template loops over a message's content",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        default=False,
        help="let the model decide to call tools (tool_choice auto); needs --tool-call-parser",
    )
    p.add_argument(
        "--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS), help="the model's tool-call output format"
    )
    p.add_argument(
        "--reasoning-parser",
        default=None,
        choices=REASONING_PARSERS,
        help="split the model's reasoning into reasoning_content",
    )
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


def _ignored_dest(name: str) -> str:
    return "vllm_ignored_" + name.replace("-", "_")


def _refused_dest(name: str) -> str:
    return "vllm_refused_" + name.replace("-", "_")


def _actions_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt[2:]] = action
        if action.dest == "model":
            out["model"] = action
    return out


def _convert(key: str, action: argparse.Action, value: Any) -> Any:
    """A YAML value into what the flag would have produced; errors name the key."""
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(key, action, v) for v in items]
    if isinstance(value, (list, dict)) and action.type is not None:
        raise ConfigError(f"config key {key!r}: expected a single value, got {value!r}")
    return _convert_one(key, action, value)


def _convert_one(key: str, action: argparse.Action, value: Any) -> Any:
    if value is None:
        return None
    try:
        converted = action.type(value if not isinstance(value, bool) else str(value)) if action.type else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"config key {key!r}: invalid value {value!r} ({e})") from e
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"config key {key!r}: invalid choice {value!r} (choose from {choices})")
    return converted


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's keys as argparse defaults (dest -> value), so flags on the command line still win."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option names to values")
    actions = _actions_by_key(parser)
    defaults: dict[str, Any] = {}
    unknown: list[str] = []
    for raw_key, value in data.items():
        key = str(raw_key).strip().replace("_", "-")
        if key == "config":
            raise ConfigError(f"config file {path}: key 'config' cannot nest another config file")
        action = actions.get(key)
        if action is None:
            unknown.append(str(raw_key))
            continue
        if action.dest.startswith(("vllm_ignored_", "vllm_refused_")):
            defaults[action.dest] = value if value is not None else None
            continue
        defaults[action.dest] = _convert(str(raw_key), action, value)
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise ConfigError(f"config file {path}: unknown key(s) {names}; see `kubellm serve --help`")
    return defaults


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
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config_file(known.config, parser))
    ns = parser.parse_args(argv)
    warnings = _check_vllm_options(ns)
    model_arg = ns.model or DEFAULT_MODEL
    try:
        model_path = resolve_model(model_arg)
    except BuiltinModelError as e:
        raise ConfigError(str(e)) from e
    names = ns.served_model_name or [model_arg]
    dtype = {"half": "float16", "float": "float32"}.get(ns.dtype, ns.dtype)
    if ns.enable_auto_tool_choice and not ns.tool_call_parser:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser to name the model's tool-call format")
    chat_template = read_chat_template(ns.chat_template) if ns.chat_template else None
    try:
        engine = EngineConfig(
            model=model_path,
            served_model_name=names[0],
            tokenizer=ns.tokenizer,
            max_model_len=ns.max_model_len,
            max_num_seqs=ns.max_num_seqs,
            max_num_batched_tokens=ns.max_num_batched_tokens,
            block_size=ns.block_size,
            gpu_memory_utilization=ns.gpu_memory_utilization,
            kv_cache_memory_bytes=ns.kv_cache_memory_bytes,
            num_gpu_blocks_override=ns.num_gpu_blocks_override,
            enable_prefix_caching=ns.enable_prefix_caching,
            tensor_parallel_size=ns.tensor_parallel_size,
            dtype=dtype,
            device=ns.device,
            attention_backend=ns.attention_backend,
            enforce_eager=ns.enforce_eager,
            async_scheduling=ns.async_scheduling,
            seed=ns.seed,
            generation_config=ns.generation_config,
            max_waiting_requests=ns.max_waiting_requests,
            scheduling_policy=ns.scheduling_policy,
            kv_growth_reserve_tokens=ns.kv_growth_reserve_tokens,
            sim_time_scale=ns.sim_time_scale,
            chat_template=chat_template,
            chat_template_content_format=ns.chat_template_content_format,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if ns.max_waiting_requests < 0:
        raise ConfigError(f"--max-waiting-requests must be >= 0, got {ns.max_waiting_requests}")
    if not 0 <= ns.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {ns.port}")
    api_key = ns.api_key or os.environ.get("KUBELLM_API_KEY") or os.environ.get("VLLM_API_KEY") or None
    args = ServeArgs(
        engine=engine,
        host=ns.host,
        port=ns.port,
        served_model_names=names,
        api_key=api_key,
        log_level=ns.log_level,
        max_logprobs=ns.max_logprobs,
        shutdown_grace_period=ns.shutdown_grace_period,
        max_request_body_bytes=ns.max_request_body_bytes,
        chat_parsing=ChatParsingConfig(
            tool_call_parser=ns.tool_call_parser,
            reasoning_parser=ns.reasoning_parser,
            enable_auto_tool_choice=ns.enable_auto_tool_choice,
        ),
    )
    return args, warnings


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
