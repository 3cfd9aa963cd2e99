"""bench/expert_routing.py on CPU: the routing confound of vLLM's dummy weights (issue #22) reproduced on torch
modules named as vLLM names them, its fix, and the experts-hit counter on our real MoE layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.expert_routing import (
    expected_experts_hit,
    hits_line,
    moe_shape,
    reinit_routing,
    routing_kind,
    summarize_hits,
    watch_routing,
)

E, K, H, VOCAB = 64, 6, 2048, 1024  # DeepSeek-V2-Lite's router: 64 experts, 6 per token, hidden 2048


class Norm(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, dtype=torch.bfloat16), requires_grad=False)


class Gate(nn.Linear):
    def __init__(self) -> None:
        super().__init__(H, E, bias=False, dtype=torch.bfloat16)
        self.weight.requires_grad_(False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(E, dtype=torch.float32), requires_grad=False)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.w13_weight = nn.Parameter(torch.empty(E, 8, H, dtype=torch.bfloat16), requires_grad=False)
        self.gate_up_proj = nn.Linear(H, 16, bias=False, dtype=torch.bfloat16)  # a dense MLP's: not routing


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = Norm(H)
        self.post_attention_layernorm = Norm(H)
        self.self_attn = nn.Module()
        self.self_attn.kv_a_layernorm = Norm(512)
        self.self_attn.kv_b_proj = nn.Linear(512, 64, bias=False, dtype=torch.bfloat16)
        self.mlp = Mlp()


class VllmLike(nn.Module):
    """The parameter names vLLM 0.26's DeepseekV2ForCausalLM gives the weights that matter here."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, H, dtype=torch.bfloat16)
        self.model.layers = nn.ModuleList([Layer(), Layer()])
        self.model.norm = Norm(H)
        self.lm_head = nn.Linear(H, VOCAB, bias=False, dtype=torch.bfloat16)
        for p in self.parameters():
            p.requires_grad_(False)


@torch.no_grad()
def dummy_load(model: nn.Module) -> None:
    """vLLM 0.26's load_format="dummy" as its weight_utils.initialize_single_dummy_weight does it: every floating
    parameter uniform(-1e-3, 1e-3) from a generator seeded 1234 for each parameter."""
    for p in model.state_dict().values():
        gen = torch.Generator().manual_seed(1234)
        p.uniform_(-1e-3, 1e-3, generator=gen)


def experts_hit_by_vllm_routing(model: VllmLike, tokens: torch.Tensor) -> int:
    """Distinct experts of layer 0 over `tokens`, routed as vLLM's DeepSeek-V2 path routes them: the router input is
    RMSNorm(residual) x post_attention_layernorm.weight, with the residual the token's embedding (every layer's
    output is below bf16's resolution beside it under dummy weights), bf16 logits, torch.softmax in bf16 (its
    GroupedTopKRouter's grouped_topk), top-k."""
    layer = model.model.layers[0]
    h = model.model.embed_tokens.weight[tokens].float()
    x = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    x = x * layer.post_attention_layernorm.weight
    logits = layer.mlp.gate(x)
    assert logits.dtype == torch.bfloat16
    scores = torch.softmax(logits, dim=-1)
    return int(torch.topk(scores, K, dim=-1)[1].unique().numel())


def test_dummy_weights_send_every_token_to_the_same_experts_and_the_reinit_spreads_them():
    model = VllmLike()
    dummy_load(model)
    tokens = torch.randint(0, VOCAB, (256,), generator=torch.Generator().manual_seed(0))
    assert experts_hit_by_vllm_routing(model, tokens) == K  # every score rounds to 1/64: ties, one fixed top-k

    experts_before = model.model.layers[0].mlp.w13_weight.clone()
    report = reinit_routing(model)
    assert experts_hit_by_vllm_routing(model, tokens) >= 60  # spread: ~64 expected (expected_experts_hit)
    assert report["counts"] == {"embed": 1, "gate": 2, "gate_bias": 2, "norm": 7}
    torch.testing.assert_close(model.model.layers[0].mlp.w13_weight, experts_before, rtol=0, atol=0)


def test_reinit_follows_the_random_model_distribution_and_leaves_the_rest():
    model = VllmLike()
    dummy_load(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    reinit_routing(model, std=0.02, embed_std=0.05, seed=3)
    params = dict(model.named_parameters())
    changed = {n for n in params if not torch.equal(params[n], before[n])}
    assert changed == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        *(f"model.layers.{i}.{n}" for i in range(2) for n in (
            "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.kv_a_layernorm.weight",
            "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
        )),
    }  # fmt: skip
    for n in changed:
        p = params[n].float()
        if n.endswith("norm.weight"):
            assert torch.all(p == 1.0), n
        else:
            want = 0.05 if "embed" in n else 0.02
            assert abs(p.std().item() / want - 1) < 0.15 and abs(p.mean().item()) < want / 4, (n, p.std().item())
    again = VllmLike()
    dummy_load(again)
    reinit_routing(again, std=0.02, embed_std=0.05, seed=3)
    assert torch.equal(again.model.layers[1].mlp.gate.weight, params["model.layers.1.mlp.gate.weight"])


def test_routing_kind_names():
    assert routing_kind("model.layers.3.mlp.gate.weight", (64, 2048)) == "gate"
    assert routing_kind("model.layers.3.mlp.experts.gate.weight", (64, 2048)) == "gate"  # wherever FusedMoE holds it
    assert routing_kind("model.layers.3.mlp.gate_up_proj.weight", (2816, 2048)) is None
    assert routing_kind("model.layers.3.self_attn.gate.weight", (64, 2048)) is None
    assert routing_kind("model.layers.3.mlp.shared_expert_gate.weight", (1, 2048)) is None
    assert routing_kind("model.layers.3.self_attn.q_norm.weight", (128,)) == "norm"
    assert routing_kind("model.embed_tokens.weight", (102400, 2048)) == "embed"
    assert routing_kind("lm_head.weight", (102400, 2048)) is None
    with pytest.raises(ValueError):
        reinit_routing(VllmLike(), std=0.0)


def test_expected_experts_hit_and_summary():
    assert expected_experts_hit(64, 6, 0) == 0
    assert expected_experts_hit(64, 6, 1) == pytest.approx(6)
    assert expected_experts_hit(64, 6, 256) == pytest.approx(64, abs=1e-6)
    assert expected_experts_hit(128, 8, 4) == pytest.approx(128 * (1 - (120 / 128) ** 4))
    with pytest.raises(ValueError):
        expected_experts_hit(64, 65, 1)
    s = summarize_hits({"a": 6, "b": 6, "c": 7}, {"a": 4096, "b": 4096, "c": 4096}, 64, 6)
    assert (s["layers"], s["min"], s["median"], s["max"], s["rows"]) == (3, 6, 6, 7, 4096)
    assert "min 6 / median 6 / max 7 of 64" in hits_line("vLLM", s)
    assert "not measured" in hits_line("vLLM", None)
    assert "no MoE layer" in hits_line("ours", summarize_hits({}, {}, 64, 6))
    assert moe_shape({"n_routed_experts": 64, "num_experts_per_tok": 6}) == (64, 6)
    assert moe_shape({"num_experts": 128, "num_experts_per_tok": 8}) == (128, 8)
    assert moe_shape({"hidden_size": 4096}) is None


def test_watch_routing_counts_the_experts_our_moe_layer_routes_to():
    from kubellm.engine.model_config import ModelConfig
    from kubellm.engine.models.moe import SparseMoE

    config = ModelConfig(
        architecture="Qwen3MoeForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_experts=16, num_experts_per_tok=2, moe_intermediate_size=8, norm_topk_prob=True,
    )  # fmt: skip
    block = nn.Module()
    block.moe = SparseMoE(config, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for p in block.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    x = torch.randn(5, 32, generator=gen)
    want = torch.topk(x @ block.moe.gate.T, 2, dim=-1)[1].unique().numel()  # softmax keeps the order
    with watch_routing(block, 16) as watch:
        out = block.moe(x)
        block.moe(x[:0])  # an empty step records nothing
    assert "routed_experts" not in vars(block.moe)  # unwrapped on leaving
    torch.testing.assert_close(block.moe(x), out)
    s = watch.summary(top_k=2)
    assert (s["layers"], s["rows"], s["min"]) == (1, 5, want)


def test_watch_routing_wraps_a_router_select_experts_once():
    """vLLM's FusedMoE keeps its router on the layer (or its runner): the wrapper reads the ids it returns."""

    class Router:
        def select_experts(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, **kw):
            return torch.ones(hidden_states.shape[0], 2), torch.tensor([[1, 3], [3, 5]])

    class FusedMoE(nn.Module):
        def __init__(self, router: Router):
            super().__init__()
            self.router = router
            self.runner = type("Runner", (), {"router": router})()

    model = nn.Module()
    model.experts = FusedMoE(Router())
    with watch_routing(model, 8) as watch:
        model.experts.router.select_experts(torch.zeros(2, 4), torch.zeros(2, 8))
    assert watch.summary(2)["max"] == 3 and watch.rows == {"experts": 2}
    assert "select_experts" not in vars(model.experts.router)


def test_offline_report_prints_both_counts_and_what_the_peer_re_drew():
    from bench.offline import routing_lines

    assert routing_lines({"peer": {"version": "0.26.0"}}) == []  # a dense shape: nothing to say
    ours = summarize_hits({"l1": 64, "l2": 63}, {"l1": 16384, "l2": 16384}, 64, 6)
    theirs = summarize_hits({"l1": 6, "l2": 6}, {"l1": 16384, "l2": 16384}, 64, 6)
    reinit = {"std": 0.02, "embed_std": 0.02, "counts": {"embed": 1, "gate": 26, "norm": 82}}
    text = "\n".join(
        routing_lines(
            {"experts_hit": ours, "peer": {"version": "0.26.0", "experts_hit": theirs, "routing_reinit": reinit}}
        )
    )
    assert "ours: experts hit per MoE layer in one step of 16384 tokens: min 63 / median 64 / max 64 of 64" in text
    assert "vLLM 0.26.0: experts hit per MoE layer in one step of 16384 tokens: min 6 / median 6 / max 6" in text
    assert "'gate': 26" in text
    old = "\n".join(routing_lines({"experts_hit": ours, "peer": {"version": "0.26.0"}}))
    assert "NOT re-drawn" in old and "vLLM 0.26.0: experts hit not measured" in old


def test_offline_counts_our_engines_experts_in_one_prefill_step():
    """bench.offline's count of ours, on a tiny random-weight MoE engine on CPU: one step, every token counted."""
    import dataclasses

    from bench.offline import experts_hit_ours
    from kubellm.engine.config import EngineConfig
    from kubellm.engine.llm_engine import LLMEngine
    from kubellm.engine.random_model import QWEN3_30B_A3B, random_loaded_model

    tiny = dataclasses.replace(
        QWEN3_30B_A3B, vocab_size=2304, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, max_position_embeddings=256, bos_token_id=1, eos_token_ids=[2],
    )  # fmt: skip
    loaded = random_loaded_model(tiny, torch.float32, "cpu", seed=1, embed_std=0.5, name="random-tiny")
    engine = LLMEngine(EngineConfig(model="random-tiny", device="cpu", generation_config="vllm"), loaded=loaded)
    s = experts_hit_ours(engine, (8, 2), tokens=64, prompt_len=32)
    assert (s["layers"], s["rows"], s["num_experts"]) == (2, 64, 8)
    assert 2 <= s["min"] <= s["max"] <= 8
    assert not engine.has_unfinished_requests()


def test_a_committed_deepseek_result_renders_with_the_new_lines():
    """The H200 side-by-side of 2026-12-07 (before the routing fix) through today's markdown: it says the peer's
    routing was not re-drawn; with the fields a new run writes, the kernel family, counts and up-projected rows."""
    import json
    from pathlib import Path

    from bench.offline import results_markdown

    path = Path(__file__).parents[2] / "bench/results/engine-gpu-2026-12-07-deepseek-v2-lite-h200-side-by-side.json"
    r = json.loads(path.read_text())
    assert "Routing" not in results_markdown(r)  # no count in that run: nothing claimed
    r["experts_hit"] = summarize_hits({"l1": 64}, {"l1": 16384}, 64, 6)
    r["prefill_backend"] = "fa3"
    r["prefill_probe"]["mla_upprojected_rows_per_step"] = 16384.0
    r["mla_upproject_min_tokens"] = 256
    md = results_markdown(r)
    assert "with KUBELLM_PREFILL_BACKEND=fa3." in md and "KUBELLM_MLA_DECODE_BACKEND" not in md
    r["mla_decode_backend"] = "fa3"
    assert "with KUBELLM_PREFILL_BACKEND=fa3. KUBELLM_MLA_DECODE_BACKEND=fa3." in results_markdown(r)
    assert "- ours: experts hit per MoE layer in one step of 16384 tokens: min 64 / median 64 / max 64 of 64" in md
    assert "its dummy routing weights were NOT re-drawn" in md
    assert "16384 of its 16384 query rows up-projected (mla_upproject_min_tokens 256)" in md
    r["prefill_probe_absorbed"] = {**r["prefill_probe"], "step_ms": 2 * r["prefill_probe"]["step_ms"], "absorbed": True}
    md = results_markdown(r)
    assert "the same prefill step with up-projection switched off in this engine" in md
    assert f"against {r['prefill_probe']['step_ms']:.0f} ms up-projected (2.00x)" in md
    assert "that all-absorbed prefill step (profiled, 1 steps)" in md


def test_large_weights_are_drawn_in_pieces_with_the_same_distribution(monkeypatch):
    import bench.expert_routing as er

    monkeypatch.setattr(er, "DRAW_ELEMENTS", 5000)  # 2 rows of 2048 a piece: 512 pieces for the embedding
    model = VllmLike()
    dummy_load(model)
    reinit_routing(model, embed_std=0.05)
    emb = model.model.embed_tokens.weight.float()
    assert abs(emb.std().item() / 0.05 - 1) < 0.05
    assert not torch.equal(emb[0], emb[2]) and not torch.equal(emb[0], emb[1])  # each piece its own seed
    again = VllmLike()
    dummy_load(again)
    reinit_routing(again, embed_std=0.05)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
