"""``--judges FILE`` for the benchmark scripts: run them against the judges of a judges file.

The file is the server's own configuration format (what ``referee serve --config`` reads): a
mapping with a ``judges:`` list (other keys such as ``limits`` or ``default_judge`` may be present
and are ignored here), or a bare list of judges. Each judge is checked with the server's own
settings of its kind (``parse_judge_settings``), so a file that the server would refuse fails here
first.

A benchmark picks the judges it needs by kind: the first ``generative`` judge for pairwise /
win-rate workloads, the first ``classifier`` judge for scores (``--judge-name`` style overrides
are up to each script). Without ``--judges`` every script keeps its CPU defaults: the embedded
SmolLM2-135M judge and, where one is needed, a SmolLM2-backbone reward model made locally.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_queue.py --judges configs/judges.gpu.example.yaml
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml


def read_judges(path: Path | str) -> list[dict]:
    """The judges of a judges file, each validated by the server's settings of its kind and returned
    as a plain dict (the file's own values, defaults not filled in, so that the script's YAML for
    the server stays what the file says)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--judges {path}: no such file")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    judges = data.get("judges") if isinstance(data, dict) else data
    if not isinstance(judges, list) or not judges:
        raise SystemExit(f"--judges {path}: expected a list of judges, or a mapping with a 'judges' list")
    from reward_server.settings import parse_judge_settings  # the server's own checks

    for j in judges:
        parse_judge_settings(j)
    return [copy.deepcopy(j) for j in judges]


def pick(judges: list[dict], kind: str, name: str | None = None) -> dict | None:
    """The judge called ``name``, else the first judge of ``kind`` (None: the file has none)."""
    for j in judges:
        if (name is not None and j["name"] == name) or (name is None and j["kind"] == kind):
            return copy.deepcopy(j)
    if name is not None:
        raise SystemExit(f"--judges: no judge named {name!r}")
    return None


def with_engine(judge: dict, **engine) -> dict:
    """A copy of ``judge`` with engine settings set (``extra`` keys merged, not replaced)."""
    judge = copy.deepcopy(judge)
    eng = judge.setdefault("engine", {})
    extra = engine.pop("extra", None)
    eng.update(engine)
    if extra:
        eng["extra"] = {**eng.get("extra", {}), **extra}
    return judge


def describe(judge: dict) -> str:
    eng = judge.get("engine", {})
    return f"{judge['name']} ({judge['kind']}, {judge['model']}, dtype {eng.get('dtype', 'auto')})"


def engine_kwargs(judge: dict) -> dict:
    """The vLLM engine arguments referee gives this judge's engine (dtype, context, KV cache or
    memory fraction, eager mode, parallelism, max_num_seqs, then ``extra``), to start vLLM's own
    server or offline engine on the same settings. Prefix caching and the runner are left to the
    caller."""
    from reward_server.hardware import device_type, engine_defaults, resolve_dtype
    from reward_server.judges import RUNNERS
    from reward_server.settings import EngineSettings

    eng = EngineSettings.model_validate(judge.get("engine", {}))
    # unset eager mode and memory fraction: the platform's defaults, as referee's engines get them
    chosen = engine_defaults(
        device_type(),
        RUNNERS.get(judge.get("kind", "generative"), "generate"),
        enforce_eager=eng.enforce_eager,
        gpu_memory_utilization=eng.gpu_memory_utilization,
    )
    out: dict = {
        "dtype": resolve_dtype(eng.dtype)[0],  # auto: the CPU rule on a CPU, the model's dtype on a GPU
        "max_model_len": eng.max_model_len,
        "enforce_eager": chosen.enforce_eager,
        "tensor_parallel_size": eng.tensor_parallel_size,
    }
    if eng.kv_cache_memory_gib is not None:
        out["kv_cache_memory_bytes"] = int(eng.kv_cache_memory_gib * (1 << 30))
    else:
        out["gpu_memory_utilization"] = chosen.gpu_memory_utilization
    if eng.max_num_seqs is not None:
        out["max_num_seqs"] = eng.max_num_seqs
    return {**out, **eng.extra}


def cli_args(kwargs: dict) -> list[str]:
    """Engine keyword arguments as vLLM server options (booleans as --x / --no-x, dicts as JSON)."""
    out = []
    for k, v in kwargs.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, json.dumps(v) if isinstance(v, dict | list) else str(v)]
    return out


def model_path(judge: dict) -> str:
    """The model as vLLM's own server and ``vllm.LLM`` take it: ``embedded:NAME`` becomes its local
    folder (referee resolves it itself); hub ids and folders are returned unchanged."""
    from referee.embedded import resolve_model

    return resolve_model(judge["model"])
