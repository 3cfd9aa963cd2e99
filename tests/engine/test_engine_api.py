"""The offline API end to end: `LLM.generate`/`.chat` on tiny random Llama, Qwen2 and Qwen3 checkpoints
saved as safetensors (greedy equals transformers), generation_config defaults, n > 1, seeds, stop strings and
ids, logprobs, and bad input that fails alone while other requests keep running."""

from __future__ import annotations

import json

import pytest
import torch
from greedy_reference import assert_greedy_equal, reference_greedy

from kubellm.engine import LLM, SamplingParams
from kubellm.engine.loader import ModelLoadError
from kubellm.engine.outputs import OutputAssembler

PROMPTS = [[5, 17, 23, 99, 4, 8], list(range(40, 75)), [200, 201, 202, 7, 7, 7, 7, 9, 300, 301, 302, 11]]


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), device="cpu", generation_config="vllm")


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "qwen3"])
def test_greedy_equals_transformers_on_tiny_checkpoints(tiny_model_dir, kind):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(kind)
    ref_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    llm = LLM(str(path), device="cpu", max_num_batched_tokens=16, generation_config="vllm")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for i, (prompt, out) in enumerate(zip(PROMPTS, outs, strict=True)):
        ref, logits = reference_greedy(ref_model, prompt, 24)
        assert_greedy_equal(out.outputs[0].token_ids, ref, logits, f"{kind} prompt {i}")
        assert out.prompt_token_ids == prompt and out.outputs[0].finish_reason == "length"


def test_generation_config_supplies_defaults_unless_opted_out(tiny_model_dir, tmp_path):
    import shutil

    path = tmp_path / "with-gen-config"
    shutil.copytree(tiny_model_dir("llama"), path)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "top_k": 20}))
    defaults = LLM(str(path), device="cpu").get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.6, 0.9, 20)
    plain = LLM(str(path), device="cpu", generation_config="vllm").get_default_sampling_params()
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)


def test_seeded_sampling_reproduces_and_n_gives_distinct_samples(tiny_llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True, n=3)
    first = tiny_llm.generate([PROMPTS[0]], params)[0]
    again = tiny_llm.generate([PROMPTS[0], PROMPTS[1]], params)[0]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1


def test_top_k_1_equals_greedy(tiny_llm):
    greedy = tiny_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    topk1 = tiny_llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_k=1, max_tokens=10, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in topk1]


def test_stop_token_ids_and_stop_strings(tiny_llm):
    base = tiny_llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    ids, text = base.outputs[0].token_ids, base.outputs[0].text
    stop_id = ids[5]
    out = tiny_llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id]))[0]
    assert out.outputs[0].token_ids == ids[: ids.index(stop_id) + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"the sample text {text!r} should give a visible stop string"
    out = tiny_llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=16, stop=[stop]))[0]
    assert out.outputs[0].text == text[: text.index(stop)]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop


@pytest.mark.parametrize("min_tokens", [0, 1, 5, 14])
def test_min_tokens_ignores_stop_strings_until_that_many_tokens_exist(tiny_llm, min_tokens):
    # Every word of the tiny tokenizer begins " w", so the stop string occurs in every generated word.
    stop = " w"

    def greedy(**kw):
        params = SamplingParams(**{"temperature": 0, "max_tokens": 16, "ignore_eos": True, **kw})
        return tiny_llm.generate([PROMPTS[1]], params)[0]

    base = greedy().outputs[0]
    assert base.text.count(stop) > min_tokens and base.text.startswith(stop), base.text
    first_n = greedy(max_tokens=min_tokens).outputs[0].text if min_tokens else ""
    out = greedy(stop=[stop], min_tokens=min_tokens).outputs[0]
    # The occurrences in the first min_tokens tokens stay in the text; the one in the next token stops.
    assert out.text == first_n
    assert out.token_ids == base.token_ids[: min_tokens + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_logprobs_equal_log_softmax_of_the_reference_logits(tiny_model_dir, tiny_llm):
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32).eval()
    out = tiny_llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3))[0]
    completion = out.outputs[0]
    ids = PROMPTS[2] + completion.token_ids
    with torch.inference_mode():
        ref = torch.log_softmax(ref_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        row = ref[len(PROMPTS[2]) - 1 + i]
        assert abs(entry[token].logprob - float(row[token])) < 1e-4
        assert entry[token].rank == 1
        top3 = torch.topk(row, 3).indices.tolist()
        assert set(top3) <= set(entry)
    assert completion.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(completion.token_ids,
                                                              completion.logprobs, strict=True)))  # fmt: skip


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ([], SamplingParams()), "empty"),
        (lambda: ([1] * 5000, SamplingParams()), "maximum context length"),
        (lambda: ([1, 2], SamplingParams(max_tokens=0)), "max_tokens"),
        (lambda: ([1, 2], SamplingParams(n=0)), "n=0"),
        (lambda: ([1, 2], SamplingParams(top_p=1.5)), "top_p"),
        (lambda: ([1, 2], SamplingParams(temperature=-1)), "temperature"),
        (lambda: ([10**9], SamplingParams()), "token ids"),
    ],
)
def test_bad_input_fails_alone_while_other_requests_keep_running(tiny_llm, make, match):
    engine = tiny_llm.engine
    good = engine.add_request(None, PROMPTS[1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match=match):
        prompt, params = make()
        engine.add_request(None, prompt, params)
    finished = None
    whole = OutputAssembler()
    while engine.has_unfinished_requests():
        for out in map(whole.add, engine.step()):
            if out.finished and out.request_id == good:
                finished = out
    assert finished is not None and len(finished.outputs[0].token_ids) == 8


def test_unknown_model_path_and_corrupt_weights_are_clear_errors(tmp_path, tiny_model_dir):
    import shutil

    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"), device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("llama"), broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(str(broken), device="cpu")


def test_chat_applies_the_template():
    """LLM.chat on the embedded model answers the capital question (the chat template is applied)."""
    from kubellm.builtin_models import DEFAULT_MODEL

    llm = LLM(DEFAULT_MODEL, device="cpu", num_gpu_blocks_override=64)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=12))[0]  # fmt: skip
    assert "Paris" in out.outputs[0].text
    assert out.prompt is not None and "<|im_start|>user" in out.prompt


def test_chat_passes_tools_and_template_kwargs_to_the_template():
    """LLM.chat hands `tools` and `chat_template_kwargs` to the template (here the shipped Hermes-style one)."""
    from pathlib import Path

    template = (Path(__file__).parents[2] / "examples" / "tool_chat_template_hermes.jinja").read_text()
    llm = LLM(device="sim", num_gpu_blocks_override=64, chat_template=template)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    out = llm.chat([{"role": "user", "content": "Weather?"}], SamplingParams(max_tokens=1), tools=[tool])[0]
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n' in (
        out.prompt
    )
    assert out.prompt_token_ids == llm.engine.renderer.encode(out.prompt, add_special_tokens=False)
    with pytest.raises(ValueError, match="chat_template_kwargs may not set tools"):
        llm.chat([{"role": "user", "content": "Weather?"}], chat_template_kwargs={"tools": []})
