#!/usr/bin/env bash
# Create .venv in the repository and install promptset with its test tools, from scratch, offline-friendly.
# Torch: the CPU build (torch==2.13.0) unless a CUDA GPU is present or TORCH_SPEC says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    .venv/bin/pip install -q "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/pip install -q "torch>=2.4,<3"
  else
    .venv/bin/pip install -q "torch==2.13.0"
  fi
fi
.venv/bin/pip install -q -e ".[test,multi]"
# The tests rebuild CLIP's tokenizer offline from the BPE merges file in this wheel. Its dependencies would pull a
# torchvision that does not import beside the CPU torch build, so it is installed without them.
.venv/bin/pip install -q --no-deps "open_clip_torch>=2.20"
echo "promptset installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
