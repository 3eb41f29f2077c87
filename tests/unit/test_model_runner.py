"""The model runner by platform (``hardware.engine_defaults``): on CUDA, vLLM 0.32 would run its
experimental model runner V2; referee pins V1, the runner its paths were tested on (the CPU build
runs V1), unless the operator chose with ``VLLM_USE_V2_MODEL_RUNNER``."""

from __future__ import annotations

import inspect
import os

from reward_server.hardware import RUNNER_VARIABLE, engine_defaults, engine_environment


def test_cuda_pins_the_v1_runner_and_says_why():
    got = engine_defaults("cuda", "pooling", environ={})
    assert got.environment == {RUNNER_VARIABLE: "0"}
    why = got.reasons["model_runner"]
    assert why.startswith("V1 (cuda") and "model runner V2" in why and f"{RUNNER_VARIABLE}=1 opts in" in why
    assert "model_runner V1" in got.describe()


def test_the_operators_choice_is_kept_on_every_platform():
    for platform in ("cuda", "cpu"):
        v2 = engine_defaults(platform, "generate", environ={RUNNER_VARIABLE: "1"})
        assert v2.environment == {} and v2.reasons["model_runner"].startswith("V2 (")
        assert "set by the operator" in v2.reasons["model_runner"]
        v1 = engine_defaults(platform, "generate", environ={RUNNER_VARIABLE: "false"})
        assert v1.environment == {} and v1.reasons["model_runner"].startswith("V1 (")


def test_the_cpu_build_sets_nothing_and_other_platforms_keep_vllms_choice():
    cpu = engine_defaults("cpu", "generate", environ={})
    assert cpu.environment == {} and "no CPU backend" in cpu.reasons["model_runner"]
    rocm = engine_defaults("rocm", "generate", environ={})
    assert rocm.environment == {} and rocm.reasons["model_runner"] == "vLLM's own (rocm)"


def test_the_pin_reaches_the_process_environment_unless_the_operator_set_it(monkeypatch):
    monkeypatch.setenv(RUNNER_VARIABLE, "")  # recorded, so that the test's own setting is undone
    monkeypatch.delenv(RUNNER_VARIABLE)
    with engine_environment(None, {RUNNER_VARIABLE: "0"}):
        assert os.environ[RUNNER_VARIABLE] == "0"
    # it stays: vLLM's API process reads it after the engine started, and must agree with the engine
    assert os.environ[RUNNER_VARIABLE] == "0"
    monkeypatch.setenv(RUNNER_VARIABLE, "1")
    with engine_environment(None, {RUNNER_VARIABLE: "0"}):
        assert os.environ[RUNNER_VARIABLE] == "1"


def test_the_installed_vllm_decides_its_runner_by_this_variable(monkeypatch):
    """vLLM's own source (the installed wheel): the variable exists, parses 0 as "V1", and
    ``VllmConfig.use_v2_model_runner`` returns it before its own default."""
    import vllm.envs as envs
    from vllm.config import VllmConfig

    monkeypatch.setenv(RUNNER_VARIABLE, "0")
    assert envs.VLLM_USE_V2_MODEL_RUNNER is False
    monkeypatch.setenv(RUNNER_VARIABLE, "1")
    assert envs.VLLM_USE_V2_MODEL_RUNNER is True
    monkeypatch.delenv(RUNNER_VARIABLE)
    assert envs.VLLM_USE_V2_MODEL_RUNNER is None
    source = inspect.getsource(VllmConfig.use_v2_model_runner.fget)
    assert "envs.VLLM_USE_V2_MODEL_RUNNER" in source and "HAS_TRITON" in source


def test_engine_args_on_cuda_carry_the_pin(monkeypatch):
    from reward_server.engine import engine_args
    from reward_server.judge_settings import EngineSettings

    monkeypatch.delenv(RUNNER_VARIABLE, raising=False)
    kwargs, chosen = engine_args("/m", EngineSettings(), "pooling", "cuda", "auto")
    assert chosen.environment == {RUNNER_VARIABLE: "0"} and "model_runner" in chosen.reasons
    assert RUNNER_VARIABLE not in kwargs  # an environment variable, not an engine argument
