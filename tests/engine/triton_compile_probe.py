"""Run by test_triton_compile.py in a subprocess whose PYTHONPATH holds Triton (kept out of the venv, where CPU torch
has none): the engine's compile check at its quick scope, then the same machinery on two kernels that must fail,
one as the MLA rope-cache kernel failed on the H100 (a name bound to a pointer block in one branch of a runtime `if`
and to a scalar pointer in the other) and one needing more shared memory than sm90 has. Prints one JSON line."""

from __future__ import annotations

import json
import sys

from kubellm.engine import compile_check


def _failing_cases() -> tuple[list[compile_check.Case], set[str]]:
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _branch_types(x_ptr, out_ptr, n_rows, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        if tl.program_id(0) < n_rows:  # noqa: SIM108 (the if statement is the point)
            src = x_ptr + i[:, None]  # a [BLOCK, 1] block of pointers
        else:
            src = x_ptr  # one pointer: Triton refuses the two types for one name
        tl.store(out_ptr + i[:, None], tl.load(src))

    @triton.jit
    def _too_much_shared(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
            b = tl.load(b_ptr + (k0 + rk)[:, None] * BN + rn[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)

    x = torch.empty(64, dtype=torch.bfloat16)
    a, b = torch.empty(32, 1024, dtype=torch.float16), torch.empty(1024, 32, dtype=torch.float16)
    cases = [
        compile_check.Case("branch types", lambda: _branch_types[(2,)](x, x, 1, BLOCK=16)),
        compile_check.Case(
            "shared memory",
            lambda: _too_much_shared[(1,)](a, b, torch.empty(32, 32), 1024, BM=32, BN=32, BK=256, num_stages=16),
        ),
    ]
    return cases, {"__main__._branch_types", "__main__._too_much_shared", "__main__._never_launched"}


def main() -> None:
    engine = compile_check.run(scope="quick", jobs=2, out=sys.stderr)
    with compile_check.compile_only(90):
        cases, expected = _failing_cases()
        failing = compile_check.check(cases, 90, jobs=1, expected=expected, out=sys.stderr)
    print(json.dumps({"engine": engine, "failing": failing}))


if __name__ == "__main__":
    main()
