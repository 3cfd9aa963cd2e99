"""The Triton fused MoE (engine/models/fused_moe.py) equals the torch reference of models/moe.py, run in float32,
within bf16 tolerance:
top-k gating for E in {8, 64, 128} and k in {1, 2, 8}, the experts for 1..4096 tokens (experts that get no
tokens, experts that get several tiles), every tile height, the shapes of the models that use it, fp16, and
inside a CUDA graph whose replay on new routing equals eager."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

# relative L2 error of the whole output, and of the worst single token's row, against the float32 reference:
# the kernels round the gated activation to bf16 once and each of the k expert outputs once (~2^-9 each).
REL_TOL, ROW_TOL = 1e-2, 3e-2


def fused():
    from kubellm.engine import loader as _loader_first  # noqa: F401 (loader before models: import cycle)
    from kubellm.engine.models import fused_moe

    return fused_moe


def reference_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from kubellm.engine.models.moe import reference_topk as torch_topk

    return torch_topk(logits, k, renormalize)


def reference_experts(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """The CPU path's torch reference (models/moe.py), run in float32 on float32 copies of the inputs."""
    from kubellm.engine.models.moe import reference_experts as torch_experts

    return torch_experts(x.float(), w13.float(), w2.float(), topk_weights, topk_ids)


def make_experts(e: int, hidden: int, inter: int, dtype=torch.bfloat16, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(e, 2 * inter, hidden, generator=gen, device="cuda") / hidden**0.5).to(dtype)
    w2 = (torch.randn(e, hidden, inter, generator=gen, device="cuda") / inter**0.5).to(dtype)
    return w13, w2


def routed_input(t: int, e: int, k: int, hidden: int, dtype=torch.bfloat16, seed: int = 1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, hidden, generator=gen, device="cuda").to(dtype)
    logits = torch.randn(t, e, generator=gen, device="cuda")
    w, ids = reference_topk(logits, k, renormalize=True)
    return x, w, ids.to(torch.int32)


def assert_close_rows(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape
    g, r = got.float(), ref.float()
    rel = float((g - r).norm() / r.norm())
    row = ((g - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-6)).max().item()
    assert rel < REL_TOL and row < ROW_TOL, f"{what}: relative error {rel:.2e}, worst row {row:.2e}"


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(
    ("e", "k"), [(8, 1), (8, 2), (8, 8), (64, 1), (64, 2), (64, 8), (128, 1), (128, 2), (128, 8), (60, 4)]
)
def test_fused_topk_picks_the_k_largest_softmax_weights(e: int, k: int, renormalize: bool) -> None:
    dtype = torch.bfloat16 if renormalize else torch.float32  # both logit dtypes, half the kernel compiles
    gen = torch.Generator(device="cuda").manual_seed(e * 10 + k)
    for t in (1, 5, 300):
        logits = (torch.randn(t, e, generator=gen, device="cuda") * 3).to(dtype)
        w, ids = fused().fused_topk(logits, k, renormalize)
        assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (t, k)
        ref_w, _ = reference_topk(logits, k, renormalize)
        # ties (common in bf16) may pick either expert: the picked experts' weights must be the k largest
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
        probs = torch.softmax(logits.float(), dim=-1)
        picked = probs.gather(1, ids.long())
        if renormalize:
            picked = picked / picked.sum(dim=-1, keepdim=True)
        torch.testing.assert_close(picked, w, rtol=1e-5, atol=1e-6)
        assert bool(((ids >= 0) & (ids < e)).all())
        assert all(len(set(row)) == k for row in ids.tolist()), "an expert picked twice for one token"
        if renormalize:
            torch.testing.assert_close(w.sum(-1), torch.ones(t, device="cuda"))


@pytest.mark.parametrize("t", [1, 3, 64, 333, 4096])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("e", [8, 64, 128])
def test_fused_experts_match_reference(e: int, k: int, t: int) -> None:
    hidden, inter = 256, 192  # inter not a multiple of 128: masked column blocks
    w13, w2 = make_experts(e, hidden, inter, seed=e)
    x, w, ids = routed_input(t, e, k, hidden, seed=t * 7 + k)
    got = fused().fused_experts(x, w13, w2, w, ids)
    assert got.dtype == x.dtype
    assert_close_rows(got, reference_experts(x, w13, w2, w, ids), f"E {e} k {k} T {t}")


def test_skewed_routing_leaves_experts_empty_and_fills_several_tiles() -> None:
    """Every token to expert 0 or E-1: 62 empty experts in between, and thousands of rows for the two used."""
    e, k, t, hidden, inter = 64, 2, 2500, 128, 64
    w13, w2 = make_experts(e, hidden, inter)
    x, w, _ = routed_input(t, e, k, hidden)
    ids = torch.tensor([0, e - 1], dtype=torch.int32, device="cuda").repeat(t, 1)
    ids[::3] = torch.tensor([e - 1, 0], dtype=torch.int32, device="cuda")
    got = fused().fused_experts(x, w13, w2, w, ids)
    assert_close_rows(got, reference_experts(x, w13, w2, w, ids), "two experts of 64")


@pytest.mark.parametrize(
    ("block_m", "direct", "fuse_sum"),
    [
        (16, False, False),
        (32, False, False),
        (64, False, False),
        (128, False, False),
        (16, True, False),
        (16, True, True),
    ],
)
def test_every_tile_height_gives_the_same_result(block_m: int, direct: bool, fuse_sum: bool) -> None:
    fm = fused()
    e, k, hidden, inter = 16, 4, 192, 160  # hidden and inter not multiples of BLOCK_K: masked K loop
    w13, w2 = make_experts(e, hidden, inter)
    for t in (1, 40, 600):  # 600*4 pairs: the separate scatter kernel
        x, w, ids = routed_input(t, e, k, hidden, seed=t)
        gemm = fm.GemmConfig(BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=3)
        got = fm.fused_experts(x, w13, w2, w, ids, config=fm.MoeConfig(block_m, gemm, gemm, direct, fuse_sum))
        assert_close_rows(got, reference_experts(x, w13, w2, w, ids), f"BLOCK_M {block_m} {direct=} {fuse_sum=} T {t}")


def test_alignment_sorts_every_pair_once_into_its_experts_tiles() -> None:
    fm = fused()
    e, k, block_m = 32, 4, 16
    for t in (1, 50, 1000):
        gen = torch.Generator(device="cuda").manual_seed(t)
        ids = torch.randint(0, e, (t, k), generator=gen, device="cuda", dtype=torch.int32)
        al = fm.align_pairs(ids, e, block_m)
        pairs = al.sorted_pairs.cpu()
        tiles = al.tile_expert.cpu()
        flat = ids.reshape(-1).cpu()
        real = pairs[pairs < t * k]
        assert sorted(real.tolist()) == list(range(t * k)), "each pair exactly once"
        counts = torch.bincount(flat.long(), minlength=e)
        used_tiles = int(((counts + block_m - 1) // block_m).sum())
        assert (tiles[:used_tiles] >= 0).all() and (tiles[used_tiles:] == -1).all()
        for j in range(used_tiles):
            rows = pairs[j * block_m : (j + 1) * block_m]
            rows = rows[rows < t * k]
            assert (flat[rows.long()] == tiles[j]).all(), f"tile {j} holds a pair of another expert"
        assert tiles[:used_tiles].tolist() == sorted(tiles[:used_tiles].tolist()), "tiles in expert order"


MODEL_SHAPES = {  # (E, k, H, I): I also at the tensor-parallel shards that matter
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "qwen3-30b-a3b-tp4": (128, 8, 2048, 192),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
    "deepseek-v2-lite-tp2": (64, 6, 2048, 704),
    "mixtral": (8, 2, 4096, 14336),
    "mixtral-tp4": (8, 2, 4096, 3584),
}


@pytest.mark.parametrize("name", list(MODEL_SHAPES))
def test_model_shapes_match_reference(name: str) -> None:
    e, k, hidden, inter = MODEL_SHAPES[name]
    w13, w2 = make_experts(e, hidden, inter)
    for t in (1, 256, 2048):
        x, w, ids = routed_input(t, e, k, hidden, seed=t)
        got = fused().fused_experts(x, w13, w2, w, ids)
        assert_close_rows(got, reference_experts(x, w13, w2, w, ids), f"{name} T {t}")
    del w13, w2
    torch.cuda.empty_cache()


def test_float16_matches_reference() -> None:
    e, k, t, hidden, inter = 64, 6, 77, 512, 256
    w13, w2 = make_experts(e, hidden, inter, dtype=torch.float16)
    x, w, ids = routed_input(t, e, k, hidden, dtype=torch.float16)
    got = fused().fused_experts(x, w13, w2, w, ids)
    assert got.dtype == torch.float16
    assert_close_rows(got, reference_experts(x, w13, w2, w, ids), "fp16")


@pytest.mark.parametrize(("t", "mode"), [(1, "default"), (8, "default"), (64, "default"), (2, "direct+fuse_sum")])
def test_cuda_graph_replay_on_new_routing_equals_eager(t: int, mode: str) -> None:
    """Gating and experts captured once; replays on fresh inputs (other experts picked) equal eager runs."""
    fm = fused()
    e, k, hidden, inter = 128, 8, 512, 256
    gemm = fm.GemmConfig(BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    config = fm.MoeConfig(16, gemm, gemm, direct=True, fuse_sum=True) if mode != "default" else None
    w13, w2 = make_experts(e, hidden, inter)
    x_buf = torch.zeros(t, hidden, device="cuda", dtype=torch.bfloat16)
    logits_buf = torch.zeros(t, e, device="cuda")  # float32: no ties, so the reference picks the same experts

    def layer():
        w, ids = fm.fused_topk(logits_buf, k, True)
        return fm.fused_experts(x_buf, w13, w2, w, ids, config)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_buf = layer()
    gen = torch.Generator(device="cuda").manual_seed(t)
    for step in range(3):
        x_buf.copy_(torch.randn(t, hidden, generator=gen, device="cuda"))
        logits_buf.copy_(torch.randn(t, e, generator=gen, device="cuda") * 2)
        graph.replay()
        replayed = out_buf.clone()
        eager = layer()
        assert torch.equal(replayed, eager), f"step {step}: replay differs from eager"
        w, ids = reference_topk(logits_buf, k, True)
        assert_close_rows(replayed, reference_experts(x_buf, w13, w2, w, ids), f"graph T {t} step {step}")


def test_bad_arguments_get_clear_errors() -> None:
    fm = fused()
    w13, w2 = make_experts(8, 64, 32)
    x, w, ids = routed_input(4, 8, 2, 64)
    with pytest.raises(ValueError, match="shapes do not fit"):
        fm.fused_experts(x[:, :32].contiguous(), w13, w2, w, ids)
    with pytest.raises(ValueError, match="must have x's dtype"):
        fm.fused_experts(x, w13.half(), w2, w, ids)
    with pytest.raises(ValueError, match="CUDA device"):
        fm.fused_experts(x.cpu(), w13, w2, w, ids)
    with pytest.raises(ValueError, match="top_k must be between 1 and the number of experts"):
        fm.fused_topk(torch.randn(4, 8, device="cuda"), 9, True)
