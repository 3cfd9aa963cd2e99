"""Loading a mixture-of-experts checkpoint stacks its per-expert tensors without a second copy: the engine's peak
host memory while it loads stays under 1.3x the checkpoint's size (measured in a fresh process: its peak
resident set, VmHWM, above what it held before the engine started)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import save_file

H, INTER, E, LAYERS = 256, 512, 64, 2  # expert weights dominate: 2 x 64 x 3 x 256 x 512 float32 = 201 MB

MEASURE = textwrap.dedent(
    """
    import json, sys
    from kubellm.engine.config import EngineConfig
    from kubellm.engine.llm_engine import LLMEngine

    def status(key: str) -> int:  # VmRSS: resident now; VmHWM: the peak of this process image (ru_maxrss would
        with open("/proc/self/status") as f:  # carry the forking parent's peak over the exec)
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    before = status("VmRSS")
    engine = LLMEngine(EngineConfig(model=sys.argv[1], device="cpu", num_gpu_blocks_override=4, dtype="float32"))
    peak = status("VmHWM")
    counts = engine.runner.model.param_counts()
    print(json.dumps({"before": before, "peak": peak, "experts": counts["experts"]}))
    """
)


def test_peak_host_memory_while_loading_stays_under_1_3x_the_checkpoint(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen3-moe")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(
        hidden_size=H, num_hidden_layers=LAYERS, num_experts=E, num_local_experts=E, moe_intermediate_size=INTER,
        intermediate_size=INTER, mlp_only_layers=[], head_dim=64, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    weights = {
        "model.embed_tokens.weight": torch.randn(cfg["vocab_size"], H, generator=g),
        "lm_head.weight": torch.randn(cfg["vocab_size"], H, generator=g),
        "model.norm.weight": torch.ones(H),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for n, shape in (("q_proj", (256, H)), ("k_proj", (128, H)), ("v_proj", (128, H)), ("o_proj", (H, 256))):
            weights[f"{p}.self_attn.{n}.weight"] = torch.randn(*shape, generator=g) / 16
        for n in ("q_norm", "k_norm"):
            weights[f"{p}.self_attn.{n}.weight"] = torch.ones(64)
        for n in ("input_layernorm", "post_attention_layernorm"):
            weights[f"{p}.{n}.weight"] = torch.ones(H)
        weights[f"{p}.mlp.gate.weight"] = torch.randn(E, H, generator=g)
        for e in range(E):
            for n, shape in (("gate_proj", (INTER, H)), ("up_proj", (INTER, H)), ("down_proj", (H, INTER))):
                weights[f"{p}.mlp.experts.{e}.{n}.weight"] = torch.randn(*shape, generator=g) / 16
    save_file(weights, str(tmp_path / "model.safetensors"))
    size = (tmp_path / "model.safetensors").stat().st_size
    expert_elems = sum(v.numel() for k, v in weights.items() if ".experts." in k)
    del weights
    assert size > 200e6

    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["experts"] == expert_elems  # every expert made it into the stacked weights
    grown = got["peak"] - got["before"]
    assert grown < 1.3 * size, f"peak host memory grew by {grown / 1e6:.0f} MB loading a {size / 1e6:.0f} MB checkpoint"
