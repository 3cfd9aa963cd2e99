"""Teacher-forced logits of our ModelRunner equal transformers' on the same weights (float32)."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import TINY_VOCAB, full_pass_logits, hf_logits, make_runner, max_rel_err

from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq
from kubellm.engine.loader import load_model

TOL = 2e-5


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "qwen3", "mistral", "mistral-window"])
def test_tiny_model_logits_match_transformers(tiny_model_dir, kind):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(kind)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runner = make_runner(load_model(path), num_blocks=32, block_size=8)
    rng = random.Random(kind)
    ids = [rng.randrange(4, TINY_VOCAB) for _ in range(150)]  # > 32 positions: llama3 scaling bites

    ref = hf_logits(ref_model, ids)
    ours = full_pass_logits(runner, ids)
    assert ours.shape == ref.shape == (len(ids), TINY_VOCAB)
    assert max_rel_err(ours, ref) < TOL, f"{kind}: relative error {max_rel_err(ours, ref):.2e}"
    # execute() returns exactly the last position's logits, float32
    last = runner.logits(ForwardBatch([ScheduledSeq("r", ids, 0, list(range(19)), True)]))
    assert last.dtype == torch.float32 and last.shape == (1, TINY_VOCAB)
    assert max_rel_err(last[0], ref[-1]) < TOL


def test_model_config_features(tiny_model_dir):
    cfg = {k: load_model(tiny_model_dir(k)).config for k in ("llama3", "qwen2", "qwen3")}
    assert cfg["llama3"].rope_type == "llama3" and cfg["llama3"].tie_word_embeddings and cfg["llama3"].head_dim == 32
    assert cfg["llama3"].attention_bias and cfg["llama3"].attention_out_bias and cfg["llama3"].mlp_bias
    assert cfg["qwen2"].attention_bias and not cfg["qwen2"].attention_out_bias
    assert cfg["qwen3"].qk_norm and cfg["qwen3"].architecture == "Qwen3ForCausalLM"
    assert cfg["qwen3"].eos_token_ids == [2, 3]  # config.json's eos plus generation_config.json's


def test_smollm2_logits_match_transformers_gguf(smollm2_loaded, smollm2_runner, smollm2_hf_model, smollm2_hf_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. In 1889, the Eiffel Tower opened in Paris, France."
    ids = smollm2_hf_tokenizer(text).input_ids
    ref = hf_logits(smollm2_hf_model, ids)
    ours = full_pass_logits(smollm2_runner, ids)
    assert max_rel_err(ours, ref) < 1e-4, f"relative error {max_rel_err(ours, ref):.2e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_config_from_gguf(smollm2_loaded):
    c = smollm2_loaded.config
    assert (c.architecture, c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (
        "LlamaForCausalLM",
        30,
        576,
        9,
    )
    assert (c.num_key_value_heads, c.head_dim, c.vocab_size, c.tie_word_embeddings) == (3, 64, 49152, True)
    assert c.eos_token_ids == [2] and c.bos_token_id == 1
    assert smollm2_loaded.generation_config == {}
    assert smollm2_loaded.weights["model.embed_tokens.weight"].dtype == torch.float32


def test_sliding_window_holds_through_chunked_prefill_and_decode(tiny_model_dir):
    """Mistral's window (8 tokens here) applies to every way a token reaches the model: prefill chunks that
    read cached keys and decode steps, compared with transformers' teacher-forced logits."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("mistral-window")
    loaded = load_model(path)
    assert loaded.config.sliding_window == 8
    ref = hf_logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), ids := _window_ids())
    runner = make_runner(loaded, num_blocks=32, block_size=4)
    rows, pos = [], 0
    while pos < len(ids):  # 5-token prefill chunks up to 30, then one token per step
        n = 5 if pos < 30 else 1
        step = ScheduledSeq("r", ids[pos : pos + n], pos, list(range(-(-len(ids) // 4))), needs_logits=True)
        rows.append(runner.logits(ForwardBatch([step]))[0])
        pos += n
    ends = list(range(5, 31, 5)) + list(range(31, len(ids) + 1))
    assert max_rel_err(torch.stack(rows), ref[[e - 1 for e in ends]]) < TOL
    unwindowed = hf_logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir("mistral"), dtype=torch.float32), ids)
    assert max_rel_err(unwindowed, ref) > 1e-3, "the window changes the logits (the test can tell)"


def _window_ids() -> list[int]:
    rng = random.Random("window")
    return [rng.randrange(4, TINY_VOCAB) for _ in range(48)]


def test_per_layer_windows_of_qwen_are_refused(tmp_path, tiny_model_dir):
    import json
    import shutil

    from kubellm.engine.loader.errors import ModelLoadError
    from kubellm.engine.model_config import UnsupportedModelError

    shutil.copytree(tiny_model_dir("qwen2"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(use_sliding_window=True, sliding_window=16)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ModelLoadError, UnsupportedModelError), match="use_sliding_window"):
        load_model(tmp_path / "m")
