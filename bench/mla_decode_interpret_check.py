"""Run the Triton MLA decode kernel (engine/attention/triton_mla_decode.py) on CPU under Triton's interpreter
(TRITON_INTERPRET=1) against the torch reference (engine/attention/torch_mla.py) on the same paged latent pool: a
check of the kernel's logic without a GPU (page walks, splits, masks, the merge). The interpreter is patched as for
the FP8 kernels (bench/fp8_interpret_check.py: bf16 dots and conversions as the GPU does them, ranges over runtime
ints). What it cannot show is the GPU's arithmetic; tests/engine/test_gpu_mla.py covers that.

Cases: page sizes 16 and 64, 16 heads (DeepSeek-V2-Lite) and 128 (V3), ragged contexts with one row of context 1,
contexts crossing split boundaries, several split counts (1: the direct path without a merge; more splits than a
short row has tiles: empty splits), float32 and bf16 pools, and the query as deepseek.py hands it over (q_latent a
transposed bmm output, q_rope a column view of q_proj's output: neither contiguous), and a plan into CUDA-graph
page-table buffers (PageTableBuffers, larger than the step's table and holding a stale one) run through the wrapper.

    PYTHONPATH=.venv/triton-3.6.0 python -m bench.mla_decode_interpret_check   # exit 1 on any mismatch
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch

from bench.fp8_interpret_check import faithful_interpreter
from kubellm.engine.attention import AttentionMetadata, TorchMLAAttention
from kubellm.engine.attention import triton_mla_decode as tmd
from kubellm.engine.attention.mla import mla_page_table_from_meta
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq

RANK, ROPE = 512, 64
WIDTH = RANK + ROPE
SCALE = (128 + 64) ** -0.5
SHORT = tmd.DecodeConfig(block_n=16, min_split_tokens=16)  # splits of 48 tokens below: boundaries inside pages
# (heads, page, dtype, contexts after the step, splits, launch shape, strided queries, graph buffers): splits None =
# decode_splits' choice on 132 SMs
CASES = [
    (16, 16, torch.float32, [1, 15, 16, 17, 150, 63], 3),
    (16, 16, torch.float32, [1, 40, 97], 1),
    (16, 64, torch.float32, [1, 64, 65, 130], 3, SHORT),
    (16, 16, torch.float32, [1, 64, 65, 130], 3, SHORT),
    (16, 64, torch.bfloat16, [1, 17, 150], None),
    (128, 16, torch.bfloat16, [1, 70, 33], 2),
    (128, 64, torch.float32, [1, 100], 3),
    (16, 16, torch.bfloat16, [1, 33, 150, 64], 3, tmd.DEFAULT, True),
    (16, 16, torch.float32, [1, 17, 150, 40], None, tmd.DEFAULT, False, True),
]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative L2 against the float32 reference


def check(
    heads: int,
    page: int,
    dtype: torch.dtype,
    lens: list[int],
    splits: int | None,
    config=tmd.DEFAULT,
    strided: bool = False,
    graph: bool = False,
    *,
    seed: int,
) -> str | None:
    gen = torch.Generator().manual_seed(seed)
    blocks = sum(-(-n // page) for n in lens) + 3
    perm = torch.randperm(blocks, generator=gen).tolist()
    tables, at = [], 0
    for n in lens:
        k = -(-n // page)
        tables.append(perm[at : at + k])
        at += k
    pool = torch.randn(blocks, page, WIDTH, generator=gen).to(dtype)
    batch = ForwardBatch([ScheduledSeq(f"s{i}", [0], n - 1, tables[i], True) for i, n in enumerate(lens)])
    meta = AttentionMetadata.from_batch(batch, page)
    b = len(lens)
    q_lat, q_rope, latent, k_rope = (
        torch.randn(*shape, generator=gen).to(dtype)
        for shape in ((b, heads, RANK), (b, heads, ROPE), (b, RANK), (b, ROPE))
    )
    if strided:  # deepseek.py's layout: bmm over heads transposed back; the rope part of q_proj's [nope | rope] rows
        q_lat = q_lat.transpose(0, 1).contiguous().transpose(0, 1)
        q_rope = torch.cat((torch.zeros(b, heads, 128, dtype=dtype), q_rope), dim=-1)[..., 128:]
        assert not q_lat.is_contiguous() and not q_rope.is_contiguous()
    ref = TorchMLAAttention(heads, 1, WIDTH, SCALE, page, kv_lora_rank=RANK)
    ref_pool = pool.float()
    ref.begin_step(meta)
    expected = ref.forward_mla(0, q_lat.float(), q_rope.float(), latent.float(), k_rope.float(), ref_pool)
    # the kernel reads the pool after the step's writes (the backend writes the new rows first)
    pool.view(-1, WIDTH)[meta.slot_mapping] = torch.cat((latent, k_rope), dim=-1)
    cpu = torch.device("cpu")
    ckv, kpe = pool[..., :RANK], pool[..., RANK:]
    if graph:  # buffers bigger than the table, holding a stale table whose pages lie outside the pool: a read shows
        buffers = tmd.PageTableBuffers.allocate(b + 3, 2 * blocks + 8, cpu)
        for t in (buffers.kv_indptr, buffers.kv_lens, buffers.kv_indices):
            t.fill_(blocks + 1000)
        wrapper = tmd.TritonMLADecode(heads, SCALE, cpu, num_sms=132, buffers=buffers, config=config)
        wrapper.plan(mla_page_table_from_meta(meta))
        n_splits = wrapper.splits(b)
        out = wrapper.run(q_lat, q_rope, ckv, kpe)
    else:
        wrapper = tmd.TritonMLADecode(heads, SCALE, cpu, num_sms=132)
        wrapper.plan(mla_page_table_from_meta(meta))
        n_splits = splits if splits is not None else wrapper.splits(b)
        indptr, indices, kv_lens = wrapper._table or ()
        out = tmd.mla_decode(q_lat, q_rope, ckv, kpe, indptr, indices, kv_lens, SCALE, n_splits, config)
    assert out.dtype == dtype and out.shape == expected.shape
    rel = ((out.float() - expected).norm() / expected.norm()).item()
    worst = ((out.float() - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()
    ok = rel < TOL[dtype] and worst < 2 * TOL[dtype]
    tag = (
        f"heads={heads} page={page} {str(dtype).removeprefix('torch.')} lens={lens} splits={n_splits} "
        f"block_n={config.block_n} min_split={config.min_split_tokens}"
        f"{' strided' if strided else ''}{' graph' if graph else ''}"
    )
    print(f"mla_decode {tag}: relative L2 {rel:.2e} (worst row-head {worst:.2e}) {'ok' if ok else 'FAIL'}", flush=True)
    return None if ok else tag


def main() -> int:
    faithful_interpreter()
    failures = [f for i, case in enumerate(CASES) if (f := check(*case, seed=i)) is not None]
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
