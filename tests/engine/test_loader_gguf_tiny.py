"""Tiny GGUF files (written as llama.cpp writes them) load to the same logits as transformers' GGUF loader:
checks the Q/K un-permutation with grouped KV heads, bias and q/k-norm tensor names, and the Qwen tokenizer."""

from __future__ import annotations

import pytest
import torch
from tiny_gguf import write_tiny_gguf
from tiny_models import full_pass_logits, make_runner, max_rel_err, tiny_hf_config
from tokenizers import Tokenizer

from kubellm.engine.loader import load_model

VOCAB = 4096  # the first 4096 tokens of SmolLM2's byte-level BPE vocabulary (a real tokenizer, quick to load)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny_gguf(request, tmp_path_factory, embedded_model_path):
    from transformers import AutoModelForCausalLM

    kind = request.param
    torch.manual_seed(1)
    config = tiny_hf_config(kind)
    config.vocab_size = VOCAB
    config.tie_word_embeddings = kind == "qwen2"  # one tied, two untied
    if kind == "qwen3":  # transformers' GGUF loader reads no head_dim for qwen3 and assumes Qwen3's 128
        config.head_dim = 128
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {k: v for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    out = tmp_path_factory.mktemp(f"gguf-{kind}") / f"tiny-{kind}.gguf"
    write_tiny_gguf(kind, config, state, embedded_model_path, out)
    return kind, out


def test_tiny_gguf_logits_match_transformers(tiny_gguf):
    from transformers import AutoModelForCausalLM

    kind, path = tiny_gguf
    ref_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    loaded = load_model(path)
    assert loaded.config.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        kind, "Qwen3ForCausalLM"
    )
    assert loaded.config.qk_norm == (kind == "qwen3")
    assert loaded.config.attention_bias == (kind != "llama")
    ids = list(range(300, 400, 3)) + list(range(4000, 4090, 2))
    with torch.inference_mode():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    ours = full_pass_logits(make_runner(loaded, num_blocks=8), ids)
    assert max_rel_err(ours, ref) < 2e-5, f"{kind}: relative error {max_rel_err(ours, ref):.2e}"


def test_tiny_gguf_tokenizer_matches_transformers(tiny_gguf):
    from transformers import AutoTokenizer

    kind, path = tiny_gguf
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = Tokenizer.from_str(load_model(path).tokenizer_info.tokenizer_json)
    texts = ["Hello world! 12345", "  spaces\n\n\ttabs  ", "naïve café 你好 🙂👍🏽", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert ours.encode(text).ids == ref(text).input_ids, (kind, text)
