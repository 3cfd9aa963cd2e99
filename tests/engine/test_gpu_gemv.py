"""The Triton small-batch GEMM (engine/models/gemv.py) equals F.linear to bf16 rounding on tensor-parallel shard
shapes of a Llama-3.1-8B layer, for 1..16 rows and odd sizes, with and without bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize(("n", "k"), [(3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168), (1000, 520)])
def test_gemv_matches_f_linear(rows: int, n: int, k: int) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from kubellm.engine.models import gemv

    gen = torch.Generator(device="cuda").manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    b = torch.randn(n, generator=gen, device="cuda").to(torch.bfloat16)
    assert gemv.enabled(x, w)
    for bias in (None, b):
        ref = F.linear(x, w, bias).float()
        got = gemv.linear(x, w, bias).float()
        rel = float((got - ref).norm() / ref.norm())
        assert rel < 4e-3, f"rows {rows} n {n} k {k}: relative error {rel}"


def test_more_rows_than_the_kernel_takes_fall_back_to_f_linear() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from kubellm.engine.models import gemv

    x = torch.randn(17, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    assert not gemv.enabled(x, w)
    assert torch.equal(gemv.linear(x, w), F.linear(x, w))
