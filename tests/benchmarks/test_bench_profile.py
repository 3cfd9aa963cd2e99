"""The step profiles side by side, on a CPU machine without vLLM: one kernel classifier for both engines (kernel names
as torch.profiler reports them, written down from our kernels and vLLM 0.26's source), the per-step summary of
recorded kernel intervals, the peer's --profile flags, and the report's "ours | vLLM" tables."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import kernel_kinds
from bench.kernel_kinds import HostTimer, busy_ms, kernel_kind, side_by_side, summarize
from bench.offline import peer_profile_batches, profiles_side_by_side
from bench.peer_vllm import HOST_PHASES, parse_args, peer_command, timed_core
from bench.workloads import EngineSettings

OURS = {
    "nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT": "gemm",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, false, true, false>": "gemm",
    "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, float, 128, 16, 4, 4, false>": "gemm",
    "_gemv_kernel": "gemm",
    "void flashinfer::BatchPrefillWithPagedKVCacheKernel<flashinfer::KernelTraits<...>>": "attention",
    "void flashinfer::BatchDecodeWithPagedKVCacheKernel<(flashinfer::PosEncodingMode)0, 2u, 4u>": "attention",
    "void at::native::elementwise_kernel<128, 4, at::native::index_copy_kernel_impl<c10::BFloat16>>": "kv_write",
    "_add_rms_norm_kernel": "fused_elementwise",
    "_rms_norm_kernel": "fused_elementwise",
    "_rope_kernel": "fused_elementwise",
    "_rope_cache_kernel": "fused_elementwise",
    "_silu_mul_kernel": "fused_elementwise",
    "_race_kernel": "sampling",
    "_gate_up_kernel": "gemm",
    "_down_kernel": "gemm",
    "_down_sum_kernel": "gemm",
    "_topk_softmax_kernel": "moe_routing",
    "_grouped_topk_kernel": "moe_routing",
    "_align_kernel": "moe_routing",
    "_mla_rope_cache_kernel": "fused_elementwise",
    "Memcpy HtoD (Pinned -> Device)": "copies",
}
VLLM = {
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "fused_elementwise",
    "triton_poi_fused_mul_silu_slice_1": "fused_elementwise",
    "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_2": "fused_elementwise",
    "void vllm::fused_add_rms_norm_kernel<c10::BFloat16, 8>": "fused_elementwise",
    "void vllm::rotary_embedding_kernel<c10::BFloat16, true>": "fused_elementwise",
    "void vllm::act_and_mul_kernel<c10::BFloat16, &vllm::silu_kernel<c10::BFloat16>, true>": "fused_elementwise",
    "void flashinfer::BatchQKApplyRotaryPosIdsCosSinCacheKernel<true, 128u, 8u, 16u, __nv_bfloat16, long>": (
        "fused_elementwise"
    ),
    "void flashinfer::norm::FusedAddRMSNormKernel<8u, __nv_bfloat16>": "fused_elementwise",
    "void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16, __nv_bfloat16, (vllm::Fp8KVCacheDataType)0>": (
        "kv_write"
    ),
    "void vllm::concat_and_cache_mla_kernel<__nv_bfloat16, __nv_bfloat16, (vllm::Fp8KVCacheDataType)0>": "kv_write",
    "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90"
    "<2, cute::tuple<...>>>>>": "attention",
    "void flash::FlashAttnFwdCombine<cute::tuple<cute::C<8>, cute::C<128>>, 7, 256, 1, false, true, float>": (
        "attention"
    ),
    "void flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, false, false, cutlass::bfloat16_t>>": (
        "attention"
    ),
    "kernel_unified_attention_2d": "attention",
    "reduce_segments": "attention",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
    "__5x_cublas": "gemm",
    "triton_tem_fused_mm_3": "gemm",
    "fused_moe_kernel": "gemm",
    "void vllm::moe::topkGatingSoftmax<4, 128, 4, 16, 32, int, __nv_bfloat16, (vllm::moe::ScoringFunc)0>": (
        "moe_routing"
    ),
    "void vllm::moe::moe_align_block_size_kernel<int>": "moe_routing",
    "void vllm::moe::count_and_sort_expert_tokens_kernel<int>": "moe_routing",
    "void flashinfer::sampling::TopKTopPSamplingFromProbKernel<1024u, (cub::BlockScanAlgorithm)2, 4u>": "sampling",
    "void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<float, 4, "
    "exponential_kernel<...>>": "sampling",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>, "
    "unsigned int, long, 4>>": "sampling",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, Epilogue>": "sampling",
    "ncclDevKernel_AllReduce_Sum_bf16_RING_LL": "all_reduce",
    "void vllm::cross_device_reduce_1stage<__nv_bfloat16, 2>": "all_reduce",
    "Memset (Device)": "copies",
    "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float, "
    "at::native::binary_internal::DivFunctor<float>>>": "other",
}


@pytest.mark.parametrize(("name", "kind"), sorted({**OURS, **VLLM}.items()))
def test_both_engines_kernels_fall_into_the_same_kinds(name, kind):
    assert kernel_kind(name) == kind


def test_every_kind_of_the_classifier_is_a_row_of_the_report():
    assert set(kernel_kinds.KINDS) == {kind for kind, _ in kernel_kinds.KERNEL_KINDS} | {"other"}


def test_busy_time_is_the_union_of_overlapping_intervals():
    # [0, 10) and [5, 20) overlap into 20 us; [30, 35) adds 5; [31, 33) lies inside it
    assert busy_ms([(30, 35), (0, 10), (5, 20), (31, 33)]) == pytest.approx(0.025)
    assert busy_ms([]) == 0.0


def test_summary_of_two_recorded_steps():
    # Two steps of 1 ms wall each: per step a 600 us GEMM, a 100 us attention kernel overlapping it by 50 us, and a
    # 50 us norm; 2 ms of wall, 1.4 ms busy (2 x (600 + 50 + 50)), so 0.3 ms idle per step.
    kernels = []
    for t0 in (0.0, 1000.0):
        kernels += [
            ("nvjet_tst_128x8", t0, t0 + 600),
            ("void flashinfer::BatchDecodeWithPagedKVCacheKernel<>", t0 + 550, t0 + 650),
            ("_add_rms_norm_kernel", t0 + 700, t0 + 750),
        ]
    p = summarize(kernels, steps=2, wall_s=2e-3, host_s={"schedule": 0.2e-3, "execute_model": 0.6e-3})
    assert p["steps"] == 2
    assert p["wall_ms_per_step"] == pytest.approx(1.0)
    assert p["gpu_busy_ms_per_step"] == pytest.approx(0.7)
    assert p["gpu_idle_ms_per_step"] == pytest.approx(0.3)
    assert p["gpu_kernel_ms_per_step"] == pytest.approx({"gemm": 0.6, "attention": 0.1, "fused_elementwise": 0.05})
    assert list(p["gpu_kernel_ms_per_step"]) == ["gemm", "attention", "fused_elementwise"]  # largest first
    assert p["gpu_kernels_per_step"] == {"gemm": 1, "attention": 1, "fused_elementwise": 1}
    assert p["host_ms_per_step"] == pytest.approx({"schedule": 0.1, "execute_model": 0.3, "rest_of_step": 0.6})


def test_a_profile_of_no_step_is_refused():
    with pytest.raises(ValueError, match="at least one step"):
        summarize([], steps=0, wall_s=1.0)


def test_host_timer_sums_and_counts_calls_and_restores_the_object():
    class Core:
        def schedule(self, n: int) -> int:
            return n + 1

    core = Core()
    host = HostTimer()
    host.wrap(core, "schedule", "schedule")
    assert core.schedule(1) == 2 and core.schedule(2) == 3
    assert host.calls["schedule"] == 2 and host.seconds["schedule"] >= 0.0
    host.restore()
    assert "schedule" not in vars(core)  # the class's method again, nothing left on the instance
    assert core.schedule(5) == 6 and host.calls["schedule"] == 2


class _Scheduled:
    def __init__(self, tokens: int) -> None:
        self.total_num_scheduled_tokens = tokens


class _Scheduler:
    """The two methods of vLLM's v1 Scheduler that the profile times (v1/core/sched/scheduler.py)."""

    def __init__(self) -> None:
        self.waiting = [16384, 1]

    def schedule(self) -> _Scheduled:
        return _Scheduled(self.waiting.pop(0))

    def update_from_output(self, scheduler_output: _Scheduled, model_output: object) -> dict:
        return {}


class _Executor:
    def execute_model(self, scheduler_output: _Scheduled, non_block: bool = False) -> None:
        return None


class _Core:
    """vLLM's EngineCore's step, reduced to the calls HOST_PHASES names (sample_tokens absent: older versions)."""

    def __init__(self) -> None:
        self.scheduler, self.model_executor = _Scheduler(), _Executor()

    def step(self) -> None:
        out = self.scheduler.schedule()
        self.scheduler.update_from_output(out, self.model_executor.execute_model(out, non_block=True))


def test_the_peer_core_is_timed_while_profiled_and_left_as_it_was():
    core = _Core()
    with timed_core(core) as (host, scheduled):
        core.step()
        core.step()
    assert scheduled == [16384, 1]
    assert host.calls == {"schedule": 2, "execute_model": 2, "update_from_output": 2}
    assert host.wrapped == {"schedule", "execute_model", "update_from_output"}  # sample_tokens: not in this core
    assert set(host.seconds) == {"schedule", "execute_model", "update_from_output"}
    assert {label for _, _, label in HOST_PHASES} >= set(host.seconds)
    assert vars(core.scheduler) == {"waiting": []} and vars(core.model_executor) == {}  # no wrapper left behind
    with timed_core(None) as (host, scheduled):  # no in-process core found: nothing timed, nothing fails
        pass
    assert not host.calls and scheduled == []


def _profile(gemm: float, attention: float, host: dict[str, float]) -> dict:
    kernels = [("nvjet_tst", 0.0, gemm * 1e3), ("flash::FlashAttnFwdSm90", gemm * 1e3, (gemm + attention) * 1e3)]
    return summarize(
        kernels, steps=1, wall_s=(gemm + attention + 0.5) / 1e3, host_s={k: v / 1e3 for k, v in host.items()}
    )


def test_the_side_by_side_table_has_one_row_per_figure_kind_and_phase():
    ours = _profile(5.0, 0.4, {"schedule": 0.05, "runner_execute": 2.0})
    peer = _profile(5.2, 0.3, {"schedule": 0.1, "execute_model": 1.5})
    table = side_by_side("decode step, batch 1", ours, peer, "vLLM 0.26.0").splitlines()
    assert table[0] == "| decode step, batch 1 | ours | vLLM 0.26.0 |"
    rows = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:] for line in table[2:]}
    assert rows["wall ms"] == ["5.90", "6.00 |"]
    assert rows["GPU idle ms"] == ["0.50", "0.50 |"]
    assert rows["kernel ms (kernels): gemm"] == ["5.00 (1)", "5.20 (1) |"]
    assert rows["kernel ms (kernels): attention"] == ["0.40 (1)", "0.30 (1) |"]
    assert rows["host ms: runner_execute"] == ["2.00", "- |"]  # a phase only one engine has
    assert rows["host ms: execute_model"] == ["-", "1.50 |"]
    assert "kernel ms (kernels): sampling" not in rows  # kinds neither engine ran are left out
    assert side_by_side("x", ours, None, "vLLM").splitlines()[2] == "| wall ms | 5.90 | - |"


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"profile": True, "decode_batches": "1,32,128,256", **kw})


def test_the_peer_profiles_the_decode_batches_ours_profiles():
    assert peer_profile_batches(_args()) == [1, 256]
    assert peer_profile_batches(_args(decode_batches="32,256")) == [256]
    assert peer_profile_batches(_args(profile=False)) is None


def test_the_profile_flag_reaches_the_peer_command(tmp_path):
    cmd = peer_command("python3", "llama-3.1-8b", 0.5, EngineSettings(), "1,a", tmp_path / "p.json", [1, 256])
    args = parse_args(cmd[3:])
    assert args.profile and args.profile_batches == [1, 256]
    plain = parse_args(peer_command("python3", "llama-3.1-8b", 0.5, EngineSettings(), "1,a", tmp_path / "p.json")[3:])
    assert not plain.profile


@pytest.mark.parametrize("bad", ["1,x", "0,256"])
def test_bad_profile_batches_are_a_clear_error(bad, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--json-out", "x.json", "--profile", "--profile-batches", bad])
    assert "--profile-batches" in capsys.readouterr().err


def _run(peer: dict) -> dict:
    ours_decode = _profile(5.0, 0.4, {"runner_execute": 2.0})
    return {
        "decode": {"1": {"step_ms": 5.4, "profile": ours_decode}, "32": {"step_ms": 6.0}},
        "prefill_probe": {"tokens": 16384, "prompt_len": 1024, "profile": _profile(330.0, 20.0, {})},
        "peer": peer,
    }


def test_the_report_prints_ours_beside_the_peers_profile_per_probe():
    peer = {
        "version": "0.26.0",
        "profile": {
            "prefill": {"tokens": 16384, "prompt_len": 1024, **_profile(320.0, 25.0, {"execute_model": 30.0})},
            "decode": {"1": _profile(5.2, 0.3, {"execute_model": 1.5}), "256": {"error": "RuntimeError: boom"}},
        },
    }
    md = "\n".join(profiles_side_by_side(_run(peer)))
    assert "| prefill step, 16384 tokens | ours | vLLM 0.26.0 |" in md
    assert "| decode step, batch 1 | ours | vLLM 0.26.0 |" in md
    assert "| kernel ms (kernels): gemm | 5.00 (1) | 5.20 (1) |" in md
    assert "| kernel ms (kernels): gemm | 330.00 (1) | 320.00 (1) |" in md
    assert "| decode step, batch 256 | ours | vLLM 0.26.0 |" in md  # the peer's failed probe says why
    assert "vLLM 0.26.0: RuntimeError: boom" in md
    assert "batch 32" not in md  # profiled by neither engine


def test_a_peer_from_another_run_shows_no_figures_beside_ours():
    peer = {
        "version": "0.26.0",
        "error": "the peer ran on other GPUs",
        "profile": {"decode": {"1": _profile(1, 1, {})}},
    }
    md = "\n".join(profiles_side_by_side(_run(peer)))
    assert "| wall ms | 5.90 | - |" in md
    assert "1.00 (1)" not in md


def test_results_whose_markdown_fails_are_still_written_whole_and_the_run_goes_on(tmp_path):
    """write_results runs after every phase of a GPU run: a figure the markdown cannot format (here a prefill probe
    without its step time) must not end the run; the JSON is written whole and the markdown says where it is."""
    from bench.offline import write_results

    r = {"date": "2026-12-07", "name_suffix": "-t", "shape": "llama-3.1-8b", "prefill_probe": {"tokens": 8192}}
    write_results(r, tmp_path)
    assert json.loads((tmp_path / "engine-gpu-2026-12-07-t.json").read_text()) == r
    assert "engine-gpu-2026-12-07-t.json holds the results" in (tmp_path / "engine-gpu-2026-12-07-t.md").read_text()


def test_mla_micro_results_name_the_prefill_rows_that_failed(tmp_path):
    """bench/mla_micro.py writes its results after each row; a prefill row that failed (a kernel build, memory) is
    said in place of its figures and the rows measured stand."""
    from bench.mla_micro import write_results as write_mla

    result = {
        "device": "test", "torch": "2", "flashinfer": "0", "ceilings": {"copy_gb_s": 3000.0},
        "decode": [{"kernel": "fa2", "batch": 1, "ctx": 1024, "ms": 0.01, "floor_ms": 0.005, "ratio_to_floor": 2.0}],
        "prefill": [], "prefill_errors": [{"seqs": 16, "len": 4096, "cached": 4096, "error": "OutOfMemoryError: x"}],
    }  # fmt: skip
    write_mla(tmp_path, result)
    (md,) = tmp_path.glob("mla-micro-*.md")
    text = md.read_text()
    assert "| fa2 | 16 | 1 | 1024 | 10.0 | 5.0 | 2.00 |" in text  # a row of before page sizes were timed: page 16
    assert "- fa2 16 x 4096 over 4096 cached: not measured (OutOfMemoryError: x)" in text
    result["decode"].append({**result["decode"][0], "kernel": "fa3", "page": 64, "ms": 0.006, "ratio_to_floor": 1.2})
    result["prefill"].append({
        "kernel": "fa3", "seqs": 16, "len": 1024, "cached": 0, "absorbed_ms": 2.0, "up_ms": 0.5,
        "faster": "up-projected", "up_over_absorbed": 0.25, "rel_l2_between_paths": 3e-3,
    })  # fmt: skip
    write_mla(tmp_path, result)
    text = md.read_text()
    assert "| fa3 | 64 | 1 | 1024 | 6.0 | 5.0 | 1.20 |" in text
    assert "| fa3 | 16 x 1024 | 0 | 2.000 | 0.500 | 0.25 | up-projected | 3.0e-03 |" in text
    assert json.loads(md.with_suffix(".json").read_text()) == result
    # our Triton decode kernel's rows name their KV splits; a decode row that failed is said, the others stand
    result["decode"].append({**result["decode"][0], "kernel": "triton", "page": 64, "splits": 5, "ms": 0.0055,
                             "ratio_to_floor": 1.1})  # fmt: skip
    result["decode_errors"] = [{"kernel": "triton-64-8-4-2", "page": 16, "batch": 1, "error": "OutOfResources: smem"}]
    write_mla(tmp_path, result)
    text = md.read_text()
    assert "| triton (5 splits) | 64 | 1 | 1024 | 5.5 | 5.0 | 1.10 |" in text
    assert "- decode triton-64-8-4-2 page 16 batch 1 failed: OutOfResources: smem" in text
