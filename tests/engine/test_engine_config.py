"""EngineConfig refuses a value outside a setting's choices with a message naming the setting, its environment
variable where it has one, and every choice; a KUBELLM_* variable supplies a setting's default, an explicit value
wins over it, and a malformed variable is an error naming it."""

from __future__ import annotations

import pytest

from kubellm.config_flags import ConfigFileError
from kubellm.engine.config import EngineConfig


@pytest.mark.parametrize(
    "field,bad,message",
    [
        ("device", "tpu", "device='tpu'; choose from auto, cuda, cpu, sim"),
        ("dtype", "fp8", "dtype='fp8'; choose from auto, float32, float16, bfloat16, half, float"),
        ("attention_backend", "xformers", "attention_backend='xformers'; choose from auto, torch, flashinfer"),
        ("scheduling_policy", "lifo", "scheduling_policy='lifo'; choose from fcfs, priority"),
        ("generation_config", "hf", "generation_config='hf'; choose from auto, vllm"),
        ("chat_template_content_format", "xml", "chat_template_content_format='xml'; choose from auto, string, openai"),
        ("prefill_backend", "fa4", "prefill_backend='fa4' (KUBELLM_PREFILL_BACKEND); choose from fa2, fa3, auto"),
        (
            "mla_decode_backend",
            "flashmla",
            "mla_decode_backend='flashmla' (KUBELLM_MLA_DECODE_BACKEND); choose from prefill, fa2, fa3, auto, triton",
        ),
    ],
)
def test_a_value_outside_the_choices_is_refused_by_name(field, bad, message):
    with pytest.raises(ValueError) as e:
        EngineConfig(**{field: bad})
    assert str(e.value) == f"invalid engine argument {message}"


def test_environment_variables_supply_defaults_and_explicit_values_win(monkeypatch):
    monkeypatch.setenv("KUBELLM_GEMV", "0")
    monkeypatch.setenv("KUBELLM_NUM_THREADS", "3")
    monkeypatch.setenv("KUBELLM_DECODE_TENSOR_CORES", "auto")
    monkeypatch.setenv("KUBELLM_PREFILL_BACKEND", "fa3")
    config = EngineConfig()
    assert (config.gemv_kernel, config.num_threads, config.decode_tensor_cores, config.prefill_backend) == (
        False, 3, None, "fa3",
    )  # fmt: skip
    assert EngineConfig(gemv_kernel=True, num_threads=1).gemv_kernel is True
    monkeypatch.delenv("KUBELLM_GEMV")
    assert EngineConfig().gemv_kernel is True, "unset: the built-in default"
    monkeypatch.setenv("KUBELLM_TP_SYMM_MEM", "maybe")
    with pytest.raises(ConfigFileError, match=r"environment variable KUBELLM_TP_SYMM_MEM='maybe': expected 0 or 1"):
        EngineConfig()


def test_mla_upproject_min_tokens_from_the_environment_and_refused_below_zero(monkeypatch):
    assert EngineConfig().mla_upproject_min_tokens == 0, "absorbed everywhere unless asked"
    monkeypatch.setenv("KUBELLM_MLA_UPPROJECT_MIN_TOKENS", "512")
    assert EngineConfig().mla_upproject_min_tokens == 512
    with pytest.raises(ValueError, match=r"^invalid engine argument mla_upproject_min_tokens=-1$"):
        EngineConfig(mla_upproject_min_tokens=-1)


def test_mla_upproject_context_bound_from_the_environment_auto_and_refused_below_one(monkeypatch):
    assert EngineConfig().mla_upproject_max_context_tokens is None
    assert EngineConfig(max_num_batched_tokens=16384).mla_upproject_context_budget == 32768, "auto: 2 x the budget"
    monkeypatch.setenv("KUBELLM_MLA_UPPROJECT_MAX_CONTEXT_TOKENS", "64K")
    assert EngineConfig(max_num_batched_tokens=16384).mla_upproject_context_budget == 65536
    monkeypatch.setenv("KUBELLM_MLA_UPPROJECT_MAX_CONTEXT_TOKENS", "auto")
    assert EngineConfig().mla_upproject_context_budget == 2 * 2048
    assert EngineConfig(mla_upproject_max_context_tokens=5000).mla_upproject_context_budget == 5000
    with pytest.raises(ValueError, match=r"^invalid engine argument mla_upproject_max_context_tokens=0$"):
        EngineConfig(mla_upproject_max_context_tokens=0)
    monkeypatch.setenv("KUBELLM_MLA_UPPROJECT_MAX_CONTEXT_TOKENS", "lots")
    with pytest.raises(ConfigFileError, match=r"environment variable KUBELLM_MLA_UPPROJECT_MAX_CONTEXT_TOKENS='lots'"):
        EngineConfig()


def test_mla_decode_backend_defaults_to_the_prefill_family_and_is_its_own_knob(monkeypatch):
    config = EngineConfig()
    assert (config.mla_decode_backend, config.mla_decode_kernel) == ("prefill", "fa2"), "today's behaviour"
    monkeypatch.setenv("KUBELLM_PREFILL_BACKEND", "fa3")
    assert EngineConfig().mla_decode_kernel == "fa3", "unset: it follows the prefill family"
    monkeypatch.setenv("KUBELLM_PREFILL_BACKEND", "fa2")
    monkeypatch.setenv("KUBELLM_MLA_DECODE_BACKEND", "fa3")
    config = EngineConfig()
    assert (config.prefill_backend, config.mla_decode_kernel) == ("fa2", "fa3")
    assert EngineConfig(mla_decode_backend="auto").mla_decode_kernel == "auto", "an explicit value wins"
    monkeypatch.setenv("KUBELLM_MLA_DECODE_BACKEND", "triton")
    assert EngineConfig().mla_decode_kernel == "triton", "our own Triton decode kernel"
