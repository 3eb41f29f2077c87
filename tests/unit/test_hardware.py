"""The CPU rule (dtype and core binding) as a unit; what the real server's engines got from it is
checked in ``tests/serving/test_hardware.py``."""

import os

import pytest

from reward_server.hardware import (
    CpuInfo,
    cpu_bind_for,
    cpu_info,
    dtype_rule,
    engine_defaults,
    engine_environment,
)
from reward_server.judge_settings import EngineSettings
from reward_server.settings import DEFAULT_JUDGE, ServerSettings


def _cpu(capability: str, avx512_bf16: bool = False, amx: bool = False, machine: str = "x86_64") -> CpuInfo:
    return CpuInfo(machine=machine, capability=capability, avx512_bf16=avx512_bf16, amx=amx, cores=2)


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (_cpu("AVX2"), "float32"),  # AVX2-only EPYC: bf16 falls back to torch's reference path
        (_cpu("AVX512"), "float32"),  # AVX-512 without its BF16 extension (Skylake-SP)
        (_cpu("AVX512", avx512_bf16=True), "bfloat16"),  # Zen 4, Cooper Lake
        (_cpu("AVX512", amx=True), "bfloat16"),  # Sapphire Rapids
        # ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 machine: torch's kernels are AVX2 ones
        (_cpu("AVX2", avx512_bf16=True, amx=True), "float32"),
        (_cpu("DEFAULT", machine="aarch64"), "float32"),
    ],
)
def test_auto_dtype_on_the_cpu_is_bf16_only_where_native(info, expected):
    dtype, why = dtype_rule("auto", "cpu", info)
    assert dtype == expected
    assert why


def test_explicit_dtype_wins_and_accelerators_keep_the_models_dtype():
    assert dtype_rule("bfloat16", "cpu", _cpu("AVX2"))[0] == "bfloat16"
    assert dtype_rule("float16", "cuda", None)[0] == "float16"
    assert dtype_rule("auto", "cuda", None)[0] == "auto"  # vLLM's auto: the model config's dtype


def test_the_embedded_judge_and_engines_default_to_auto():
    assert DEFAULT_JUDGE.engine.dtype == "auto"
    assert ServerSettings().judges[0].engine.dtype == "auto"


@pytest.mark.parametrize(
    ("index", "count", "policy", "cores", "expected"),
    [
        (0, 1, "vllm", 2, None),  # vLLM's own binding: worker on one core, the other reserved
        (0, 1, "spread", 2, "0-1"),
        (0, 1, "all", 8, "0-7"),
        (1, 3, "all", 2, "0-1"),
        (0, 2, "spread", 2, "0"),
        (1, 2, "spread", 2, "1"),
        (2, 3, "spread", 2, "0"),  # more engines than cores: round robin
        (0, 2, "spread", 8, "0-3"),
        (1, 2, "spread", 8, "4-7"),
        (2, 3, "spread", 8, "4-7"),  # the last engine takes the remainder
        (0, 1, "spread", 1, "0"),
    ],
)
def test_core_binding_policy(index, count, policy, cores, expected):
    assert cpu_bind_for(index, count, policy, cores) == expected


def test_engine_environment_sets_the_binding_only_while_starting_and_never_over_the_operators(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with engine_environment("1"):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    with engine_environment("0-1"):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0"


def test_this_machine_is_described():
    info = cpu_info()
    assert info.cores >= 1 and info.capability
    assert ("native bf16 yes" in info.describe()) == info.native_bf16


def test_platform_defaults_on_the_cpu_build_are_todays_choices():
    gen = engine_defaults("cpu", "generate")
    assert (gen.enforce_eager, gen.gpu_memory_utilization, gen.max_num_batched_tokens) == (True, 0.1, 256)
    pool = engine_defaults("cpu", "pooling", engines_on_device=3)  # host RAM is not divided
    assert (pool.enforce_eager, pool.gpu_memory_utilization, pool.max_num_batched_tokens) == (True, 0.1, None)
    assert "CPU build" in gen.reasons["enforce_eager"] and "of host RAM" in gen.describe()


def test_platform_defaults_on_cuda_use_graphs_vllms_step_and_share_the_gpu():
    one = engine_defaults("cuda", "generate")
    assert (one.enforce_eager, one.gpu_memory_utilization, one.max_num_batched_tokens) == (False, 0.9, None)
    three = engine_defaults("cuda", "pooling", engines_on_device=3)
    assert (
        three.gpu_memory_utilization == 0.3
        and "shared by 3 engines" in three.reasons["gpu_memory_utilization"]
    )
    assert "CUDA graphs" in three.reasons["enforce_eager"]


def test_explicit_engine_settings_win_on_every_platform():
    for platform in ("cpu", "cuda"):
        got = engine_defaults(
            platform, "generate", enforce_eager=True, gpu_memory_utilization=0.42, max_num_batched_tokens=512
        )
        assert (got.enforce_eager, got.gpu_memory_utilization, got.max_num_batched_tokens) == (
            True,
            0.42,
            512,
        )
        assert all("set explicitly" in why for k, why in got.reasons.items() if k != "model_runner")


def test_engine_args_resolve_unset_settings_by_platform_and_place_on_gpus():
    from reward_server.engine import engine_args

    unset = EngineSettings()
    assert unset.enforce_eager is None and unset.gpu_memory_utilization is None
    cpu, _ = engine_args("/m", unset, "generate", "cpu", "float32", devices=[1])
    assert cpu["enforce_eager"] is True and cpu["gpu_memory_utilization"] == 0.1
    assert cpu["max_num_batched_tokens"] == 256 and "device_ids" not in cpu
    gpu, chosen = engine_args("/m", unset, "generate", "cuda", "auto", engines_on_device=2, devices=[1])
    assert gpu["enforce_eager"] is False and gpu["gpu_memory_utilization"] == 0.45
    assert "max_num_batched_tokens" not in gpu and gpu["device_ids"] == [1]
    assert chosen.reasons["enforce_eager"].startswith("False")
    pinned, _ = engine_args(
        "/m", EngineSettings(gpus=[2, 3], tensor_parallel_size=2), "pooling", "cuda", "auto"
    )
    assert pinned["device_ids"] == [2, 3]
