"""The MoE layer's torch reference (what the GPU kernels are compared with): top-k gating on hand-computed
numbers, and the grouped expert computation against a plain per-token loop written here from the definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kubellm.engine.config import EngineConfig
from kubellm.engine.models import moe


def per_token_moe(x, w13, w2, weights, ids):
    """sum_j w_j * (silu(x gate_e^T) * (x up_e^T)) down_e^T, token by token (the definition, in float64)."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = w13[e, :inter].double(), w13[e, inter:].double()
            h = F.silu(gate @ x[t].double()) * (up @ x[t].double())
            out[t] += float(weights[t, j]) * (w2[e].double() @ h)
    return out


def test_topk_softmax_and_renormalisation_on_known_numbers():
    # probabilities proportional to 1, 2, 4, 1: softmax gives 1/8, 2/8, 4/8, 1/8
    logits = torch.tensor([[0.0, math.log(2), math.log(4), 0.0]])
    weights, ids = moe.reference_topk(logits, 2, renormalize=False)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.tolist() == [[2, 1]]
    assert torch.allclose(weights, torch.tensor([[4 / 8, 2 / 8]]), atol=1e-6)
    weights, ids = moe.reference_topk(logits, 2, renormalize=True)
    assert ids.tolist() == [[2, 1]]
    assert torch.allclose(weights, torch.tensor([[4 / 6, 2 / 6]]), atol=1e-6)
    weights, _ = moe.reference_topk(logits.bfloat16(), 2, renormalize=False)  # any float dtype in, float32 out
    assert weights.dtype == torch.float32 and torch.allclose(weights, torch.tensor([[4 / 8, 2 / 8]]), atol=1e-2)


# (64, 8, 2): 16 routing slots for 64 experts, so most experts get no token
@pytest.mark.parametrize(("experts", "top_k", "tokens"), [(8, 1, 5), (8, 2, 33), (16, 4, 7), (4, 4, 3), (64, 8, 2)])
def test_grouped_experts_equal_the_per_token_definition(experts, top_k, tokens):
    g = torch.Generator().manual_seed(experts * 100 + top_k)
    h, inter = 24, 40
    x = torch.randn(tokens, h, generator=g)
    w13 = torch.randn(experts, 2 * inter, h, generator=g) / h**0.5
    w2 = torch.randn(experts, h, inter, generator=g) / inter**0.5
    weights, ids = moe.reference_topk(torch.randn(tokens, experts, generator=g), top_k, renormalize=top_k > 1)
    out = moe.reference_experts(x, w13, w2, weights, ids)
    assert out.shape == x.shape and out.dtype == x.dtype
    want = per_token_moe(x, w13, w2, weights, ids)
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)


def test_no_tokens_gives_an_empty_output():
    x = torch.zeros(0, 8)
    out = moe.reference_experts(x, torch.ones(4, 6, 8), torch.ones(4, 8, 3), torch.zeros(0, 2), torch.zeros(0, 2))
    assert out.shape == (0, 8)


def test_bf16_inputs_come_back_in_bf16_close_to_float():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 32, generator=g)
    w13, w2 = torch.randn(8, 64, 32, generator=g) / 6, torch.randn(8, 32, 32, generator=g) / 6
    weights, ids = moe.reference_topk(torch.randn(9, 8, generator=g), 2, True)
    lo = moe.reference_experts(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), weights, ids)
    assert lo.dtype == torch.bfloat16
    want = per_token_moe(x, w13, w2, weights, ids)
    assert float((lo.double() - want).norm() / want.norm()) < 2e-2


def test_cpu_runs_the_torch_reference(monkeypatch):
    assert moe.kernel_choice(torch.device("cpu")) == "torch reference"
    monkeypatch.setenv("KUBELLM_MOE_KERNEL", "cutlass")
    with pytest.raises(ValueError, match=r"moe_kernel='cutlass' \(KUBELLM_MOE_KERNEL\); choose from auto, torch"):
        EngineConfig()
    with pytest.raises(ValueError, match="must be 'auto' or 'torch'"):
        moe.configure("cutlass")
