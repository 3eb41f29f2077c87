"""What the machine runs well: the engine dtype, the engine defaults of each platform (CUDA graphs,
memory fraction, step budget) and the cores an engine's worker is bound to.

The one place that decides them, so that the server, the embedded judge, the test fixtures, the
demo and the benchmarks make the same choice.

dtype: on vLLM's CPU build, bfloat16 is fast only where the processor has native bf16 arithmetic
(AVX512-BF16 or AMX); elsewhere (AVX2-only x86, for example) oneDNN cannot build its bf16 kernels,
vLLM falls back to torch's reference path, and a bf16 matrix product ran about 44 times slower than
float32 on an AVX2 EPYC. So ``dtype: auto`` means bfloat16 where it is native and float32 otherwise.
An explicit dtype is always kept; accelerator builds keep the model's own dtype (vLLM's ``auto``).

Platform defaults (``engine_defaults``): an engine setting left unset (None) gets its platform's
value. On the CPU build: eager mode (no CUDA graphs or torch.compile: start-up time), 0.1 of host
RAM, a 256-token step for generative judges (fairness beside a flood; BENCHMARKS.md). On CUDA: CUDA
graphs on, 0.9 of the GPU divided among the engines placed on it, vLLM's own step budget.

Model runner: on GPUs vLLM 0.32 runs its experimental "model runner V2" (``v1/worker/gpu/``)
whenever ``VLLM_USE_V2_MODEL_RUNNER`` is unset and Triton is present (``VllmConfig.
use_v2_model_runner``); its pooling path (``gpu/pool/``), prompt log-probabilities and sampling are
separate code from the V1 runner's. The CPU build has no Triton CPU backend, so it runs V1: every
path referee uses (classify and embed pooling, prompt log-probabilities, seeded sampling, top
log-probabilities) was tested there. On CUDA the rule pins V1 (``VLLM_USE_V2_MODEL_RUNNER=0``) until
V2 is confirmed on a GPU; an operator's own value of the variable is kept (1 opts in to V2).

Cores: vLLM's CPU build binds each engine's worker to cores through ``VLLM_CPU_OMP_THREADS_BIND``
(default ``auto``: one core per worker, the rest reserved for other processes). The policy here
picks that variable per engine (see ``cpu_bind_for``); BENCHMARKS.md has the measurements behind
the default.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger(__name__)

CpuBinding = Literal["vllm", "all", "spread"]


@dataclass(frozen=True)
class CpuInfo:
    """The processor features that decide the dtype, as torch sees them."""

    machine: str
    # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", ... (ATEN_CPU_CAPABILITY lowers it)
    capability: str
    avx512_bf16: bool
    amx: bool
    cores: int

    @property
    def native_bf16(self) -> bool:
        x86 = self.machine.lower() in {"x86_64", "amd64", "i686", "i386"}
        return x86 and self.capability.startswith("AVX512") and (self.avx512_bf16 or self.amx)

    def describe(self) -> str:
        feats = [f for f, on in (("avx512_bf16", self.avx512_bf16), ("amx", self.amx)) if on]
        return (
            f"{self.machine} capability {self.capability}, {self.cores} cores, "
            f"native bf16 {'yes (' + '+'.join(feats) + ')' if self.native_bf16 else 'no'}"
        )


def cpu_info() -> CpuInfo:
    import torch

    def probe(name: str) -> bool:
        fn = getattr(torch.cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except Exception:  # pragma: no cover - a probe that fails means the feature is not usable
            return False

    return CpuInfo(
        machine=platform.machine(),
        capability=str(torch.backends.cpu.get_cpu_capability()),
        avx512_bf16=probe("_is_avx512_bf16_supported"),
        amx=probe("_is_amx_tile_supported"),
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
    )


def dtype_rule(requested: str, device: str, info: CpuInfo | None) -> tuple[str, str]:
    """``(dtype to give vLLM, why)`` for a configured dtype on a device type ("cpu", "cuda", ...)."""
    if requested != "auto":
        return requested, "set explicitly"
    if device != "cpu":
        return "auto", f"{device}: the model's own dtype"
    assert info is not None
    if info.native_bf16:
        return "bfloat16", "the CPU has native bf16"
    return "float32", f"the CPU has no native bf16 ({info.capability}); bf16 would run on a slow path"


# The CPU build's default engine step: fairness between jobs beside a flood for a small share of
# throughput (see EngineSettings.max_num_batched_tokens and BENCHMARKS.md's step-budget section).
CPU_STEP_TOKENS = 256
CPU_MEMORY_FRACTION = 0.1  # of host RAM on the CPU build
GPU_MEMORY_TOTAL = 0.9  # of one GPU, shared by the engines placed on it (vLLM's own default, for one)
RUNNER_VARIABLE = "VLLM_USE_V2_MODEL_RUNNER"  # vllm/envs.py: unset = vLLM's choice, 0 = V1, 1 = V2


@dataclass(frozen=True)
class EngineDefaults:
    """What an engine gets for its platform-dependent settings, and why (for the start log and
    ``/judges``)."""

    enforce_eager: bool
    gpu_memory_utilization: float
    max_num_batched_tokens: int | None  # None: vLLM's own
    reasons: dict[str, str]
    # variables the engine's processes get (``engine_environment``): the model runner on CUDA
    environment: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return "; ".join(f"{k} {v}" for k, v in self.reasons.items())


def engine_defaults(
    platform: str,
    runner: str,
    *,
    enforce_eager: bool | None = None,
    gpu_memory_utilization: float | None = None,
    max_num_batched_tokens: int | None = None,
    engines_on_device: int = 1,
    environ: Mapping[str, str] | None = None,
) -> EngineDefaults:
    """The platform rule: configured values (not None) are kept, the others get ``platform``'s
    default ("cpu" for the CPU build, "cuda", ...). ``engines_on_device``: the engines placed on
    this engine's GPU(s), which share its default memory fraction. ``environ``: the process
    environment (``os.environ`` when not given), where an operator's ``VLLM_USE_V2_MODEL_RUNNER``
    is kept."""
    cpu = platform == "cpu"
    reasons: dict[str, str] = {}
    environment: dict[str, str] = {}
    if enforce_eager is not None:
        eager = enforce_eager
        reasons["enforce_eager"] = f"{eager} (set explicitly)"
    else:
        eager = cpu
        reasons["enforce_eager"] = (
            "True (CPU build: no CUDA graphs, start-up time)"
            if cpu
            else f"False ({platform}: CUDA graphs and torch.compile for decoding speed)"
        )
    if gpu_memory_utilization is not None:
        fraction = gpu_memory_utilization
        reasons["gpu_memory_utilization"] = f"{fraction} (set explicitly)"
    elif cpu:
        fraction = CPU_MEMORY_FRACTION
        reasons["gpu_memory_utilization"] = f"{fraction} (CPU build: of host RAM)"
    else:
        n = max(1, engines_on_device)
        fraction = round(GPU_MEMORY_TOTAL / n, 4)
        reasons["gpu_memory_utilization"] = f"{fraction} ({platform}: {GPU_MEMORY_TOTAL} of the GPU" + (
            f" shared by {n} engines placed on it)" if n > 1 else ", one engine on it)"
        )
    if max_num_batched_tokens is not None:
        step = max_num_batched_tokens
        reasons["max_num_batched_tokens"] = f"{step} (set explicitly)"
    elif cpu and runner == "generate":
        step = CPU_STEP_TOKENS
        reasons["max_num_batched_tokens"] = f"{step} (CPU build, generative: fairness beside a flood)"
    else:
        step = None
        reasons["max_num_batched_tokens"] = "vLLM's own" + (" (pooling model)" if cpu else f" ({platform})")
    given = (os.environ if environ is None else environ).get(RUNNER_VARIABLE)
    if given is not None and given.strip() != "":
        v2 = given.strip().lower() in {"1", "true", "yes", "on"}
        reasons["model_runner"] = f"{'V2' if v2 else 'V1'} ({RUNNER_VARIABLE}={given}, set by the operator)"
    elif platform == "cuda":
        environment[RUNNER_VARIABLE] = "0"
        reasons["model_runner"] = (
            f"V1 ({platform}: {RUNNER_VARIABLE}=0; vLLM 0.32 defaults to its experimental model "
            "runner V2 on GPUs, whose pooling, prompt log-probability and sampling code referee has "
            f"not been tested on; {RUNNER_VARIABLE}=1 opts in)"
        )
    elif cpu:
        reasons["model_runner"] = "V1 (CPU build: vLLM runs V2 only with Triton, which has no CPU backend)"
    else:
        reasons["model_runner"] = f"vLLM's own ({platform})"
    return EngineDefaults(eager, fraction, step, reasons, environment)


def device_type() -> str:
    """The device vLLM runs on here ("cpu" for the CPU build)."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def resolve_dtype(requested: str = "auto") -> tuple[str, str]:
    """The dtype rule applied to this machine."""
    device = device_type()
    return dtype_rule(requested, device, cpu_info() if device == "cpu" else None)


def default_cpu_dtype() -> str:
    """The dtype ``auto`` becomes on this machine's CPU (for fixtures and benchmarks that need a
    concrete name, e.g. to start vLLM's own server or transformers with the same dtype)."""
    return dtype_rule("auto", "cpu", cpu_info())[0]


def cpu_bind_for(index: int, count: int, policy: CpuBinding, cores: int) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for engine ``index`` of ``count`` in one server, or None to
    leave vLLM's own choice (``auto``).

    - ``vllm``: vLLM's default (worker on one core, the others reserved for the API process);
    - ``all``: every engine's worker uses every core;
    - ``spread``: one engine alone uses every core; several engines get disjoint core sets
      (round robin when there are more engines than cores).
    """
    if policy == "vllm" or cores < 1:
        return None
    if policy == "all" or count == 1:
        return f"0-{cores - 1}" if cores > 1 else "0"
    if count >= cores:
        return str(index % cores)
    per = cores // count
    start = index * per
    end = cores - 1 if index == count - 1 else start + per - 1
    return f"{start}-{end}" if end > start else str(start)


@contextlib.contextmanager
def engine_environment(bind: str | None, environment: Mapping[str, str] | None = None):
    """Set ``VLLM_CPU_OMP_THREADS_BIND`` while an engine starts (its processes inherit it); a value
    the operator exported already is left as it is.

    ``environment`` (``EngineDefaults.environment``: the model runner) is set for the rest of the
    process, where the operator has not set it: vLLM reads ``VLLM_USE_V2_MODEL_RUNNER`` in the API
    process as well as in the engine's (``VllmConfig.use_v2_model_runner``), and every engine of
    one server runs the same runner, so the two must not disagree once the engine has started."""
    for key, value in (environment or {}).items():
        if key not in os.environ:
            logger.info("setting %s=%s for vLLM's engines (see hardware.engine_defaults)", key, value)
            os.environ[key] = value
    name = "VLLM_CPU_OMP_THREADS_BIND"
    if bind is None or name in os.environ:  # vLLM's default, or the operator's own setting wins
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = bind
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
