"""The CPU rule (dtype and core binding) as a unit; what the real server's engines got from it is
checked in ``tests/serving/test_hardware.py``."""

import os

import pytest

from reward_server.hardware import CpuInfo, cpu_bind_for, cpu_info, dtype_rule, engine_environment
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
