"""Every Triton kernel the engine launches compiles for sm90 (H100/H200) to a cubin on this CPU-only machine, through
the real launch wrappers (kubellm.engine.compile_check), so a kernel Triton refuses fails here and not on a GPU
lease. Triton stays out of the venv (CPU torch has none, and the engine reads "Triton importable" as a hint that
kernels may run): `make unit` installs triton==3.6.0, the GPU image's version, with `pip install --target` into
.venv/triton-3.6.0, and the check runs in a subprocess with that PYTHONPATH. Not skippable: without that directory
the test fails and says how to install it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubellm.engine import compile_check

PROBE = Path(__file__).with_name("triton_compile_probe.py")
TRITON_DIR = Path(
    os.environ.get("KUBELLM_TRITON_CHECK_PATH", Path(sys.prefix) / f"triton-{compile_check.TRITON_VERSION}")
)

# every kernel launched from the host under engine/ (grep '@triton.jit' minus the helpers kernels call), by hand
KERNELS = {
    "fused._rms_norm_kernel", "fused._add_rms_norm_kernel", "fused._rope_kernel", "fused._rope_cache_kernel",
    "fused._mla_rope_kernel", "fused._mla_rope_cache_kernel", "fused._silu_mul_kernel", "fused._grouped_topk_kernel",
    "fused._sum_add_rms_norm_kernel",
    "fused_moe._topk_softmax_kernel", "fused_moe._align_kernel", "fused_moe._scatter_kernel",
    "fused_moe._gate_up_kernel", "fused_moe._down_kernel", "fused_moe._down_sum_kernel",
    "fp8_gemm._w8a8_kernel", "fp8_gemm._w8a16_kernel", "fp8_gemm._splitk_kernel", "fp8_gemm._splitk_reduce_kernel",
    "fp8_quant._rows_kernel", "fp8_quant._tensor_amax_kernel",
    "fp8_quant._groups_kernel", "fp8_quant._rms_norm_quant_kernel", "fp8_quant._silu_mul_quant_groups_kernel",
    "fp8_quant._silu_mul_quant_rows_kernel", "gemv._gemv_kernel", "sampling_kernels._race_kernel",
    "token_bitmask._mask_kernel",
    "triton_mla_decode._mla_decode_split_kernel", "triton_mla_decode._mla_decode_merge_kernel",
}  # fmt: skip


def _env(pythonpath: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "TRITON_CACHE_DIR")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90_and_the_check_fails_on_bad_kernels():
    if not (TRITON_DIR / "triton" / "__init__.py").is_file():
        pytest.fail(
            f"Triton {compile_check.TRITON_VERSION} for the compile check is not installed in {TRITON_DIR}: run `make "
            f"triton` (make unit and make test do), i.e. `pip install --no-deps --target {TRITON_DIR} "
            f"triton=={compile_check.TRITON_VERSION}`, or point KUBELLM_TRITON_CHECK_PATH at such a directory"
        )
    proc = subprocess.run(
        [sys.executable, str(PROBE)], env=_env(str(TRITON_DIR)), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    engine = result["engine"]
    assert engine["ok"], proc.stderr[-12000:]
    assert not KERNELS - set(engine["kernels"]), sorted(KERNELS - set(engine["kernels"]))
    assert engine["compilations"] >= len(KERNELS) and not engine["missing"]
    # the same machinery fails where the GPU would: a type error between branches, shared memory, coverage
    failing = result["failing"]
    assert not failing["ok"]
    errors = {f["kernel"]: f["error"] for f in failing["failures"]}
    assert "Mismatched type for src between then block" in errors["__main__._branch_types"]
    assert "bytes of shared memory, sm90 allows 232448" in errors["__main__._too_much_shared"]
    assert failing["missing"] == ["__main__._never_launched"]


def test_without_triton_the_check_says_how_to_install_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['triton'] = None; from kubellm.engine import compile_check; "
         "sys.exit(compile_check.main(['--only', 'nothing']))"],
        env=_env(None), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Triton is not importable" in proc.stderr and "pip install --target" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_the_makefile_installs_the_version_the_check_names():
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert f"TRITON_VERSION := {compile_check.TRITON_VERSION}\n" in makefile


class _Kernel:
    """The few attributes of a Triton JIT function the selection reads (the test runs without Triton)."""

    def __init__(self, name: str, arg_names: list[str], declared: list[int]):
        self.fn = type("F", (), {"__module__": "kubellm.engine.models.fused", "__name__": name})
        self.arg_names, self.constexprs, self.src = arg_names, declared, ""


def test_the_quick_scope_keeps_every_flag_and_dtype_at_the_smallest_sizes():
    k = _Kernel("_k", ["x_ptr", "n", "BLOCK", "EVEN"], [2, 3])

    def req(dtype: str, block: int, even: bool, n_is_one: bool = False) -> compile_check.Request:
        consts = {(2,): block, (3,): even} | ({(1,): 1} if n_is_one else {})
        sig = {"x_ptr": f"*{dtype}", "n": "constexpr" if n_is_one else "i32", "BLOCK": "constexpr", "EVEN": "constexpr"}
        return compile_check.Request(k, sig, consts, {}, {"num_warps": 4, "num_stages": 3}, "case")

    requests = [
        req("bf16", 1024, True),  # 0
        req("bf16", 128, True),  # 1: the same flags and dtype as 0, smaller
        req("bf16", 128, False),  # 2: the other flag value
        req("fp16", 4096, True),  # 3: the only fp16 launch
        req("bf16", 64, True, n_is_one=True),  # 4: an int specialised to 1 selects no code: smallest of 0, 1, 4
        req("bf16", 2048, False),  # 5: covered by 2
    ]
    assert compile_check.quick_selection(requests) == [2, 3, 4]
