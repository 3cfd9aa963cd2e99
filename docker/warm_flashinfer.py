"""Compile flashinfer's attention kernels at image build time, so an engine pod never pays minutes of JIT.

Runs in the Dockerfile's `engine-build` stage, which has nvcc but no GPU: flashinfer compiles for the
architectures in FLASHINFER_CUDA_ARCH_LIST instead of asking a device (its GPU-less JIT path), and writes
the shared objects under $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer/<version>/<archs>/. The final image
copies that directory and sets the same two variables, so flashinfer finds the kernels instead of building.

Seen on the H200 machine (flashinfer 0.6.18.post1, CUDA 13.0, 16 cores), with CUDA_VISIBLE_DEVICES=""
and FLASHINFER_CUDA_ARCH_LIST="9.0a": head size 64, bf16 built in 12 s (decode) + 21 s (FA2 prefill) + 69 s
(FA3 prefill), 17 MB; a later process with the GPU visible and the same two variables ran paged decode and
FA3 prefill in 0.1 s without building anything.

Built per head size (64: the embedded SmolLM2 and other small models; 128: Llama-3/Qwen/Mistral shapes),
per 16-bit dtype: the paged decode kernel, the paged prefill kernel (FA2), and on Hopper (sm90) the FA3
prefill kernel. Other head sizes still JIT at first use, which fails in the final image (no nvcc there):
add them here with --head-dim. Sampling kernels are not built: the engine samples in torch.

    FLASHINFER_CUDA_ARCH_LIST="9.0a" python docker/warm_flashinfer.py --head-dim 64 128
    python docker/warm_flashinfer.py --dry-run   # list the kernels, compile nothing
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from typing import Any


def kernel_specs(head_dims: list[int], dtypes: list[str], fa3: bool) -> Iterator[Any]:
    """flashinfer JIT specs for the attention kernels the engine's flashinfer backend plans."""
    import torch
    from flashinfer.jit.attention.modules import gen_batch_decode_module, gen_batch_prefill_module

    common = {"pos_encoding_mode": 0, "use_sliding_window": False, "use_logits_soft_cap": False}
    for head_dim in head_dims:
        for name in dtypes:
            dt = getattr(torch, name)
            dims = {"head_dim_qk": head_dim, "head_dim_vo": head_dim}
            types = {"dtype_q": dt, "dtype_kv": dt, "dtype_o": dt, "dtype_idx": torch.int32}
            yield gen_batch_decode_module(**types, **dims, **common)
            yield gen_batch_prefill_module("fa2", **types, **dims, **common, use_fp16_qk_reduction=False)
            if fa3:
                yield gen_batch_prefill_module("fa3", **types, **dims, **common, use_fp16_qk_reduction=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    p.add_argument("--dry-run", action="store_true", help="print the kernels that would be built")
    args = p.parse_args(argv)

    archs = os.environ.get("FLASHINFER_CUDA_ARCH_LIST", "")
    if not archs and not args.dry_run:
        print("set FLASHINFER_CUDA_ARCH_LIST (e.g. '8.0 9.0a'): there is no GPU to ask at build time", file=sys.stderr)
        return 2
    fa3 = any(a.startswith("9.0") for a in archs.split())
    specs = list(kernel_specs(args.head_dim, args.dtype, fa3))
    for spec in specs:
        print(f"{'would build' if args.dry_run else 'building'} {spec.name}", flush=True)
        if args.dry_run:
            continue
        started = time.monotonic()
        spec.build()
        print(f"  built in {time.monotonic() - started:.0f}s: {spec.get_library_path()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
