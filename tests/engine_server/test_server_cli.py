"""`kubellm serve` flags and YAML config: vLLM names, dashes or underscores, clear errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubellm.engine.server.cli import ConfigError, parse_args


def _cfg(tmp_path: Path, text: str) -> str:
    p = tmp_path / "serve.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_use_the_embedded_model():
    args, warnings = parse_args([])
    assert args.engine.model.endswith(".gguf") and args.served_model_names == ["smollm2-135m-instruct"]
    assert args.port == 8000 and args.engine.enable_prefix_caching and warnings == []


@pytest.mark.parametrize("spelling", ["auto", "-1"])
def test_max_model_len_auto_means_the_models_own_fitted_to_the_kv_cache(spelling):
    args, _ = parse_args(["--max-model-len", spelling])
    assert args.engine.max_model_len is None


def test_flags_map_to_engine_config():
    args, _ = parse_args(
        [
            "--max-model-len", "2k", "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--block-size", "32",
            "--no-enable-prefix-caching", "--device", "sim", "--served-model-name", "a", "b", "--api-key", "k",
            "--max-waiting-requests", "3", "--attention-backend", "torch", "--enforce-eager", "--dtype", "half",
            "-tp", "1", "--gpu-memory-utilization", "0.5", "--seed", "7", "--generation-config", "vllm",
        ]
    )  # fmt: skip
    e = args.engine
    assert (e.max_model_len, e.max_num_seqs, e.max_num_batched_tokens, e.block_size) == (2000, 8, 512, 32)
    assert not e.enable_prefix_caching and e.device == "sim" and e.dtype == "float16" and e.enforce_eager
    assert args.served_model_names == ["a", "b"] and e.served_model_name == "a" and args.api_key == "k"
    assert e.max_waiting_requests == 3 and e.gpu_memory_utilization == 0.5 and e.seed == 7


def test_sim_time_scale_slows_every_simulated_step():
    from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq
    from kubellm.engine.sim_runner import SimTiming

    args, _ = parse_args(["--device", "sim", "--sim-time-scale", "4"])
    assert args.engine.sim_time_scale == 4.0
    prefill = ScheduledSeq("a", list(range(100)), 0, [0] * 7, True)
    decode = ScheduledSeq("b", [5], 40, [1] * 3, True)
    batch = ForwardBatch([prefill, decode])
    base, slow = SimTiming(), SimTiming(time_scale=4.0)
    assert slow.step_seconds(batch) == pytest.approx(4 * base.step_seconds(batch)) and base.step_seconds(batch) > 0
    with pytest.raises(ConfigError, match="sim_time_scale"):
        parse_args(["--sim-time-scale", "0"])


def test_config_file_dashes_and_underscores_and_cli_override(tmp_path):
    path = _cfg(
        tmp_path,
        "served-model-name: my-model\nmax_model_len: 1024\nmax-num-seqs: 4\ntensor_parallel_size: 1\n"
        "gpu-memory-utilization: 0.8\nenable-prefix-caching: false\nhost: 127.0.0.1\nport: 9001\n"
        "api-key: abc\nlog_level: debug\n",
    )
    args, _ = parse_args(["--config", path, "--max-num-seqs", "9"])
    assert args.served_model_names == ["my-model"] and args.engine.max_model_len == 1024
    assert args.engine.max_num_seqs == 9, "the command line wins over the file"
    assert args.host == "127.0.0.1" and args.port == 9001 and args.api_key == "abc" and args.log_level == "debug"
    assert not args.engine.enable_prefix_caching and args.engine.gpu_memory_utilization == 0.8


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="'max-num-seq'"):
        parse_args(["--config", _cfg(tmp_path, "max-num-seq: 4\n")])


def test_bad_config_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="enable-prefix-caching"):
        parse_args(["--config", _cfg(tmp_path, "enable-prefix-caching: maybe\n")])
    with pytest.raises(ConfigError, match="max_num_seqs"):
        parse_args(["--config", _cfg(tmp_path, "max_num_seqs: lots\n")])
    with pytest.raises(ConfigError, match="device"):
        parse_args(["--config", _cfg(tmp_path, "device: tpu\n")])
    with pytest.raises(ConfigError, match="mapping"):
        parse_args(["--config", _cfg(tmp_path, "- a\n- b\n")])
    with pytest.raises(ConfigError, match="cannot read"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_vllm_options_we_ignore_warn_by_name(tmp_path):
    path = _cfg(tmp_path, "trust-remote-code: true\ndownload_dir: /tmp\nuvicorn-log-level: info\n")
    _, warnings = parse_args(["--config", path, "--disable-log-requests"])
    text = "\n".join(warnings)
    for name in ("trust-remote-code", "download-dir", "uvicorn-log-level", "disable-log-requests"):
        assert name in text


def test_vllm_options_that_change_results_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="pipeline-parallel-size"):
        parse_args(["--pipeline-parallel-size", "2"])
    with pytest.raises(ConfigError, match="speculative-config"):
        parse_args(["--config", _cfg(tmp_path, "speculative_config: {method: ngram}\n")])
    with pytest.raises(ConfigError, match="enable-lora"):
        parse_args(["--enable-lora"])
    # their neutral values are fine
    parse_args(["--config", _cfg(tmp_path, "quantization: null\nkv-cache-dtype: auto\npipeline-parallel-size: 1\n")])


def test_fp8_quantization_and_kv_cache_dtype_are_engine_flags(tmp_path, capsys):
    args, _ = parse_args(["--quantization", "fp8", "--kv-cache-dtype", "fp8", "--calculate-kv-scales"])
    assert (args.engine.quantization, args.engine.kv_cache_dtype, args.engine.calculate_kv_scales) == (
        "fp8",
        "fp8",
        True,
    )
    args, _ = parse_args(["--config", _cfg(tmp_path, "quantization: fp8\nkv_cache_dtype: fp8_e4m3\n")])
    assert (args.engine.quantization, args.engine.kv_cache_dtype) == ("fp8", "fp8_e4m3")
    args, _ = parse_args(["-q", "none"])
    assert args.engine.quantization is None
    with pytest.raises(SystemExit):
        parse_args(["--quantization", "awq"])
    assert "--quantization/-q: invalid choice: 'awq'" in capsys.readouterr().err


def test_invalid_engine_values_are_clear():
    with pytest.raises(ConfigError, match="max_num_seqs"):
        parse_args(["--max-num-seqs", "0"])
    with pytest.raises(ConfigError, match=r"unknown builtin model|not installed"):
        parse_args(["builtin:nope"])


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kubellm.cli", "serve", *args], capture_output=True, text=True, timeout=120
    )


def test_serve_cli_errors_are_one_line(tmp_path):
    out = _serve("--config", _cfg(tmp_path, "bogus-key: 1\n"))
    assert out.returncode == 2 and "bogus-key" in out.stderr and "Traceback" not in out.stderr
    out = _serve("--help")
    assert out.returncode == 0 and "--max-waiting-requests" in out.stdout and "--trust-remote-code" not in out.stdout


def test_config_file_model_key_and_name_list(tmp_path):
    path = _cfg(tmp_path, "model: smollm2-135m-instruct\nserved_model_name: [a, b]\nmax-model-len: 4K\n")
    args, _ = parse_args(["--config", path])
    assert args.engine.model.endswith(".gguf") and args.served_model_names == ["a", "b"]
    assert args.engine.max_model_len == 4096


def test_chat_template_and_tool_flags(tmp_path):
    template = tmp_path / "tools.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    args, _ = parse_args(
        ["--chat-template", str(template), "--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder"]
        + ["--reasoning-parser", "qwen3"]
    )
    assert args.engine.chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"
    parsing = args.chat_parsing
    assert (parsing.tool_call_parser, parsing.reasoning_parser, parsing.enable_auto_tool_choice) == (
        "qwen3_coder",
        "qwen3",
        True,
    )
    inline, _ = parse_args(["--chat-template", "{{ messages[0].content }}"])
    assert inline.engine.chat_template == "{{ messages[0].content }}"
    from_yaml, _ = parse_args(["--config", _cfg(tmp_path, f"chat_template: {template}\ntool-call-parser: hermes\n")])
    assert from_yaml.engine.chat_template.startswith("{% for m")
    assert from_yaml.chat_parsing.tool_call_parser == "hermes"


def test_chat_template_and_tool_flag_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"--chat-template: .*neither a readable file nor a Jinja template"):
        parse_args(["--chat-template", str(tmp_path / "missing.jinja")])
    with pytest.raises(ConfigError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        parse_args(["--enable-auto-tool-choice"])
    out = _serve("--tool-call-parser", "nope")
    assert out.returncode == 2 and "hermes" in out.stderr and "Traceback" not in out.stderr


def test_chat_template_content_format_reaches_the_engine_config():
    args, _ = parse_args(["--chat-template-content-format", "openai"])
    assert args.engine.chat_template_content_format == "openai"
    assert parse_args([])[0].engine.chat_template_content_format == "auto"


def test_model_flag_is_accepted_as_vllm_accepts_it():
    args, _ = parse_args(["--model", "smollm2-135m-instruct"])
    assert args.engine.model.endswith(".gguf") and args.served_model_names == ["smollm2-135m-instruct"]
    same, _ = parse_args(["smollm2-135m-instruct", "--model", "smollm2-135m-instruct"])
    assert same.engine.model == args.engine.model
    with pytest.raises(ConfigError, match="two models given"):
        parse_args(["smollm2-135m-instruct", "--model", "/elsewhere"])


def test_long_prefill_token_threshold_caps_a_prompts_prefill_chunk(tmp_path):
    from kubellm.engine.llm_engine import LLMEngine
    from kubellm.engine.sampling_params import SamplingParams

    args, warnings = parse_args(["--device", "sim", "--long-prefill-token-threshold", "32"])
    assert args.engine.long_prefill_token_threshold == 32 and warnings == []
    from_file, _ = parse_args(["--config", _cfg(tmp_path, "long_prefill_token_threshold: 48\n")])
    assert from_file.engine.long_prefill_token_threshold == 48
    engine = LLMEngine(args.engine)
    rid = engine.add_request(None, list(range(10, 110)), SamplingParams(max_tokens=1))
    engine.step()
    assert engine.scheduler.requests[rid].num_computed_tokens == 32, "the 100-token prompt's first chunk is capped"
    engine.step()
    assert engine.scheduler.requests[rid].num_computed_tokens == 64


def test_tokenizer_flag_serves_another_tokenizer_and_chat_template(tmp_path):
    from server_fakes import TEMPLATE, _byte_tokenizer

    from kubellm.engine.llm_engine import LLMEngine

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    byte_tok = _byte_tokenizer()
    (tok_dir / "tokenizer.json").write_text(byte_tok.to_str())
    (tok_dir / "tokenizer_config.json").write_text(
        '{"chat_template": ' + __import__("json").dumps(TEMPLATE) + ', "eos_token": "<|im_end|>"}'
    )
    own = LLMEngine(parse_args(["--device", "sim"])[0].engine)
    args, _ = parse_args(["--device", "sim", "--tokenizer", str(tok_dir)])
    engine = LLMEngine(args.engine)
    assert engine.renderer.encode("hello there", add_special_tokens=False) == byte_tok.encode("hello there").ids
    assert own.renderer.encode("hello there", add_special_tokens=False) != byte_tok.encode("hello there").ids
    assert engine.tokenizer_info.chat_template == TEMPLATE
    with pytest.raises(Exception, match="tokenizer"):
        LLMEngine(parse_args(["--device", "sim", "--tokenizer", str(tmp_path / "missing")])[0].engine)


def test_tuning_variables_are_flag_defaults_and_bad_values_are_named(monkeypatch):
    monkeypatch.setenv("KUBELLM_FUSED_SAMPLER", "0")
    monkeypatch.setenv("KUBELLM_NUM_THREADS", "3")
    args, _ = parse_args([])
    assert not args.engine.fused_sampler and args.engine.num_threads == 3
    flagged, _ = parse_args(["--fused-sampler", "--num-threads", "1"])
    assert flagged.engine.fused_sampler and flagged.engine.num_threads == 1, "a flag wins over its variable"
    monkeypatch.setenv("KUBELLM_GEMV", "maybe")
    with pytest.raises(ConfigError, match="KUBELLM_GEMV='maybe'"):
        parse_args([])
