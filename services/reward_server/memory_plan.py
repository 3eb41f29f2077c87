"""Where each engine runs on the GPUs, and whether it fits there, decided before any engine loads.

Placement (``place_engines``): an engine with ``engine.gpus`` runs on those GPUs; the others are
spread over the visible GPUs, each taking the ``tensor_parallel_size`` GPUs that carry the fewest
engines so far (lowest index first). The GPUs an engine gets become vLLM's ``device_ids`` engine
argument (indices into ``CUDA_VISIBLE_DEVICES`` when that is set), so engines in one process stay
apart without changing the process' environment.

The memory plan (``plan``): per engine, from the model's own files (``config.json`` and the
safetensors index or files; for hub ids not in the local Hugging Face cache, a small table of
known configs), what one of its GPUs must hold: its share of the weights, its share of the
KV cache for one sequence of ``max_model_len`` tokens (layers x KV heads x head dim x 2 x dtype
size x tokens), and a margin for activations, CUDA graphs and the CUDA context
(``OVERHEAD_GIB``). Against it, what the engine is given: its ``gpu_memory_utilization`` (or the
platform default for the engines on its GPU) of the GPU. A plan in which an engine needs more than
it is given, or the fractions on one GPU add up to more than ``MAX_DEVICE_FRACTION``, is refused
with a message naming the judge and the fraction that would fit. A model whose files cannot be
read is reported as not checked, never guessed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .hardware import engine_defaults
from .judge_settings import EngineSettings

GiB = 1 << 30
# Activations of vLLM's profiling step, CUDA graphs, cuBLAS/NCCL workspaces and the CUDA context of
# each engine process: a margin, not a measurement (a 7-8 B model at an 8192-token step takes
# about 1-2 GiB of it).
OVERHEAD_GIB = 2.0
# Each engine is its own process with its own CUDA context outside its fraction; vLLM refuses to
# start when the GPU's free memory is below its fraction.
MAX_DEVICE_FRACTION = 0.95
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8": 1}

# Hub models whose files may not be on this machine: the fields of their published config.json
# that the plan reads, and the ``metadata.total_size`` of their model.safetensors.index.json
# (None: computed from the config).
KNOWN_MODELS: dict[str, tuple[dict, int | None]] = {
    "Skywork/Skywork-Reward-V2-Llama-3.1-8B": (
        {
            "architectures": ["LlamaForSequenceClassification"],
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 128256,
            "num_labels": 1,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        None,
    ),
    "Qwen/Qwen2.5-7B-Instruct": (
        {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        15231233024,
    ),
    "Qwen/Qwen2.5-VL-7B-Instruct": (
        {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        16584333312,
    ),
}


class PlanError(ValueError):
    """A placement or memory plan that cannot start."""


# ------------------------------------------------------------------ GPUs


def parse_gpus(spec: str) -> list[int]:
    """``"1x80GiB"``, ``"2x80GB"``, ``"141GiB"``, ``"80GiB,24GiB"``: the bytes of each GPU."""
    units = {"gib": GiB, "gb": 10**9, "mib": 1 << 20, "mb": 10**6}
    sizes: list[int] = []
    for part in spec.replace(" ", "").split(","):
        m = re.fullmatch(r"(?:(\d+)x)?(\d+(?:\.\d+)?)(GiB|GB|MiB|MB)", part, re.IGNORECASE)
        if not m:
            raise PlanError(f"cannot read GPUs {part!r}: write COUNTxSIZE, e.g. 1x80GiB or 2x24GB")
        count = int(m.group(1) or 1)
        sizes += [int(float(m.group(2)) * units[m.group(3).lower()])] * count
    return sizes


def visible_gpus() -> list[int]:
    """The memory of each GPU this process sees (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


# ------------------------------------------------------------------ placement


@dataclass(frozen=True)
class EngineSpec:
    """One engine of a server: the judges that share it, its model, runner and settings."""

    judges: tuple[str, ...]
    model: str
    runner: str
    engine: EngineSettings


def engines_of(settings) -> list[EngineSpec]:
    """The distinct engines of a server's settings, in load order (judges that share an engine,
    ``registry.engine_key``, are one)."""
    from .judges.registry import RUNNERS, engine_key

    by_key: dict[tuple, list] = {}
    for cfg in settings.judges:
        key = engine_key(cfg)
        if key is not None and cfg.engine.remote is None:  # a remote judge's model runs elsewhere
            by_key.setdefault(key, []).append(cfg)
    return [
        EngineSpec(tuple(c.name for c in cfgs), cfgs[0].model, RUNNERS[cfgs[0].kind], cfgs[0].engine)
        for cfgs in by_key.values()
    ]


def place_engines(engines: list[EngineSpec], gpu_count: int) -> list[list[int]]:
    """The GPUs of each engine: its ``engine.gpus``, or the ``tensor_parallel_size`` GPUs carrying
    the fewest engines so far (after the pinned ones), lowest index first."""
    load = [0] * gpu_count
    placed: list[list[int] | None] = []
    for spec in engines:
        gpus, tp, name = spec.engine.gpus, spec.engine.tensor_parallel_size, spec.judges[0]
        if tp > gpu_count:
            raise PlanError(f"judge {name!r}: tensor_parallel_size {tp} needs {tp} GPUs; {gpu_count} visible")
        if gpus is None:
            placed.append(None)
            continue
        if len(gpus) != tp or len(set(gpus)) != len(gpus):
            raise PlanError(
                f"judge {name!r}: engine.gpus {gpus} must be {tp} distinct GPUs (tensor_parallel_size)"
            )
        if max(gpus) >= gpu_count or min(gpus) < 0:
            raise PlanError(
                f"judge {name!r}: engine.gpus {gpus}, but the visible GPUs are 0..{gpu_count - 1}"
            )
        for g in gpus:
            load[g] += 1
        placed.append(list(gpus))
    out: list[list[int]] = []
    for spec, gpus in zip(engines, placed, strict=True):
        if gpus is None:
            order = sorted(range(gpu_count), key=lambda g: (load[g], g))
            gpus = sorted(order[: spec.engine.tensor_parallel_size])
            for g in gpus:
                load[g] += 1
        out.append(gpus)
    return out


def engines_on(placement: list[list[int]]) -> list[int]:
    """For each engine, the most engines that share one of its GPUs (itself included)."""
    count: dict[int, int] = {}
    for gpus in placement:
        for g in gpus:
            count[g] = count.get(g, 0) + 1
    return [max(count[g] for g in gpus) for gpus in placement]


# ------------------------------------------------------------------ a model's footprint


@dataclass(frozen=True)
class Footprint:
    """What a model needs, whatever its GPUs: its weights and its KV cache per token."""

    weights_bytes: int
    kv_bytes_per_token: int
    source: str


def _text_config(config: dict) -> dict:
    return {**config, **(config.get("text_config") or {})}


def _dtype_bytes(name: str | None) -> int:
    return DTYPE_BYTES.get(str(name or "bfloat16").removeprefix("torch."), 2)


def parameter_count(config: dict) -> int:
    """A decoder's parameters from its config (Llama, Qwen2, Mistral-style: attention with grouped
    KV heads, a gated MLP, two norms per layer; a sequence-classification head in place of the
    LM head). A vision tower is not counted."""
    c = _text_config(config)
    hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or hidden // heads
    layer = hidden * heads * hd * 2 + hidden * kv * hd * 2 + 3 * hidden * c["intermediate_size"] + 2 * hidden
    if c.get("model_type", "").startswith("qwen2"):
        layer += heads * hd + 2 * kv * hd  # q, k, v biases
    total = vocab * hidden + layers * layer + hidden
    archs = c.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        total += hidden * (c.get("num_labels") or len(c.get("id2label") or {}) or 1)
    elif not c.get("tie_word_embeddings", False):
        total += vocab * hidden
    return total


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """KV cache of one token: layers x KV heads x head dim x 2 (K and V) x dtype size."""
    c = _text_config(config)
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or c["hidden_size"] // heads
    return c["num_hidden_layers"] * kv * hd * 2 * dtype_bytes


def _local_files(model: str) -> tuple[dict, int | None, str] | None:
    """(config, weight bytes or None, where) from a local folder or the Hugging Face cache."""
    folder = Path(model)
    if folder.is_dir():
        cfg = folder / "config.json"
        if not cfg.exists():
            return None
        index = folder / "model.safetensors.index.json"
        if index.exists():
            total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
            if total:
                return json.loads(cfg.read_text()), int(total), f"{index}"
        shards = list(folder.glob("*.safetensors"))
        if shards:
            return (
                json.loads(cfg.read_text()),
                sum(f.stat().st_size for f in shards),
                f"{folder}/*.safetensors",
            )
        return json.loads(cfg.read_text()), None, f"{cfg}"
    if "/" not in model or model.startswith(("/", ".")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - the server's dependencies include it
        return None
    cfg_path = try_to_load_from_cache(model, "config.json")
    if not isinstance(cfg_path, str):
        return None
    config = json.loads(Path(cfg_path).read_text())
    index = try_to_load_from_cache(model, "model.safetensors.index.json")
    if isinstance(index, str):
        total = json.loads(Path(index).read_text()).get("metadata", {}).get("total_size")
        if total:
            return config, int(total), f"{model} (Hugging Face cache)"
    return config, None, f"{model} config (Hugging Face cache)"


def footprint(model: str, dtype: str) -> Footprint | None:
    """The model's weights and KV cache per token in ``dtype`` ("auto": the model's own), from its
    files or the known table; None when neither has it."""
    if model.startswith("embedded:"):
        from referee.embedded import cache_dir

        model = str(cache_dir() / f"{model.removeprefix('embedded:')}-hf")
    found = _local_files(model)
    if found is None and model in KNOWN_MODELS:
        config, total = KNOWN_MODELS[model]
        found = (config, total, f"{model} (built-in table of published configs)")
    if found is None:
        return None
    config, total, source = found
    stored = _dtype_bytes(_text_config(config).get("torch_dtype") or config.get("dtype"))
    run = stored if dtype == "auto" else _dtype_bytes(dtype)
    if total is None:
        weights = parameter_count(config) * run
        source += ", weights from the parameter count"
    else:
        weights = total * run // stored
    return Footprint(weights, kv_bytes_per_token(config, run), source)


# ------------------------------------------------------------------ the plan


@dataclass
class EnginePlan:
    judges: tuple[str, ...]
    model: str
    gpus: list[int]
    fraction: float  # of each of its GPUs
    fraction_why: str
    need_bytes: int | None = None  # per GPU; None: not checked
    given_bytes: int = 0
    fit_fraction: float | None = None
    source: str = ""
    problem: str | None = None
    sharing: int = 1  # engines on its most shared GPU (itself included)

    @property
    def name(self) -> str:
        return self.judges[0] if len(self.judges) == 1 else "/".join(self.judges)


@dataclass
class Plan:
    gpus: list[int]
    engines: list[EnginePlan]
    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def placement(self, judge: str) -> tuple[list[int], int]:
        """``(GPUs, engines sharing them)`` for the engine of ``judge``: ``Engine.start``'s
        ``devices`` and ``engines_on_device``."""
        for e in self.engines:
            if judge in e.judges:
                return e.gpus, e.sharing
        raise KeyError(judge)

    def check(self) -> Plan:
        if self.problems:
            raise PlanError("the judges do not fit their GPUs:\n  " + "\n  ".join(self.problems))
        return self

    def render(self) -> str:
        lines = [f"GPUs: {', '.join(f'{i}: {b / GiB:.1f} GiB' for i, b in enumerate(self.gpus))}"]
        for e in self.engines:
            need = "not checked" if e.need_bytes is None else f"needs {e.need_bytes / GiB:.1f} GiB"
            fit = "" if e.fit_fraction is None else f", fits from {e.fit_fraction:.2f}"
            lines.append(
                f"{'FAIL' if e.problem else 'ok  '} {e.name} ({e.model}) on GPU {e.gpus}: {need}, given "
                f"{e.given_bytes / GiB:.1f} GiB by gpu_memory_utilization {e.fraction_why}{fit}"
            )
            if e.source:
                lines.append(f"       from {e.source}")
        lines += [f"not checked: {u}" for u in self.unchecked]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def plan(settings, gpus: list[int], footprints: dict[str, Footprint | None] | None = None) -> Plan:
    """The placement and memory plan of a server's judges on GPUs of ``gpus`` bytes each, on CUDA.
    ``footprints`` (by model) replaces reading the models' files."""
    engines = engines_of(settings)
    placement = place_engines(engines, len(gpus))
    sharing = engines_on(placement)
    out = Plan(gpus, [])
    used = [0.0] * len(gpus)
    for spec, where, n in zip(engines, placement, sharing, strict=True):
        eng = spec.engine
        chosen = engine_defaults(
            "cuda", spec.runner, gpu_memory_utilization=eng.gpu_memory_utilization, engines_on_device=n
        )
        fraction = chosen.gpu_memory_utilization
        row = EnginePlan(spec.judges, spec.model, where, fraction, chosen.reasons["gpu_memory_utilization"])
        row.sharing = n
        smallest = min(gpus[g] for g in where)
        row.given_bytes = int(fraction * smallest)
        out.engines.append(row)
        if footprints is not None and spec.model in footprints:
            fp = footprints[spec.model]
        else:
            fp = footprint(spec.model, eng.dtype)
        if fp is None:
            out.unchecked.append(f"judge {row.name!r}: no local files or known config for {spec.model!r}")
            for g in where:
                used[g] += fraction
            continue
        tp = eng.tensor_parallel_size
        kv_min = fp.kv_bytes_per_token * eng.max_model_len
        kv = kv_min
        if eng.kv_cache_memory_gib is not None:
            kv = max(kv_min, int(eng.kv_cache_memory_gib * GiB))
            if eng.kv_cache_memory_gib * GiB < kv_min:
                row.problem = (
                    f"judge {row.name!r} ({spec.model}): kv_cache_memory_gib {eng.kv_cache_memory_gib} is "
                    f"below one sequence of max_model_len {eng.max_model_len} ({kv_min / GiB:.2f} GiB)"
                )
        need = math.ceil((fp.weights_bytes + kv) / tp + OVERHEAD_GIB * GiB)
        row.need_bytes, row.source = need, fp.source
        row.fit_fraction = math.ceil(need / smallest * 100) / 100
        if eng.kv_cache_memory_gib is not None:
            # a fixed KV cache: vLLM takes what it needs, whatever the fraction
            row.given_bytes, fraction = need, row.fit_fraction
            row.fraction_why = f"unused: kv_cache_memory_gib {eng.kv_cache_memory_gib} fixes the KV cache"
        elif need > row.given_bytes:
            row.problem = (
                f"judge {row.name!r} ({spec.model}) needs {need / GiB:.1f} GiB per GPU (weights "
                f"{fp.weights_bytes / tp / GiB:.1f} GiB, KV cache for max_model_len {eng.max_model_len} "
                f"{kv / tp / GiB:.2f} GiB, margin {OVERHEAD_GIB} GiB) but gpu_memory_utilization "
                f"{row.fraction} gives it {row.given_bytes / GiB:.1f} GiB of GPU {where}; it fits from "
                f"gpu_memory_utilization {row.fit_fraction:.2f}"
            )
        if row.problem:
            out.problems.append(row.problem)
        for g in where:
            used[g] += fraction
    for g, total in enumerate(used):
        if total > MAX_DEVICE_FRACTION + 1e-9:
            names = [e.name for e in out.engines if g in e.gpus]
            out.problems.append(
                f"GPU {g}: the engines of judges {names} take {total:.2f} of it together, over "
                f"{MAX_DEVICE_FRACTION} (each engine process needs room for its own CUDA context); "
                f"lower their gpu_memory_utilization or place them on other GPUs (engine.gpus)"
            )
    return out


def check_before_loading(settings, platform: str) -> Plan | None:
    """At start, before any engine loads: on CUDA, the plan for the visible GPUs, refused with
    ``PlanError`` when it cannot fit; nothing on the CPU build (host RAM has its own rule)."""
    if platform != "cuda":
        return None
    gpus = visible_gpus()
    if not gpus:
        return None
    return plan(settings, gpus).check()
