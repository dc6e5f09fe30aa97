#!/usr/bin/env bash
# Set up overmem in a virtual environment (./.venv unless one is active).
# Without an NVIDIA GPU, a CPU build of torch is installed first so that pip does not pull the
# multi-GB CUDA build. Extra pip arguments (e.g. '.[all]' extras) can be given as EXTRAS.
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
echo "overmem installed in ${VIRTUAL_ENV}"
