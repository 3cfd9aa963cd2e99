"""Loading Hugging Face directories: single and sharded safetensors, tokenizer info, templates, generation config."""

from __future__ import annotations

import json
import shutil

import torch
from tiny_models import CHAT_TEMPLATE, full_pass_logits, make_runner, max_rel_err, save_tiny_model

from kubellm.engine.loader import LoadedModel, load_model
from kubellm.prompt import PromptRenderer


def test_single_file_dir(tiny_model_dir):
    loaded = load_model(tiny_model_dir("llama"))
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == str(tiny_model_dir("llama"))
    assert loaded.config.architecture == "LlamaForCausalLM" and loaded.config.num_hidden_layers == 2
    assert "model.layers.1.mlp.down_proj.weight" in loaded.weights
    assert all(w.dtype == torch.float32 for w in loaded.weights.values())
    assert loaded.generation_config["temperature"] == 0.7 and loaded.generation_config["top_p"] == 0.9
    info = loaded.tokenizer_info
    assert (info.bos_token, info.eos_token, info.chat_template) == ("<|im_start|>", "<|im_end|>", CHAT_TEMPLATE)
    renderer = PromptRenderer(info)
    ids = renderer.chat_token_ids([{"role": "user", "content": "w1 w2"}])
    assert ids[0] == 1 and renderer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>")


def test_sharded_dir_equals_single_file(tmp_path, tiny_model_dir):
    sharded = save_tiny_model("qwen2", tmp_path / "sharded", shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    a, b = load_model(sharded), load_model(tiny_model_dir("qwen2"))
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


def test_bf16_checkpoint_loads_as_requested_dtype(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("llama")
    dst = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    loaded = load_model(dst)  # default: float32
    assert loaded.weights["model.embed_tokens.weight"].dtype == torch.float32
    assert load_model(dst, "bfloat16").weights["model.embed_tokens.weight"].dtype == torch.bfloat16
    ids = list(range(5, 40))
    ref = full_pass_logits(make_runner(load_model(src), 8), ids)
    assert max_rel_err(full_pass_logits(make_runner(loaded, 8), ids), ref) < 0.05  # bf16 rounding of weights


def test_chat_template_jinja_file_and_legacy_rope_keys(tmp_path, tiny_model_dir):
    """chat_template.jinja (transformers >= 4.43 writes it) and v4-style rope_theta/rope_scaling config keys."""
    dst = tmp_path / "legacy"
    shutil.copytree(tiny_model_dir("llama3"), dst)
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (dst / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    cfg = json.loads((dst / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (dst / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(dst)
    assert loaded.tokenizer_info.chat_template == "{{ messages[0]['content'] }}"
    new = load_model(tiny_model_dir("llama3")).config
    assert (loaded.config.rope_theta, loaded.config.rope_scaling) == (new.rope_theta, new.rope_scaling)
    assert loaded.config.rope_scaling["rope_type"] == "llama3"
