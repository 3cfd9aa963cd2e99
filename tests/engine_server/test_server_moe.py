"""`kubellm serve` on a tiny random Qwen3-MoE checkpoint (saved with transformers, tokenizer built here) answers
the official `openai` client, says at start-up which MoE kernel it runs, and its greedy completion is the one the
offline engine gives for the same prompt."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# the tiny checkpoint writers live beside the engine tests
sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))

from tiny_models import save_tiny_model

from kubellm.engine import LLM, SamplingParams

MODEL = "tiny-qwen3-moe"
PROMPT = "w1 w2 w3 w4 w5"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model("qwen3-moe", tmp_path_factory.mktemp("tiny-qwen3-moe-serve"))


@pytest.fixture(scope="module")
def serve_args(model_dir):
    return (str(model_dir), "--device", "cpu", "--served-model-name", MODEL)


def test_openai_client_gets_answers_from_a_moe_model(serve_process, openai_client, model_dir):
    assert [m.id for m in openai_client.models.list().data] == [MODEL]
    out = openai_client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
    offline = LLM(model=str(model_dir), device="cpu").generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    )
    assert out.choices[0].text == offline[0].outputs[0].text
    chat = openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "w7 w8"}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 2
    assert "MoE kernel: torch reference" in serve_process.log()
