"""FP8 experts in the fused MoE kernels (engine/models/fused_moe.py with w1_scale/w2_scale) on a GPU, for
Qwen3-30B-A3B's shape (E 128, top-8, H 2048, I 768) and M in {1, 7, 64, 512, 8192} tokens, with 128x128 block
scales (Qwen3-30B-A3B-FP8's format), one scale per expert and one per expert output row (dynamic per-token and
static per-tensor activations).

References, as in test_gpu_fp8_gemm.py: the issue's (the dequantized experts in the float32 torch MoE of
models/moe.py, unquantized activations) at FP8 tolerance, and an exact one written here: the same activation
quantization in torch (x before gate_up, the bf16 SiLU-and-mul output before down; none before the few-token
down_sum, which dequantizes weights in registers), float32 products, so only summation order and bf16 roundings
differ. On a GPU machine a missing Triton fails these tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fp8_reference import fp8_scale

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
FP8_TOL = 0.08  # vs unquantized activations: two activation quantizations (~3% each) and the bf16 roundings
EXACT_TOL = 1.5e-2  # vs the same quantization in torch: bf16 roundings of the activation and of each expert output
QWEN3_30B_A3B = (128, 8, 2048, 768)
BATCHES = (1, 7, 64, 512, 8192)


def fused():
    import triton  # noqa: F401  (on a GPU machine a missing Triton is a failure, not a skip)

    from kubellm.engine import loader as _loader_first  # noqa: F401 (loader before models: import cycle)
    from kubellm.engine.models import fused_moe

    assert fused_moe.triton is not None
    return fused_moe


def quantize_experts(w: torch.Tensor, fmt: str):
    """[E, N, K] float32 -> (fp8, scales, dequantized float32): 128x128 blocks, one scale per expert ([E]) or one
    per expert output row ([E, N])."""
    e, n, k = w.shape
    if fmt == "channel":
        s = w.abs().amax(dim=2) / 448
        q = (w / s[:, :, None]).clamp(-448, 448).to(FP8)
        return q, s, q.float() * s[:, :, None]
    if fmt == "block":
        wg = w.view(e, n // 128, 128, k // 128, 128)
        s = wg.abs().amax(dim=(2, 4)) / 448
        q = (wg / s[:, :, None, :, None]).clamp(-448, 448).to(FP8)
        return q.view(e, n, k), s, (q.float() * s[:, :, None, :, None]).view(e, n, k)
    s = w.abs().amax(dim=(1, 2)) / 448
    q = (w / s[:, None, None]).clamp(-448, 448).to(FP8)
    return q, s, q.float() * s[:, None, None]


def torch_quant_dequant(x: torch.Tensor, block: bool, static: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_quant's numerics in torch: per token and 128-column group (block), per token (other dynamic), or per
    tensor with a static scale."""
    xf = x.float()
    if static is not None:
        s = static.float().to(x.device)
        return (xf / s).clamp(-448, 448).to(FP8).float() * s
    if not block:
        s = fp8_scale(xf.abs().amax(dim=1, keepdim=True))
        return (xf / s).clamp(-448, 448).to(FP8).float() * s
    m, k = xf.shape
    xg = xf.view(m, k // 128, 128)
    s = fp8_scale(xg.abs().amax(dim=2, keepdim=True))
    return ((xg / s).clamp(-448, 448).to(FP8).float() * s).view(m, k)


def exact_reference(x, d13, d2, w, ids, block, direct_sum, a13=None, a2=None) -> torch.Tensor:
    """Expert by expert in float32 on the dequantized weights, activations quantized where the kernels do."""
    t, k = ids.shape
    inter = d2.shape[2]
    xd = torch_quant_dequant(x, block, a13)
    flat = ids.reshape(-1).long()
    act = torch.empty(t * k, inter, device=x.device)
    for e in flat.unique().tolist():
        pairs = (flat == e).nonzero().squeeze(1)
        gu = xd[pairs // k] @ d13[e].t()
        act[pairs] = (F.silu(gu[:, :inter]) * gu[:, inter:]).to(x.dtype).float()  # stored in the model dtype
    ad = act if direct_sum else torch_quant_dequant(act.to(x.dtype), block, a2)
    out = torch.empty(t * k, d2.shape[1], device=x.device)
    for e in flat.unique().tolist():
        pairs = (flat == e).nonzero().squeeze(1)
        out[pairs] = ad[pairs] @ d2[e].t() * w.reshape(-1)[pairs, None]
    if not direct_sum:
        out = out.to(x.dtype).float()  # each pair's weighted output is stored in the model dtype, then summed
    return out.view(t, k, -1).sum(dim=1)


def dequantized_reference(x, d13, d2, w, ids) -> torch.Tensor:
    from kubellm.engine.models.moe import reference_experts

    return reference_experts(x.float(), d13, d2, w, ids)


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def make_case(fmt: str, seed: int = 0):
    e, _, h, inter = QWEN3_30B_A3B
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w13 = torch.randn(e, 2 * inter, h, generator=gen, device="cuda") / h**0.5
    w13 *= torch.rand(e, 2 * inter, 1, generator=gen, device="cuda") * 4 + 0.5  # uneven blocks
    w2 = torch.randn(e, h, inter, generator=gen, device="cuda") / inter**0.5
    q13, s13, d13 = quantize_experts(w13, fmt)
    q2, s2, d2 = quantize_experts(w2, fmt)
    return q13, s13, d13, q2, s2, d2


def routed(t: int, seed: int):
    from kubellm.engine.models.moe import reference_topk

    e, k, h, _ = QWEN3_30B_A3B
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, h, generator=gen, device="cuda").to(torch.bfloat16)
    w, ids = reference_topk(torch.randn(t, e, generator=gen, device="cuda"), k, True)
    return x, w, ids


@pytest.mark.parametrize("fmt", ["block", "tensor", "channel"])
def test_fp8_experts_match_references_on_qwen3_30b_a3b(fmt: str) -> None:
    fm = fused()
    block = fmt == "block"
    e, k, h, inter = QWEN3_30B_A3B
    q13, s13, d13, q2, s2, d2 = make_case(fmt)
    kw = {"block_size": (128, 128)} if block else {}
    for t in BATCHES:
        x, w, ids = routed(t, seed=t)
        got = fm.fused_experts(x, q13, q2, w, ids, w1_scale=s13, w2_scale=s2, **kw)
        assert got.shape == x.shape and got.dtype == x.dtype
        cfg = fm.get_config(e, inter, h, q13.dtype, t, k)
        exact = exact_reference(x, d13, d2, w, ids, block, direct_sum=cfg.direct and cfg.fuse_sum)
        assert rel(got, exact) < EXACT_TOL, f"{fmt} T={t}: vs exact {rel(got, exact):.2e}"
        if t <= 512:  # the per-expert float32 reference is slow at 8192 tokens; the exact one covers it
            ref = dequantized_reference(x, d13, d2, w, ids)
            assert rel(got, ref) < FP8_TOL, f"{fmt} T={t}: vs dequantized experts {rel(got, ref):.2e}"


@pytest.mark.parametrize(
    ("block_m", "direct", "fuse_sum"), [(16, False, False), (64, False, False), (16, True, False), (16, True, True)]
)
@pytest.mark.parametrize("fmt", ["block", "channel"])
def test_every_tile_mode_gives_the_exact_result(fmt: str, block_m: int, direct: bool, fuse_sum: bool) -> None:
    """Configs with BLOCK_K 256 (wider than a 128 block: the kernels narrow it) and 64 (two steps per block)."""
    fm = fused()
    block = fmt == "block"
    q13, s13, d13, q2, s2, d2 = make_case(fmt, seed=1)
    up = fm.GemmConfig(BLOCK_N=64, BLOCK_K=256, GROUP_M=4, num_warps=4, num_stages=3)
    dn = fm.GemmConfig(BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=3)
    kw = {"block_size": (128, 128)} if block else {}
    for t in (1, 3, 40):
        x, w, ids = routed(t, seed=100 + t)
        cfg = fm.MoeConfig(block_m, up, dn, direct, fuse_sum)
        got = fm.fused_experts(x, q13, q2, w, ids, cfg, w1_scale=s13, w2_scale=s2, **kw)
        exact = exact_reference(x, d13, d2, w, ids, block, direct_sum=direct and fuse_sum)
        assert rel(got, exact) < EXACT_TOL, f"{fmt} {cfg} T={t}: {rel(got, exact):.2e}"


def test_static_activation_scales_for_per_tensor_experts() -> None:
    fm = fused()
    q13, s13, d13, q2, s2, d2 = make_case("tensor", seed=2)
    a13, a2 = torch.tensor(4.0 / 448), torch.tensor(0.05 / 448)
    for t in (7, 512):
        x, w, ids = routed(t, seed=t)
        got = fm.fused_experts(x, q13, q2, w, ids, w1_scale=s13, w2_scale=s2, a1_scale=a13, a2_scale=a2)
        cfg = fm.get_config(128, 768, 2048, q13.dtype, t, 8)
        exact = exact_reference(x, d13, d2, w, ids, False, cfg.direct and cfg.fuse_sum, a13, a2)
        assert rel(got, exact) < EXACT_TOL, f"T={t}: {rel(got, exact):.2e}"


@pytest.mark.parametrize("t", [1, 64])
def test_cuda_graph_replay_of_fp8_experts_equals_eager(t: int) -> None:
    fm = fused()
    e, k, h, _ = QWEN3_30B_A3B
    q13, s13, _, q2, s2, _ = make_case("block", seed=3)
    x_buf = torch.zeros(t, h, device="cuda", dtype=torch.bfloat16)
    logits_buf = torch.zeros(t, e, device="cuda")

    def layer():
        w, ids = fm.fused_topk(logits_buf, k, True)
        return fm.fused_experts(x_buf, q13, q2, w, ids, w1_scale=s13, w2_scale=s2, block_size=(128, 128))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_buf = layer()
    gen = torch.Generator(device="cuda").manual_seed(t)
    for step in range(3):
        x_buf.copy_(torch.randn(t, h, generator=gen, device="cuda"))
        logits_buf.copy_(torch.randn(t, e, generator=gen, device="cuda"))
        graph.replay()
        assert torch.equal(out_buf, layer()), f"step {step}: replay differs from eager"


def test_malformed_fp8_expert_scales_are_refused() -> None:
    fm = fused()
    q13, s13, _, q2, s2, _ = make_case("block", seed=4)
    x, w, ids = routed(2, seed=0)
    with pytest.raises(ValueError, match="block scales must be"):
        fm.fused_experts(x, q13, q2, w, ids, w1_scale=s13[:, :3], w2_scale=s2, block_size=(128, 128))
    with pytest.raises(ValueError, match="one scale per expert"):
        fm.fused_experts(x, q13, q2, w, ids, w1_scale=s13, w2_scale=s2)
    with pytest.raises(ValueError, match="need both w1_scale and w2_scale"):
        fm.fused_experts(x, q13, q2, w, ids, w1_scale=s13, block_size=(128, 128))
    with pytest.raises(ValueError, match="FP8 experts' weights must be"):
        fm.fused_experts(x, q13.to(torch.bfloat16), q2, w, ids, w1_scale=s13, w2_scale=s2, block_size=(128, 128))
    with pytest.raises(ValueError, match="dynamic activation scales only"):
        fm.fused_experts(x, q13, q2, w, ids, w1_scale=s13, w2_scale=s2, block_size=(128, 128),
                         a1_scale=torch.tensor(1.0))  # fmt: skip


def test_gate_up_writing_fp8_equals_gate_up_then_quantize() -> None:
    """With 128-column gate_up tiles on 128x128 blocks the kernel quantizes its own output (gate_up_quantized): the
    same FP8 values and scales as storing the bf16 activation and quantizing it, and fused_experts on that route
    matches the exact reference."""
    fm = fused()
    from kubellm.engine.models import fp8_quant

    e, k, _, _ = QWEN3_30B_A3B
    q13, s13, d13, q2, s2, d2 = make_case("block", seed=5)
    up = fm.GemmConfig(BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    dn = fm.GemmConfig(BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    for t, block_m in ((5, 16), (600, 64)):
        x, w, ids = routed(t, seed=200 + t)
        xq, xs = fp8_quant.quantize(x, fp8_quant.ActQuant("group"))
        al = fm.align_pairs(ids, e, block_m)
        scales = fm.Fp8Gemm(xs, s13, (128, 128))
        activated = fm.gate_up(xq, q13, al, k, up, scales, out_dtype=torch.bfloat16)
        ref_q, ref_s = fp8_quant.quantize(activated, fp8_quant.ActQuant("group"))
        q, s = fm.gate_up_quantized(xq, q13, al, k, up, scales, torch.bfloat16)
        assert torch.equal(s, ref_s), f"T={t}: scales differ"
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), f"T={t}: values differ"
        got = fm.fused_experts(x, q13, q2, w, ids, fm.MoeConfig(block_m, up, dn), w1_scale=s13, w2_scale=s2,
                               block_size=(128, 128))  # fmt: skip
        exact = exact_reference(x, d13, d2, w, ids, True, direct_sum=False)
        assert rel(got, exact) < EXACT_TOL, f"T={t}: {rel(got, exact):.2e}"
