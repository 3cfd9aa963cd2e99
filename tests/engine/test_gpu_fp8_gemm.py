"""The FP8 GEMM and activation-quantization kernels on a GPU (engine/models/fp8_gemm.py, fp8_quant.py).

Two references per product, for Llama-3.1-8B's layer shapes (qkv 4096->6144, o 4096->4096, gate_up 4096->28672,
down 14336->4096) and M in {1, 7, 64, 512, 8192}, with per-tensor, per-channel and 128x128-block weights:
  - the issue's: the dequantized weight rounded to bf16 times x in a bf16 matmul. FP8 activations add ~2-4% relative
    error (e4m3 keeps 3 mantissa bits), so the bound is FP8_TOL;
  - the exact one: the same quantization of x done in torch here (IEEE division, round to nearest e4m3), then a
    float32 product. Only the summation order and the bf16 output rounding differ, so the bound is tight
    (EXACT_TOL) and a wrong scale index, a lost K tile or a swapped operand shows at once.
Which route a product takes (a bf16-input kernel -- W8A16, split-K -- or an input quantization then a W8A8 GEMM)
is fp8_gemm.plan_route's policy (the table of models/fp8_dispatch.py by default): bf16-input routes' exact reference
is x times the dequantized weight, the others' x quantized here as the route says. Every route is also checked on
its own (run_route), on Llama-3.1-8B's and Qwen3-30B-A3B's attention shapes, and the warm-up tuning
(models/fp8_tune.py) is timed here and must pick a correct route within its budget.
Quantization kernels give torch's scales bit for bit and torch's rounding of every value (rarely one e4m3 step off,
where the two conversions round a tie differently); the fused SiLU-and-mul equals quantizing fused.py's unfused output
bit for bit, the fused norm within a rounding step (its sum of squares may be ordered differently); CUDA graph replays
equal eager runs.
On a GPU machine a missing Triton fails these tests (the import below), it does not skip them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fp8_reference import fp8_scale

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
FP8_TOL = 0.06  # relative L2 vs the bf16 dequantized matmul (activation quantization: ~2.5-4% on Gaussian inputs)
EXACT_TOL = 1e-2  # relative L2 vs the float32 product of the same quantized operands (bf16 output rounding)
ROW_TOL = 2e-2  # worst single row vs the exact reference

LLAMA_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
QWEN3_30B_A3B = {"qkv": (2048, 5120), "o": (4096, 2048)}  # (K, N); its MLPs are experts (test_gpu_fp8_moe.py)
BATCHES = (1, 7, 64, 512, 8192)
FORMATS = ("tensor", "channel", "block")


def modules():
    import triton  # noqa: F401  (on a GPU machine a missing Triton is a failure, not a skip)

    from kubellm.engine import loader as _loader_first  # noqa: F401 (loader before models: import cycle)
    from kubellm.engine.models import fp8_gemm, fp8_quant, fused

    assert fp8_gemm.triton is not None and fp8_quant.triton is not None
    return fp8_gemm, fp8_quant, fused


# ---- torch references written here, independent of the code under test ----


def torch_quantize(x: torch.Tensor, mode: str, group: int = 128, static: torch.Tensor | None = None):
    """(q, scale) as fp8_quant defines them: scale = max(amax / 448, 1 / (448 * 512)) (IEEE division: fp8_scale),
    q = rn(clamp(x / scale))."""
    xf = x.float()
    if static is not None:
        s = static.float().reshape(1).to(x.device)
        return (xf / s).clamp(-448, 448).to(FP8), s
    if mode == "tensor":
        s = fp8_scale(xf.abs().amax()).reshape(1)
        return (xf / s).clamp(-448, 448).to(FP8), s
    if mode == "token":
        s = fp8_scale(xf.abs().amax(dim=1, keepdim=True))
        return (xf / s).clamp(-448, 448).to(FP8), s
    m, k = xf.shape
    kp = -(-k // group) * group
    xg = torch.nn.functional.pad(xf, (0, kp - k)).view(m, kp // group, group)
    s = fp8_scale(xg.abs().amax(dim=2))
    q = (xg / s[:, :, None]).clamp(-448, 448).to(FP8).view(m, kp)[:, :k].contiguous()
    return q, s


def dequant_activations(q: torch.Tensor, s: torch.Tensor, group: int = 128) -> torch.Tensor:
    if s.dim() == 2 and s.shape[1] > 1:
        return q.float() * s.repeat_interleave(group, dim=1)[:, : q.shape[1]]
    return q.float() * s


def make_weight(n: int, k: int, fmt: str, seed: int):
    """(w_fp8, scale, block_size, w_dequantized float32) quantized in torch here; block scales vary ~10x across
    blocks (rows of the weight scaled unevenly) so a wrong block index cannot hide."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, generator=gen, device="cuda") / k**0.5
    w *= torch.rand(n, 1, generator=gen, device="cuda") * 9 + 1
    if fmt == "block":
        nb, kb = -(-n // 128), -(-k // 128)
        wp = torch.nn.functional.pad(w, (0, kb * 128 - k, 0, nb * 128 - n)).view(nb, 128, kb, 128)
        s = (wp.abs().amax(dim=(1, 3)) / 448).clamp_min(1e-12)
        q = (wp / s[:, None, :, None]).clamp(-448, 448).to(FP8).view(nb * 128, kb * 128)[:n, :k].contiguous()
        deq = q.float() * s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        return q, s, (128, 128), deq
    if fmt == "channel":
        s = w.abs().amax(dim=1) / 448
        q = (w / s[:, None]).clamp(-448, 448).to(FP8)
        return q, s, None, q.float() * s[:, None]
    s = w.abs().amax() / 448
    q = (w / s).clamp(-448, 448).to(FP8)
    return q, s, None, q.float() * s


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def worst_row(got: torch.Tensor, ref: torch.Tensor) -> float:
    g, r = got.float(), ref.float()
    return float(((g - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-6)).max())


def assert_same_fp8(q: torch.Tensor, rq: torch.Tensor, what: str, max_fraction: float = 1e-4) -> None:
    """q equals torch's rounding of the same quotients, except (rarely) one e4m3 step where Triton's conversion and
    torch's round a tie or a double-rounded value differently (or, for the norm, where its input differed by a
    bf16 rounding)."""
    assert q.dtype == FP8 and q.shape == rq.shape, what
    diff = q.view(torch.uint8) != rq.view(torch.uint8)
    if bool(diff.any()):
        g, r = q.float()[diff], rq.float()[diff]
        assert bool(((g - r).abs() <= r.abs() * 2**-3 + 2**-9).all()), f"{what}: values differ by more than a step"
        assert float(diff.float().mean()) < max_fraction, f"{what}: {int(diff.sum())} values differ"


def act_mode(fp8_gemm, fmt: str, block) -> str:
    """Which dynamic activation scales the fixed dispatch picks for this weight format (a policy: per tensor or per
    token for per-tensor weights, PER_TENSOR_WEIGHTS_PER_TOKEN_INPUT), checked here against torch's quantization."""
    return fp8_gemm.act_quant_for(fmt, block, None).mode


def route_input(fp8_gemm, fmt: str, block, m: int, n: int, k: int, dtype=torch.bfloat16) -> str | None:
    """How the route fp8_linear takes for these operands treats x (a policy, read from plan_route): None for bf16
    rows, else the quantization mode, which the test then applies itself."""
    r = fp8_gemm.plan_route(fmt, False, n, k, m, dtype, True)
    return None if r.act == "bf16" else fp8_gemm.act_spec(r, fmt, block, None).mode


def exact_product(x: torch.Tensor, deq: torch.Tensor, mode: str | None) -> torch.Tensor:
    if mode is None:
        return x.float() @ deq.t()
    return dequant_activations(*torch_quantize(x, mode)) @ deq.t()


@pytest.fixture(autouse=True)
def table_dispatch():
    """Every test starts from the table dispatch, split-K allowed, nothing tuned (a model runner elsewhere may have
    changed it; the engine's default is "fixed", which test_the_fused_input_route_gives_fp8_linears_result and the
    model tests' default runs take), and leaves the dispatch as it found it."""
    fp8_gemm, _, _ = modules()
    with fp8_gemm.dispatch_settings("table", True, {}):
        yield


# ---- GEMMs ----


@pytest.mark.parametrize("dispatch", ["fixed", "table"])  # the engine's default, and the measured-best routes
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layer", list(LLAMA_8B))
def test_fp8_linear_matches_dequantized_matmul_on_llama_8b_shapes(layer: str, fmt: str, dispatch: str) -> None:
    fp8_gemm, _, _ = modules()
    fp8_gemm.configure(dispatch, True)  # the autouse fixture restores the mode it found
    k, n = LLAMA_8B[layer]
    q, s, block, deq = make_weight(n, k, fmt, seed=n + k)
    deq_bf16 = deq.to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(7)
    for m in BATCHES:
        x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
        got = fp8_gemm.fp8_linear(x, q, s, block_size=block)
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        what = f"{layer} {fmt} M={m} ({dispatch})"
        assert rel(got, x @ deq_bf16.t()) < FP8_TOL, f"{what}: vs bf16 dequantized matmul {rel(got, x @ deq_bf16.t())}"
        exact = exact_product(x, deq, route_input(fp8_gemm, fmt, block, m, n, k))
        assert rel(got, exact) < EXACT_TOL and worst_row(got, exact) < ROW_TOL, (
            f"{what}: vs exact {rel(got, exact):.2e}, worst row {worst_row(got, exact):.2e}"
        )
    del q, deq, deq_bf16
    torch.cuda.empty_cache()


@pytest.mark.parametrize("fmt", FORMATS)
def test_static_input_scale_quantizes_x_with_that_scale(fmt: str) -> None:
    fp8_gemm, _, _ = modules()
    k, n = 4096, 4096
    q, s, block, deq = make_weight(n, k, fmt, seed=3)
    gen = torch.Generator(device="cuda").manual_seed(4)
    for m in (64, 512):
        x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
        static = torch.tensor(4.5 / 448)  # clips the ~0.1% of entries beyond 4.5 sigma, as a calibrated scale may
        got = fp8_gemm.fp8_linear(x, q, s, block_size=block, input_scale=static)
        xq, xs = torch_quantize(x, "tensor", static=static)
        exact = dequant_activations(xq, xs) @ deq.t()
        assert rel(got, exact) < EXACT_TOL, f"{fmt} M={m}: {rel(got, exact):.2e}"


@pytest.mark.parametrize("fmt", ("tensor", "channel"))
def test_the_triton_kernel_equals_scaled_mm_for_per_tensor_and_per_channel_weights(fmt: str) -> None:
    """The Triton W8A8 kernel also serves shapes _scaled_mm refuses (N or K not multiples of 16)."""
    fp8_gemm, fp8_quant, _ = modules()
    for m, k, n in ((64, 4096, 6144), (300, 1000, 1030)):
        q, s, _, deq = make_weight(n, k, fmt, seed=m)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        xq, xs = fp8_quant.quantize(x, fp8_gemm.act_quant_for(fmt, None, None))
        triton_out = fp8_gemm.fp8_gemm(xq, xs, q, s, use_scaled_mm=False)
        exact = dequant_activations(xq, xs) @ deq.t()
        assert rel(triton_out, exact) < EXACT_TOL, f"triton {fmt} {m}x{k}x{n}: {rel(triton_out, exact):.2e}"
        if k % 16 == 0 and n % 16 == 0:
            cublas = fp8_gemm.fp8_gemm(xq, xs, q, s, use_scaled_mm=True)
            assert rel(cublas, exact) < EXACT_TOL, f"_scaled_mm {fmt}: {rel(cublas, exact):.2e}"


def test_ragged_block_shapes_and_fp16_output() -> None:
    """N and K not multiples of 128: partial weight blocks and a partial activation group."""
    fp8_gemm, _, _ = modules()
    k, n = 1000, 1030
    q, s, block, deq = make_weight(n, k, "block", seed=9)
    for m in (5, 77):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        got = fp8_gemm.fp8_linear(x, q, s, block_size=block, out_dtype=torch.float16)
        assert got.dtype == torch.float16
        exact = exact_product(x, deq, route_input(fp8_gemm, "block", block, m, n, k, torch.float16))
        assert rel(got, exact) < EXACT_TOL, f"M={m}: {rel(got, exact):.2e}"


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_graph_replay_on_new_inputs_equals_eager(fmt: str, m: int) -> None:
    fp8_gemm, _, _ = modules()
    k, n = 2048, 3072
    q, s, block, _ = make_weight(n, k, fmt, seed=11)
    x_buf = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8_gemm.fp8_linear(x_buf, q, s, block_size=block)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_buf = fp8_gemm.fp8_linear(x_buf, q, s, block_size=block)
    gen = torch.Generator(device="cuda").manual_seed(m)
    for step in range(3):
        x_buf.copy_(torch.randn(m, k, generator=gen, device="cuda") * (step + 1))
        graph.replay()
        eager = fp8_gemm.fp8_linear(x_buf, q, s, block_size=block)
        assert torch.equal(out_buf, eager), f"{fmt} M={m} step {step}: replay differs from eager"


# ---- activation quantization ----


@pytest.mark.parametrize("mode", ["tensor", "token", "group"])
def test_quantize_equals_the_torch_quantization(mode: str) -> None:
    _, fp8_quant, _ = modules()
    gen = torch.Generator(device="cuda").manual_seed(1)
    for m, k in ((1, 4096), (7, 14336), (512, 4096), (33, 1000), (8192, 2048)):
        x = (torch.randn(m, k, generator=gen, device="cuda") * torch.rand(m, 1, generator=gen, device="cuda") * 5).to(
            torch.bfloat16
        )
        x[0, :7] = 0.0
        if m > 1:
            x[1] = 0.0  # an all-zero row: the floor scale, zeros out
        q, s = fp8_quant.quantize(x, fp8_quant.ActQuant(mode))
        rq, rs = torch_quantize(x, mode)
        assert q.dtype == FP8 and q.shape == x.shape
        assert torch.equal(s.reshape(rs.shape), rs), f"{mode} {m}x{k}: scales differ"
        assert_same_fp8(q, rq, f"{mode} {m}x{k}")


def test_static_quantization_clamps_to_the_fp8_range() -> None:
    _, fp8_quant, _ = modules()
    x = torch.tensor([[0.0, 1.0, -1.0, 1000.0, -1000.0, 0.3]], device="cuda").repeat(3, 32).to(torch.bfloat16)
    q, s = fp8_quant.quantize(x, fp8_quant.ActQuant("tensor", static_scale=torch.tensor(0.5)))
    assert float(s) == 0.5
    assert q.float()[0, :6].tolist() == [0.0, 2.0, -2.0, 448.0, -448.0, 0.625]  # 0.6 rounds to e4m3's 0.625


@pytest.mark.parametrize(
    ("spec", "with_residual"), [("token", True), ("group", True), ("static", True), ("token", False)]
)
def test_fused_rms_norm_quant_equals_norm_then_quantize(spec: str, with_residual: bool) -> None:
    _, fp8_quant, fused = modules()
    act = (
        fp8_quant.ActQuant("tensor", static_scale=torch.tensor(0.01)) if spec == "static" else fp8_quant.ActQuant(spec)
    )
    gen = torch.Generator(device="cuda").manual_seed(2)
    for m, n in ((1, 4096), (64, 4096), (8192, 4096), (3, 7168)):
        x = torch.randn(m, n, generator=gen, device="cuda").to(torch.bfloat16)
        r = torch.randn(m, n, generator=gen, device="cuda").to(torch.bfloat16)
        w = (torch.rand(n, generator=gen, device="cuda") + 0.5).to(torch.bfloat16)
        if with_residual:
            res, normed = fused.add_rms_norm(x, r, w, 1e-5)
            got_res, q, s = fp8_quant.rms_norm_quant(x, w, 1e-5, act, residual=r)
            assert torch.equal(got_res, res)
        else:
            normed = fused.rms_norm(x, w, 1e-5)
            got_res, q, s = fp8_quant.rms_norm_quant(x, w, 1e-5, act)
            assert got_res is None
        # fused.py's norm and this kernel reduce the squares alike (same block, same warps), but a compiler may
        # order the sum differently: the normed values may then differ by a bf16 rounding, so scales and values
        # are compared within one step of each
        rq, rs = torch_quantize(normed, act.mode, static=act.static_scale)
        torch.testing.assert_close(s.reshape(rs.shape), rs, rtol=2**-7, atol=0, msg=f"{spec} {m}x{n}: scales")
        assert_same_fp8(q, rq, f"{spec} {m}x{n}", max_fraction=1e-3)


@pytest.mark.parametrize("spec", ["token", "group", "static"])
def test_fused_silu_mul_quant_equals_silu_mul_then_quantize(spec: str) -> None:
    _, fp8_quant, fused = modules()
    act = (
        fp8_quant.ActQuant("tensor", static_scale=torch.tensor(0.02)) if spec == "static" else fp8_quant.ActQuant(spec)
    )
    gen = torch.Generator(device="cuda").manual_seed(3)
    for m, n in ((1, 14336), (64, 14336), (4096, 768), (5, 1000)):
        x = (torch.randn(m, 2 * n, generator=gen, device="cuda") * 3).to(torch.bfloat16)
        h = fused.silu_mul(x)
        q, s = fp8_quant.silu_mul_quant(x, act)
        rq, rs = torch_quantize(h, act.mode, static=act.static_scale)
        assert torch.equal(s.reshape(rs.shape), rs), f"{spec} {m}x{n}: scales differ"
        assert_same_fp8(q, rq, f"{spec} {m}x{n}")
        sq, ss = fp8_quant.quantize(h, act)  # fused == SiLU-and-mul then quantize, bit for bit
        assert torch.equal(q.view(torch.uint8), sq.view(torch.uint8)) and torch.equal(s, ss), f"{spec} {m}x{n}"


def test_dynamic_per_tensor_scales_are_refused_by_the_fused_kernels() -> None:
    _, fp8_quant, _ = modules()
    x = torch.zeros(2, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dynamic per-tensor scales cannot be fused"):
        fp8_quant.rms_norm_quant(
            x, torch.ones(256, device="cuda", dtype=torch.bfloat16), 1e-5, fp8_quant.ActQuant("tensor")
        )
    with pytest.raises(ValueError, match="dynamic per-tensor scales cannot be fused"):
        fp8_quant.silu_mul_quant(x, fp8_quant.ActQuant("tensor"))


@pytest.mark.parametrize("fmt", ["channel", "block"])
def test_the_fused_input_route_gives_fp8_linears_result(fmt: str) -> None:
    """A model that lets the norm or SiLU-and-mul quantize (fused_input_spec, then fp8_gemm) gets what fp8_linear
    on the bf16 output gives: bit for bit after SiLU-and-mul, within the norm's rounding after RMSNorm; few rows and
    dynamic per-tensor scales are told to use fp8_linear. Under the fixed dispatch, whose routes these name."""
    fp8_gemm, fp8_quant, fused = modules()
    fp8_gemm.configure("fixed", True)
    h, inter = 4096, 14336
    down_q, down_s, block, _ = make_weight(h, inter, fmt, seed=21)
    qkv_q, qkv_s, _, _ = make_weight(6144, h, fmt, seed=22)
    gen = torch.Generator(device="cuda").manual_seed(5)
    norm_w = (torch.rand(h, generator=gen, device="cuda") + 0.5).to(torch.bfloat16)
    for m in (64, 512):
        gate_up = torch.randn(m, 2 * inter, generator=gen, device="cuda").to(torch.bfloat16)
        spec = fp8_gemm.fused_input_spec(m, down_q, down_s, block_size=block)
        assert spec is not None and spec.mode == ("group" if fmt == "block" else "token")
        fused_out = fp8_gemm.fp8_gemm(*fp8_quant.silu_mul_quant(gate_up, spec), down_q, down_s, block_size=block)
        assert torch.equal(fused_out, fp8_gemm.fp8_linear(fused.silu_mul(gate_up), down_q, down_s, block_size=block))
        x = torch.randn(m, h, generator=gen, device="cuda").to(torch.bfloat16)
        res = torch.randn(m, h, generator=gen, device="cuda").to(torch.bfloat16)
        _, q, s = fp8_quant.rms_norm_quant(x, norm_w, 1e-5, spec, residual=res)
        unfused = fp8_gemm.fp8_linear(fused.add_rms_norm(x, res, norm_w, 1e-5)[1], qkv_q, qkv_s, block_size=block)
        fused_route = fp8_gemm.fp8_gemm(q, s, qkv_q, qkv_s, block_size=block)
        assert rel(fused_route, unfused) < 1e-3, f"{fmt} M={m}: norm route {rel(fused_route, unfused):.1e}"
    assert fp8_gemm.fused_input_spec(fp8_gemm.GEMV_MAX_ROWS, down_q, down_s, block_size=block) is None
    tensor_q, tensor_s, _, _ = make_weight(h, inter, "tensor", seed=23)
    dynamic = fp8_gemm.fused_input_spec(64, tensor_q, tensor_s)
    if fp8_gemm.act_quant_for("tensor", None, None).mode == "tensor":
        assert dynamic is None  # dynamic per-tensor scales: not row-local
    else:
        assert dynamic is not None and dynamic.mode == "token"  # PER_TENSOR_WEIGHTS_PER_TOKEN_INPUT
    static = fp8_gemm.fused_input_spec(64, tensor_q, tensor_s, input_scale=torch.tensor(0.01, device="cuda"))
    assert static is not None and static.mode == "tensor"


@pytest.mark.parametrize("fmt", FORMATS)
def test_silu_mul_fp8_linear_equals_silu_mul_then_fp8_linear(fmt: str) -> None:
    """The MLP's down projection through the fused entry point: bit for bit what the unfused sequence gives, at
    decode sizes (W8A16, no quantization) and prefill sizes (fused SiLU-and-mul quantization where allowed)."""
    fp8_gemm, _, fused = modules()
    h, inter = 4096, 14336
    q, s, block, _ = make_weight(h, inter, fmt, seed=31)
    gen = torch.Generator(device="cuda").manual_seed(6)
    for m in (1, 7, 64, 512):
        gate_up = torch.randn(m, 2 * inter, generator=gen, device="cuda").to(torch.bfloat16)
        got = fp8_gemm.silu_mul_fp8_linear(gate_up, q, s, block_size=block)
        assert torch.equal(got, fp8_gemm.fp8_linear(fused.silu_mul(gate_up), q, s, block_size=block)), f"{fmt} M={m}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_llama_mlp_with_fp8_weights_runs_the_fused_down_projection(fmt: str) -> None:
    """models/llama.MLP holding FP8 projections (Linear.load_fp8, as the FP8 loaders fill it) gives what its two
    FP8 layers give unfused, bit for bit, and the bf16 MLP on the dequantized weights at FP8 tolerance."""
    fp8_gemm, _, fused = modules()
    from kubellm.engine.loader.fp8_weights import Fp8Tensor
    from kubellm.engine.models.llama import MLP
    from kubellm.engine.random_model import LLAMA_3_1_8B

    h, inter = LLAMA_3_1_8B.hidden_size, LLAMA_3_1_8B.intermediate_size
    mlp = MLP(LLAMA_3_1_8B, torch.bfloat16, torch.device("cuda"))
    ref = MLP(LLAMA_3_1_8B, torch.bfloat16, torch.device("cuda"))
    for i, (name, n, k) in enumerate((("gate_up_proj", 2 * inter, h), ("down_proj", h, inter))):
        q, s, block, deq = make_weight(n, k, fmt, seed=40 + i)
        getattr(ref, name).weight.data.copy_(deq.to(torch.bfloat16))
        getattr(mlp, name).load_fp8(Fp8Tensor(q, s, None, block))
        del deq
    assert mlp.down_proj.weight.dtype == FP8 and mlp.gate_up_proj.weight.dtype == FP8
    gen = torch.Generator(device="cuda").manual_seed(8)
    for m in (1, 64, 512):
        x = torch.randn(m, h, generator=gen, device="cuda").to(torch.bfloat16)
        got = mlp(x)
        gate_up = mlp.gate_up_proj(x)
        p = mlp.down_proj.fp8
        unfused = fp8_gemm.fp8_linear(
            fused.silu_mul(gate_up), mlp.down_proj.weight, p.scale, block_size=p.block_size, out_dtype=x.dtype
        )
        assert torch.equal(got, unfused), f"{fmt} M={m}: the fused down projection differs from the unfused one"
        expected = ref(x)
        assert rel(got, expected) < 2 * FP8_TOL, f"{fmt} M={m}: vs the bf16 MLP {rel(got, expected):.3f}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_w8a16_holds_up_to_64_rows_and_refuses_more(fmt: str) -> None:
    """The weight-streaming kernel at every row count one program can hold (fp8_linear uses it up to
    GEMV_MAX_ROWS; the micro-benchmark times it beyond, to place that threshold)."""
    fp8_gemm, _, _ = modules()
    k, n = 4096, 6144
    q, s, block, deq = make_weight(n, k, fmt, seed=51)
    gen = torch.Generator(device="cuda").manual_seed(9)
    for m in (16, 17, 40, fp8_gemm.W8A16_MAX_ROWS):
        x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
        got = fp8_gemm.w8a16(x, q, s, fmt, block, torch.bfloat16)
        exact = x.float() @ deq.t()
        assert rel(got, exact) < EXACT_TOL and worst_row(got, exact) < ROW_TOL, f"{fmt} M={m}: {rel(got, exact):.2e}"
    with pytest.raises(ValueError, match="at most 64 rows"):
        fp8_gemm.w8a16(torch.zeros(65, k, device="cuda", dtype=torch.bfloat16), q, s, fmt, block, torch.bfloat16)


# ---- routes one by one, the split-K kernel, the warm-up tuning ----

SHAPES_8B_30B = {f"llama {k}": v for k, v in LLAMA_8B.items()} | {f"qwen3 {k}": v for k, v in QWEN3_30B_A3B.items()}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", list(SHAPES_8B_30B))
def test_every_route_matches_its_exact_reference(shape: str, fmt: str) -> None:
    """Each route the dispatch or the tuner may hand out, forced through run_route: bf16-input ones (W8A16, split-K
    at its default tiling, one pass and on the other core type at M = 1) at decode sizes, W8A8 ones (per-token and
    per-tensor inputs into _scaled_mm or the Triton kernel; per-group into the Triton kernel for blocks) also at
    prefill sizes; each against x (quantized here as the route says) times the dequantized weight."""
    fp8_gemm, _, _ = modules()
    from kubellm.engine.models import fp8_dispatch as d

    k, n = SHAPES_8B_30B[shape]
    q, s, block, deq = make_weight(n, k, fmt, seed=n + 3 * k)
    gen = torch.Generator(device="cuda").manual_seed(12)
    w8a8 = [d.TRITON_GROUP] if fmt == "block" else [d.SCALED_MM_TOKEN, d.TRITON_TOKEN]
    if fmt == "tensor":
        w8a8.append(d.SCALED_MM_TENSOR)
    for m in (1, 3, 7, 16, 64, 512):
        x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
        routes = list(w8a8)
        if m <= fp8_gemm.SPLITK_MAX_ROWS:
            base = fp8_gemm.splitk_config(m, n, k, fmt, block, fp8_gemm.sm_count(x.device))
            tiles = [base, fp8_gemm.splitk_config(m, n, k, fmt, block, 132, split_k=1, use_dot=base.use_dot)]
            if m == 1:
                tiles.append(fp8_gemm.splitk_config(m, n, k, fmt, block, 132, use_dot=not base.use_dot))
            routes += [d.W8A16] + [d.Route("splitk", "bf16", dataclasses.astuple(t)) for t in tiles]
        for r in routes:
            got = fp8_gemm.run_route(r, x, q, s, fmt, block, None, torch.bfloat16)
            mode = None if r.act == "bf16" else fp8_gemm.act_spec(r, fmt, block, None).mode
            exact = exact_product(x, deq, mode)
            assert got.shape == (m, n) and got.dtype == torch.bfloat16
            assert rel(got, exact) < EXACT_TOL and worst_row(got, exact) < ROW_TOL, (
                f"{shape} {fmt} M={m} {r}: vs exact {rel(got, exact):.2e}, worst row {worst_row(got, exact):.2e}"
            )
    del q, deq
    torch.cuda.empty_cache()


@pytest.mark.parametrize("fmt", FORMATS)
def test_splitk_in_a_cuda_graph_equals_eager(fmt: str) -> None:
    """The split-K kernel's partial sums live in a per-call buffer: a captured graph replays on new inputs exactly
    as eager calls compute them (the reduction order is fixed: no atomics)."""
    fp8_gemm, _, _ = modules()
    k, n = 4096, 6144
    q, s, block, _ = make_weight(n, k, fmt, seed=13)
    for m in (1, 16):
        cfg = fp8_gemm.splitk_config(m, n, k, fmt, block, fp8_gemm.sm_count(torch.device("cuda")))
        assert cfg.SPLIT_K > 1, "qkv's 192 column tiles are split over K"
        x_buf = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
        fp8_gemm.splitk(x_buf, q, s, fmt, block, torch.bfloat16, cfg)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_buf = fp8_gemm.splitk(x_buf, q, s, fmt, block, torch.bfloat16, cfg)
        for step in range(3):
            x_buf.copy_(torch.randn(m, k, device="cuda") * (step + 1))
            graph.replay()
            eager = fp8_gemm.splitk(x_buf, q, s, fmt, block, torch.bfloat16, cfg)
            assert torch.equal(out_buf, eager), f"{fmt} M={m} step {step}"


def test_warm_up_tuning_times_every_bucket_and_keeps_a_correct_route(caplog) -> None:
    """fp8_tune.tune on two Llama-8B qkv layers (per-tensor weights) up to 64 rows: one choice per bucket (1, 7, 16,
    64) among that bucket's candidates, logged with the timings, within the budget; the tune dispatch then runs the
    chosen route (bit for bit what run_route gives) and stays within the exact reference's tolerance."""
    import logging
    import time

    fp8_gemm, _, _ = modules()
    from kubellm.engine.models import fp8_tune

    k, n = LLAMA_8B["qkv"]
    made = [make_weight(n, k, "tensor", seed=60 + i) for i in range(2)]
    layers = [fp8_tune.Fp8Layer(q, s, None, None) for q, s, _, _ in made]
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger=fp8_tune.__name__):
        chosen = fp8_tune.tune(layers, 64, torch.bfloat16, budget_s=120.0)
    elapsed = time.perf_counter() - started
    print(f"tuned in {elapsed:.1f} s: " + "; ".join(f"{key}: {r}" for key, r in chosen.items()))
    assert elapsed < 150.0
    keys = {fp8_gemm.dispatch_key("tensor", False, n, k, m): m for m in (1, 7, 16, 64)}
    assert set(chosen) == set(keys)
    sms = fp8_gemm.sm_count(torch.device("cuda"))
    for key, m in keys.items():
        cands = fp8_tune.candidates(fp8_tune.Key("tensor", False, n, k, key[4]), m, True, sms)
        assert chosen[key] in cands, (key, chosen[key])
    assert sum("FP8 GEMM tune: tensor [6144, 4096]" in r.getMessage() for r in caplog.records) == 4
    fp8_gemm.set_tuned(chosen)
    fp8_gemm.configure("tune", True)
    q, s, _, deq = made[0]
    for m in (1, 7, 16, 64):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        r = chosen[fp8_gemm.dispatch_key("tensor", False, n, k, m)]
        got = fp8_gemm.fp8_linear(x, q, s)
        assert torch.equal(got, fp8_gemm.run_route(r, x, q, s, "tensor", None, None, torch.bfloat16)), (m, r)
        mode = None if r.act == "bf16" else fp8_gemm.act_spec(r, "tensor", None, None).mode
        assert rel(got, exact_product(x, deq, mode)) < EXACT_TOL, (m, r)
