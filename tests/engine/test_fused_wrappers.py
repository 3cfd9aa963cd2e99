"""The launch wrappers of models/fused.py (the per-head q/k norm, DeepSeek's grouped top-k) decide on the CPU what
the kernels can take, before any kernel runs: no Triton is needed, and a refusal never counts as a kernel failure.
The kernels themselves are checked on a GPU (test_gpu_qk_norm.py, test_gpu_rope_cache.py, test_gpu_mla.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from kubellm.engine.config import EngineConfig
from kubellm.engine.loader import load_model  # noqa: F401 - import order: loader before models
from kubellm.engine.models import fused
from kubellm.engine.models.llama import RMSNorm

T, HQ, HKV, D = 3, 8, 2, 64


@pytest.fixture
def state():
    saved, failed = dict(fused._state), set(fused._failed)
    yield fused._state
    fused._state.update(saved)
    fused._failed.clear()
    fused._failed.update(failed)


def _qk(dtype=torch.bfloat16):
    qkv = torch.zeros(T, (HQ + 2 * HKV) * D, dtype=dtype)
    q, k, v = qkv.split((HQ * D, HKV * D, HKV * D), dim=-1)
    return q.view(T, HQ, D), k.view(T, HKV, D), v.view(T, HKV, D)


def test_qk_norm_applies_only_to_weights_the_kernel_rounds_as_torch_does():
    q, _, _ = _qk()
    w = torch.ones(D, dtype=torch.bfloat16)
    assert fused.qk_norm_applies(None, q, D)
    assert fused.qk_norm_applies((w, w, 1e-6), q, D)
    assert not fused.qk_norm_applies((w.float(), w, 1e-6), q, D), "float32 weights: torch's product is float32"
    assert not fused.qk_norm_applies((w, w[:32], 1e-6), q, D)
    strided = torch.ones(2 * D, dtype=torch.bfloat16)[::2]
    assert not fused.qk_norm_applies((w, strided, 1e-6), q, D)


def test_wrappers_decline_before_launching(state):
    state["ok"] = True  # as on CUDA; a launch here (no Triton, CPU tensors) would fail and switch the kernels off
    q, k, v = _qk()
    w = torch.ones(D, dtype=torch.bfloat16)
    cos = sin = torch.zeros(T, 1, D, dtype=torch.bfloat16)
    cache = torch.zeros(2, 2, 16, HKV, D, dtype=torch.bfloat16)
    slots = torch.arange(T)
    assert fused.rope(q, k, cos, sin, (w.float(), w.float(), 1e-6)) is None
    assert fused.rope_cache(q, k, v, cos, sin, cache, slots, (w, w[:16], 1e-6)) is None
    state["qk_norm"] = False
    assert fused.rms_norm(q, w, 1e-6) is None, "the per-head norm answers to the fused_qk_norm switch"
    assert fused.rms_norm(torch.zeros(0, HQ, D, dtype=torch.bfloat16), w, 1e-6) is None
    assert fused.rms_norm(torch.zeros(T, HQ, D, D, dtype=torch.bfloat16), w, 1e-6) is None
    assert state["ok"] and not fused.failed_ops(), "declining is not a failure"


def test_qk_norm_enabled_follows_both_switches(state, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # which runs Triton kernels on CPU tensors
    state["ok"], state["qk_norm"] = True, True
    x = torch.zeros(1)
    assert not fused.qk_norm_enabled(x), "a CPU tensor takes the torch path"
    state["ok"] = False
    assert not fused.qk_norm_enabled(x)


def test_the_engine_setting_and_its_environment_variable(monkeypatch):
    assert EngineConfig().fused_qk_norm is True
    monkeypatch.setenv("KUBELLM_FUSED_QK_NORM", "0")
    assert EngineConfig().fused_qk_norm is False
    assert EngineConfig(fused_qk_norm=True).fused_qk_norm is True


@pytest.mark.parametrize(
    ("tokens", "experts", "groups", "k", "applies"),
    [
        (1, 256, 8, 8, True),  # DeepSeek-V3
        (1, 160, 8, 6, True),  # DeepSeek-V2: 8 groups of 20, padded to 8 x 32 lanes
        (1, 384, 1, 8, True),  # Kimi-K2: padded to 512
        (1, 96, 3, 4, True),
        (0, 256, 8, 8, False),  # nothing to route
        (1, 100, 8, 6, False),  # groups do not split the experts
        (1, 8192, 1, 8, False),  # more lanes than one program holds
        (1, 64, 1, 65, False),
        (1, 64, 0, 6, False),
    ],
)  # fmt: skip
def test_grouped_topk_applies(tokens, experts, groups, k, applies):
    assert fused.grouped_topk_applies(tokens, experts, groups, k) is applies


def test_grouped_topk_declines_more_experts_than_its_kept_groups_hold():
    """k beyond the experts of the topk_group groups kept: the kernel's k rounds of argmax would take one masked
    lane again and again (duplicate ids), so the wrapper leaves it to deepseek_topk."""
    assert fused.grouped_topk_applies(1, 64, 8, 8, topk_group=1)  # 8 groups of 8, one kept: 8 candidates
    assert not fused.grouped_topk_applies(1, 64, 8, 9, topk_group=1)
    assert fused.grouped_topk_applies(1, 256, 8, 8, topk_group=4)  # DeepSeek-V3
    assert not fused.grouped_topk_applies(1, 24, 3, 9, topk_group=1)
    assert fused.grouped_topk_applies(1, 24, 3, 9, topk_group=5)  # (more groups asked than there are: all kept)


def test_grouped_topk_declines_before_launching(state):
    state["ok"] = True
    logits = torch.zeros(2, 100)
    assert fused.grouped_topk(logits, 6, 8, 3, False, None, False, 1.0) is None
    assert fused.grouped_topk(torch.zeros(0, 64), 6, 8, 3, False, None, False, 1.0) is None
    assert state["ok"] and not fused.failed_ops()


def test_a_failing_kernel_turns_off_only_its_own_op(state, monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # enabled() lets CPU tensors reach the wrappers, as on CUDA
    state["ok"] = True
    if fused.triton is not None:  # a launch on CPU tensors must fail; make it certain where Triton is importable
        monkeypatch.setattr(fused, "_rms_norm_kernel", None)
        monkeypatch.setattr(fused, "_silu_mul_kernel", None)
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 4.0, -1.0, 2.0]])
    norm = RMSNorm(4, 1e-6, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
    # by hand: row 0 mean square (1 + 4 + 9 + 0.25) / 4 = 3.5625, rms 1.8875; row 1 (0 + 16 + 1 + 4) / 4 = 5.25
    want = torch.tensor([[1 / 1.8875, -4 / 1.8875, 1.5 / 1.8875, 0.5 / 1.8875], [0.0, 8 / 5.25**0.5, -0.5 / 5.25**0.5,
                         2 / 5.25**0.5]])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        got = norm(x)  # the kernel fails: the torch path answers
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert fused.failed_ops() == {"rms_norm"}
        assert fused.enabled(x), "one op's failure leaves the fused kernels on"
        torch.testing.assert_close(norm(x), want, rtol=1e-4, atol=1e-5)  # declined at once, no second warning
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "fused rms_norm kernel failed" in warned[0], warned
        assert fused.silu_mul(torch.ones(2, 8)) is None  # still tried: it fails on its own account
        assert fused.failed_ops() == {"rms_norm", "silu_mul"}
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 2 and "fused silu_mul kernel failed" in warned[1], warned
    assert fused.rms_norm(x, norm.weight, 1e-6) is None, "a failed op declines for the rest of the process"


def test_sum_add_rms_norm_applies_to_unsummed_top_k_outputs(state):
    parts, res, w = (
        torch.zeros(3, 8, 64, dtype=torch.bfloat16),
        torch.zeros(3, 64, dtype=torch.bfloat16),
        torch.ones(64),
    )
    state["moe_sum_norm"] = True
    assert fused.sum_add_rms_norm_applies(parts, res, w)
    assert not fused.sum_add_rms_norm_applies(parts[:, :, :32], res, w)
    assert not fused.sum_add_rms_norm_applies(parts.float(), res, w)
    assert not fused.sum_add_rms_norm_applies(torch.zeros(3, 17, 64, dtype=torch.bfloat16), res, w)  # k > 16
    assert not fused.sum_add_rms_norm_applies(torch.zeros(0, 8, 64, dtype=torch.bfloat16), res[:0], w)
    assert not fused.sum_add_rms_norm_applies(parts.transpose(1, 2).contiguous().transpose(1, 2), res, w)
    assert fused.sum_add_rms_norm_applies(parts, res, w, res.clone())  # the shared experts' output
    assert not fused.sum_add_rms_norm_applies(parts, res, w, res[:2])
    assert not fused.sum_add_rms_norm_applies(parts, res, w, res.float())
    state["moe_sum_norm"] = False
    assert not fused.sum_add_rms_norm_applies(parts, res, w)
    state["ok"] = True
    assert fused.sum_add_rms_norm(parts, res, w, 1e-6) is None and not fused.failed_ops(), "declined, no launch"


def test_add_norm_sums_unreduced_moe_outputs_on_the_cpu():
    from kubellm.engine.models.llama import RMSNorm, add_norm
    from kubellm.engine.models.moe import MoeTerms

    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, 1e-6, torch.float32, torch.device("cpu"))
    norm.weight.data = torch.randn(64, generator=gen)
    parts, residual = torch.randn(5, 4, 64, generator=gen), torch.randn(5, 64, generator=gen)
    shared = torch.randn(5, 64, generator=gen)
    for terms, total in ((MoeTerms(parts), parts.sum(dim=1)), (MoeTerms(parts, shared), parts.sum(dim=1) + shared)):
        h, x = add_norm(norm, terms, residual)
        want_h = residual + total
        assert torch.equal(h, want_h)
        assert torch.equal(x, norm(want_h))


def test_the_moe_sum_norm_setting(monkeypatch):
    assert EngineConfig().moe_sum_norm is True  # on since its gpu tests passed on an H200 (2026-12-07)
    monkeypatch.setenv("KUBELLM_MOE_SUM_NORM", "0")
    assert EngineConfig().moe_sum_norm is False
